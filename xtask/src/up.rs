//! `cargo xtask up` / `down`: a 1-DOC cluster (root, cluster, NetManager, NodeEngine) on this machine;
//! with `--ha N` the root is replicated: N root orchestrators on one etcd (a local one `up` starts, or
//! `--etcd-endpoints`), each on a loopback address of its own.
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
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
/// Root replica i (`--ha`) listens on 127.0.0.(10+i) at the root's default ports: a cluster reaches every
/// replica's service manager at one port (`--root-netsvc-port`, beside each address's host), so replicas
/// on one machine differ by address, not by port.
const REPLICA_IP_BASE: u8 = 10;
/// The most replicas `--ha` takes (127.0.0.10 to 127.0.0.29).
const MAX_REPLICAS: u8 = 20;
/// Debian's etcd (the etcd-server package, installed by `cargo xtask setup`).
const ETCD_BIN: &str = "/usr/bin/etcd";
/// The local etcd's transaction limit, and the replicas' `--etcd-max-txn-ops` on it.
const ETCD_MAX_TXN_OPS: &str = "10000";
/// Holds the local etcd's client URL while it runs: a later `up` finds it there.
const ETCD_URL_FILE: &str = "etcd.url";

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
    /// With the root role: a replicated root of N root orchestrators (1 to 20, typically 3) on etcd, to try
    /// one on this machine. Replica i (process root-i) listens on 127.0.0.(10+i) at the default ports (API
    /// :10000, cluster registration :50052, service manager :10099; loopback only), keeps its files in
    /// /var/lib/oakestra-rs/ha/root-i and advertises http://127.0.0.(10+i):10000 to the others. A local
    /// single-member etcd is started (client 127.0.0.1:2379 and peer :2380, or free ports when taken; data
    /// in /var/lib/oakestra-rs/ha/etcd) unless --etcd-endpoints names one. The cluster lists every replica
    /// (--root-address 127.0.0.10,127.0.0.11,...); the dashboard talks to the first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=MAX_REPLICAS as i64))]
    pub ha: Option<u8>,
    /// With the root role: the replicated root keeps its store in this running etcd (client URLs,
    /// comma-separated) instead of one `up` starts; without --ha, one replica.
    #[arg(long, value_name = "URL[,URL]", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Seconds to wait for each component to come up (the worker to register).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Also delete the state (root store, cluster ids, leases; a replicated root's etcd data and replica
    /// files) under /var/lib/oakestra-rs.
    #[arg(long)]
    pub purge: bool,
}

/// What `up` may start (the dashboard with the root role; etcd and the replicas root-0, root-1, ... with
/// `--ha`), in order; `down` stops them in reverse, workers first and etcd after every replica.
fn order() -> Vec<String> {
    let mut names = vec!["dashboard".to_string(), "etcd".to_string()];
    names.extend(replica_indices().into_iter().map(replica_name));
    names.extend(["root", "cluster", "netmanager", "nodeengine"].map(String::from));
    names
}

/// A replicated root as `up` lays it out on this machine.
struct Ha {
    replicas: u8,
    /// etcd's client URLs, comma-separated.
    endpoints: String,
    /// etcd is the one `up` runs: its transaction limit is known.
    local_etcd: bool,
}

fn replica_name(i: u8) -> String {
    format!("root-{i}")
}

fn replica_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, REPLICA_IP_BASE + i)
}

/// Replica i's REST API, as it advertises itself and users reach it.
fn replica_api(i: u8) -> String {
    format!("http://{}:10000", replica_ip(i))
}

/// Replica i's files (CA copy, join token, admin password), relative to DATA_DIR.
fn replica_home(i: u8) -> String {
    format!("ha/root-{i}")
}

