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
    /// What runs on this machine: root, cluster, worker, or several (comma-separated). All three (the
    /// default) is a 1-DOC cluster; `root,cluster` is the control machine of an M-DOC cluster; `cluster`
    /// alone is a cluster of an MDNC setup; `worker` a worker device; `cluster,worker` a hybrid.
    #[arg(long, value_delimiter = ',', default_values_t = ["root".to_string(), "cluster".to_string(), "worker".to_string()])]
    pub role: Vec<String>,
    /// Cluster name given to the cluster orchestrator (CLUSTER_NAME).
    #[arg(long, env = "CLUSTER_NAME", default_value = "cluster1")]
    pub cluster_name: String,
    /// Cluster location (CLUSTER_LOCATION): free text or "lat,lon,radius_m".
    #[arg(long, env = "CLUSTER_LOCATION", default_value = "48.1351,11.5820,1000")]
    pub cluster_location: String,
    /// The root orchestrator's address, for a cluster (SYSTEM_MANAGER_URL; IPv4 or IPv6).
    #[arg(long, env = "SYSTEM_MANAGER_URL", default_value = "127.0.0.1")]
    pub root_address: String,
    /// The cluster orchestrator's address, for a worker (CLUSTER_ADDRESS; IPv4 or IPv6). Written as
    /// ClusterUrl into /etc/netmanager/netcfg.json when that file does not exist yet.
    #[arg(long, env = "CLUSTER_ADDRESS", default_value = "127.0.0.1")]
    pub cluster_address: String,
    /// The root's join token, for a cluster (OAK_CLUSTER_TOKEN); by default the one the root on this
    /// machine wrote.
    #[arg(long, env = "OAK_CLUSTER_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The cluster's worker join token, for a worker (OAK_WORKER_TOKEN); by default the one the cluster on
    /// this machine wrote.
    #[arg(long, env = "OAK_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Use debug binaries instead of release ones.
    #[arg(long)]
    pub debug: bool,
    /// The worker also runs unikernels (the NodeEngine's `-u=true`: qemu with KVM, else TCG).
    #[arg(long)]
    pub unikernel: bool,
    /// Start the worker without the NetManager (instances get no overlay address).
    #[arg(long)]
    pub no_netmanager: bool,
    /// With the root, do not start the dashboard (oak-dashboard on port 80).
    #[arg(long)]
    pub no_dashboard: bool,
    /// Seconds to wait for each component to come up (the worker to register).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Also delete the state (root store, cluster ids, leases) under /var/lib/oakestra-rs.
    #[arg(long)]
    pub purge: bool,
}

/// What `up` may start (the dashboard with the root role); `down` stops them in reverse, workers first.
const ORDER: &[&str] = &["dashboard", "root", "cluster", "netmanager", "nodeengine"];

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

