//! `syncd inspect <chat id>` against real Redis and Postgres: each part of a chat's state.

use clap::Parser;
use fred::prelude::*;
use maxsim::SimConfig;
use syncd::config::{Cli, Command as SyncCommand};

use crate::helpers::World;

async fn inspect(world: &World, chat_id: i32) -> String {
    let argv = [
        "syncd",
        "inspect",
        &chat_id.to_string(),
        "--database-url",
        &world.database_url,
        "--redis-url",
        &world.redis_url,
    ];
    match Cli::try_parse_from(argv)
        .expect("inspect flags parse")
        .command
    {
        SyncCommand::Inspect(args) => syncd::inspect::inspect(&args).await.unwrap(),
        _ => unreachable!(),
    }
}

fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{report}"))
}

#[tokio::test]
async fn inspect_shows_a_chats_cached_count_row_queues_dead_letters_and_backoff() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(3).await;
    let (refreshed, queued, failing) = (ids[0], ids[1], ids[2]);

    // A chat refreshed once: a cached count in its bucket and an active row.
    syncd::refresh_once(world.refresh_args(&[refreshed]))
        .await
        .unwrap();
    let report = inspect(&world, refreshed).await;
    let (bucket, field) = shared::keys::count_location(refreshed);
    let cached = line(&report, "cached count:");
    assert!(
        cached.contains(&format!("(HGET {bucket} {field})")),
        "{report}"
    );
    assert!(!cached.contains("none"), "{report}");
    assert!(
        line(&report, "sync status:").ends_with("active"),
        "{report}"
    );
    assert!(
        line(&report, "last MAX answer:").contains("a count"),
        "{report}"
    );
    assert!(line(&report, "lazy marker:").ends_with("none"), "{report}");
    assert!(line(&report, "backing off:").ends_with("no"), "{report}");

    // A chat enqueued by a read, taken by a consumer, and dead-lettered once before.
    world.enqueue_lazy(&[queued]).await;
    let before = inspect(&world, queued).await;
    assert!(line(&before, "cached count:").contains("none"), "{before}");
    assert!(
        line(&before, "sync status:").contains("never refreshed"),
        "{before}"
    );
    assert!(line(&before, "lazy marker:").contains("set"), "{before}");
    let lazy = format!("in {}:", shared::keys::REFRESH_STREAM_LAZY);
    assert!(line(&before, &lazy).contains("waiting"), "{before}");
    let redis = world.redis_client().await;
    syncd::stream::redis::ensure_groups(&redis).await.unwrap();
    let _: Value = redis
        .custom(
            fred::cmd!("XREADGROUP"),
            vec![
                "GROUP",
                shared::keys::REFRESH_GROUP,
                "inspector",
                "COUNT",
                "10",
                "STREAMS",
                shared::keys::REFRESH_STREAM_LAZY,
                ">",
            ],
        )
        .await
        .unwrap();
    let queued_text = queued.to_string();
    let _: String = redis
        .xadd(
            shared::keys::REFRESH_STREAM_DEAD,
            false,
            None,
            "*",
            vec![
                ("chat_id", queued_text.as_str()),
                ("reason", "deliveries exhausted"),
            ],
        )
        .await
        .unwrap();
    let after = inspect(&world, queued).await;
    assert!(
        line(&after, &lazy).contains("in flight at inspector (delivered 1 time(s))"),
        "{after}"
    );
    assert!(
        line(&after, "dead-lettered:").contains("(deliveries exhausted)"),
        "{after}"
    );

    // A chat whose answers keep failing is backing off.
    sqlx::query(
        "insert into chat_participants (chat_id, sync_status, checked_at, last_error, consecutive_failures) \
         values ($1, 'active', now(), 'max_5xx', 3)",
    )
    .bind(failing)
    .execute(&world.db)
    .await
    .unwrap();
    let report = inspect(&world, failing).await;
    assert!(
        line(&report, "last MAX answer:").contains("max_5xx"),
        "{report}"
    );
    assert!(
        line(&report, "last MAX answer:").contains("3 failure(s)"),
        "{report}"
    );
    assert!(
        line(&report, "backing off:").contains("yes, until"),
        "{report}"
    );
    assert!(
        line(&report, "dead-lettered:").ends_with("none"),
        "{report}"
    );

    let missing = inspect(&world, 999_999).await;
    assert!(missing.contains("no such chat"), "{missing}");
}
