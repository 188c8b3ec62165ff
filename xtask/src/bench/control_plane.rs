//! `cargo xtask bench control-plane`: a root, N clusters and M simulated workers per cluster (real
//! processes on loopback, the real protocols), then S services deployed one after another. Prints the time
//! from the deploy API call to placement on a worker (NODE_SCHEDULED seen in the API) and to RUNNING, as
//! p50/p99 and as a ratio of a no-op API round trip measured in the same run (the floor any placement
//! pays), plus the resident memory of the root and the clusters.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use oak_proto::InstanceState;
use serde_json::{json, Value};

use super::stats::{pct, rss_kb};
use crate::util::{cargo, sh, step};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Clusters to start.
    #[arg(long, default_value_t = 10)]
    clusters: u32,
    /// Simulated workers per cluster.
    #[arg(long, default_value_t = 100)]
    workers_per_cluster: u32,
    /// Services to deploy (one instance each).
    #[arg(long, default_value_t = 500)]
    services: u32,
    /// First of the loopback ports used (root API; the rest follow).
    #[arg(long, default_value_t = 21000)]
    base_port: u16,
}

struct Procs {
    list: Vec<(String, Child)>,
    /// Started without TLS on their gRPC links.
    plaintext: bool,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.list {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(
    procs: &mut Procs,
    name: &str,
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    logs: &Path,
) -> anyhow::Result<u32> {
    let log = fs::File::create(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).env("RUST_LOG", "warn");
    // the bench's roots and clusters share one join token
    cmd.env("OAK_CLUSTER_TOKEN", testbed::JOIN_TOKEN).env("OAK_WORKER_TOKEN", testbed::WORKER_TOKEN);
    if procs.plaintext {
        cmd.env(oak_trust::PLAINTEXT_ENV, "1");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    procs.list.push((name.to_string(), child));
    Ok(pid)
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut note = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        if note.elapsed() > Duration::from_secs(5) {
            eprintln!("    still waiting for {what} ({:.0} s)", t.elapsed().as_secs_f64());
            note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("    {what}: {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// What one run of the scenario measured.
struct Figures {
    services: usize,
    /// no-op API round trip p50 (ms)
    base: f64,
    placed: (f64, f64),
    running: (f64, f64),
    root_rss_kb: u64,
    cluster_rss_kb: Vec<u64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    step("building release binaries (orchestrators, simulated workers)");
    sh(cargo().args(["build", "--release", "-p", "oak-orchestrators", "--bins"]))?;
    let bins: PathBuf = crate::util::target_dir().join("release");
    step("with TLS on every gRPC link (the default)");
    let on = scenario(&a, &bins, a.base_port, true)?;
    step(&format!("without TLS ({}=1), for comparison", oak_trust::PLAINTEXT_ENV));
    let off = scenario(&a, &bins, a.base_port + 1000, false)?;
    let mib = |kb: u64| kb as f64 / 1024.0;
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
    let max = |v: &[u64]| mib(v.iter().copied().max().unwrap_or(0));
    println!();
    println!(
        "control plane: {} clusters x {} workers, {} services; TLS on every gRPC link vs off, in this run",
        a.clusters, a.workers_per_cluster, on.services
    );
    println!("  {:<40} {:>19} {:>19} {:>8}", "", "TLS on", "TLS off", "on/off");
    let row = |what: &str, x: f64, y: f64, unit: &str| {
        println!("  {what:<40} {:>15.2} {unit:<3} {:>15.2} {unit:<3} {:>7.2}x", x, y, x / y);
    };
    row("no-op API round trip p50", on.base, off.base, "ms");
    row("API call -> placed on a worker p50", on.placed.0, off.placed.0, "ms");
    row("API call -> placed on a worker p99", on.placed.1, off.placed.1, "ms");
    row("API call -> RUNNING (sim, 10 ms) p50", on.running.0, off.running.0, "ms");
    row("API call -> RUNNING (sim, 10 ms) p99", on.running.1, off.running.1, "ms");
    row("RSS root", mib(on.root_rss_kb), mib(off.root_rss_kb), "MiB");
    row("RSS clusters, mean", mean(&on.cluster_rss_kb), mean(&off.cluster_rss_kb), "MiB");
    row("RSS clusters, max", max(&on.cluster_rss_kb), max(&off.cluster_rss_kb), "MiB");
    println!(
        "  placed p50 / no-op API p50: {:.1}x with TLS, {:.1}x without",
        on.placed.0 / on.base,
        off.placed.0 / off.base
    );
    Ok(())
}

/// One run: a root, the clusters and their simulated workers (with TLS, or without), the deploys.
fn scenario(a: &Args, bins: &Path, p: u16, tls: bool) -> anyhow::Result<Figures> {
    let work =
        std::env::temp_dir().join(format!("oak-bench-cp-{}-{}", std::process::id(), if tls { "tls" } else { "plain" }));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut procs = Procs { list: Vec::new(), plaintext: !tls };
    let (api_port, grpc_port, net_port) = (p, p + 1, p + 2);
    let pw = "bench-pw";
    step(&format!(
        "starting root, {} clusters, {} simulated workers each (logs in {})",
        a.clusters,
        a.workers_per_cluster,
        work.display()
    ));
    let root_pid = spawn(
        &mut procs,
        "root",
        &bins.join("root-orchestrator"),
        &[
            "--api-addr".into(),
            format!("127.0.0.1:{api_port}"),
            "--grpc-addr".into(),
            format!("127.0.0.1:{grpc_port}"),
            "--netsvc-addr".into(),
            format!("127.0.0.1:{net_port}"),
            "--data-dir".into(),
            work.join("root").display().to_string(),
            "--report-interval-ms".into(),
            "1000".into(),
        ],
        &[("OAK_ADMIN_PASSWORD", pw)],
        &work,
    )?;
    let api = format!("http://127.0.0.1:{api_port}");
    wait("root API", Duration::from_secs(30), || ureq::get(&format!("{api}/api/health")).call().is_ok())?;
    let token = ureq::post(&format!("{api}/api/auth/login"))
        .send_json(json!({"username":"Admin","password":pw}))?
        .into_json::<Value>()?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    let auth = format!("Bearer {token}");
    let mut cluster_pids = Vec::new();
    for i in 0..a.clusters {
        let wport = p + 100 + i as u16;
        let nport = p + 300 + i as u16;
        let name = format!("bench-c{i}");
        cluster_pids.push(spawn(
            &mut procs,
            &name,
            &bins.join("cluster-orchestrator"),
            &[
                "--root-address".into(),
                format!("127.0.0.1:{grpc_port}"),
                "--root-netsvc-port".into(),
                net_port.to_string(),
                "--worker-addr".into(),
                format!("127.0.0.1:{wport}"),
                "--netsvc-addr".into(),
                format!("127.0.0.1:{nport}"),
                "--data-dir".into(),
                work.join(&name).display().to_string(),
            ],
            &[("CLUSTER_NAME", name.as_str()), ("CLUSTER_LOCATION", "bench")],
            &work,
        )?);
        spawn(
            &mut procs,
            &format!("workers-{i}"),
            &bins.join("oak-sim-worker"),
            &[
                "--cluster".into(),
                format!("127.0.0.1:{wport}"),
                "--count".into(),
                a.workers_per_cluster.to_string(),
                "--name".into(),
                format!("c{i}-w"),
                "--cpu-cores".into(),
                "8".into(),
                "--memory-mb".into(),
                "16384".into(),
                "--start-delay-ms".into(),
                "10".into(),
            ],
            &[],
            &work,
        )?;
    }
    let get = |path: &str| -> anyhow::Result<Value> {
        Ok(ureq::get(&format!("{api}{path}")).set("Authorization", &auth).call()?.into_json()?)
    };
    let total = u64::from(a.clusters * a.workers_per_cluster);
    wait(&format!("{} clusters with {total} workers registered", a.clusters), Duration::from_secs(300), || {
        get("/api/clusters/active").ok().and_then(|v| v.as_array().cloned()).is_some_and(|cs| {
            cs.len() as u32 == a.clusters && cs.iter().filter_map(|c| c["active_nodes"].as_u64()).sum::<u64>() == total
        })
    })?;

    // baseline: a no-op authenticated API round trip
    let mut base = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        get("/api/clusters/active")?;
        base.push(t.elapsed().as_secs_f64() * 1e3);
    }

    step(&format!("deploying {} services, one at a time", a.services));
    let mut placed = Vec::new();
    let mut running = Vec::new();
    let per_app = 10;
    let mut sids = Vec::new();
    for app in 0..a.services.div_ceil(per_app) {
        let n = per_app.min(a.services - app * per_app);
        let ms: Vec<Value> = (0..n)
            .map(|j| {
                json!({"microserviceID":"","microservice_name":format!("s{j}"),"microservice_namespace":"b",
                "virtualization":"container","code":"docker.io/library/nginx:latest","memory":64,"vcpus":0.1})
            })
            .collect();
        let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
            "application_name":format!("a{app}"),"application_namespace":"bench","application_desc":"","microservices":ms}]});
        let apps: Value =
            ureq::post(&format!("{api}/api/application")).set("Authorization", &auth).send_json(sla)?.into_json()?;
        let created = apps
            .as_array()
            .and_then(|l| l.iter().find(|x| x["application_name"] == format!("a{app}")))
            .context("created application not listed")?;
        sids.extend(
            created["microservices"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)),
        );
    }
    for (k, sid) in sids.iter().enumerate() {
        let t = Instant::now();
        ureq::post(&format!("{api}/api/service/{sid}/instance")).set("Authorization", &auth).call()?;
        let mut got_placed = false;
        loop {
            let v = get(&format!("/api/service/{sid}"))?;
            let status = v["instance_list"][0]["status"].as_str().unwrap_or("");
            let st = InstanceState::parse(status);
            if !got_placed && st.is_some_and(InstanceState::is_placed) {
                placed.push(t.elapsed().as_secs_f64() * 1e3);
                got_placed = true;
            }
            match st {
                Some(InstanceState::Running) => {
                    running.push(t.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                // on its way: not yet placed, or placed and starting
                Some(InstanceState::Requested | InstanceState::ClusterScheduled) => {}
                Some(s) if s.is_placed() => {}
                _ => bail!("service {sid}: unexpected status {status}: {}", v["instance_list"][0]),
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("service {sid} not RUNNING after 30 s (status {status})");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if (k + 1) % 100 == 0 {
            eprintln!("    {} / {} deployed", k + 1, sids.len());
        }
    }
    let root_rss_kb = rss_kb(root_pid);
    let cluster_rss_kb: Vec<u64> = cluster_pids.iter().map(|p| rss_kb(*p)).collect();
    let f = Figures {
        services: sids.len(),
        base: pct(&mut base, 0.5),
        placed: (pct(&mut placed, 0.5), pct(&mut placed, 0.99)),
        running: (pct(&mut running, 0.5), pct(&mut running, 0.99)),
        root_rss_kb,
        cluster_rss_kb,
    };
    drop(procs);
    let _ = fs::remove_dir_all(&work);
    Ok(f)
}
