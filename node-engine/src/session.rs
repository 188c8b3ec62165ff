//! The worker side of `oak.v1.WorkerRegistry/Session`: Hello → Welcome, then metrics (heartbeat),
//! instance statuses up, deploy/undeploy down; reconnects with backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use oak_proto::v1::{
    cluster_to_worker, worker_message, worker_registry_client::WorkerRegistryClient, InstanceStatus, WorkerHello,
    WorkerMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::metrics::MetricsCollector;
use crate::runtime::Runtime;

/// Where the node id given by the cluster is kept.
pub fn node_id_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node_id")
}

pub fn load_node_id(data_dir: &Path) -> String {
    std::fs::read_to_string(node_id_path(data_dir)).map(|s| s.trim().to_string()).unwrap_or_default()
}

pub fn store_node_id(data_dir: &Path, id: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let p = node_id_path(data_dir);
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, id)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Everything the session needs.
pub struct SessionConfig {
    pub cluster_url: String,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub netmanager_port: u16,
    pub token: String,
    pub unikernel: bool,
    pub location: String,
}

impl SessionConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            cluster_url: c.cluster_url(),
            node_name: c.node_name(),
            data_dir: c.data_dir.clone(),
            netmanager_port: c.netmanager_port,
            token: c.token.clone(),
            unikernel: c.unikernel,
            location: c.location.clone(),
        }
    }
}

struct Identity {
    node_id: String,
    public_ip: String,
}

