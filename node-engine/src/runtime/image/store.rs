//! Getting an image into containerd: what to import (an archive's plan) or pull (registry, or
//! containerd's Transfer service when it has one), storing the blobs under a lease and unpacking
//! the layers into snapshots. The containerd calls themselves are in [`crate::runtime::containerd`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use containerd_client::services::v1 as cs;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor, Platform};
use tonic::Code;
use tracing::info;

use super::{ImageSource, ImportPlan};
use crate::runtime::containerd::{is, unique, Containerd, ResolvedImage};
use crate::runtime::image;
use crate::runtime::oci;
use crate::runtime::registry;
use crate::runtime::spec::ImageConfig;

impl Containerd {
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
}
