//! Command line and environment configuration of the `syncd` binary.

use std::net::SocketAddr;
use std::time::Duration;

use chrono_tz::Tz;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use secrecy::SecretString;
use shared::config::{
    parse_bool, parse_duration, parse_secret, DatabaseArgs, FreshnessArgs, LogArgs, RedisArgs,
};

use crate::events::settings::EventsArgs;
use crate::sweep::schedule::{interval_to_cron, Schedule, Schedules};

/// Keeps participant counts fresh: consumes the refresh stream and sweeps the chats against
/// the MAX Bot API, within one rate limit shared by every replica. Every flag can also be set
/// by the environment variable shown beside it.
#[derive(Parser, Debug)]
#[command(name = "syncd", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: stream consumer, cron sweeps, /metrics and /health
    Run(Box<RunArgs>),
    /// Run one sweep now and exit (for a Kubernetes CronJob)
    Sweep(Box<SweepArgs>),
    /// Refresh the named chats (chats.id) now and print the results
    Refresh(Box<RefreshArgs>),
    /// Print the fleet's state: streams, dead letters, replicas, last sweeps, freshness
    Status(Box<StatusArgs>),
    /// Print one chat's whole state: cached count and its time, the Postgres row and sync
    /// status, the last MAX answer or error, whether it is queued, in flight, dead-lettered or
    /// backing off
    Inspect(Box<InspectArgs>),
    /// Register syncd's webhook with MAX (POST /subscriptions for the five membership types,
    /// with MAX_WEBHOOK_SECRET), or with --check print what is subscribed (URL, time, types)
    /// and exit 0 if ours is there, 1 if not. A subscription to another URL is replaced only
    /// with --replace. While any subscription exists MAX refuses long polling (poll mode)
    Subscribe(Box<SubscribeArgs>),
    /// Ask the running daemon's /health on SYNCD_LISTEN_ADDR; exit 0 when it answers 200 (a
    /// container healthcheck that needs no curl; `--path /health/live` for liveness)
    Health(HealthArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Address the daemon listens on (a wildcard address is asked on loopback)
    #[arg(long, env = "SYNCD_LISTEN_ADDR", default_value = "0.0.0.0:9091")]
    pub listen_addr: std::net::SocketAddr,

    #[command(flatten)]
    pub check: shared::health::HealthCheck,
}

/// What every subcommand needs to refresh counts.
#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub freshness: FreshnessArgs,

    /// Base URL of the MAX Bot API (it moved twice in a year)
    #[arg(
        long,
        env = "MAX_API_URL",
        default_value = "https://platform-api2.max.ru"
    )]
    pub max_api_url: String,

    /// Bot token, sent as the raw Authorization header
    #[arg(long, env = "MAX_API_TOKEN", value_parser = parse_secret, hide_env_values = true)]
    pub max_api_token: SecretString,

    /// Most MAX calls in any one second, across every replica together
    #[arg(long, env = "MAX_API_RPS", default_value_t = 30.0)]
    pub max_api_rps: f64,

    /// Most time one MAX call may take
    #[arg(long, env = "PARTICIPANTS_MAX_API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub participants_max_api_timeout: Duration,

    /// Retries of a MAX call after a 429, a 5xx or a timeout
    #[arg(long, env = "PARTICIPANTS_MAX_RETRIES", default_value_t = 3)]
    pub participants_max_retries: u32,

    /// Chats whose MAX calls run concurrently, and the size of each batched Postgres write
    #[arg(long, env = "PARTICIPANTS_BATCH_SIZE", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub participants_batch_size: u32,

    /// How long a chat that MAX reports removed, left, closed, forbidden or not found is skipped
    #[arg(long, env = "PARTICIPANTS_INACTIVE_RECHECK", default_value = "7d", value_parser = parse_duration)]
    pub participants_inactive_recheck: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

