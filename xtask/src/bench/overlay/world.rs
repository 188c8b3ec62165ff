//! What a run creates and its cleanup guard, Ctrl-C handling, and the small helpers that act inside the
//! namespaces (HTTP from inside one, polling, an instance process, running a command in one).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use testbed::{in_netns, ip};

use super::cpus::{cpu_mask, pin_process, Placement, Side};
use super::Layout;

/// Set by SIGINT/SIGTERM: the run stops at the next check and the guard cleans up (the children, in the
/// same process group, get the Ctrl-C too).
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(super) extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(super) fn catch_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        let _ = unsafe { sigaction(sig, &act) };
    }
}

pub(super) fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Everything the run created; dropped (also on error or panic) it stops the processes, deletes the
/// namespaces and the bpffs pins, and removes the work directory (kept when the run failed, for the logs).
pub(super) struct World {
    pub(super) work: PathBuf,
    pub(super) keep_work: bool,
    pub(super) procs: Vec<(String, Child)>,
    pub(super) netns: Vec<String>,
    pub(super) pins: Vec<PathBuf>,
    /// Stop flags of the ping-pong servers still running.
    pub(super) stops: Vec<Arc<AtomicBool>>,
    /// Processes that belong to a worker (the layouts bind them to its CPUs).
    pub(super) placed: Vec<(u32, Side)>,
    /// The two worker namespaces (their veths steer received packets to the worker's CPUs in the hosts layout).
    pub(super) workers: Option<(String, String)>,
}

impl World {
    pub(super) fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    pub(super) fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
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
    pub(super) fn apply(&mut self, p: &Placement) -> anyhow::Result<()> {
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
    pub(super) fn stop_proc(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, c) = self.procs.remove(i);
            terminate(c);
        }
    }

    pub(super) fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

pub(super) fn terminate(mut c: Child) {
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

/// HTTP with JSON bodies from inside `ns` (the services listen on that namespace's loopback).
pub(super) fn http(
    ns: &str,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Value> {
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

pub(super) fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
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
pub(super) fn instance(w: &mut World, name: &str) -> anyhow::Result<u32> {
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

/// How to run a command in a namespace: `ip netns exec NAME` or `nsenter -t PID -n`.
#[derive(Clone)]
pub(super) enum Ns {
    Named(String),
    Pid(u32),
}

impl Ns {
    /// The namespace as testbed names it: an `ip netns` name, or the path of a process's namespace.
    pub(super) fn path(&self) -> String {
        match self {
            Ns::Named(n) => n.clone(),
            Ns::Pid(p) => format!("/proc/{p}/ns/net"),
        }
    }
    pub(super) fn cmd(&self, prog: &str) -> Command {
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
