//! TCP request-response latency: the ping-pong server and client, and a datapath's ping-pong interleaved
//! with plain veth's on the same two threads.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use parking_lot::Mutex;
use testbed::{in_netns, join, spawn_in_netns};

use super::cpus::pin_thread;
use super::RR_PORT;

/// The ping-pong server in `ns`: echoes fixed-size messages on every connection (one at a time, each served
/// on the CPUs `cpus` holds when it is accepted) until `stop`; the thread ends (and its listener closes)
/// within 10 ms of `stop` once no connection is open.
pub(super) fn rr_server(
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
pub(super) fn rr_connect(ns: &str, to: Ipv4Addr, port: u16, size: usize, warmup: u32) -> anyhow::Result<TcpStream> {
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
pub(super) fn rr_rounds(s: &mut TcpStream, size: usize, n: u32, rtts: &mut Vec<f64>) -> anyhow::Result<()> {
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
pub(super) fn rr_echo(s: &mut TcpStream, size: usize, n: u32) -> std::io::Result<()> {
    let mut buf = vec![0u8; size];
    for _ in 0..n {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    Ok(())
}

/// A ping-pong's (p50, p99) in µs, or why it failed.
pub(super) type Quantiles = anyhow::Result<(f64, f64)>;

/// (p50, p99) of round-trip times.
pub(super) fn quantiles(mut rtts: Vec<f64>) -> (f64, f64) {
    rtts.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    (q(0.5), q(0.99))
}

pub(super) fn warmup(n: u32) -> u32 {
    n.min(1000) / 10 + 10
}

/// `n` round trips of `size` bytes on one TCP connection from `ns`, on `cpus`, to `to`; (p50, p99) in µs.
pub(super) fn rr_client(ns: &str, to: Ipv4Addr, size: usize, n: u32, cpus: &[usize]) -> Quantiles {
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
pub(super) const RR_CHUNKS: u32 = 10;
/// The port of the paired ping-pong's listeners.
pub(super) const RR_PAIR_PORT: u16 = 7778;

/// One side of a paired ping-pong: the client's namespace, the server's, and the address the client uses.
pub(super) struct RrEnd<'a> {
    pub(super) client_ns: &'a str,
    pub(super) server_ns: &'a str,
    pub(super) to: Ipv4Addr,
}

/// Plain veth's ping-pong (`base`) and a datapath's (`own`), `n` round trips of `size` bytes each, interleaved
/// in ten chunks (plain, datapath, plain, ...), by one client thread on `client_cpus` and one server thread on
/// `server_cpus` that serve both connections in turn. On a VM most of a round trip is waking a halted vCPU,
/// and that cost drifts over seconds; and with every CPU allowed (shared layout) where the scheduler puts a
/// server thread changes it several times over. Interleaved on the same two threads, both are measured
/// under the same conditions. Returns ((p50, p99) of plain veth, (p50, p99) of the datapath) in
/// µs; when one side cannot connect, the other is measured alone.
pub(super) fn rr_pair(
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
pub(super) fn can_connect(ns: &str, to: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
    in_netns(ns, move || TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2)).is_ok())
}
