//! Instance lifecycle: the runtime keeps the table of instances and runs its verbs, one per file
//! (`deploy`, `monitor`, `undeploy`, `adopt`), against a [`backend::Backend`] per virtualization
//! (containers on containerd, unikernels and microVMs on qemu). Every state change is published as an
//! [`InstanceStatus`] with Oakestra's state names.

mod adopt;
pub mod backend;
pub mod cgroup;
pub mod containerd;
mod deploy;
pub mod guest;
pub mod image;
pub mod journal;
pub mod logs;
mod monitor;
pub mod oci;
pub mod qmp;
pub mod registry;
pub mod spec;
mod undeploy;
pub mod unikernel;
pub mod vmnet;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use oak_proto::v1::{InstanceStatus, InstanceUsage};
use oak_proto::{instance_key, InstanceState};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::netmanager::NetManagerClient;
use backend::container::ContainerBackend;
use backend::qemu::QemuBackend;
use backend::Backend;
use containerd::Containerd;
pub use logs::tail_file;

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub data_dir: PathBuf,
    /// 0 = no NetManager.
    pub netmanager_port: u16,
    /// The file holding the NetManager's API credential.
    pub netmanager_credential: PathBuf,
    /// VMs on qemu (unikernels, microVMs).
    pub unikernel: bool,
    /// The kernel microVM guests boot; `None`: the newest in /boot.
    pub microvm_kernel: Option<PathBuf>,
    pub vm_accel: unikernel::Accel,
    /// Time between SIGTERM and SIGKILL on undeploy.
    pub stop_grace: Duration,
    /// How long a VM on the overlay has to answer at its address before it is stopped as FAILED.
    pub vm_answer_timeout: Duration,
    /// The only directories local image archives (and unikernel images given as paths) are read from.
    pub image_dirs: Vec<PathBuf>,
}

/// Task / container / VM id of an instance.
pub fn instance_id(job_name: &str, instance_number: u32) -> String {
    format!("{job_name}.instance.{instance_number}")
}

/// What the runtime knows of one instance, filed under its key (`service_id/n`).
struct Instance {
    id: String,
    job_name: String,
    one_shot: bool,
    memory_mb: u64,
    pid: u32,
    undeploying: bool,
    /// What runs it; `None` when nothing was created (its virtualization is not offered here).
    backend: Option<Arc<dyn Backend>>,
    status: InstanceStatus,
}

impl Instance {
    fn new(id: String, job_name: String, service_id: &str, n: u32, backend: Option<Arc<dyn Backend>>) -> Self {
        Self {
            id,
            job_name,
            one_shot: false,
            memory_mb: 0,
            pid: 0,
            undeploying: false,
            backend,
            status: InstanceStatus { service_id: service_id.into(), instance_number: n, ..Default::default() },
        }
    }
}

/// Runs instances; every state change is sent on the channel returned by [`Runtime::connect`].
pub struct Runtime {
    cfg: RuntimeConfig,
    ctr: Containerd,
    logs: logs::Logs,
    /// One per virtualization offered; asked in this order when adopting.
    backends: Vec<Arc<dyn Backend>>,
    netmanager: Option<NetManagerClient>,
    instances: Mutex<HashMap<String, Instance>>,
    /// Serializes deploy/undeploy of one instance id.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Deploys requested but not started yet, by instance key: the request's generation. An
    /// undeploy removes the entry, so a deploy that has not begun does nothing (lock order:
    /// `instances`, then `pending`).
    pending: Mutex<HashMap<String, u64>>,
    next_gen: AtomicU64,
    events: mpsc::UnboundedSender<InstanceStatus>,
    /// Deploys in progress, on disk (see [`journal`]).
    journal: journal::Journal,
    /// Each running instance's CPU time at the previous [`Runtime::usage`] sample, by instance key.
    cpu_seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Runtime {
    pub async fn connect(cfg: RuntimeConfig) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<InstanceStatus>)> {
        let ctr = Containerd::connect(&cfg.containerd_socket, &cfg.namespace).await?;
        let log_dir = cfg.data_dir.join("logs");
        std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
        let logs = logs::Logs::new(log_dir);
        let backends: Vec<Arc<dyn Backend>> = vec![
            Arc::new(ContainerBackend::new(ctr.clone(), logs.clone(), cfg.stop_grace)),
            Arc::new(QemuBackend::unikernel(&cfg, logs.clone())),
            Arc::new(QemuBackend::microvm(&cfg, logs.clone(), ctr.clone())),
        ];
        let netmanager =
            (cfg.netmanager_port != 0).then(|| NetManagerClient::new(cfg.netmanager_port, &cfg.netmanager_credential));
        let (tx, rx) = mpsc::unbounded_channel();
        let journal = journal::Journal::open(&cfg.data_dir)?;
        let rt = Self {
            cfg,
            ctr,
            logs,
            backends,
            netmanager,
            instances: Mutex::default(),
            ops: Mutex::default(),
            pending: Mutex::default(),
            next_gen: AtomicU64::new(1),
            events: tx,
            journal,
            cpu_seen: Mutex::default(),
        };
        Ok((Arc::new(rt), rx))
    }

