//! `cargo xtask up` / `down`: a 1-DOC cluster (root, cluster, NetManager, NodeEngine) on this machine.
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::util::{cargo, sh, step, succeeds};

const RUN_DIR: &str = "/run/oakestra-rs";
const LOG_DIR: &str = "/var/log/oakestra-rs";
const DATA_DIR: &str = "/var/lib/oakestra-rs";
const NETCFG: &str = "/etc/netmanager/netcfg.json";
const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Cluster name given to the cluster orchestrator (CLUSTER_NAME).
    #[arg(long, env = "CLUSTER_NAME", default_value = "cluster1")]
    pub cluster_name: String,
    /// Cluster location (CLUSTER_LOCATION): free text or "lat,lon,radius_m".
    #[arg(long, env = "CLUSTER_LOCATION", default_value = "48.1351,11.5820,1000")]
    pub cluster_location: String,
    /// Use debug binaries instead of release ones.
    #[arg(long)]
    pub debug: bool,
    /// Start without the NetManager (instances get no overlay address).
    #[arg(long)]
    pub no_netmanager: bool,
    /// Seconds to wait for the worker to register.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Also delete the state (root store, cluster ids, leases) under /var/lib/oakestra-rs.
    #[arg(long)]
    pub purge: bool,
}

struct Component {
    name: &'static str,
    bin: &'static str,
}

const ORDER: &[Component] = &[
    Component { name: "root", bin: "root-orchestrator" },
    Component { name: "cluster", bin: "cluster-orchestrator" },
    Component { name: "netmanager", bin: "NetManager" },
    Component { name: "nodeengine", bin: "NodeEngine" },
];

