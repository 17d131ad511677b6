//! The Prometheus text exposition both binaries serve at `/metrics`.

use prometheus::{Encoder, Registry, TextEncoder};

/// Every metric of `registry` in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .expect("text encoding of gathered metrics does not fail");
    String::from_utf8(buffer).expect("the text format is UTF-8")
}