/// Runs the session forever, reconnecting with exponential backoff (1 s … 30 s).
pub async fn run(
    cfg: SessionConfig,
    runtime: Arc<Runtime>,
    mut events: mpsc::UnboundedReceiver<InstanceStatus>,
) -> anyhow::Result<()> {
    let mut metrics =
        MetricsCollector::new(&cfg.data_dir, cfg.unikernel, cfg.location.clone()).with_instances(runtime.clone());
    if cfg.netmanager_port != 0 {
        // the overlay summary (GETs need no credential) goes up with every heartbeat
        let client = crate::netmanager::NetManagerClient::new(cfg.netmanager_port, std::path::Path::new(""));
        metrics = metrics.with_network(crate::netmanager::watch_network(client, Duration::from_secs(2)));
    }
    let mut ident = Identity { node_id: load_node_id(&cfg.data_dir), public_ip: String::new() };
    // joins the cluster once with the worker join token; its certificate (`<data-dir>/identity`) names
    // this worker from then on
    let member = oak_trust::Member::new(
        &cfg.cluster_url,
        oak_trust::CLUSTER_SERVER,
        "node",
        &cfg.node_name,
        &cfg.token,
        cfg.data_dir.join("identity"),
    );
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let result = session_once(&cfg, &member, &runtime, &mut events, &mut metrics, &mut ident).await;
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_secs(1);
        }
        match result {
            Ok(reason) => warn!(
                "session with the cluster orchestrator at {} ended: {reason}; reconnecting in {backoff:?}",
                cfg.cluster_url
            ),
            Err(e) => error!("{e:#}; retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn stamp(st: &mut InstanceStatus, ident: &Identity, node_name: &str) {
    st.node_id = ident.node_id.clone();
    st.node_name = node_name.to_string();
    if st.public_ip.is_empty() {
        st.public_ip = ident.public_ip.clone();
    }
}

/// One session; returns why it ended (Ok) or an error (cannot connect, rejected, …).
async fn session_once(
    cfg: &SessionConfig,
    member: &oak_trust::Member,
    runtime: &Arc<Runtime>,
    events: &mut mpsc::UnboundedReceiver<InstanceStatus>,
    metrics: &mut MetricsCollector,
    ident: &mut Identity,
) -> anyhow::Result<String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow!(
            "cannot reach the cluster orchestrator at {} (gRPC oak.v1.WorkerRegistry/Session): {e}; check that it runs \
             and that -a/--cluster-address and -p/--cluster-port point to it",
            cfg.cluster_url
        )
    };
    let (channel, _) = member
        .channel(&cfg.cluster_url, |ep| {
            ep.connect_timeout(Duration::from_secs(5))
                .tcp_keepalive(Some(Duration::from_secs(20)))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .await
        .map_err(|e| unreachable(&format!("{e:#}")))?;
    let mut client = WorkerRegistryClient::new(channel);

    let (tx, rx) = mpsc::channel::<WorkerMessage>(256);
    // State changes queued while disconnected: the Hello carries the current state of every
    // instance still here, so only the others (e.g. UNDEPLOYED ones) are sent after the Welcome.
    let mut queued = Vec::new();
    while let Ok(st) = events.try_recv() {
        queued.push(st);
    }
    let mut instances = runtime.instances();
    queued
        .retain(|q| !instances.iter().any(|i| i.service_id == q.service_id && i.instance_number == q.instance_number));
    for st in &mut instances {
        stamp(st, ident, &cfg.node_name);
    }
    let n_instances = instances.len();
    let hello = WorkerHello {
        node_name: cfg.node_name.clone(),
        resources: Some(metrics.collect()),
        instances,
        netmanager_port: cfg.netmanager_port as u32,
        version: crate::VERSION.to_string(),
    };
    tx.send(WorkerMessage { msg: Some(worker_message::Msg::Hello(hello)) }).await.ok();
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|e| unreachable(&format!("{} ({:?})", e.message(), e.code())))?
        .into_inner();

    let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .map_err(|_| anyhow!("the cluster orchestrator at {} sent no Welcome within 15 s", cfg.cluster_url))?
        .map_err(|e| anyhow!("session with {} failed before Welcome: {}", cfg.cluster_url, e.message()))?;
    let welcome = match first.and_then(|m| m.msg) {
        Some(cluster_to_worker::Msg::Welcome(w)) => w,
        Some(cluster_to_worker::Msg::Rejected(r)) => {
            bail!("the cluster orchestrator at {} rejected this worker: {}", cfg.cluster_url, r.reason)
        }
        Some(other) => bail!("the cluster orchestrator at {} sent {other:?} before Welcome", cfg.cluster_url),
        None => bail!("the cluster orchestrator at {} closed the session before Welcome", cfg.cluster_url),
    };
    if !welcome.node_id.is_empty() && welcome.node_id != ident.node_id {
        ident.node_id = welcome.node_id.clone();
        if let Err(e) = store_node_id(&cfg.data_dir, &ident.node_id) {
            warn!("cannot persist node id in {}: {e}", cfg.data_dir.display());
        }
    }
    ident.public_ip = welcome.observed_address.clone();
    let hb = Duration::from_millis(if welcome.heartbeat_interval_ms == 0 {
        2000
    } else {
        welcome.heartbeat_interval_ms as u64
    });
    // the address the cluster sees this worker at: the first thing to check when it shows the worker with
    // the wrong IP (a NAT, another interface, IPv6 where IPv4 was expected)
    let observed = if welcome.observed_address.is_empty() { "unknown" } else { welcome.observed_address.as_str() };
    info!(
        node_id = %ident.node_id, cluster = %welcome.cluster_name, cluster_id = %welcome.cluster_id,
        heartbeat = ?hb, instances = n_instances,
        "registered with the cluster orchestrator at {}; it sees this worker at {observed}", cfg.cluster_url
    );

    for mut st in queued {
        stamp(&mut st, ident, &cfg.node_name);
        if tx.send(WorkerMessage { msg: Some(worker_message::Msg::Instance(st)) }).await.is_err() {
            return Ok("the stream closed".into());
        }
    }
    let mut ticker = tokio::time::interval(hb);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the Hello carried the first sample
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let m = metrics.collect();
                if tx.send(WorkerMessage { msg: Some(worker_message::Msg::Metrics(m)) }).await.is_err() {
                    return Ok("the stream closed".into());
                }
            }
            ev = events.recv() => {
                let Some(mut st) = ev else { return Ok("the runtime stopped".into()) };
                stamp(&mut st, ident, &cfg.node_name);
                if tx.send(WorkerMessage { msg: Some(worker_message::Msg::Instance(st)) }).await.is_err() {
                    return Ok("the stream closed".into());
                }
            }
            msg = inbound.message() => {
                match msg {
                    Ok(Some(m)) => match m.msg {
                        Some(cluster_to_worker::Msg::Deploy(d)) => {
                            let Some(spec) = d.service else {
                                warn!("DeployInstance without a service: ignored");
                                continue;
                            };
                            info!(service = %spec.service_id, job = %spec.job_name, instance = d.instance_number, image = %spec.code, "deploy requested");
                            drop(runtime.deploy(spec, d.instance_number)); // runs in the background
                        }
                        Some(cluster_to_worker::Msg::Undeploy(u)) => {
                            info!(service = %u.service_id, instance = u.instance_number, "undeploy requested");
                            runtime.cancel_pending(&u.service_id, u.instance_number);
                            let rt = runtime.clone();
                            tokio::spawn(async move {
                                if let Err(e) = rt.undeploy(&u.service_id, u.instance_number).await {
                                    warn!(service = %u.service_id, instance = u.instance_number, "undeploy: {e:#}");
                                }
                            });
                        }
                        Some(cluster_to_worker::Msg::Logs(r)) => {
                            let chunk = runtime.read_logs(&r);
                            if tx.send(WorkerMessage { msg: Some(worker_message::Msg::Logs(chunk)) }).await.is_err() {
                                return Ok("the stream closed".into());
                            }
                        }
                        Some(cluster_to_worker::Msg::Welcome(w)) => {
                            info!(node_id = %w.node_id, "welcome received again");
                        }
                        Some(cluster_to_worker::Msg::Rejected(r)) => {
                            bail!("the cluster orchestrator at {} rejected this worker: {}", cfg.cluster_url, r.reason);
                        }
                        None => {}
                    },
                    Ok(None) => return Ok("the cluster orchestrator closed the stream".into()),
                    Err(e) => return Ok(format!("stream error: {} ({:?})", e.message(), e.code())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_node_id(d.path()), "");
        store_node_id(d.path(), "node-123").unwrap();
        assert_eq!(load_node_id(d.path()), "node-123");
    }
}