fn pid_file(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.pid"))
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

fn running_pid(name: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file(name)).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

fn spawn(name: &str, bin: &Path, args: &[String], envs: &[(&str, String)]) -> anyhow::Result<i32> {
    let log_path = Path::new(LOG_DIR).join(format!("{name}.log"));
    let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // a process group of its own: it outlives `cargo xtask up` and a Ctrl-C in its terminal
    cmd.process_group(0);
    let child = cmd.spawn().with_context(|| format!("start {}", bin.display()))?;
    let pid = child.id() as i32;
    fs::write(pid_file(name), pid.to_string())?;
    eprintln!("    {name}: pid {pid}, log {}", log_path.display());
    Ok(pid)
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_note = Instant::now();
    loop {
        if check()? {
            eprintln!("    {what}: ok ({:.1} s)", start.elapsed().as_secs_f64());
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}; see the logs in {LOG_DIR}", timeout.as_secs());
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!("    still waiting for {what} ({} s)...", start.elapsed().as_secs());
            last_note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts containerd (detached, log in /var/log/oakestra-rs) unless it already answers.
pub fn ensure_containerd() -> anyhow::Result<()> {
    for d in [RUN_DIR, LOG_DIR] {
        fs::create_dir_all(d)?;
    }
    if succeeds(Command::new("ctr").args(["--address", CONTAINERD_SOCK, "version"])) {
        step("containerd: already running");
        return Ok(());
    }
    step("containerd: starting");
    spawn("containerd", Path::new("/usr/bin/containerd"), &[], &[])?;
    wait_until("containerd socket", Duration::from_secs(30), || {
        Ok(succeeds(Command::new("ctr").args(["--address", CONTAINERD_SOCK, "version"])))
    })
}

fn ensure_netcfg() -> anyhow::Result<()> {
    if Path::new(NETCFG).exists() {
        step(&format!("NetManager config: using existing {NETCFG}"));
        return Ok(());
    }
    step(&format!("NetManager config: writing {NETCFG} for a 1-DOC cluster"));
    fs::create_dir_all("/etc/netmanager")?;
    let cfg = serde_json::json!({
        "NodePublicAddress": "0.0.0.0",
        "NodePublicPort": "50103",
        "ClusterUrl": "127.0.0.1",
        "ClusterMqttPort": "10003",
    });
    fs::write(NETCFG, serde_json::to_string_pretty(&cfg)? + "\n")?;
    Ok(())
}

fn admin_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("OAK_ADMIN_PASSWORD") {
        return Ok(p);
    }
    let file = Path::new(DATA_DIR).join("root/admin-password");
    fs::read_to_string(&file)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("no OAK_ADMIN_PASSWORD and no {}", file.display()))
}

/// The join token the root wrote at its first start (the cluster registers with it once).
fn join_token() -> anyhow::Result<String> {
    let file = Path::new(DATA_DIR).join("root/join-token");
    fs::read_to_string(&file).map(|s| s.trim().to_string()).with_context(|| {
        format!(
            "{} is missing: the root writes it at first start (or give the cluster a token it made)",
            file.display()
        )
    })
}

/// The worker join token the cluster wrote at its first start.
fn worker_token() -> anyhow::Result<String> {
    let file = Path::new(DATA_DIR).join("cluster/worker-join-token");
    // the cluster writes it as it starts; it was started just before
    wait_until("the cluster's worker join token", Duration::from_secs(30), || Ok(file.exists()))?;
    fs::read_to_string(&file).map(|s| s.trim().to_string()).with_context(|| format!("reading {}", file.display()))
}

fn api_token(password: &str) -> anyhow::Result<String> {
    let resp: serde_json::Value = ureq::post("http://127.0.0.1:10000/api/auth/login")
        .send_json(serde_json::json!({"username": "Admin", "password": password}))?
        .into_json()?;
    resp["token"].as_str().map(str::to_string).context("login answer has no token")
}

fn active_nodes(token: &str, cluster: &str) -> anyhow::Result<u64> {
    let clusters: serde_json::Value = ureq::get("http://127.0.0.1:10000/api/clusters/active")
        .set("Authorization", &format!("Bearer {token}"))
        .call()?
        .into_json()?;
    Ok(clusters
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["cluster_name"] == cluster)
        .filter_map(|c| c["active_nodes"].as_u64())
        .max()
        .unwrap_or(0))
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    crate::setup::run()?;
    let profile = if args.debug { "debug" } else { "release" };
    step(&format!("building binaries ({profile})"));
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    if !args.debug {
        build.arg("--release");
    }
    sh(&mut build)?;
    crate::ebpf::build()?;
    let bin_dir = crate::util::target_dir().join(profile);

    for d in [RUN_DIR, LOG_DIR, DATA_DIR] {
        fs::create_dir_all(d)?;
    }
    ensure_containerd()?;
    if !args.no_netmanager {
        ensure_netcfg()?;
    }

    for c in ORDER {
        if args.no_netmanager && c.name == "netmanager" {
            continue;
        }
        if let Some(pid) = running_pid(c.name) {
            step(&format!("{}: already running (pid {pid})", c.name));
            continue;
        }
        step(&format!("starting {}", c.name));
        let bin = bin_dir.join(c.bin);
        let data = format!("{DATA_DIR}/{}", c.name);
        match c.name {
            "root" => {
                spawn(c.name, &bin, &["--data-dir".into(), data], &[])?;
                wait_until("root API on :10000", Duration::from_secs(30), || {
                    Ok(ureq::get("http://127.0.0.1:10000/api/health").call().is_ok())
                })?;
            }
            "cluster" => {
                spawn(
                    c.name,
                    &bin,
                    &["--data-dir".into(), data],
                    &[
                        ("CLUSTER_NAME", args.cluster_name.clone()),
                        ("CLUSTER_LOCATION", args.cluster_location.clone()),
                        ("SYSTEM_MANAGER_URL", "127.0.0.1".into()),
                        ("OAK_CLUSTER_TOKEN", join_token()?),
                    ],
                )?;
            }
            "netmanager" => {
                spawn(
                    c.name,
                    &bin,
                    &["-p".into(), "6000".into(), "--data-dir".into(), data],
                    &[("OAK_WORKER_TOKEN", worker_token()?)],
                )?;
                wait_until("NetManager on :6000", Duration::from_secs(30), || {
                    Ok(ureq::get("http://127.0.0.1:6000/status").call().is_ok())
                })?;
            }
            _ => {
                let n = if args.no_netmanager { "0" } else { "6000" };
                spawn(
                    c.name,
                    &bin,
                    &[
                        "-a".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        "10100".into(),
                        "-n".into(),
                        n.into(),
                        "--data-dir".into(),
                        data,
                        "--netmanager-credential".into(),
                        format!("{DATA_DIR}/netmanager/api-token"),
                    ],
                    &[("OAK_WORKER_TOKEN", worker_token()?)],
                )?;
            }
        }
    }

    let password = admin_password()?;
    let token = api_token(&password)?;
    wait_until(
        &format!("worker registered in cluster '{}'", args.cluster_name),
        Duration::from_secs(args.timeout),
        || Ok(active_nodes(&token, &args.cluster_name).unwrap_or(0) >= 1),
    )?;
    println!();
    println!("1-DOC cluster '{}' is up.", args.cluster_name);
    println!("  Root API:   http://127.0.0.1:10000/api  (docs: http://127.0.0.1:10000/api/docs)");
    println!(
        "  Login:      user 'Admin', password {}",
        match std::env::var("OAK_ADMIN_PASSWORD") {
            Ok(_) => "from OAK_ADMIN_PASSWORD".to_string(),
            Err(_) => format!("in {DATA_DIR}/root/admin-password"),
        }
    );
    println!("  Logs:       {LOG_DIR}/*.log");
    println!("  Stop with:  cargo xtask down");
    Ok(())
}

