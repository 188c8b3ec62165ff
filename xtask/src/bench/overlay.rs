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
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args as ClapArgs;
use parking_lot::Mutex;
use serde_json::{json, Value};
use testbed::{in_netns, ip, join, spawn_in_netns};

use crate::util::{cargo, sh, step};

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

/// Which worker a process belongs to (for the `hosts` layout's CPU split).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// One layout on this machine: the CPUs of worker A and of worker B.
#[derive(Clone)]
struct Placement {
    layout: Layout,
    a: Vec<usize>,
    b: Vec<usize>,
}

impl Placement {
    fn cpus(&self, side: Side) -> &[usize] {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

/// The CPUs this process may use.
fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect(),
    }
}

/// The placements of `layouts` on this machine; `hosts` needs at least two CPUs and is left out (with a
/// word) without them.
fn placements(layouts: &[Layout]) -> Vec<Placement> {
    let all = allowed_cpus();
    let mut out = Vec::new();
    for &layout in layouts {
        match layout {
            Layout::Shared => out.push(Placement { layout, a: all.clone(), b: all.clone() }),
            Layout::Hosts if all.len() >= 2 => {
                let (a, b) = all.split_at(all.len() / 2);
                out.push(Placement { layout, a: a.to_vec(), b: b.to_vec() });
            }
            Layout::Hosts => {
                eprintln!("    the hosts layout needs 2 CPUs or more; this machine offers {}: left out", all.len())
            }
        }
    }
    out
}

/// `cpus` as a sysfs CPU mask (comma-separated 32-bit hex groups, highest first).
fn cpu_mask(cpus: &[usize]) -> String {
    let groups = cpus.iter().max().map(|m| m / 32 + 1).unwrap_or(1);
    let mut words = vec![0u32; groups];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    words.iter().rev().map(|w| format!("{w:x}")).collect::<Vec<_>>().join(",")
}

fn cpu_set(cpus: &[usize]) -> nix::sched::CpuSet {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        let _ = set.set(c);
    }
    set
}

/// Binds every thread of `pid` to `cpus` (threads it starts later inherit it); a process that is gone is
/// skipped.
fn pin_process(pid: u32, cpus: &[usize]) {
    let set = cpu_set(cpus);
    let tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for tid in tids {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
    }
}

/// Binds the calling thread to `cpus`.
fn pin_thread(cpus: &[usize]) {
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu_set(cpus));
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

/// Set by SIGINT/SIGTERM: the run stops at the next check and the guard cleans up (the children, in the
/// same process group, get the Ctrl-C too).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn catch_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        let _ = unsafe { sigaction(sig, &act) };
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// cleanup guard

/// Everything the run created; dropped (also on error or panic) it stops the processes, deletes the
/// namespaces and the bpffs pins, and removes the work directory (kept when the run failed, for the logs).
struct World {
    work: PathBuf,
    keep_work: bool,
    procs: Vec<(String, Child)>,
    netns: Vec<String>,
    pins: Vec<PathBuf>,
    /// Stop flags of the ping-pong servers still running.
    stops: Vec<Arc<AtomicBool>>,
    /// Processes that belong to a worker (the layouts bind them to its CPUs).
    placed: Vec<(u32, Side)>,
    /// The two worker namespaces (their veths steer received packets to the worker's CPUs in the hosts layout).
    workers: Option<(String, String)>,
}