/// The replicas with a pid file (running or not), by index: what `down` stops.
fn replica_indices() -> Vec<u8> {
    let mut found: Vec<u8> = fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("root-")?.strip_suffix(".pid")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

/// Replica i's `/api/health` answer once it serves: (role, the leader's API as it knows it).
fn replica_health(i: u8) -> Option<(String, String)> {
    let v: serde_json::Value = ureq::get(&format!("{}/api/health", replica_api(i)))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_json()
        .ok()?;
    Some((v["role"].as_str()?.to_string(), v["leader"].as_str().unwrap_or_default().to_string()))
}

/// Whether etcd at `url` says it is healthy (its `/health`).
fn etcd_healthy(url: &str) -> bool {
    ureq::get(&format!("{}/health", url.trim_end_matches('/')))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
        .is_some_and(|v| v["health"] == "true")
}

/// `preferred` on 127.0.0.1 when it is free, else a free port the kernel picks (other than `not`).
fn loopback_port(preferred: u16, not: Option<u16>) -> anyhow::Result<u16> {
    if Some(preferred) != not && TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    loop {
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        if Some(port) != not {
            return Ok(port);
        }
    }
}

/// Starts the local single-member etcd of a replicated root unless it runs (data in DATA_DIR/ha/etcd, log
/// etcd.log); returns its client URL once its `/health` says healthy.
fn ensure_etcd(timeout: Duration) -> anyhow::Result<String> {
    let url_file = Path::new(RUN_DIR).join(ETCD_URL_FILE);
    if let Some(pid) = running_pid("etcd") {
        let url = fs::read_to_string(&url_file)
            .map(|s| s.trim().to_string())
            .with_context(|| format!("etcd runs (pid {pid}) but {} is missing", url_file.display()))?;
        step(&format!("etcd: already running (pid {pid}, {url})"));
        return Ok(url);
    }
    if !Path::new(ETCD_BIN).exists() {
        bail!("{ETCD_BIN} is missing: `cargo xtask setup` installs it (Debian's etcd-server)");
    }
    // etcd's usual ports when free, else free ones (another etcd may run here, a test's or a bench's)
    let client = loopback_port(2379, None)?;
    let peer = loopback_port(2380, Some(client))?;
    let (url, peer_url) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
    let dir = Path::new(DATA_DIR).join("ha/etcd");
    fs::create_dir_all(Path::new(DATA_DIR).join("ha"))?;
    step(&format!("starting etcd (client {url}, peer {peer_url}, data {})", dir.display()));
    let from = log_len("etcd");
    let args = [
        "--name",
        "oak-up",
        "--data-dir",
        &dir.display().to_string(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("oak-up={peer_url}"),
        "--initial-cluster-state",
        "new",
        "--max-txn-ops",
        ETCD_MAX_TXN_OPS,
        "--logger",
        "zap",
    ]
    .map(String::from);
    spawn("etcd", Path::new(ETCD_BIN), &args, &[])?;
    fs::write(&url_file, &url)?;
    wait_until(&format!("etcd healthy at {url}"), timeout, || {
        if running_pid("etcd").is_none() {
            return Err(exited("etcd", from));
        }
        Ok(etcd_healthy(&url))
    })?;
    Ok(url)
}

/// Starts the replicas not running yet, one at a time (the first to open the store makes the CA and the
/// Admin user; the next take them from etcd), then waits until exactly one leads; returns its index.
fn ensure_replicas(ha: &Ha, bin: &Path, trust_dashboard: bool, timeout: Duration) -> anyhow::Result<u8> {
    for i in 0..ha.replicas {
        let name = replica_name(i);
        if let Some(pid) = running_pid(&name) {
            step(&format!("{name}: already running (pid {pid}, API {})", replica_api(i)));
            continue;
        }
        step(&format!("starting root replica {name} (API {}, etcd {})", replica_api(i), ha.endpoints));
        let ip = replica_ip(i);
        // the root on etcd does not make its data dir (the embedded store's opening would); 0700: it holds the
        // CA's key and the generated admin password
        let home = Path::new(DATA_DIR).join(replica_home(i));
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&home)?;
        let mut args = vec![
            "--data-dir".to_string(),
            home.display().to_string(),
            "--etcd-endpoints".into(),
            ha.endpoints.clone(),
            "--advertise-api".into(),
            replica_api(i),
            "--api-addr".into(),
            format!("{ip}:10000"),
            "--grpc-addr".into(),
            format!("{ip}:50052"),
            "--netsvc-addr".into(),
            format!("{ip}:10099"),
        ];
        if ha.local_etcd {
            args.extend(["--etcd-max-txn-ops".to_string(), ETCD_MAX_TXN_OPS.to_string()]);
        }
        if trust_dashboard {
            // the dashboard, on this machine, names each browser's address on logins
            args.extend(["--trusted-proxy".to_string(), "127.0.0.1".to_string()]);
        }
        let from = log_len(&name);
        spawn(&name, &bin.join("root-orchestrator"), &args, &[])?;
        wait_until(&format!("{name} leading or following a known leader"), timeout, || {
            if running_pid(&name).is_none() {
                return Err(exited(&name, from));
            }
            Ok(replica_health(i).is_some_and(|(role, leader)| role == "leader" || !leader.is_empty()))
        })?;
    }
    let mut leader = None;
    wait_until("exactly one replica leading", timeout, || {
        let leading: Vec<u8> =
            (0..ha.replicas).filter(|i| replica_health(*i).is_some_and(|(role, _)| role == "leader")).collect();
        leader = (leading.len() == 1).then(|| leading[0]);
        Ok(leader.is_some())
    })?;
    let leader = leader.expect("set when the wait succeeds");
    step(&format!("{} leads the root ({})", replica_name(leader), replica_api(leader)));
    Ok(leader)
}

/// A cluster on this machine that joined another root than the one here (its `identity/ca.pem` is not
/// this root's CA) could never register: its sessions would fail TLS until `up` times out. Refused first.
fn check_cluster_root(root_home: &str) -> anyhow::Result<()> {
    let root_ca = Path::new(DATA_DIR).join(root_home).join("ca/ca.pem");
    let joined = Path::new(DATA_DIR).join("cluster/identity/ca.pem");
    let (Ok(root_ca), Ok(joined_ca)) = (fs::read_to_string(&root_ca), fs::read_to_string(&joined)) else {
        return Ok(());
    };
    if root_ca.trim() != joined_ca.trim() {
        bail!(
            "the cluster in {DATA_DIR}/cluster joined another root than the one in {DATA_DIR}/{root_home} (its {} \
             is not this root's CA; a switch between a single and a replicated root?): `cargo xtask down --purge` \
             deletes the state under {DATA_DIR} so that everything joins afresh",
            joined.display()
        );
    }
    Ok(())
}

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

/// The Admin password: OAK_ADMIN_PASSWORD, else the file the root (in DATA_DIR/`root_home`) generated.
fn admin_password(root_home: &str) -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("OAK_ADMIN_PASSWORD") {
        return Ok(p);
    }
    let file = Path::new(DATA_DIR).join(root_home).join("admin-password");
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

/// What `name` logged after `from` (the log file is appended to across starts: only this start's part).
fn log_since(name: &str, from: u64) -> String {
    let mut new = Vec::new();
    if let Ok(mut f) = fs::File::open(Path::new(LOG_DIR).join(format!("{name}.log"))) {
        use std::io::{Read, Seek, SeekFrom};
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_end(&mut new);
        }
    }
    String::from_utf8_lossy(&new).into_owned()
}

