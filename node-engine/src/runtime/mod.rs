//! Instance lifecycle on containerd: deploy, watch, undeploy, re-adopt after a restart.

pub mod containerd;
pub mod image;
pub mod registry;
pub mod spec;
pub mod unikernel;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use oak_proto::v1::{InstanceStatus, ServiceSpec};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::netmanager::NetManagerClient;
use containerd::Containerd;
use oak_proto::netmanager_api::{DeployRequest, UndeployRequest};

pub const LABEL_MANAGED: &str = "oakestra.io/managed";
pub const LABEL_SERVICE_ID: &str = "oakestra.io/service-id";
pub const LABEL_INSTANCE: &str = "oakestra.io/instance-number";
pub const LABEL_JOB: &str = "oakestra.io/job-name";
pub const LABEL_ONE_SHOT: &str = "oakestra.io/one-shot";
pub const LABEL_MEMORY_MB: &str = "oakestra.io/memory-mb";
pub const LABEL_NS_ADDRESS: &str = "oakestra.io/ns-address";

/// Oakestra's instance states.
pub mod state {
    pub const CREATING: &str = "CREATING";
    pub const CREATED: &str = "CREATED";
    pub const RUNNING: &str = "RUNNING";
    pub const FAILED: &str = "FAILED";
    pub const DEAD: &str = "DEAD";
    pub const COMPLETED: &str = "COMPLETED";
    pub const UNDEPLOYED: &str = "UNDEPLOYED";
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub data_dir: PathBuf,
    /// 0 = no NetManager.
    pub netmanager_port: u16,
    pub unikernel: bool,
    /// Time between SIGTERM and SIGKILL on undeploy.
    pub stop_grace: Duration,
}

/// Task / container id of an instance.
pub fn instance_id(job_name: &str, instance_number: u32) -> String {
    format!("{job_name}.instance.{instance_number}")
}

#[derive(Debug, Clone)]
#[allow(dead_code)] // service_id / instance_number: kept for debugging output
struct Instance {
    id: String,
    service_id: String,
    instance_number: u32,
    job_name: String,
    one_shot: bool,
    memory_mb: u64,
    pid: u32,
    undeploying: bool,
    status: InstanceStatus,
    /// Set for unikernels: their exit code arrives here.
    vm_exit: Option<unikernel::ExitRx>,
}

/// Runs instances; every state change is sent on the channel returned by [`Runtime::connect`].
pub struct Runtime {
    cfg: RuntimeConfig,
    ctr: Containerd,
    netmanager: Option<NetManagerClient>,
    instances: Mutex<HashMap<String, Instance>>,
    /// Serializes deploy/undeploy of one instance id.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Deploys requested but not started yet, by instance key: the request's generation. An
    /// undeploy removes the entry, so a deploy that has not begun does nothing (lock order:
    /// `instances`, then `pending`).
    pending: Mutex<HashMap<String, u64>>,
    next_gen: std::sync::atomic::AtomicU64,
    events: mpsc::UnboundedSender<InstanceStatus>,
}

fn key(service_id: &str, n: u32) -> String {
    format!("{service_id}/{n}")
}

/// Last `max` bytes of a file, lossily decoded.
pub fn tail_file(path: &std::path::Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).to_string()
}

/// Number of OOM kills recorded in the instance's memory cgroup (v1 or v2), if readable.
pub fn oom_kills(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    let candidates = [
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill"),
        (format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"), "oom_kill"),
        (format!("/sys/fs/cgroup/unified/{rel}/memory.events"), "oom_kill"),
    ];
    for (file, field) in candidates {
        if let Ok(text) = std::fs::read_to_string(&file) {
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if it.next() == Some(field) {
                    if let Some(v) = it.next().and_then(|v| v.parse().ok()) {
                        return Some(v);
                    }
                }
            }
        }
    }
    None
}

/// Current memory use of the instance's cgroup (v1 or v2), if readable.
pub fn memory_usage(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    [format!("/sys/fs/cgroup/{rel}/memory.current"), format!("/sys/fs/cgroup/memory/{rel}/memory.usage_in_bytes")]
        .iter()
        .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
}

