//! Logging set-up shared by the binaries.

/// Installs a `tracing` subscriber; `RUST_LOG` overrides `default_level`.
pub fn init(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}
