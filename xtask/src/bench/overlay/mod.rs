//! `cargo xtask bench overlay`: the data plane, measured on one pair of worker network namespaces joined by
//! a veth pair (the underlay), for five datapaths in one run:
//!
//! 1. plain veth between the two worker namespaces (the limit, the baseline): a veth pair of its own beside
//!    the underlay, with nothing attached. It is measured beside every measurement of the others, in the
//!    same round and layout (alternating 1 s iperf3 runs, the ping-pong interleaved in chunks), and each
//!    ratio is the median over the rounds of the paired quotients: a shared machine's speed drifts over
//!    seconds to minutes, for every datapath at once;
//! 2. routed, no overlay: an instance namespace behind a veth on each worker, the kernel forwarding between
//!    them over the underlay (what any design with instances in namespaces behind veths and no eBPF pays,
//!    without the cost of an overlay: the lower bound of the kernel's own path);
//! 3. kernel VXLAN between the workers (what Flannel does): an instance namespace behind a bridge on each
//!    worker, the other worker's instance subnet routed over `vx0`;
//! 4. the NetManager tun overlay (`--no-ebpf`): client instance on worker A -> round-robin service IP ->
//!    its one instance on worker B;
//! 5. the NetManager eBPF fast path (the same NetManagers restarted with `--ebpf-object`), same flows.
//!
//! For each: single-stream and 8-stream TCP throughput (iperf3, cubic unless `--congestion` says otherwise)
//! and TCP request-response latency (a 64-byte ping-pong on one connection, implemented here: threads that
//! `setns` into the instance namespaces), in two CPU layouts (`--layouts`), each round measuring both on
//! the same setup:
//!
//! * `hosts`: each worker is a machine of its own. Worker A's processes (its NetManager, the client) run on
//!   the first half of the CPUs, worker B's on the second, and what arrives on a worker's veths (its ends
//!   of the underlay, the host ends of its instances' veths) is processed on its CPUs (RPS), as a NIC's
//!   interrupt is on its host and a host's own kernel work stays on its CPUs;
//! * `shared`: every process may run on every CPU. A veth runs its receiving side on the sending CPU, so the
//!   receiving worker's kernel work (decapsulation, its TCP) is done by the sender's CPU, and two workers'
//!   datapaths compete for the same cores: not how two machines behave, but how containers or namespaces
//!   as workers on one machine do.
//!
//! The root and cluster orchestrators (release binaries) run in worker A's namespace; the service and its IP
//! come from the root REST API, the instances are registered through the NetManagers' local API, exactly as
//! the NodeEngine does. Everything (namespaces, processes, bpffs pins) is removed at the end, also on error.

mod cpus;
mod iperf;
mod kernel;
mod measure;
mod netmanager;
mod report;
mod rr;
mod world;

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args as ClapArgs;
use parking_lot::Mutex;
use testbed::ip;

