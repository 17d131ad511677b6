//! Throwaway Redis and PostgreSQL servers for tests: each on a free loopback port, in its own
//! temporary directory, owned by the test so that it can stop, kill and restart them.
//!
//! The servers come from the system's packages (`redis-server`, PostgreSQL's `initdb` and
//! `postgres`); `scripts/ensure-deps.sh` installs them where missing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

/// How long a server may take to accept connections after it is started.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (free when asked; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("the OS hands out a free port")
}

fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
}

fn wait_exit(child: &mut Child, deadline: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        sleep(Duration::from_millis(20));
    }
    false
}

/// A certificate authority of a test's own and a server certificate it signed, for 127.0.0.1
/// and localhost, made with the `openssl` command.
pub struct TestCa {
    /// The CA's certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server certificate in `dir`.
    pub fn new(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=testkit CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// With TLS: the TLS port and the CA that signed the server's certificate.
    tls: Option<(u16, TestCa)>,
}

impl RedisServer {
    /// Starts a Redis that keeps nothing on disk.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a Redis with extra `redis-server` arguments, e.g. `["--maxmemory", "10mb"]`.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("testkit-redis-")
                .tempdir()
                .expect("temp dir"),
            child: None,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            tls: None,
        };
        server.spawn().expect("redis-server starts");
        server
    }

    /// Starts a Redis that also listens with TLS (`tls_url`), with a certificate signed by a CA
    /// of its own (`ca_file`). The plain port stays for the test's own tools.
    pub fn start_tls() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .expect("temp dir");
        let ca = TestCa::new(dir.path());
        let tls_port = free_port();
        let extra_args = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            ca.cert.display().to_string(),
            "--tls-key-file".to_owned(),
            ca.key.display().to_string(),
            "--tls-ca-cert-file".to_owned(),
            ca.ca.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            extra_args,
            tls: Some((tls_port, ca)),
        };
        server.spawn().expect("redis-server starts with TLS");
        server
    }

    /// `rediss://` on the TLS port (a server from `start_tls`).
    pub fn tls_url(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}")
    }

    /// The CA certificate a client must trust (a server from `start_tls`).
    pub fn ca_file(&self) -> &Path {
        &self.tls.as_ref().expect("started with start_tls").1.ca
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run redis-server; run scripts/ensure-deps.sh")?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            if self.answers_ping() {
                return Ok(());
            }
            sleep(Duration::from_millis(20));
        }
        bail!(
            "redis-server on port {} did not answer PING; see {}",
            self.port,
            log.display()
        )
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("redis-server restarts");
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL postmaster child process with its own data directory.
pub struct PgServer {
    port: u16,
    dir: TempDir,
    bin: PathBuf,
    child: Option<Child>,
    /// With TLS: the CA that signed the server's certificate.
    tls: Option<TestCa>,
}

impl PgServer {
    /// Starts a fresh cluster with trust authentication and user `postgres`.
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// Starts a fresh cluster with `ssl=on` that refuses TCP connections without TLS, with a
    /// certificate for 127.0.0.1 signed by a CA of its own (`ca_file`).
    pub fn start_tls() -> Self {
        Self::start_inner(true)
    }

    /// The CA certificate a client must trust (a server from `start_tls`).
    pub fn ca_file(&self) -> &Path {
        &self.tls.as_ref().expect("started with start_tls").ca
    }

    fn start_inner(tls: bool) -> Self {
        let bin = pg_bin_dir().expect("PostgreSQL server binaries are installed");
        let dir = tempfile::Builder::new()
            .prefix("testkit-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let template = template_cluster(&bin).expect("a template cluster can be made");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .expect("cp runs");
        assert!(status.success(), "copying the template cluster failed");
        let tls = tls.then(|| {
            let ca = TestCa::new(dir.path());
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("pg_hba.conf");
            ca
        });
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
            if let Some(ca) = &tls {
                for file in [&ca.cert, &ca.key, &data.join("pg_hba.conf")] {
                    std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown tls file");
                }
            }
        }
        if let Some(ca) = &tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&ca.key, std::fs::Permissions::from_mode(0o600))
                .expect("key permissions");
        }
        let mut server = Self {
            port: free_port(),
            dir,
            bin,
            child: None,
            tls,
        };
        server.spawn().expect("postgres starts");
        server
    }

    /// Starts a hot standby of `primary` (a base backup with `-R`: `standby.signal` and the
    /// primary's conninfo), streaming from it, on a port of its own.
    pub fn start_standby(primary: &PgServer) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-pg-standby-")
            .tempdir()
            .expect("temp dir");
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let mut backup = Command::new(primary.bin.join("pg_basebackup"));
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "-c", "fast"]);
        if let Some((uid, gid)) = postgres_user() {
            use std::os::unix::process::CommandExt;
            backup.uid(uid).gid(gid);
        }
        let output = backup.output().expect("pg_basebackup runs");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut server = Self {
            port: free_port(),
            dir,
            bin: primary.bin.clone(),
            child: None,
            tls: None,
        };
        server.spawn().expect("the standby starts");
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of another database on this server (create it first with [`PgServer::create_database`]).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL through `psql` against a database, failing on the first error.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .arg("-c")
            .arg(sql)
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("create database {name}"));
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let log_file = std::fs::File::create(&log).context("postgres log file")?;
        if let Some((uid, gid)) = postgres_user() {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid)).context("chown log")?;
        }
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=128MB"]);
        if let Some(ca) = &self.tls {
            command
                .args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", ca.cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", ca.key.display()));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some((uid, gid)) = postgres_user() {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        self.child = Some(command.spawn().context("cannot run postgres")?);
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|status| status.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("postgres exited with {status}; see {}", log.display());
                }
            }
            sleep(Duration::from_millis(50));
        }
        bail!(
            "postgres on port {} did not become ready; see {}",
            self.port,
            log.display()
        )
    }

    /// Stops the server with a fast shutdown (SIGINT): connections are closed, data is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, "INT");
            if !wait_exit(&mut child, Duration::from_secs(20)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills the postmaster with SIGKILL, as a crash would; its backends exit on their own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Backends notice the postmaster's death within a moment; wait for the port to free.
            let started = Instant::now();
            while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && started.elapsed() < START_DEADLINE
            {
                sleep(Duration::from_millis(50));
            }
        }
    }

    /// Starts the stopped or killed server again, on the same port and data.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            // After a SIGKILL the old shared memory may linger a moment; retry briefly.
            let mut last = None;
            for _ in 0..20 {
                match self.spawn() {
                    Ok(()) => return,
                    Err(error) => {
                        self.child = None;
                        last = Some(error);
                        sleep(Duration::from_millis(250));
                    }
                }
            }
            panic!("postgres did not restart: {last:?}");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, "QUIT");
            if !wait_exit(&mut child, Duration::from_secs(5)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The directory of PostgreSQL's server binaries: the newest under /usr/lib/postgresql, or the
/// directory of `postgres` on PATH.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, bin)) = candidates.pop() {
        return Ok(bin);
    }
    let output = Command::new("sh")
        .args(["-c", "command -v postgres"])
        .output()?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match Path::new(&path).parent() {
        Some(dir) if !path.is_empty() => Ok(dir.to_path_buf()),
        _ => bail!("no PostgreSQL server found; run scripts/ensure-deps.sh"),
    }
}

