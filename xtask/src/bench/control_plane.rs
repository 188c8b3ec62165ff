//! `cargo xtask bench control-plane`: the control plane with real processes on loopback and the real
//! protocols (a root, cluster orchestrators, `oak-sim-worker` processes simulating workers). Four parts,
//! each with its baseline measured in the same run:
//!
//! - `tls`: N clusters x M simulated workers, then S services deployed one after another; the time from
//!   the deploy API call to placement on a worker (NODE_SCHEDULED seen in the API) and to RUNNING, p50/p99,
//!   against a no-op API round trip; root and cluster RSS; with TLS on every gRPC link and without.
//! - `etcd`: the same scenario with the root's store on a local etcd beside the embedded store, plus API
//!   throughput (a read-only list, a write creating applications) on both, as ratios etcd/embedded.
//! - `storm`: many simulated workers joining one cluster at once, against one worker joining alone.
//! - `scale`: many clusters whose worker count doubles step by step; root and cluster RSS and CPU at each
//!   step, against the same clusters idle without workers.
mod etcd;
mod procs;
mod scale;
mod table;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, ValueEnum};
use oak_proto::InstanceState;
use serde_json::{json, Value};

use super::stats::{pct, rss_kb};
use crate::util::{cargo, sh, step};
use procs::{wait, Procs};
use table::{count, fig, mib, ratio, Table};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Clusters to start (tls and etcd parts).
    #[arg(long, default_value_t = 10)]
    clusters: u32,
    /// Simulated workers per cluster (tls and etcd parts).
    #[arg(long, default_value_t = 100)]
    workers_per_cluster: u32,
    /// Services to deploy (one instance each; tls and etcd parts).
    #[arg(long, default_value_t = 500)]
    services: u32,
    /// First of the loopback ports used (root API; the rest follow, 1000 apart for each scenario).
    #[arg(long, default_value_t = 21000)]
    base_port: u16,
    /// Parts to run, any of: tls (placement with TLS on every gRPC link and without), etcd (placement and
    /// API throughput with the root's store on etcd beside the embedded store; needs an etcd binary and
    /// a root with --etcd-endpoints), storm (--storm-workers joining one cluster at once), scale
    /// (--scale-clusters clusters as their workers double up to --scale-workers each).
    #[arg(long, value_delimiter = ',', default_values_t = [Part::Tls, Part::Etcd, Part::Storm, Part::Scale])]
    only: Vec<Part>,
    /// Do not build (use the release binaries already in the target directory).
    #[arg(long)]
    skip_build: bool,
    /// API throughput (etcd part): concurrent clients, each with its own kept-alive connection.
    #[arg(long, default_value_t = 4)]
    api_clients: u32,
    /// API throughput: read requests (GET /api/applications) in all.
    #[arg(long, default_value_t = 2000)]
    api_reads: u32,
    /// API throughput: write requests (POST /api/application, one service each) in all.
    #[arg(long, default_value_t = 200)]
    api_writes: u32,
    /// Storm: simulated workers (one process) joining one cluster at once.
    #[arg(long, default_value_t = 1000)]
    storm_workers: u32,
    /// Scale: clusters.
    #[arg(long, default_value_t = 50)]
    scale_clusters: u32,
    /// Scale: simulated workers per cluster at the last step; the steps before halve it (x/8, x/4, x/2,
    /// x): 200 is 10,000 workers in 50 clusters.
    #[arg(long, default_value_t = 200)]
    scale_workers: u32,
    /// Scale: seconds over which CPU is measured at each step (after every worker is active).
    #[arg(long, default_value_t = 10)]
    scale_window: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Tls,
    Etcd,
    Storm,
    Scale,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.to_possible_value().expect("no skipped variants").get_name())
    }
}

/// Where the root keeps its store.
#[derive(Clone, Copy)]
enum Store<'a> {
    Embedded,
    /// etcd at this endpoint; whether the root has `--etcd-max-txn-ops`.
    Etcd(&'a etcd::Etcd, bool),
}

