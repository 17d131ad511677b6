//! The membership events settings (`MAX_UPDATES_MODE` and the settings of each mode), flattened
//! into `syncd run`'s configuration, and their start-up checks.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use shared::config::{parse_duration, parse_secret};

/// How MAX membership events reach syncd (one mode per deployment, see SPEC §10).
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdatesMode {
    /// No events: counts come from polling only.
    #[default]
    Off,
    /// MAX POSTs each update to `/max/updates` on `SYNCD_WEBHOOK_ADDR`.
    Webhook,
    /// One replica at a time (a lease in Redis) long-polls `GET /updates`.
    Poll,
    /// Another service adds each raw update to the Redis stream `MAX_UPDATES_STREAM`.
    Stream,
}

impl UpdatesMode {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Webhook => "webhook",
            Self::Poll => "poll",
            Self::Stream => "stream",
        }
    }
}

/// The membership events intake (`crate::events`).
#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    /// How MAX membership events reach syncd: off, webhook (POST /max/updates on
    /// SYNCD_WEBHOOK_ADDR), poll (one replica at a time long-polls GET /updates; MAX refuses
    /// it while a webhook subscription exists) or stream (another service's Redis stream
    /// MAX_UPDATES_STREAM)
    #[arg(long, env = "MAX_UPDATES_MODE", value_enum, default_value_t = UpdatesMode::Off)]
    pub max_updates_mode: UpdatesMode,

    /// Address of the webhook receiver in webhook mode, never SYNCD_LISTEN_ADDR (TLS on 443 is
    /// the ingress's)
    #[arg(long, env = "SYNCD_WEBHOOK_ADDR", default_value = "0.0.0.0:9092")]
    pub webhook_addr: SocketAddr,

    /// Secret MAX sends in X-Max-Bot-Api-Secret (5-256 of A-Z a-z 0-9 _ -); required in
    /// webhook mode
    #[arg(long, env = "MAX_WEBHOOK_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub max_webhook_secret: Option<SecretString>,

    /// Redis stream another service adds each raw MAX update to (field `update`); required in
    /// stream mode, read in syncd's own consumer group
    #[arg(long, env = "MAX_UPDATES_STREAM")]
    pub max_updates_stream: Option<String>,

    /// Poll mode: how long one GET /updates waits for updates (whole seconds, 0-90; MAX's
    /// limit is 30 s)
    #[arg(long, env = "MAX_UPDATES_POLL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub max_updates_poll_timeout: Duration,

    /// Poll mode: how long MAX keeps an update for GET /updates; a longer gap since the last
    /// successful poll lost updates, and is reported (participants_events_gaps_total)
    #[arg(long, env = "MAX_UPDATES_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub max_updates_retention: Duration,

    /// Webhook mode: how often GET /subscriptions is checked for ours (a URL ending with
    /// /max/updates with the five membership types); a missing one is logged as an error and
    /// participants_events_subscription_ok is 0
    #[arg(long, env = "MAX_SUBSCRIPTION_CHECK", default_value = "5m", value_parser = parse_duration)]
    pub max_subscription_check: Duration,
}

