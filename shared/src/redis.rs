//! Building the Redis client from `REDIS_URL`, and running Lua scripts by hash.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scripts::Script;
use secrecy::ExposeSecret;

use crate::config::RedisArgs;

/// Why a Redis client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL does not parse. The URL itself is not repeated: it may carry a password.
    #[error("REDIS_URL is not a valid Redis URL ({0})")]
    InvalidUrl(String),
    #[error("could not build the Redis client: {0}")]
    Build(String),
}

/// Builds a client for `REDIS_URL` (plain, TLS, Cluster or Sentinel form) and starts connecting
/// in the background. It returns at once even when Redis is down, so a process can start and
/// serve from Postgres; the client reconnects forever with capped exponential backoff.
pub fn connect(args: &RedisArgs) -> Result<Client, RedisSetupError> {
    let client = builder(args)?
        .build()
        .map_err(|e| RedisSetupError::Build(e.details().to_owned()))?;
    client.connect();
    Ok(client)
}

/// A subscriber client for the same server, which re-subscribes by itself after a reconnect.
pub fn connect_subscriber(args: &RedisArgs) -> Result<SubscriberClient, RedisSetupError> {
    let client = builder(args)?
        .build_subscriber_client()
        .map_err(|e| RedisSetupError::Build(e.details().to_owned()))?;
    client.connect();
    client.manage_subscriptions();
    Ok(client)
}

/// A client for client-tracking invalidations (see the api's local count cache): like
/// `connect`, with room for bursts of invalidations between two reads of its event channels.
pub fn connect_invalidation_listener(args: &RedisArgs) -> Result<Client, RedisSetupError> {
    let client = builder(args)?
        .with_performance_config(|perf| {
            perf.default_command_timeout = args.redis_timeout;
            perf.broadcast_channel_capacity = 4096;
        })
        .build()
        .map_err(|e| RedisSetupError::Build(e.details().to_owned()))?;
    client.connect();
    Ok(client)
}

/// Checks that `REDIS_URL` parses, without connecting; used to validate configuration at start-up.
pub fn validate_url(args: &RedisArgs) -> Result<(), RedisSetupError> {
    parse_config(args.redis_url.expose_secret()).map(|_| ())
}

/// URL schemes fred understands: a single server, a Cluster, or a master behind Sentinel,
/// each with or without TLS.
const SCHEMES: [&str; 6] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

fn parse_config(url: &str) -> Result<Config, RedisSetupError> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme)
        .unwrap_or_default();
    if !SCHEMES.contains(&scheme) {
        return Err(RedisSetupError::InvalidUrl(format!(
            "the scheme must be one of {}",
            SCHEMES.join(", ")
        )));
    }
    Config::from_url(url).map_err(|e| RedisSetupError::InvalidUrl(e.details().to_owned()))
}

fn builder(args: &RedisArgs) -> Result<Builder, RedisSetupError> {
    let mut config = parse_config(args.redis_url.expose_secret())?;
    // Keep retrying the first connection instead of failing: Redis is optional for serving.
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    let connect_timeout = args.redis_timeout.max(Duration::from_millis(500));
    builder
        .with_connection_config(|conn| {
            conn.connection_timeout = connect_timeout;
            conn.internal_command_timeout = connect_timeout * 4;
            conn.max_command_attempts = 2;
            // A half-open TCP connection would otherwise hang every command until the kernel
            // gives up; this closes it and reconnects.
            conn.unresponsive.max_timeout = Some(connect_timeout * 4);
            conn.unresponsive.interval = Duration::from_millis(500);
        })
        .with_performance_config(|perf| {
            perf.default_command_timeout = args.redis_timeout;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// Runs a script by its SHA1 and loads it on `NOSCRIPT` (after a restart or a failover the
/// server's script cache is empty). Works on any client wrapper, including `with_options`.
pub async fn run_script<C, R>(
    client: &C,
    script: &Script,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<R, fred::error::Error>
where
    C: LuaInterface + Send + Sync,
    R: FromValue,
{
    match client
        .evalsha(script.sha1().clone(), keys.clone(), args.clone())
        .await
    {
        Err(error) if error.details().starts_with("NOSCRIPT") => {
            let lua = script.lua().cloned().unwrap_or_default();
            client.eval(lua, keys, args).await
        }
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_url_form_parses() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://:secret@127.0.0.1:6379/2",
            "rediss://cache.example:6380",
            "redis-cluster://127.0.0.1:7001?node=127.0.0.1:7002&node=127.0.0.1:7003",
            "redis-sentinel://127.0.0.1:26379?sentinelServiceName=mymaster&node=127.0.0.1:26380",
        ] {
            assert!(parse_config(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn other_urls_are_refused_without_echoing_them() {
        for url in ["mysql://user:hunter2@db", "127.0.0.1:6379", ""] {
            let error = parse_config(url).unwrap_err().to_string();
            assert!(error.starts_with("REDIS_URL"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}

/// What an eviction policy means for this service: `Ok` when Redis may evict only what carries
/// a TTL (the count cache and the dedup markers), else why not.
pub fn judge_eviction_policy(policy: &str) -> Result<(), String> {
    match policy {
        p if p.starts_with("volatile-") => Ok(()),
        "noeviction" => Err("maxmemory-policy is noeviction: when Redis fills up, enqueues and count writes fail instead of old counts being evicted; set volatile-lru".to_owned()),
        p if p.starts_with("allkeys-") => Err(format!("maxmemory-policy is {p}: Redis may evict the refresh streams and the rate limiter's state when it fills up (lost refreshes, bursts over MAX's limit); set volatile-lru")),
        p => Err(format!("maxmemory-policy `{p}` is unknown to this service; set volatile-lru")),
    }
}

/// Logs, once at start-up, whether Redis' eviction policy fits this service (see
/// `judge_eviction_policy`). Managed Redis services may refuse `CONFIG`: then nothing is said
/// beyond a debug line.
pub async fn check_eviction_policy(client: &Client) {
    if client.wait_for_connect().await.is_err() {
        return;
    }
    let reply: Result<Vec<String>, _> = client
        .custom(fred::cmd!("CONFIG"), vec!["GET", "maxmemory-policy"])
        .await;
    match reply {
        Ok(pair) => match pair.get(1).map(|p| judge_eviction_policy(p)) {
            Some(Ok(())) => tracing::info!(policy = %pair[1], "redis maxmemory-policy fits"),
            Some(Err(problem)) => tracing::error!(policy = %pair[1], "{problem}"),
            None => tracing::debug!("redis did not say its maxmemory-policy"),
        },
        Err(error) => {
            tracing::debug!(error = %error, "cannot read redis maxmemory-policy (CONFIG refused)")
        }
    }
}

#[cfg(test)]
mod eviction_tests {
    use super::judge_eviction_policy;

    #[test]
    fn only_volatile_policies_fit() {
        assert!(judge_eviction_policy("volatile-lru").is_ok());
        assert!(judge_eviction_policy("volatile-ttl").is_ok());
        for bad in ["allkeys-lru", "allkeys-random", "noeviction", "weird"] {
            let problem = judge_eviction_policy(bad).unwrap_err();
            assert!(problem.contains("volatile-lru"), "{problem}");
        }
    }
}
