//! Simulated workers that speak the real worker protocol (WorkerRegistry sessions) without running
//! anything: they accept deploys, report CREATING then RUNNING after a delay, and UNDEPLOYED on undeploy.
//! Used by the control-plane tests and benchmark (`oak-sim-worker` binary), never by a real cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use oak_proto::v1 as pb;
use oak_proto::{instance_key, InstanceState};
use parking_lot::Mutex;
use pb::cluster_to_worker::Msg;
use tokio::sync::mpsc;

/// One simulated worker.
#[derive(Debug, Clone)]
pub struct SimWorker {
    /// `http://host:10100`
    pub cluster_url: String,
    pub name: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    pub arch: String,
    pub virtualization: Vec<String>,
    /// Time from CREATING to RUNNING.
    pub start_delay: Duration,
    /// The cluster's worker join token.
    pub token: String,
}

#[derive(Default)]
struct Held {
    instances: BTreeMap<String, (pb::InstanceStatus, f64, u64)>,
}

fn worker_msg(m: pb::worker_message::Msg) -> pb::WorkerMessage {
    pb::WorkerMessage { msg: Some(m) }
}

impl SimWorker {
    fn resources(&self, held: &Held) -> pb::NodeResources {
        let (cpu, mem) = held.instances.values().fold((0.0, 0), |(c, m), (_, vc, mm)| (c + vc, m + mm));
        pb::NodeResources {
            cpu_cores: self.cpu_cores,
            cpu_percent: (cpu / f64::from(self.cpu_cores.max(1)) * 100.0).min(100.0),
            memory_total_mb: self.memory_mb,
            memory_free_mb: self.memory_mb.saturating_sub(mem),
            disk_total_mb: 100_000,
            disk_free_mb: 50_000,
            arch: self.arch.clone(),
            gpus: vec![],
            virtualization: self.virtualization.clone(),
            location: String::new(),
            // a simulated worker has no NetManager, and its instances use nothing
            network: None,
            instances: vec![],
        }
    }

    /// Runs forever, reconnecting with backoff when the session drops.
    pub async fn run(self) {
        let held = Arc::new(Mutex::new(Held::default()));
        // its certificate is kept in memory: a restarted simulator is a new worker
        let member =
            oak_trust::Member::in_memory(&self.cluster_url, oak_trust::CLUSTER_SERVER, "node", &self.name, &self.token);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session(&member, &held).await {
                Ok(()) => tracing::info!(worker = %self.name, "session ended; reconnecting"),
                Err(e) => tracing::debug!(worker = %self.name, "session failed: {e:#}"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self, member: &oak_trust::Member, held: &Arc<Mutex<Held>>) -> Result<()> {
        let (ch, _) = member.channel(&self.cluster_url, |ep| ep.connect_timeout(Duration::from_secs(5))).await?;
        let mut client = pb::worker_registry_client::WorkerRegistryClient::new(ch);
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = {
            let h = held.lock();
            pb::WorkerHello {
                node_name: self.name.clone(),
                resources: Some(self.resources(&h)),
                instances: h.instances.values().map(|(s, _, _)| s.clone()).collect(),
                netmanager_port: 0,
                version: format!("sim-{}", env!("CARGO_PKG_VERSION")),
            }
        };
        tx.send(worker_msg(pb::worker_message::Msg::Hello(hello))).expect("open");
        let mut inbound = client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.context("closed before welcome")?;
        let interval = match first.msg {
            Some(Msg::Welcome(w)) => {
                tracing::debug!(worker = %self.name, node_id = %w.node_id, "registered");
                Duration::from_millis(u64::from(w.heartbeat_interval_ms).max(50))
            }
            Some(Msg::Rejected(r)) => bail!("rejected: {}", r.reason),
            other => bail!("expected a welcome, got {other:?}"),
        };
        let (h2, tx2, me) = (held.clone(), tx.clone(), self.clone());
        let beat = crate::task::AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let r = me.resources(&h2.lock());
                if tx2.send(worker_msg(pb::worker_message::Msg::Metrics(r))).is_err() {
                    break;
                }
            }
        }));
        let status = |sid: &str, n: u32, st: InstanceState, detail: &str| pb::InstanceStatus {
            service_id: sid.into(),
            instance_number: n,
            status: st.as_str().into(),
            detail: detail.into(),
            node_name: self.name.clone(),
            timestamp_ms: oak_proto::now_ms(),
            ..Default::default()
        };
        let r: Result<()> = async {
            while let Some(m) = inbound.message().await? {
                match m.msg {
                    Some(Msg::Deploy(d)) => {
                        let spec = d.service.unwrap_or_default();
                        let k = instance_key(&spec.service_id, d.instance_number);
                        let st = status(&spec.service_id, d.instance_number, InstanceState::Creating, "simulated");
                        held.lock().instances.insert(k.clone(), (st.clone(), spec.vcpus, spec.memory_mb));
                        let _ = tx.send(worker_msg(pb::worker_message::Msg::Instance(st)));
                        let (h, t, delay) = (held.clone(), tx.clone(), self.start_delay);
                        let running = status(&spec.service_id, d.instance_number, InstanceState::Running, "simulated");
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let mut g = h.lock();
                            if let Some(e) = g.instances.get_mut(&k) {
                                e.0 = running.clone();
                                let _ = t.send(worker_msg(pb::worker_message::Msg::Instance(running)));
                            }
                        });
                    }
                    Some(Msg::Undeploy(u)) => {
                        let k = instance_key(&u.service_id, u.instance_number);
                        held.lock().instances.remove(&k);
                        let st = status(&u.service_id, u.instance_number, InstanceState::Undeployed, "undeployed");
                        let _ = tx.send(worker_msg(pb::worker_message::Msg::Instance(st)));
                    }
                    Some(Msg::Logs(r)) => {
                        // a simulated instance prints nothing: an empty log, or none for an unknown instance
                        let k = instance_key(&r.service_id, r.instance_number);
                        let mut c = pb::LogsChunk { request_id: r.request_id, ..Default::default() };
                        if !held.lock().instances.contains_key(&k) {
                            c.error = format!("instance {k} is not on this simulated worker");
                        }
                        let _ = tx.send(worker_msg(pb::worker_message::Msg::Logs(c)));
                    }
                    Some(Msg::Rejected(r)) => bail!("rejected: {}", r.reason),
                    Some(Msg::Welcome(_)) | None => {}
                }
            }
            Ok(())
        }
        .await;
        drop(beat);
        r
    }
}
