//! Containers on containerd: an image unpacked into a rootfs snapshot, a container record
//! labelled with the instance it is (so a restarted NodeEngine finds it), a runc task.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use containerd_client::services::v1::Container;
use containerd_client::types::v1::Status;
use containerd_client::types::Mount;
use oak_proto::v1::ServiceSpec;
use oak_proto::{instance_key, InstanceState};
use tracing::{info, warn};

use super::{Adopted, Backend, Created, Exit, Found, Record, Resumed};
use crate::runtime::containerd::Containerd;
use crate::runtime::logs::Logs;
use crate::runtime::{cgroup, spec};

pub const LABEL_MANAGED: &str = "oakestra.io/managed";
pub const LABEL_SERVICE_ID: &str = "oakestra.io/service-id";
pub const LABEL_INSTANCE: &str = "oakestra.io/instance-number";
pub const LABEL_JOB: &str = "oakestra.io/job-name";
pub const LABEL_ONE_SHOT: &str = "oakestra.io/one-shot";
pub const LABEL_MEMORY_MB: &str = "oakestra.io/memory-mb";
pub const LABEL_NS_ADDRESS: &str = "oakestra.io/ns-address";

/// Runs `container` instances on containerd.
pub struct ContainerBackend {
    ctr: Containerd,
    logs: Logs,
    stop_grace: Duration,
}

fn label<'a>(c: &'a Container, key: &str) -> Option<&'a str> {
    c.labels.get(key).map(String::as_str)
}

impl ContainerBackend {
    pub fn new(ctr: Containerd, logs: Logs, stop_grace: Duration) -> Self {
        Self { ctr, logs, stop_grace }
    }

    fn cgroups_path(&self, id: &str) -> String {
        cgroup::path(&self.ctr.namespace, id)
    }

    /// Image, rootfs snapshot and container record; returns the image's chain id and rootfs mounts.
    async fn create_container(
        &self,
        spec: &ServiceSpec,
        n: u32,
        id: &str,
        lease: &str,
    ) -> anyhow::Result<(String, Vec<Mount>)> {
        let img = self
            .ctr
            .ensure_image_leased(&spec.code, lease)
            .await
            .map_err(|e| anyhow!("image '{}' unavailable: {e:#}", spec.code))?;
        let oci = spec::build_spec(id, &img.config, spec, &self.cgroups_path(id));
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_SERVICE_ID.to_string(), spec.service_id.clone()),
            (LABEL_INSTANCE.to_string(), n.to_string()),
            (LABEL_JOB.to_string(), spec.job_name.clone()),
            (LABEL_ONE_SHOT.to_string(), spec.one_shot.to_string()),
            (LABEL_MEMORY_MB.to_string(), spec.memory_mb.to_string()),
        ]);
        let mounts = self.ctr.prepare_rootfs(id, &img.chain_id, Some(lease)).await?;
        self.ctr.create_container(id, &img.name, &oci, labels, lease).await?;
        Ok((img.chain_id, mounts))
    }

    /// SIGKILL, then delete task, container and snapshot.
    async fn remove_now(&self, id: &str) -> anyhow::Result<()> {
        if self.ctr.get_task(id).await?.is_some() {
            self.ctr.kill_task(id, libc::SIGKILL as u32).await?;
            let _ = tokio::time::timeout(Duration::from_secs(10), self.ctr.wait_task(id)).await;
            self.ctr.delete_task(id).await?;
        }
        self.remove_record(id).await
    }

    async fn remove_record(&self, id: &str) -> anyhow::Result<()> {
        self.ctr.delete_container(id).await?;
        self.ctr.remove_snapshot(id).await
    }

    /// Ours (labelled managed) and the instance it is.
    fn instance_of(c: &Container) -> Option<(String, u32)> {
        if label(c, LABEL_MANAGED) != Some("true") {
            return None;
        }
        let n = label(c, LABEL_INSTANCE)?.parse().ok()?;
        Some((label(c, LABEL_SERVICE_ID).unwrap_or_default().to_string(), n))
    }
}

