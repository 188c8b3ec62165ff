//! Root orchestrator: REST API for users, gRPC registry for clusters, store in redb or etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Oakestra-compatible root orchestrator.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Oakestra-compatible root orchestrator: REST API for users (oak-cli works against it), gRPC registry for clusters, store in redb or etcd"
)]
struct Args {
    #[command(subcommand)]
    command: Option<oak_orchestrators::tokens_cli::Command>,
    /// REST API listen address (Oakestra's root API; OpenAPI at /api/docs): ip:port. 0.0.0.0:10000 is
    /// every IPv4 address; [::]:10000 is every IPv6 address and, with Linux's default
    /// net.ipv6.bindv6only=0, every IPv4 address too (IPv4 clients are then seen, and login-limited, by
    /// their IPv4 address).
    #[arg(long, env = "OAK_API_ADDR", default_value = "0.0.0.0:10000")]
    api_addr: SocketAddr,
    /// ClusterRegistry gRPC listen address (clusters dial in here): ip:port, 0.0.0.0:50052 for IPv4,
    /// [::]:50052 for IPv6 and IPv4.
    #[arg(long, env = "OAK_GRPC_ADDR", default_value = "0.0.0.0:50052")]
    grpc_addr: SocketAddr,
    /// Service manager listen address (clusters lease overlay subnets and resolve service IPs here):
    /// ip:port, 0.0.0.0:10099 for IPv4, [::]:10099 for IPv6 and IPv4.
    #[arg(long, env = "OAK_NETSVC_ADDR", default_value = "0.0.0.0:10099")]
    netsvc_addr: SocketAddr,
    /// Directory holding the CA and join tokens (ca/), the first join token (join-token), if generated the
    /// admin-password file and, without --etcd-endpoints, the store (root.redb, net.redb).
    #[arg(long, global = true, env = "OAK_ROOT_DATA_DIR", default_value = "/var/lib/oakestra-rs/root")]
    data_dir: PathBuf,
    /// Keep the store (users, applications, services, clusters, the overlay address plan) in etcd at
    /// these client URLs (comma-separated, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379) instead of
    /// <data-dir>/root.redb.
    #[arg(long, env = "OAK_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Every etcd key of the store starts with this prefix (<prefix>/<table>/<id>).
    #[arg(long, env = "OAK_ETCD_PREFIX", default_value = oak_orchestrators::root::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// The most writes etcd takes in one transaction: its --max-txn-ops (etcd's default is 128). A
    /// change writing more is refused before it is sent.
    #[arg(long, env = "OAK_ETCD_MAX_TXN_OPS", default_value_t = oak_orchestrators::root::store::etcd::DEFAULT_MAX_TXN_OPS)]
    etcd_max_txn_ops: usize,
    /// With --etcd-endpoints the root is one replica of possibly several, one leading: this replica's
    /// REST API as the other replicas reach it, for the requests they forward to the leader (default:
    /// http(s)://<the address this machine reaches etcd from>:<API port>).
    #[arg(long, env = "OAK_ADVERTISE_API")]
    advertise_api: Option<String>,
    /// With --etcd-endpoints: the leadership lease's time to live in milliseconds (whole seconds, at
    /// least 2 s); a dead leader is replaced within about this long.
    #[arg(long, env = "OAK_LEADER_LEASE_MS", default_value_t = 5_000)]
    leader_lease_ms: u64,
    /// Password of the "Admin" user, used only at first start (when the store has no admin yet).
    /// If unset then, a random one is generated and written to <data-dir>/admin-password (0600).
    #[arg(long, env = "OAK_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// A cluster with no message for this many milliseconds is inactive.
    #[arg(long, default_value_t = 45_000)]
    cluster_stale_ms: u64,
    /// Failed placements are retried this often (and whenever a cluster registers or reports capacity).
    #[arg(long, default_value_t = 15_000)]
    retry_interval_ms: u64,
    /// Aggregate report interval told to clusters in ClusterWelcome (milliseconds).
    #[arg(long, default_value_t = 15_000)]
    report_interval_ms: u32,
    /// Worker subnet blocks (/22, 16 workers each) one cluster may lease from the service manager
    /// (the space holds 64).
    #[arg(long, env = "OAK_MAX_BLOCKS_PER_CLUSTER", default_value_t = 8)]
    max_blocks_per_cluster: u32,
    /// Serve the REST API (--api-addr) over HTTPS with this PEM certificate chain (with --tls-key); plain
    /// HTTP otherwise, which Oakestra's CLI expects on loopback.
    #[arg(long, env = "OAK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// A join token clusters may join with (<id>.<secret>, or the whole oak10… form; added at start).
    /// Without one, a token is made at first start; the first is written whole to <data-dir>/join-token
    /// (0600). Make more with `root-orchestrator token create`.
    #[arg(long, env = "OAK_CLUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve the REST API over HTTPS with a certificate the root's own CA issues for these names
    /// (comma-separated DNS names or addresses, e.g. root.example.org,10.0.0.1); clients trust
    /// <data-dir>/ca/ca.pem. Ignored when --tls-cert is given.
    #[arg(long, env = "OAK_API_TLS_NAMES", value_delimiter = ',')]
    api_tls_names: Vec<String>,
    /// Addresses of proxies whose X-Forwarded-For names the client of a login, so each browser behind
    /// the dashboard gets its own login attempts (comma-separated; `cargo xtask up` and the root bundle set
    /// 127.0.0.1, where the dashboard runs). Any other caller's X-Forwarded-For is ignored.
    #[arg(long = "trusted-proxy", env = "OAK_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "OAK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Default log level when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    use oak_orchestrators::tokens_cli::{self, Command};
    // an empty OAK_ETCD_ENDPOINTS means the embedded store, as when it is unset
    let etcd_endpoints: Vec<String> = a.etcd_endpoints.into_iter().filter(|e| !e.trim().is_empty()).collect();
    if let Some(Command::Token { op }) = a.command {
        // a replicated root keeps its CA and join tokens in etcd, where every replica reads them
        let store = match etcd_endpoints.is_empty() {
            true => None,
            false => {
                Some(oak_orchestrators::root::store::Store::open_etcd(&oak_orchestrators::root::store::EtcdConfig {
                    prefix: a.etcd_prefix.clone(),
                    ..oak_orchestrators::root::store::EtcdConfig::new(etcd_endpoints)
                })?)
            }
        };
        return tokens_cli::run_with(op, &a.data_dir, tokens_cli::Tier::Root, store.as_ref());
    }
    oak_orchestrators::telemetry::init(&a.log_level);
    let cfg = oak_orchestrators::root::Config {
        api_addr: a.api_addr,
        grpc_addr: a.grpc_addr,
        netsvc_addr: a.netsvc_addr,
        data_dir: a.data_dir,
        etcd: (!etcd_endpoints.is_empty()).then(|| oak_orchestrators::root::store::EtcdConfig {
            prefix: a.etcd_prefix,
            max_txn_ops: a.etcd_max_txn_ops,
            ..oak_orchestrators::root::store::EtcdConfig::new(etcd_endpoints)
        }),
        advertise_api: a.advertise_api,
        leader_lease: Duration::from_millis(a.leader_lease_ms.max(2_000)),
        admin_password: a.admin_password,
        cluster_stale: Duration::from_millis(a.cluster_stale_ms),
        retry_interval: Duration::from_millis(a.retry_interval_ms.max(100)),
        report_interval_ms: a.report_interval_ms,
        max_blocks_per_cluster: a.max_blocks_per_cluster,
        join_token: a.token,
        trusted_proxies: a.trusted_proxies,
        api_tls_names: a.api_tls_names,
        tls: match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(oak_orchestrators::root::TlsFiles { cert, key }),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        },
    };
    oak_orchestrators::root::run(cfg, oak_orchestrators::task::shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::{CommandFactory, Parser};

    #[test]
    fn listen_addresses_take_ipv6() {
        let a = Args::try_parse_from([
            "root-orchestrator",
            "--api-addr",
            "[::]:10000",
            "--grpc-addr",
            "[::]:50052",
            "--netsvc-addr",
            "[::1]:10099",
        ])
        .unwrap();
        assert_eq!(a.api_addr.to_string(), "[::]:10000");
        assert_eq!(a.grpc_addr.to_string(), "[::]:50052");
        assert_eq!(a.netsvc_addr.to_string(), "[::1]:10099");
        let a = Args::try_parse_from(["root-orchestrator"]).unwrap();
        assert_eq!(a.api_addr.to_string(), "0.0.0.0:10000", "the default stays IPv4");
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("[::]:10000") && help.contains("[::]:50052") && help.contains("[::]:10099"), "{help}");
    }

    #[test]
    fn etcd_endpoints_select_the_etcd_store() {
        let a = Args::try_parse_from(["root-orchestrator"]).unwrap();
        assert!(a.etcd_endpoints.is_empty(), "the embedded store by default");
        assert_eq!(a.etcd_prefix, "/oakestra/root");
        assert_eq!(a.etcd_max_txn_ops, 128);
        let a = Args::try_parse_from([
            "root-orchestrator",
            "--etcd-endpoints",
            "http://127.0.0.1:2379,http://127.0.0.2:2379",
            "--etcd-prefix",
            "/other",
        ])
        .unwrap();
        assert_eq!(a.etcd_endpoints, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]);
        assert_eq!(a.etcd_prefix, "/other");
    }
}
