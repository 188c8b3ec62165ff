//! Deploy: CREATING, the backend creates the instance (CREATED), the NetManager wires it, the
//! backend starts it (RUNNING) and the monitor watches it; any failure is FAILED with the reason,
//! and nothing of the instance is left.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use oak_proto::netmanager_api::DeployRequest;
use oak_proto::v1::ServiceSpec;
use oak_proto::{instance_key, InstanceState};
use tracing::info;

use super::backend::Backend;
use super::image;
use super::{instance_id, journal, Instance, Runtime};

/// Why an instance's virtualization cannot run here.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoBackend {
    #[error("unknown virtualization '{0}'")]
    Unknown(String),
    /// The backend exists but cannot run here; its reason.
    #[error("{0}")]
    Unavailable(String),
}

impl Runtime {
    /// Starts deploying an instance in the background; progress arrives as events.
    /// An undeploy issued before the deploy started cancels it.
    pub fn deploy(self: &Arc<Self>, spec: ServiceSpec, instance_number: u32) -> tokio::task::JoinHandle<()> {
        let generation = self.next_gen.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().insert(instance_key(&spec.service_id, instance_number), generation);
        let me = self.clone();
        tokio::spawn(async move { me.deploy_gen(spec, instance_number, generation).await })
    }

    /// Cancels a deploy of this instance that has not started yet (call it, in message order, when
    /// an undeploy arrives; [`Runtime::undeploy`] calls it too).
    pub fn cancel_pending(&self, service_id: &str, n: u32) {
        let _map = self.instances.lock();
        self.pending.lock().remove(&instance_key(service_id, n));
    }

    /// The backend running `virtualization` (empty: containers).
    fn backend_for(&self, virtualization: &str) -> Result<Arc<dyn Backend>, NoBackend> {
        let name = if virtualization.is_empty() { "container" } else { virtualization };
        let b = self
            .backends
            .iter()
            .find(|b| b.virtualization() == name)
            .ok_or_else(|| NoBackend::Unknown(virtualization.to_string()))?;
        match b.unavailable() {
            Some(why) => Err(NoBackend::Unavailable(why)),
            None => Ok(b.clone()),
        }
    }

    /// Files the instance if this deploy is still wanted (not cancelled, not superseded) and the
    /// instance is not already here; otherwise says so and returns false.
    fn admit(&self, spec: &ServiceSpec, n: u32, generation: u64, backend: Option<Arc<dyn Backend>>) -> bool {
        let key = instance_key(&spec.service_id, n);
        let id = instance_id(&spec.job_name, n);
        let mut map = self.instances.lock();
        {
            let mut pending = self.pending.lock();
            if pending.get(&key) != Some(&generation) {
                info!(instance = %id, "deploy cancelled or superseded before it started");
                return false;
            }
            pending.remove(&key);
        }
        if let Some(existing) = map.get(&key) {
            // The NodeEngine never reports NODE_SCHEDULED: placed here means creating or running.
            if existing.status.status.parse::<InstanceState>().is_ok_and(InstanceState::is_placed) {
                info!(instance = %id, status = %existing.status.status, "deploy of an instance already here: ignored");
                let st = existing.status.clone();
                drop(map);
                let _ = self.events.send(st);
                return false;
            }
        }
        let mut inst = Instance::new(id, spec.job_name.clone(), &spec.service_id, n, backend);
        inst.one_shot = spec.one_shot;
        inst.memory_mb = spec.memory_mb;
        map.insert(key, inst);
        true
    }

    pub(super) async fn deploy_gen(self: &Arc<Self>, spec: ServiceSpec, n: u32, generation: u64) {
        let id = instance_id(&spec.job_name, n);
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        let backend = self.backend_for(&spec.virtualization);
        if !self.admit(&spec, n, generation, backend.as_ref().ok().cloned()) {
            return;
        }
        self.emit(&spec.service_id, n, InstanceState::Creating, format!("creating {id}"), None);
        let backend = match backend {
            Ok(b) => b,
            Err(e) => return self.emit(&spec.service_id, n, InstanceState::Failed, e.to_string(), None),
        };
        let interrupted = match self.journal.begin(&id) {
            Ok(k) => k,
            Err(e) => return self.emit(&spec.service_id, n, InstanceState::Failed, format!("{e:#}"), None),
        };
        if interrupted >= journal::MAX_INTERRUPTED {
            self.journal.end(&id);
            let why = format!(
                "not deployed again: the NodeEngine stopped during the last {interrupted} deploys of {id} (see its \
                 log for what it was doing); deploy it anew to try once more"
            );
            tracing::error!(instance = %id, "{why}");
            return self.emit(&spec.service_id, n, InstanceState::Failed, why, None);
        }
        let sid = spec.service_id.clone();
        let r = self.deploy_backend(backend.as_ref(), spec, n, &id).await;
        // the deploy is over before anyone hears of it
        self.journal.end(&id);
        match r {
            Ok(()) => {
                self.emit(&sid, n, InstanceState::Running, String::new(), None);
                self.spawn_monitor(backend, sid, n, id);
            }
            // an undeploy waits for this deploy and reports the instance's end
            Err(detail) if self.is_undeploying(&sid, n) => info!(instance = %id, "deploy ended by undeploy: {detail}"),
            Err(detail) => self.emit(&sid, n, InstanceState::Failed, detail, None),
        }
    }

    /// Checks the image path, then creates and starts the instance on `backend`; the reason it failed
    /// otherwise (nothing of it is left then).
    async fn deploy_backend(&self, backend: &dyn Backend, spec: ServiceSpec, n: u32, id: &str) -> Result<(), String> {
        let mut spec = spec;
        if let Some(path) = image::local_image_path(&spec.virtualization, &spec.code) {
            match image::check_image_path(&path, &self.cfg.image_dirs) {
                // read from where the check looked, not through a link that could change meanwhile
                Ok(real) if spec.virtualization == "unikernel" => spec.code = real.display().to_string(),
                Ok(real) => spec.code = format!("archive:{}", real.display()),
                Err(e) => return Err(e.to_string()),
            }
        }
        // Leftovers of an earlier instance with the same id (crash, failed instance redeployed).
        backend.delete(id).await;
        if let Err(e) = self.create_and_start(backend, &spec, n, id).await {
            let detail = format!("{e:#}");
            backend.delete(id).await;
            return Err(detail);
        }
        Ok(())
    }

    async fn create_and_start(
        &self,
        backend: &dyn Backend,
        spec: &ServiceSpec,
        n: u32,
        id: &str,
    ) -> anyhow::Result<()> {
        let sid = &spec.service_id;
        let created = backend.create(spec, n, id).await?;
        if let Some(pid) = created.pid {
            self.update(sid, n, |i| i.pid = pid);
        }
        self.emit(sid, n, InstanceState::Created, created.detail, None);
        if let (Some(pid), Some(nm)) = (created.pid, &self.netmanager) {
            let ans = nm
                .deploy(&DeployRequest {
                    pid,
                    service_name: spec.job_name.clone(),
                    service_id: sid.clone(),
                    instance_number: n,
                    port_mappings: spec.port.clone(),
                })
                .await?;
            self.update(sid, n, |i| {
                i.status.ns_address = ans.ns_address.clone();
                i.status.ns_address_v6 = ans.ns_address_v6.clone();
            });
            backend.remember_ns_address(id, &ans.ns_address).await;
        }
        let pid = backend.start(spec, n, id).await?;
        self.update(sid, n, |i| i.pid = pid);
        Ok(())
    }
}
