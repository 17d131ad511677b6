//! The services against the database as an operator sets it up: runtime roles with only the
//! grants of `scripts/runtime-roles.sql`, and the legacy `chats.updated_at` left to the legacy
//! service's own edits.

use std::time::Duration;

use maxsim::SimConfig;
use sqlx::PgPool;

use crate::end_to_end::{start_api, token};
use crate::helpers::{eventually, World};

/// Creates the two login roles as README "Database roles" says, grants them what
/// `scripts/runtime-roles.sql` grants, and returns (api's URL, syncd's URL).
fn runtime_roles(world: &World) -> (String, String) {
    world.pg.psql(
        "postgres",
        "create role participants_api login; create role participants_syncd login;",
    );
    world.pg.psql(
        "postgres",
        include_str!("../../../scripts/runtime-roles.sql"),
    );
    let url = |role: &str| format!("postgres://{role}@127.0.0.1:{}/postgres", world.pg.port());
    (url("participants_api"), url("participants_syncd"))
}

/// The SQLSTATE of a statement's failure, or `None` if it succeeded.
async fn refused(pool: &PgPool, sql: &str) -> Option<String> {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => None,
        Err(error) => Some(
            error
                .as_database_error()
                .and_then(|e| e.code())
                .map(|code| code.into_owned())
                .unwrap_or_else(|| format!("{error}")),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_syncd_work_with_only_the_runtime_grants_and_may_not_change_the_schema() {
    let mut world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(3).await;
    let (api_url, syncd_url) = runtime_roles(&world);

    world.database_url = api_url.clone();
    let (api, _stop_api) = start_api(&world, &[]).await;
    world.database_url = syncd_url.clone();
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;

    let http = reqwest::Client::new();
    let token = token();
    // The api records an admin's full sweep (its one write); syncd runs it.
    let response = http
        .post(format!("http://{api}/admin/participants/full-update"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    let expected = world.sim.count_of(World::max_id(1));
    eventually(
        Duration::from_secs(30),
        "the sweep's counts reach the api's read model",
        || async {
            let page: serde_json::Value = http
                .get(format!("http://{api}/chats/all?sort_by=id&limit=10"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            page["data"].as_array().is_some_and(|chats| {
                chats.len() == ids.len()
                    && chats.iter().all(|chat| chat["participants_stale"] == false)
            }) && page["data"][0]["participants_count"] == expected
        },
    )
    .await;
    let mirrored: Option<i32> =
        sqlx::query_scalar("select participants_count from chats where id = $1")
            .bind(ids[0])
            .fetch_one(&world.db)
            .await
            .unwrap();
    assert_eq!(mirrored, Some(expected), "syncd mirrored the count");
    for path in ["/admin/participants/sweeps", "/health/detailed"] {
        let response = http
            .get(format!("http://{api}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    replica.stop().await.unwrap();

    // Neither role may change the schema or the legacy columns it does not own.
    for url in [&api_url, &syncd_url] {
        let pool = PgPool::connect(url).await.unwrap();
        for ddl in [
            "create table participants_probe (id integer)",
            "alter table chats add column participants_probe integer",
            "create index participants_probe on chats (name)",
            "drop table chat_participants",
            "truncate chats",
        ] {
            assert_eq!(
                refused(&pool, ddl).await.as_deref(),
                Some("42501"),
                "{url}: {ddl}"
            );
        }
        assert_eq!(
            refused(&pool, "update chats set name = 'renamed'")
                .await
                .as_deref(),
            Some("42501"),
            "{url}"
        );
        pool.close().await;
    }
}

/// syncd's mirror of a count into the legacy column leaves `updated_at` as it was, so the
/// admin panel's "sort by updated_at" still means "edited lately"; the legacy service's own
/// updates, of the count too, are stamped as before.
#[tokio::test]
async fn the_count_mirror_leaves_the_legacy_updated_at_alone() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(1).await;
    let updated_at = || async {
        sqlx::query_scalar::<_, String>(
            "select to_char(updated_at at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS') from chats where id = $1",
        )
        .bind(ids[0])
        .fetch_one(&world.db)
        .await
        .unwrap()
    };
    // An edit of long ago (the legacy trigger would stamp this update, hence its pause).
    world.pg.psql(
        "postgres",
        "alter table chats disable trigger update_chats_updated_at; \
         update chats set updated_at = '2025-02-01 12:00:00+00'; \
         alter table chats enable trigger update_chats_updated_at",
    );
    assert_eq!(updated_at().await, "2025-02-01 12:00:00");
    // The trigger ships as a migration in the next release (README: the legacy table); this
    // release's syncd already marks its write for it.
    world.pg.psql(
        "postgres",
        include_str!(
            "../../../docs/next-release/20261204000001_create_count_mirror_keeps_updated_at.sql"
        ),
    );

    let written = syncd::store::write_counts(
        &world.db,
        &[syncd::store::FreshCount {
            chat_id: ids[0],
            count: 42,
            asked_at: chrono::Utc::now(),
        }],
    )
    .await
    .unwrap();
    assert_eq!(written, 1);
    let mirrored: Option<i32> =
        sqlx::query_scalar("select participants_count from chats where id = $1")
            .bind(ids[0])
            .fetch_one(&world.db)
            .await
            .unwrap();
    assert_eq!(mirrored, Some(42), "the count is mirrored");
    assert_eq!(
        updated_at().await,
        "2025-02-01 12:00:00",
        "the mirror left updated_at alone"
    );

    // Any other writer, of the count too, is stamped by the legacy trigger as before.
    sqlx::query("update chats set participants_count = 7 where id = $1")
        .bind(ids[0])
        .execute(&world.db)
        .await
        .unwrap();
    assert_ne!(updated_at().await, "2025-02-01 12:00:00");
}

/// README "Database roles" shows the operator every grant `scripts/runtime-roles.sql` makes.
#[test]
fn the_readme_shows_every_runtime_grant() {
    let readme = include_str!("../../../README.md");
    for grant in include_str!("../../../scripts/runtime-roles.sql")
        .lines()
        .filter(|line| line.starts_with("grant "))
    {
        assert!(readme.contains(grant), "README lacks `{grant}`");
    }
}
