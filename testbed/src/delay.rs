//! A delaying relay: one host of a [`Net`] becomes a userspace router that holds every packet to a chosen
//! target host for a set time, so a test can give one link of the topology a latency (the kernel here has
//! no netem qdisc). The other hosts route the target through the relay; in the relay's namespace the
//! kernel hands those packets to a tun device, a thread holds each one for the delay and writes it back,
//! and the kernel forwards it out of `eth0` to the target with its original source address (no NAT: the
//! target sees the real sender). Only the way to the target is delayed, so any round trip between the
//! target and another host grows by the delay once: a ping to the target on its way there, a ping from the
//! target on the answer's way back.
//!
//! In the relay's namespace: packets arriving on `eth0` look up table [`TO_TUN`], which sends the target
//! into the tun; packets coming back from the tun look up table [`FROM_TUN`], which sends the target out
//! of `eth0` on-link. The relay's own traffic to the target stays on the main table and is not delayed.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use tracing::{debug, info, warn};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::cmd::ip;
use crate::net::Net;

/// The relay's tun device (in the relay's namespace, so the name cannot collide).
const TUN: &str = "dly0";
/// Routing table for packets coming back from the tun: the target on-link out of `eth0`.
const FROM_TUN: &str = "100";
/// Routing table for packets arriving on `eth0`: the target into the tun.
const TO_TUN: &str = "101";
/// Longest the relay thread waits before it looks at its stop flag again.
const IDLE: Duration = Duration::from_millis(20);
/// Packets held at most; beyond that new ones are dropped, as a full queue of a real router would.
const MAX_QUEUED: usize = 100_000;

/// What the caller and the relay thread share.
struct Shared {
    delay_us: AtomicU64,
    stop: AtomicBool,
}

/// A host as the relay needs it, copied so a [`Delay`] outlives nothing of its [`Net`].
struct Peer {
    name: String,
    ns: String,
    ip: Ipv4Addr,
}

