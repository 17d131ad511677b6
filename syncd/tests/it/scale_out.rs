//! The same binaries on Redis Cluster and on Redis Sentinel, with only `REDIS_URL` changed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maxsim::SimConfig;
use testkit::{redis_cli, RedisCluster, RedisSentinel};

use crate::end_to_end::{start_api, token};
use crate::helpers::{eventually, Redis, World};

async fn page(
    http: &reqwest::Client,
    api: std::net::SocketAddr,
    query: &str,
) -> (u16, serde_json::Value) {
    let response = http
        .get(format!("http://{api}/chats/all?{query}"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

fn sources(page: &serde_json::Value) -> Vec<String> {
    page["data"]
        .as_array()
        .map(|chats| {
            chats
                .iter()
                .map(|c| {
                    c["participants_source"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn everything_runs_on_a_three_master_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let ports = cluster.ports();
    let world = World::with_redis(
        SimConfig {
            rate_limit: 60,
            latency_ms: 10,
            ..SimConfig::default()
        },
        Redis::Cluster(cluster),
    )
    .await;
    world.insert_chats(300).await;
    let (api, _stop_api) = start_api(&world, &[]).await;
    let flags = [
        "--max-api-rps",
        "60",
        "--participants-update-interval",
        "3s",
        "--participants-stale-threshold",
        "1h",
    ];
    let a = world.replica(&flags).await;
    let b = world.replica(&flags).await;
    let http = reqwest::Client::new();

    // Reads enqueue every stale chat (dedup markers and streams on the cluster); both replicas
    // consume them through the shared limiter.
    for offset in [0, 100, 200] {
        let (status, body) =
            page(&http, api, &format!("limit=100&offset={offset}&sort_by=id")).await;
        assert_eq!(status, 200);
        assert!(sources(&body).iter().all(|s| s == "database"));
    }
    eventually(
        Duration::from_secs(60),
        "every chat refreshed through the cluster",
        || async { world.refreshed().await == 300 },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the api serves every count from the cluster",
        || async {
            let mut all_cached = true;
            for offset in [0, 100, 200] {
                let (status, body) =
                    page(&http, api, &format!("limit=100&offset={offset}&sort_by=id")).await;
                all_cached &= status == 200 && sources(&body).iter().all(|s| s == "cache");
            }
            all_cached
        },
    )
    .await;
    // Refresh-and-wait: the stream entry, syncd's answer over pub/sub, on the cluster.
    let response = http
        .post(format!("http://{api}/chats/7/refresh-participants"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let stats = world.sim.stats();
    assert_eq!(stats.rate_limited, 0);
    assert!(stats.max_in_window <= 60, "{}", stats.max_in_window);
    // The counts really are spread over the masters.
    let busy_nodes = ports
        .iter()
        .filter(|port| {
            redis_cli(**port, &["dbsize"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                > 0
        })
        .count();
    assert!(busy_nodes >= 2, "keys on {busy_nodes} of 3 masters");
    // Cron slots still run once across the two replicas (claims live in Postgres).
    eventually(Duration::from_secs(20), "a stale slot ran", || async {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from sync_sweeps where kind = 'stale' and finished_at is not null",
        )
        .fetch_one(&world.db)
        .await
        .unwrap();
        n >= 1
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_sentinel_failover_under_load_loses_nothing_the_api_acknowledged() {
    let sentinel = RedisSentinel::start();
    let mut world = World::with_redis(
        SimConfig {
            rate_limit: 0,
            latency_ms: 5,
            ..SimConfig::default()
        },
        Redis::Sentinel(sentinel),
    )
    .await;
    let ids = world.insert_chats(100).await;
    let (api, _stop_api) = start_api(&world, &["--redis-wait-replicas", "1"]).await;
    let replica = world
        .replica(&[
            "--max-api-rps",
            "200",
            "--claim-idle",
            "2s",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    let http = reqwest::Client::new();
    page(&http, api, "limit=100").await;
    eventually(Duration::from_secs(30), "warm cache", || async {
        world.refreshed().await == 100
    })
    .await;
    eventually(Duration::from_secs(10), "served from the cache", || async {
        sources(&page(&http, api, "limit=100").await.1)
            .iter()
            .all(|s| s == "cache")
    })
    .await;

    // Load: reads all the time; every answer must be 200.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut from_database) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = page(&http, api, "limit=50").await;
                if status == 200 {
                    ok += 1;
                    if sources(&body).iter().any(|s| s == "database") {
                        from_database += 1;
                    }
                } else {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, from_database)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let Redis::Sentinel(sentinel) = &mut world.redis else {
        unreachable!()
    };
    let promoted = sentinel.replica.port();
    sentinel.master.kill();
    let started = std::time::Instant::now();
    while sentinel.master_port() != Some(promoted) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sentinels did not promote the replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old master comes back empty; the sentinels make it a replica of the new one. They
    // wait until it has reported the wrong role for 4 publish periods (8 s) and ask its role
    // every 10 s, but on a loaded 2-core machine a sentinel whose timer runs late enters TILT
    // mode and does nothing for 30 s at a time (seen in CI: not converted after 90 s). What
    // this test checks is our service, not the sentinels' timing: after 20 s it does what
    // an operator would and points the old master at the new one itself.
    sentinel.master.restart();
    let started = std::time::Instant::now();
    let mut pointed_by_hand = false;
    while !redis_cli(promoted, &["info", "replication"]).contains("connected_slaves:1") {
        if !pointed_by_hand && started.elapsed() > Duration::from_secs(20) {
            let old = sentinel.master.port();
            let reply = redis_cli(old, &["replicaof", "127.0.0.1", &promoted.to_string()]);
            eprintln!("the sentinels had not converted the old master after 20 s: {reply}");
            pointed_by_hand = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the old master did not rejoin as a replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the old master rejoined as a replica after {:?}",
        started.elapsed()
    );
    let world = &world;

    // Manual refreshes the api acknowledges after the failover must all happen. Until the
    // new master has a replica to confirm them, the api refuses (503) rather than acknowledge.
    let mut acknowledged = Vec::new();
    for chat_id in &ids[..5] {
        let started = std::time::Instant::now();
        loop {
            let response = http
                .post(format!("http://{api}/chats/{chat_id}/refresh-participants"))
                .bearer_auth(token())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!(matches!(status, 200 | 202 | 503), "{status}");
            if status != 503 {
                acknowledged.push(*chat_id);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "manual refreshes never acknowledged again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // New stale chats after the failover are consumed: syncd resumed.
    let fresh_ids = world.insert_chats(20).await;
    eventually(
        Duration::from_secs(60),
        "syncd consumes again after the failover",
        || async {
            page(&http, api, "limit=100&offset=100&sort_by=id").await;
            world.refreshed().await == 120
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the api serves from the cache again",
        || async {
            sources(&page(&http, api, "limit=50&sort_by=id").await.1)
                .iter()
                .any(|s| s == "cache")
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, from_database) = load.await.unwrap();
    assert_eq!(failed, 0, "every read answered 200 ({ok} did)");
    assert!(ok > 10);
    eprintln!("failover: {ok} reads, {from_database} partly from Postgres, acknowledged refreshes {acknowledged:?}");
    let calls = world.sim.stats().calls_per_chat;
    assert_eq!(acknowledged.len(), 5);
    for (index, chat_id) in ids[..5].iter().enumerate() {
        let n = calls
            .get(&World::max_id(index as i32 + 1))
            .copied()
            .unwrap_or(0);
        assert!(
            n >= 2,
            "the acknowledged refresh of chat {chat_id} happened ({n} calls)"
        );
    }
    assert_eq!(fresh_ids.len(), 20);
    replica.stop().await.unwrap();
}
