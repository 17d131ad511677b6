//! Logs and traces: JSON (or text) log lines, and OpenTelemetry spans exported over OTLP/HTTP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The W3C trace context crosses processes as a
//! `traceparent` string: in HTTP headers, and in refresh stream entries.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::LogArgs;

/// Flushes and stops span export when dropped; keep it alive for the life of the process.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber: logs on stderr, plus OTLP export of spans when an endpoint
/// is configured. Fails when a setting does not parse, naming it. Call it before starting the
/// async runtime (the exporter runs its own thread).
pub fn init(args: &LogArgs, service_name: &'static str) -> Result<Telemetry, String> {
    // Every process starts here, before any client (and the exporter below) is built.
    crate::tls::init();
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("LOG_LEVEL `{}` is not a valid filter: {e}", args.log_level))?;
    let logs = if args.log_format == "json" {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let endpoint = args
        .otel_exporter_otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let provider = match endpoint {
        None => None,
        Some(endpoint) => {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT `{endpoint}` must be an http:// or https:// URL of an OTLP/HTTP collector"
                ));
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpJson)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| {
                    format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter ({e})")
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name(service_name).build())
                    .build(),
            )
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Spans are exported at info whatever LOG_LEVEL says: quieter logs keep the traces whole.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    // A second init (tests start several servers in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init();
    Ok(Telemetry { provider })
}

/// The W3C `traceparent` of the current span, if it is sampled into a trace.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span a `traceparent` names (ignored when malformed).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    fn with_endpoint(endpoint: &str) -> Result<Telemetry, String> {
        init(
            &LogArgs {
                log_format: "text".into(),
                log_level: "warn".into(),
                otel_exporter_otlp_endpoint: Some(endpoint.into()),
            },
            "test",
        )
    }

    #[tokio::test]
    async fn an_https_collector_is_accepted_and_other_schemes_are_refused_by_name() {
        assert!(with_endpoint("https://collector.example:4318").is_ok());
        assert!(with_endpoint("http://collector.example:4318").is_ok());
        let refused = with_endpoint("grpc://collector.example:4317")
            .err()
            .unwrap();
        assert!(refused.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{refused}");
    }
}
