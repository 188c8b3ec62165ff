//! Simulated workers speaking the real worker protocol (for tests and benchmarks; runs no workload).

use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Simulated workers: register with a cluster orchestrator over the real worker protocol, \
report resources, accept deploys (CREATING then RUNNING) and undeploys. Runs no workload; for tests and benchmarks."
)]
struct Args {
    /// Cluster orchestrator worker registry: host[:port] (port 10100 when left out), an IPv6 address
    /// bare or in brackets (fd00::1, [fd00::1]:10100), or a URL.
    #[arg(long, default_value = "127.0.0.1:10100", value_parser = cluster_address)]
    cluster: oak_proto::endpoint::Endpoint,
    /// How many workers to simulate in this process.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Worker names are <prefix>-<i> (or exactly <prefix> when --count is 1).
    #[arg(long, default_value = "sim")]
    name: String,
    /// CPU cores each worker reports.
    #[arg(long, default_value_t = 4)]
    cpu_cores: u32,
    /// Memory (MB) each worker reports.
    #[arg(long, default_value_t = 4096)]
    memory_mb: u64,
    /// Architecture each worker reports (Go naming: amd64, arm64, arm).
    #[arg(long, default_value = "amd64")]
    arch: String,
    /// Virtualization offered, comma separated.
    #[arg(long, default_value = "container", value_delimiter = ',')]
    virtualization: Vec<String>,
    /// Milliseconds from CREATING to RUNNING.
    #[arg(long, default_value_t = 50)]
    start_delay_ms: u64,
    /// The cluster's worker join token (its <data-dir>/worker-join-token).
    #[arg(long, env = "OAK_WORKER_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// Default log level when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    oak_orchestrators::telemetry::init(&a.log_level);
    let url = a.cluster.url(10100);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..a.count {
        let name = if a.count == 1 { a.name.clone() } else { format!("{}-{i}", a.name) };
        let w = oak_orchestrators::simworker::SimWorker {
            cluster_url: url.clone(),
            name,
            cpu_cores: a.cpu_cores,
            memory_mb: a.memory_mb,
            arch: a.arch.clone(),
            virtualization: a.virtualization.clone(),
            start_delay: Duration::from_millis(a.start_delay_ms),
            token: a.token.clone(),
        };
        set.spawn(w.run());
    }
    tracing::info!(count = a.count, cluster = %url, "simulated workers started");
    tokio::select! {
        _ = set.join_next() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn cluster_address(s: &str) -> Result<oak_proto::endpoint::Endpoint, String> {
    oak_proto::endpoint::Endpoint::parse(s).map_err(|e| e.to_string())
}
