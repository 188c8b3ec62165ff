//! Undeploy: the NetManager unwires the instance, its backend stops and removes it, UNDEPLOYED is
//! reported (also for an instance this worker does not have).

use std::sync::Arc;

use oak_proto::netmanager_api::UndeployRequest;
use oak_proto::v1::InstanceStatus;
use oak_proto::{instance_key, InstanceState};
use tracing::{info, warn};

use super::backend::{Backend, Found};
use super::{Instance, Runtime};

impl Runtime {
    /// Stops and removes an instance; reports UNDEPLOYED.
    pub async fn undeploy(self: &Arc<Self>, service_id: &str, n: u32) -> anyhow::Result<()> {
        let key = instance_key(service_id, n);
        let known = {
            let map = self.instances.lock();
            self.pending.lock().remove(&key);
            map.get(&key).map(|i| (Found { id: i.id.clone(), job_name: i.job_name.clone() }, i.backend.clone()))
        };
        let (found, backend) = match known {
            Some(k) => k,
            // Not in memory (e.g. never adopted): ask the backends.
            None => match self.find(service_id, n).await? {
                Some((found, backend)) => (found, Some(backend)),
                None => {
                    info!(service = service_id, instance = n, "undeploy of an unknown instance");
                    let _ = self.events.send(InstanceStatus {
                        service_id: service_id.into(),
                        instance_number: n,
                        status: InstanceState::Undeployed.as_str().into(),
                        detail: "instance was not running on this worker".into(),
                        timestamp_ms: oak_proto::now_ms(),
                        ..Default::default()
                    });
                    return Ok(());
                }
            },
        };
        let id = found.id;
        // a VM still booting gives up now instead of holding the instance until it answers or times out
        if let Some(b) = &backend {
            if let Some(i) = self.instances.lock().get_mut(&key) {
                i.undeploying = true;
            }
            b.cancel_start(&id);
        }
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        let backend = {
            let mut map = self.instances.lock();
            let e = map
                .entry(key.clone())
                .or_insert_with(|| Instance::new(id.clone(), found.job_name.clone(), service_id, n, backend.clone()));
            e.undeploying = true;
            e.backend.clone()
        };
        if let Some(nm) = &self.netmanager {
            let req =
                UndeployRequest { service_name: found.job_name, service_id: service_id.into(), instance_number: n };
            if let Err(e) = nm.undeploy(&req).await {
                warn!(instance = %id, "{e:#}");
            }
        }
        let pid = self.instances.lock().get(&key).map(|i| i.pid).unwrap_or(0);
        let remaining = match backend {
            Some(b) => b.stop(&id, pid).await,
            None => Ok(()),
        };
        let detail = match &remaining {
            Ok(()) => "stopped and removed".to_string(),
            Err(e) => format!("undeployed, but cleanup incomplete: {e:#}"),
        };
        self.emit(service_id, n, InstanceState::Undeployed, detail, None);
        let _ = std::fs::remove_file(self.log_path(&id));
        self.instances.lock().remove(&key);
        self.ops.lock().remove(&id);
        remaining
    }

    /// An instance this NodeEngine made and does not track, and the backend that has it.
    async fn find(&self, service_id: &str, n: u32) -> anyhow::Result<Option<(Found, Arc<dyn Backend>)>> {
        for b in &self.backends {
            if let Some(found) = b.find(service_id, n).await? {
                return Ok(Some((found, b.clone())));
            }
        }
        Ok(None)
    }
}
