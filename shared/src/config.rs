//! Configuration pieces both binaries flatten into their own clap parsers, and the value
//! parsers they use (durations, secrets, booleans).

use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

/// Exit code for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Parses the command line, or says why not: `--help` and `--version` print and exit 0, a bad
/// flag or value prints clap's message (which names it) and exits `EXIT_CONFIG`.
pub fn parse_or_exit<P: clap::Parser>() -> Result<P, std::process::ExitCode> {
    parse_or_exit_with(P::command())
}

/// `parse_or_exit` with a command built at run time (e.g. a `--help` that shows live values).
pub fn parse_or_exit_with<P: clap::FromArgMatches>(
    command: clap::Command,
) -> Result<P, std::process::ExitCode> {
    let mut command = command;
    command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| P::from_arg_matches(&matches))
        .map_err(|error| {
            let error = error.format(&mut command);
            let _ = error.print();
            if error.use_stderr() {
                std::process::ExitCode::from(EXIT_CONFIG)
            } else {
                std::process::ExitCode::SUCCESS
            }
        })
}

/// Parses a duration the way the seeds wrote them: a bare number is seconds (`3600`), otherwise a
/// number with one unit suffix: `ms`, `s`, `m`, `h` or `d` (`250ms`, `90s`, `15m`, `1h`, `7d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a duration: expected a number of seconds or a number with a unit (ms, s, m, h, d), e.g. 90s or 15m"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large for a duration"))?;
    let millis_per_unit: u64 = match unit {
        "" | "s" => 1_000,
        "ms" => 1,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "`{text}` has an unknown unit `{other}`: use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too large for a duration"))
}

/// Parses a secret so that it is never printed by `Debug` or `--help`.
pub fn parse_secret(text: &str) -> Result<SecretString, String> {
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(SecretString::from(text.to_owned()))
}

/// Parses the boolean spellings operators use in environment files.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("`{other}` is not a boolean: use true or false")),
    }
}

/// Where Postgres is and how many connections this process may hold.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL of the chat-service database, e.g. postgres://user:pass@host:5432/chats
    #[arg(long, env = "DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub database_url: SecretString,

    /// Most connections this process keeps open to Postgres. The defaults of a full deployment
    /// (3 api, up to 6 syncd, the sweep CronJob, 8 each) hold at most 80, within a server's
    /// default max_connections of 100 (README: connection budget)
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// Longest a statement may run before Postgres cancels it (statement_timeout, set on each
    /// connection), so that work nobody waits for any more stops; 0 turns it off. Migrations
    /// run without it
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub database_statement_timeout: Duration,

    /// How long a request waits for a Postgres connection before it is answered 503
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub database_acquire_timeout: Duration,
}

/// Where Redis is and how long a command may take.
#[derive(Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL: redis://, rediss://, redis-cluster://host:port?node=host:port, or
    /// redis-sentinel://host:26379?sentinelServiceName=mymaster&node=host:26380
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379",
          value_parser = parse_secret, hide_env_values = true, hide_default_value = true)]
    pub redis_url: SecretString,

    /// Most time one Redis round trip may take before Redis is treated as down
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Kill switch: never connect to Redis; counts come from Postgres and nothing is enqueued
    #[arg(long, env = "DISABLE_REDIS", default_value = "false", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub disable_redis: bool,
}

/// Freshness settings both binaries must agree on.
#[derive(Args, Clone, Debug)]
pub struct FreshnessArgs {
    /// How long a cached count lives in Redis
    #[arg(long, env = "PARTICIPANTS_CACHE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub participants_cache_ttl: Duration,

    /// Age after which a count is stale and due for a refresh
    #[arg(long, env = "PARTICIPANTS_STALE_THRESHOLD", default_value = "1h", value_parser = parse_duration)]
    pub participants_stale_threshold: Duration,

    /// How long before turning stale a count is already due: a read of it enqueues a lazy
    /// refresh and the stale sweep may take it, so chats people read are refreshed before they
    /// turn stale. 0 refreshes only stale counts (the seed design). At most half the threshold
    #[arg(long, env = "PARTICIPANTS_REFRESH_AHEAD", default_value = "15m", value_parser = parse_duration)]
    pub participants_refresh_ahead: Duration,
}

impl FreshnessArgs {
    /// The age at which a count is due for a refresh: the stale threshold less the refresh-ahead
    /// window (capped at half the threshold).
    pub fn due_age(&self) -> Duration {
        let ahead = self
            .participants_refresh_ahead
            .min(self.participants_stale_threshold / 2);
        self.participants_stale_threshold - ahead
    }

    /// Checks the settings against each other; the error names the setting at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.participants_cache_ttl.is_zero() {
            return Err("PARTICIPANTS_CACHE_TTL must be greater than zero".to_owned());
        }
        if self.participants_stale_threshold.is_zero() {
            return Err("PARTICIPANTS_STALE_THRESHOLD must be greater than zero".to_owned());
        }
        Ok(())
    }
}

/// Log output settings.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format: json (one object a line, for collectors) or text (for a terminal)
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,

    /// Log filter in the tracing EnvFilter syntax, e.g. info or api=debug,sqlx=warn
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// OTLP/HTTP collector base URL (e.g. http://otel-collector:4318): spans are exported to
    /// <url>/v1/traces as JSON. Unset or empty: no export
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_seed_spellings() {
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn durations_reject_nonsense_with_a_reason() {
        assert!(parse_duration("").unwrap_err().contains("not a duration"));
        assert!(parse_duration("h").unwrap_err().contains("not a duration"));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn booleans_accept_common_spellings() {
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert_eq!(parse_bool("1"), Ok(true));
        assert_eq!(parse_bool("off"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn a_count_is_due_ahead_of_the_threshold_by_at_most_half_of_it() {
        let freshness = |threshold: u64, ahead: u64| FreshnessArgs {
            participants_cache_ttl: Duration::from_secs(3600),
            participants_stale_threshold: Duration::from_secs(threshold),
            participants_refresh_ahead: Duration::from_secs(ahead),
        };
        assert_eq!(freshness(3600, 900).due_age(), Duration::from_secs(2700));
        assert_eq!(freshness(3600, 0).due_age(), Duration::from_secs(3600));
        assert_eq!(freshness(60, 900).due_age(), Duration::from_secs(30));
    }
}
