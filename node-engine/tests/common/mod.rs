//! Shared helpers for the integration tests: skip conditions, a local busybox OCI image, runtimes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oak_node_engine::runtime::{Runtime, RuntimeConfig};
use oak_proto::v1::{InstanceStatus, ServiceSpec};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

pub const SOCKET: &str = "/run/containerd/containerd.sock";
pub const BUSYBOX: &str = "/bin/busybox";

/// Why the containerd tests cannot run here (None = they can).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new(SOCKET).exists() {
        return Some(format!(
            "no containerd socket at {SOCKET} (start containerd)"
        ));
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} missing (install busybox-static)"));
    }
    None
}

#[macro_export]
macro_rules! require_containerd {
    () => {
        if let Some(reason) = common::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn append_file(t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    t.append_data(&mut h, path, data).unwrap();
}

fn append_dir(t: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    t.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn append_symlink(t: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(0);
    t.append_link(&mut h, path, target).unwrap();
}

/// Writes an OCI image layout tar (single layer: busybox + applet symlinks + /www/index.html)
/// named `name`; returns its path.
pub fn build_busybox_image(dir: &Path, name: &str) -> PathBuf {
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "www", "tmp", "etc", "proc", "sys", "dev", "run"] {
        append_dir(&mut layer, d);
    }
    let bb = std::fs::read(BUSYBOX).expect("read busybox");
    append_file(&mut layer, "bin/busybox", &bb, 0o755);
    for applet in ["sh", "httpd", "sleep", "wget", "echo", "cat", "ls"] {
        append_symlink(&mut layer, &format!("bin/{applet}"), "busybox");
    }
    append_file(&mut layer, "www/index.html", b"hello-oak", 0o644);
    let layer = layer.into_inner().unwrap();
    let layer_digest = digest(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": oak_node_engine::metrics::go_arch(std::env::consts::ARCH),
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "IMAGE_VAR=from-image"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name},
        }],
    }))
    .unwrap();

    let mut out = tar::Builder::new(Vec::new());
    append_file(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    );
    append_file(&mut out, "index.json", &index, 0o644);
    for (d, data) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        append_file(
            &mut out,
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            data,
            0o644,
        );
    }
    let path = dir.join("busybox-oci.tar");
    std::fs::write(&path, out.into_inner().unwrap()).unwrap();
    path
}

/// Writes a `docker save`-style archive (manifest.json + config + layer tar) tagged `repo_tag`.
pub fn build_busybox_docker_archive(dir: &Path, repo_tag: &str) -> PathBuf {
    let mut layer = tar::Builder::new(Vec::new());
    append_dir(&mut layer, "bin");
    let bb = std::fs::read(BUSYBOX).expect("read busybox");
    append_file(&mut layer, "bin/busybox", &bb, 0o755);
    append_symlink(&mut layer, "bin/sh", "busybox");
    let layer = layer.into_inner().unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": oak_node_engine::metrics::go_arch(std::env::consts::ARCH),
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM=docker"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo default"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!([
        {"Config": "cfg.json", "RepoTags": [repo_tag], "Layers": ["abc/layer.tar"]}
    ]))
    .unwrap();
    let mut out = tar::Builder::new(Vec::new());
    append_file(&mut out, "manifest.json", &manifest, 0o644);
    append_file(&mut out, "cfg.json", &config, 0o644);
    append_dir(&mut out, "abc");
    append_file(&mut out, "abc/layer.tar", &layer, 0o644);
    let path = dir.join("busybox-docker.tar");
    std::fs::write(&path, out.into_inner().unwrap()).unwrap();
    path
}

/// A unique-enough suffix for names in containerd.
pub fn unique(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}{}x{}", std::process::id(), t % 1_000_000_007)
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub namespace: String,
    pub image_name: String,
    pub archive: PathBuf,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let u = unique(tag);
        let namespace = format!("oak-ne-test-{u}");
        let image_name = format!("import.local/oak-ne-test/{u}:latest");
        let archive = build_busybox_image(dir.path(), &image_name);
        Env {
            dir,
            namespace,
            image_name,
            archive,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            containerd_socket: SOCKET.into(),
            namespace: self.namespace.clone(),
            data_dir: self.data_dir(),
            netmanager_port: 0,
            unikernel: false,
            stop_grace: Duration::from_secs(3),
        }
    }

    pub async fn runtime(&self) -> (Arc<Runtime>, mpsc::UnboundedReceiver<InstanceStatus>) {
        Runtime::connect(self.runtime_config())
            .await
            .expect("runtime connects to containerd")
    }

    pub fn spec(&self, service_id: &str, cmd: &[&str]) -> ServiceSpec {
        ServiceSpec {
            service_id: service_id.into(),
            job_name: format!("test.{}.{service_id}.x", self.namespace.replace('-', "")),
            virtualization: "container".into(),
            code: format!("oci-archive:{}", self.archive.display()),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Removes the test image (synchronously garbage-collected) and the test namespace.
    pub async fn cleanup(&self, rt: &Runtime) {
        rt.containerd()
            .delete_image_sync(&self.image_name, true)
            .await
            .expect("delete test image");
        if let Err(e) = rt
            .containerd()
            .delete_namespace()
            .await
            .map_err(|e| format!("{e:#}"))
        {
            if e.contains("not found") {
                return;
            }
            eprintln!("note: namespace {} not removed: {e:#}", self.namespace);
        }
    }
}

/// Next status of `service_id` whose state is one of `wanted` (others are collected in `seen`).
/// Panics on timeout or on an unexpected terminal state.
pub async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<InstanceStatus>,
    service_id: &str,
    wanted: &[&str],
    seen: &mut Vec<String>,
) -> InstanceStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let st = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("timeout waiting for {wanted:?} of {service_id}; seen {seen:?}")
            })
            .expect("runtime event channel open");
        if st.service_id != service_id {
            continue;
        }
        seen.push(st.status.clone());
        if wanted.contains(&st.status.as_str()) {
            return st;
        }
        if matches!(
            st.status.as_str(),
            "FAILED" | "DEAD" | "COMPLETED" | "UNDEPLOYED"
        ) {
            panic!(
                "{service_id} reached {} ({}) while waiting for {wanted:?}; logs: {}",
                st.status, st.detail, st.logs
            );
        }
    }
}

/// Asserts that task, container and rootfs snapshot of `id` are gone.
pub async fn assert_gone(rt: &Runtime, id: &str) {
    let c = rt.containerd();
    assert!(
        c.get_task(id).await.unwrap().is_none(),
        "task {id} left behind"
    );
    assert!(
        c.get_container(id).await.unwrap().is_none(),
        "container {id} left behind"
    );
    assert!(
        !c.snapshot_exists(id).await.unwrap(),
        "snapshot {id} left behind"
    );
}
