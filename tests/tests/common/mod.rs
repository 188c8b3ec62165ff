//! What several end-to-end tests start the same way: a 1-DOC stack (root, cluster, NetManager, NodeEngine
//! on real containerd) on one host.
// each test binary that includes this module uses a part of it
#![allow(dead_code)]

use std::path::Path;

use serde_json::json;
use testbed::{bin, Host, Proc};

/// The Admin password of the stack's root.
pub const ADMIN_PASSWORD: &str = "pw";

/// A running 1-DOC stack; its processes stop when it is dropped.
pub struct OneDoc {
    pub root: Proc,
    pub cluster: Proc,
    pub netmanager: Proc,
    pub nodeengine: Proc,
    /// The NodeEngine's arguments (to start it again).
    pub ne_args: Vec<String>,
}

/// Starts root, cluster ("doc", reporting every second), NetManager and NodeEngine ("doc-worker", instances
/// in containerd namespace `ctr_ns`, local image archives from `dir`) on `h`, their state under `dir`.
pub fn start(h: &Host, dir: &Path, ctr_ns: &str) -> OneDoc {
    start_with(h, dir, ctr_ns, &[], &[])
}

/// [`start`] with more NetManager arguments (e.g. `--no-ebpf`) and NodeEngine arguments (e.g. `-u=true`).
pub fn start_with(h: &Host, dir: &Path, ctr_ns: &str, more_nm_args: &[&str], more_ne_args: &[&str]) -> OneDoc {
    start_full(h, dir, ctr_ns, &[], more_nm_args, more_ne_args)
}

/// [`start_with`] with more cluster orchestrator arguments (e.g. `--redeploy-after-ms`).
pub fn start_full(
    h: &Host,
    dir: &Path,
    ctr_ns: &str,
    more_cluster_args: &[&str],
    more_nm_args: &[&str],
    more_ne_args: &[&str],
) -> OneDoc {
    let p = |s: &str| dir.join(s).display().to_string();
    let root = h
        .spawn(
            "root",
            &bin("root-orchestrator"),
            // the dashboard, when a test starts one, runs here and names each browser on logins
            &["--data-dir", &p("root"), "--report-interval-ms", "1000", "--trusted-proxy", "127.0.0.1"],
            &[("OAK_ADMIN_PASSWORD", ADMIN_PASSWORD)],
        )
        .unwrap();
    let cluster = h
        .spawn(
            "cluster",
            &bin("cluster-orchestrator"),
            &[&["--data-dir", &p("cluster"), "--heartbeat-interval-ms", "500"][..], more_cluster_args].concat(),
            &[("CLUSTER_NAME", "doc"), ("CLUSTER_LOCATION", "48.26,11.67,100")],
        )
        .unwrap();
    let w = start_worker(h, dir, dir, "doc-worker", "127.0.0.1", ctr_ns, more_nm_args, more_ne_args, "");
    let (netmanager, nodeengine, ne_args) = w;
    OneDoc { root, cluster, netmanager, nodeengine, ne_args }
}

/// A second worker on `h` (NetManager and NodeEngine, logs named `netmanager-<name>`, `nodeengine-<name>`),
/// joining the cluster of the 1-DOC stack at `cluster_ip`; instances in containerd namespace `ctr_ns`, its
/// state under `dir/<name>`, local images from `dir`.
pub fn add_worker(h: &Host, dir: &Path, name: &str, cluster_ip: &str, ctr_ns: &str, nm_args: &[&str]) -> (Proc, Proc) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let (nm, ne, _) =
        start_worker(h, &dir.join(name), dir, name, cluster_ip, ctr_ns, nm_args, &[], &format!("-{name}"));
    (nm, ne)
}

/// A worker's NetManager (its netcfg.json written into `state`) and NodeEngine (named `name`, joining the
/// cluster at `cluster_ip`, images from `image_dir`); answers them and the NodeEngine's arguments.
#[allow(clippy::too_many_arguments)]
fn start_worker(
    h: &Host,
    state: &Path,
    image_dir: &Path,
    name: &str,
    cluster_ip: &str,
    ctr_ns: &str,
    more_nm_args: &[&str],
    more_ne_args: &[&str],
    log_suffix: &str,
) -> (Proc, Proc, Vec<String>) {
    let p = |s: &str| state.join(s).display().to_string();
    std::fs::write(
        state.join("netcfg.json"),
        json!({"NodePublicAddress": h.ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": cluster_ip,
               "NodeName": name})
        .to_string(),
    )
    .unwrap();
    let (cfg, nm_dir) = (p("netcfg.json"), p("nm"));
    let nm_args: Vec<&str> =
        ["-c", &cfg, "--data-dir", &nm_dir].into_iter().chain(more_nm_args.iter().copied()).collect();
    let netmanager = h.spawn(&format!("netmanager{log_suffix}"), &bin("NetManager"), &nm_args, &[]).unwrap();
    netmanager.wait_log("NetManager ready", std::time::Duration::from_secs(30)).unwrap();
    let ne_args: Vec<String> = [
        "-a",
        cluster_ip,
        "-n",
        "6000",
        "--data-dir",
        &p("ne"),
        "--namespace",
        ctr_ns,
        "--node-name",
        name,
        "--image-dir",
        &image_dir.display().to_string(),
        "--netmanager-credential",
        &p("nm/api-token"),
    ]
    .iter()
    .chain(more_ne_args)
    .map(|s| s.to_string())
    .collect();
    let nodeengine = spawn_nodeengine(h, &format!("nodeengine{log_suffix}"), &ne_args);
    (netmanager, nodeengine, ne_args)
}

/// Removes containerd namespace `ns` with its images (its containers must be gone).
pub fn remove_ctr_namespace(ns: &str) {
    let images = std::process::Command::new("ctr").args(["-n", ns, "images", "ls", "-q"]).output().unwrap();
    for img in String::from_utf8_lossy(&images.stdout).lines() {
        let _ = std::process::Command::new("ctr").args(["-n", ns, "images", "rm", "--sync", img]).output();
    }
    let _ = std::process::Command::new("ctr").args(["namespaces", "rm", ns]).output();
}

/// Starts a NodeEngine with `args` on `h`, named `name` in the logs.
pub fn spawn_nodeengine(h: &Host, name: &str, args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.spawn_with_cgroups(name, &bin("NodeEngine"), &args, &[]).unwrap()
}

/// The pid of the task of `service`'s instance 0 in containerd namespace `ns`.
pub fn task_pid(ns: &str, service: &str) -> String {
    let out = std::process::Command::new("ctr").args(["-n", ns, "tasks", "ls"]).output().unwrap();
    let tasks = String::from_utf8_lossy(&out.stdout).to_string();
    // TASK PID STATUS
    tasks
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (id, pid) = (f.next()?, f.next()?);
            (id.contains(service) && id.ends_with(".instance.0")).then(|| pid.to_string())
        })
        .unwrap_or_else(|| panic!("{service} instance 0 among the tasks: {tasks}"))
}