/// A started root: its API, an admin's bearer token, its ports.
struct Root {
    api: String,
    auth: String,
    pid: u32,
    grpc_port: u16,
    net_port: u16,
}

impl Root {
    fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(ureq::get(&format!("{}{path}", self.api)).set("Authorization", &self.auth).call()?.into_json()?)
    }

    /// Active clusters and their active workers, as the root shows them.
    fn active(&self) -> Option<(u32, u64)> {
        let cs = self.get("/api/clusters/active").ok()?.as_array().cloned()?;
        Some((cs.len() as u32, cs.iter().filter_map(|c| c["active_nodes"].as_u64()).sum()))
    }
}

const ADMIN_PW: &str = "bench-pw";

/// Starts a root with its ports at `p`, `p + 1`, `p + 2`, waits for its API and logs in as Admin.
fn start_root(
    procs: &mut Procs,
    bins: &Path,
    work: &Path,
    p: u16,
    store: Store,
    report_interval_ms: u32,
) -> anyhow::Result<Root> {
    let (api_port, grpc_port, net_port) = (p, p + 1, p + 2);
    let mut args: Vec<String> = vec![
        "--api-addr".into(),
        format!("127.0.0.1:{api_port}"),
        "--grpc-addr".into(),
        format!("127.0.0.1:{grpc_port}"),
        "--netsvc-addr".into(),
        format!("127.0.0.1:{net_port}"),
        "--data-dir".into(),
        work.join("root").display().to_string(),
        "--report-interval-ms".into(),
        report_interval_ms.to_string(),
    ];
    if let Store::Etcd(e, max_txn_ops) = store {
        args.extend(["--etcd-endpoints".into(), e.endpoint.clone(), "--etcd-prefix".into(), etcd::PREFIX.into()]);
        if max_txn_ops {
            args.extend(["--etcd-max-txn-ops".into(), etcd::MAX_TXN_OPS.to_string()]);
        }
    }
    let pid = procs.spawn("root", &bins.join("root-orchestrator"), &args, &[("OAK_ADMIN_PASSWORD", ADMIN_PW)])?;
    let api = format!("http://127.0.0.1:{api_port}");
    wait("root API", Duration::from_secs(30), || {
        procs.check_alive().is_err() || ureq::get(&format!("{api}/api/health")).call().is_ok()
    })?;
    procs.check_alive()?;
    let token = ureq::post(&format!("{api}/api/auth/login"))
        .send_json(json!({"username":"Admin","password":ADMIN_PW}))?
        .into_json::<Value>()?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    Ok(Root { api, auth: format!("Bearer {token}"), pid, grpc_port, net_port })
}

/// Starts cluster `i` (worker registry at `p + 100 + i`, network service at `p + 300 + i`); returns its
/// pid and worker registry port.
fn start_cluster(
    procs: &mut Procs,
    bins: &Path,
    work: &Path,
    root: &Root,
    p: u16,
    i: u32,
) -> anyhow::Result<(u32, u16)> {
    let (wport, nport) = (p + 100 + i as u16, p + 300 + i as u16);
    let name = format!("bench-c{i}");
    let pid = procs.spawn(
        &name,
        &bins.join("cluster-orchestrator"),
        &[
            "--root-address".into(),
            format!("127.0.0.1:{}", root.grpc_port),
            "--root-netsvc-port".into(),
            root.net_port.to_string(),
            "--worker-addr".into(),
            format!("127.0.0.1:{wport}"),
            "--netsvc-addr".into(),
            format!("127.0.0.1:{nport}"),
            "--data-dir".into(),
            work.join(&name).display().to_string(),
        ],
        &[("CLUSTER_NAME", name.as_str()), ("CLUSTER_LOCATION", "bench")],
    )?;
    Ok((pid, wport))
}

