//! Logging set-up: JSON lines for collectors, or text for a terminal.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogArgs;

/// Installs the global subscriber. Fails when the filter does not parse, naming the setting.
pub fn init(args: &LogArgs) -> Result<(), String> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("LOG_LEVEL `{}` is not a valid filter: {e}", args.log_level))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if args.log_format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests start several servers in one process) is harmless.
    let _ = result;
    Ok(())
}
