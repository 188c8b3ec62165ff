//! oak-dashboard: the web dashboard, served on port 80 by default. It talks only to the root's public REST
//! API, with the logged-in user's token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Web dashboard of oakestra-rs: clusters, applications, services and instances, over the root's REST API"
)]
struct Args {
    /// Where the dashboard listens (ip:port): 0.0.0.0:80 is every IPv4 address, [::]:80 every IPv6 (and,
    /// with Linux's default bindv6only=0, IPv4) address.
    #[arg(long, env = "OAK_DASHBOARD_LISTEN", default_value = "0.0.0.0:80")]
    listen: SocketAddr,
    /// The root's REST API: http://host:10000, or https:// for a root with --api-tls-names/--tls-cert.
    #[arg(long, env = "OAK_ROOT_URL", default_value = "http://127.0.0.1:10000")]
    root_url: String,
    /// PEM certificate of the CA that issued an HTTPS root's certificate (the root's <data-dir>/ca/ca.pem
    /// with --api-tls-names); the system's CAs otherwise.
    #[arg(long, env = "OAK_ROOT_CA")]
    root_ca: Option<PathBuf>,
    /// Mark the session cookies Secure: set this when browsers reach the dashboard over HTTPS (a
    /// TLS-terminating proxy in front of it); browsers do not send Secure cookies over plain HTTP.
    #[arg(long)]
    secure_cookies: bool,
    /// Seconds to wait for an answer of the root.
    #[arg(long, default_value_t = 10)]
    root_timeout_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
    let args = Args::parse();
    if !(args.root_url.starts_with("http://") || args.root_url.starts_with("https://")) {
        anyhow::bail!("--root-url {:?}: an http:// or https:// URL, like http://127.0.0.1:10000", args.root_url);
    }
    let api = oak_dashboard::root_api::RootApi::new(
        &args.root_url,
        args.root_ca.as_deref(),
        Duration::from_secs(args.root_timeout_s),
    )?;
    let app = oak_dashboard::router(oak_dashboard::Dashboard::new(api, args.secure_cookies));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (port 80 needs root or CAP_NET_BIND_SERVICE)", args.listen))?;
    tracing::info!("dashboard listening on http://{} (root API at {})", listener.local_addr()?, args.root_url);
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("dashboard stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