/// Starts one `oak-sim-worker` process simulating `count` workers named `<prefix>-<i>` at the cluster
/// whose worker registry is `wport` (8 cores, 16 GiB each, 10 ms from CREATING to RUNNING).
fn start_sim(procs: &mut Procs, bins: &Path, wport: u16, count: u32, prefix: &str) -> anyhow::Result<u32> {
    procs.spawn(
        &format!("workers-{prefix}"),
        &bins.join("oak-sim-worker"),
        &[
            "--cluster".into(),
            format!("127.0.0.1:{wport}"),
            "--count".into(),
            count.to_string(),
            "--name".into(),
            prefix.into(),
            "--cpu-cores".into(),
            "8".into(),
            "--memory-mb".into(),
            "16384".into(),
            "--start-delay-ms".into(),
            "10".into(),
        ],
        &[],
    )
}

/// A scratch directory for one scenario (removed first if left from an earlier run).
fn scratch(what: &str) -> anyhow::Result<PathBuf> {
    let work = std::env::temp_dir().join(format!("oak-bench-cp-{}-{what}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    Ok(work)
}

/// Requests per second and median latency of one kind of API request.
#[derive(Clone, Copy)]
struct Rate {
    per_s: f64,
    p50_ms: f64,
}

/// What one run of the placement scenario measured.
struct Figures {
    services: usize,
    /// no-op API round trip p50 (ms)
    base: f64,
    placed: (f64, f64),
    running: (f64, f64),
    root_rss_kb: u64,
    cluster_rss_kb: Vec<u64>,
    /// API throughput, reads then writes (when asked for)
    throughput: Option<(Rate, Rate)>,
    /// etcd's RSS and the root's keys in it (on etcd)
    etcd: Option<(u64, u64)>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.skip_build {
        step("building release binaries (orchestrators, simulated workers)");
        sh(cargo().args(["build", "--release", "-p", "oak-orchestrators", "--bins"]))?;
    }
    let bins: PathBuf = crate::util::target_dir().join("release");
    if a.clusters > 200 || a.scale_clusters > 200 {
        bail!("at most 200 clusters (each takes two ports of its scenario's 1000)");
    }
    if a.base_port > u16::MAX - 5000 {
        bail!("--base-port at most {}: the scenarios take the 5000 ports from it", u16::MAX - 5000);
    }
    // a cluster holds a connection per worker (and the storm's all of them), a simulator process one per
    // simulated worker
    let most = [a.workers_per_cluster, a.storm_workers, a.scale_workers].into_iter().max().unwrap_or(0);
    procs::raise_nofile(u64::from(most) * 2 + 1024);
    let want = |p: Part| a.only.contains(&p);
    let started = Instant::now();
    // the summary, printed at the end: one section per part, or why it was not measured
    let mut summary: Vec<String> = Vec::new();
    let mut failed = 0;
    let mut part = |name: &str, summary: &mut Vec<String>, r: anyhow::Result<String>, t: Instant| {
        let took = t.elapsed().as_secs_f64();
        match r {
            Ok(s) => {
                eprintln!("    {name}: done in {took:.0} s");
                summary.push(format!("{s}\n  ({name}: {took:.0} s)"));
            }
            Err(e) => {
                eprintln!("    {name}: FAILED after {took:.0} s: {e:#}");
                summary.push(format!("{name}: FAILED after {took:.0} s: {e:#}"));
                failed += 1;
            }
        }
    };

    if want(Part::Tls) || want(Part::Etcd) {
        let t = Instant::now();
        step("placement, embedded store, TLS on every gRPC link (the default)");
        let on = scenario(&a, &bins, a.base_port, true, Store::Embedded, want(Part::Etcd));
        if want(Part::Tls) {
            let r = on.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|on| {
                step(&format!("placement, without TLS ({}=1), for comparison", oak_trust::PLAINTEXT_ENV));
                let off = scenario(&a, &bins, a.base_port + 1000, false, Store::Embedded, false)?;
                Ok(tls_table(&a, on, &off))
            });
            part("tls", &mut summary, r, t);
        }
        if want(Part::Etcd) {
            let t = Instant::now();
            let r = on.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|on| {
                step("placement and API throughput with the root's store on etcd");
                etcd_part(&a, &bins, on)
            });
            part("etcd", &mut summary, r, t);
        }
    }
    if want(Part::Storm) {
        let t = Instant::now();
        step(&format!(
            "registration storm: {} simulated workers joining one cluster at once",
            count(a.storm_workers.into())
        ));
        let r = scale::storm(&bins, a.base_port + 3000, a.storm_workers);
        part("storm", &mut summary, r, t);
    }
    if want(Part::Scale) {
        let t = Instant::now();
        step(&format!(
            "scale: {} clusters, simulated workers doubling up to {} each ({} in all)",
            a.scale_clusters,
            a.scale_workers,
            count(u64::from(a.scale_clusters * a.scale_workers))
        ));
        let r = scale::scale(&bins, a.base_port + 4000, a.scale_clusters, a.scale_workers, a.scale_window);
        part("scale", &mut summary, r, t);
    }

    println!();
    for s in &summary {
        println!("{s}\n");
    }
    println!("control-plane bench: {:.0} s in all", started.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} part(s) failed (above)");
    }
    Ok(())
}

