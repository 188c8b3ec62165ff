//! Cluster orchestrator: registers with the root, manages workers, schedules instances on them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use oak_orchestrators::cluster::RootReplicas;

/// Oakestra-compatible cluster orchestrator.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Cluster orchestrator: registers with the root orchestrator (dialling out, so it works \
behind NAT), accepts worker registrations, schedules each instance on the best matching worker, moves instances \
off workers that miss heartbeats, reports aggregated resources up. Serves the cluster network service for the \
workers' NetManagers."
)]
struct Args {
    #[command(subcommand)]
    command: Option<oak_orchestrators::tokens_cli::Command>,
    /// Name of this cluster as the root and oak-cli show it.
    #[arg(long, env = "CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Location of this cluster: free text, or "lat,lon,radius_m".
    #[arg(long, env = "CLUSTER_LOCATION")]
    cluster_location: Option<String>,
    /// Root orchestrator address (Oakestra's SYSTEM_MANAGER_URL): a host name, an IPv4 or IPv6 address,
    /// with or without a port or http:// in front: root.example, 10.0.0.1, 10.0.0.1:50052, fd00::1,
    /// [fd00::1], [fd00::1]:50052, http://[fd00::1]:50052. A port given here replaces --root-grpc-port;
    /// the service manager is reached on the same host at --root-netsvc-port. A replicated root: its
    /// replicas' addresses separated by commas (the cluster registers with whichever answers, the leader).
    #[arg(
        long,
        env = "SYSTEM_MANAGER_URL",
        default_value = "127.0.0.1",
        value_parser = root_address,
        value_delimiter = ','
    )]
    root_address: Vec<oak_proto::endpoint::Endpoint>,
    /// Root cluster-registration port (gRPC).
    #[arg(long, default_value_t = 50052)]
    root_grpc_port: u16,
    /// Root service-manager port (overlay address management).
    #[arg(long, default_value_t = 10099)]
    root_netsvc_port: u16,
    /// Where workers register (gRPC): ip:port. 0.0.0.0:10100 is every IPv4 address; [::]:10100 is every
    /// IPv6 address and, with Linux's default net.ipv6.bindv6only=0, every IPv4 address too (IPv4
    /// workers are then recorded by their IPv4 address).
    #[arg(long, env = "OAK_WORKER_ADDR", default_value = "0.0.0.0:10100")]
    worker_addr: SocketAddr,
    /// Cluster network service, where NetManagers lease their subnets: ip:port, 0.0.0.0:10110 for IPv4,
    /// [::]:10110 for IPv6 and IPv4.
    #[arg(long, env = "OAK_NETSVC_ADDR", default_value = "0.0.0.0:10110")]
    netsvc_addr: SocketAddr,
    /// Directory for the store (cluster.redb, net.redb).
    #[arg(long, global = true, env = "OAK_CLUSTER_DATA_DIR", default_value = "/var/lib/oakestra-rs/cluster")]
    data_dir: PathBuf,
    /// Heartbeat interval told to workers (milliseconds).
    #[arg(long, default_value_t = 2_000)]
    heartbeat_interval_ms: u64,
    /// A worker silent for this many milliseconds is marked down and its instances move elsewhere.
    #[arg(long, default_value_t = 30_000)]
    worker_stale_ms: u64,
    /// A worker down for this many seconds is removed and its overlay subnet released (it gets a new
    /// one when it comes back).
    #[arg(long, default_value_t = 86_400)]
    worker_remove_after_secs: u64,
    /// An instance that FAILED or is DEAD on its worker (a one-shot's excepted) is placed again after this
    /// many milliseconds, doubling with each failure in a row up to 16 times; 0: never (it stays FAILED).
    #[arg(long, default_value_t = 15_000)]
    redeploy_after_ms: u64,
    /// The root's join token (its <data-dir>/join-token, `root-orchestrator token create`, or POST
    /// /api/join-tokens): used once, to join the root; the certificate the root gives is kept in
    /// <data-dir>/identity and names the cluster from then on.
    #[arg(long, env = "OAK_CLUSTER_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// A join token NodeEngines and NetManagers may join with (added at start). Without one, a token is
    /// made at first start; the first is written to <data-dir>/worker-join-token (0600). Make more with
    /// `cluster-orchestrator token create`.
    #[arg(long, env = "OAK_WORKER_TOKEN", default_value = "", hide_env_values = true)]
    worker_token: String,
    /// Default log level when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    use oak_orchestrators::tokens_cli::{self, Command};
    if let Some(Command::Token { op }) = a.command {
        return tokens_cli::run(op, &a.data_dir, tokens_cli::Tier::Cluster);
    }
    oak_orchestrators::telemetry::init(&a.log_level);
    let cluster_name = match a.cluster_name.filter(|n| !n.trim().is_empty()) {
        Some(n) => n,
        None => {
            let n = format!("cluster-{}", hostname());
            tracing::warn!("CLUSTER_NAME is not set (env CLUSTER_NAME or --cluster-name): registering as '{n}'; set it so the root and oak-cli show a meaningful name");
            n
        }
    };
    let cluster_location = match a.cluster_location.filter(|l| !l.trim().is_empty()) {
        Some(l) => l,
        None => {
            tracing::warn!("CLUSTER_LOCATION is not set (env CLUSTER_LOCATION or --cluster-location, e.g. \"48.26,11.67,1000\"): registering without a location; geo and latency constraints cannot select this cluster");
            String::new()
        }
    };
    let cfg = oak_orchestrators::cluster::Config {
        cluster_name,
        cluster_location,
        // the service manager lives on each root replica's host at its own port
        root: RootReplicas::new(
            a.root_address.iter().map(|r| (r.url(a.root_grpc_port), r.url_with_port(a.root_netsvc_port))),
        ),
        worker_addr: a.worker_addr,
        netsvc_addr: a.netsvc_addr,
        data_dir: a.data_dir,
        heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms.max(50)),
        worker_stale: Duration::from_millis(a.worker_stale_ms.max(200)),
        worker_remove_after: Duration::from_secs(a.worker_remove_after_secs),
        redeploy_after: Duration::from_millis(a.redeploy_after_ms),
        token: a.token,
        worker_token: a.worker_token,
    };
    oak_orchestrators::cluster::run(cfg, oak_orchestrators::task::shutdown_signal()).await
}