/// The `postgres` user's uid and gid when running as root (PostgreSQL refuses to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// An initialised cluster to copy, made once per machine and PostgreSQL build (initdb takes a
/// second; a copy takes a tenth of that).
fn template_cluster(bin: &Path) -> anyhow::Result<PathBuf> {
    let tag: String = bin
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let root = std::env::temp_dir().join("testkit-pg-templates");
    let template = root.join(tag);
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    std::fs::create_dir_all(&root)?;
    let staging = tempfile::Builder::new()
        .prefix("staging-")
        .tempdir_in(&root)?;
    let data = staging.path().join("data");
    if let Some((uid, gid)) = postgres_user() {
        std::os::unix::fs::chown(staging.path(), Some(uid), Some(gid))?;
    }
    let mut command = Command::new(bin.join("initdb"));
    command
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-N",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = postgres_user() {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
    let output = command.output().context("cannot run initdb")?;
    if !output.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    // Another test may have won the race; either copy is as good.
    match std::fs::rename(&data, &template) {
        Ok(()) => {}
        Err(_) if template.join("PG_VERSION").exists() => {}
        Err(error) => return Err(error).context("cannot store the template cluster"),
    }
    Ok(template)
}

/// A Redis Cluster of `masters` nodes (no replicas), made with `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { nodes };
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            if cluster
                .nodes
                .iter()
                .all(|n| redis_cli(n.port(), &["cluster", "info"]).contains("cluster_state:ok"))
            {
                return cluster;
            }
            sleep(Duration::from_millis(100));
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// `redis-cluster://first?node=second&node=third`, the form fred parses.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port()));
        }
        url
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }
}

/// Runs `redis-cli -p port args...` and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One master, one replica and three sentinels watching them as `mymaster`.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(u16, TempDir, Child)>,
}

/// The service name the sentinels monitor.
pub const SENTINEL_SERVICE: &str = "mymaster";

impl RedisSentinel {
    pub fn start() -> Self {
        let master = RedisServer::start();
        let replica = RedisServer::start_with(&[]);
        let reply = redis_cli(
            replica.port(),
            &["replicaof", "127.0.0.1", &master.port().to_string()],
        );
        assert!(reply.contains("OK"), "replicaof failed: {reply}");
        let started = Instant::now();
        while !redis_cli(replica.port(), &["info", "replication"]).contains("master_link_status:up")
        {
            assert!(
                started.elapsed() < START_DEADLINE,
                "the replica did not sync"
            );
            sleep(Duration::from_millis(50));
        }
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = tempfile::Builder::new().prefix("testkit-sentinel-").tempdir().expect("temp dir");
                let config = dir.path().join("sentinel.conf");
                std::fs::write(
                    &config,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                         sentinel failover-timeout {SENTINEL_SERVICE} 5000\n\
                         sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
                        dir.path().display(),
                        master.port()
                    ),
                )
                .expect("sentinel config");
                let child = Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel starts");
                (port, dir, child)
            })
            .collect::<Vec<_>>();
        let sentinel = Self {
            master,
            replica,
            sentinels,
        };
        let started = Instant::now();
        loop {
            let ready = sentinel.sentinels.iter().all(|(port, _, _)| {
                let info = redis_cli(*port, &["sentinel", "master", SENTINEL_SERVICE]);
                info.contains("num-other-sentinels\n2") && info.contains("num-slaves\n1")
            });
            if ready {
                return sentinel;
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "the sentinels did not see each other"
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// `redis-sentinel://first?sentinelServiceName=mymaster&node=second&node=third`.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SENTINEL_SERVICE}",
            self.sentinels[0].0
        );
        for (port, _, _) in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{port}"));
        }
        url
    }

    /// The port the sentinels currently name as master.
    pub fn master_port(&self) -> Option<u16> {
        let reply = redis_cli(
            self.sentinels[0].0,
            &["sentinel", "get-master-addr-by-name", SENTINEL_SERVICE],
        );
        reply
            .lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
