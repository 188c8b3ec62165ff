//! `NodeEngine`: the Oakestra worker agent.
use std::time::Duration;

use clap::Parser;
use oak_node_engine::config::Config;
use oak_node_engine::runtime::{Runtime, RuntimeConfig};
use oak_node_engine::session::{self, SessionConfig};
use tracing::{error, info, warn};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    info!(version = oak_node_engine::VERSION, cluster = %cfg.cluster_url(), node = %cfg.node_name(), "NodeEngine starting");

    if cfg.unikernel {
        match oak_node_engine::metrics::find_qemu() {
            Some(q) => {
                info!(qemu = %q.display(), kvm = oak_node_engine::metrics::kvm_usable(), "unikernel support enabled")
            }
            None => {
                warn!("-u/--unikernel given but no qemu-system-* binary found in PATH: unikernel instances will fail")
            }
        }
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;

    for d in &cfg.image_dirs {
        if let Err(e) = std::fs::create_dir_all(d) {
            warn!("image directory {}: {e}: archives there cannot be deployed", d.display());
        }
    }
    info!(dirs = ?cfg.image_dirs, "local image archives are deployed only from these directories (--image-dir)");
    oak_node_engine::runtime::registry::set_insecure_registries(cfg.insecure_registries.clone());
    let rcfg = RuntimeConfig {
        containerd_socket: cfg.containerd_socket.clone(),
        namespace: cfg.namespace.clone(),
        data_dir: cfg.data_dir.clone(),
        netmanager_port: cfg.netmanager_port,
        netmanager_credential: cfg.netmanager_credential.clone(),
        unikernel: cfg.unikernel,
        microvm_kernel: cfg.microvm_kernel.clone(),
        vm_accel: cfg.vm_accel,
        stop_grace: Duration::from_secs(10),
        vm_answer_timeout: Duration::from_secs(cfg.vm_answer_timeout_s.max(1)),
        image_dirs: cfg.image_dirs.clone(),
    };
    let mut backoff = Duration::from_secs(1);
    let (runtime, events) = loop {
        match Runtime::connect(rcfg.clone()).await {
            Ok(r) => break r,
            Err(e) => {
                error!(
                    "{e:#}: check that containerd runs and that --containerd-socket ({}) is its socket; retrying in {backoff:?}",
                    cfg.containerd_socket.display()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    match runtime.adopt().await {
        Ok(v) if !v.is_empty() => {
            info!(count = v.len(), "re-adopted instances from containerd namespace {}", cfg.namespace)
        }
        Ok(_) => {}
        Err(e) => error!("cannot list containers to re-adopt: {e:#}"),
    }

    let scfg = SessionConfig::from_config(&cfg);
    tokio::select! {
        r = session::run(scfg, runtime, events) => r,
        _ = shutdown_signal() => {
            info!("NodeEngine stopping; instances keep running and are re-adopted on the next start");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
