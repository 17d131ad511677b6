//! Command line and environment configuration of the `api` binary.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use shared::config::{
    parse_bool, parse_duration, parse_secret, DatabaseArgs, FreshnessArgs, LogArgs, RedisArgs,
};

/// Read-only HTTP API of the participants service: chats from Postgres, participant counts from
/// Redis with a Postgres fallback. It never calls the MAX API; stale counts are enqueued for
/// `syncd`. Every flag can also be set by the environment variable shown beside it.
#[derive(Parser, Debug)]
#[command(name = "api", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API
    Serve(Box<ServeArgs>),
    /// Apply the embedded database migrations and exit (safe to run twice, and on the legacy schema)
    Migrate(MigrateArgs),
    /// Print a signed access token, for local runs and smoke tests
    Token(TokenArgs),
    /// Ask the running api's /health on API_LISTEN_ADDR; exit 0 when it answers 200 (a container
    /// healthcheck that needs no curl)
    Health(HealthArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Address the api listens on (a wildcard address is asked on loopback)
    #[arg(long, env = "API_LISTEN_ADDR", default_value = "0.0.0.0:8082")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub check: shared::health::HealthCheck,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address the HTTP server listens on
    #[arg(long, env = "API_LISTEN_ADDR", default_value = "0.0.0.0:8082")]
    pub listen_addr: SocketAddr,

    /// HS256 secret of the auth-service's access tokens, at least 32 bytes (RFC 7518 §3.2)
    #[arg(long, env = "JWT_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,

    /// The secret before a rotation, still accepted for verification (never for signing) while
    /// tokens signed with it live; unset it once they have expired. At least 32 bytes
    #[arg(long, env = "JWT_PREVIOUS_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_previous_secret: Option<SecretString>,

    /// Issuer a token's `iss` must equal. Unset: `iss` is not checked; set: a token without
    /// it, or with another, is refused
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Audiences a token's `aud` must name one of (comma-separated). Unset: `aud` is not
    /// checked (the auth-service's tokens carry none); set: a token without a matching `aud`
    /// is refused
    #[arg(long, env = "JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub freshness: FreshnessArgs,

    /// How long POST /chats/{id}/refresh-participants waits for syncd before answering 202
    #[arg(long, env = "PARTICIPANTS_REFRESH_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub participants_refresh_wait: Duration,

    /// Manual refreshes one caller (the token's `sub`) may ask for per minute on each api
    /// replica, as a burst or spread out; past it the endpoint answers 429 with Retry-After. 0
    /// turns the limit off
    #[arg(
        long,
        env = "PARTICIPANTS_REFRESH_PER_USER_PER_MINUTE",
        default_value_t = 30
    )]
    pub participants_refresh_per_user_per_minute: u32,

    /// Refresh requests that may wait for their outcome at once on each api replica; the rest
    /// are enqueued and answered 202 without waiting
    #[arg(long, env = "PARTICIPANTS_REFRESH_MAX_WAITERS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub participants_refresh_max_waiters: u32,

    /// Enqueue a refresh when a read finds a count stale or missing
    #[arg(long, env = "PARTICIPANTS_ENABLE_LAZY_UPDATE", default_value = "true", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub participants_enable_lazy_update: bool,

    /// Serve Postgres values only and enqueue nothing (Redis counts are not read)
    #[arg(long, env = "PARTICIPANTS_INTEGRATION_DISABLED", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub participants_integration_disabled: bool,

    /// How long a chat stays marked as enqueued, so a hot stale chat is enqueued once per window
    #[arg(long, env = "PARTICIPANTS_REFRESH_DEDUP_TTL", default_value = "60s", value_parser = parse_duration)]
    pub participants_refresh_dedup_ttl: Duration,

    /// Redis replicas that must hold a manual refresh request before the api acknowledges it
    /// (WAIT). Set 1 with Sentinel or any replicated Redis, so that a failover cannot lose an
    /// acknowledged request; 0 (the default) for a single Redis
    #[arg(long, env = "REDIS_WAIT_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub redis_wait_replicas: u32,

    /// Hold the counts in memory as well, kept exact by Redis' client tracking (CLIENT TRACKING
    /// redirected to a subscribed connection; dropped whenever that channel may have lost a
    /// message): a page whose counts are all held sends no Redis command. On a Redis Cluster,
    /// or off, every page reads its counts from Redis in one round trip
    #[arg(long, env = "REDIS_CLIENT_TRACKING", default_value = "true", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub redis_client_tracking: bool,

    /// How often the api compares its in-memory chats with Postgres row by row, to heal changes
    /// whose notification was lost (notified changes show up within about a second)
    #[arg(long, env = "READ_MODEL_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub read_model_reconcile_interval: Duration,

    /// Statement timeout of the read model's full load (its own, in place of
    /// DATABASE_STATEMENT_TIMEOUT, which also bounds requests): a million chats take far longer
    /// to load than a request may. The load gives up after this long and is tried again
    #[arg(long, env = "READ_MODEL_LOAD_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub read_model_load_timeout: Duration,

    /// /health/ready answers 503 when the read model has not been in step with Postgres for
    /// this long although the primary answers (this replica's sync is stuck; the others may
    /// serve). While Postgres itself is down, ready stays 200 and reads are served from memory.
    /// 0 turns the check off
    #[arg(long, env = "READ_MODEL_MAX_AGE", default_value = "5m", value_parser = parse_duration)]
    pub read_model_max_age: Duration,

    /// Most time one HTTP request may take before it is answered 503
    #[arg(long, env = "API_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Longest a client may take to send a request's headers; then the connection is closed
    #[arg(long, env = "API_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest a connection may sit with no request in flight (kept alive between requests, or
    /// before its first); then it is closed. Keep it longer than the ingress' upstream
    /// keep-alive (nginx: 60s), so the proxy never reuses a connection the api is closing
    #[arg(long, env = "API_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Connections one replica holds at once (each listener); one more is answered 503 and
    /// closed
    #[arg(long, env = "API_MAX_CONNECTIONS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Requests one replica works on at once; one more is answered 503 `overloaded` at once
    /// (the health probes are never refused)
    #[arg(long, env = "API_MAX_CONCURRENT_REQUESTS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// How long a /health/detailed answer is reused; callers meanwhile, and callers while a
    /// check runs, share it, so the endpoint cannot be made to hammer Postgres and Redis. 0s:
    /// only callers during a check share its answer
    #[arg(long, env = "API_HEALTH_DETAILED_CACHE", default_value = "1s", value_parser = parse_duration)]
    pub health_detailed_cache: Duration,

    /// Address of a second listener for /metrics and /health/detailed (e.g. 0.0.0.0:9092);
    /// set, the main listener no longer serves them. Unset: both stay on API_LISTEN_ADDR
    #[arg(long, env = "API_ADMIN_LISTEN_ADDR")]
    pub admin_listen_addr: Option<SocketAddr>,
    /// Most MiB of chat text one search may compare with its words; a search needing more
    /// (many short words that match nearly every chat) is answered 422 search_too_broad
    #[arg(long, env = "API_SEARCH_SCAN_BUDGET_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub search_scan_budget_mb: u32,

    /// Costly searches (ones that may compare more than 20,000 chats: words of 1-2 characters
    /// or of only common trigrams, not searched recently) one caller (the token's `sub`) may run
    /// per minute on each api replica, as a burst or spread out; past it 429 with Retry-After.
    /// 0 turns the rate off
    #[arg(
        long,
        env = "API_COSTLY_SEARCHES_PER_USER_PER_MINUTE",
        default_value_t = 30
    )]
    pub costly_searches_per_user_per_minute: u32,

    /// Costly searches that run at once on each api replica, each on a thread of its own so
    /// that pages go on being served; the others wait their turn (within API_REQUEST_TIMEOUT)
    #[arg(long, env = "API_COSTLY_SEARCH_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub costly_search_concurrency: u32,

    /// Debug builds only, for tests: serve GET /debug/panic, a route that panics
    #[arg(long, env = "API_DEBUG_PANIC_ROUTE", hide = true, default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub debug_panic_route: bool,

    #[command(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    /// Checks what clap cannot: values against each other and URLs that parse. The error
    /// names the setting at fault and never repeats a secret.
    pub fn validate(&self) -> Result<(), String> {
        check_secret_length("JWT_SECRET", &self.jwt_secret)?;
        if let Some(previous) = &self.jwt_previous_secret {
            check_secret_length("JWT_PREVIOUS_SECRET", previous)?;
        }
        if self.jwt_issuer.as_deref().is_some_and(str::is_empty) {
            return Err(
                "JWT_ISSUER must not be empty (unset it to leave iss unchecked)".to_owned(),
            );
        }
        self.freshness.validate()?;
        shared::db::connect_options(&self.database).map_err(|e| e.to_string())?;
        if !self.redis.disable_redis {
            shared::redis::validate_url(&self.redis).map_err(|e| e.to_string())?;
        }
        if self.redis.redis_timeout.is_zero() {
            return Err("REDIS_TIMEOUT must be greater than zero".to_owned());
        }
        if self.participants_refresh_wait > Duration::from_secs(60) {
            return Err("PARTICIPANTS_REFRESH_WAIT must be at most 60s".to_owned());
        }
        if self.participants_refresh_dedup_ttl.is_zero() {
            return Err("PARTICIPANTS_REFRESH_DEDUP_TTL must be greater than zero".to_owned());
        }
        if self.read_model_reconcile_interval < Duration::from_secs(1) {
            return Err("READ_MODEL_RECONCILE_INTERVAL must be at least 1s".to_owned());
        }
        if self.header_read_timeout.is_zero() {
            return Err("API_HEADER_READ_TIMEOUT must be greater than zero".to_owned());
        }
        if self.idle_timeout.is_zero() {
            return Err("API_IDLE_TIMEOUT must be greater than zero".to_owned());
        }
        if self
            .admin_listen_addr
            .is_some_and(|admin| admin == self.listen_addr)
        {
            return Err("API_ADMIN_LISTEN_ADDR must differ from API_LISTEN_ADDR".to_owned());
        }
        if self.read_model_load_timeout < Duration::from_secs(1) {
            return Err("READ_MODEL_LOAD_TIMEOUT must be at least 1s".to_owned());
        }
        if self.debug_panic_route && !cfg!(debug_assertions) {
            return Err("API_DEBUG_PANIC_ROUTE is for debug builds only; unset it".to_owned());
        }
        if self.request_timeout <= self.participants_refresh_wait {
            return Err(
                "API_REQUEST_TIMEOUT must be longer than PARTICIPANTS_REFRESH_WAIT".to_owned(),
            );
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// PostgreSQL URL of the role that migrates: the owner of the schema (the legacy `chats`
    /// table). Only `api migrate` uses it, so the services' DATABASE_URL role needs no DDL
    /// rights (README: database roles). Unset, migrations run as DATABASE_URL's role
    #[arg(long, env = "MIGRATE_DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub migrate_database_url: Option<SecretString>,

    /// Longest a migration waits for a lock on a table in use (the legacy service's `chats`);
    /// writers queued behind it wait at most this long. On a timeout the migration is rolled
    /// back and tried again, up to 20 times with a growing pause
    #[arg(long, env = "MIGRATE_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

impl MigrateArgs {
    /// The database settings `api migrate` connects with: MIGRATE_DATABASE_URL where it is
    /// set, else DATABASE_URL. Says which setting is not a valid URL.
    pub fn migration_database(&self) -> Result<DatabaseArgs, String> {
        let Some(url) = &self.migrate_database_url else {
            shared::db::connect_options(&self.database).map_err(|e| e.to_string())?;
            return Ok(self.database.clone());
        };
        let database = DatabaseArgs {
            database_url: url.clone(),
            ..self.database.clone()
        };
        match shared::db::connect_options(&database) {
            Ok(_) => Ok(database),
            Err(_) => Err("MIGRATE_DATABASE_URL is not a valid PostgreSQL URL".to_owned()),
        }
    }
}

/// An HS256 secret shorter than the hash (RFC 7518 §3.2) can be guessed offline from one token.
fn check_secret_length(name: &str, secret: &SecretString) -> Result<(), String> {
    let length = secret.expose_secret().len();
    if length < crate::auth::MIN_SECRET_BYTES {
        return Err(format!(
            "{name} must be at least {} bytes long (RFC 7518 §3.2), it has {length}; generate one with `openssl rand -hex 32`",
            crate::auth::MIN_SECRET_BYTES
        ));
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// Mint tokens at all. Off by default: anyone with a shell in a pod could otherwise sign
    /// a super_admin token; `make run` and local smoke tests turn it on
    #[arg(long, env = "API_ALLOW_TOKEN_MINTING", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub allow_token_minting: bool,

    /// HS256 secret to sign with (at least 32 bytes)
    #[arg(long, env = "JWT_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,

    /// Issuer claim (`iss`), for an api that sets JWT_ISSUER
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Role claim: super_admin, curator or operator
    #[arg(long, default_value = "super_admin")]
    pub role: String,

    /// university_id claim (curators and operators see only this university's chats)
    #[arg(long)]
    pub university_id: Option<i64>,

    /// Subject (user id) claim
    #[arg(long, default_value = "local-admin")]
    pub sub: String,

    /// How long the token is valid
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
}

impl TokenArgs {
    /// The signed token, or why none is minted (minting off, a short secret).
    pub fn mint(&self) -> anyhow::Result<String> {
        if !self.allow_token_minting {
            anyhow::bail!(
                "api token is off: minting tokens needs --allow-token-minting (API_ALLOW_TOKEN_MINTING=true), which production pods should never set"
            );
        }
        check_secret_length("JWT_SECRET", &self.jwt_secret).map_err(anyhow::Error::msg)?;
        let claims = crate::auth::Claims {
            sub: self.sub.clone(),
            role: self.role.clone(),
            exp: chrono::Utc::now().timestamp() + self.ttl.as_secs() as i64,
            university_id: self.university_id,
            branch_id: None,
            faculty_id: None,
        };
        let mut claims = serde_json::to_value(claims)?;
        if let Some(issuer) = &self.jwt_issuer {
            claims["iss"] = issuer.clone().into();
        }
        crate::auth::sign(&self.jwt_secret, &claims)
            .map_err(|e| anyhow::anyhow!("cannot sign the token: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    fn serve(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["api", "serve"];
        if !extra.contains(&"--jwt-secret") {
            argv.extend_from_slice(&["--jwt-secret", SECRET]);
        }
        if !extra.contains(&"--database-url") {
            argv.extend_from_slice(&["--database-url", "postgres://u:p@127.0.0.1:5432/db"]);
        }
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => *args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_seeds() {
        let args = serve(&[]);
        assert_eq!(args.listen_addr.port(), 8082);
        assert_eq!(
            args.freshness.participants_cache_ttl,
            Duration::from_secs(3600)
        );
        assert_eq!(
            args.freshness.participants_stale_threshold,
            Duration::from_secs(3600)
        );
        assert_eq!(args.participants_refresh_wait, Duration::from_secs(2));
        assert!(args.participants_enable_lazy_update);
        assert!(!args.participants_integration_disabled);
        assert!(!args.redis.disable_redis);
        args.validate().unwrap();
    }

    #[test]
    fn a_bad_value_is_reported_with_its_setting() {
        let err = Cli::try_parse_from([
            "api",
            "serve",
            "--jwt-secret",
            "x",
            "--database-url",
            "postgres://h/db",
            "--participants-cache-ttl",
            "soon",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--participants-cache-ttl"), "{err}");

        let err = serve(&["--redis-url", "mysql://nope"])
            .validate()
            .unwrap_err();
        assert!(err.contains("REDIS_URL"), "{err}");
        let err = serve(&["--database-url", "not a url"])
            .validate()
            .unwrap_err();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let args = serve(&[]);
        let printed = format!("{args:?}");
        assert!(!printed.contains(SECRET));
        assert!(!printed.contains("u:p@"));
    }

    fn migrate(extra: &[&str]) -> MigrateArgs {
        let mut argv = vec![
            "api",
            "migrate",
            "--database-url",
            "postgres://runtime:p@db:5432/chats",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Migrate(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn a_jwt_secret_shorter_than_32_bytes_is_refused_naming_its_setting() {
        let err = serve(&["--jwt-secret", "0123456789abcdef0123456789abcde"])
            .validate()
            .unwrap_err();
        assert!(
            err.contains("JWT_SECRET") && err.contains("32 bytes"),
            "{err}"
        );
        assert!(!err.contains("0123456789abcdef"), "{err}");
        let err = serve(&["--jwt-previous-secret", "short-previous-secret"])
            .validate()
            .unwrap_err();
        assert!(err.contains("JWT_PREVIOUS_SECRET"), "{err}");
        serve(&[
            "--jwt-previous-secret",
            "another-secret-0123456789abcdef-01",
        ])
        .validate()
        .unwrap();
    }

    fn token(extra: &[&str]) -> TokenArgs {
        let mut argv = vec!["api", "token", "--jwt-secret", SECRET];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Token(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn migrate_connects_as_the_migrating_role_where_one_is_set() {
        use secrecy::ExposeSecret;
        let fallback = migrate(&[]).migration_database().unwrap();
        assert_eq!(
            fallback.database_url.expose_secret(),
            "postgres://runtime:p@db:5432/chats"
        );
        let owner = migrate(&["--migrate-database-url", "postgres://owner:q@db:5432/chats"])
            .migration_database()
            .unwrap();
        assert_eq!(
            owner.database_url.expose_secret(),
            "postgres://owner:q@db:5432/chats"
        );
        let err = migrate(&["--migrate-database-url", "postgres://owner:q@db:port/chats"])
            .migration_database()
            .unwrap_err();
        assert!(err.contains("MIGRATE_DATABASE_URL"), "{err}");
        assert!(!err.contains("owner:q"), "{err}");
    }

    #[test]
    fn api_token_mints_nothing_unless_minting_is_allowed() {
        let refused = token(&[]).mint().unwrap_err().to_string();
        assert!(
            refused.contains("--allow-token-minting")
                && refused.contains("API_ALLOW_TOKEN_MINTING"),
            "{refused}"
        );
        let minted = token(&["--allow-token-minting", "--jwt-issuer", "auth-service"])
            .mint()
            .unwrap();
        let verifier = crate::auth::TokenVerifier::new(&SecretString::from(SECRET.to_owned()), &[])
            .with_issuer(Some("auth-service"));
        assert!(verifier.verify(Some(&format!("Bearer {minted}"))).is_ok());
        let short = Cli::try_parse_from([
            "api",
            "token",
            "--allow-token-minting",
            "--jwt-secret",
            "short",
        ])
        .map(|cli| match cli.command {
            Command::Token(args) => args.mint().unwrap_err().to_string(),
            other => panic!("parsed {other:?}"),
        })
        .unwrap();
        assert!(short.contains("32 bytes"), "{short}");
    }
}