/// A running delaying relay on one host of a [`Net`]: after [`Delay::set`], every packet another host
/// sends to the target goes through the relay and arrives the delay later, with its own source address.
/// Dropping it stops the relay and removes the routes and rules it added (the namespaces may be gone by
/// then).
pub struct Delay {
    peers: Vec<Peer>,
    relay: usize,
    shared: Arc<Shared>,
    /// Index of the host whose traffic is delayed now.
    target: Mutex<Option<usize>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Net {
    /// Makes host `relay` a delaying relay; see [`Delay::start`].
    pub fn delay(&self, relay: &str) -> Result<Delay> {
        Delay::start(self, relay)
    }
}

impl Delay {
    /// Makes host `relay` of `net` a delaying relay: forwarding on, redirects and reverse-path filtering
    /// off, a tun device with the thread that delays what passes through it, and the policy rules. Nothing
    /// is delayed until [`Delay::set`].
    pub fn start(net: &Net, relay: &str) -> Result<Delay> {
        let peers: Vec<Peer> =
            net.hosts.iter().map(|h| Peer { name: h.name.clone(), ns: h.ns.clone(), ip: h.ip }).collect();
        let relay = peers.iter().position(|p| p.name == relay).with_context(|| format!("no host {relay}"))?;
        let ns = peers[relay].ns.clone();
        let shared = Arc::new(Shared { delay_us: AtomicU64::new(0), stop: AtomicBool::new(false) });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let thread = crate::spawn_in_netns(&ns, move || match open_tun() {
            Ok(tun) => {
                let _ = ready_tx.send(Ok(()));
                relay_loop(&tun, &thread_shared);
            }
            // the caller hears of it and joins
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;
        let ready = ready_rx.recv().map_err(|_| anyhow!("the relay thread in {ns} ended before it was ready"));
        if let Err(e) = ready.and_then(|r| r) {
            let _ = crate::join(&ns, thread);
            return Err(e.context(format!("starting the delaying relay in {ns}")));
        }
        let delay = Delay { peers, relay, shared, target: Mutex::new(None), thread: Some(thread) };
        delay.rules(true)?;
        info!(relay = %delay.peers[relay].name, "delaying relay started");
        Ok(delay)
    }

    /// From now on all traffic to host `target` from every other host but the relay goes through the relay
    /// and is delayed by `delay`; a target set before is direct again.
    pub fn set(&self, target: &str, delay: Duration) -> Result<()> {
        let t = self.peers.iter().position(|p| p.name == target).with_context(|| format!("no host {target}"))?;
        if t == self.relay {
            bail!("the relay {target} cannot delay traffic to itself");
        }
        let mut current = self.target.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.delay_us.store(delay.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
        self.routes(t, true)?;
        if let Some(old) = current.replace(t).filter(|&old| old != t) {
            self.routes(old, false)?;
        }
        info!(target = %target, ?delay, relay = %self.peers[self.relay].name, "delaying traffic");
        Ok(())
    }

    /// Removes the delay: every host reaches every other directly again.
    pub fn clear(&self) -> Result<()> {
        let mut current = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.take() {
            self.routes(old, false)?;
            info!(target = %self.peers[old].name, "delay cleared");
        }
        Ok(())
    }

    /// Adds (`on`) or removes the routes that send traffic to host `t` through the relay: first the
    /// relay's, then the other hosts' when adding; the other way round when removing.
    fn routes(&self, t: usize, on: bool) -> Result<()> {
        let target = format!("{}/32", self.peers[t].ip);
        let relay = &self.peers[self.relay];
        let via = relay.ip.to_string();
        let others = || self.peers.iter().enumerate().filter(|&(i, _)| i != t && i != self.relay).map(|(_, p)| p);
        let relay_routes = |verb: &str| -> Result<()> {
            ip(&["-n", &relay.ns, "route", verb, &target, "dev", "eth0", "scope", "link", "table", FROM_TUN])?;
            ip(&["-n", &relay.ns, "route", verb, &target, "dev", TUN, "table", TO_TUN])
        };
        if on {
            relay_routes("replace")?;
            for p in others() {
                ip(&["-n", &p.ns, "route", "replace", &target, "via", &via])?;
            }
        } else {
            for p in others() {
                ip(&["-n", &p.ns, "route", "del", &target, "via", &via])?;
            }
            relay_routes("del")?;
        }
        Ok(())
    }

    /// Adds (`on`) or removes the relay's policy rules.
    fn rules(&self, on: bool) -> Result<()> {
        let ns = &self.peers[self.relay].ns;
        let verb = if on { "add" } else { "del" };
        ip(&["-n", ns, "rule", verb, "iif", TUN, "lookup", FROM_TUN])?;
        ip(&["-n", ns, "rule", verb, "iif", "eth0", "lookup", TO_TUN])
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if let Err(e) = crate::join(&self.peers[self.relay].ns, thread) {
                warn!("delaying relay thread: {e:#}");
            }
        }
        // the namespaces may be gone already (the Net dropped first): nothing left to undo then
        let target = self.target.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = target {
            let _ = self.routes(t, false);
        }
        let _ = self.rules(false);
        let ns = &self.peers[self.relay].ns;
        for table in [FROM_TUN, TO_TUN] {
            let _ = ip(&["-n", ns, "route", "flush", "table", table]);
        }
    }
}

/// Writes `value` to `/proc/sys/net/<key>` of the calling thread's network namespace.
fn sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/net/{key}"), value).with_context(|| format!("setting net.{key} to {value}"))
}

/// Sets the relay's namespace up for forwarding (on the calling thread, which is in it) and opens the tun.
fn open_tun() -> Result<SyncDevice> {
    sysctl("ipv4/ip_forward", "1")?;
    for dev in ["all", "default", "eth0"] {
        for (key, value) in [("rp_filter", "0"), ("send_redirects", "0"), ("accept_redirects", "0")] {
            sysctl(&format!("ipv4/conf/{dev}/{key}"), value)?;
        }
    }
    let tun = DeviceBuilder::new().name(TUN).build_sync().with_context(|| format!("creating tun {TUN}"))?;
    tun.set_nonblocking(true).context("making the tun nonblocking")?;
    for (key, value) in [("rp_filter", "0"), ("send_redirects", "0"), ("accept_redirects", "0")] {
        sysctl(&format!("ipv4/conf/{TUN}/{key}"), value)?;
    }
    // no router solicitations or MLD reports into the tun (a kernel without IPv6 has no such file)
    let _ = sysctl(&format!("ipv6/conf/{TUN}/disable_ipv6"), "1");
    Ok(tun)
}

/// Reads packets from the tun and writes each back once its delay is over, in the order they came, until
/// the stop flag is set. The queue is ordered by release time: a packet is never released before one that
/// came earlier, even when the delay shrinks in between.
fn relay_loop(tun: &SyncDevice, shared: &Shared) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(at, _)| *at <= now) {
            let (_, packet) = queue.pop_front().expect("a front packet");
            if let Err(e) = tun.send(&packet) {
                debug!("writing a delayed packet back to {TUN}: {e}");
            }
        }
        let wait = queue.front().map_or(IDLE, |(at, _)| at.saturating_duration_since(now)).min(IDLE);
        let mut fds = [PollFd::new(tun.as_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(TimeSpec::from(wait)), None) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                warn!("polling {TUN}: {e}; the delaying relay stops");
                return;
            }
        }
        loop {
            match tun.recv(&mut buf) {
                Ok(n) => {
                    // IPv4 only: the test network has no other
                    if n == 0 || buf[0] >> 4 != 4 {
                        continue;
                    }
                    if queue.len() >= MAX_QUEUED {
                        debug!("the delay queue is full; a packet is dropped");
                        continue;
                    }
                    let delay = Duration::from_micros(shared.delay_us.load(Ordering::Relaxed));
                    let mut at = Instant::now() + delay;
                    if let Some((last, _)) = queue.back() {
                        at = at.max(*last);
                    }
                    queue.push_back((at, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("reading {TUN}: {e}");
                    break;
                }
            }
        }
    }
}