pub fn down(args: DownArgs) -> anyhow::Result<()> {
    // Reverse order: workers first, so they can detach instances cleanly.
    for c in ORDER.iter().rev() {
        stop(c.name)?;
    }
    // the NodeEngine leaves its containers running across its own restarts; down removes them (the next
    // `up` deploys them again: the cluster remembers its placements)
    let ids = Command::new("ctr").args(["-n", "oakestra", "containers", "ls", "-q"]).output();
    let ids = ids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    if !ids.trim().is_empty() {
        step(&format!("removing {} instance container(s)", ids.lines().count()));
        for id in ids.lines() {
            let _ = Command::new("ctr").args(["-n", "oakestra", "tasks", "kill", "-s", "SIGKILL", id]).output();
            let _ = Command::new("ctr").args(["-n", "oakestra", "tasks", "rm", "-f", id]).output();
            let _ = Command::new("ctr").args(["-n", "oakestra", "containers", "rm", id]).output();
            let _ = Command::new("ctr").args(["-n", "oakestra", "snapshots", "rm", id]).output();
        }
    }
    stop("containerd")?;
    // the NetManager's bridge, NAT rules and pinned fast path outlive it by design (traffic keeps flowing
    // across restarts): remove them
    for profile in ["release", "debug"] {
        let nm = crate::util::target_dir().join(profile).join("NetManager");
        if nm.exists() {
            step("removing the NetManager's bridge, NAT rules and fast-path pins");
            if let Err(e) = sh(Command::new(&nm).args(["--teardown", "-c", NETCFG])) {
                eprintln!("    {e:#}");
            }
            break;
        }
    }
    if args.purge {
        step(&format!("deleting state in {DATA_DIR}"));
        let _ = fs::remove_dir_all(DATA_DIR);
    }
    step("1-DOC cluster stopped");
    Ok(())
}

fn stop(name: &str) -> anyhow::Result<()> {
    let Some(pid) = running_pid(name) else {
        let _ = fs::remove_file(pid_file(name));
        return Ok(());
    };
    step(&format!("stopping {name} (pid {pid})"));
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        eprintln!("    {name} did not stop within 15 s; killing it");
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let _ = fs::remove_file(pid_file(name));
    Ok(())
}