    pub fn containerd(&self) -> &Containerd {
        &self.ctr
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.logs.path(id)
    }

    /// A piece of an instance's log, for the cluster's logs request (the error names what is missing).
    pub fn read_logs(&self, r: &oak_proto::v1::LogsRequest) -> oak_proto::v1::LogsChunk {
        let mut c = oak_proto::v1::LogsChunk { request_id: r.request_id, ..Default::default() };
        let id = self.instances.lock().get(&instance_key(&r.service_id, r.instance_number)).map(|i| i.id.clone());
        match id {
            None => c.error = format!("instance {}/{} is not on this worker", r.service_id, r.instance_number),
            Some(id) => match self.logs.read(&id, r.offset, r.max_bytes) {
                Ok((offset, size, data)) => (c.offset, c.size, c.data) = (offset, size, data),
                Err(e) => c.error = format!("the log of {id} cannot be read: {e}"),
            },
        }
        c
    }

    pub fn cgroups_path(&self, id: &str) -> String {
        cgroup::path(&self.cfg.namespace, id)
    }

    /// What each running instance uses now: memory, and CPU over the time since the previous call (the
    /// first sample of an instance has no CPU figure yet and reports 0).
    pub fn usage(&self) -> Vec<InstanceUsage> {
        struct Running {
            key: String,
            id: String,
            pid: u32,
            backend: Arc<dyn Backend>,
            service_id: String,
            n: u32,
        }
        let running: Vec<Running> = self
            .instances
            .lock()
            .iter()
            .filter(|(_, i)| i.status.status == InstanceState::Running.as_str())
            .filter_map(|(k, i)| {
                Some(Running {
                    key: k.clone(),
                    id: i.id.clone(),
                    pid: i.pid,
                    backend: i.backend.clone()?,
                    service_id: i.status.service_id.clone(),
                    n: i.status.instance_number,
                })
            })
            .collect();
        let now = Instant::now();
        let mut seen = self.cpu_seen.lock();
        let mut out = Vec::with_capacity(running.len());
        let mut keep = std::collections::HashSet::new();
        for r in running {
            let memory_bytes = r.backend.memory_usage(&r.id, r.pid).unwrap_or(0);
            let cpu = r.backend.cpu_time_us(&r.id, r.pid);
            let cpu_percent = match (cpu, seen.get(&r.key)) {
                (Some(c), Some((then, before))) if c >= *before => {
                    let wall = now.duration_since(*then).as_micros().max(1) as f64;
                    (c - before) as f64 * 100.0 / wall
                }
                _ => 0.0,
            };
            if let Some(c) = cpu {
                seen.insert(r.key.clone(), (now, c));
            }
            keep.insert(r.key);
            if cpu.is_none() && memory_bytes == 0 {
                continue;
            }
            out.push(InstanceUsage { service_id: r.service_id, instance_number: r.n, cpu_percent, memory_bytes });
        }
        seen.retain(|k, _| keep.contains(k));
        out
    }

    /// The virtualizations this worker can run now (what the scheduler may place here).
    pub fn offered(&self) -> Vec<String> {
        self.backends.iter().filter(|b| b.unavailable().is_none()).map(|b| b.virtualization().to_string()).collect()
    }

    /// Current state of every instance this runtime knows.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let mut v: Vec<_> = self.instances.lock().values().map(|i| i.status.clone()).collect();
        v.sort_by(|a, b| (&a.service_id, a.instance_number).cmp(&(&b.service_id, b.instance_number)));
        v
    }

    /// Pid of an instance's task or VM, once created.
    pub fn pid_of(&self, service_id: &str, n: u32) -> Option<u32> {
        self.instances.lock().get(&instance_key(service_id, n)).map(|i| i.pid).filter(|p| *p != 0)
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops.lock().entry(id.to_string()).or_default().clone()
    }

    /// Records and publishes a state change.
    fn emit(&self, service_id: &str, n: u32, state: InstanceState, detail: String, exit_code: Option<i32>) {
        let mut map = self.instances.lock();
        let Some(inst) = map.get_mut(&instance_key(service_id, n)) else {
            return;
        };
        inst.status.status = state.as_str().into();
        inst.status.detail = detail;
        inst.status.exit_code = exit_code;
        inst.status.timestamp_ms = oak_proto::now_ms();
        inst.status.logs = self.logs.tail(&inst.id);
        let st = inst.status.clone();
        drop(map);
        if matches!(state, InstanceState::Failed | InstanceState::Dead) {
            warn!(service = %st.service_id, instance = n, status = %st.status, detail = %st.detail, "instance state")
        } else {
            info!(service = %st.service_id, instance = n, status = %st.status, detail = %st.detail, "instance state")
        }
        let _ = self.events.send(st);
    }

    /// Applies `f` to the instance filed under `service_id/n`, if there is one.
    fn update(&self, service_id: &str, n: u32, f: impl FnOnce(&mut Instance)) {
        if let Some(i) = self.instances.lock().get_mut(&instance_key(service_id, n)) {
            f(i)
        }
    }

    fn is_undeploying(&self, service_id: &str, n: u32) -> bool {
        self.instances.lock().get(&instance_key(service_id, n)).map(|i| i.undeploying).unwrap_or(true)
    }
}
