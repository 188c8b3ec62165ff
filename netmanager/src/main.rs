//! `NetManager`: the worker's overlay network manager (thin binary over the `oak_netmanager` library).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "NetManager", version, about = "Worker overlay network manager: leases the worker subnet from the \
cluster, wires instance network namespaces into the worker bridge, serves the local API for the NodeEngine.")]
struct Cli {
    /// Port of the local API (HTTP/JSON for the NodeEngine).
    #[arg(short = 'p', long, default_value_t = 6000)]
    port: u16,
    /// Address the local API binds to.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// netcfg.json (NodePublicAddress, NodePublicPort, ClusterUrl, ClusterMqttPort, ClusterNetPort, NodeName).
    #[arg(short = 'c', long, default_value = "/etc/netmanager/netcfg.json")]
    config: PathBuf,
    /// Directory for persisted state (instance address allocations).
    #[arg(long, default_value = "/var/lib/oakestra-rs/netmanager")]
    data_dir: PathBuf,
    /// Name of the worker bridge (at most 12 characters).
    #[arg(long, default_value = "oak0")]
    bridge: String,
    /// Log level or tracing filter (e.g. "info", "oak_netmanager=debug").
    #[arg(long, default_value = "info", env = "RUST_LOG")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into()))
        .init();
    let opts = oak_netmanager::Options {
        config_path: cli.config,
        listen: SocketAddr::new(cli.listen, cli.port),
        data_dir: cli.data_dir,
        bridge: cli.bridge,
    };
    let running = match oak_netmanager::start(opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("NetManager: {e:#}");
            std::process::exit(1);
        }
    };
    tokio::select! {
        r = running.wait() => r,
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; exiting (bridge and instances stay wired)"); Ok(()) }
    }
}