impl SyncArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.freshness.validate()?;
        shared::db::connect_options(&self.database).map_err(|e| e.to_string())?;
        if self.redis.disable_redis {
            return Err("DISABLE_REDIS cannot be set for syncd: the rate limit and the stream live in Redis".to_owned());
        }
        shared::redis::validate_url(&self.redis).map_err(|e| e.to_string())?;
        let url = reqwest::Url::parse(&self.max_api_url)
            .map_err(|e| format!("MAX_API_URL is not a valid URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("MAX_API_URL must be an http or https URL".to_owned());
        }
        if !(self.max_api_rps.is_finite() && self.max_api_rps > 0.0 && self.max_api_rps <= 10_000.0)
        {
            return Err("MAX_API_RPS must be a number above 0 and at most 10000".to_owned());
        }
        if self.participants_max_api_timeout.is_zero() {
            return Err("PARTICIPANTS_MAX_API_TIMEOUT must be greater than zero".to_owned());
        }
        if self.participants_max_retries > 20 {
            return Err("PARTICIPANTS_MAX_RETRIES must be at most 20".to_owned());
        }
        Ok(())
    }
}

/// When the sweeps run. Each schedule is a cron expression in `PARTICIPANTS_SCHEDULE_TZ`; the
/// seed's `PARTICIPANTS_UPDATE_INTERVAL` and `PARTICIPANTS_FULL_UPDATE_HOUR` are still accepted
/// and translated (setting a seed name and its cron expression together is refused).
#[derive(Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// Stale sweep schedule: a cron expression (5 fields, or 6 with seconds first) in
    /// PARTICIPANTS_SCHEDULE_TZ, or `off` [default: */15 * * * *]
    #[arg(long, env = "PARTICIPANTS_STALE_SWEEP_CRON")]
    pub participants_stale_sweep_cron: Option<String>,

    /// Full sweep schedule: a cron expression in PARTICIPANTS_SCHEDULE_TZ, or `off` (when a
    /// Kubernetes CronJob runs `syncd sweep --full` instead) [default: 0 3 * * *]
    #[arg(long, env = "PARTICIPANTS_FULL_SWEEP_CRON")]
    pub participants_full_sweep_cron: Option<String>,

    /// IANA timezone of both schedules, e.g. Europe/Moscow or UTC
    #[arg(long, env = "PARTICIPANTS_SCHEDULE_TZ", default_value = "Europe/Moscow", value_parser = parse_tz)]
    pub participants_schedule_tz: Tz,

    /// Seed name: stale sweep period (15m means `*/15 * * * *`); it must divide a minute, an
    /// hour or a day
    #[arg(long, env = "PARTICIPANTS_UPDATE_INTERVAL", value_parser = parse_duration)]
    pub participants_update_interval: Option<Duration>,

    /// Seed name: hour 0-23 of the daily full sweep in PARTICIPANTS_SCHEDULE_TZ (3 means
    /// `0 3 * * *`)
    #[arg(long, env = "PARTICIPANTS_FULL_UPDATE_HOUR",
          value_parser = clap::value_parser!(u32).range(0..=23))]
    pub participants_full_update_hour: Option<u32>,
}

pub const DEFAULT_STALE_SWEEP_CRON: &str = "*/15 * * * *";
pub const DEFAULT_FULL_SWEEP_CRON: &str = "0 3 * * *";

fn parse_tz(text: &str) -> Result<Tz, String> {
    text.trim().parse::<Tz>().map_err(|_| {
        format!("`{text}` is not an IANA timezone name (e.g. Europe/Moscow, Europe/Berlin, UTC)")
    })
}

