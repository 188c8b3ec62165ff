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
    /// Name of the tun device of the userspace proxy.
    #[arg(long, default_value = "oaktun0")]
    tun: String,
    /// Do not run the userspace tun proxy (instances are wired, service IPs are not served).
    #[arg(long)]
    no_proxy: bool,
    /// Do not use tun offloads (IFF_VNET_HDR/TUNSETOFFLOAD: GSO/GRO super-packets); plain packets only.
    #[arg(long)]
    no_tun_offload: bool,
    /// Do not load the eBPF fast path (tun path only).
    #[arg(long)]
    no_ebpf: bool,
    /// The fast path's object (default: target/bpf/netmanager-ebpf.o beside the binary's build, then
    /// /usr/lib/oakestra-rs/netmanager-ebpf.o).
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Uplink interface for tunnel traffic (default: netcfg's DefaultInterface, else the interface holding
    /// NodePublicAddress, else the default route's).
    #[arg(long)]
    uplink: Option<String>,
    /// bpffs mount holding the fast path's pins (mounted there if needed). Pinned maps and links keep
    /// traffic flowing while the NetManager restarts; the next start re-adopts them.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpf_pin_root: PathBuf,
    /// Remove what a NetManager with these options set up on this host (fast-path pins, bridge, NAT
    /// rules) and exit; `cargo xtask down` runs this.
    #[arg(long)]
    teardown: bool,
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
        proxy: (!cli.no_proxy).then(|| oak_netmanager::proxy::ProxyOptions {
            tun_name: cli.tun,
            offload: !cli.no_tun_offload,
            ..Default::default()
        }),
        ebpf: (!cli.no_ebpf).then(|| oak_netmanager::EbpfOptions {
            object: cli.ebpf_object,
            uplink: cli.uplink,
            pin_root: Some(cli.bpf_pin_root),
        }),
    };
    if cli.teardown {
        return oak_netmanager::teardown(&opts);
    }
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