impl EventsArgs {
    /// Checks the settings of the mode in force; `listen_addr` is SYNCD_LISTEN_ADDR.
    pub fn validate(&self, listen_addr: SocketAddr) -> Result<(), String> {
        match self.max_updates_mode {
            UpdatesMode::Off => Ok(()),
            UpdatesMode::Poll => {
                if self.max_updates_poll_timeout > Duration::from_secs(90) {
                    return Err("MAX_UPDATES_POLL_TIMEOUT must be at most 90s".to_owned());
                }
                if self.max_updates_retention.is_zero() {
                    return Err("MAX_UPDATES_RETENTION must be greater than zero".to_owned());
                }
                Ok(())
            }
            UpdatesMode::Webhook => {
                if self.webhook_addr == listen_addr {
                    return Err("SYNCD_WEBHOOK_ADDR must differ from SYNCD_LISTEN_ADDR: the webhook is never served beside /metrics".to_owned());
                }
                let Some(secret) = &self.max_webhook_secret else {
                    return Err(
                        "MAX_WEBHOOK_SECRET is required when MAX_UPDATES_MODE=webhook".to_owned(),
                    );
                };
                if self.max_subscription_check < Duration::from_secs(1) {
                    return Err("MAX_SUBSCRIPTION_CHECK must be at least 1s".to_owned());
                }
                validate_webhook_secret(secret.expose_secret())
            }
            UpdatesMode::Stream => match self.max_updates_stream.as_deref().map(str::trim) {
                None | Some("") => {
                    Err("MAX_UPDATES_STREAM is required when MAX_UPDATES_MODE=stream".to_owned())
                }
                Some(_) => Ok(()),
            },
        }
    }
}

/// MAX's rule for a subscription secret (`^[a-zA-Z0-9_-]{5,256}$`); the message never repeats
/// the value.
pub(crate) fn validate_webhook_secret(secret: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !(5..=256).contains(&secret.len()) || !secret.chars().all(allowed) {
        return Err(
            "MAX_WEBHOOK_SECRET must be 5-256 characters of A-Z, a-z, 0-9, _ and -".to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::run_args;

    #[test]
    fn events_settings_are_checked_for_the_mode_in_force_and_name_their_setting() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.events.max_updates_mode, UpdatesMode::Off);
        assert_eq!(args.events.webhook_addr.port(), 9092);
        for (flags, setting) in [
            (
                vec![
                    "--max-updates-mode",
                    "poll",
                    "--max-updates-poll-timeout",
                    "91s",
                ],
                "MAX_UPDATES_POLL_TIMEOUT",
            ),
            (vec!["--max-updates-mode", "webhook"], "MAX_WEBHOOK_SECRET"),
            (
                vec![
                    "--max-updates-mode",
                    "webhook",
                    "--max-webhook-secret",
                    "abc",
                ],
                "MAX_WEBHOOK_SECRET",
            ),
            (
                vec![
                    "--max-updates-mode",
                    "webhook",
                    "--max-webhook-secret",
                    "has space",
                ],
                "MAX_WEBHOOK_SECRET",
            ),
            (
                vec![
                    "--max-updates-mode",
                    "webhook",
                    "--max-webhook-secret",
                    "good-secret_1",
                    "--webhook-addr",
                    "0.0.0.0:9091",
                ],
                "SYNCD_WEBHOOK_ADDR",
            ),
            (vec!["--max-updates-mode", "stream"], "MAX_UPDATES_STREAM"),
        ] {
            let err = run_args(&flags).unwrap().validate().unwrap_err();
            assert!(err.contains(setting), "{flags:?}: {err}");
            assert!(!err.contains("has space") && !err.contains("abc"), "{err}");
        }
        let long = "x".repeat(257);
        let args = run_args(&[
            "--max-updates-mode",
            "webhook",
            "--max-webhook-secret",
            &long,
        ]);
        assert!(args.unwrap().validate().is_err());
        let args = run_args(&[
            "--max-updates-mode",
            "webhook",
            "--max-webhook-secret",
            "good-secret_1",
        ])
        .unwrap();
        args.validate().unwrap();
        assert!(!format!("{args:?}").contains("good-secret_1"));
        let args = run_args(&[
            "--max-updates-mode",
            "stream",
            "--max-updates-stream",
            "bot:updates",
        ]);
        args.unwrap().validate().unwrap();
        let args = run_args(&["--max-updates-mode", "poll"]).unwrap();
        args.validate().unwrap();
        assert_eq!(
            args.events.max_updates_poll_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(
            args.events.max_updates_retention,
            Duration::from_secs(86_400)
        );
        assert_eq!(args.events.max_subscription_check, Duration::from_secs(300));
    }
}
