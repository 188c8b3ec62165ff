//! Thin wrapper over containerd's gRPC API: namespace and lease metadata, content, image records,
//! snapshots, containers and tasks. What to pull, import or unpack is decided in [`super::image`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use containerd_client::services::v1 as cs;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::Mount;
use containerd_client::Client;
use serde_json::Value;
use tonic::{Code, Request};
use tracing::info;

use super::image;
use super::spec::ImageConfig;

pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// An image ready to run: its name, config and the chain id of its unpacked rootfs.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    pub config: ImageConfig,
    pub chain_id: String,
}

#[derive(Clone)]
pub struct Containerd {
    pub(crate) client: std::sync::Arc<Client>,
    pub namespace: String,
    pub snapshotter: String,
    /// Set once containerd answered that it has no Transfer service (< 1.7).
    pub(crate) no_transfer: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub(crate) fn is(e: &tonic::Status, c: Code) -> bool {
    e.code() == c
}

pub(crate) fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{prefix}-{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl Containerd {
    /// Connects to the socket and checks that containerd answers.
    pub async fn connect(socket: &Path, namespace: &str) -> anyhow::Result<Self> {
        if !socket.exists() {
            bail!("containerd socket {} does not exist", socket.display());
        }
        let client = Client::from_path(socket)
            .await
            .with_context(|| format!("cannot connect to containerd at {}", socket.display()))?;
        let c = Self {
            client: std::sync::Arc::new(client),
            no_transfer: Default::default(),
            namespace: namespace.into(),
            snapshotter: "overlayfs".into(),
        };
        let v = c
            .client
            .version()
            .version(())
            .await
            .with_context(|| format!("containerd at {} does not answer", socket.display()))?
            .into_inner();
        info!(version = %v.version, socket = %socket.display(), namespace, "connected to containerd");
        Ok(c)
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", self.namespace.parse().expect("namespace is ascii"));
        r
    }

    pub(crate) fn req_lease<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut r = self.req(msg);
        r.metadata_mut().insert("containerd-lease", lease.parse().expect("lease id is ascii"));
        r
    }

    // ------------------------------------------------------------------ content

    pub(crate) async fn content_exists(&self, digest: &str) -> anyhow::Result<bool> {
        match self.client.content().info(self.req(cs::InfoRequest { digest: digest.into() })).await {
            Ok(_) => Ok(true),
            Err(e) if is(&e, Code::NotFound) => Ok(false),
            Err(e) => Err(e).context("content info"),
        }
    }

    pub(crate) async fn write_blob(&self, blob: &image::Blob, lease: &str) -> anyhow::Result<()> {
        // the lease holds the blob whether we write it or it is there already: a garbage collection (an
        // image of this namespace removed meanwhile) must not take it before our image refers to it. Added
        // before the existence check, so no collection fits between the two.
        let resource = cs::Resource { id: blob.digest.clone(), r#type: "content".into() };
        self.client
            .leases()
            .add_resource(self.req(cs::AddResourceRequest { id: lease.into(), resource: Some(resource) }))
            .await
            .with_context(|| format!("holding blob {} under lease {lease}", blob.digest))?;
        if self.content_exists(&blob.digest).await? {
            if !blob.labels.is_empty() {
                self.update_content_labels(&blob.digest, &blob.labels).await?;
            }
            return Ok(());
        }
        const CHUNK: usize = 1 << 20;
        let r = unique("oak-ne-write");
        let total = blob.data.len() as i64;
        let mut msgs = Vec::new();
        let mut offset = 0usize;
        loop {
            let end = (offset + CHUNK).min(blob.data.len());
            let last = end == blob.data.len();
            msgs.push(cs::WriteContentRequest {
                action: if last { cs::WriteAction::Commit as i32 } else { cs::WriteAction::Write as i32 },
                r#ref: r.clone(),
                total,
                expected: blob.digest.clone(),
                offset: offset as i64,
                data: blob.data[offset..end].to_vec(),
                labels: if last { blob.labels.clone() } else { HashMap::new() },
            });
            offset = end;
            if last {
                break;
            }
        }
        let stream = futures::stream::iter(msgs);
        let res = self.client.content().write(self.req_lease(stream, lease)).await;
        let mut resp = match res {
            Ok(r) => r.into_inner(),
            Err(e) if is(&e, Code::AlreadyExists) => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("writing blob {}", blob.digest)),
        };
        loop {
            match resp.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if is(&e, Code::AlreadyExists) => break,
                Err(e) => return Err(e).with_context(|| format!("writing blob {}", blob.digest)),
            }
        }
        if !self.content_exists(&blob.digest).await? {
            bail!("containerd did not commit blob {}", blob.digest);
        }
        Ok(())
    }

