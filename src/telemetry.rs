//! Logging with `tracing`: human-readable text on a terminal, JSON in production.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG` overrides `log.filter`.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.format {
        LogFormat::Json => {
            registry.with(fmt::layer().json().with_current_span(true).with_target(false)).try_init()
        }
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
    };
    // Already installed (tests build several servers in one process): keep the first.
    drop(result);
}