/// The error for a component that exited while `up` waited for it, with the end of its log (before a
/// backtrace, which would fill the tail: the error is above it).
fn exited(name: &str, from: u64) -> anyhow::Error {
    let new = log_since(name, from);
    let new = new.rsplit_once("\nStack backtrace:").map_or(new.as_str(), |(before, _)| before);
    let lines: Vec<&str> = new.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    anyhow::anyhow!("{name} exited; the end of {LOG_DIR}/{name}.log:\n{tail}")
}

/// Waits until `needle` appears in the part of `name`'s log after `from`, failing early if it exits.
fn wait_log(name: &str, from: u64, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_until(&format!("{name}: {needle:?}"), timeout, || {
        if log_since(name, from).contains(needle) {
            return Ok(true);
        }
        if running_pid(name).is_none() {
            return Err(exited(name, from));
        }
        Ok(false)
    })
}

/// Logs in as Admin at the root API `api` (a replica forwards the login to the leader).
fn api_token(api: &str, password: &str) -> anyhow::Result<String> {
    let resp: serde_json::Value = ureq::post(&format!("{api}/api/auth/login"))
        .send_json(serde_json::json!({"username": "Admin", "password": password}))?
        .into_json()?;
    resp["token"].as_str().map(str::to_string).context("login answer has no token")
}