/// The etcd part: etcd beside the embedded store (`on`, measured before in this run), or why not.
fn etcd_part(a: &Args, bins: &Path, on: &Figures) -> anyhow::Result<String> {
    let Some(bin) = etcd::binary() else {
        let why = "etcd: not measured (no etcd binary: /usr/bin/etcd or etcd on PATH; `cargo xtask setup` installs it)";
        eprintln!("    {why}");
        return Ok(why.into());
    };
    let (endpoints, max_txn_ops) = etcd::root_support(&bins.join("root-orchestrator"))?;
    if !endpoints {
        let why = "etcd: not measured (root without --etcd-endpoints)";
        eprintln!("    {why}");
        return Ok(why.into());
    }
    let work = scratch("etcd-server")?;
    let e = etcd::Etcd::start(&bin, &work)?;
    let f = scenario(a, bins, a.base_port + 2000, true, Store::Etcd(&e, max_txn_ops), true)?;
    drop(e);
    let _ = fs::remove_dir_all(&work);
    Ok(etcd_table(a, on, &f))
}

fn placement_rows(t: &mut Table, x: &Figures, y: &Figures) {
    let mut row =
        |what: &str, x: f64, y: f64, unit: &str| t.row([what.into(), fig(x, unit), fig(y, unit), ratio(x, y)]);
    row("no-op API round trip p50 (baseline)", x.base, y.base, "ms");
    row("API call -> placed on a worker p50", x.placed.0, y.placed.0, "ms");
    row("API call -> placed on a worker p99", x.placed.1, y.placed.1, "ms");
    row("API call -> RUNNING (sim, 10 ms) p50", x.running.0, y.running.0, "ms");
    row("API call -> RUNNING (sim, 10 ms) p99", x.running.1, y.running.1, "ms");
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
    row("RSS root", x.root_rss_kb as f64 / 1024.0, y.root_rss_kb as f64 / 1024.0, "MiB");
    row("RSS clusters, mean", mean(&x.cluster_rss_kb), mean(&y.cluster_rss_kb), "MiB");
    row("RSS clusters, max", max(&x.cluster_rss_kb), max(&y.cluster_rss_kb), "MiB");
}

