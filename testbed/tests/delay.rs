//! The delaying relay gives the way to one host a latency, measured with real sockets: a UDP echo on one
//! host, pings from another, the median round-trip time before and after. Moving the delay to another host
//! makes the first direct again, and dropping the relay leaves no route through it behind.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testbed::{require_root, spawn_in_netns, Host, Net};

const PORT: u16 = 7;
const PINGS: usize = 20;

/// The clock pings carry their send time in: one process, one monotonic clock, whatever namespace a
/// thread is in, so the echo can tell how long the way there took.
fn since_base() -> Duration {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed()
}

/// A UDP echo on a host: it answers a ping (sequence number, send time) with the sequence number and the
/// one-way delay it saw. Stopping it returns the addresses the pings came from.
struct Echo {
    ns: String,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<HashSet<SocketAddr>>>,
}

impl Echo {
    /// Starts the echo and returns once its socket is bound.
    fn start(host: &Host) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = spawn_in_netns(&host.ns, move || {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("binding the echo socket");
            // wakes up now and then to look at the stop flag
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready_tx.send(()).unwrap();
            let mut from = HashSet::new();
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                let Ok((12, peer)) = sock.recv_from(&mut buf) else { continue };
                let sent = Duration::from_nanos(u64::from_be_bytes(buf[4..12].try_into().unwrap()));
                let there = since_base().saturating_sub(sent).as_nanos() as u64;
                buf[4..12].copy_from_slice(&there.to_be_bytes());
                from.insert(peer);
                sock.send_to(&buf[..12], peer).expect("echoing");
            }
            from
        })
        .expect("starting the echo");
        ready_rx.recv().expect("the echo thread died before binding");
        Echo { ns: host.ns.clone(), stop, thread }
    }

    fn stop(self) -> HashSet<SocketAddr> {
        self.stop.store(true, Ordering::Relaxed);
        testbed::join(&self.ns, self.thread).expect("the echo thread")
    }
}

/// Medians of [`PINGS`] pings from one host to another.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Round trip: there and back.
    rtt: Duration,
    /// The way there only.
    there: Duration,
}

/// Pings from host `from` to an echo on host `to`; every ping must be answered within a second.
fn measure(from: &Host, to: &Host) -> Measured {
    let echo = Echo::start(to);
    let target = SocketAddr::from((to.ip, PORT));
    let (mut rtts, mut theres) = from.run(move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let (mut rtts, mut theres) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 64];
        for seq in 0..PINGS as u32 {
            let mut ping = [0u8; 12];
            ping[..4].copy_from_slice(&seq.to_be_bytes());
            let sent = since_base();
            ping[4..].copy_from_slice(&(sent.as_nanos() as u64).to_be_bytes());
            sock.send_to(&ping, target).unwrap();
            // an answer to an earlier ping that came late is not this one's
            loop {
                let (n, peer) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("ping {seq} to {target}: {e}"));
                if peer == target && n == 12 && buf[..4] == seq.to_be_bytes() {
                    break;
                }
            }
            rtts.push(since_base() - sent);
            theres.push(Duration::from_nanos(u64::from_be_bytes(buf[4..12].try_into().unwrap())));
        }
        (rtts, theres)
    });
    let sources = echo.stop();
    // the relay does no NAT: the echo saw the real sender, and only it
    assert!(!sources.is_empty() && sources.iter().all(|s| s.ip() == from.ip), "echo on {} saw {sources:?}", to.name);
    rtts.sort();
    theres.sort();
    let m = Measured { rtt: rtts[PINGS / 2], there: theres[PINGS / 2] };
    eprintln!(
        "{} -> {}: median RTT {:?} (min {:?}, max {:?}), one-way there {:?}",
        from.name,
        to.name,
        m.rtt,
        rtts[0],
        rtts[PINGS - 1],
        m.there
    );
    m
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Whether `d` is within [`lo`, `hi`] ms.
fn within(d: Duration, lo: u64, hi: u64) -> bool {
    d >= ms(lo) && d <= ms(hi)
}