impl ScheduleArgs {
    /// The schedules in force, or a message naming the setting that is wrong.
    pub fn schedules(&self) -> Result<Schedules, String> {
        let tz = self.participants_schedule_tz;
        let stale = match (
            self.participants_stale_sweep_cron.as_deref(),
            self.participants_update_interval,
        ) {
            (Some(_), Some(_)) => return Err("set PARTICIPANTS_STALE_SWEEP_CRON or its seed name PARTICIPANTS_UPDATE_INTERVAL, not both".to_owned()),
            (Some(cron), None) => cron.to_owned(),
            (None, Some(interval)) => interval_to_cron(interval)?,
            (None, None) => DEFAULT_STALE_SWEEP_CRON.to_owned(),
        };
        let full = match (
            self.participants_full_sweep_cron.as_deref(),
            self.participants_full_update_hour,
        ) {
            (Some(_), Some(_)) => return Err("set PARTICIPANTS_FULL_SWEEP_CRON or its seed name PARTICIPANTS_FULL_UPDATE_HOUR, not both".to_owned()),
            (Some(cron), None) => cron.to_owned(),
            (None, Some(hour)) => format!("0 {hour} * * *"),
            (None, None) => DEFAULT_FULL_SWEEP_CRON.to_owned(),
        };
        let parse = |expression: &str, setting: &str| -> Result<Option<Schedule>, String> {
            if expression.trim().eq_ignore_ascii_case("off") {
                return Ok(None);
            }
            Schedule::parse(expression, tz)
                .map(Some)
                .map_err(|e| format!("{setting}: {e}"))
        };
        Ok(Schedules {
            stale: parse(&stale, "PARTICIPANTS_STALE_SWEEP_CRON")?,
            full: parse(&full, "PARTICIPANTS_FULL_SWEEP_CRON")?,
            tz,
        })
    }

    /// The schedules the environment sets now, for `--help`.
    fn from_env() -> Result<Self, String> {
        let command = Self::augment_args(clap::Command::new("schedules").no_binary_name(true));
        let matches = command
            .try_get_matches_from(std::iter::empty::<String>())
            .map_err(|e| e.kind().to_string())?;
        Self::from_arg_matches(&matches).map_err(|e| e.to_string())
    }
}

/// The `--help` epilogue: the schedules the environment sets, with their next runs.
pub fn schedules_help() -> String {
    let now = chrono::Utc::now();
    match ScheduleArgs::from_env().and_then(|args| args.schedules()) {
        Ok(schedules) => {
            let mut text =
                "Sweep schedules from this environment, and their next runs:\n".to_owned();
            for line in schedules.describe(now) {
                text.push_str("  ");
                text.push_str(&line);
                text.push('\n');
            }
            text
        }
        Err(error) => format!("Sweep schedules from this environment are invalid: {error}\n"),
    }
}

/// The command line with the schedules' next runs under `--help` of every subcommand that
/// reads them.
pub fn command() -> clap::Command {
    let help = schedules_help();
    Cli::command()
        .mut_subcommand("run", |c| c.after_help(help.clone()))
        .mut_subcommand("sweep", |c| c.after_help(help.clone()))
        .mut_subcommand("status", |c| c.after_help(help.clone()))
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub sync: SyncArgs,

    /// Address of /metrics and /health
    #[arg(long, env = "SYNCD_LISTEN_ADDR", default_value = "0.0.0.0:9091")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub schedule: ScheduleArgs,

    /// Run the cron sweeps; lazy, manual and operator-triggered refreshes run either way
    #[arg(long, env = "PARTICIPANTS_ENABLE_BACKGROUND_SYNC", default_value = "true", value_parser = parse_bool,
          num_args = 0..=1, default_missing_value = "true")]
    pub participants_enable_background_sync: bool,

    /// Consumer name in the stream group; unique per process unless set (a stable name, such
    /// as a pod name, lets a restarted replica finish its own pending entries first)
    #[arg(long, env = "SYNCD_CONSUMER_NAME")]
    pub consumer_name: Option<String>,

    /// How long a stream entry may sit unacknowledged before another replica takes it over
    #[arg(long, env = "SYNCD_CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_idle: Duration,

    /// Deliveries after which an entry goes to the dead-letter stream
    #[arg(long, env = "SYNCD_MAX_DELIVERIES", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub max_deliveries: u64,

    /// How long in-flight work may take to finish after SIGTERM before it is handed back
    #[arg(long, env = "SYNCD_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub events: EventsArgs,
}

impl RunArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.sync.validate()?;
        self.schedule.schedules()?;
        if self.claim_idle < Duration::from_millis(100) {
            return Err("SYNCD_CLAIM_IDLE must be at least 100ms".to_owned());
        }
        self.events.validate(self.listen_addr)
    }
}

