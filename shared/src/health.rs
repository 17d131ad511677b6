//! `api health` and `syncd health`: one GET of the process's own health endpoint, for container
//! healthchecks in images that have no curl or shell tools.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A process's health as its health endpoints report it (`"status"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overall {
    /// Everything it depends on is up.
    Ok,
    /// It serves, with something it depends on down.
    Degraded,
    /// It cannot serve (the api without Postgres).
    Unavailable,
}

/// One dependency's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependency {
    Up,
    Down,
    /// Turned off by configuration (`DISABLE_REDIS`).
    Disabled,
    /// Cannot be told (syncd's heartbeat while Redis is down).
    Unknown,
}

impl Dependency {
    /// `Up` or `Down`.
    pub fn up_if(up: bool) -> Self {
        if up {
            Self::Up
        } else {
            Self::Down
        }
    }
}

/// Where the health endpoint is, and how long to wait for it.
#[derive(Args, Debug, Clone)]
pub struct HealthCheck {
    /// Path to ask for
    #[arg(long, default_value = "/health")]
    pub path: String,

    /// How long the check may take
    #[arg(long, default_value = "3s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// GETs `path` from the server listening on `listen` (a wildcard address is asked on loopback).
/// Ok when it answered 2xx; otherwise what went wrong.
pub async fn check(listen: SocketAddr, args: &HealthCheck) -> Result<u16, String> {
    let address = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    };
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n",
            args.path
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {address}: {e}"))?;
        let mut head = Vec::new();
        stream
            .take(4096)
            .read_to_end(&mut head)
            .await
            .map_err(|e| format!("cannot read from {address}: {e}"))?;
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{address} did not answer HTTP"))?;
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            let body = head.split("\r\n\r\n").nth(1).unwrap_or("").trim();
            Err(format!("{address}{} answered {status}: {body}", args.path))
        }
    };
    tokio::time::timeout(args.timeout, ask)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{address} did not answer within {:?}",
                args.timeout
            ))
        })
}

/// Runs `check` on a runtime of its own and turns it into the process's exit code.
pub fn run(name: &str, listen: SocketAddr, args: &HealthCheck) -> std::process::ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(check(listen, args)));
    match result {
        Ok(status) => {
            println!("{name}: healthy ({status})");
            std::process::ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("{name}: unhealthy: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_spelled_as_before() {
        let spelled =
            serde_json::to_string(&[Overall::Ok, Overall::Degraded, Overall::Unavailable]).unwrap();
        assert_eq!(spelled, r#"["ok","degraded","unavailable"]"#);
        let spelled = serde_json::to_string(&[
            Dependency::Up,
            Dependency::Down,
            Dependency::Disabled,
            Dependency::Unknown,
        ])
        .unwrap();
        assert_eq!(spelled, r#"["up","down","disabled","unknown"]"#);
        assert_eq!(Dependency::up_if(false), Dependency::Down);
    }
}