#[async_trait]
impl Backend for ContainerBackend {
    fn virtualization(&self) -> &'static str {
        "container"
    }

    async fn create(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<Created> {
        // The lease keeps image, unpacked layers and the new rootfs snapshot safe from containerd's
        // garbage collector until the container references them.
        let lease = self.ctr.create_lease().await?;
        let created = self.create_container(spec, n, id, &lease).await;
        self.ctr.delete_lease(&lease).await;
        let (chain_id, mut mounts) = created?;
        let log = self.logs.path(id);
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
        Ok(Created { pid: Some(pid), detail: format!("task pid {pid}") })
    }

    async fn remember_ns_address(&self, id: &str, ns_address: &str) {
        let _ = self.ctr.set_container_label(id, LABEL_NS_ADDRESS, ns_address).await;
    }

    async fn start(&self, _spec: &ServiceSpec, _n: u32, id: &str) -> anyhow::Result<u32> {
        self.ctr.start_task(id).await
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Exit> {
        match self.ctr.wait_task(id).await {
            Ok(code) => Ok(Exit::Code(code)),
            Err(e) if e.code() == tonic::Code::NotFound => Ok(Exit::Ended {
                state: InstanceState::Dead,
                detail: format!("task {id} disappeared from containerd"),
                exit_code: None,
            }),
            Err(e) => Err(anyhow!("{}", e.message())),
        }
    }

    async fn stop(&self, id: &str, _pid: u32) -> anyhow::Result<()> {
        if let Some(p) = self.ctr.get_task(id).await? {
            let live = [Status::Running, Status::Paused, Status::Created];
            if live.iter().any(|s| p.status == *s as i32) {
                self.ctr.kill_task(id, libc::SIGTERM as u32).await?;
                let waited = tokio::time::timeout(self.stop_grace, self.ctr.wait_task(id)).await;
                if waited.is_err() {
                    info!(instance = id, grace = ?self.stop_grace, "no exit after SIGTERM: SIGKILL");
                    self.ctr.kill_task(id, libc::SIGKILL as u32).await?;
                    let _ = tokio::time::timeout(Duration::from_secs(10), self.ctr.wait_task(id)).await;
                }
            }
            self.ctr.delete_task(id).await?;
        }
        self.remove_record(id).await
    }

    async fn delete(&self, id: &str) {
        if let Err(e) = self.remove_now(id).await {
            warn!(instance = id, "cleanup: {e:#}");
        }
    }

    fn memory_usage(&self, id: &str, _pid: u32) -> Option<u64> {
        cgroup::memory_usage(&self.cgroups_path(id))
    }

    fn cpu_time_us(&self, id: &str, _pid: u32) -> Option<u64> {
        cgroup::cpu_time_us(&self.cgroups_path(id))
    }

    fn oom_kills(&self, id: &str) -> Option<u64> {
        cgroup::oom_kills(&self.cgroups_path(id))
    }

    async fn find(&self, service_id: &str, n: u32) -> anyhow::Result<Option<Found>> {
        let found = self
            .ctr
            .list_containers()
            .await?
            .into_iter()
            .find(|c| Self::instance_of(c).is_some_and(|(sid, i)| sid == service_id && i == n));
        Ok(found.map(|c| Found { job_name: label(&c, LABEL_JOB).unwrap_or_default().to_string(), id: c.id }))
    }

    async fn adopt(&self, known: &HashSet<String>) -> anyhow::Result<Vec<Adopted>> {
        let mut out = Vec::new();
        for c in self.ctr.list_containers().await? {
            let Some((service_id, n)) = Self::instance_of(&c) else {
                continue;
            };
            if known.contains(&instance_key(&service_id, n)) {
                continue;
            }
            let task = self.ctr.get_task(&c.id).await?;
            let state = match &task {
                Some(t) if t.status == Status::Running as i32 => {
                    info!(instance = %c.id, pid = t.pid, "re-adopted running instance");
                    Resumed::Running
                }
                Some(t) if t.status == Status::Stopped as i32 => {
                    info!(instance = %c.id, exit = t.exit_status, "re-adopted exited instance");
                    Resumed::Exited(t.exit_status)
                }
                Some(t) => Resumed::Dead(format!("found in task state {} after NodeEngine restart", t.status)),
                None => Resumed::Dead("container found without a task after NodeEngine restart".into()),
            };
            let record = Record {
                id: c.id.clone(),
                service_id,
                instance_number: n,
                job_name: label(&c, LABEL_JOB).unwrap_or_default().to_string(),
                one_shot: label(&c, LABEL_ONE_SHOT) == Some("true"),
                memory_mb: label(&c, LABEL_MEMORY_MB).and_then(|s| s.parse().ok()).unwrap_or(0),
                pid: task.as_ref().map(|t| t.pid).unwrap_or(0),
            };
            out.push(Adopted {
                record,
                ns_address: label(&c, LABEL_NS_ADDRESS).unwrap_or_default().to_string(),
                state,
            });
        }
        Ok(out)
    }
}