impl Runtime {
    pub async fn connect(cfg: RuntimeConfig) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<InstanceStatus>)> {
        let ctr = Containerd::connect(&cfg.containerd_socket, &cfg.namespace).await?;
        std::fs::create_dir_all(cfg.data_dir.join("logs"))
            .with_context(|| format!("cannot create {}", cfg.data_dir.join("logs").display()))?;
        let netmanager = (cfg.netmanager_port != 0).then(|| NetManagerClient::new(cfg.netmanager_port));
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Self {
                cfg,
                ctr,
                netmanager,
                instances: Mutex::new(HashMap::new()),
                ops: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                next_gen: std::sync::atomic::AtomicU64::new(1),
                events: tx,
            }),
            rx,
        ))
    }

    pub fn containerd(&self) -> &Containerd {
        &self.ctr
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("logs").join(format!("{id}.log"))
    }

    pub fn cgroups_path(&self, id: &str) -> String {
        format!("/{}/{}", self.cfg.namespace, id)
    }

    /// Current state of every instance this runtime knows.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let mut v: Vec<_> = self.instances.lock().unwrap().values().map(|i| i.status.clone()).collect();
        v.sort_by(|a, b| (&a.service_id, a.instance_number).cmp(&(&b.service_id, b.instance_number)));
        v
    }

    /// Pid of an instance's task, once created.
    pub fn pid_of(&self, service_id: &str, n: u32) -> Option<u32> {
        self.instances.lock().unwrap().get(&key(service_id, n)).map(|i| i.pid).filter(|p| *p != 0)
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops.lock().unwrap().entry(id.to_string()).or_default().clone()
    }

    /// Records and publishes a state change.
    fn emit(&self, service_id: &str, n: u32, status: &str, detail: String, exit_code: Option<i32>) {
        let mut map = self.instances.lock().unwrap();
        let Some(inst) = map.get_mut(&key(service_id, n)) else {
            return;
        };
        inst.status.status = status.to_string();
        inst.status.detail = detail;
        inst.status.exit_code = exit_code;
        inst.status.timestamp_ms = oak_proto::now_ms();
        inst.status.logs = tail_file(&self.log_path(&inst.id), 4096);
        inst.status.memory_bytes =
            if inst.vm_exit.is_none() { memory_usage(&self.cgroups_path(&inst.id)).unwrap_or(0) } else { 0 };
        let st = inst.status.clone();
        drop(map);
        match st.status.as_str() {
            state::FAILED | state::DEAD => {
                warn!(service = %st.service_id, instance = n, status = %st.status, detail = %st.detail, "instance state")
            }
            _ => {
                info!(service = %st.service_id, instance = n, status = %st.status, detail = %st.detail, "instance state")
            }
        }
        let _ = self.events.send(st);
    }

    fn set_pid(&self, service_id: &str, n: u32, pid: u32) {
        if let Some(i) = self.instances.lock().unwrap().get_mut(&key(service_id, n)) {
            i.pid = pid;
        }
    }

    fn set_ns_address(&self, service_id: &str, n: u32, ns: &str, ns6: &str) {
        if let Some(i) = self.instances.lock().unwrap().get_mut(&key(service_id, n)) {
            i.status.ns_address = ns.to_string();
            i.status.ns_address_v6 = ns6.to_string();
        }
    }

    fn is_undeploying(&self, service_id: &str, n: u32) -> bool {
        self.instances.lock().unwrap().get(&key(service_id, n)).map(|i| i.undeploying).unwrap_or(true)
    }

    /// Starts deploying an instance in the background; progress arrives as events.
    /// An undeploy issued before the deploy started cancels it.
    pub fn deploy(self: &Arc<Self>, spec: ServiceSpec, instance_number: u32) -> tokio::task::JoinHandle<()> {
        let generation = self.request_deploy(&spec.service_id, instance_number);
        let me = self.clone();
        tokio::spawn(async move { me.deploy_gen(spec, instance_number, generation).await })
    }

    /// Deploys an instance and returns once it is RUNNING or has failed.
    pub async fn deploy_now(self: &Arc<Self>, spec: ServiceSpec, n: u32) {
        let generation = self.request_deploy(&spec.service_id, n);
        self.deploy_gen(spec, n, generation).await
    }

    fn request_deploy(&self, service_id: &str, n: u32) -> u64 {
        let generation = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pending.lock().unwrap().insert(key(service_id, n), generation);
        generation
    }

    /// Cancels a deploy of this instance that has not started yet (call it, in message order, when
    /// an undeploy arrives; [`Runtime::undeploy`] calls it too).
    pub fn cancel_pending(&self, service_id: &str, n: u32) {
        let _map = self.instances.lock().unwrap();
        self.pending.lock().unwrap().remove(&key(service_id, n));
    }

    async fn deploy_gen(self: &Arc<Self>, spec: ServiceSpec, n: u32, generation: u64) {
        let id = instance_id(&spec.job_name, n);
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        {
            let mut map = self.instances.lock().unwrap();
            {
                let mut pending = self.pending.lock().unwrap();
                if pending.get(&key(&spec.service_id, n)) != Some(&generation) {
                    info!(instance = %id, "deploy cancelled or superseded before it started");
                    return;
                }
                pending.remove(&key(&spec.service_id, n));
            }
            if let Some(existing) = map.get(&key(&spec.service_id, n)) {
                if matches!(existing.status.status.as_str(), state::CREATING | state::CREATED | state::RUNNING) {
                    info!(instance = %id, status = %existing.status.status, "deploy of an instance already here: ignored");
                    let st = existing.status.clone();
                    drop(map);
                    let _ = self.events.send(st);
                    return;
                }
            }
            map.insert(
                key(&spec.service_id, n),
                Instance {
                    id: id.clone(),
                    service_id: spec.service_id.clone(),
                    instance_number: n,
                    job_name: spec.job_name.clone(),
                    one_shot: spec.one_shot,
                    memory_mb: spec.memory_mb,
                    pid: 0,
                    undeploying: false,
                    status: InstanceStatus {
                        service_id: spec.service_id.clone(),
                        instance_number: n,
                        ..Default::default()
                    },
                    vm_exit: None,
                },
            );
        }
        self.emit(&spec.service_id, n, state::CREATING, format!("creating {id}"), None);
        if spec.virtualization == "unikernel" {
            if !self.cfg.unikernel {
                let detail = "unikernel support not enabled (start with -u=true)".to_string();
                self.emit(&spec.service_id, n, state::FAILED, detail, None);
                return;
            }
            match self.deploy_vm(&spec, n, &id).await {
                Ok(exit) => {
                    self.emit(&spec.service_id, n, state::RUNNING, String::new(), None);
                    let me = self.clone();
                    let sid = spec.service_id.clone();
                    tokio::spawn(async move { me.watch_vm(sid, n, id, exit).await });
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(unikernel::vm_dir(&self.cfg.data_dir, &id));
                    self.emit(&spec.service_id, n, state::FAILED, format!("{e:#}"), None);
                }
            }
            return;
        }
        if !spec.virtualization.is_empty() && spec.virtualization != "container" {
            self.emit(
                &spec.service_id,
                n,
                state::FAILED,
                format!("unknown virtualization '{}'", spec.virtualization),
                None,
            );
            return;
        }
        // Leftovers of an earlier instance with the same id (crash, failed instance redeployed).
        self.cleanup(&id).await;
        match self.create_and_start(&spec, n, &id).await {
            Ok(()) => {
                self.emit(&spec.service_id, n, state::RUNNING, String::new(), None);
                let me = self.clone();
                let sid = spec.service_id.clone();
                tokio::spawn(async move { me.watch(sid, n, id).await });
            }
            Err(e) => {
                let detail = format!("{e:#}");
                self.cleanup(&id).await;
                self.emit(&spec.service_id, n, state::FAILED, detail, None);
            }
        }
    }

    async fn create_and_start(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<()> {
        // The lease keeps image, unpacked layers and the new rootfs snapshot safe from containerd's
        // garbage collector until the container references them.
        let lease = self.ctr.create_lease().await?;
        let created = self.create_container(spec, n, id, &lease).await;
        self.ctr.delete_lease(&lease).await;
        let (chain_id, mut mounts) = created?;
        let log = self.log_path(id);
        let _ = std::fs::remove_file(&log);
        let mut attempt = 0;
        let pid = loop {
            attempt += 1;
            match self.ctr.create_task(id, mounts.clone(), &log).await {
                Ok(pid) => break pid,
                // containerd 1.6 can race its snapshot cleanup against a fresh Prepare (the new
                // snapshot's directory vanishes): prepare the rootfs again.
                Err(e) if attempt < 3 && format!("{e:#}").contains("failed to mount rootfs component") => {
                    warn!(instance = id, "rootfs mount failed ({e:#}); preparing the rootfs again");
                    self.ctr.remove_snapshot(id).await?;
                    mounts = self.ctr.prepare_rootfs(id, &chain_id, None).await?;
                }
                Err(e) => return Err(e),
            }
        };
        self.set_pid(&spec.service_id, n, pid);
        self.emit(&spec.service_id, n, state::CREATED, format!("task pid {pid}"), None);
        if let Some(nm) = &self.netmanager {
            let ans = nm
                .deploy(&DeployRequest {
                    pid,
                    service_name: spec.job_name.clone(),
                    service_id: spec.service_id.clone(),
                    instance_number: n,
                    port_mappings: spec.port.clone(),
                })
                .await?;
            self.set_ns_address(&spec.service_id, n, &ans.ns_address, &ans.ns_address_v6);
            let _ = self.ctr.set_container_label(id, LABEL_NS_ADDRESS, &ans.ns_address).await;
        }
        self.ctr.start_task(id).await?;
        Ok(())
    }

    /// Image, rootfs snapshot and container record; returns the image's chain id and rootfs mounts.
    async fn create_container(
        &self,
        spec: &ServiceSpec,
        n: u32,
        id: &str,
        lease: &str,
    ) -> anyhow::Result<(String, Vec<containerd_client::types::Mount>)> {
        let img = self
            .ctr
            .ensure_image_leased(&spec.code, lease)
            .await
            .map_err(|e| anyhow::anyhow!("image '{}' unavailable: {e:#}", spec.code))?;
        let oci = spec::build_spec(id, &img.config, spec, &self.cgroups_path(id));
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_SERVICE_ID.to_string(), spec.service_id.clone());
        labels.insert(LABEL_INSTANCE.to_string(), n.to_string());
        labels.insert(LABEL_JOB.to_string(), spec.job_name.clone());
        labels.insert(LABEL_ONE_SHOT.to_string(), spec.one_shot.to_string());
        labels.insert(LABEL_MEMORY_MB.to_string(), spec.memory_mb.to_string());
        let mounts = self.ctr.prepare_rootfs(id, &img.chain_id, Some(lease)).await?;
        self.ctr.create_container(id, &img.name, &oci, labels, lease).await?;
        Ok((img.chain_id, mounts))
    }

    async fn deploy_vm(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<unikernel::ExitRx> {
        let qemu = crate::metrics::find_qemu().ok_or_else(|| {
            anyhow::anyhow!("no qemu-system-* binary for this architecture in PATH (install qemu-system)")
        })?;
        let dir = unikernel::vm_dir(&self.cfg.data_dir, id);
        let _ = std::fs::remove_dir_all(&dir);
        let (kernel, initrd) = unikernel::fetch_image(&spec.code, &dir)
            .await
            .map_err(|e| anyhow::anyhow!("unikernel image '{}' unavailable: {e:#}", spec.code))?;
        self.emit(&spec.service_id, n, state::CREATED, format!("kernel {}", kernel.display()), None);
        let log = self.log_path(id);
        let _ = std::fs::remove_file(&log);
        let (pid, exit) = unikernel::launch(&qemu, spec, &kernel, initrd.as_deref(), &log).await?;
        let rec = unikernel::VmRecord {
            id: id.to_string(),
            service_id: spec.service_id.clone(),
            instance_number: n,
            job_name: spec.job_name.clone(),
            one_shot: spec.one_shot,
            memory_mb: spec.memory_mb,
            pid,
        };
        std::fs::write(dir.join("instance.json"), serde_json::to_vec(&rec)?)?;
        if let Some(i) = self.instances.lock().unwrap().get_mut(&key(&spec.service_id, n)) {
            i.pid = pid;
            i.vm_exit = Some(exit.clone());
        }
        Ok(exit)
    }

    async fn watch_vm(self: Arc<Self>, service_id: String, n: u32, id: String, mut exit: unikernel::ExitRx) {
        let code = match exit.wait_for(|c| c.is_some()).await {
            Ok(c) => c.unwrap_or(-1),
            Err(_) => -1,
        };
        if code == -1 {
            if !self.is_undeploying(&service_id, n) {
                self.emit(&service_id, n, state::DEAD, "VM exited (exit code unknown)".into(), None);
            }
            return;
        }
        if let Some(line) = unikernel::kvm_failure(&self.log_path(&id), code) {
            if !self.is_undeploying(&service_id, n) {
                self.emit(
                    &service_id,
                    n,
                    state::FAILED,
                    format!("qemu failed under KVM ({line}); KVM disabled for later VMs, a redeploy runs with TCG"),
                    Some(code),
                );
            }
            return;
        }
        self.report_exit_kind(&service_id, n, &id, code as u32, false);
    }

    /// Waits for the task to exit and reports how it ended.
    async fn watch(self: Arc<Self>, service_id: String, n: u32, id: String) {
        let mut backoff = Duration::from_millis(500);
        let code = loop {
            match self.ctr.wait_task(&id).await {
                Ok(code) => break code,
                Err(e) if e.code() == tonic::Code::NotFound => {
                    if !self.is_undeploying(&service_id, n) {
                        self.emit(&service_id, n, state::DEAD, format!("task {id} disappeared from containerd"), None);
                    }
                    return;
                }
                Err(e) => {
                    if self.is_undeploying(&service_id, n) {
                        return;
                    }
                    warn!(instance = %id, error = %e.message(), "waiting on task failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        self.report_exit(&service_id, n, &id, code);
    }

    fn report_exit(&self, service_id: &str, n: u32, id: &str, code: u32) {
        self.report_exit_kind(service_id, n, id, code, true)
    }

    fn report_exit_kind(&self, service_id: &str, n: u32, id: &str, code: u32, container: bool) {
        let (undeploying, one_shot, memory_mb) = {
            let map = self.instances.lock().unwrap();
            match map.get(&key(service_id, n)) {
                Some(i) if i.id == id => (i.undeploying, i.one_shot, i.memory_mb),
                _ => return,
            }
        };
        if undeploying {
            return;
        }
        let code_i = code as i32;
        let ooms = if container { oom_kills(&self.cgroups_path(id)).unwrap_or(0) } else { 0 };
        let unknown = container && oom_kills(&self.cgroups_path(id)).is_none();
        if ooms > 0 || (code == 137 && memory_mb > 0 && unknown) {
            let certain = if ooms > 0 { "OOM-killed" } else { "killed (SIGKILL), probably OOM" };
            self.emit(
                service_id,
                n,
                state::FAILED,
                format!("{certain}: memory limit exceeded ({memory_mb} MB), exit code {code}"),
                Some(code_i),
            );
        } else if code == 0 && one_shot {
            self.emit(service_id, n, state::COMPLETED, "one-shot instance exited with code 0".into(), Some(0));
        } else if code == 0 {
            self.emit(
                service_id,
                n,
                state::DEAD,
                "exited with code 0 although the service is not one_shot".into(),
                Some(0),
            );
        } else if code > 128 {
            self.emit(
                service_id,
                n,
                state::FAILED,
                format!("killed by signal {} (exit code {code})", code - 128),
                Some(code_i),
            );
        } else {
            self.emit(service_id, n, state::FAILED, format!("exited with code {code}"), Some(code_i));
        }
    }

    /// Stops and removes an instance; reports UNDEPLOYED.
    pub async fn undeploy(self: &Arc<Self>, service_id: &str, n: u32) -> anyhow::Result<()> {
        let known = {
            let map = self.instances.lock().unwrap();
            self.pending.lock().unwrap().remove(&key(service_id, n));
            map.get(&key(service_id, n)).map(|i| (i.id.clone(), i.job_name.clone()))
        };
        let (id, job_name) = match known {
            Some(k) => k,
            None => {
                // Not in memory (e.g. never adopted): look for our container by labels.
                let found = self.ctr.list_containers().await?.into_iter().find(|c| {
                    c.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                        && c.labels.get(LABEL_SERVICE_ID).map(String::as_str) == Some(service_id)
                        && c.labels.get(LABEL_INSTANCE).map(String::as_str) == Some(&n.to_string())
                });
                match found {
                    Some(c) => {
                        let job = c.labels.get(LABEL_JOB).cloned().unwrap_or_default();
                        (c.id, job)
                    }
                    None => {
                        info!(service = service_id, instance = n, "undeploy of an unknown instance");
                        let _ = self.events.send(InstanceStatus {
                            service_id: service_id.into(),
                            instance_number: n,
                            status: state::UNDEPLOYED.into(),
                            detail: "instance was not running on this worker".into(),
                            timestamp_ms: oak_proto::now_ms(),
                            ..Default::default()
                        });
                        return Ok(());
                    }
                }
            }
        };
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        {
            let mut map = self.instances.lock().unwrap();
            let e = map.entry(key(service_id, n)).or_insert_with(|| Instance {
                id: id.clone(),
                service_id: service_id.into(),
                instance_number: n,
                job_name: job_name.clone(),
                one_shot: false,
                memory_mb: 0,
                pid: 0,
                undeploying: true,
                status: InstanceStatus { service_id: service_id.into(), instance_number: n, ..Default::default() },
                vm_exit: None,
            });
            e.undeploying = true;
        }
        if let Some(nm) = &self.netmanager {
            if let Err(e) = nm
                .undeploy(&UndeployRequest {
                    service_name: job_name.clone(),
                    service_id: service_id.into(),
                    instance_number: n,
                })
                .await
            {
                warn!(instance = %id, "{e:#}");
            }
        }
        let vm_exit = self.instances.lock().unwrap().get(&key(service_id, n)).and_then(|i| i.vm_exit.clone());
        let remaining = match vm_exit {
            Some(exit) => self.stop_vm(&id, exit).await,
            None => self.stop_and_remove(&id).await,
        };
        let detail = match &remaining {
            Ok(()) => "stopped and removed".to_string(),
            Err(e) => format!("undeployed, but cleanup incomplete: {e:#}"),
        };
        self.emit(service_id, n, state::UNDEPLOYED, detail, None);
        let _ = std::fs::remove_file(self.log_path(&id));
        self.instances.lock().unwrap().remove(&key(service_id, n));
        self.ops.lock().unwrap().remove(&id);
        remaining
    }

    /// SIGTERM, grace period, SIGKILL for a VM; then removes its files.
    async fn stop_vm(&self, id: &str, mut exit: unikernel::ExitRx) -> anyhow::Result<()> {
        let pid = self.instances.lock().unwrap().values().find(|i| i.id == id).map(|i| i.pid).unwrap_or(0);
        // While the exit channel is empty the pid is still ours: our unreaped child, or (re-adopted)
        // a process whose pidfd has not fired.
        if pid != 0 && exit.borrow().is_none() {
            // SAFETY: plain kill(2) on the VM's pid (see above).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if tokio::time::timeout(self.cfg.stop_grace, exit.wait_for(|c| c.is_some())).await.is_err() {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|c| c.is_some())).await;
            }
        }
        let dir = unikernel::vm_dir(&self.cfg.data_dir, id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// SIGTERM, grace period, SIGKILL; then delete task, container and snapshot.
    async fn stop_and_remove(&self, id: &str) -> anyhow::Result<()> {
        if let Some(p) = self.ctr.get_task(id).await? {
            use containerd_client::types::v1::Status;
            if p.status == Status::Running as i32
                || p.status == Status::Paused as i32
                || p.status == Status::Created as i32
            {
                self.ctr.kill_task(id, libc::SIGTERM as u32).await?;
                let waited = tokio::time::timeout(self.cfg.stop_grace, self.ctr.wait_task(id)).await;
                if waited.is_err() {
                    info!(instance = id, grace = ?self.cfg.stop_grace, "no exit after SIGTERM: SIGKILL");
                    self.ctr.kill_task(id, libc::SIGKILL as u32).await?;
                    let _ = tokio::time::timeout(Duration::from_secs(10), self.ctr.wait_task(id)).await;
                }
            }
            self.ctr.delete_task(id).await?;
        }
        self.ctr.delete_container(id).await?;
        self.ctr.remove_snapshot(id).await?;
        Ok(())
    }

    /// Best-effort removal of anything left under this id.
    async fn cleanup(&self, id: &str) {
        if let Err(e) = self.stop_and_remove_quick(id).await {
            warn!(instance = id, "cleanup: {e:#}");
        }
    }

    async fn stop_and_remove_quick(&self, id: &str) -> anyhow::Result<()> {
        if let Some(_p) = self.ctr.get_task(id).await? {
            self.ctr.kill_task(id, libc::SIGKILL as u32).await?;
            let _ = tokio::time::timeout(Duration::from_secs(10), self.ctr.wait_task(id)).await;
            self.ctr.delete_task(id).await?;
        }
        self.ctr.delete_container(id).await?;
        self.ctr.remove_snapshot(id).await?;
        Ok(())
    }

    /// Finds the containers this NodeEngine started (by label), resumes watching running ones and
    /// returns their states (for the Hello).
    pub async fn adopt(self: &Arc<Self>) -> anyhow::Result<Vec<InstanceStatus>> {
        use containerd_client::types::v1::Status;
        let containers = self.ctr.list_containers().await?;
        for c in containers {
            if c.labels.get(LABEL_MANAGED).map(String::as_str) != Some("true") {
                continue;
            }
            let service_id = c.labels.get(LABEL_SERVICE_ID).cloned().unwrap_or_default();
            let Some(n) = c.labels.get(LABEL_INSTANCE).and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if self.instances.lock().unwrap().contains_key(&key(&service_id, n)) {
                continue;
            }
            let job_name = c.labels.get(LABEL_JOB).cloned().unwrap_or_default();
            let task = self.ctr.get_task(&c.id).await?;
            let inst = Instance {
                id: c.id.clone(),
                service_id: service_id.clone(),
                instance_number: n,
                job_name,
                one_shot: c.labels.get(LABEL_ONE_SHOT).map(String::as_str) == Some("true"),
                memory_mb: c.labels.get(LABEL_MEMORY_MB).and_then(|s| s.parse().ok()).unwrap_or(0),
                pid: task.as_ref().map(|t| t.pid).unwrap_or(0),
                undeploying: false,
                status: InstanceStatus {
                    service_id: service_id.clone(),
                    instance_number: n,
                    ns_address: c.labels.get(LABEL_NS_ADDRESS).cloned().unwrap_or_default(),
                    ..Default::default()
                },
                vm_exit: None,
            };
            self.instances.lock().unwrap().insert(key(&service_id, n), inst);
            match task {
                Some(t) if t.status == Status::Running as i32 => {
                    info!(instance = %c.id, pid = t.pid, "re-adopted running instance");
                    self.emit(&service_id, n, state::RUNNING, "re-adopted after NodeEngine restart".into(), None);
                    let me = self.clone();
                    let id = c.id.clone();
                    tokio::spawn(async move { me.watch(service_id, n, id).await });
                }
                Some(t) if t.status == Status::Stopped as i32 => {
                    info!(instance = %c.id, exit = t.exit_status, "re-adopted exited instance");
                    self.report_exit(&service_id, n, &c.id, t.exit_status);
                }
                Some(t) => {
                    self.emit(
                        &service_id,
                        n,
                        state::DEAD,
                        format!("found in task state {} after NodeEngine restart", t.status),
                        None,
                    );
                }
                None => {
                    self.emit(
                        &service_id,
                        n,
                        state::DEAD,
                        "container found without a task after NodeEngine restart".into(),
                        None,
                    );
                }
            }
        }
        self.adopt_vms();
        Ok(self.instances())
    }

    /// Re-adopts unikernel VMs recorded under the data dir.
    fn adopt_vms(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.data_dir.join("unikernels")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(bytes) = std::fs::read(d.path().join("instance.json")) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<unikernel::VmRecord>(&bytes) else {
                continue;
            };
            let k = key(&rec.service_id, rec.instance_number);
            if self.instances.lock().unwrap().contains_key(&k) {
                continue;
            }
            let alive = unikernel::is_our_vm(rec.pid, &rec.id);
            let exit = if alive { unikernel::watch_foreign(rec.pid).ok() } else { None };
            let (tx_dead, rx_dead) = tokio::sync::watch::channel(Some(-1));
            drop(tx_dead);
            self.instances.lock().unwrap().insert(
                k,
                Instance {
                    id: rec.id.clone(),
                    service_id: rec.service_id.clone(),
                    instance_number: rec.instance_number,
                    job_name: rec.job_name.clone(),
                    one_shot: rec.one_shot,
                    memory_mb: rec.memory_mb,
                    pid: rec.pid,
                    undeploying: false,
                    status: InstanceStatus {
                        service_id: rec.service_id.clone(),
                        instance_number: rec.instance_number,
                        ..Default::default()
                    },
                    vm_exit: Some(exit.clone().unwrap_or(rx_dead)),
                },
            );
            match exit {
                Some(exit) => {
                    info!(instance = %rec.id, pid = rec.pid, "re-adopted running unikernel VM");
                    self.emit(
                        &rec.service_id,
                        rec.instance_number,
                        state::RUNNING,
                        "re-adopted after NodeEngine restart".into(),
                        None,
                    );
                    let me = self.clone();
                    tokio::spawn(async move { me.watch_vm(rec.service_id, rec.instance_number, rec.id, exit).await });
                }
                None => {
                    self.emit(
                        &rec.service_id,
                        rec.instance_number,
                        state::DEAD,
                        "VM not running after NodeEngine restart".into(),
                        None,
                    );
                }
            }
        }
    }
}
