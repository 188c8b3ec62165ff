//! Command line flags of the NodeEngine.

use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// Oakestra worker agent: registers with a cluster orchestrator, reports node resources and runs
/// service instances as containers on containerd (and, with -u, unikernels on qemu).
#[derive(Debug, Clone, Parser)]
#[command(name = "NodeEngine", version, about, long_about = None)]
pub struct Config {
    /// Address of the cluster orchestrator to register with: a host name, an IPv4 address or an IPv6
    /// address (10.0.0.5, fd00::1, [fd00::1]); a port written here ([fd00::1]:10100, 10.0.0.5:10100)
    /// replaces --cluster-port.
    #[arg(short = 'a', long = "cluster-address", default_value = "127.0.0.1", env = "CLUSTER_ADDRESS",
          value_parser = cluster_address)]
    pub cluster_address: String,

    /// gRPC worker-registration port of the cluster orchestrator.
    #[arg(short = 'p', long = "cluster-port", default_value_t = 10100, env = "CLUSTER_PORT")]
    pub cluster_port: u16,

    /// Port of the local NetManager API on 127.0.0.1 (0 = run without NetManager: instances get no
    /// overlay address).
    #[arg(short = 'n', long = "netmanager-port", default_value_t = 6000)]
    pub netmanager_port: u16,

    /// The NetManager's API credential: the `api-token` file it writes into its --data-dir (0600, root).
    #[arg(long = "netmanager-credential", default_value = crate::netmanager::DEFAULT_CREDENTIAL)]
    pub netmanager_credential: PathBuf,

    /// Enable VM support on qemu: unikernels, and microVMs (an OCI image booted by a small Linux guest;
    /// x86_64, needs a guest kernel and busybox-static). Accepts `-u`, `-u=true`, `-u=false`.
    #[arg(short = 'u', long = "unikernel", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub unikernel: bool,

    /// The kernel microVM guests boot (`vmlinuz-<version>`, its modules in /usr/lib/modules/<version>);
    /// the newest in /boot by default.
    #[arg(long = "microvm-kernel", value_name = "VMLINUZ")]
    pub microvm_kernel: Option<PathBuf>,

    /// The accelerator VMs use: `auto` (KVM when /dev/kvm works, TCG emulation otherwise, logged), `kvm`
    /// (a VM that cannot have KVM FAILS) or `tcg`.
    #[arg(long = "vm-accel", value_enum, default_value_t = crate::runtime::unikernel::Accel::Auto)]
    pub vm_accel: crate::runtime::unikernel::Accel,

    /// How long a VM on the overlay has to answer at its address (ARP) after qemu starts, in seconds;
    /// it is RUNNING when it does, FAILED (and stopped) when it does not. TCG emulation boots slowly.
    #[arg(long = "vm-answer-timeout", default_value_t = 180, value_name = "SECONDS")]
    pub vm_answer_timeout_s: u64,

    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter directive).
    #[arg(long = "log-level", default_value = "info", env = "NODE_ENGINE_LOG")]
    pub log_level: String,

    /// Path of containerd's gRPC socket.
    #[arg(long = "containerd-socket", default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: PathBuf,

    /// Name this worker registers under (default: the host name).
    #[arg(long = "node-name")]
    pub node_name: Option<String>,

    /// Directory for persistent state (node id) and instance logs.
    #[arg(long = "data-dir", default_value = "/var/lib/oakestra-rs/node-engine")]
    pub data_dir: PathBuf,

    /// containerd namespace holding this worker's images and containers.
    #[arg(long = "namespace", default_value = "oakestra")]
    pub namespace: String,

    /// The cluster's worker join token (its <data-dir>/worker-join-token, or `cluster-orchestrator token
    /// create`): used once, to join the cluster; the certificate it gives is kept in <data-dir>/identity.
    #[arg(long = "token", env = "OAK_WORKER_TOKEN", default_value = "")]
    pub token: String,

    /// Registries (`host[:port]`, comma-separated) reached over plain HTTP when pulling images
    /// (loopback registries and `http://host/name:tag` references always are).
    #[arg(long = "insecure-registries", env = "OAK_INSECURE_REGISTRIES", value_delimiter = ',', default_value = "")]
    pub insecure_registries: Vec<String>,

    /// Directories (comma-separated) that local image archives (`oci-archive:`, `docker-archive:`, paths)
    /// and unikernel images given as paths must lie in; anything else fails naming this rule.
    #[arg(
        long = "image-dir",
        env = "OAK_IMAGE_DIRS",
        value_delimiter = ',',
        default_value = "/var/lib/oakestra-rs/images"
    )]
    pub image_dirs: Vec<PathBuf>,

    /// Optional "lat,lon" location of this worker, reported with its resources.
    #[arg(long = "location", default_value = "")]
    pub location: String,
}

