//! Thin wrapper over containerd's gRPC API (namespace + lease metadata, images, snapshots, tasks).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use containerd_client::services::v1 as cs;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor, Mount, Platform};
use containerd_client::Client;
use serde_json::Value;
use tonic::{Code, Request};
use tracing::info;

use super::image::{self, ImageSource, ImportPlan};
use super::oci;
use super::registry;
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
    client: std::sync::Arc<Client>,
    pub namespace: String,
    pub snapshotter: String,
    /// Set once containerd answered that it has no Transfer service (< 1.7).
    no_transfer: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn is(e: &tonic::Status, c: Code) -> bool {
    e.code() == c
}

fn unique(prefix: &str) -> String {
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

    fn req_lease<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut r = self.req(msg);
        r.metadata_mut().insert("containerd-lease", lease.parse().expect("lease id is ascii"));
        r
    }

    // ------------------------------------------------------------------ content

    async fn content_exists(&self, digest: &str) -> anyhow::Result<bool> {
        match self.client.content().info(self.req(cs::InfoRequest { digest: digest.into() })).await {
            Ok(_) => Ok(true),
            Err(e) if is(&e, Code::NotFound) => Ok(false),
            Err(e) => Err(e).context("content info"),
        }
    }

    async fn write_blob(&self, blob: &image::Blob, lease: &str) -> anyhow::Result<()> {
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

    async fn update_content_labels(&self, digest: &str, labels: &HashMap<String, String>) -> anyhow::Result<()> {
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

    async fn read_blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
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

    pub async fn delete_lease(&self, id: &str) {
        let _ = self.client.leases().delete(self.req(cs::DeleteRequest { id: id.into(), sync: false })).await;
    }

    // ------------------------------------------------------------------ images

    /// Makes sure the image is present and unpacked; returns what is needed to run it.
    pub async fn ensure_image(&self, code: &str) -> anyhow::Result<ResolvedImage> {
        let lease = self.create_lease().await?;
        let r = self.ensure_image_leased(code, &lease).await;
        self.delete_lease(&lease).await;
        r
    }

    /// Like [`Self::ensure_image`] under a caller-held lease (keep it until the container exists).
    pub async fn ensure_image_leased(&self, code: &str, lease: &str) -> anyhow::Result<ResolvedImage> {
        let name = match image::parse_source(code)? {
            ImageSource::Archive(path) => self.import_archive(&path, lease).await?,
            ImageSource::Reference(r) => {
                if self.get_image(&r).await?.is_none() {
                    self.pull(&r, false, lease).await?;
                }
                r
            }
            ImageSource::HttpReference(r) => {
                if self.get_image(&r).await?.is_none() {
                    self.pull(&r, true, lease).await?;
                }
                r
            }
        };
        let img = self.get_image(&name).await?.with_context(|| format!("image {name} vanished"))?;
        let target = img.target.context("image without target")?;
        self.unpack(&name, &target, lease).await
    }

    async fn get_image(&self, name: &str) -> anyhow::Result<Option<cs::Image>> {
        match self.client.images().get(self.req(cs::GetImageRequest { name: name.into() })).await {
            Ok(r) => Ok(r.into_inner().image),
            Err(e) if is(&e, Code::NotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up image {name}")),
        }
    }

    /// Writes a plan's blobs (children first) into the content store under `lease` and creates or
    /// updates its image record. Shared by archive import and registry pull; `source` names the
    /// origin in the logs.
    async fn store_plan(&self, plan: &ImportPlan, lease: &str, source: &str) -> anyhow::Result<()> {
        let n = plan.blobs.len();
        for (i, b) in plan.blobs.iter().enumerate() {
            self.write_blob(b, lease).await?;
            info!(source, blob = %b.digest, size = b.data.len(), "stored blob {}/{}", i + 1, n);
        }
        let image = cs::Image {
            name: plan.name.clone(),
            target: Some(Descriptor {
                media_type: plan.target_media_type.clone(),
                digest: plan.target_digest.clone(),
                size: plan.target_size,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        match self
            .client
            .images()
            .create(self.req(cs::CreateImageRequest { image: Some(image.clone()), source_date_epoch: None }))
            .await
        {
            Ok(_) => {}
            Err(e) if is(&e, Code::AlreadyExists) => {
                self.client
                    .images()
                    .update(self.req(cs::UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask { paths: vec!["target".into()] }),
                        source_date_epoch: None,
                    }))
                    .await
                    .with_context(|| format!("updating image {}", plan.name))?;
            }
            Err(e) => return Err(e).with_context(|| format!("creating image {}", plan.name)),
        }
        Ok(())
    }

    /// Imports an OCI layout / docker save tar into the content store and creates the image record.
    pub async fn import_archive(&self, path: &Path, lease: &str) -> anyhow::Result<String> {
        info!(archive = %path.display(), "importing image archive");
        let arch = oak_proto::arch::this_machine();
        let p = path.to_path_buf();
        let plan: ImportPlan = tokio::task::spawn_blocking(move || image::plan_import(&p, &arch))
            .await
            .context("import task")?
            .with_context(|| format!("cannot import image archive {}", path.display()))?;
        self.store_plan(&plan, lease, &path.display().to_string()).await?;
        info!(archive = %path.display(), image = %plan.name, "image archive imported");
        Ok(plan.name)
    }

    /// Pulls `reference` (a normalized image name): through containerd's Transfer service when it
    /// has one (containerd >= 1.7) and the registry is reached over HTTPS, with the NodeEngine's own
    /// registry client otherwise (containerd 1.6, plain-HTTP registries).
    async fn pull(&self, reference: &str, plain_http: bool, lease: &str) -> anyhow::Result<()> {
        let mut r = registry::RegistryRef::parse(reference).with_context(|| format!("pulling image {reference}"))?;
        r.explicit_http = plain_http;
        let no_transfer = self.no_transfer.load(std::sync::atomic::Ordering::Relaxed);
        if !r.plain_http() && !no_transfer && self.pull_transfer(reference).await? {
            return Ok(());
        }
        self.pull_native(&r, lease).await.with_context(|| format!("pulling image {reference} failed"))
    }

    /// Pulls with the NodeEngine's OCI distribution client into the content store.
    async fn pull_native(&self, r: &registry::RegistryRef, lease: &str) -> anyhow::Result<()> {
        let name = r.name();
        let arch = oak_proto::arch::this_machine();
        let mut client = registry::RegistryClient::new(r)?;
        info!(image = %name, registry = %r.api_host(), plain_http = r.plain_http(), "pulling image from the registry");
        let m = client.resolve(&arch).await?;
        info!(image = %name, manifest = %m.desc.digest, layers = m.layers.len(), "resolved manifest for linux/{arch}");
        let n = m.layers.len();
        let todo = std::iter::once(("config".to_string(), &m.config))
            .chain(m.layers.iter().enumerate().map(|(i, l)| (format!("layer {}/{n}", i + 1), l)));
        let mut total = 0usize;
        for (what, d) in todo {
            if self.content_exists(&d.digest).await? {
                info!(image = %name, blob = %d.digest, "{what} already in the content store");
                continue;
            }
            let data = client.fetch_blob(d, &what).await?;
            total += data.len();
            info!(image = %name, blob = %d.digest, bytes = data.len(), "downloaded {what}");
            // Written right away (under the lease) so only one layer is held in memory at a time.
            self.write_blob(
                &image::Blob {
                    digest: d.digest.clone(),
                    media_type: d.media_type.clone(),
                    data,
                    labels: HashMap::new(),
                },
                lease,
            )
            .await?;
        }
        // The manifest (with the GC labels tying config and layers to it) and the image record.
        let plan = registry::plan_from_manifest(&name, &m, Vec::new());
        self.store_plan(&plan, lease, &name).await?;
        info!(image = %name, bytes = total, "image pulled");
        Ok(())
    }

    /// Pulls through containerd's Transfer service (containerd >= 1.7); `Ok(false)` if this
    /// containerd has none.
    async fn pull_transfer(&self, reference: &str) -> anyhow::Result<bool> {
        info!(image = reference, "pulling image through containerd's Transfer service");
        let platform =
            Platform { os: "linux".into(), architecture: oak_proto::arch::this_machine(), ..Default::default() };
        let source = containerd_client::types::transfer::OciRegistry { reference: reference.into(), resolver: None };
        let dest = containerd_client::types::transfer::ImageStore {
            name: reference.into(),
            platforms: vec![platform.clone()],
            unpacks: vec![containerd_client::types::transfer::UnpackConfiguration {
                platform: Some(platform),
                snapshotter: self.snapshotter.clone(),
            }],
            ..Default::default()
        };
        let req = cs::TransferRequest {
            source: Some(containerd_client::to_any(&source)),
            destination: Some(containerd_client::to_any(&dest)),
            options: None,
        };
        match self.client.transfer().transfer(self.req(req)).await {
            Ok(_) => Ok(true),
            Err(e) if is(&e, Code::Unimplemented) => {
                self.no_transfer.store(true, std::sync::atomic::Ordering::Relaxed);
                info!(
                    image = reference,
                    "containerd has no Transfer service (< 1.7): pulling with the NodeEngine's registry client"
                );
                Ok(false)
            }
            Err(e) => bail!(
                "pulling image {reference} failed: {} (is the registry reachable and the reference right?)",
                e.message()
            ),
        }
    }

    /// Resolves manifest + config and unpacks the layers into snapshots.
    async fn unpack(&self, name: &str, target: &Descriptor, lease: &str) -> anyhow::Result<ResolvedImage> {
        let arch = oak_proto::arch::this_machine();
        let mut desc = target.clone();
        if image::is_index(&desc.media_type) {
            let idx: oci::Index =
                serde_json::from_slice(&self.read_blob(&desc.digest).await?).context("image index is not JSON")?;
            let m = oci::select(&idx.manifests, &arch).with_context(|| format!("image {name}"))?;
            let media_type = if m.media_type.is_empty() { image::MT_OCI_MANIFEST } else { &m.media_type };
            desc = Descriptor {
                media_type: media_type.into(),
                digest: m.digest.clone(),
                size: m.size,
                annotations: HashMap::new(),
            };
        }
        let manifest: oci::Manifest =
            serde_json::from_slice(&self.read_blob(&desc.digest).await?).context("image manifest is not JSON")?;
        let config_digest = manifest.config.digest.clone();
        let config_bytes = self.read_blob(&config_digest).await?;
        let config_doc: oci::Config = serde_json::from_slice(&config_bytes).context("image config is not JSON")?;
        let a = &config_doc.architecture;
        if !a.is_empty() && oak_proto::arch::normalize(a) != arch {
            bail!("image {name} is built for {a}, this worker is {arch}");
        }
        let config = ImageConfig::from_image_json(&config_bytes)?;
        let diff_ids = config_doc.rootfs.diff_ids;
        let layers = manifest.layers;
        if layers.len() != diff_ids.len() || layers.is_empty() {
            bail!("image {name}: {} layers but {} diff_ids in its config", layers.len(), diff_ids.len());
        }
        let chains = image::chain_ids(&diff_ids);
        let mut sn = self.client.snapshots();
        for (i, layer) in layers.iter().enumerate() {
            let chain = &chains[i];
            let exists = sn
                .stat(self.req(snap::StatSnapshotRequest { snapshotter: self.snapshotter.clone(), key: chain.clone() }))
                .await
                .is_ok();
            if exists {
                continue;
            }
            let key = unique(&format!("extract-{chain}"));
            let parent = if i == 0 { String::new() } else { chains[i - 1].clone() };
            let mounts = sn
                .prepare(self.req_lease(
                    snap::PrepareSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
                .with_context(|| format!("preparing snapshot for layer {i}"))?
                .into_inner()
                .mounts;
            let media_type = if layer.media_type.is_empty() { image::MT_OCI_LAYER } else { &layer.media_type };
            let ld = Descriptor {
                media_type: media_type.into(),
                digest: layer.digest.clone(),
                size: layer.size,
                annotations: HashMap::new(),
            };
            info!(image = name, layer = %ld.digest, "unpacking layer {}/{}", i + 1, layers.len());
            let applied = self
                .client
                .diff()
                .apply(self.req_lease(
                    cs::ApplyRequest { diff: Some(ld.clone()), mounts, payloads: HashMap::new(), sync_fs: false },
                    lease,
                ))
                .await;
            if let Err(e) = applied {
                let _ = sn
                    .remove(
                        self.req(snap::RemoveSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            key: key.clone(),
                        }),
                    )
                    .await;
                return Err(e).with_context(|| format!("unpacking layer {}", ld.digest));
            }
            let commit = sn
                .commit(self.req_lease(
                    snap::CommitSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await;
            match commit {
                Ok(_) => {}
                Err(e) if is(&e, Code::AlreadyExists) => {
                    let _ = sn
                        .remove(self.req(snap::RemoveSnapshotRequest { snapshotter: self.snapshotter.clone(), key }))
                        .await;
                }
                Err(e) => return Err(e).with_context(|| format!("committing snapshot {chain}")),
            }
        }
        let top = chains.last().cloned().unwrap_or_default();
        // Keep the unpacked snapshots alive as long as the image config is.
        let mut labels = HashMap::new();
        labels.insert(format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter), top.clone());
        self.update_content_labels(&config_digest, &labels).await?;
        Ok(ResolvedImage { name: name.into(), config, chain_id: top })
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
