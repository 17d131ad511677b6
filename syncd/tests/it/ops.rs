//! The dashboard and the alert rules only query metrics the binaries really export.

use std::collections::BTreeSet;
use std::time::Duration;

use maxsim::SimConfig;

use crate::end_to_end::{start_api, token};
use crate::helpers::{eventually, World};

/// Metric names a Prometheus text page exports, with the series names histograms expand to.
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Metric names a query text refers to (ours start with `participants_` or `http_`).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts = rest.starts_with("participants_") || rest.starts_with("http_request");
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if starts && boundary {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(5).await;
    let (api, _stop_api) = start_api(&world, &[]).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let http = reqwest::Client::new();
    // Some traffic, so that per-route series exist.
    let chat = format!("http://{api}/chats/{}", ids[0]);
    http.get(format!("http://{api}/chats/all"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "a refresh happened", || async {
        let body: serde_json::Value = http
            .get(&chat)
            .bearer_auth(token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["participants_source"] == "cache"
    })
    .await;
    let mut names = BTreeSet::new();
    for (binary, address) in [
        ("api", api.to_string()),
        ("syncd", replica.address.to_string()),
    ] {
        let page = http
            .get(format!("http://{address}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Each binary says which build it is, for the dashboard's versions panel.
        let build = format!("participants_build_info{{binary=\"{binary}\",");
        assert!(
            page.lines()
                .any(|line| line.starts_with(&build) && line.ends_with(" 1")),
            "{binary} exports no build_info: {page}"
        );
        names.extend(exported(&page));
    }
    for required in [
        "participants_cache_hits_total",
        "participants_cache_misses_total",
        "participants_update_duration_seconds",
        "participants_max_api_errors_total",
        "participants_max_api_requests_total",
        "participants_stale_data_count",
        "participants_cache_errors_total",
        "participants_fallback_usage_total",
        "participants_data_freshness_seconds",
        "participants_stream_length",
        "participants_stream_lag",
        "participants_stream_pending",
        "participants_dead_letters",
        "participants_limiter_wait_seconds",
        "participants_sweep_done",
        "participants_sweep_planned",
    ] {
        assert!(names.contains(required), "{required} is not exported");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("ops/grafana/participants-dashboard.json")).unwrap(),
    )
    .unwrap();
    let dashboard_queries: String = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap_or_default().to_owned() + "\n")
        .collect();
    let rule_queries = rule_exprs(
        &std::fs::read_to_string(root.join("ops/prometheus/participants-rules.yml")).unwrap(),
    );
    for (file, text) in [
        ("the dashboard", dashboard_queries),
        ("the alert rules", rule_queries),
    ] {
        let used = referenced(&text);
        assert!(used.len() > 5, "{file} refers to {used:?}");
        let unknown: Vec<_> = used.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics nobody exports: {unknown:?}"
        );
    }
    replica.stop().await.unwrap();
}

/// The `expr:` values of a rules file, single-line or block (`expr: |`).
fn rule_exprs(yaml: &str) -> String {
    let mut out = String::new();
    let mut block_indent: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(min) = block_indent {
            if line.trim().is_empty() || indent > min {
                out.push_str(line.trim());
                out.push('\n');
                continue;
            }
            block_indent = None;
        }
        if let Some(value) = line.trim_start().strip_prefix("expr:") {
            if value.trim() == "|" {
                block_indent = Some(indent);
            } else {
                out.push_str(value.trim());
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn rule_expressions_are_read_from_yaml() {
    let yaml = "- alert: A\n  expr: up == 0\n  annotations:\n    description: see participants_source\n- record: b\n  expr: |\n    sum(x)\n      / y\n  labels: {}\n";
    assert_eq!(rule_exprs(yaml), "up == 0\nsum(x)\n/ y\n");
}

#[test]
fn metric_names_are_found_in_queries() {
    let names = referenced("sum(rate(participants_cache_hits_total[5m])) / participants:ratio:rate5m + http_request_duration_seconds_bucket");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "http_request_duration_seconds_bucket",
            "participants_cache_hits_total"
        ]
    );
}

/// Every environment variable a command of either binary reads, with the commands that read
/// it; hidden ones (test hooks of debug builds, refused by release builds) are not settings.
fn settings() -> std::collections::BTreeMap<String, BTreeSet<String>> {
    fn walk(
        command: &clap::Command,
        path: &str,
        out: &mut std::collections::BTreeMap<String, BTreeSet<String>>,
    ) {
        for arg in command.get_arguments().filter(|arg| !arg.is_hide_set()) {
            if let Some(env) = arg.get_env() {
                out.entry(env.to_string_lossy().into_owned())
                    .or_default()
                    .insert(path.to_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(
        &<api::config::Cli as clap::CommandFactory>::command(),
        "api",
        &mut out,
    );
    walk(&syncd::config::command(), "syncd", &mut out);
    out
}

/// `.env.example` names every setting the binaries read, and nothing they do not.
#[test]
fn the_env_example_lists_every_setting_of_both_binaries() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../.env.example");
    let text = std::fs::read_to_string(path).expect(".env.example exists");
    let listed: BTreeSet<String> = text
        .lines()
        .map(|line| line.trim_start_matches('#').trim())
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim().to_owned()))
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    let settings = settings();
    let missing: Vec<String> = settings
        .iter()
        .filter(|(name, _)| !listed.contains(*name))
        .map(|(name, commands)| {
            format!(
                "{name} ({})",
                commands.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let unknown: Vec<&String> = listed
        .iter()
        .filter(|name| !settings.contains_key(*name))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "missing from .env.example: {missing:#?}\nlisted but read by neither binary: {unknown:#?}"
    );
}
