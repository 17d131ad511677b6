//! The Prometheus text exposition both binaries serve at `/metrics`.

use prometheus::{Encoder, Registry, TextEncoder};

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