    pub(crate) async fn update_content_labels(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.client
            .content()
            .update(self.req(cs::UpdateRequest {
                info: Some(cs::Info { digest: digest.into(), labels: labels.clone(), ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .with_context(|| format!("labelling content {digest}"))?;
        Ok(())
    }

    pub(crate) async fn read_blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let mut s = self
            .client
            .content()
            .read(self.req(cs::ReadContentRequest { digest: digest.into(), offset: 0, size: 0 }))
            .await
            .with_context(|| format!("reading blob {digest}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await.with_context(|| format!("reading blob {digest}"))? {
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }

    // ------------------------------------------------------------------ leases

    pub async fn create_lease(&self) -> anyhow::Result<String> {
        let id = unique("oak-ne");
        let mut labels = HashMap::new();
        // containerd's GC drops the lease (and what only it references) after this, should we die.
        labels.insert("containerd.io/gc.expire".into(), rfc3339_in(3600));
        self.client
            .leases()
            .create(self.req(cs::CreateRequest { id: id.clone(), labels }))
            .await
            .context("creating a containerd lease")?;
        Ok(id)
    }

    /// A lease named `id` with no expiry: what it references stays until it is deleted (a microVM's
    /// image and rootfs snapshot, which no container record holds). An existing lease of that name is
    /// kept.
    pub async fn create_named_lease(&self, id: &str) -> anyhow::Result<()> {
        match self.client.leases().create(self.req(cs::CreateRequest { id: id.into(), labels: HashMap::new() })).await {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::AlreadyExists) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("creating containerd lease {id}")),
        }
    }

    pub async fn delete_lease(&self, id: &str) {
        let _ = self.client.leases().delete(self.req(cs::DeleteRequest { id: id.into(), sync: false })).await;
    }

    // ------------------------------------------------------------------ images

    pub async fn get_image(&self, name: &str) -> anyhow::Result<Option<cs::Image>> {
        match self.client.images().get(self.req(cs::GetImageRequest { name: name.into() })).await {
            Ok(r) => Ok(r.into_inner().image),
            Err(e) if is(&e, Code::NotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up image {name}")),
        }
    }

    // ------------------------------------------------------------------ containers & tasks

    pub async fn prepare_rootfs(&self, key: &str, parent: &str, lease: Option<&str>) -> anyhow::Result<Vec<Mount>> {
        let mut sn = self.client.snapshots();
        let req = |m| match lease {
            Some(l) => self.req_lease(m, l),
            None => self.req(m),
        };
        let p = || snap::PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        match sn.prepare(req(p())).await {
            Ok(r) => Ok(r.into_inner().mounts),
            Err(e) if is(&e, Code::AlreadyExists) => {
                self.remove_snapshot(key).await?;
                Ok(sn.prepare(req(p())).await.context("preparing rootfs snapshot")?.into_inner().mounts)
            }
            Err(e) => Err(e).context("preparing rootfs snapshot"),
        }
    }

    pub async fn remove_snapshot(&self, key: &str) -> anyhow::Result<()> {
        match self
            .client
            .snapshots()
            .remove(self.req(snap::RemoveSnapshotRequest { snapshotter: self.snapshotter.clone(), key: key.into() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::NotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing snapshot {key}")),
        }
    }

    pub async fn snapshot_exists(&self, key: &str) -> anyhow::Result<bool> {
        match self
            .client
            .snapshots()
            .stat(self.req(snap::StatSnapshotRequest { snapshotter: self.snapshotter.clone(), key: key.into() }))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is(&e, Code::NotFound) => Ok(false),
            Err(e) => Err(e).context("stat snapshot"),
        }
    }

    pub async fn create_container(
        &self,
        id: &str,
        image: &str,
        spec: &Value,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> anyhow::Result<()> {
        let c = cs::Container {
            id: id.into(),
            labels,
            image: image.into(),
            runtime: Some(cs::container::Runtime { name: RUNC_RUNTIME.into(), options: None }),
            spec: Some(prost_types::Any { type_url: SPEC_TYPE_URL.into(), value: serde_json::to_vec(spec)? }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        self.client
            .containers()
            .create(self.req_lease(cs::CreateContainerRequest { container: Some(c) }, lease))
            .await
            .with_context(|| format!("creating container {id}"))?;
        Ok(())
    }

    pub async fn set_container_label(&self, id: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let mut labels = HashMap::new();
        labels.insert(key.to_string(), value.to_string());
        self.client
            .containers()
            .update(self.req(cs::UpdateContainerRequest {
                container: Some(cs::Container { id: id.into(), labels, ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec![format!("labels.{key}")] }),
            }))
            .await
            .with_context(|| format!("labelling container {id}"))?;
        Ok(())
    }

    pub async fn get_container(&self, id: &str) -> anyhow::Result<Option<cs::Container>> {
        match self.client.containers().get(self.req(cs::GetContainerRequest { id: id.into() })).await {
            Ok(r) => Ok(r.into_inner().container),
            Err(e) if is(&e, Code::NotFound) => Ok(None),
            Err(e) => Err(e).context("get container"),
        }
    }

    pub async fn list_containers(&self) -> anyhow::Result<Vec<cs::Container>> {
        Ok(self
            .client
            .containers()
            .list(self.req(cs::ListContainersRequest { filters: vec![] }))
            .await
            .context("listing containers")?
            .into_inner()
            .containers)
    }

    pub async fn delete_container(&self, id: &str) -> anyhow::Result<()> {
        match self.client.containers().delete(self.req(cs::DeleteContainerRequest { id: id.into() })).await {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::NotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting container {id}")),
        }
    }

    /// Creates the task (stdout+stderr appended to `log`); returns its pid.
    pub async fn create_task(&self, id: &str, rootfs: Vec<Mount>, log: &Path) -> anyhow::Result<u32> {
        let uri = format!("file://{}", log.display());
        let r = self
            .client
            .tasks()
            .create(self.req(cs::CreateTaskRequest {
                container_id: id.into(),
                rootfs,
                stdout: uri.clone(),
                stderr: uri,
                ..Default::default()
            }))
            .await
            .map_err(|e| anyhow::anyhow!("creating task {id}: {}", e.message()))?;
        Ok(r.into_inner().pid)
    }

    pub async fn start_task(&self, id: &str) -> anyhow::Result<u32> {
        let r = self
            .client
            .tasks()
            .start(self.req(cs::StartRequest { container_id: id.into(), exec_id: String::new() }))
            .await
            .map_err(|e| anyhow::anyhow!("starting task {id}: {}", e.message()))?;
        Ok(r.into_inner().pid)
    }

    /// Blocks until the task exits; returns its exit status.
    pub async fn wait_task(&self, id: &str) -> Result<u32, tonic::Status> {
        Ok(self
            .client
            .tasks()
            .wait(self.req(cs::WaitRequest { container_id: id.into(), exec_id: String::new() }))
            .await?
            .into_inner()
            .exit_status)
    }

    /// The task's process (pid, status, exit status), if there is a task.
    pub async fn get_task(&self, id: &str) -> anyhow::Result<Option<containerd_client::types::v1::Process>> {
        match self
            .client
            .tasks()
            .get(self.req(cs::GetRequest { container_id: id.into(), exec_id: String::new() }))
            .await
        {
            Ok(r) => Ok(r.into_inner().process),
            Err(e) if is(&e, Code::NotFound) => Ok(None),
            Err(e) => Err(e).context("get task"),
        }
    }

    pub async fn kill_task(&self, id: &str, signal: u32) -> anyhow::Result<()> {
        match self
            .client
            .tasks()
            .kill(self.req(cs::KillRequest { container_id: id.into(), exec_id: String::new(), signal, all: true }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::NotFound) || is(&e, Code::FailedPrecondition) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("killing task {id}")),
        }
    }

    pub async fn delete_task(&self, id: &str) -> anyhow::Result<()> {
        match self.client.tasks().delete(self.req(cs::DeleteTaskRequest { container_id: id.into() })).await {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::NotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting task {id}")),
        }
    }

    /// Deletes this namespace (only succeeds once it is empty).
    pub async fn delete_namespace(&self) -> anyhow::Result<()> {
        self.client
            .namespaces()
            .delete(Request::new(cs::DeleteNamespaceRequest { name: self.namespace.clone() }))
            .await
            .with_context(|| format!("deleting namespace {}", self.namespace))?;
        Ok(())
    }

    /// Deletes an image record; `sync` waits for the garbage collection it triggers.
    pub async fn delete_image_sync(&self, name: &str, sync: bool) -> anyhow::Result<()> {
        match self
            .client
            .images()
            .delete(self.req(cs::DeleteImageRequest { name: name.into(), sync, target: None }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is(&e, Code::NotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting image {name}")),
        }
    }
}

/// RFC 3339 UTC timestamp `secs` seconds from now.
fn rfc3339_in(secs: u64) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() + secs;
    let days = (t / 86400) as i64;
    let rem = t % 86400;
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let s = super::rfc3339_in(0);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T", "{s}");
    }
}