use crate::util::{cargo, sh, step};
use cpus::{allowed_cpus, placements, Side};
use kernel::{measure_kernel, Kernel};
use measure::{measure, with_plain, Plain};
use netmanager::{counters, deploy, NetManagers, Service};
use report::{hold, loadavg, report};
use rr::{can_connect, rr_server};
use world::{catch_signals, instance, wait_for, Ns, World};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Seconds per throughput measurement (with plain veth beside it: this many alternating 1 s runs each).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Rounds per datapath (each: 1-stream, 8-stream, ping-pong); the table shows each measure's median
    /// (single runs on a small shared machine vary widely).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Round trips per request-response latency measurement (one TCP connection).
    #[arg(long, default_value_t = 20000)]
    round_trips: u32,
    /// Request and response size of the latency ping-pong, bytes.
    #[arg(long, default_value_t = 64)]
    rr_bytes: usize,
    /// Which datapaths to measure besides plain veth (the baseline, always measured): any of routed, vxlan,
    /// tun, ebpf.
    #[arg(long, value_delimiter = ',', default_values_t = [Datapath::Routed, Datapath::Vxlan, Datapath::Tun, Datapath::Ebpf])]
    only: Vec<Datapath>,
    /// CPU layouts to measure (every round measures each on the same setup): `hosts` (each worker its own
    /// CPUs, received packets processed on the receiver's CPUs, as on two machines) and `shared` (every
    /// process on every CPU).
    #[arg(long, value_delimiter = ',', default_values_t = [Layout::Hosts, Layout::Shared])]
    layouts: Vec<Layout>,
    /// TCP congestion control of the iperf3 runs (`iperf3 -C`): cubic, the kernel's default, so the result
    /// does not depend on the machine's sysctl (BBR paces by timer, which without the fq qdisc caps a
    /// veth far below its speed).
    #[arg(long, default_value = "cubic")]
    congestion: String,
    /// Extra argument for both NetManagers (repeatable), e.g. `--nm-arg=--no-tun-offload` to compare settings.
    #[arg(long = "nm-arg", allow_hyphen_values = true)]
    nm_args: Vec<String>,
    /// Do not build (use the release binaries and the eBPF object already in the target directory).
    #[arg(long)]
    skip_build: bool,
    /// After the last measurement, keep the namespaces, instances and NetManagers running for inspection
    /// (instance pids and the service IP are printed) until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Routed,
    Vxlan,
    Tun,
    Ebpf,
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Datapath::Routed => "routed",
            Datapath::Vxlan => "vxlan",
            Datapath::Tun => "tun",
            Datapath::Ebpf => "ebpf",
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Hosts,
    Shared,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Hosts => "hosts",
            Layout::Shared => "shared",
        })
    }
}

const PLAIN: &str = "plain veth";
const ROUTED: &str = "routed, no ovl";
const VXLAN: &str = "kernel VXLAN";
const TUN: &str = "NetManager tun";
const EBPF: &str = "NetManager eBPF";
const IP_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The addresses of plain veth's own pair between the workers.
const REF_A: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 1);
const REF_B: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 2);
const NM_API: u16 = 6000;
const RR_PORT: u16 = 7777;
const ADMIN_PW: &str = "bench-overlay-pw";

// ---------------------------------------------------------------------------------------------------------
// the run

