//! `NetManager`: the worker's overlay network manager (thin binary over the `oak_netmanager` library).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "NetManager",
    version,
    about = "Worker overlay network manager: leases the worker subnet from the \
cluster, wires instance network namespaces into the worker bridge, serves the local API for the NodeEngine."
)]
struct Cli {
    /// Port of the local API (HTTP/JSON for the NodeEngine).
    #[arg(short = 'p', long, default_value_t = 6000)]
    port: u16,
    /// Address the local API binds to (an IPv4 or IPv6 address: 127.0.0.1, ::1; :: for every IPv6 and,
    /// with Linux's default net.ipv6.bindv6only=0, IPv4 address). Keep it on loopback unless another
    /// host's NodeEngine must reach it.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// netcfg.json (NodePublicAddress, NodePublicPort, ClusterUrl, ClusterMqttPort, ClusterNetPort, NodeName).
    /// ClusterUrl may be a host name, an IPv4 or an IPv6 address (fd00::1 or [fd00::1]); NodePublicAddress,
    /// the tunnel endpoint other workers send to, is IPv4.
    #[arg(short = 'c', long, default_value = "/etc/netmanager/netcfg.json")]
    config: PathBuf,
    /// Directory for persisted state (instance address allocations).
    #[arg(long, default_value = "/var/lib/oakestra-rs/netmanager")]
    data_dir: PathBuf,
    /// The cluster's worker join token (its <data-dir>/worker-join-token, or `cluster-orchestrator token
    /// create`): used once, to join the cluster; the certificate it gives is kept in <data-dir>/identity.
    #[arg(long, env = "OAK_WORKER_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
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
    /// Log level or tracing filter (e.g. "info", "oak_netmanager=debug"); netlink-packet-route's warnings
    /// about attributes of newer kernels are left out unless the filter names that crate.
    #[arg(long, default_value = "info", env = "RUST_LOG")]
    log_level: String,
}

/// The tracing filter for `--log-level`: netlink-packet-route warns on every link dump that a newer
/// kernel's IFLA_INET6_CONF is longer than it knows (240 bytes on 6.18 against 236), which it handles; its
/// warnings are left out unless the filter names the crate.
fn log_filter(level: &str) -> String {
    if level.contains("netlink_packet_route") {
        level.to_string()
    } else {
        format!("{level},netlink_packet_route=error")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(log_filter(&cli.log_level))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info"))),
        )
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
        ebpf: (!cli.no_ebpf).then_some(oak_netmanager::EbpfOptions {
            object: cli.ebpf_object,
            uplink: cli.uplink,
            pin_root: Some(cli.bpf_pin_root),
        }),
        token: cli.token,
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

#[cfg(test)]
mod tests {
    use super::{log_filter, Cli};
    use clap::Parser;

    #[test]
    fn listen_takes_ipv6() {
        let c = Cli::try_parse_from(["NetManager", "--listen", "::"]).unwrap();
        assert_eq!(std::net::SocketAddr::new(c.listen, c.port).to_string(), "[::]:6000");
        assert_eq!(Cli::try_parse_from(["NetManager", "--listen", "::1"]).unwrap().listen.to_string(), "::1");
        assert_eq!(Cli::try_parse_from(["NetManager"]).unwrap().listen.to_string(), "127.0.0.1");
    }

    #[test]
    fn netlink_warnings_off_unless_asked_for() {
        assert_eq!(log_filter("info"), "info,netlink_packet_route=error");
        assert_eq!(log_filter("debug,netlink_packet_route=warn"), "debug,netlink_packet_route=warn");
        assert!(tracing_subscriber::EnvFilter::try_new(log_filter("oak_netmanager=debug")).is_ok());
    }
}
