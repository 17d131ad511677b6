//! A world for syncd tests: Postgres (migrated), Redis, the MAX simulator, and replicas.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use fred::prelude::*;
use maxsim::{SimConfig, Simulator};
use sqlx::PgPool;
use syncd::config::{Cli, Command as SyncCommand, RefreshArgs, RunArgs, SweepArgs};
use testkit::{PgServer, RedisCluster, RedisSentinel, RedisServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "sim-token";

/// Which Redis a world runs on.
pub enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

pub struct World {
    pub pg: PgServer,
    /// The URL the services use (with the TLS parameters in `World::over_tls`).
    pub database_url: String,
    pub redis: Redis,
    pub redis_url: String,
    pub db: PgPool,
    pub sim: Simulator,
    pub sim_address: SocketAddr,
}

/// A syncd replica running in this process.
pub struct Replica {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub address: SocketAddr,
}

impl Replica {
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("running")
            .await
            .expect("replica does not panic")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl World {
    pub async fn new(sim: SimConfig) -> Self {
        Self::with_redis(sim, Redis::Single(RedisServer::start())).await
    }

    pub async fn with_redis(sim: SimConfig, redis: Redis) -> Self {
        let pg = PgServer::start();
        let database_url = pg.url();
        let redis_url = match &redis {
            Redis::Single(server) => server.url(),
            Redis::Cluster(cluster) => cluster.url(),
            Redis::Sentinel(sentinel) => sentinel.url(),
        };
        Self::assemble(sim, pg, database_url, redis, redis_url).await
    }

    /// Postgres and Redis that take only TLS from the services, each with a certificate from a
    /// CA of its own: the services get `sslmode=verify-full&sslrootcert=…` and `rediss://`,
    /// and trust Redis's CA through `SSL_CERT_FILE` (this test process's platform roots).
    pub async fn over_tls(sim: SimConfig) -> Self {
        let pg = PgServer::start_tls();
        let redis = RedisServer::start_tls();
        std::env::set_var("SSL_CERT_FILE", redis.ca_file());
        let database_url = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            pg.ca_file().display()
        );
        let redis_url = redis.tls_url();
        Self::assemble(sim, pg, database_url, Redis::Single(redis), redis_url).await
    }

    async fn assemble(
        sim: SimConfig,
        pg: PgServer,
        database_url: String,
        redis: Redis,
        redis_url: String,
    ) -> Self {
        let _ = shared::telemetry::init(
            &shared::config::LogArgs {
                log_format: "text".into(),
                log_level: "warn".into(),
                otel_exporter_otlp_endpoint: None,
            },
            "test",
        );
        let db = PgPool::connect(&database_url)
            .await
            .expect("postgres connects");
        shared::db::MIGRATOR
            .run(&db)
            .await
            .expect("migrations apply");
        let (sim, sim_address) = Simulator::spawn(sim).await;
        Self {
            pg,
            database_url,
            redis,
            redis_url,
            db,
            sim,
            sim_address,
        }
    }

    /// The shared arguments every syncd command takes, as flags.
    pub fn common_flags(&self) -> Vec<String> {
        [
            "--database-url",
            &self.database_url,
            "--redis-url",
            &self.redis_url,
            "--max-api-url",
            &format!("http://{}", self.sim_address),
            "--max-api-token",
            TOKEN,
            "--log-format",
            "text",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    pub fn run_args(&self, extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "syncd".to_owned(),
            "run".to_owned(),
            "--listen-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        argv.extend(self.common_flags());
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        match Cli::try_parse_from(argv).expect("run flags parse").command {
            SyncCommand::Run(args) => *args,
            _ => unreachable!(),
        }
    }

    pub fn sweep_args(&self, extra: &[&str]) -> SweepArgs {
        let mut argv = vec!["syncd".to_owned(), "sweep".to_owned()];
        argv.extend(self.common_flags());
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        match Cli::try_parse_from(argv)
            .expect("sweep flags parse")
            .command
        {
            SyncCommand::Sweep(args) => *args,
            _ => unreachable!(),
        }
    }

    pub fn refresh_args(&self, ids: &[i32]) -> RefreshArgs {
        let mut argv = vec!["syncd".to_owned(), "refresh".to_owned()];
        argv.extend(self.common_flags());
        argv.extend(ids.iter().map(i32::to_string));
        match Cli::try_parse_from(argv)
            .expect("refresh flags parse")
            .command
        {
            SyncCommand::Refresh(args) => *args,
            _ => unreachable!(),
        }
    }

    /// Starts a replica in this process.
    pub async fn replica(&self, extra: &[&str]) -> Replica {
        let args = self.run_args(extra);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(syncd::run(args, listener, async move {
            let _ = rx.await;
        }));
        Replica {
            stop: Some(tx),
            task: Some(task),
            address,
        }
    }

    /// Starts a replica as a separate process of the real binary, so it can be killed.
    pub fn replica_process(&self, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_syncd"))
            .arg("run")
            .args(["--listen-addr", "127.0.0.1:0"])
            .args(self.common_flags())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("syncd binary starts")
    }

    /// Inserts `n` chats with MAX ids -7000000000000<i> and returns their ids.
    pub async fn insert_chats(&self, n: i32) -> Vec<i32> {
        sqlx::query_scalar(
            "insert into chats (name, url, max_chat_id, participants_count, source) \
             select 'chat ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, 1, 'admin_panel' \
             from generate_series(1, $1) g returning id",
        )
        .bind(n)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    pub fn max_id(chat_id_index: i32) -> i64 {
        -70000000000000 - i64::from(chat_id_index)
    }

    /// MAX calls the simulator accepted for the `chat_id_index`-th inserted chat.
    pub fn max_calls(&self, chat_id_index: i32) -> u64 {
        self.sim
            .stats()
            .calls_per_chat
            .get(&Self::max_id(chat_id_index))
            .copied()
            .unwrap_or(0)
    }

    pub async fn redis_client(&self) -> Client {
        let client = Client::new(Config::from_url(&self.redis_url).unwrap(), None, None, None);
        client.init().await.unwrap();
        client
    }

    /// Enqueues lazy refreshes the way the api does.
    pub async fn enqueue_lazy(&self, ids: &[i32]) {
        self.enqueue(shared::refresh::Priority::Lazy, ids).await;
    }

    /// Enqueues manual refreshes the way the api's refresh-and-wait does.
    pub async fn enqueue_manual(&self, ids: &[i32]) {
        self.enqueue(shared::refresh::Priority::Manual, ids).await;
    }

    async fn enqueue(&self, priority: shared::refresh::Priority, ids: &[i32]) {
        let client = self.redis_client().await;
        shared::refresh::enqueue(&client, priority, ids, Duration::from_secs(60), None)
            .await
            .unwrap();
    }

    /// Asks for a full sweep as the admin endpoint does.
    pub async fn request_full_sweep(&self) -> shared::sweeps::SweepRecord {
        match shared::sweeps::request(
            &self.db,
            shared::sweeps::SweepKind::Full,
            shared::sweeps::StartedBy::Admin,
            None,
        )
        .await
        .unwrap()
        {
            shared::sweeps::Requested::Recorded(sweep) => sweep,
            shared::sweeps::Requested::AlreadyRunning(sweep) => {
                panic!("a full sweep already runs: {sweep:?}")
            }
        }
    }

    /// Chats whose count has been refreshed at least once.
    pub async fn refreshed(&self) -> i64 {
        sqlx::query_scalar(
            "select count(*) from chat_participants where participants_updated_at is not null",
        )
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// Entries in the dead-letter stream.
    pub async fn dead_letters(&self) -> i64 {
        self.redis_client()
            .await
            .xlen(shared::keys::REFRESH_STREAM_DEAD)
            .await
            .unwrap()
    }

    pub async fn pending(&self, stream: &str) -> i64 {
        let client = self.redis_client().await;
        let reply: Value = client
            .xpending(stream, shared::keys::REFRESH_GROUP, ())
            .await
            .unwrap();
        match reply {
            Value::Array(parts) => parts
                .first()
                .and_then(|v| v.clone().convert::<i64>().ok())
                .unwrap_or(0),
            _ => 0,
        }
    }
}

/// Polls `check` until true, failing after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
