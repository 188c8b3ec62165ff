//! Shared helpers for the integration tests: skip conditions, a local busybox OCI image, runtimes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oak_node_engine::runtime::{Runtime, RuntimeConfig};
use oak_proto::v1::{InstanceStatus, ServiceSpec};
use serde_json::json;
use tokio::sync::mpsc;

pub const SOCKET: &str = "/run/containerd/containerd.sock";
pub use oak_node_engine::testimage::BUSYBOX;

/// Why the containerd tests cannot run here (None = they can).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new(SOCKET).exists() {
        return Some(format!("no containerd socket at {SOCKET} (start containerd)"));
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

/// Writes an OCI image layout tar named `name`; returns its path.
pub fn build_busybox_image(dir: &Path, name: &str) -> PathBuf {
    oak_node_engine::testimage::build_busybox_image(dir, name).expect("build the busybox image")
}

use oak_node_engine::testimage::{append_dir, append_file, append_symlink, digest};

/// Writes a `docker save`-style archive (manifest.json + config + layer tar) tagged `repo_tag`.
pub fn build_busybox_docker_archive(dir: &Path, repo_tag: &str) -> PathBuf {
    let mut layer = tar::Builder::new(Vec::new());
    append_dir(&mut layer, "bin").unwrap();
    let bb = std::fs::read(BUSYBOX).expect("read busybox");
    append_file(&mut layer, "bin/busybox", &bb, 0o755).unwrap();
    append_symlink(&mut layer, "bin/sh", "busybox").unwrap();
    let layer = layer.into_inner().unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": oak_proto::arch::this_machine(),
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
    append_file(&mut out, "manifest.json", &manifest, 0o644).unwrap();
    append_file(&mut out, "cfg.json", &config, 0o644).unwrap();
    append_dir(&mut out, "abc").unwrap();
    append_file(&mut out, "abc/layer.tar", &layer, 0o644).unwrap();
    let path = dir.join("busybox-docker.tar");
    std::fs::write(&path, out.into_inner().unwrap()).unwrap();
    path
}

/// A unique-enough suffix for names in containerd.
pub fn unique(tag: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{tag}{}x{}", std::process::id(), t % 1_000_000_007)
}

/// The NetManager credential written into every test environment.
pub const NM_CREDENTIAL: &str = "test-netmanager-credential";

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
        // the NetManager credential the runtime sends (tests with a NetManager check it arrives)
        std::fs::write(dir.path().join("nm-api-token"), NM_CREDENTIAL).unwrap();
        Env { dir, namespace, image_name, archive }
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
            netmanager_credential: self.dir.path().join("nm-api-token"),
            unikernel: false,
            microvm_kernel: None,
            vm_accel: Default::default(),
            stop_grace: Duration::from_secs(3),
            vm_answer_timeout: Duration::from_secs(180),
            image_dirs: vec![self.dir.path().to_path_buf()],
        }
    }

    pub async fn runtime(&self) -> (Arc<Runtime>, mpsc::UnboundedReceiver<InstanceStatus>) {
        Runtime::connect(self.runtime_config()).await.expect("runtime connects to containerd")
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
        rt.containerd().delete_image_sync(&self.image_name, true).await.expect("delete test image");
        if let Err(e) = rt.containerd().delete_namespace().await.map_err(|e| format!("{e:#}")) {
            if e.contains("not found") {
                return;
            }
            eprintln!("note: namespace {} not removed: {e:#}", self.namespace);
        }
    }
}

impl Drop for Env {
    /// What a failed test left running: its VMs outlive their runtime by design.
    fn drop(&mut self) {
        testbed::stop_vms_under(self.dir.path());
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
            .unwrap_or_else(|_| panic!("timeout waiting for {wanted:?} of {service_id}; seen {seen:?}"))
            .expect("runtime event channel open");
        if st.service_id != service_id {
            continue;
        }
        seen.push(st.status.clone());
        if wanted.contains(&st.status.as_str()) {
            return st;
        }
        if matches!(st.status.as_str(), "FAILED" | "DEAD" | "COMPLETED" | "UNDEPLOYED") {
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
    assert!(c.get_task(id).await.unwrap().is_none(), "task {id} left behind");
    assert!(c.get_container(id).await.unwrap().is_none(), "container {id} left behind");
    assert!(!c.snapshot_exists(id).await.unwrap(), "snapshot {id} left behind");
}

/// HTTP GET of 127.0.0.1:`port``path` from inside the network namespace of `pid` (busybox wget
/// segfaults on this host).
pub async fn http_get_in_netns(pid: u32, port: u16, path: &str) -> Result<String, String> {
    let path = path.to_string();
    let ns = format!("/proc/{pid}/ns/net");
    let get = move || -> Result<String, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        if !resp.starts_with("HTTP/1.") || !resp.contains(" 200 ") {
            return Err(format!("bad answer: {resp}"));
        }
        Ok(resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    };
    tokio::task::spawn_blocking(move || testbed::in_netns(&ns, get).map_err(|e| format!("{e:#}"))?)
        .await
        .map_err(|e| e.to_string())?
}

/// [`http_get_in_netns`] until it answers, for up to 5 s (poll: listening has no signal to wait on);
/// the last error when it never does.
pub async fn wait_http_in_netns(pid: u32, port: u16, path: &str) -> Result<String, String> {
    let mut body = Err(String::new());
    for _ in 0..50 {
        body = http_get_in_netns(pid, port, path).await;
        if body.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    body
}