impl World {
    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.work.join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.procs.push((name.to_string(), child));
        Ok(pid)
    }

    /// Puts the processes of each worker on its CPUs of `p`, and steers what arrives on each worker's veths
    /// (its ends of the underlay and of plain veth's pair, the host ends of its instances' veths) to them
    /// (hosts) or lets it run where it arrives (shared: no RPS). On two machines a worker's kernel work
    /// all runs on its own CPUs; here a socket's TSQ handler can run on the other worker's CPU (the
    /// receiver frees the sender's skbs), and without RPS what it transmits into an instance's veth would
    /// be processed there, overtaking the packets queued on the sender's CPU (spurious retransmits).
    fn apply(&mut self, p: &Placement) -> anyhow::Result<()> {
        self.placed.retain(|(pid, _)| Path::new(&format!("/proc/{pid}")).exists());
        for &(pid, side) in &self.placed {
            pin_process(pid, p.cpus(side));
        }
        if let Some((na, nb)) = &self.workers {
            for (ns, side) in [(na, Side::A), (nb, Side::B)] {
                let mask = if p.layout == Layout::Hosts { cpu_mask(p.cpus(side)) } else { "0".into() };
                let script = format!(
                    "for d in $(ip -o link show type veth | sed -n 's/^[0-9]*: \\([^@:]*\\).*/\\1/p'); do \
                     for q in /sys/class/net/$d/queues/rx-*/rps_cpus; do echo {mask} > $q || exit 1; done; done"
                );
                ip(&["netns", "exec", ns, "sh", "-c", &script])
                    .with_context(|| format!("setting RPS on the veths of {ns}"))?;
            }
        }
        Ok(())
    }

    /// Stops the process `name` (SIGTERM, then SIGKILL after 3 s).
    fn stop_proc(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, c) = self.procs.remove(i);
            terminate(c);
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn terminate(mut c: Child) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &self.stops {
            s.store(true, Ordering::Relaxed);
        }
        // newest first: clients and instances before the NetManagers, the orchestrators last
        while let Some((_, c)) = self.procs.pop() {
            terminate(c);
        }
        for n in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
        for p in &self.pins {
            let _ = fs::remove_dir_all(p);
        }
        if self.keep_work {
            eprintln!("    logs kept in {}", self.work.display());
        } else {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// helpers

/// HTTP with JSON bodies from inside `ns` (the services listen on that namespace's loopback).
fn http(ns: &str, method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> anyhow::Result<Value> {
    let (method, url, token) = (method.to_string(), url.to_string(), token.map(str::to_string));
    in_netns(ns, move || -> anyhow::Result<Value> {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        let mut req = agent.request(&method, &url);
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok(r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => {
                bail!("{method} {url}: HTTP {code}: {}", r.into_string().unwrap_or_default())
            }
            Err(e) => bail!("{method} {url}: {e}"),
        }
    })?
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut last = String::new();
    loop {
        check_interrupted()?;
        match f() {
            Ok(true) => {
                eprintln!("    {what}: ok ({:.1} s)", t.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An "instance": `sleep` in a fresh network namespace (as the NodeEngine's containers); returns its pid.
fn instance(w: &mut World, name: &str) -> anyhow::Result<u32> {
    let own = fs::read_link("/proc/self/ns/net")?;
    let pid = w.spawn(name, Command::new("unshare").args(["-n", "sleep", "3600"]))?;
    let t = Instant::now();
    while fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() == Some(&own) {
        if t.elapsed() > Duration::from_secs(5) {
            bail!("unshare did not create a network namespace");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    testbed::run(&["nsenter", "-t", &pid.to_string(), "-n", "ip", "link", "set", "lo", "up"])?;
    Ok(pid)
}

// ---------------------------------------------------------------------------------------------------------
// measurements

/// How to run a command in a namespace: `ip netns exec NAME` or `nsenter -t PID -n`.
#[derive(Clone)]
enum Ns {
    Named(String),
    Pid(u32),
}

impl Ns {
    /// The namespace as testbed names it: an `ip netns` name, or the path of a process's namespace.
    fn path(&self) -> String {
        match self {
            Ns::Named(n) => n.clone(),
            Ns::Pid(p) => format!("/proc/{p}/ns/net"),
        }
    }
    fn cmd(&self, prog: &str) -> Command {
        match self {
            Ns::Named(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, prog]);
                c
            }
            Ns::Pid(p) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &p.to_string(), "-n", prog]);
                c
            }
        }
    }
}

/// One iperf3 TCP run (`streams` parallel streams, congestion control `cc`) from `client`, on `cpus`, to
/// `server`; bits/s received and the sender's retransmits.
fn iperf(
    client: &Ns,
    server: Ipv4Addr,
    secs: u32,
    streams: u32,
    cc: &str,
    cpus: &[usize],
) -> anyhow::Result<(f64, u64)> {
    let mut c = Command::new("timeout");
    c.arg((secs + 30).to_string());
    let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    c.args(["taskset", "-c", &list.join(",")]);
    let inner = client.cmd("iperf3");
    c.arg(inner.get_program());
    c.args(inner.get_args());
    c.args([
        "-c",
        &server.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    c.args(["-C", cc]);
    let out = c.output().context("running iperf3")?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Ok((bps, v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0))),
        None => bail!(
            "iperf3 -P {streams} to {server} failed ({}): {} {}",
            out.status,
            v["error"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// One datapath's throughput, logged: iperf3 for `secs` seconds; Gbit/s.
fn iperf_logged(
    label: &str,
    client: &Ns,
    server: Ipv4Addr,
    secs: u32,
    streams: u32,
    cc: &str,
    cpus: &[usize],
) -> anyhow::Result<f64> {
    let (bps, retrans) = iperf(client, server, secs, streams, cc, cpus)?;
    eprintln!("      {label}: iperf3 -P {streams}: {:.2} Gbit/s (retransmits {retrans})", bps / 1e9);
    Ok(bps / 1e9)
}

/// Plain veth's throughput (from `base` to `base_to`) and a datapath's (from `own` to `to`): `secs` 1-second
/// iperf3 runs each, alternating (plain, datapath, plain, ...), so both see the same seconds of this
/// machine (its speed changes within seconds). Each figure is the median of its runs (a slow second of the
/// machine hits one side only), in Gbit/s.
#[allow(clippy::too_many_arguments)]
fn iperf_pair(
    label: &str,
    base: &Ns,
    base_to: Ipv4Addr,
    own: &Ns,
    to: Ipv4Addr,
    secs: u32,
    streams: u32,
    cc: &str,
    cpus: &[usize],
) -> anyhow::Result<(anyhow::Result<f64>, anyhow::Result<f64>)> {
    // per side: every run's (bits/s, retransmits), or why one failed
    type Runs = anyhow::Result<Vec<(f64, u64)>>;
    let (mut rb, mut ro): (Runs, Runs) = (Ok(Vec::new()), Ok(Vec::new()));
    for _ in 0..secs.max(1) {
        check_interrupted()?;
        for (r, ns, ip) in [(&mut rb, base, base_to), (&mut ro, own, to)] {
            if let Ok(v) = r {
                match iperf(ns, ip, 1, streams, cc, cpus) {
                    Ok(x) => v.push(x),
                    Err(e) => *r = Err(e),
                }
            }
        }
    }
    let summary = |label: &str, r: Runs| -> anyhow::Result<f64> {
        let v = r?;
        let g: Vec<f64> = v.iter().map(|(b, _)| b / 1e9).collect();
        let mid = median(g.clone()).unwrap_or(0.0);
        let (lo, hi) = (g.iter().cloned().fold(f64::MAX, f64::min), g.iter().cloned().fold(0.0, f64::max));
        let retrans: u64 = v.iter().map(|(_, r)| r).sum();
        eprintln!("      {label}: iperf3 -P {streams}, {} x 1 s: median {mid:.2} Gbit/s (runs {lo:.2}-{hi:.2}, retransmits {retrans})", g.len());
        Ok(mid)
    };
    Ok((summary(PLAIN, rb), summary(label, ro)))
}

/// The ping-pong server in `ns`: echoes fixed-size messages on every connection (one at a time, each served
/// on the CPUs `cpus` holds when it is accepted) until `stop`; the thread ends (and its listener closes)
/// within 10 ms of `stop` once no connection is open.
fn rr_server(
    ns: &str,
    size: usize,
    stop: Arc<AtomicBool>,
    cpus: Arc<Mutex<Vec<usize>>>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = spawn_in_netns(ns, move || {
        let l = match TcpListener::bind(("0.0.0.0", RR_PORT)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut buf = vec![0u8; size];
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    pin_thread(&cpus.lock());
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    while s.read_exact(&mut buf).is_ok() {
                        if s.write_all(&buf).is_err() {
                            break;
                        }
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })?;
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(listening) => listening?,
        // the thread ended before a word: it could not enter the namespace, and says why
        Err(RecvTimeoutError::Disconnected) => {
            return Err(join(ns, h).err().unwrap_or_else(|| anyhow!("ping-pong server ended before listening")))
        }
        Err(RecvTimeoutError::Timeout) => bail!("ping-pong server did not start"),
    }
    Ok(h)
}

/// A ping-pong connection from `ns` to `port` at `to` (sockets keep the namespace they were created in),
/// warmed up with `warmup` round trips.
fn rr_connect(ns: &str, to: Ipv4Addr, port: u16, size: usize, warmup: u32) -> anyhow::Result<TcpStream> {
    in_netns(ns, move || -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(3))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (msg, mut buf) = (vec![0x5au8; size], vec![0u8; size]);
        for _ in 0..warmup {
            s.write_all(&msg)?;
            s.read_exact(&mut buf)?;
        }
        Ok(s)
    })?
}

/// `n` round trips on `s`, each round trip's time in µs appended to `rtts`.
fn rr_rounds(s: &mut TcpStream, size: usize, n: u32, rtts: &mut Vec<f64>) -> anyhow::Result<()> {
    let (msg, mut buf) = (vec![0x5au8; size], vec![0u8; size]);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(())
}

/// Echoes `n` messages of `size` bytes on `s`.
fn rr_echo(s: &mut TcpStream, size: usize, n: u32) -> std::io::Result<()> {
    let mut buf = vec![0u8; size];
    for _ in 0..n {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    Ok(())
}

/// A ping-pong's (p50, p99) in µs, or why it failed.
type Quantiles = anyhow::Result<(f64, f64)>;

/// (p50, p99) of round-trip times.
fn quantiles(mut rtts: Vec<f64>) -> (f64, f64) {
    rtts.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    (q(0.5), q(0.99))
}

fn warmup(n: u32) -> u32 {
    n.min(1000) / 10 + 10
}

/// `n` round trips of `size` bytes on one TCP connection from `ns`, on `cpus`, to `to`; (p50, p99) in µs.
fn rr_client(ns: &str, to: Ipv4Addr, size: usize, n: u32, cpus: &[usize]) -> Quantiles {
    let mut s = rr_connect(ns, to, RR_PORT, size, warmup(n))?;
    let cpus = cpus.to_vec();
    std::thread::spawn(move || -> Quantiles {
        pin_thread(&cpus);
        let mut rtts = Vec::with_capacity(n as usize);
        rr_rounds(&mut s, size, n.max(1), &mut rtts)?;
        Ok(quantiles(rtts))
    })
    .join()
    .map_err(|_| anyhow!("ping-pong thread panicked"))?
}

/// Chunks each ping-pong of a pair is cut into.
const RR_CHUNKS: u32 = 10;
/// The port of the paired ping-pong's listeners.
const RR_PAIR_PORT: u16 = 7778;

/// One side of a paired ping-pong: the client's namespace, the server's, and the address the client uses.
struct RrEnd<'a> {
    client_ns: &'a str,
    server_ns: &'a str,
    to: Ipv4Addr,
}

/// Plain veth's ping-pong (`base`) and a datapath's (`own`), `n` round trips of `size` bytes each, interleaved
/// in ten chunks (plain, datapath, plain, ...), by one client thread on `client_cpus` and one server thread on
/// `server_cpus` that serve both connections in turn. On a VM most of a round trip is waking a halted vCPU,
/// and that cost drifts over seconds; and with every CPU allowed (shared layout) where the scheduler puts a
/// server thread changes it several times over. Interleaved on the same two threads, both are measured
/// under the same conditions. Returns ((p50, p99) of plain veth, (p50, p99) of the datapath) in
/// µs; when one side cannot connect, the other is measured alone.
fn rr_pair(
    base: RrEnd,
    own: RrEnd,
    size: usize,
    n: u32,
    client_cpus: &[usize],
    server_cpus: &[usize],
) -> (Quantiles, Quantiles) {
    let listen = |ns: &str| {
        in_netns(ns, || TcpListener::bind(("0.0.0.0", RR_PAIR_PORT))).and_then(|r| r.map_err(anyhow::Error::from))
    };
    let (lb, lo) = match (listen(base.server_ns), listen(own.server_ns)) {
        (Ok(b), Ok(o)) => (b, o),
        (Err(e), _) | (_, Err(e)) => {
            let e = e.context("paired ping-pong listener");
            return (Err(anyhow!("{e:#}")), Err(e));
        }
    };
    let (warm, chunk) = (warmup(n), (n / RR_CHUNKS).max(1));
    let cpus = server_cpus.to_vec();
    // the server: accepts plain veth's connection and warms it up, then the datapath's, then the chunks in
    // the client's order; a side that does not connect within 5 s ends it
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        pin_thread(&cpus);
        let accept = |l: &TcpListener| -> anyhow::Result<TcpStream> {
            l.set_nonblocking(true)?;
            let t = Instant::now();
            loop {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        return Ok(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let mut b = accept(&lb)?;
        rr_echo(&mut b, size, warm)?;
        let mut o = accept(&lo)?;
        rr_echo(&mut o, size, warm)?;
        for _ in 0..RR_CHUNKS {
            rr_echo(&mut b, size, chunk)?;
            rr_echo(&mut o, size, chunk)?;
        }
        Ok(())
    });
    let cb = rr_connect(base.client_ns, base.to, RR_PAIR_PORT, size, warm);
    let co = match &cb {
        Ok(_) => rr_connect(own.client_ns, own.to, RR_PAIR_PORT, size, warm),
        Err(_) => Err(anyhow!("not tried: plain veth's connection failed")),
    };
    let (mut sb, mut so) = match (cb, co) {
        (Ok(b), Ok(o)) => (b, o),
        (Ok(b), Err(e)) => {
            drop(b);
            let _ = server.join();
            return (rr_client(base.client_ns, base.to, size, n, client_cpus), Err(e));
        }
        (Err(e), _) => {
            let _ = server.join();
            return (Err(e), rr_client(own.client_ns, own.to, size, n, client_cpus));
        }
    };
    let cpus = client_cpus.to_vec();
    let r = std::thread::spawn(move || {
        pin_thread(&cpus);
        let (mut rb, mut ro) = (Vec::with_capacity(n as usize), Vec::with_capacity(n as usize));
        for _ in 0..RR_CHUNKS {
            rr_rounds(&mut sb, size, chunk, &mut rb)?;
            rr_rounds(&mut so, size, chunk, &mut ro)?;
        }
        Ok::<_, anyhow::Error>((quantiles(rb), quantiles(ro)))
    })
    .join()
    .unwrap_or_else(|_| Err(anyhow!("ping-pong thread panicked")));
    let _ = server.join();
    match r {
        Ok((b, o)) => (Ok(b), Ok(o)),
        Err(e) => (Err(anyhow!("{e:#}")), Err(e)),
    }
}

/// A TCP connection from `ns` to `to` succeeds (and is closed at once).
fn can_connect(ns: &str, to: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
    in_netns(ns, move || TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2)).is_ok())
}

#[derive(Clone, Debug)]
struct Row {
    name: &'static str,
    layout: Layout,
    one: Option<f64>,
    eight: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    /// Every round's figures (1-stream, 8-stream, p50, p99), for the spread.
    all: [Vec<f64>; 4],
    /// Per measure, the median over the rounds of this datapath's figure divided by plain veth's, measured
    /// beside it in the same round (None for plain veth itself, or when no round has both).
    ratio: [Option<f64>; 4],
    note: String,
}

/// The median (the mean of the middle two for an even count); None when nothing was measured.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

/// The median of `x[i] / base[i]` over the rounds where both were measured.
fn paired_ratio(x: &[Option<f64>], base: &[Option<f64>]) -> Option<f64> {
    median(x.iter().zip(base).filter_map(|(x, b)| Some(x.as_ref()? / b.filter(|b| *b > 0.0)?)).collect())
}

/// Plain veth, the baseline: a veth pair of its own between the two worker namespaces (nothing attached to
/// it, no NetManager uses it), with iperf3 -s and the ping-pong server running in worker B for the whole run.
/// Each other datapath's iperf3 runs are preceded by plain veth's, in the same round and CPU layout, and
/// their ping-pongs are interleaved with plain veth's (`rr_pair`), so each ratio compares figures taken
/// seconds apart: this machine's speed drifts over seconds to minutes.
struct Plain {
    client: Ns,
    server: Ns,
    ip: Ipv4Addr,
    /// The CPUs its ping-pong server serves the next connection on.
    rr_cpus: Arc<Mutex<Vec<usize>>>,
    /// Per placement: every plain veth figure of the run (1-stream, 8-stream, p50, p99).
    all: Vec<[Vec<f64>; 4]>,
}

/// The three measurements from `client` (on worker A) to `server_ip`, with iperf3 -s and the ping-pong server
/// in `server` (on worker B): one row per placement, every round measuring each placement in turn, and
/// beside each measurement the same one over plain veth (`plain`; None measures this datapath alone).
#[allow(clippy::too_many_arguments)]
fn measure(
    w: &mut World,
    a: &Args,
    places: &[Placement],
    name: &'static str,
    client: &Ns,
    server: &Ns,
    server_ip: Ipv4Addr,
    mut plain: Option<&mut Plain>,
) -> anyhow::Result<Vec<Row>> {
    check_interrupted()?;
    let mut errs = Vec::new();
    let tag = format!("iperf3-server-{}", name.split_whitespace().next().unwrap_or("x"));
    match w.spawn(&tag, server.cmd("iperf3").arg("-s")) {
        Ok(pid) => w.placed.push((pid, Side::B)),
        Err(e) => errs.push(format!("{e:#}")),
    }
    let stop = Arc::new(AtomicBool::new(false));
    w.stops.push(stop.clone());
    let rr_cpus = Arc::new(Mutex::new(allowed_cpus()));
    let server_thread = match rr_server(&server.path(), a.rr_bytes, stop.clone(), rr_cpus.clone()) {
        Ok(h) => Some(h),
        Err(e) => {
            errs.push(format!("ping-pong server: {e:#}"));
            None
        }
    };
    // reachable (for the overlays: the first connection resolves the service IP), iperf3 server up
    if let Err(e) = wait_for(&format!("{name}: {server_ip}:{RR_PORT} reachable"), Duration::from_secs(30), || {
        can_connect(&client.path(), server_ip, RR_PORT)
    }) {
        errs.push(format!("{e:#}"));
    }
    let _ = wait_for(&format!("{name}: iperf3 server up"), Duration::from_secs(10), || {
        can_connect(&client.path(), server_ip, 5201)
    });
    // per placement and measure (1-stream, 8-stream, p50, p99): this datapath's figure and plain veth's
    // of the same round (None: failed or not measured)
    let mut own: Vec<[Vec<Option<f64>>; 4]> = places.iter().map(|_| Default::default()).collect();
    let mut base: Vec<[Vec<Option<f64>>; 4]> = places.iter().map(|_| Default::default()).collect();
    let note_err = |errs: &mut Vec<String>, e: anyhow::Error| {
        eprintln!("      {e:#}");
        errs.push(format!("{e:#}"));
    };
    for round in 1..=a.rounds.max(1) {
        for (i, p) in places.iter().enumerate() {
            check_interrupted()?;
            w.apply(p)?;
            *rr_cpus.lock() = p.b.clone();
            if let Some(pl) = plain.as_deref() {
                *pl.rr_cpus.lock() = p.b.clone();
            }
            eprintln!("    round {round}/{}, {} layout", a.rounds.max(1), p.layout);
            for (streams, slot) in [(1, 0), (8, 1)] {
                check_interrupted()?;
                let (rb, r) = match plain.as_deref() {
                    Some(pl) => {
                        let (rb, r) = iperf_pair(
                            name,
                            &pl.client,
                            pl.ip,
                            client,
                            server_ip,
                            a.seconds,
                            streams,
                            &a.congestion,
                            &p.a,
                        )?;
                        (Some(rb), r)
                    }
                    None => (None, iperf_logged(name, client, server_ip, a.seconds, streams, &a.congestion, &p.a)),
                };
                if let Some(rb) = rb {
                    base[i][slot].push(rb.as_ref().ok().copied());
                    if let Err(e) = rb {
                        note_err(&mut errs, e.context("plain veth"));
                    }
                }
                own[i][slot].push(r.as_ref().ok().copied());
                if let Err(e) = r {
                    note_err(&mut errs, e);
                }
            }
            check_interrupted()?;
            let (rb, r) = match plain.as_deref() {
                Some(pl) => {
                    let base = RrEnd { client_ns: &pl.client.path(), server_ns: &pl.server.path(), to: pl.ip };
                    let own = RrEnd { client_ns: &client.path(), server_ns: &server.path(), to: server_ip };
                    let (rb, r) = rr_pair(base, own, a.rr_bytes, a.round_trips, &p.a, &p.b);
                    (Some(rb), r)
                }
                None => (None, rr_client(&client.path(), server_ip, a.rr_bytes, a.round_trips, &p.a)),
            };
            if let Some(rb) = rb {
                if let Ok((p50, p99)) = rb {
                    eprintln!(
                        "      {PLAIN}: ping-pong {} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs",
                        a.round_trips, a.rr_bytes
                    );
                }
                base[i][2].push(rb.as_ref().ok().map(|r| r.0));
                base[i][3].push(rb.as_ref().ok().map(|r| r.1));
                if let Err(e) = rb {
                    note_err(&mut errs, e.context("plain veth ping-pong"));
                }
            }
            match &r {
                Ok((p50, p99)) => eprintln!(
                    "      {name}: ping-pong {} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs",
                    a.round_trips, a.rr_bytes
                ),
                Err(e) => eprintln!("      {name}: ping-pong failed: {e:#}"),
            }
            own[i][2].push(r.as_ref().ok().map(|r| r.0));
            own[i][3].push(r.as_ref().ok().map(|r| r.1));
            if let Err(e) = r {
                errs.push(format!("ping-pong: {e:#}"));
            }
        }
    }
    w.stop_proc(&tag);
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = server_thread {
        let _ = h.join();
    }
    // leave everything free to run anywhere between measurements (and while held)
    if let Some(shared) = placements(&[Layout::Shared]).first() {
        w.apply(shared)?;
    }
    if let Some(pl) = plain.as_deref_mut() {
        for (acc, b) in pl.all.iter_mut().zip(&base) {
            for k in 0..4 {
                acc[k].extend(b[k].iter().flatten());
            }
        }
    }
    let note = errs.join("; ");
    let paired = plain.is_some();
    Ok(places
        .iter()
        .zip(own.iter().zip(&base))
        .map(|(p, (own, base))| {
            let all: [Vec<f64>; 4] = std::array::from_fn(|k| own[k].iter().flatten().copied().collect());
            let ratio: [Option<f64>; 4] =
                std::array::from_fn(|k| if paired { paired_ratio(&own[k], &base[k]) } else { None });
            Row {
                name,
                layout: p.layout,
                one: median(all[0].clone()),
                eight: median(all[1].clone()),
                p50: median(all[2].clone()),
                p99: median(all[3].clone()),
                all,
                ratio,
                note: note.clone(),
            }
        })
        .collect())
}

/// The plain veth rows (every plain veth figure of the run, per placement) followed by `rows`.
fn with_plain(pl: &Plain, places: &[Placement], rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = places
        .iter()
        .zip(&pl.all)
        .map(|(p, all)| Row {
            name: PLAIN,
            layout: p.layout,
            one: median(all[0].clone()),
            eight: median(all[1].clone()),
            p50: median(all[2].clone()),
            p99: median(all[3].clone()),
            all: all.clone(),
            ratio: [None; 4],
            note: String::new(),
        })
        .collect();
    out.extend_from_slice(rows);
    out
}

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
        let (ra, rb) = (format!("obra{id}"), format!("obrb{id}"));
        for (wn, inst, peer, mine, theirs) in [(&na, &ra, IP_B, 1u8, 2u8), (&nb, &rb, IP_A, 2, 1)] {
            w.add_netns(inst)?;
            ip(&["-n", wn, "link", "add", "rth0", "type", "veth", "peer", "name", "eth0", "netns", inst])?;
            ip(&["-n", wn, "addr", "add", &format!("10.250.{mine}.1/24"), "dev", "rth0"])?;
            ip(&["-n", wn, "link", "set", "rth0", "up"])?;
            ip(&["-n", inst, "addr", "add", &format!("10.250.{mine}.2/24"), "dev", "eth0"])?;
            // the overlays' instance MTU, so every datapath's TCP uses the same segment size
            ip(&["-n", inst, "link", "set", "eth0", "mtu", "1450", "up"])?;
            ip(&["-n", inst, "route", "add", "default", "via", &format!("10.250.{mine}.1")])?;
            ip(&["-n", wn, "route", "add", &format!("10.250.{theirs}.0/24"), "via", &peer.to_string(), "dev", "up0"])?;
        }
        rows.extend(measure(
            w,
            a,
            &places,
            ROUTED,
            &Ns::Named(ra.clone()),
            &Ns::Named(rb.clone()),
            Ipv4Addr::new(10, 250, 2, 2),
            Some(&mut plain),
        )?);
        for (n, theirs) in [(&na, 2), (&nb, 1)] {
            let _ = ip(&["-n", n, "route", "del", &format!("10.250.{theirs}.0/24")]);
            let _ = ip(&["-n", n, "link", "del", "rth0"]);
        }
    }

    // 3. kernel VXLAN, instance namespaces behind a bridge on each worker (as Flannel's cni0 + flannel.1)
    if a.only.contains(&Datapath::Vxlan) {
        next("kernel VXLAN (vx0, VNI 42, port 4789), instance namespace behind a bridge on each worker");
        let (va, vb) = (format!("obva{id}"), format!("obvb{id}"));
        for (wn, inst, peer, mine, theirs) in [(&na, &va, IP_B, 1u8, 2u8), (&nb, &vb, IP_A, 2, 1)] {
            w.add_netns(inst)?;
            ip(&[
                "-n",
                wn,
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "remote",
                &peer.to_string(),
                "dstport",
                "4789",
                "dev",
                "up0",
            ])?;
            ip(&["-n", wn, "addr", "add", &format!("10.99.0.{mine}/24"), "dev", "vx0"])?;
            ip(&["-n", wn, "link", "set", "vx0", "up"])?;
            ip(&["-n", wn, "link", "add", "vxbr0", "type", "bridge"])?;
            ip(&["-n", wn, "addr", "add", &format!("10.244.{mine}.1/24"), "dev", "vxbr0"])?;
            ip(&["-n", wn, "link", "set", "vxbr0", "up"])?;
            ip(&["-n", wn, "link", "add", "vxh0", "type", "veth", "peer", "name", "eth0", "netns", inst])?;
            ip(&["-n", wn, "link", "set", "vxh0", "master", "vxbr0", "up"])?;
            ip(&["-n", inst, "addr", "add", &format!("10.244.{mine}.2/24"), "dev", "eth0"])?;
            ip(&["-n", inst, "link", "set", "eth0", "mtu", "1450", "up"])?;
            ip(&["-n", inst, "route", "add", "default", "via", &format!("10.244.{mine}.1")])?;
            ip(&[
                "-n",
                wn,
                "route",
                "add",
                &format!("10.244.{theirs}.0/24"),
                "via",
                &format!("10.99.0.{theirs}"),
                "dev",
                "vx0",
            ])?;
        }
        rows.extend(measure(
            w,
            a,
            &places,
            VXLAN,
            &Ns::Named(va.clone()),
            &Ns::Named(vb.clone()),
            Ipv4Addr::new(10, 244, 2, 2),
            Some(&mut plain),
        )?);
        // take VXLAN away so it cannot interfere with the overlays
        for n in [&na, &nb] {
            let _ = ip(&["-n", n, "link", "del", "vx0"]);
            let _ = ip(&["-n", n, "link", "del", "vxbr0"]);
        }
    }
    let (tun_on, ebpf_on) = (a.only.contains(&Datapath::Tun), a.only.contains(&Datapath::Ebpf));
    if !tun_on && !ebpf_on {
        report(&with_plain(&plain, &places, &rows), a, None, &load_start, t0);
        return Ok(());
    }

    // orchestrators in worker A's namespace
    step("starting root + cluster orchestrators (release binaries) in worker A's namespace");
    let root_dir = w.work.join("root");
    let cluster_dir = w.work.join("cluster");
    let root_pid = w.spawn(
        "root",
        Command::new("ip")
            .args(["netns", "exec", &na])
            .arg(bins.join("root-orchestrator"))
            .args([
                "--api-addr",
                "127.0.0.1:10000",
                "--grpc-addr",
                "127.0.0.1:50052",
                "--netsvc-addr",
                "127.0.0.1:10099",
            ])
            .arg("--data-dir")
            .arg(&root_dir)
            .args(["--report-interval-ms", "1000"])
            .env("OAK_ADMIN_PASSWORD", ADMIN_PW),
    )?;
    let pa = na.clone();
    let api = "http://127.0.0.1:10000";
    wait_for("root API", Duration::from_secs(30), || {
        Ok(http(&pa, "GET", &format!("{api}/api/health"), None, None).is_ok())
    })?;
    let cluster_pid = w.spawn(
        "cluster",
        Command::new("ip")
            .args(["netns", "exec", &na])
            .arg(bins.join("cluster-orchestrator"))
            .args([
                "--root-address",
                "127.0.0.1:50052",
                "--root-netsvc-port",
                "10099",
                "--worker-addr",
                "127.0.0.1:10100",
            ])
            .args(["--netsvc-addr", &format!("{IP_A}:10110")])
            .arg("--data-dir")
            .arg(&cluster_dir)
            .env("CLUSTER_NAME", "bench")
            .env("CLUSTER_LOCATION", "bench"),
    )?;
    w.placed.extend([(root_pid, Side::A), (cluster_pid, Side::A)]);
    let token = http(
        &pa,
        "POST",
        &format!("{api}/api/auth/login"),
        None,
        Some(json!({"username":"Admin","password":ADMIN_PW})),
    )?["token"]
        .as_str()
        .context("login: no token")?
        .to_string();
    wait_for("cluster registered at the root", Duration::from_secs(30), || {
        Ok(http(&pa, "GET", &format!("{api}/api/clusters/active"), Some(&token), None)?
            .as_array()
            .is_some_and(|l| !l.is_empty()))
    })?;
    let ms = |n: &str| {
        json!({"microserviceID":"","microservice_name":n,"microservice_namespace":"bench","virtualization":"container",
               "code":"docker.io/library/nginx:latest","memory":64,"vcpus":0.1})
    };
    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"overlay",
        "application_namespace":"bench","application_desc":"","microservices":[ms("srv"), ms("cli")]}]});
    let apps = http(&pa, "POST", &format!("{api}/api/application"), Some(&token), Some(sla))?;
    let app = apps
        .as_array()
        .and_then(|l| l.iter().find(|x| x["application_name"] == "overlay"))
        .with_context(|| format!("created application not listed: {apps}"))?;
    let mut svcs = Vec::new();
    for sid in app["microservices"].as_array().into_iter().flatten().filter_map(|s| s.as_str()) {
        let v = http(&pa, "GET", &format!("{api}/api/service/{sid}"), Some(&token), None)?;
        svcs.push((
            sid.to_string(),
            v["job_name"].as_str().unwrap_or("").to_string(),
            v["addresses"]["rr_ip"].as_str().unwrap_or("").to_string(),
        ));
    }
    let [(srv_id, srv_job, rr), (cli_id, cli_job, _)]: [(String, String, String); 2] =
        svcs.try_into().map_err(|v| anyhow!("expected 2 services, got {v:?}"))?;
    let rr: Ipv4Addr = rr.parse().with_context(|| format!("service {srv_id} has no rr_ip ({rr:?})"))?;
    eprintln!("    service {srv_job} ({srv_id}): round-robin IP {rr}");

    // NetManagers
    let nm = |w: &mut World, tag: &str, ns: &str, ebpf: bool| -> anyhow::Result<()> {
        let cfg = w.work.join(format!("netcfg-{tag}.json"));
        let ip = if tag == "a" { IP_A } else { IP_B };
        let node = format!("bench-ovl-{id}-{tag}");
        fs::write(
            &cfg,
            json!({"NodePublicAddress": ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": IP_A.to_string(),
                   "ClusterNetPort": "10110", "NodeName": node})
            .to_string(),
        )?;
        let pin = PathBuf::from("/sys/fs/bpf/oakestra-rs").join(format!("{node}-oak0"));
        if !w.pins.contains(&pin) {
            w.pins.push(pin);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(bins.join("NetManager"))
            .arg("-c")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(w.work.join(format!("nm-{tag}")));
        c.args(["-p", &NM_API.to_string(), "--bridge", "oak0", "--tun", "oaktun0", "--log-level", "info"]);
        c.args(&a.nm_args);
        if ebpf {
            c.arg("--ebpf-object").arg(object);
        } else {
            c.arg("--no-ebpf");
        }
        let name = format!("netmanager-{tag}");
        let pid = w.spawn(&name, &mut c)?;
        w.placed.push((pid, if tag == "a" { Side::A } else { Side::B }));
        let p = ns.to_string();
        let r = wait_for(
            &format!("NetManager {tag} ready (eBPF {})", if ebpf { "on" } else { "off" }),
            Duration::from_secs(30),
            || {
                let v = http(&p, "GET", &format!("http://127.0.0.1:{NM_API}/status"), None, None)?;
                Ok(v["ready"] == true)
            },
        );
        if let Err(e) = r {
            bail!("{e:#}\nlog tail:\n{}", w.log_tail(&name));
        }
        if ebpf {
            let c = http(&p, "GET", &format!("http://127.0.0.1:{NM_API}/counters"), None, None)?;
            if c["ebpf"] == false || c["ebpf"].is_null() {
                eprintln!(
                    "    WARNING: NetManager {tag} runs WITHOUT the eBPF fast path; log tail:\n{}",
                    w.log_tail(&name)
                );
            }
        }
        Ok(())
    };
    let counters = |ns: &str| http(ns, "GET", &format!("http://127.0.0.1:{NM_API}/counters"), None, None);

    // the instances are deployed once, on the first datapath's NetManagers
    nm(w, "a", &na, !tun_on)?;
    nm(w, "b", &nb, !tun_on)?;
    let srv_pid = instance(w, "instance-srv-on-b")?;
    let cli_pid = instance(w, "instance-cli-on-a")?;
    let deploy = |ns: &str, pid: u32, sid: &str, job: &str| -> anyhow::Result<String> {
        let v = http(
            ns,
            "POST",
            &format!("http://127.0.0.1:{NM_API}/container/deploy"),
            None,
            Some(json!({"pid": pid, "serviceName": job, "serviceId": sid, "instanceNumber": 0})),
        )?;
        Ok(v["nsAddress"].as_str().unwrap_or("?").to_string())
    };
    let srv_ip = deploy(&nb, srv_pid, &srv_id, &srv_job)?;
    let cli_ip = deploy(&na, cli_pid, &cli_id, &cli_job)?;
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
        nm(w, "a", &na, true)?;
        nm(w, "b", &nb, true)?;
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

/// With --hold: waits for Ctrl-C, leaving everything up for inspection.
fn hold(a: &Args, what: &str) {
    if a.hold {
        eprintln!("holding (Ctrl-C cleans up): {what}");
        while check_interrupted().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The 1-minute load average and the CPU count (the numbers depend on what else runs on the machine).
fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{} (on {cpus} CPUs)", l.split_whitespace().next().unwrap_or("?"))
}

fn report(rows: &[Row], a: &Args, verdict: Option<&str>, load_start: &str, t0: Instant) {
    println!();
    println!(
        "overlay datapaths: 2 worker namespaces on a veth underlay; medians of {} rounds of iperf3 TCP ({}) {} s and ping-pong {} x {} B on one connection",
        a.rounds.max(1),
        a.congestion,
        a.seconds,
        a.round_trips,
        a.rr_bytes
    );
    println!(
        "1-min load average: {load_start} at the start, {} at the end; {:.0} s so far",
        loadavg(),
        t0.elapsed().as_secs_f64()
    );
    let mut layouts: Vec<Layout> = Vec::new();
    for r in rows {
        if !layouts.contains(&r.layout) {
            layouts.push(r.layout);
        }
    }
    for layout in layouts {
        let of: Vec<&Row> = rows.iter().filter(|r| r.layout == layout).collect();
        table(&of, layout);
    }
    if let Some(v) = verdict {
        println!();
        println!("eBPF run: {v}");
    }
}

/// One layout's table, its notes and its targets (`rows[0]` is plain veth, the baseline).
fn table(rows: &[&Row], layout: Layout) {
    let f = |v: Option<f64>, prec: usize| v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "failed".into());
    let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
    let base = rows[0];
    println!();
    match layout {
        Layout::Hosts => println!("hosts layout: each worker on its own CPUs, received packets processed on the receiver's CPUs (as two machines)"),
        Layout::Shared => println!("shared layout: every process on every CPU, a veth's receiving side on the sender's CPU (as workers sharing one machine)"),
    }
    println!(
        "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
        "datapath", "1-stream Gbit/s", "8-stream Gbit/s", "RR p50 µs", "RR p99 µs"
    );
    println!("{}", "-".repeat(16 + 4 * 18));
    for r in rows {
        let cell = |v: Option<f64>, k: usize, prec: usize| {
            if std::ptr::eq(*r, base) {
                f(v, prec)
            } else {
                format!("{} ({})", f(v, prec), ratio(r.ratio[k]))
            }
        };
        println!(
            "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
            r.name,
            cell(r.one, 0, 2),
            cell(r.eight, 1, 2),
            cell(r.p50, 2, 1),
            cell(r.p99, 3, 1)
        );
    }
    println!(
        "(ratios: the median over the rounds of the datapath's figure / plain veth's measured beside it in the same"
    );
    println!(" round; for latency lower is better. Plain veth's row: all its measurements of the run)");
    println!("spread (lowest-highest of the rounds):");
    for r in rows {
        let span = |v: &Vec<f64>, prec: usize| match (
            v.iter().cloned().reduce(f64::min),
            v.iter().cloned().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => format!("{lo:.prec$}-{hi:.prec$}"),
            _ => "-".into(),
        };
        println!(
            "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
            r.name,
            span(&r.all[0], 2),
            span(&r.all[1], 2),
            span(&r.all[2], 1),
            span(&r.all[3], 1)
        );
    }
    for r in rows {
        if !r.note.is_empty() {
            println!("note {}: {}", r.name, r.note);
        }
    }
    let row = |n: &str| rows.iter().find(|r| r.name == n);
    let (vx, tun, eb) = (row(VXLAN), row(TUN), row(EBPF));
    let mut checks: Vec<(String, Option<bool>)> = Vec::new();
    // against plain veth: the paired ratios; eBPF against VXLAN (measured minutes apart): their ratios
    let ge = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x >= y),
        _ => None,
    };
    if let Some(tun) = tun {
        checks.push(("tun   1-stream >= 0.5x veth".into(), ge(tun.ratio[0], Some(0.5))));
    }
    if let Some(eb) = eb {
        checks.push(("eBPF  1-stream >= 0.9x veth".into(), ge(eb.ratio[0], Some(0.9))));
        checks.push(("eBPF  8-stream >= 0.9x veth".into(), ge(eb.ratio[1], Some(0.9))));
        checks.push(("eBPF  RR p50 <= 1.15x veth".into(), ge(Some(1.15), eb.ratio[2])));
        if let Some(vx) = vx {
            checks.push(("eBPF  1-stream > kernel VXLAN".into(), ge(eb.ratio[0], vx.ratio[0])));
            checks.push(("eBPF  8-stream > kernel VXLAN".into(), ge(eb.ratio[1], vx.ratio[1])));
            checks.push(("eBPF  RR p50 < kernel VXLAN".into(), ge(vx.ratio[2], eb.ratio[2])));
        }
    }
    println!("targets ({layout} layout):");
    for (what, ok) in checks {
        let mark = match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "MISSED (no measurement)",
        };
        println!("  {what:<32} {mark}");
    }
    // not a target: how the fast path compares with the kernel's own routing of the same topology
    if let (Some(eb), Some(rt)) = (eb, row(ROUTED)) {
        let cmp = |x: Option<f64>, y: Option<f64>, higher_better: bool| match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => {
                format!("{:.2}x{}", x / y, if (x >= y) == higher_better { "" } else { " (behind)" })
            }
            _ => "-".into(),
        };
        println!(
            "eBPF against routed, no overlay: 1-stream {}, 8-stream {}, RR p50 {}",
            cmp(eb.ratio[0], rt.ratio[0], true),
            cmp(eb.ratio[1], rt.ratio[1], true),
            cmp(eb.ratio[2], rt.ratio[2], false)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_mask, median, paired_ratio};

    #[test]
    fn cpu_masks() {
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 1, 2, 3]), "f");
        assert_eq!(cpu_mask(&[2, 3]), "c");
        assert_eq!(cpu_mask(&[33]), "2,0");
        assert_eq!(cpu_mask(&[0, 32, 64]), "1,1,1");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn paired_ratios() {
        // each round's figure over the baseline of the same round; rounds without both are left out
        assert_eq!(paired_ratio(&[Some(9.0), Some(8.0), Some(1.0)], &[Some(10.0), Some(10.0), Some(2.0)]), Some(0.8));
        assert_eq!(paired_ratio(&[Some(9.0), None, Some(4.0)], &[Some(10.0), Some(10.0), None]), Some(0.9));
        assert_eq!(paired_ratio(&[Some(9.0)], &[Some(0.0)]), None);
        assert_eq!(paired_ratio(&[], &[]), None);
    }
}
