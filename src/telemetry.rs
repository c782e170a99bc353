//! Logging with `tracing`: human-readable text on a terminal, JSON lines otherwise
//! (`log.format = auto`, the default; `text` or `json` to choose). Every gRPC call runs in an
//! `rpc` span (`method`, `peer`, `request_id`, `user_id`; see `startup::observe`), so every
//! line logged for a call carries them.
//!
//! What is never logged: passwords, tokens (access, refresh, single-use links, MFA
//! challenges), codes, keys and the pepper. Log user and session ids instead;
//! `tests/api/ops.rs` runs the flows with a capturing subscriber and checks.
//!
//! With the `otlp` cargo feature, spans are also exported over OTLP/gRPC when
//! `log.otlp_endpoint` or the SDK's `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set (the other
//! `OTEL_*` variables apply as the SDK reads them). A caller's `traceparent` is followed only
//! from `server.trusted_proxies`.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG` overrides `log.filter`.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        // Production runs under a supervisor that collects stdout; a person runs a terminal.
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let output: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt::layer().json().with_current_span(true).with_target(false).boxed()
    } else {
        fmt::layer().with_target(false).boxed()
    };
    let registry = tracing_subscriber::registry().with(output);
    #[cfg(feature = "otlp")]
    let registry = registry.with(otlp::layer(settings));
    // Already installed (tests build several servers in one process): keep the first.
    drop(registry.with(filter).try_init());
}

/// Notes who the current call is for, on its `rpc` span (once a flow knows: after a bearer
/// token is checked, at login, at refresh).
pub fn record_user_id(user_id: uuid::Uuid) {
    tracing::Span::current().record("user_id", tracing::field::display(user_id));
}

/// With the `otlp` feature: makes a call's span a child of the caller's trace when it sent a
/// W3C `traceparent` header, so exported traces continue the gateway's. `startup::observe`
/// calls it only for peers in `server.trusted_proxies`: anyone else could choose our trace
/// ids and, through the sampled flag and the SDK's default parent-based sampler, whether we
/// record and export (a cheap way to make every replica export every span).
#[cfg(feature = "otlp")]
pub(crate) fn follow_remote_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    otlp::follow_remote_trace(span, headers);
}

/// Sends the spans still buffered (OTLP); call once, when the server has stopped.
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

#[cfg(feature = "otlp")]
mod otlp {
    //! OTLP/gRPC span export, through our own tonic (opentelemetry-otlp 0.33 builds on
    //! tonic/prost 0.14).

    use std::sync::OnceLock;

    use opentelemetry::{propagation::TextMapPropagator as _, trace::TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::{Layer, registry::LookupSpan};

    use crate::config::LogSettings;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The export layer, when an endpoint is configured (`log.otlp_endpoint`, or the SDK's
    /// environment variables); `None` otherwise or when the exporter cannot be built (said
    /// on stderr: logging is not up yet).
    pub(super) fn layer<S>(settings: &LogSettings) -> Option<impl Layer<S> + Send + Sync + use<S>>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        let from_env = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            .iter()
            .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()));
        if settings.otlp_endpoint.is_none() && !from_env {
            return None;
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(endpoint) = &settings.otlp_endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = match builder.build() {
            Ok(exporter) => exporter,
            Err(error) => {
                eprintln!("portcullis: OTLP span export is off: {error}");
                return None;
            }
        };
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("portcullis");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("portcullis");
        // A second `init` in one process (tests) keeps the first provider.
        let _ = PROVIDER.set(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    struct Headers<'a>(&'a http::HeaderMap);

    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|value| value.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }

    pub(super) fn follow_remote_trace(span: &tracing::Span, headers: &http::HeaderMap) {
        if !headers.contains_key("traceparent") {
            return;
        }
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        // Without the export layer (no endpoint configured) there is nothing to follow.
        let _ = span.set_parent(parent);
    }

    pub(super) fn shutdown() {
        if let Some(provider) = PROVIDER.get()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "OTLP span export did not shut down cleanly");
        }
    }
}
