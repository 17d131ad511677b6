//! A whole deployment on loopback for the sync, drill and freshness benchmarks: its own Postgres
//! and Redis, the MAX simulator in this process, and the real `api` and `syncd` binaries (the
//! release builds beside `bench`) as child processes that can be killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fred::prelude::*;
use maxsim::{SimConfig, Simulator};
use sqlx::PgPool;

pub const JWT_SECRET: &str = "bench-secret-0123456789abcdef-0123";
const SIM_TOKEN: &str = "sim-token";

/// The binary `name` beside this one (`cargo build --release -p api -p syncd`).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with cargo build --release -p {name}",
            path.display()
        );
    }
    Ok(path)
}

/// A super_admin token for the api.
pub fn admin_token() -> anyhow::Result<String> {
    Ok(api::auth::sign(
        &secrecy::SecretString::from(JWT_SECRET.to_owned()),
        &api::auth::Claims {
            sub: "bench".into(),
            role: "super_admin".into(),
            exp: chrono::Utc::now().timestamp() + 24 * 3600,
            university_id: None,
            branch_id: None,
            faculty_id: None,
        },
    )?)
}

/// A child process that is killed when dropped.
pub struct Process {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Process {
    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then waits for the exit: how long it took (`None`: still running after
    /// `deadline`, then killed) and whether it exited 0.
    pub fn terminate(&mut self, deadline: Duration) -> (Option<Duration>, bool) {
        let Some(mut child) = self.child.take() else {
            return (None, false);
        };
        let started = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        while started.elapsed() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(started.elapsed()), status.success());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, false)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Stack {
    pub pg: testkit::PgServer,
    pub redis: testkit::RedisServer,
    pub db: PgPool,
    pub sim: Simulator,
    pub sim_address: SocketAddr,
    pub token: String,
    pub http: reqwest::Client,
    pub dir: PathBuf,
    spawned: u32,
}

impl Stack {
    /// Starts the servers, migrates, and inserts `chats` chats named `chat <n>` whose MAX ids
    /// the simulator knows. `redis_args` go to `redis-server` (e.g. to turn on the AOF).
    pub async fn start(chats: i32, sim: SimConfig, redis_args: &[&str]) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("bench-{}-{}", std::process::id(), rand_seed()));
        std::fs::create_dir_all(&dir)?;
        let pg = testkit::PgServer::start();
        let redis = testkit::RedisServer::start_with(redis_args);
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&pg.url())
            .await?;
        shared::db::MIGRATOR.run(&db).await?;
        sqlx::query(
            "insert into chats (name, url, max_chat_id, participants_count, source) \
             select 'chat ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, 1, 'admin_panel' \
             from generate_series(1, $1) g",
        )
        .bind(chats)
        .execute(&db)
        .await?;
        sqlx::query("vacuum analyze chats").execute(&db).await?;
        let (sim, sim_address) = Simulator::spawn(SimConfig {
            token: SIM_TOKEN.to_owned(),
            ..sim
        })
        .await;
        Ok(Self {
            pg,
            redis,
            db,
            sim,
            sim_address,
            token: admin_token()?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            dir,
            spawned: 0,
        })
    }

    fn common_env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.pg.url()),
            ("REDIS_URL", self.redis.url()),
            ("MAX_API_URL", format!("http://{}", self.sim_address)),
            ("MAX_API_TOKEN", SIM_TOKEN.to_owned()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("LOG_LEVEL", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn spawn(
        &mut self,
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        self.spawned += 1;
        let port = testkit::free_port();
        let log = self.dir.join(format!("{binary}-{}.log", self.spawned));
        let mut command = Command::new(sibling(binary)?);
        command
            .args(args)
            .args(["--listen-addr", &format!("127.0.0.1:{port}")])
            .envs(self.common_env())
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = command
            .spawn()
            .with_context(|| format!("{binary} starts"))?;
        Ok(Process {
            child: Some(child),
            port,
            log,
        })
    }

    /// Starts `syncd run` and waits until it serves `/metrics`.
    pub async fn syncd(&mut self, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        let process = self.spawn("syncd", &["run"], env)?;
        self.wait_for(&format!("{}/metrics", process.base()), &process)
            .await?;
        Ok(process)
    }

    /// Starts `api serve` and waits until it answers a page with 200.
    pub async fn api(&mut self, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        // The load generators refresh with one token far past a curator's rate.
        let mut env = env.to_vec();
        if !env
            .iter()
            .any(|(k, _)| *k == "PARTICIPANTS_REFRESH_PER_USER_PER_MINUTE")
        {
            env.push(("PARTICIPANTS_REFRESH_PER_USER_PER_MINUTE", "0"));
        }
        let process = self.spawn("api", &["serve"], &env)?;
        self.wait_for(&format!("{}/chats/all?limit=1", process.base()), &process)
            .await?;
        Ok(process)
    }

    /// Starts `api serve` without waiting for it (a restart as a plain load balancer sees it).
    pub fn api_unwaited(&mut self, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        let mut env = env.to_vec();
        env.push(("PARTICIPANTS_REFRESH_PER_USER_PER_MINUTE", "0"));
        self.spawn("api", &["serve"], &env)
    }

    async fn wait_for(&self, url: &str, process: &Process) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(response) = self.http.get(url).bearer_auth(&self.token).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "{url} did not answer 200 in 30 s; see {}",
            process.log.display()
        )
    }

    pub async fn redis_client(&self) -> anyhow::Result<Client> {
        let client = Client::new(Config::from_url(&self.redis.url())?, None, None, None);
        client.init().await?;
        Ok(client)
    }

    /// Asks the fleet for a full sweep, as `POST /admin/participants/full-update` does.
    pub async fn request_full_sweep(&self) -> anyhow::Result<()> {
        match shared::sweeps::request(
            &self.db,
            shared::sweeps::SweepKind::Full,
            shared::sweeps::StartedBy::Admin,
            Some("bench"),
        )
        .await?
        {
            shared::sweeps::Requested::Recorded(_) => Ok(()),
            shared::sweeps::Requested::AlreadyRunning(sweep) => {
                anyhow::bail!("a full sweep already runs (slot {})", sweep.slot)
            }
        }
    }

    /// When the latest full sweep started and finished, and how many chats it did.
    pub async fn full_sweep(
        &self,
    ) -> anyhow::Result<
        Option<(
            chrono::DateTime<chrono::Utc>,
            Option<chrono::DateTime<chrono::Utc>>,
            i32,
        )>,
    > {
        Ok(sqlx::query_as(
            "select started_at, finished_at, done from sync_sweeps where kind = 'full' \
             order by started_at desc limit 1",
        )
        .fetch_optional(&self.db)
        .await?)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos().into())
        .unwrap_or(0)
}

/// The nearest-rank percentile of sorted `values`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}
