//! `api migrate` on an empty database and on the legacy chat-service database with rows.

use crate::helpers::serve_args;

/// The chat-service's database as it is in production, with a few rows: `chat_service`.
fn legacy_chat_service(pg: &testkit::PgServer) {
    pg.create_database("chat_service");
    pg.psql(
        "chat_service",
        include_str!("fixtures/legacy_chat_service.sql"),
    );
}

#[tokio::test]
async fn migrate_keeps_every_legacy_row_and_only_adds() {
    let pg = testkit::PgServer::start();
    legacy_chat_service(&pg);
    let before = pg.psql(
        "chat_service",
        "select string_agg(format('%s|%s|%s|%s|%s', id, name, participants_count, created_at, updated_at), ';' order by id) from chats",
    );
    let admins_before = pg.psql("chat_service", "select count(*) from administrators");

    let mut args = serve_args(&pg, "redis://127.0.0.1:1");
    args.database.database_url = pg.database_url("chat_service").into();
    api::migrate(&args.database).await.expect("first migrate");
    api::migrate(&args.database)
        .await
        .expect("second migrate is harmless");

    let after = pg.psql(
        "chat_service",
        "select string_agg(format('%s|%s|%s|%s|%s', id, name, participants_count, created_at, updated_at), ';' order by id) from chats",
    );
    assert_eq!(before, after, "rows and their updated_at are untouched");
    assert_eq!(
        pg.psql("chat_service", "select count(*) from administrators"),
        admins_before
    );
    // What older versions left is still there.
    assert_eq!(
        pg.psql("chat_service", "select count(*) from universities"),
        "2"
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select count(*) from pg_indexes where indexname = 'idx_chats_university_id'"
        ),
        "1"
    );
    assert_eq!(
        pg.psql("chat_service", "select version from schema_migrations"),
        "4"
    );
    // Totals were counted from the existing rows: 2 + 1 + 1 without a university.
    assert_eq!(
        pg.psql("chat_service", "select sum(n) from chat_totals"),
        "4"
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select n from chat_totals where scope_key = 1"
        ),
        "2"
    );
    // The legacy trigger still stamps updated_at; the migration added no second one.
    pg.psql(
        "chat_service",
        "update chats set name = 'renamed' where id = 1",
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select updated_at > '2025-02-01 12:00:00+00' from chats where id = 1"
        ),
        "t"
    );
    // The legacy updated_at trigger, chat_totals' three, and the read model's two notifiers.
    assert_eq!(
        pg.psql("chat_service", "select count(*) from pg_trigger where tgrelid = 'chats'::regclass and not tgisinternal"),
        "6"
    );
    // syncd's count mirror (its transaction marked) leaves updated_at as the legacy service
    // left it once the next release's keeper is in: it runs after the legacy trigger on the
    // legacy schema itself.
    pg.psql(
        "chat_service",
        include_str!(
            "../../../docs/next-release/20261204000001_create_count_mirror_keeps_updated_at.sql"
        ),
    );
    let stamped = "select updated_at from chats where id = 2";
    let before_mirror = pg.psql("chat_service", stamped);
    assert!(!before_mirror.is_empty());
    pg.psql(
        "chat_service",
        "begin; select set_config('participants.count_mirror', 'on', true); \
         update chats set participants_count = 99 where id = 2; commit;",
    );
    assert_eq!(pg.psql("chat_service", stamped), before_mirror);
    // New columns and tables exist, and the legacy service's inserts keep working.
    pg.psql(
        "chat_service",
        "insert into chats (name, url, source) values ('from legacy', 'u', 'admin_panel')",
    );
    assert_eq!(
        pg.psql("chat_service", "select sum(n) from chat_totals"),
        "5"
    );
    assert_eq!(
        pg.psql("chat_service", "select count(*) from chat_participants"),
        "0"
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_on_an_empty_database() {
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("migrate");
    api::migrate(&args.database).await.expect("again");
    for table in [
        "chats",
        "administrators",
        "chat_participants",
        "chat_totals",
    ] {
        assert_eq!(
            pg.psql(
                "postgres",
                &format!("select to_regclass('{table}') is not null")
            ),
            "t",
            "{table}"
        );
    }
    pg.psql(
        "postgres",
        "insert into chats (name, url, source) values ('a', 'u', 'admin_panel')",
    );
    assert_eq!(
        pg.psql("postgres", "select updated_at is not null from chats"),
        "t"
    );
    let before = pg.psql("postgres", "select updated_at from chats");
    pg.psql("postgres", "update chats set name = 'b'");
    assert_ne!(
        pg.psql("postgres", "select updated_at from chats"),
        before,
        "the updated_at trigger exists"
    );
}

#[tokio::test]
async fn every_sort_and_search_is_served_by_an_index() {
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("migrate");
    pg.psql(
        "postgres",
        "insert into chats (name, url, max_chat_id, participants_count, university_id, department, source, created_at, updated_at) \
         select 'chat ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, g % 500, g % 40, 'dept ' || (g % 90), \
                (array['admin_panel','bot_registrar','academic_group'])[1 + g % 3], now() - g * interval '1 minute', now() - g * interval '1 second' \
         from generate_series(1, 20000) g; analyze chats;",
    );
    for column in crate::helpers::SORT_COLUMNS {
        for order in ["asc", "desc"] {
            let tie = if column == "id" {
                String::new()
            } else {
                format!(", id {order}")
            };
            let plan = pg.psql(
                "postgres",
                &format!("explain select * from chats order by {column} {order}{tie} limit 50 offset 100"),
            );
            assert!(
                !plan.contains("Seq Scan") && !plan.contains("Sort"),
                "{column} {order}:\n{plan}"
            );
        }
    }
    // The page's offset is walked over the sort index alone (the deferred join of chats::list).
    pg.psql("postgres", "vacuum analyze chats");
    for column in ["name", "participants_count", "created_at"] {
        let plan = pg.psql(
            "postgres",
            &format!("explain select id from chats order by {column}, id limit 50 offset 5000"),
        );
        assert!(plan.contains("Index Only Scan"), "{column}:\n{plan}");
    }
    // At 20,000 rows a sequential scan is still the cheaper plan (at 150,000 the planner picks
    // the index by itself); what matters here is that the index matches the query's expression.
    let plan = pg.psql(
        "postgres",
        "set enable_seqscan = off; explain select * from chats where (coalesce(name, '') || ' ' || coalesce(department, '') || ' ' || coalesce(max_chat_id, '') || ' ' || coalesce(source, '')) ilike '%chat 1234%'",
    );
    assert!(plan.contains("chats_search_trgm_idx"), "{plan}");
    let plan = pg.psql(
        "postgres",
        "explain select * from chats where university_id = 7 order by name, id limit 50",
    );
    assert!(
        !plan.contains("Sort") && !plan.contains("Seq Scan"),
        "{plan}"
    );
}

/// The legacy service keeps writing `chats` (300,000 rows) while `api migrate` runs, and one of
/// its transactions holds a row lock for 4 s meanwhile: no write waits longer than the lock
/// timeout plus a margin for the short DDL locks, the migration gives way and tries again, and
/// it finishes with every list index valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_writes_never_wait_longer_than_the_lock_timeout_while_migrating() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let pg = testkit::PgServer::start();
    legacy_chat_service(&pg);
    pg.psql(
        "chat_service",
        "insert into chats (name, url, max_chat_id, participants_count, university_id, department, source) \
         select 'Группа ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, g % 300, 1 + g % 5, \
                'Кафедра ' || (g % 40), 'admin_panel' \
         from generate_series(1, 300000) g",
    );
    let url = pg.database_url("chat_service");
    let writers = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    // The legacy service: renames chats back to back and records the slowest write.
    let writer = tokio::spawn({
        let (writers, done) = (writers.clone(), done.clone());
        async move {
            let mut slowest = Duration::ZERO;
            let mut writes = 0u64;
            let mut id = 1i64;
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                sqlx::query("update chats set name = name || '' where id = $1")
                    .bind(id % 299_999 + 2)
                    .execute(&writers)
                    .await
                    .expect("a legacy write never fails");
                slowest = slowest.max(started.elapsed());
                writes += 1;
                id += 7919;
            }
            (slowest, writes)
        }
    });
    // A long legacy transaction: the migration's table locks cannot be had for 4 s.
    let long = tokio::spawn({
        let writers = writers.clone();
        async move {
            let mut tx = writers.begin().await.unwrap();
            sqlx::query("update chats set name = name where id = 1")
                .execute(&mut *tx)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
            tx.commit().await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut args = serve_args(&pg, "redis://127.0.0.1:1");
    args.database.database_url = url.clone().into();
    let lock_timeout = Duration::from_millis(500);
    let started = Instant::now();
    api::migrate_with(&args.database, lock_timeout)
        .await
        .expect("the migration finishes, giving way to the legacy transaction");
    let migration = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (slowest, writes) = writer.await.unwrap();
    long.await.unwrap();
    eprintln!(
        "migration took {migration:?}; {writes} legacy writes meanwhile, the slowest {slowest:?} (lock timeout {lock_timeout:?})"
    );

    let invalid = pg.psql(
        "chat_service",
        "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid \
         where c.relname like 'chats\\_%\\_idx' and not i.indisvalid",
    );
    assert_eq!(invalid, "0");
    let built = pg.psql(
        "chat_service",
        "select count(*) from pg_class where relname in ('chats_search_trgm_idx', 'chats_name_id_idx', \
         'chats_university_id_name_id_idx', 'chats_updated_at_id_idx')",
    );
    assert_eq!(built, "4");
    assert!(
        writes > 100,
        "the legacy service kept writing ({writes} writes)"
    );
    // The long transaction's own row is the one write that may wait for it (4 s): the writer
    // never touches id 1, so every wait here is behind the migration.
    assert!(
        slowest < lock_timeout + Duration::from_millis(1500),
        "a legacy write waited {slowest:?} (lock timeout {lock_timeout:?}; migration took {migration:?}, {writes} writes)"
    );
}

/// The migrations of release 7bf2886 (`git show 7bf2886:migrations/…`), from before
/// 20261122000004 was rewritten and before the list indexes and sweep origins were added.
static PREVIOUS_RELEASE: sqlx::migrate::Migrator =
    sqlx::migrate!("tests/it/fixtures/migrations_7bf2886");

fn checksum_of(pg: &testkit::PgServer, version: i64) -> String {
    pg.psql(
        "postgres",
        &format!("select encode(checksum, 'hex') from _sqlx_migrations where version = {version}"),
    )
}

/// A rollback: the previous release's migration set, run the way `api migrate` runs it, on a
/// database the current release migrated, then the current set again (the roll forward), and
/// an upgrade from a database the previous release made. The rewritten 20261122000004 keeps
/// its first text's checksum throughout, which is the one each release expects.
#[tokio::test]
async fn the_previous_release_migrates_a_database_the_current_one_migrated_and_back() {
    let lock_timeout = api::MIGRATE_LOCK_TIMEOUT;
    let (version, first) = shared::db::REWRITTEN_MIGRATIONS[0];

    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("current migrate");
    assert_eq!(
        checksum_of(&pg, version),
        first,
        "the first text's checksum is recorded"
    );
    api::migrate::migrate_set(&args.database, lock_timeout, &PREVIOUS_RELEASE)
        .await
        .expect("the previous release migrates the current schema (rollback)");
    api::migrate(&args.database).await.expect("roll forward");
    let current = shared::db::MIGRATOR.iter().count();
    assert_eq!(
        pg.psql(
            "postgres",
            "select count(*) from _sqlx_migrations where success"
        ),
        current.to_string()
    );

    // An upgrade: the previous release made the database, the current one migrates it.
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate::migrate_set(&args.database, lock_timeout, &PREVIOUS_RELEASE)
        .await
        .expect("previous release on an empty database");
    api::migrate(&args.database).await.expect("upgrade");
    api::migrate::migrate_set(&args.database, lock_timeout, &PREVIOUS_RELEASE)
        .await
        .expect("and back");
    assert_eq!(checksum_of(&pg, version), first);
}

/// A newer release migrated the database (its migration 29991231000001 added a column): the
/// current `api migrate` keeps it and succeeds, and `api serve` answers on that schema, so an
/// old pod restarting during a rollout, or a rollback, starts instead of crash-looping.
#[tokio::test]
async fn a_migration_of_a_newer_release_in_the_database_is_not_an_error() {
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let args = serve_args(&pg, &redis.url());
    api::migrate(&args.database).await.expect("first migrate");
    pg.psql(
        "postgres",
        "alter table chat_participants add column from_a_newer_release text; \
         insert into _sqlx_migrations (version, description, success, checksum, execution_time) \
         values (29991231000001, 'add from a newer release', true, sha384('newer'), 1); \
         insert into chats (name, url, source) values ('still read', 'u', 'admin_panel')",
    );
    api::migrate(&args.database)
        .await
        .expect("a newer release's migration is kept, not an error");
    assert_eq!(
        pg.psql(
            "postgres",
            "select count(*) from _sqlx_migrations where version = 29991231000001"
        ),
        "1"
    );
    let (address, _stop, _server) = crate::helpers::spawn_bare_api(args).await;
    let http = reqwest::Client::new();
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        http.get(format!("http://{address}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let page: serde_json::Value = http
        .get(format!("http://{address}/chats/all"))
        .bearer_auth(crate::helpers::admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["name"], "still read", "{page}");
}

/// A database migrated by a release that recorded 20261122000004's current text (releases up
/// to this one repaired the first text's checksum to it) is accepted, and gets the first
/// text's checksum back, which a release from before the rewrite expects.
#[tokio::test]
async fn a_database_that_recorded_a_later_text_of_a_rewritten_migration_is_accepted() {
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("first migrate");
    let (version, first) = shared::db::REWRITTEN_MIGRATIONS[0];
    let later = shared::db::MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .map(|m| {
            m.checksum
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        })
        .unwrap();
    pg.psql(
        "postgres",
        &format!("update _sqlx_migrations set checksum = decode('{later}', 'hex') where version = {version}"),
    );
    api::migrate(&args.database)
        .await
        .expect("a database with the later text migrates");
    assert_eq!(checksum_of(&pg, version), first);
}

/// `api migrate` connects as MIGRATE_DATABASE_URL's role when it is set: here DATABASE_URL's
/// role may not create anything, and the migration still runs, as the owner.
#[tokio::test]
async fn migrate_runs_as_the_migrating_role_not_the_runtime_one() {
    let pg = testkit::PgServer::start();
    pg.psql("postgres", "create role participants_api login");
    let runtime = format!(
        "postgres://participants_api@127.0.0.1:{}/postgres",
        pg.port()
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &runtime)
        .env("MIGRATE_DATABASE_URL", pg.url())
        .env("LOG_FORMAT", "text")
        .output()
        .expect("api runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "select tableowner from pg_tables where tablename = 'chat_participants'"
        ),
        "postgres"
    );
    // Unset, it falls back to DATABASE_URL's role, which says why it cannot.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &runtime)
        .env("LOG_FORMAT", "text")
        .output()
        .expect("api runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("MIGRATE_DATABASE_URL is unset"), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
}

/// Two pods starting together both run `api migrate` (their init containers): one waits for
/// the other, neither deadlocks the other's concurrent index builds, and every index is valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_started_together_both_finish_and_leave_valid_indexes() {
    let pg = testkit::PgServer::start();
    legacy_chat_service(&pg);
    pg.psql(
        "chat_service",
        "insert into chats (name, url, participants_count, source) \
         select 'Группа ' || g, 'https://max.ru/join/' || g, g % 300, 'admin_panel' from generate_series(1, 100000) g",
    );
    let mut args = serve_args(&pg, "redis://127.0.0.1:1");
    args.database.database_url = pg.database_url("chat_service").into();
    let timeout = std::time::Duration::from_secs(2);
    let (a, b) = tokio::join!(
        api::migrate_with(&args.database, timeout),
        api::migrate_with(&args.database, timeout)
    );
    a.expect("the first migrate finishes");
    b.expect("the second migrate finishes");
    assert_eq!(
        pg.psql(
            "chat_service",
            "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid \
             where c.relname like 'chats\\_%\\_idx' and not i.indisvalid",
        ),
        "0"
    );
    let expected = shared::db::CONCURRENT_INDEXES.len().to_string();
    let names = shared::db::CONCURRENT_INDEXES
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        pg.psql(
            "chat_service",
            &format!("select count(*) from pg_class where relname in ({names})")
        ),
        expected
    );
}

/// The migrations of release bc91bf5 (`git show bc91bf5:migrations/…`), the release before
/// this one and the first whose `api migrate` keeps a migration it does not know.
static RELEASE_BC91BF5: sqlx::migrate::Migrator =
    sqlx::migrate!("tests/it/fixtures/migrations_bc91bf5");

/// README "Rollback": this release adds a migration (20261207000001, the administrators'
/// notifier), which the previous release, bc91bf5, does not know. Its `api migrate` (the same
/// `rollback_safe` migrator as this release's, run on its own set) keeps it and succeeds on
/// this release's database, and the roll forward is a no-op. A strict migrator (every release
/// before bc91bf5) refuses that database, which is why no migration could land while the
/// release before was strict.
#[tokio::test]
async fn the_previous_release_migrates_this_releases_database_and_keeps_its_new_migration() {
    let lock_timeout = api::MIGRATE_LOCK_TIMEOUT;
    let added: Vec<i64> = shared::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| RELEASE_BC91BF5.iter().all(|m| m.version != *v))
        .collect();
    assert_eq!(added, vec![20261207000001], "this release's new migrations");

    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("this release");
    let applied = "select string_agg(version::text, ',' order by version) from _sqlx_migrations";
    let before = pg.psql("postgres", applied);

    // A strict migrator of the previous set stops at the migration it does not know.
    let mut strict = shared::db::rollback_safe(&RELEASE_BC91BF5).await.unwrap();
    strict.set_ignore_missing(false);
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let refused = strict
        .run(&pool)
        .await
        .expect_err("a strict release refuses");
    assert!(
        matches!(
            refused,
            sqlx::migrate::MigrateError::VersionMissing(20261207000001)
        ),
        "{refused}"
    );
    pool.close().await;

    api::migrate::migrate_set(&args.database, lock_timeout, &RELEASE_BC91BF5)
        .await
        .expect("the previous release migrates this release's database (rollback)");
    assert_eq!(pg.psql("postgres", applied), before, "kept, nothing undone");
    // The legacy service's writes of administrators go on with the new triggers in place.
    pg.psql(
        "postgres",
        "insert into chats (id, name, url, source) values (1, 'c', 'u', 'admin_panel'); \
         insert into administrators (chat_id, phone) values (1, '+7900');",
    );
    api::migrate(&args.database).await.expect("roll forward");
    assert_eq!(pg.psql("postgres", applied), before);

    // An upgrade from a database the previous release made.
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate::migrate_set(&args.database, lock_timeout, &RELEASE_BC91BF5)
        .await
        .expect("previous release on an empty database");
    api::migrate(&args.database).await.expect("upgrade");
    assert_eq!(
        pg.psql(
            "postgres",
            "select count(*) from pg_trigger where tgrelid = 'administrators'::regclass \
             and tgname like 'participants_notify_on_administrators%'"
        ),
        "2"
    );
}
