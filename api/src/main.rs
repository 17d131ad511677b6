//! `api`: parse and validate the configuration, then serve, migrate, or print a token.

use std::process::ExitCode;

use anyhow::Context;
use api::config::{Cli, Command};
use shared::config::{parse_or_exit, EXIT_CONFIG};

fn main() -> ExitCode {
    shared::tls::init();
    let cli: Cli = match parse_or_exit() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Health(args) => return shared::health::run("api", args.listen_addr, &args.check),
        Command::Serve(args) => {
            if let Err(message) = args.validate() {
                eprintln!("api: invalid configuration: {message}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let _telemetry = match shared::telemetry::init(&args.log, "participants-api") {
                Ok(telemetry) => telemetry,
                Err(message) => {
                    eprintln!("api: invalid configuration: {message}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime().and_then(|rt| {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(args.listen_addr)
                        .await
                        .with_context(|| {
                            format!("cannot listen on API_LISTEN_ADDR {}", args.listen_addr)
                        })?;
                    api::run(*args, listener, shared::shutdown::signal()).await
                })
            })
        }
        Command::Migrate(args) => {
            let configured = args.migration_database().and_then(|database| {
                shared::telemetry::init(&args.log, "participants-api").map(|t| (database, t))
            });
            let (database, _telemetry) = match configured {
                Ok(configured) => configured,
                Err(message) => {
                    eprintln!("api: invalid configuration: {message}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if args.migrate_database_url.is_none() {
                tracing::warn!("MIGRATE_DATABASE_URL is unset: migrating as DATABASE_URL's role, which then holds DDL rights the services do not need");
            }
            runtime().and_then(|rt| rt.block_on(api::migrate_with(&database, args.lock_timeout)))
        }
        Command::Token(args) => args.mint().map(|token| println!("{token}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "api failed");
            eprintln!("api: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