fn tls_table(a: &Args, on: &Figures, off: &Figures) -> String {
    let mut t = Table::new(&["", "TLS on", "TLS off", "on/off"]);
    placement_rows(&mut t, on, off);
    format!(
        "placement: {} clusters x {} workers, {} services; TLS on every gRPC link vs off, same run\n{}\n  \
         placed p50 / no-op API p50: {:.1}x with TLS, {:.1}x without",
        a.clusters,
        a.workers_per_cluster,
        on.services,
        t.render(),
        on.placed.0 / on.base,
        off.placed.0 / off.base
    )
}

fn etcd_table(a: &Args, embedded: &Figures, on_etcd: &Figures) -> String {
    let mut t = Table::new(&["", "etcd", "embedded", "etcd/embedded"]);
    placement_rows(&mut t, on_etcd, embedded);
    if let (Some((er, ew)), Some((br, bw))) = (on_etcd.throughput, embedded.throughput) {
        let mut row =
            |what: &str, x: f64, y: f64, unit: &str| t.row([what.into(), fig(x, unit), fig(y, unit), ratio(x, y)]);
        row("GET /api/applications, requests/s", er.per_s, br.per_s, "/s");
        row("GET /api/applications p50", er.p50_ms, br.p50_ms, "ms");
        row("POST /api/application, requests/s", ew.per_s, bw.per_s, "/s");
        row("POST /api/application p50", ew.p50_ms, bw.p50_ms, "ms");
    }
    let mut s = format!(
        "root store on etcd vs embedded (redb): {} clusters x {} workers, {} services, TLS on; \
         API throughput with {} clients ({} reads, {} writes), same run\n{}",
        a.clusters,
        a.workers_per_cluster,
        on_etcd.services,
        a.api_clients,
        count(a.api_reads.into()),
        count(a.api_writes.into()),
        t.render()
    );
    s.push_str(&format!(
        "\n  placed p50 / no-op API p50: {:.1}x on etcd, {:.1}x embedded",
        on_etcd.placed.0 / on_etcd.base,
        embedded.placed.0 / embedded.base
    ));
    if let Some((rss, keys)) = on_etcd.etcd {
        s.push_str(&format!(
            "\n  etcd itself: RSS {}, {} keys of the root's under {}/",
            mib(rss),
            count(keys),
            etcd::PREFIX
        ));
    }
    s
}

