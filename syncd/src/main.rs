//! `syncd`: parse and validate the configuration, then run the daemon or a one-shot command.

use std::process::ExitCode;

use anyhow::Context;
use shared::config::{parse_or_exit_with, EXIT_CONFIG};
use syncd::config::{Cli, Command};

fn main() -> ExitCode {
    shared::tls::init();
    let cli: Cli = match parse_or_exit_with(syncd::config::command()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Command::Health(args) = &cli.command {
        return shared::health::run("syncd", args.listen_addr, &args.check);
    }
    let (validation, log) = match &cli.command {
        Command::Health(_) => unreachable!("answered above"),
        Command::Run(args) => (args.validate(), &args.sync.log),
        Command::Sweep(args) => (args.validate(), &args.sync.log),
        Command::Refresh(args) => (args.sync.validate(), &args.sync.log),
        Command::Status(args) => (args.validate(), &args.log),
        Command::Inspect(args) => (args.validate(), &args.log),
        Command::Subscribe(args) => (args.validate(), &args.log),
    };
    let _telemetry =
        match validation.and_then(|()| shared::telemetry::init(log, "participants-syncd")) {
            Ok(telemetry) => telemetry,
            Err(message) => {
                eprintln!("syncd: invalid configuration: {message}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("syncd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                let listener = tokio::net::TcpListener::bind(args.listen_addr)
                    .await
                    .with_context(|| {
                        format!("cannot listen on SYNCD_LISTEN_ADDR {}", args.listen_addr)
                    })?;
                syncd::run(*args, listener, shared::shutdown::signal()).await?;
            }
            Command::Sweep(args) => {
                let summary = syncd::sweep_once(*args, shared::shutdown::signal()).await?;
                println!("{}", describe_sweep(&summary));
            }
            Command::Refresh(args) => {
                for line in syncd::refresh_once(*args).await? {
                    println!("{line}");
                }
            }
            Command::Status(args) => {
                print!("{}", syncd::report::status(&args).await?);
            }
            Command::Inspect(args) => {
                print!("{}", syncd::inspect::inspect(&args).await?);
            }
            Command::Subscribe(args) => {
                let (text, ours) = syncd::events::subscription::command(&args).await?;
                print!("{text}");
                if args.check && !ours {
                    return Ok(ExitCode::from(1));
                }
            }
            Command::Health(_) => {}
        }
        Ok(ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "syncd failed");
            eprintln!("syncd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The line `syncd sweep` ends with: what ran, and who ran it.
fn describe_sweep(summary: &syncd::sweep::Summary) -> String {
    use syncd::sweep::How;
    let counts = format!(
        "{} of {} chats, {} failed",
        summary.done, summary.planned, summary.failed
    );
    match summary.how {
        How::AlreadySwept { slot, finished_at } => format!(
            "nothing swept: this schedule slot was already swept (the sweep of {slot}, finished {}: {counts}); run without --scheduled to sweep now",
            finished_at.map_or_else(|| "-".to_owned(), |at| at.to_rfc3339())
        ),
        How::Followed if summary.finished => format!("sweep finished (run by another process, followed here): {counts}"),
        How::Followed => format!("sweep still running in another process: {counts}"),
        How::Ran if summary.finished => format!("sweep finished: {counts}"),
        How::Ran => format!("sweep interrupted (it resumes in a running syncd): {counts}"),
    }
}