fn routes(h: &Host) -> String {
    h.exec(&["ip", "route", "show"]).unwrap()
}

#[test]
fn a_delay_on_the_way_to_a_host_adds_to_the_rtt_and_moves_with_the_target() {
    if !require_root("a_delay_on_the_way_to_a_host_adds_to_the_rtt_and_moves_with_the_target") {
        return;
    }
    let net = Net::new(&["a", "b", "relay"]).unwrap();
    let (a, b, relay) = (net.host("a"), net.host("b"), net.host("relay"));
    let base = measure(a, b);
    assert!(base.rtt < ms(10) && base.there < ms(10), "baseline a -> b {base:?}");

    let delay = net.delay("relay").unwrap();
    assert!(delay.set("relay", ms(30)).is_err(), "the relay cannot delay itself");
    assert!(delay.set("nobody", ms(30)).is_err());

    delay.set("b", ms(30)).unwrap();
    assert!(routes(a).contains(&format!("{} via {}", b.ip, relay.ip)), "{}", routes(a));
    let to_b = measure(a, b);
    assert!(within(to_b.rtt, 30, 45) && within(to_b.there, 30, 45), "delayed a -> b {to_b:?}");
    // the relay's own traffic is not delayed
    let relay_to_b = measure(relay, b);
    assert!(relay_to_b.rtt < ms(10), "relay -> b {relay_to_b:?}");

    delay.set("a", ms(30)).unwrap();
    assert!(!routes(a).contains(&b.ip.to_string()), "a still routes b via the relay:\n{}", routes(a));
    // the way to b is direct again; b's answers to a are what is delayed now
    let a_to_b = measure(a, b);
    assert!(a_to_b.there < ms(10), "a -> b after the delay moved to a {a_to_b:?}");
    assert!(within(a_to_b.rtt, 30, 45), "a -> b and back, the way back delayed {a_to_b:?}");
    let to_a = measure(b, a);
    assert!(within(to_a.rtt, 30, 45) && within(to_a.there, 30, 45), "delayed b -> a {to_a:?}");

    // a new value applies to the packets that come after it
    delay.set("a", ms(60)).unwrap();
    let longer = measure(b, a);
    assert!(within(longer.rtt, 60, 75), "delayed b -> a {longer:?}");

    delay.clear().unwrap();
    let cleared = measure(b, a);
    assert!(cleared.rtt < ms(10), "b -> a after clear {cleared:?}");
    assert!(!routes(b).contains("via"), "b keeps a route through the relay:\n{}", routes(b));

    delay.set("b", ms(30)).unwrap();
    drop(delay);
    // no route, rule or tun left behind
    assert!(!routes(a).contains("via"), "a keeps a route through the relay:\n{}", routes(a));
    let rules = relay.exec(&["ip", "rule", "show"]).unwrap();
    assert!(!rules.contains("dly0") && !rules.contains("eth0"), "relay rules left:\n{rules}");
    assert!(relay.exec(&["ip", "link", "show", "dly0"]).is_err(), "the tun outlived the relay");
    let after = measure(a, b);
    assert!(after.rtt < ms(10), "a -> b after the relay stopped {after:?}");
}

/// A relay dropped after its network (whose namespaces are gone by then) stops without hanging.
#[test]
fn a_relay_outliving_its_net_stops_cleanly() {
    if !require_root("a_relay_outliving_its_net_stops_cleanly") {
        return;
    }
    let net = Net::new(&["a", "b", "relay"]).unwrap();
    let delay = net.delay("relay").unwrap();
    delay.set("b", ms(5)).unwrap();
    drop(net);
    let started = Instant::now();
    drop(delay);
    assert!(started.elapsed() < Duration::from_secs(2), "dropping took {:?}", started.elapsed());
}
