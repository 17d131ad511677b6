//! `maxsim`: the MAX Bot API simulator as a standalone server, for `make run` and drills.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use maxsim::{SimConfig, Simulator};
use shared::config::parse_duration;

/// A MAX Bot API simulator: GET /chats/{chatId} with a rate limit, latency, errors, answers
/// that are not a chat, chats gone for good or not joined yet, and churn; membership events by
/// webhook (/subscriptions) or long polling (GET /updates). Change it at run time with POST
/// /_sim/config (and the other /_sim/ controls); read what it saw at GET /_sim/stats.
#[derive(Parser, Debug)]
#[command(name = "maxsim", version, about)]
struct Cli {
    /// Address to listen on
    #[arg(long, env = "MAXSIM_LISTEN_ADDR", default_value = "127.0.0.1:9099")]
    listen_addr: SocketAddr,
    /// The bot token clients must send as the raw Authorization header
    #[arg(
        long,
        env = "MAX_API_TOKEN",
        hide_env_values = true,
        default_value = "sim-token"
    )]
    token: String,
    /// Accepted requests per sliding second before answering 429; 0 disables the limit
    #[arg(long, env = "MAXSIM_RATE_LIMIT", default_value_t = 30)]
    rate_limit: u32,
    /// Latency added to every answer
    #[arg(long, env = "MAXSIM_LATENCY", default_value = "30ms", value_parser = parse_duration)]
    latency: std::time::Duration,
    /// Share of requests answered with a 5xx
    #[arg(long, env = "MAXSIM_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Per mille of chats gone for good (404, 403, or status removed or left)
    #[arg(long, env = "MAXSIM_REMOVED_PERMILLE", default_value_t = 20)]
    removed_permille: u32,
    /// Per mille of chats the bot is not in yet (403 until they join)
    #[arg(long, env = "MAXSIM_NOT_JOINED_PERMILLE", default_value_t = 0)]
    not_joined_permille: u32,
    /// When the chats not joined yet join, after start; unset: only POST /_sim/join/{chatId}
    #[arg(long, env = "MAXSIM_JOIN_AFTER", value_parser = parse_duration)]
    join_after: Option<std::time::Duration>,
    /// Spread those joins over this long
    #[arg(long, env = "MAXSIM_JOIN_SPREAD", default_value = "0s", value_parser = parse_duration)]
    join_spread: std::time::Duration,
    /// Share of requests answered 200 with an HTML page (a captive portal)
    #[arg(long, env = "MAXSIM_NOT_A_CHAT_RATE", default_value_t = 0.0)]
    not_a_chat_rate: f64,
    /// Share of requests answered 200 with a chat that has no participants_count
    #[arg(long, env = "MAXSIM_NO_COUNT_RATE", default_value_t = 0.0)]
    no_count_rate: f64,
    /// Counts drift by up to ±10 every this long (0 keeps them still)
    #[arg(long, env = "MAXSIM_CHURN_PERIOD", default_value = "5m", value_parser = parse_duration)]
    churn_period: std::time::Duration,
    /// Per mille of chats where the bot is an administrator (their membership events are sent)
    #[arg(long, env = "MAXSIM_ADMIN_PERMILLE", default_value_t = 0)]
    admin_permille: u32,
    /// Background membership changes per simulated second over the chats the simulator knows
    #[arg(long, env = "MAXSIM_MEMBER_CHANGES_PER_SEC", default_value_t = 0.0)]
    member_changes_per_sec: f64,
    /// Simulated seconds per real second for event delivery (webhook retries, retention)
    #[arg(long, env = "MAXSIM_TIME_SCALE", default_value_t = 1.0)]
    time_scale: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = shared::telemetry::init(
        &shared::config::LogArgs {
            log_format: "text".into(),
            log_level: "info".into(),
            otel_exporter_otlp_endpoint: None,
        },
        "maxsim",
    );
    let simulator = Simulator::new(SimConfig {
        token: cli.token,
        rate_limit: cli.rate_limit,
        latency_ms: cli.latency.as_millis() as u64,
        error_rate: cli.error_rate,
        removed_permille: cli.removed_permille,
        not_joined_permille: cli.not_joined_permille,
        join_after_secs: cli.join_after.map(|after| after.as_secs()),
        join_spread_secs: cli.join_spread.as_secs(),
        not_a_chat_rate: cli.not_a_chat_rate,
        no_count_rate: cli.no_count_rate,
        churn_period_secs: cli.churn_period.as_secs(),
        admin_permille: cli.admin_permille,
        member_changes_per_sec: cli.member_changes_per_sec,
        time_scale: cli.time_scale,
        ..SimConfig::default()
    });
    let listener = tokio::net::TcpListener::bind(cli.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen_addr))?;
    tracing::info!(address = %cli.listen_addr, "maxsim listening");
    simulator
        .serve(listener, shared::shutdown::signal())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }
}