fn active_nodes(api: &str, token: &str, cluster: &str) -> anyhow::Result<u64> {
    let clusters: serde_json::Value = ureq::get(&format!("{api}/api/clusters/active"))
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
    let etcd_endpoints: Vec<String> =
        args.etcd_endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    // a replicated root: --ha N, or --etcd-endpoints alone (one replica)
    let replicas = args.ha.or((!etcd_endpoints.is_empty()).then_some(1));
    if replicas.is_some() && !has("root") {
        bail!(
            "--ha and --etcd-endpoints replicate the root: they need the root role (a cluster of a replicated \
             root elsewhere lists its replicas instead: --root-address a,b,c)"
        );
    }
    // a single root binds 0.0.0.0 at the ports the replicas bind on their loopback addresses: one or the other
    if has("root") {
        match (replicas, running_pid("root")) {
            (Some(_), Some(pid)) => {
                bail!("the single root runs (pid {pid}): `cargo xtask down` first to start a replicated root")
            }
            (None, _) if replica_indices().into_iter().any(|i| running_pid(&replica_name(i)).is_some()) => {
                bail!("a replicated root runs (root-<i> replicas): `cargo xtask down` first to start the single root")
            }
            _ => {}
        }
    }
    // where the root's files are: the single root's data dir, or the first replica's
    let root_home = match replicas {
        Some(_) => replica_home(0),
        None => "root".to_string(),
    };
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

    // the local root's API as `up` talks to it (the leading replica's when replicated)
    let mut root_api = "http://127.0.0.1:10000".to_string();
    let mut ha = None;
    if let (true, Some(n)) = (has("root"), replicas) {
        let local_etcd = etcd_endpoints.is_empty();
        let endpoints = if local_etcd {
            ensure_etcd(timeout)?
        } else {
            let endpoints = etcd_endpoints.join(",");
            step(&format!("etcd: using {endpoints}"));
            // only plain-HTTP endpoints can be asked here (no TLS client in xtask); the replicas ask the rest
            let plain: Vec<&String> = etcd_endpoints.iter().filter(|e| e.starts_with("http://")).collect();
            if !plain.is_empty() {
                wait_until(&format!("etcd healthy at {endpoints}"), timeout, || {
                    Ok(plain.iter().any(|e| etcd_healthy(e)))
                })?;
            }
            endpoints
        };
        let h = Ha { replicas: n, endpoints, local_etcd };
        let leader = ensure_replicas(&h, &bin_dir, !args.no_dashboard, timeout)?;
        root_api = replica_api(leader);
        ha = Some(h);
    } else if has("root") && started("root").is_none() {
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
    // the dashboard talks to the first replica (any serves it: followers forward writes)
    let dashboard_root = if ha.is_some() { replica_api(0) } else { root_api.clone() };
    if has("root") && !args.no_dashboard && started("dashboard").is_none() {
        step(&format!("starting the dashboard on :80 (root API {dashboard_root})"));
        spawn(
            "dashboard",
            &bin_dir.join("oak-dashboard"),
            &["--listen".into(), "0.0.0.0:80".into(), "--root-url".into(), dashboard_root.clone()],
            &[],
        )?;
        wait_until("dashboard on :80", Duration::from_secs(30), || {
            if running_pid("dashboard").is_none() {
                bail!("the dashboard exited; see {LOG_DIR}/dashboard.log (is port 80 taken? --no-dashboard skips it)");
            }
            Ok(ureq::get("http://127.0.0.1:80/healthz").call().is_ok())
        })?;
    }
    // a cluster of the replicated root here lists every replica; otherwise the given root address
    let root_address = match &ha {
        Some(h) => (0..h.replicas).map(|i| replica_ip(i).to_string()).collect::<Vec<_>>().join(","),
        None => args.root_address.clone(),
    };
    if has("cluster") && started("cluster").is_none() {
        if has("root") {
            check_cluster_root(&root_home)?;
        }
        step(&format!("starting the cluster orchestrator '{}' (root at {root_address})", args.cluster_name));
        let token = token(
            &args.join_token,
            &format!("{root_home}/join-token"),
            "OAK_CLUSTER_TOKEN",
            "give the cluster a join token of the root (its <data dir>/join-token, or `root-orchestrator token \
             create` on the root, with the root's --etcd-endpoints when it is replicated)",
        )?;
        let from = log_len("cluster");
        spawn(
            "cluster",
            &bin_dir.join("cluster-orchestrator"),
            &["--data-dir".into(), format!("{DATA_DIR}/cluster")],
            &[
                ("CLUSTER_NAME", args.cluster_name.clone()),
                ("CLUSTER_LOCATION", args.cluster_location.clone()),
                ("SYSTEM_MANAGER_URL", root_address.clone()),
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
        let password = admin_password(&root_home)?;
        let token = api_token(&root_api, &password)?;
        if one_doc {
            wait_until(&format!("worker registered in cluster '{}'", args.cluster_name), timeout, || {
                Ok(active_nodes(&root_api, &token, &args.cluster_name).unwrap_or(0) >= 1)
            })?;
        }
    }
    println!();
    if one_doc {
        println!("1-DOC cluster '{}' is up.", args.cluster_name);
    } else {
        println!("Up on this machine: {}.", args.role.join(", "));
    }
    if let Some(h) = &ha {
        println!(
            "  Root:       {} replica(s) on etcd {} (any answers: followers forward writes)",
            h.replicas, h.endpoints
        );
        for i in 0..h.replicas {
            let role = replica_health(i).map(|(r, _)| r).unwrap_or_else(|| "not answering".into());
            println!(
                "    {}  {}/api  {role:<9} pid {}, data {DATA_DIR}/{}, log {LOG_DIR}/{}.log",
                replica_name(i),
                replica_api(i),
                running_pid(&replica_name(i)).map_or("-".into(), |p| p.to_string()),
                replica_home(i),
                replica_name(i)
            );
        }
        println!("  Clusters:   list every replica: --root-address {root_address} (loopback: this machine only)");
    } else if has("root") {
        println!("  Root API:   http://<this machine>:10000/api  (docs: /api/docs)");
    }
    if has("root") {
        if running_pid("dashboard").is_some() {
            println!("  Dashboard:  http://<this machine>/  (same login; root API {dashboard_root})");
        }
        println!(
            "  Login:      user 'Admin', password {}",
            match std::env::var("OAK_ADMIN_PASSWORD") {
                Ok(_) => "from OAK_ADMIN_PASSWORD".to_string(),
                Err(_) => format!("in {DATA_DIR}/{root_home}/admin-password"),
            }
        );
        if !has("cluster") || !one_doc {
            println!("  Clusters join with the token in {DATA_DIR}/{root_home}/join-token (OAK_CLUSTER_TOKEN)");
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
    // Reverse order: workers first, so they can detach instances cleanly; etcd after every replica.
    for name in order().iter().rev() {
        stop(name)?;
    }
    let _ = fs::remove_file(Path::new(RUN_DIR).join(ETCD_URL_FILE));
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
