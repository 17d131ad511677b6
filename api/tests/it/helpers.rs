//! A running api over its own Redis and Postgres, and the little tools tests need around it.

use std::net::SocketAddr;
use std::time::Duration;

use api::auth::{sign, Claims};
use api::config::{Cli, Command, ServeArgs};
use clap::Parser;
use fred::prelude::*;
use secrecy::SecretString;
use serde_json::Value as Json;
use sqlx::PgPool;
use testkit::{PgServer, RedisServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const JWT_SECRET: &str = "integration-test-secret-0123456789";

pub struct TestApp {
    pub address: SocketAddr,
    pub http: reqwest::Client,
    pub pg: PgServer,
    pub redis: RedisServer,
    pub db: PgPool,
    pub args: ServeArgs,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Serve arguments for the given servers, with the defaults of the real command line.
pub fn serve_args(pg: &PgServer, redis_url: &str) -> ServeArgs {
    let cli = Cli::try_parse_from([
        "api",
        "serve",
        "--listen-addr",
        "127.0.0.1:0",
        "--jwt-secret",
        JWT_SECRET,
        "--database-url",
        &pg.url(),
        "--redis-url",
        redis_url,
        "--log-format",
        "text",
        "--log-level",
        "warn",
        // Each /health/detailed asks afresh: the fault tests look right after a change.
        "--health-detailed-cache",
        "0s",
    ])
    .expect("test arguments parse");
    match cli.command {
        Command::Serve(args) => *args,
        _ => unreachable!(),
    }
}

impl TestApp {
    /// Starts Redis, Postgres (migrated) and the api with default settings.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Like `spawn`, with settings changed by `configure` before the api starts.
    pub async fn spawn_with(configure: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::spawn_on(None, configure).await
    }

    /// Like `spawn_with`, on a database of its own made by `create database <name> <options>`
    /// (e.g. with another collation), instead of the server's default database.
    pub async fn spawn_on(
        database: Option<(&str, &str)>,
        configure: impl FnOnce(&mut ServeArgs),
    ) -> Self {
        let _ = shared::telemetry::init(
            &shared::config::LogArgs {
                log_format: "text".into(),
                log_level: "warn".into(),
                otel_exporter_otlp_endpoint: None,
            },
            "test",
        );
        let pg = PgServer::start();
        let redis = RedisServer::start();
        let mut args = serve_args(&pg, &redis.url());
        let url = match database {
            Some((name, options)) => {
                pg.psql("postgres", &format!("create database {name} {options}"));
                let url = pg.database_url(name);
                args.database.database_url = url.clone().into();
                url
            }
            None => pg.url(),
        };
        configure(&mut args);
        api::migrate(&args.database)
            .await
            .expect("migrations apply");
        let db = PgPool::connect(&url).await.expect("test pool connects");
        let mut app = Self {
            address: "127.0.0.1:0".parse().unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                // Shorter than the api's API_HEADER_READ_TIMEOUT (10 s), which closes idle
                // connections: a pooled one is never reused just as the api closes it.
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            pg,
            redis,
            db,
            args,
            shutdown: None,
            server: None,
        };
        app.start_api().await;
        app
    }

    async fn start_api(&mut self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.address = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let args = self.args.clone();
        self.server = Some(tokio::spawn(api::run(args, listener, async move {
            let _ = rx.await;
        })));
        self.shutdown = Some(tx);
        self.wait_until_ready().await;
        if !self.args.redis.disable_redis && !self.args.participants_integration_disabled {
            self.wait_for_redis_in_use().await;
        }
    }

    /// Waits until the api has loaded its read model (`/health/ready` answers 200).
    pub async fn wait_until_ready(&self) {
        eventually(Duration::from_secs(60), || async {
            self.get("/health/ready", None).await.status() == 200
        })
        .await;
    }

    /// Waits until the api serves what Postgres holds: every chat's id, name and `updated_at`
    /// (the legacy trigger stamps it on every update), page by page in id order. The read model
    /// follows Postgres within about a second; tests call this after writing behind its back.
    /// Returns at once if Postgres does not answer (a fault test has stopped it). Its reads are
    /// reads like any other: they enqueue lazy refreshes of stale counts.
    pub async fn settle(&self) {
        type Row = (i64, String, Option<chrono::DateTime<chrono::Utc>>);
        let started = std::time::Instant::now();
        loop {
            let Ok(expected) = sqlx::query_as::<
                _,
                (i32, String, Option<chrono::DateTime<chrono::Utc>>),
            >("select id, name, updated_at from chats order by id")
            .fetch_all(&self.db)
            .await
            else {
                return;
            };
            let expected: Vec<Row> = expected
                .into_iter()
                .map(|(id, name, at)| (i64::from(id), name, at))
                .collect();
            let mut served: Vec<Row> = Vec::new();
            let mut complete = true;
            let mut offset = 0;
            loop {
                let response = self
                    .get(
                        &format!("/chats/all?sort_by=id&limit=100&offset={offset}"),
                        Some(&self.admin()),
                    )
                    .await;
                if response.status() != 200 {
                    complete = false;
                    break;
                }
                let page: Json = response.json().await.expect("JSON body");
                let data = page["data"].as_array().expect("data is an array");
                for chat in data {
                    served.push((
                        chat["id"].as_i64().unwrap(),
                        chat["name"].as_str().unwrap().to_owned(),
                        chat["updated_at"]
                            .as_str()
                            .map(|at| at.parse().expect("updated_at is RFC 3339")),
                    ));
                }
                if data.len() < 100 {
                    break;
                }
                offset += 100;
            }
            if complete && served == expected {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the api did not catch up with postgres within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the api and starts it again on the same servers (a restart: a fresh read model).
    pub async fn restart_api(&mut self) {
        self.stop_api().await.expect("the api stops cleanly");
        self.start_api().await;
    }

    /// Stops the api gracefully and returns what `run` returned.
    pub async fn stop_api(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(handle) => handle.await.expect("api task does not panic"),
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn token(&self, role: &str, university_id: Option<i64>) -> String {
        token_with(
            JWT_SECRET,
            role,
            university_id,
            chrono::Utc::now().timestamp() + 3600,
        )
    }

    pub fn admin(&self) -> String {
        self.token("super_admin", None)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request is answered")
    }

    pub async fn post(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request is answered")
    }

    /// GET as super_admin, expecting 200, returning the JSON body.
    pub async fn get_json(&self, path: &str) -> Json {
        let response = self.get(path, Some(&self.admin())).await;
        let status = response.status();
        let body: Json = response.json().await.expect("JSON body");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// A Redis client of the test's own, for seeding and inspecting.
    pub async fn redis_client(&self) -> Client {
        let client = Client::new(
            Config::from_url(&self.redis.url()).unwrap(),
            None,
            None,
            None,
        );
        client.init().await.expect("test redis client connects");
        client
    }

    /// Waits until the api's circuit uses Redis (it opens at start-up until the first PING).
    pub async fn wait_for_redis_in_use(&self) {
        eventually(Duration::from_secs(15), || async {
            self.get("/health/redis", None).await.status() == 200
                && metric(
                    &self.get("/metrics", None).await.text().await.unwrap(),
                    "participants_cache_available",
                ) == 1.0
        })
        .await;
    }

    /// Inserts a chat, waits until the api serves it, and returns its id.
    pub async fn insert_chat(&self, chat: NewChat<'_>) -> i32 {
        let id = self.insert_chat_unsettled(chat).await;
        self.settle().await;
        id
    }

    /// Inserts a chat and returns its id, without waiting for the api to see it.
    pub async fn insert_chat_unsettled(&self, chat: NewChat<'_>) -> i32 {
        sqlx::query_scalar(
            "insert into chats (name, url, max_chat_id, participants_count, university_id, department, source) \
             values ($1, $2, $3, $4, $5, $6, $7) returning id",
        )
        .bind(chat.name)
        .bind(format!("https://max.ru/join/{}", chat.name.replace(' ', "-")))
        .bind(chat.max_chat_id)
        .bind(chat.participants_count)
        .bind(chat.university_id)
        .bind(chat.department)
        .bind(chat.source)
        .fetch_one(&self.db)
        .await
        .expect("chat inserts")
    }

    /// Inserts `n` chats named `chat 0001`.. with MAX ids -7000000000000<i>.
    pub async fn insert_numbered_chats(&self, n: i32, university_id: Option<i32>) -> Vec<i32> {
        let mut ids = Vec::new();
        for i in 0..n {
            let name = format!("chat {i:04}");
            let max_id = format!("-7{:013}", i + 1);
            ids.push(
                self.insert_chat_unsettled(NewChat {
                    name: &name,
                    max_chat_id: Some(&max_id),
                    participants_count: i,
                    university_id,
                    ..NewChat::default()
                })
                .await,
            );
        }
        self.settle().await;
        ids
    }

    /// Records a synced count in Postgres, as syncd would.
    pub async fn record_sync(&self, chat_id: i32, count: i32, at: chrono::DateTime<chrono::Utc>) {
        sqlx::query(
            "insert into chat_participants (chat_id, participants_count, participants_updated_at, sync_status, checked_at) \
             values ($1, $2, $3, 'active', $3) \
             on conflict (chat_id) do update set participants_count = excluded.participants_count, \
             participants_updated_at = excluded.participants_updated_at",
        )
        .bind(chat_id)
        .bind(count)
        .bind(at)
        .execute(&self.db)
        .await
        .unwrap();
        sqlx::query("update chats set participants_count = $2 where id = $1")
            .bind(chat_id)
            .bind(count)
            .execute(&self.db)
            .await
            .unwrap();
        self.settle().await;
    }

    /// Length of a refresh stream.
    pub async fn stream_len(&self, stream: &str) -> u64 {
        self.redis_client().await.xlen(stream).await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics", None).await.text().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Clone, Copy)]
pub struct NewChat<'a> {
    pub name: &'a str,
    pub max_chat_id: Option<&'a str>,
    pub participants_count: i32,
    pub university_id: Option<i32>,
    pub department: Option<&'a str>,
    pub source: &'a str,
}

impl Default for NewChat<'_> {
    fn default() -> Self {
        Self {
            name: "chat",
            max_chat_id: Some("-70000000000001"),
            participants_count: 10,
            university_id: None,
            department: None,
            source: "admin_panel",
        }
    }
}

pub fn token_with(secret: &str, role: &str, university_id: Option<i64>, exp: i64) -> String {
    sign(
        &SecretString::from(secret.to_owned()),
        &Claims {
            sub: "42".into(),
            role: role.into(),
            exp,
            university_id,
            branch_id: None,
            faculty_id: None,
        },
    )
    .unwrap()
}

/// The value of an unlabelled metric in a Prometheus text page (0 when absent).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Polls `check` until it is true, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F)
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
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids of a page's chats, in order.
pub fn ids(page: &Json) -> Vec<i64> {
    page["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .map(|chat| chat["id"].as_i64().unwrap())
        .collect()
}

/// Percent-encodes a query value byte by byte.
pub fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every column of the legacy `sort_by` whitelist.
pub const SORT_COLUMNS: [&str; 9] = [
    "id",
    "name",
    "url",
    "max_chat_id",
    "participants_count",
    "department",
    "source",
    "created_at",
    "updated_at",
];

/// Starts the api in this process on a free port, outside a `TestApp` (for tests whose
/// servers are down or odd at start-up): its address, the shutdown sender, and the task.
pub async fn spawn_bare_api(
    args: ServeArgs,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<anyhow::Result<()>>,
) {
    shared::tls::init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(api::run(args, listener, async move {
        let _ = rx.await;
    }));
    (address, tx, server)
}

/// A super_admin token valid for a minute, signed with the tests' secret.
pub fn admin_token() -> String {
    token_with(
        JWT_SECRET,
        "super_admin",
        None,
        chrono::Utc::now().timestamp() + 60,
    )
}