/// One run: a root (store embedded or on etcd), the clusters and their simulated workers (with TLS, or
/// without), the deploys, and when asked the API throughput.
fn scenario(a: &Args, bins: &Path, p: u16, tls: bool, store: Store, throughput: bool) -> anyhow::Result<Figures> {
    let what = match (tls, store) {
        (_, Store::Etcd(..)) => "etcd",
        (true, _) => "tls",
        (false, _) => "plain",
    };
    let work = scratch(what)?;
    let mut procs = Procs::new(&work, !tls);
    step(&format!(
        "starting root, {} clusters, {} simulated workers each (logs in {})",
        a.clusters,
        a.workers_per_cluster,
        work.display()
    ));
    let root = start_root(&mut procs, bins, &work, p, store, 1000)?;
    let mut cluster_pids = Vec::new();
    for i in 0..a.clusters {
        let (pid, wport) = start_cluster(&mut procs, bins, &work, &root, p, i)?;
        cluster_pids.push(pid);
        start_sim(&mut procs, bins, wport, a.workers_per_cluster, &format!("c{i}-w"))?;
    }
    let total = u64::from(a.clusters * a.workers_per_cluster);
    wait(&format!("{} clusters with {total} workers registered", a.clusters), Duration::from_secs(300), || {
        procs.check_alive().is_err() || root.active() == Some((a.clusters, total))
    })?;
    procs.check_alive()?;

    // baseline: a no-op authenticated API round trip
    let mut base = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        root.get("/api/clusters/active")?;
        base.push(t.elapsed().as_secs_f64() * 1e3);
    }

    step(&format!("deploying {} services, one at a time", a.services));
    let mut placed = Vec::new();
    let mut running = Vec::new();
    let per_app = 10;
    let mut sids = Vec::new();
    for app in 0..a.services.div_ceil(per_app) {
        let n = per_app.min(a.services - app * per_app);
        let apps = create_app(&ureq::agent(), &root, &format!("a{app}"), n)?;
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
        ureq::post(&format!("{}/api/service/{sid}/instance", root.api)).set("Authorization", &root.auth).call()?;
        let mut got_placed = false;
        loop {
            let v = root.get(&format!("/api/service/{sid}"))?;
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
    let root_rss_kb = rss_kb(root.pid);
    let cluster_rss_kb: Vec<u64> = cluster_pids.iter().map(|p| rss_kb(*p)).collect();
    let throughput = if throughput { Some(api_throughput(a, &root)?) } else { None };
    let etcd = match store {
        Store::Etcd(e, _) => Some((rss_kb(e.pid), e.root_keys()?)),
        Store::Embedded => None,
    };
    procs.check_alive()?;
    let f = Figures {
        services: sids.len(),
        base: pct(&mut base, 0.5),
        placed: (pct(&mut placed, 0.5), pct(&mut placed, 0.99)),
        running: (pct(&mut running, 0.5), pct(&mut running, 0.99)),
        root_rss_kb,
        cluster_rss_kb,
        throughput,
        etcd,
    };
    drop(procs);
    let _ = fs::remove_dir_all(&work);
    Ok(f)
}

/// Creates application `name` with `services` container services; answers the user's applications.
fn create_app(agent: &ureq::Agent, root: &Root, name: &str, services: u32) -> anyhow::Result<Value> {
    let ms: Vec<Value> = (0..services)
        .map(|j| {
            json!({"microserviceID":"","microservice_name":format!("s{j}"),"microservice_namespace":"b",
            "virtualization":"container","code":"docker.io/library/nginx:latest","memory":64,"vcpus":0.1})
        })
        .collect();
    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":name,"application_namespace":"bench","application_desc":"","microservices":ms}]});
    Ok(agent
        .post(&format!("{}/api/application", root.api))
        .set("Authorization", &root.auth)
        .send_json(sla)?
        .into_json()?)
}

/// API throughput on the store as the deploys left it: `--api-reads` GET /api/applications, then
/// `--api-writes` POST /api/application (one service each), split over `--api-clients` threads with a
/// kept-alive connection each.
fn api_throughput(a: &Args, root: &Root) -> anyhow::Result<(Rate, Rate)> {
    let clients = a.api_clients.max(1);
    let rate = |what: &str, n: u32, f: &(dyn Fn(&ureq::Agent, u32, u32) -> anyhow::Result<()> + Sync)| {
        eprintln!("    {what}: {n} requests from {clients} clients");
        let t = Instant::now();
        let lat: anyhow::Result<Vec<Vec<f64>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..clients)
                .map(|c| {
                    s.spawn(move || -> anyhow::Result<Vec<f64>> {
                        let agent = ureq::agent();
                        let mine = n / clients + u32::from(c < n % clients);
                        let mut lat = Vec::with_capacity(mine as usize);
                        for k in 0..mine {
                            let t = Instant::now();
                            f(&agent, c, k)?;
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        Ok(lat)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("client thread")).collect()
        });
        let secs = t.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = lat?.into_iter().flatten().collect();
        eprintln!("    {what}: {:.0} requests/s", lat.len() as f64 / secs);
        anyhow::Ok(Rate { per_s: lat.len() as f64 / secs, p50_ms: pct(&mut lat, 0.5) })
    };
    step("API throughput");
    let reads = rate("GET /api/applications", a.api_reads, &|agent, _, _| {
        agent.get(&format!("{}/api/applications", root.api)).set("Authorization", &root.auth).call()?;
        Ok(())
    })?;
    let writes = rate("POST /api/application", a.api_writes, &|agent, c, k| {
        create_app(agent, root, &format!("w{c}n{k}"), 1).map(drop)
    })?;
    Ok((reads, writes))
}