pub fn run(a: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    catch_signals();
    if !nix::unistd::geteuid().is_root() {
        bail!("bench overlay needs root (network namespaces, tun, eBPF)");
    }
    if !crate::util::have("iperf3") {
        bail!("iperf3 is missing: run `cargo xtask setup`");
    }
    let target = crate::util::target_dir();
    let bins = target.join("release");
    let object = target.join("bpf/netmanager-ebpf.o");
    if !a.skip_build {
        step("building release binaries (NetManager, orchestrators)");
        sh(cargo().args(["build", "--release", "-p", "oak-netmanager", "-p", "oak-orchestrators", "--bins"]))?;
        step("building the eBPF object");
        crate::ebpf::build()?;
    }
    for f in
        [bins.join("NetManager"), bins.join("root-orchestrator"), bins.join("cluster-orchestrator"), object.clone()]
    {
        if !f.exists() {
            bail!("{} is missing (run without --skip-build)", f.display());
        }
    }
    let id = std::process::id() % 100_000;
    let work = std::env::temp_dir().join(format!("oak-bench-overlay-{id}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut w = World {
        work,
        keep_work: false,
        procs: Vec::new(),
        netns: Vec::new(),
        pins: Vec::new(),
        stops: Vec::new(),
        placed: Vec::new(),
        workers: None,
    };
    let r = bench(&mut w, &a, id, &bins, &object, t0);
    if r.is_err() {
        w.keep_work = true;
    }
    step("cleaning up (processes, namespaces, bpffs pins)");
    drop(w);
    eprintln!("    total time {:.0} s", t0.elapsed().as_secs_f64());
    r
}

fn bench(w: &mut World, a: &Args, id: u32, bins: &Path, object: &Path, t0: Instant) -> anyhow::Result<()> {
    let load_start = loadavg();
    let (na, nb) = (format!("obwa{id}"), format!("obwb{id}"));
    step(&format!("worker namespaces {na} ({IP_A}) and {nb} ({IP_B}) joined by a veth pair (the underlay)"));
    w.add_netns(&na)?;
    w.add_netns(&nb)?;
    ip(&["-n", &na, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", &nb])?;
    for (n, addr) in [(&na, IP_A), (&nb, IP_B)] {
        ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", "up0"])?;
        ip(&["-n", n, "link", "set", "up0", "up"])?;
        ip(&["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    }
    // plain veth, the baseline: a second veth pair between the workers that nothing else uses
    ip(&["-n", &na, "link", "add", "ref0", "type", "veth", "peer", "name", "ref0", "netns", &nb])?;
    for (n, addr) in [(&na, REF_A), (&nb, REF_B)] {
        ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", "ref0"])?;
        ip(&["-n", n, "link", "set", "ref0", "up"])?;
    }
    let (wa, wb) = (Ns::Named(na.clone()), Ns::Named(nb.clone()));
    w.workers = Some((na.clone(), nb.clone()));
    let places = placements(&a.layouts);
    if places.is_empty() {
        bail!("no CPU layout left to measure in");
    }
    let cc = fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap_or_default();
    if !cc.split_whitespace().any(|c| c == a.congestion) {
        bail!("congestion control {:?} is not available here (available: {})", a.congestion, cc.trim());
    }
    for p in &places {
        eprintln!("    {} layout: worker A on CPUs {:?}, worker B on CPUs {:?}", p.layout, p.a, p.b);
    }
    let mut rows = Vec::new();

    // 1. plain veth
    let total = a.only.len().max(1);
    let mut phase = 1;
    let mut next = |what: &str| {
        step(&format!("[{phase}/{total}] {what}"));
        phase += 1;
    };
    if a.only.is_empty() {
        next("plain veth between the worker namespaces");
        rows.extend(measure(w, a, &places, PLAIN, &wa, &wb, REF_B, None)?);
        report(&rows, a, None, &load_start, t0);
        return Ok(());
    }
    step("plain veth (the baseline) between the worker namespaces: measured before each of the others' measurements");
    let pid = w.spawn("iperf3-server-plain", wb.cmd("iperf3").arg("-s"))?;
    w.placed.push((pid, Side::B));
    let stop = Arc::new(AtomicBool::new(false));
    w.stops.push(stop.clone());
    let rr_cpus = Arc::new(Mutex::new(allowed_cpus()));
    // (its thread ends with the run: the guard sets `stop`)
    rr_server(&wb.path(), a.rr_bytes, stop, rr_cpus.clone())?;
    wait_for("plain veth: iperf3 server up", Duration::from_secs(10), || can_connect(&wa.path(), REF_B, 5201))?;
    let mut plain = Plain {
        client: wa.clone(),
        server: wb.clone(),
        ip: REF_B,
        rr_cpus,
        all: places.iter().map(|_| Default::default()).collect(),
    };

    // 2. routed, no overlay: instance namespaces behind a veth, the workers forward between them
    if a.only.contains(&Datapath::Routed) {
        next("routed, no overlay: an instance namespace behind a veth on each worker, kernel forwarding over the underlay");
        rows.extend(measure_kernel(w, a, &places, &mut plain, Kernel::Routed, (&na, &nb), id)?);
    }

    // 3. kernel VXLAN, instance namespaces behind a bridge on each worker (as Flannel's cni0 + flannel.1)
    if a.only.contains(&Datapath::Vxlan) {
        next("kernel VXLAN (vx0, VNI 42, port 4789), instance namespace behind a bridge on each worker");
        rows.extend(measure_kernel(w, a, &places, &mut plain, Kernel::Vxlan, (&na, &nb), id)?);
    }
    let (tun_on, ebpf_on) = (a.only.contains(&Datapath::Tun), a.only.contains(&Datapath::Ebpf));
    if !tun_on && !ebpf_on {
        report(&with_plain(&plain, &places, &rows), a, None, &load_start, t0);
        return Ok(());
    }

    let Service { srv: (srv_id, srv_job), cli: (cli_id, cli_job), rr } = netmanager::orchestrators(w, bins, &na)?;
    let nms = NetManagers { args: a, bins, object, id };

    // the instances are deployed once, on the first datapath's NetManagers
    nms.start(w, "a", &na, !tun_on)?;
    nms.start(w, "b", &nb, !tun_on)?;
    let srv_pid = instance(w, "instance-srv-on-b")?;
    let cli_pid = instance(w, "instance-cli-on-a")?;
    let srv_ip = deploy(w, "b", &nb, srv_pid, &srv_id, &srv_job)?;
    let cli_ip = deploy(w, "a", &na, cli_pid, &cli_id, &cli_job)?;
    eprintln!("    instances: server {srv_ip} on B, client {cli_ip} on A; traffic to {rr}");
    let (ci, si) = (Ns::Pid(cli_pid), Ns::Pid(srv_pid));
    if tun_on {
        next("NetManager tun overlay (--no-ebpf): client instance on A -> service IP -> instance on B");
        let mut tun = measure(w, a, &places, TUN, &ci, &si, rr, Some(&mut plain))?;
        let ca = counters(&na)?;
        let fwd = ca["events"]["forward_translated"].as_u64().unwrap_or(0);
        eprintln!("    worker A proxy: forward_translated {fwd}, dropped_total {}", ca["dropped_total"]);
        if fwd == 0 {
            for r in &mut tun {
                r.note = format!("tun proxy translated nothing (counters: {ca}) {}", r.note);
            }
        }
        rows.extend(tun);
    }
    if !ebpf_on {
        report(&with_plain(&plain, &places, &rows), a, None, &load_start, t0);
        hold(
            a,
            &format!("worker namespaces {na} and {nb}; client instance pid {cli_pid} ({cli_ip}), server instance pid {srv_pid} ({srv_ip}), service IP {rr}"),
        );
        return Ok(());
    }
    if tun_on {
        next("NetManager eBPF fast path: the same NetManagers restarted with --ebpf-object");
        w.stop_proc("netmanager-a");
        w.stop_proc("netmanager-b");
        nms.start(w, "a", &na, true)?;
        nms.start(w, "b", &nb, true)?;
    } else {
        next("NetManager eBPF fast path: client instance on A -> service IP -> instance on B");
    }
    let before = counters(&na)?;
    let mut ebpf = measure(w, a, &places, EBPF, &ci, &si, rr, Some(&mut plain))?;
    let after = counters(&na)?;
    let cb = counters(&nb)?;
    let d = |k: &str| after["ebpf"][k].as_u64().unwrap_or(0).saturating_sub(before["ebpf"][k].as_u64().unwrap_or(0));
    let dt =
        |k: &str| after["events"][k].as_u64().unwrap_or(0).saturating_sub(before["events"][k].as_u64().unwrap_or(0));
    let (new_flow, encap, decap, rev) = (d("new_flow"), d("encap"), d("decap"), d("rev_nat"));
    let took_ebpf = after["ebpf"].is_object() && new_flow > 0 && encap > 0;
    eprintln!(
        "    worker A eBPF counters during the run: new_flow {new_flow}, encap {encap}, decap {decap}, rev_nat {rev}; tun proxy forward_translated {}",
        dt("forward_translated")
    );
    eprintln!("    worker A counters: {after}");
    eprintln!("    worker B counters: {cb}");
    let verdict = if took_ebpf {
        format!("traffic took the eBPF path (A: new_flow {new_flow}, encap {encap}, decap {decap})")
    } else {
        format!("traffic did NOT take the eBPF path (A: ebpf = {})", after["ebpf"])
    };
    if !took_ebpf {
        for r in &mut ebpf {
            r.note = format!("NOT on the eBPF path; {}", r.note);
        }
    }
    rows.extend(ebpf);

    report(&with_plain(&plain, &places, &rows), a, Some(&verdict), &load_start, t0);
    hold(a, &format!("worker namespaces {na} and {nb}; client instance pid {cli_pid} ({cli_ip}), server instance pid {srv_pid} ({srv_ip}), service IP {rr}"));
    Ok(())
}
