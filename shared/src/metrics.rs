//! The Prometheus text exposition both binaries serve at `/metrics`.

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

/// A registry with the standard `process_*` metrics of this process (CPU seconds, resident
/// memory, open file descriptors, start time), as every Prometheus client exports them.
pub fn registry() -> Registry {
    let registry = Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
    registry
}

/// Every metric of `registry` in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .expect("text encoding of gathered metrics does not fail");
    String::from_utf8(buffer).expect("the text format is UTF-8")
}

/// Registers `participants_build_info{binary, version, revision} 1`: which build a process
/// runs, for dashboards (a rollout shows as two versions side by side) and for joining other
/// series on it. `revision` is the git commit given at build time (`PARTICIPANTS_GIT_SHA`, set
/// by the Dockerfile's `GIT_SHA` build argument), or `unknown`.
pub fn register_build_info(
    registry: &Registry,
    binary: &str,
    version: &str,
    revision: Option<&str>,
) {
    let info = IntGaugeVec::new(
        Opts::new(
            "participants_build_info",
            "Always 1; the labels say which build this process runs (binary, version, git revision)",
        ),
        &["binary", "version", "revision"],
    )
    .expect("metric name is valid");
    let revision = revision
        .filter(|r| !r.trim().is_empty())
        .unwrap_or("unknown");
    info.with_label_values(&[binary, version, revision.trim()])
        .set(1);
    registry
        .register(Box::new(info))
        .expect("build info registers once");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_build() {
        let registry = Registry::new();
        register_build_info(&registry, "api", "1.2.3", Some("abc123\n"));
        let page = render(&registry);
        assert!(
            page.contains(
                r#"participants_build_info{binary="api",revision="abc123",version="1.2.3"} 1"#
            ),
            "{page}"
        );
        let registry = Registry::new();
        register_build_info(&registry, "syncd", "1.2.3", None);
        assert!(render(&registry).contains(r#"revision="unknown""#));
    }
}
