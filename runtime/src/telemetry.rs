//! Structured tracing logs, as text or JSON, and — when `log.otlp_endpoint` is set — the same spans
//! exported over OTLP/gRPC to an OpenTelemetry collector (off by default). Nothing that identifies a
//! person or carries a secret is ever a field: spans and logs carry the method, org and instance ids,
//! never tokens, e-mail addresses, display names or IP addresses.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::settings::{LogFormat, LogSettings};

/// Keeps the OTLP exporter alive; dropping it flushes the spans not yet sent.
#[derive(Debug, Default)]
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

/// Installs the global subscriber (a second call keeps the first). `service` names the process in
/// exported traces. Call from within a Tokio runtime: the OTLP exporter's channel lives on it.
pub fn init(log: &LogSettings, service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let provider = log.otlp_endpoint.as_deref().and_then(|endpoint| {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .inspect_err(|error| eprintln!("OTLP export is off: {error}"))
            .ok()?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service)
                        .build(),
                )
                .build(),
        )
    });
    let otlp = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otlp)
        .with(filter)
        .try_init();
    Telemetry { provider }
}

/// Records the org (and instance) a call is about on the handler's span, for logs and traces.
pub fn note_ids(org_id: &str, instance_id: Option<&str>) {
    let span = tracing::Span::current();
    span.record("org_id", org_id);
    if let Some(instance_id) = instance_id {
        span.record("instance_id", instance_id);
    }
}