/// Writes /etc/netmanager/netcfg.json for a worker of the cluster at `cluster` unless one exists; an
/// existing one is kept (the user's), with a warning when it names another cluster.
fn ensure_netcfg(cluster: &str) -> anyhow::Result<()> {
    if let Ok(text) = fs::read_to_string(NETCFG) {
        step(&format!("NetManager config: using existing {NETCFG}"));
        let cfg: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{NETCFG} is not JSON"))?;
        if cfg["ClusterUrl"].as_str().is_some_and(|u| u != cluster) {
            eprintln!(
                "    WARNING: {NETCFG} names ClusterUrl {} but the cluster address is {cluster}: the NetManager \
                 follows {NETCFG}; edit it (or delete it to have it written again)",
                cfg["ClusterUrl"]
            );
        }
        return Ok(());
    }
    step(&format!("NetManager config: writing {NETCFG} (cluster {cluster})"));
    fs::create_dir_all("/etc/netmanager")?;
    let cfg = serde_json::json!({
        "NodePublicAddress": "0.0.0.0",
        "NodePublicPort": "50103",
        "ClusterUrl": cluster,
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

/// A token from the flag/variable, else from the file a local daemon wrote at its first start.
fn token(given: &Option<String>, file: &str, variable: &str, how: &str) -> anyhow::Result<String> {
    if let Some(t) = given.as_ref().filter(|t| !t.trim().is_empty()) {
        return Ok(t.trim().to_string());
    }
    let file = Path::new(DATA_DIR).join(file);
    // a daemon started just before writes it as it starts
    if file.parent().is_some_and(Path::exists) {
        wait_until(&format!("{}", file.display()), Duration::from_secs(30), || Ok(file.exists()))?;
    }
    fs::read_to_string(&file)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("no {variable} given and no {} on this machine: {how}", file.display()))
}

/// Length of a log file now: what is written after it is this start's.
fn log_len(name: &str) -> u64 {
    fs::metadata(Path::new(LOG_DIR).join(format!("{name}.log"))).map(|m| m.len()).unwrap_or(0)
}

/// Waits until `needle` appears in the part of `name`'s log after `from`, failing early if it exits.
fn wait_log(name: &str, from: u64, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let path = Path::new(LOG_DIR).join(format!("{name}.log"));
    wait_until(&format!("{name}: {needle:?}"), timeout, || {
        // only what this start wrote (the log file is appended to across starts)
        let mut new = Vec::new();
        if let Ok(mut f) = fs::File::open(&path) {
            use std::io::{Read, Seek, SeekFrom};
            f.seek(SeekFrom::Start(from))?;
            f.read_to_end(&mut new)?;
        }
        let new = String::from_utf8_lossy(&new);
        if new.contains(needle) {
            return Ok(true);
        }
        if running_pid(name).is_none() {
            let lines: Vec<&str> = new.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            bail!("{name} exited; the end of {}:\n{tail}", path.display());
        }
        Ok(false)
    })
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
    for r in &args.role {
        if !["root", "cluster", "worker"].contains(&r.as_str()) {
            bail!("--role {r}: one of root, cluster, worker (or several, comma-separated)");
        }
    }
    let has = |r: &str| args.role.iter().any(|x| x == r);
    let one_doc = has("root") && has("cluster") && has("worker");
    crate::setup::run()?;
    let profile = if args.debug { "debug" } else { "release" };
    step(&format!("building binaries ({profile})"));
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    if !args.debug {
        build.arg("--release");
    }
    sh(&mut build)?;
    if has("worker") {
        crate::ebpf::build()?;
    }
    let bin_dir = crate::util::target_dir().join(profile);
    for d in [RUN_DIR, LOG_DIR, DATA_DIR] {
        fs::create_dir_all(d)?;
    }
    let timeout = Duration::from_secs(args.timeout);
    let started = |name: &str| -> Option<i32> {
        let pid = running_pid(name);
        if let Some(pid) = pid {
            step(&format!("{name}: already running (pid {pid})"));
        }
        pid
    };

    if has("root") && started("root").is_none() {
        step("starting the root orchestrator");
        let mut root_args = vec!["--data-dir".to_string(), format!("{DATA_DIR}/root")];
        if !args.no_dashboard {
            // the dashboard, on this machine, names each browser's address on logins
            root_args.extend(["--trusted-proxy".to_string(), "127.0.0.1".to_string()]);
        }
        spawn("root", &bin_dir.join("root-orchestrator"), &root_args, &[])?;
        wait_until("root API on :10000", Duration::from_secs(30), || {
            Ok(ureq::get("http://127.0.0.1:10000/api/health").call().is_ok())
        })?;
    }
    if has("root") && !args.no_dashboard && started("dashboard").is_none() {
        step("starting the dashboard on :80");
        spawn(
            "dashboard",
            &bin_dir.join("oak-dashboard"),
            &["--listen".into(), "0.0.0.0:80".into(), "--root-url".into(), "http://127.0.0.1:10000".into()],
            &[],
        )?;
        wait_until("dashboard on :80", Duration::from_secs(30), || {
            if running_pid("dashboard").is_none() {
                bail!("the dashboard exited; see {LOG_DIR}/dashboard.log (is port 80 taken? --no-dashboard skips it)");
            }
            Ok(ureq::get("http://127.0.0.1:80/healthz").call().is_ok())
        })?;
    }
    if has("cluster") && started("cluster").is_none() {
        step(&format!("starting the cluster orchestrator '{}' (root at {})", args.cluster_name, args.root_address));
        let token = token(
            &args.join_token,
            "root/join-token",
            "OAK_CLUSTER_TOKEN",
            "give the cluster a join token of the root (its /var/lib/oakestra-rs/root/join-token, or \
             `root-orchestrator token create` on the root)",
        )?;
        let from = log_len("cluster");
        spawn(
            "cluster",
            &bin_dir.join("cluster-orchestrator"),
            &["--data-dir".into(), format!("{DATA_DIR}/cluster")],
            &[
                ("CLUSTER_NAME", args.cluster_name.clone()),
                ("CLUSTER_LOCATION", args.cluster_location.clone()),
                ("SYSTEM_MANAGER_URL", args.root_address.clone()),
                ("OAK_CLUSTER_TOKEN", token),
            ],
        )?;
        wait_log("cluster", from, "registered with the root", timeout)?;
    }
    if has("worker") {
        ensure_containerd()?;
        let worker_token = || {
            token(
                &args.worker_token,
                "cluster/worker-join-token",
                "OAK_WORKER_TOKEN",
                "give the worker a join token of its cluster (the cluster's \
                 /var/lib/oakestra-rs/cluster/worker-join-token, or `cluster-orchestrator token create` there)",
            )
        };
        if !args.no_netmanager && started("netmanager").is_none() {
            ensure_netcfg(&args.cluster_address)?;
            step("starting the NetManager");
            let from = log_len("netmanager");
            spawn(
                "netmanager",
                &bin_dir.join("NetManager"),
                &["-p".into(), "6000".into(), "--data-dir".into(), format!("{DATA_DIR}/netmanager")],
                &[("OAK_WORKER_TOKEN", worker_token()?)],
            )?;
            wait_log("netmanager", from, "NetManager ready", timeout)?;
        }
        if started("nodeengine").is_none() {
            step(&format!("starting the NodeEngine (cluster at {})", args.cluster_address));
            let n = if args.no_netmanager { "0" } else { "6000" };
            let from = log_len("nodeengine");
            spawn(
                "nodeengine",
                &bin_dir.join("NodeEngine"),
                &[
                    format!("-u={}", args.unikernel),
                    "-a".into(),
                    args.cluster_address.clone(),
                    "-n".into(),
                    n.into(),
                    "--data-dir".into(),
                    format!("{DATA_DIR}/nodeengine"),
                    "--netmanager-credential".into(),
                    format!("{DATA_DIR}/netmanager/api-token"),
                ],
                &[("OAK_WORKER_TOKEN", worker_token()?)],
            )?;
            wait_log("nodeengine", from, "registered with the cluster orchestrator", timeout)?;
        }
    }

    if has("root") {
        let password = admin_password()?;
        let token = api_token(&password)?;
        if one_doc {
            wait_until(&format!("worker registered in cluster '{}'", args.cluster_name), timeout, || {
                Ok(active_nodes(&token, &args.cluster_name).unwrap_or(0) >= 1)
            })?;
        }
    }
    println!();
    if one_doc {
        println!("1-DOC cluster '{}' is up.", args.cluster_name);
    } else {
        println!("Up on this machine: {}.", args.role.join(", "));
    }
    if has("root") {
        println!("  Root API:   http://<this machine>:10000/api  (docs: /api/docs)");
        if running_pid("dashboard").is_some() {
            println!("  Dashboard:  http://<this machine>/  (same login)");
        }
        println!(
            "  Login:      user 'Admin', password {}",
            match std::env::var("OAK_ADMIN_PASSWORD") {
                Ok(_) => "from OAK_ADMIN_PASSWORD".to_string(),
                Err(_) => format!("in {DATA_DIR}/root/admin-password"),
            }
        );
        if !has("cluster") || !one_doc {
            println!("  Clusters join with the token in {DATA_DIR}/root/join-token (OAK_CLUSTER_TOKEN)");
        }
    }
    if has("cluster") && !one_doc {
        println!(
            "  Cluster '{}': workers join at <this machine>:10100 with the token in \
             {DATA_DIR}/cluster/worker-join-token (OAK_WORKER_TOKEN)",
            args.cluster_name
        );
    }
    if has("worker") && !one_doc {
        println!("  Worker: registered with the cluster at {}", args.cluster_address);
    }
    println!("  Logs:       {LOG_DIR}/*.log");
    println!("  Stop with:  cargo xtask down");
    Ok(())
}

pub fn down(args: DownArgs) -> anyhow::Result<()> {
    // Reverse order: workers first, so they can detach instances cleanly.
    for name in ORDER.iter().rev() {
        stop(name)?;
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
    step("stopped");
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