#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    #[command(flatten)]
    pub sync: SyncArgs,

    /// Refresh every chat
    #[arg(long, conflicts_with = "stale", required_unless_present = "stale")]
    pub full: bool,

    /// Refresh the stalest chats, as many as the rate budget allows in one update interval
    #[arg(long)]
    pub stale: bool,

    /// Run as the schedule's trigger (the CronJob): take the schedule's current slot, which is
    /// swept once whoever starts it (resumed by a retried pod, skipped when already swept).
    /// Without it (by hand) a sweep starts now, or the one already running is followed
    #[arg(long)]
    pub scheduled: bool,

    /// The Kubernetes Job this pod runs for (the CronJob sets it from the pod's `job-name`
    /// label). A CronJob's own Jobs are named `<cronjob>-<minutes since 1970>`; one made by
    /// hand (`kubectl create job --from=cronjob/...`) is not, and sweeps as if by hand
    #[arg(long, env = "SYNCD_JOB_NAME")]
    pub job_name: Option<String>,

    #[command(flatten)]
    pub schedule: ScheduleArgs,
}

impl SweepArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.sync.validate()?;
        self.schedule.schedules().map(|_| ())
    }
}

#[derive(Args, Debug, Clone)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub sync: SyncArgs,

    /// chats.id values (not MAX ids)
    #[arg(required = true, num_args = 1..)]
    pub chat_ids: Vec<i32>,
}

#[derive(Args, Debug, Clone)]
pub struct SubscribeArgs {
    /// The webhook's public URL, https://<host>/max/updates (MAX posts only to https on port
    /// 443, with no port in the URL; the ingress forwards it to SYNCD_WEBHOOK_ADDR)
    #[arg(long)]
    pub url: Option<String>,

    /// Delete subscriptions to other URLs first (MAX delivers to one receiver per bot)
    #[arg(long, conflicts_with = "check")]
    pub replace: bool,

    /// Only print what is subscribed; exit 0 if ours is there (the --url given, else any URL
    /// ending with /max/updates with the five types), 1 if not
    #[arg(long)]
    pub check: bool,

    /// Base URL of the MAX Bot API
    #[arg(
        long,
        env = "MAX_API_URL",
        default_value = "https://platform-api2.max.ru"
    )]
    pub max_api_url: String,

    /// Bot token, sent as the raw Authorization header
    #[arg(long, env = "MAX_API_TOKEN", value_parser = parse_secret, hide_env_values = true)]
    pub max_api_token: SecretString,

    /// Most time one MAX call may take
    #[arg(long, env = "PARTICIPANTS_MAX_API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub participants_max_api_timeout: Duration,

    /// The secret MAX will send in X-Max-Bot-Api-Secret (5-256 of A-Z a-z 0-9 _ -); required
    /// to subscribe, never printed
    #[arg(long, env = "MAX_WEBHOOK_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub max_webhook_secret: Option<SecretString>,

    #[command(flatten)]
    pub log: LogArgs,
}

impl SubscribeArgs {
    pub fn validate(&self) -> Result<(), String> {
        reqwest::Url::parse(&self.max_api_url)
            .map_err(|e| format!("MAX_API_URL is not a valid URL ({e})"))?;
        if self.participants_max_api_timeout.is_zero() {
            return Err("PARTICIPANTS_MAX_API_TIMEOUT must be greater than zero".to_owned());
        }
        if let Some(url) = &self.url {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| format!("--url is not a URL ({e})"))?;
            if !matches!(parsed.scheme(), "http" | "https")
                || !parsed.path().ends_with(crate::events::webhook::PATH)
            {
                return Err(
                    "--url must be https://<host>/max/updates (the path syncd serves)".to_owned(),
                );
            }
        }
        if self.check {
            return Ok(());
        }
        if self.url.is_none() {
            return Err("--url is required to subscribe (or pass --check)".to_owned());
        }
        let Some(secret) = &self.max_webhook_secret else {
            return Err("MAX_WEBHOOK_SECRET is required to subscribe".to_owned());
        };
        crate::events::settings::validate_webhook_secret(secrecy::ExposeSecret::expose_secret(
            secret,
        ))
    }
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub freshness: FreshnessArgs,

    #[command(flatten)]
    pub schedule: ScheduleArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The chat (`chats.id`, not the MAX id)
    pub chat_id: i32,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl InspectArgs {
    pub fn validate(&self) -> Result<(), String> {
        shared::db::connect_options(&self.database).map_err(|e| e.to_string())?;
        shared::redis::validate_url(&self.redis).map_err(|e| e.to_string())
    }
}