fn root_address(s: &str) -> Result<oak_proto::endpoint::Endpoint, String> {
    oak_proto::endpoint::Endpoint::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::Parser;

    fn urls(args: &[&str]) -> (String, String) {
        let a = Args::try_parse_from([&["cluster-orchestrator"], args].concat()).unwrap();
        assert_eq!(a.root_address.len(), 1);
        (a.root_address[0].url(a.root_grpc_port), a.root_address[0].url_with_port(a.root_netsvc_port))
    }

    #[test]
    fn root_replicas_are_a_comma_separated_list() {
        let a = Args::try_parse_from(["c", "--root-address", "10.0.0.1,10.0.0.2:7000,[fd00::3]"]).unwrap();
        let urls: Vec<String> = a.root_address.iter().map(|r| r.url(a.root_grpc_port)).collect();
        assert_eq!(urls, ["http://10.0.0.1:50052", "http://10.0.0.2:7000", "http://[fd00::3]:50052"]);
    }

    #[test]
    fn root_address_forms() {
        let both = |g: &str, n: &str| (g.to_string(), n.to_string());
        assert_eq!(urls(&["--root-address", "10.0.0.1"]), both("http://10.0.0.1:50052", "http://10.0.0.1:10099"));
        assert_eq!(urls(&["--root-address", "10.0.0.1:6000"]), both("http://10.0.0.1:6000", "http://10.0.0.1:10099"));
        assert_eq!(urls(&["--root-address", "http://root.example/"]).0, "http://root.example:50052");
        for v6 in ["fd00::1", "[fd00::1]", "[fd00::1]:50052", "http://[fd00::1]:50052"] {
            let u = urls(&["--root-address", v6]);
            assert_eq!(u, both("http://[fd00::1]:50052", "http://[fd00::1]:10099"), "{v6}");
        }
        assert_eq!(urls(&["--root-address", "[fd00::1]:7", "--root-netsvc-port", "8"]).1, "http://[fd00::1]:8");
        let e = Args::try_parse_from(["c", "--root-address", "fd00::1::5:50052"]).unwrap_err().to_string();
        assert!(e.contains("--root-address") && e.contains("[addr]:port"), "{e}");
    }

    #[test]
    fn listen_addresses_take_ipv6() {
        let a = Args::try_parse_from(["c", "--worker-addr", "[::]:10100", "--netsvc-addr", "[::]:10110"]).unwrap();
        assert_eq!(a.worker_addr.to_string(), "[::]:10100");
        assert_eq!(a.netsvc_addr.to_string(), "[::]:10110");
        let a = Args::try_parse_from(["c"]).unwrap();
        assert_eq!(
            (a.worker_addr.to_string(), a.netsvc_addr.to_string()),
            ("0.0.0.0:10100".into(), "0.0.0.0:10110".into())
        );
    }
}