impl Config {
    /// gRPC endpoint of the cluster orchestrator.
    pub fn cluster_url(&self) -> String {
        match oak_proto::endpoint::Endpoint::parse(&self.cluster_address) {
            Ok(e) => e.url(self.cluster_port),
            // (checked when the flags were parsed)
            Err(_) => format!("http://{}:{}", self.cluster_address, self.cluster_port),
        }
    }

    /// The node name: the flag, else the host name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node_name {
            if !n.is_empty() {
                return n.clone();
            }
        }
        hostname()
    }
}

/// `-a`: any form [`oak_proto::endpoint::Endpoint`] takes.
fn cluster_address(s: &str) -> Result<String, String> {
    oak_proto::endpoint::Endpoint::parse(s).map(|_| s.trim().to_string()).map_err(|e| e.to_string())
}

/// Host name of this machine.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["NodeEngine"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).expect("flags parse")
    }

    #[test]
    fn defaults() {
        let c = parse(&[]);
        assert_eq!(c.cluster_address, "127.0.0.1");
        assert_eq!(c.cluster_port, 10100);
        assert_eq!(c.netmanager_port, 6000);
        assert!(!c.unikernel);
        assert_eq!(c.namespace, "oakestra");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/oakestra-rs/node-engine"));
        assert_eq!(c.cluster_url(), "http://127.0.0.1:10100");
    }

    #[test]
    fn unikernel_forms() {
        assert!(parse(&["-u=true"]).unikernel);
        assert!(parse(&["-u"]).unikernel);
        assert!(!parse(&["-u=false"]).unikernel);
        assert!(parse(&["--unikernel=true"]).unikernel);
        assert!(parse(&["--unikernel"]).unikernel);
        // -u followed by another flag must not swallow it.
        let c = parse(&["-u", "-n", "7000"]);
        assert!(c.unikernel);
        assert_eq!(c.netmanager_port, 7000);
    }

    #[test]
    fn ports_and_address() {
        let c = parse(&["-n", "6000", "-a", "10.0.0.5", "-p", "10200"]);
        assert_eq!(c.netmanager_port, 6000);
        assert_eq!(c.cluster_url(), "http://10.0.0.5:10200");
        assert_eq!(parse(&["-n", "0"]).netmanager_port, 0);
        assert_eq!(parse(&["-a", "::1"]).cluster_url(), "http://[::1]:10100");
        for v6 in ["fd00::1", "[fd00::1]", "http://[fd00::1]"] {
            assert_eq!(parse(&["-a", v6, "-p", "10200"]).cluster_url(), "http://[fd00::1]:10200", "{v6}");
        }
        assert_eq!(parse(&["-a", "[fd00::1]:10300"]).cluster_url(), "http://[fd00::1]:10300");
        assert_eq!(parse(&["-a", "10.0.0.5:10300"]).cluster_url(), "http://10.0.0.5:10300");
        let e = Config::try_parse_from(["NodeEngine", "-a", "fd00::1::2:10100"]).unwrap_err().to_string();
        assert!(e.contains("--cluster-address") && e.contains("[addr]:port"), "{e}");
        assert!(Config::try_parse_from(["NodeEngine", "-p", "notaport"]).is_err());
    }

    #[test]
    fn help_documents_every_flag() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        for flag in [
            "--cluster-address",
            "--cluster-port",
            "--netmanager-port",
            "--unikernel",
            "--log-level",
            "--containerd-socket",
            "--node-name",
            "--data-dir",
            "--namespace",
        ] {
            assert!(help.contains(flag), "help lacks {flag}");
        }
    }
}