impl StatusArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.freshness.validate()?;
        self.schedule.schedules()?;
        shared::db::connect_options(&self.database).map_err(|e| e.to_string())?;
        shared::redis::validate_url(&self.redis).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    pub(crate) fn run_args(extra: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec![
            "syncd",
            "run",
            "--database-url",
            "postgres://u:p@127.0.0.1/db",
            "--max-api-token",
            "t0ken-s3cret",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(args) => Ok(*args),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.sync.max_api_url, "https://platform-api2.max.ru");
        assert_eq!(args.sync.max_api_rps, 30.0);
        assert_eq!(args.sync.participants_batch_size, 50);
        let schedules = args.schedule.schedules().unwrap();
        assert_eq!(schedules.tz.name(), "Europe/Moscow");
        assert_eq!(schedules.stale.unwrap().expression(), "*/15 * * * *");
        assert_eq!(schedules.full.unwrap().expression(), "0 3 * * *");
        assert_eq!(
            args.sync.participants_inactive_recheck,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(args.listen_addr.port(), 9091);
        args.validate().unwrap();
        assert!(!format!("{args:?}").contains("t0ken-s3cret"));
    }

    #[test]
    fn the_seed_names_translate_and_off_turns_a_schedule_off() {
        let args = run_args(&[
            "--participants-update-interval",
            "5m",
            "--participants-full-update-hour",
            "4",
            "--participants-schedule-tz",
            "Europe/Berlin",
        ])
        .unwrap();
        let schedules = args.schedule.schedules().unwrap();
        assert_eq!(schedules.stale.unwrap().expression(), "0 */5 * * * *");
        assert_eq!(schedules.full.unwrap().expression(), "0 4 * * *");
        let args = run_args(&["--participants-full-sweep-cron", "off"]).unwrap();
        assert!(args.schedule.schedules().unwrap().full.is_none());
    }

    #[test]
    fn bad_schedules_name_their_setting() {
        let err = run_args(&["--participants-schedule-tz", "Mars/Olympus"]).unwrap_err();
        assert!(err.contains("participants-schedule-tz"), "{err}");
        for (flags, setting) in [
            (
                vec!["--participants-full-sweep-cron", "0 25 * * *"],
                "PARTICIPANTS_FULL_SWEEP_CRON",
            ),
            (
                vec!["--participants-stale-sweep-cron", "every minute"],
                "PARTICIPANTS_STALE_SWEEP_CRON",
            ),
            (
                vec!["--participants-update-interval", "7m"],
                "PARTICIPANTS_UPDATE_INTERVAL",
            ),
            (
                vec![
                    "--participants-update-interval",
                    "5m",
                    "--participants-stale-sweep-cron",
                    "* * * * *",
                ],
                "PARTICIPANTS_UPDATE_INTERVAL",
            ),
            (
                vec![
                    "--participants-full-update-hour",
                    "3",
                    "--participants-full-sweep-cron",
                    "0 3 * * *",
                ],
                "PARTICIPANTS_FULL_UPDATE_HOUR",
            ),
        ] {
            let err = run_args(&flags).unwrap().validate().unwrap_err();
            assert!(err.contains(setting), "{flags:?}: {err}");
        }
    }

    #[test]
    fn help_shows_the_next_run_of_each_schedule_in_the_zone_and_in_utc() {
        let help = command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("PARTICIPANTS_FULL_SWEEP_CRON"), "{help}");
        assert!(help.contains("next runs"), "{help}");
        assert!(help.contains(" UTC)"), "{help}");
    }

    #[test]
    fn bad_values_name_their_setting() {
        assert!(run_args(&["--participants-full-update-hour", "24"])
            .unwrap_err()
            .contains("participants-full-update-hour"));
        let err = run_args(&["--max-api-rps", "0"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.contains("MAX_API_RPS"), "{err}");
        let err = run_args(&["--max-api-url", "ftp://x"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.contains("MAX_API_URL"), "{err}");
        let err = run_args(&["--disable-redis"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.contains("DISABLE_REDIS"), "{err}");
    }
}
