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

    /// HS256 secret of the auth-service's access tokens
    #[arg(long, env = "JWT_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,

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

    /// How often the api compares its in-memory chats with Postgres row by row, to heal changes
    /// whose notification was lost (notified changes show up within about a second)
    #[arg(long, env = "READ_MODEL_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub read_model_reconcile_interval: Duration,

    /// Most time one HTTP request may take before it is answered 503
    #[arg(long, env = "API_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

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
        if self.jwt_secret.expose_secret().len() < 16 {
            return Err("JWT_SECRET must be at least 16 bytes long".to_owned());
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

    /// Longest a migration waits for a lock on a table in use (the legacy service's `chats`);
    /// writers queued behind it wait at most this long. On a timeout the migration is rolled
    /// back and tried again, up to 20 times with a growing pause
    #[arg(long, env = "MIGRATE_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// HS256 secret to sign with
    #[arg(long, env = "JWT_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,

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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    fn serve(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["api", "serve", "--jwt-secret", "0123456789abcdef0123"];
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
        assert!(!printed.contains("0123456789abcdef0123"));
        assert!(!printed.contains("u:p@"));
    }
}
