//! The userspace tun proxy end to end (needs root): two "worker hosts" as network namespaces joined by a
//! veth pair, each running the real `NetManager` binary (inside its namespace) against the root + cluster
//! network services running in-process (the cluster's gRPC listener lives in host A's namespace). Instances
//! are real processes in their own namespaces, wired through the local API, serving TCP/UDP from Rust
//! threads that joined their namespace.
//!
//! Checked: round-robin per connection over a local and a remote instance (TCP and UDP), closest = the local
//! one, ICMP echo to a service IP, garbage on the tunnel port counted, a NetManager restart recovers (tun and
//! routes re-created), undeploying an instance moves traffic to the remaining one.

use oak_orchestrators::{cluster, root};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Run `f` on a fresh thread inside the network namespace at `ns` (sockets it creates live there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {ns}: {e}"));
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Netns(String);
impl Netns {
    fn new(prefix: &str) -> Netns {
        let n = unique(prefix);
        sh(&["ip", "netns", "add", &n]);
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        Netns(n)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A process in a fresh netns (an "instance").
fn instance() -> (Proc, String) {
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let child = Proc(Command::new("unshare").args(["-n", "sleep", "600"]).stdin(Stdio::null()).spawn().unwrap());
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() == Some(&own) {
        assert!(Instant::now() < deadline, "unshare did not create a netns");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("/proc/{pid}/ns/net"))
}

/// Minimal HTTP/1.1 client run inside `ns` (the NetManager's API listens on its namespace's loopback).
fn http(ns: &str, port: u16, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
    let (method, path) = (method.to_string(), path.to_string());
    in_ns(ns, move || -> Result<(u16, Value), String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        let code: u16 = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad answer {out:?}"))?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, serde_json::from_str(body).unwrap_or(Value::Null)))
    })
    .join()
    .unwrap()
}

/// TCP and UDP servers answering `name` (TCP on 8080: write and close; UDP on 8081: echo the name).
fn serve(ns: &str, name: &'static str) {
    let _ = in_ns(ns, move || {
        let l = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(format!("{name}\n").as_bytes());
        }
    });
    let _ = in_ns(ns, move || {
        let u = UdpSocket::bind("0.0.0.0:8081").unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(name.as_bytes(), from);
        }
    });
}

fn tcp_ask(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_string())
    })
    .join()
    .unwrap()
}

fn udp_ask(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    in_ns(ns, move || {
        let u = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        u.send_to(b"who?", (ip, port)).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 100];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    })
    .join()
    .unwrap()
}

/// A bpffs for the fast path's pins, mounted in this (the machine's) mount namespace: `ip netns exec`
/// gives each NetManager a private /sys, so pins under its /sys/fs/bpf would die with the process.
fn test_bpffs() -> String {
    let root = "/run/oakestra-rs-test/bpffs";
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(root)) {
        std::fs::create_dir_all(root).unwrap();
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .expect("mount bpffs");
    }
    root.to_string()
}

/// The flags that put a fast-path NetManager's pins on the test bpffs.
fn pin_flags() -> Vec<String> {
    vec!["--bpf-pin-root".into(), test_bpffs()]
}

/// Where a fast-path NetManager of node `node` (bridge obr0) pins its maps and links.
fn pin_dir(node: &str) -> PathBuf {
    PathBuf::from(test_bpffs()).join("oakestra-rs").join(format!("{node}-obr0"))
}

/// Ok when all `n` answers of `ask` are `want`; otherwise the answers (errors as their text).
fn all_answer(n: usize, want: &str, ask: impl Fn() -> Result<String, String>) -> Result<(), String> {
    let answers: Vec<String> = (0..n).map(|_| ask().unwrap_or_else(|e| e)).collect();
    if answers.iter().all(|a| a == want) {
        Ok(())
    } else {
        Err(format!("{answers:?}"))
    }
}

fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}

/// A worker host: a namespace running the NetManager binary.
struct Worker {
    ns: Netns,
    ip: Ipv4Addr,
    cfg: PathBuf,
    data: PathBuf,
    log: PathBuf,
    nm: Option<Proc>,
    /// Extra NetManager flags (e.g. --no-tun-offload).
    extra: Vec<String>,
    /// The fast path's pin directory (removed when the worker goes away).
    pins: Option<PathBuf>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.nm.take());
        if let Some(p) = &self.pins {
            oak_netmanager::ebpf::remove_pins(p);
        }
    }
}

const API: u16 = 6000;

impl Worker {
    fn start_nm(&mut self) {
        // OAK_NM_BIN: another NetManager build (e.g. a release one for the benchmark)
        let bin = std::env::var("OAK_NM_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_NetManager").to_string());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.0, &bin, "-c"])
            .arg(&self.cfg)
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--bridge",
                "obr0",
                "--tun",
                "otun0",
                "-p",
                &API.to_string(),
                "--log-level",
                "oak_netmanager=debug,netmanager_ebpf=debug,info",
            ])
            // OAK_NM_ARGS: extra flags, e.g. --no-tun-offload
            .args(&self.extra)
            .args(std::env::var("OAK_NM_ARGS").unwrap_or_default().split_whitespace())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nm = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, v)) = http(&self.ns.path(), API, "GET", "/status", None) {
                if v["ready"] == true && v["proxy"] == true {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "NetManager in {} not ready; log:\n{}", self.ns.0, self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn deploy(&self, ns_of_pid: &str, service_id: &str, job: &str, n: u32) -> Ipv4Addr {
        let pid: u32 = ns_of_pid.split('/').nth(2).unwrap().parse().unwrap();
        let (code, body) = http(
            &self.ns.path(),
            API,
            "POST",
            "/container/deploy",
            Some(json!({"pid": pid, "serviceName": job, "serviceId": service_id, "instanceNumber": n})),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        body["nsAddress"].as_str().unwrap().parse().unwrap()
    }

    fn counters(&self) -> Value {
        http(&self.ns.path(), API, "GET", "/counters", None).unwrap().1
    }
}

fn write_config(path: &Path, ip: Ipv4Addr, cluster: Ipv4Addr, node: &str) {
    std::fs::write(
        path,
        json!({"NodePublicAddress": ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": cluster.to_string(),
               "ClusterNetPort": "10110", "NodeName": node})
        .to_string(),
    )
    .unwrap();
}

/// Ask until `ok` holds for an answer, or panic after `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The root and cluster network services in-process (the cluster's listener on 0.0.0.0:10110 in host
/// `ha`'s namespace) and `svcE`/`app.ns.echo.ns` allocated at the root: the services, its rr and closest IPs.
async fn services(
    dir: &Path,
    ha: &Netns,
) -> (root::netsvc::RootNetSvc, cluster::netsvc::ClusterNetSvc, Ipv4Addr, Ipv4Addr) {
    let rootsvc = root::netsvc::RootNetSvc::open(&dir.join("root")).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let root_url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(root::netsvc::serve_listener(rootsvc.clone(), l));
    let cluster = cluster::netsvc::ClusterNetSvc::open(&dir.join("cluster"), &root_url, "c1").unwrap();
    let std_l = in_ns(&ha.path(), || std::net::TcpListener::bind("0.0.0.0:10110").unwrap()).join().unwrap();
    std_l.set_nonblocking(true).unwrap();
    tokio::spawn(cluster::netsvc::serve_listener(cluster.clone(), tokio::net::TcpListener::from_std(std_l).unwrap()));
    let (rr, closest) = rootsvc.allocate_service_ips("svcE", "app.ns.echo.ns").unwrap();
    (rootsvc, cluster, rr, closest)
}

/// Two worker hosts joined by a veth pair, the root + cluster network services (the cluster's listener in
/// host A's namespace), and `svcE`/`app.ns.echo.ns` allocated at the root (returns its rr and closest IPs).
async fn world(
    dir: &Path,
    extra_a: &[&str],
    extra_b: &[&str],
) -> (Worker, Worker, Ipv4Addr, Ipv4Addr, root::netsvc::RootNetSvc, cluster::netsvc::ClusterNetSvc) {
    // two hosts joined by a veth pair
    let (ha, hb) = (Netns::new("otpa"), Netns::new("otpb"));
    let (ipa, ipb) = (Ipv4Addr::new(192, 168, 77, 1), Ipv4Addr::new(192, 168, 77, 2));
    sh(&["ip", "-n", &ha.0, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", &hb.0]);
    sh(&["ip", "-n", &ha.0, "addr", "add", "192.168.77.1/24", "dev", "up0"]);
    sh(&["ip", "-n", &hb.0, "addr", "add", "192.168.77.2/24", "dev", "up1"]);
    sh(&["ip", "-n", &ha.0, "link", "set", "up0", "up"]);
    sh(&["ip", "-n", &hb.0, "link", "set", "up1", "up"]);

    let (rootsvc, cluster, rr, closest) = services(dir, &ha).await;

    let mk = |ns: Netns, ip: Ipv4Addr, tag: &str, extra: &[&str]| {
        let cfg = dir.join(format!("netcfg-{tag}.json"));
        let node = unique(&format!("node{tag}"));
        write_config(&cfg, ip, ipa, &node);
        let ebpf = !extra.contains(&"--no-ebpf");
        Worker {
            ns,
            ip,
            cfg,
            data: dir.join(format!("nm-{tag}")),
            log: dir.join(format!("nm-{tag}.log")),
            nm: None,
            extra: {
                let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                if ebpf {
                    v.extend(pin_flags());
                }
                v
            },
            pins: ebpf.then(|| pin_dir(&node)),
        }
    };
    let (wa, wb) = (mk(ha, ipa, "a", extra_a), mk(hb, ipb, "b", extra_b));
    (wa, wb, rr, closest, rootsvc, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_round_robin_closest_undeploy() {
    if !is_root() {
        eprintln!("skipping two_workers_round_robin_closest_undeploy: needs root (network namespaces, tun)");
        return;
    }
    two_workers(&["--no-ebpf"], &["--no-ebpf"]).await;
}

/// The same with the eBPF fast path on both workers (the tun path still resolves unknown service IPs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_ebpf_fast_path() {
    if !is_root() {
        eprintln!("skipping two_workers_ebpf_fast_path: needs root (network namespaces, eBPF)");
        return;
    }
    two_workers(&[], &[]).await;
}

/// A mixed pair: worker A on the eBPF fast path, worker B on the tun path only; both directions work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_ebpf_and_tun_workers() {
    if !is_root() {
        eprintln!("skipping mixed_ebpf_and_tun_workers: needs root (network namespaces, eBPF)");
        return;
    }
    two_workers(&[], &["--no-ebpf"]).await;
}

/// The fast path's object with the first instruction of its TC programs' section made invalid: the ELF
/// and its relocations stay sound, so the object loads and the kernel's verifier is what refuses it. None:
/// no object has been built.
fn refused_object(dir: &Path) -> Option<PathBuf> {
    let mut b = std::fs::read(oak_netmanager::ebpf::default_object()?).ok()?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    // ELF64 little endian: section headers at e_shoff, e_shnum of them, names in section e_shstrndx
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(&b, 0x28), u16_at(&b, 0x3a), u16_at(&b, 0x3c), u16_at(&b, 0x3e));
    let sh = |i: usize| shoff + i * shentsize;
    let names = u64_at(&b, sh(shstrndx) + 0x18);
    let text = (0..shnum)
        .find(|&i| {
            let n = names + u32_at(&b, sh(i));
            b[n..].starts_with(b"classifier\0")
        })
        .expect("the eBPF object has a `classifier` section (its TC programs)");
    let off = u64_at(&b, sh(text) + 0x18);
    b[off] = 0xff; // no such opcode
    let out = dir.join("refused.o");
    std::fs::write(&out, b).ok()?;
    Some(out)
}

/// A kernel that refuses the fast path's programs: the NetManager says why, once, and serves the service
/// IPs on the tun path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_programs_fall_back_to_the_tun_path() {
    if !is_root() {
        eprintln!("skipping refused_programs_fall_back_to_the_tun_path: needs root (network namespaces, eBPF)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(obj) = refused_object(dir.path()) else {
        assert!(std::env::var_os("CI").is_none(), "eBPF object missing: `cargo xtask build-ebpf` builds it");
        eprintln!("skipping refused_programs_fall_back_to_the_tun_path: no eBPF object");
        return;
    };
    let obj = obj.to_string_lossy().to_string();
    let (mut wa, mut wb, rr, _closest, _rootsvc, _cluster) =
        world(dir.path(), &["--ebpf-object", &obj], &["--no-ebpf"]).await;
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        let log = wa.log_text();
        let said = log
            .lines()
            .filter(|l| l.contains("eBPF fast path unavailable, running on the tun path only"))
            .collect::<Vec<_>>();
        assert_eq!(said.len(), 1, "the reason, once:\n{log}");
        eprintln!("A's NetManager: {}", said[0]);
        assert!(said[0].contains("refused"), "it names the kernel's refusal: {}", said[0]);
        let (_, st) = http(&wa.ns.path(), API, "GET", "/status", None).unwrap();
        assert_eq!(st["ebpf"], false, "{st}");
        // the tun path serves the service IP across the two workers
        let (_i1, ns_i1) = instance();
        let (_ca, ns_ca) = instance();
        wb.deploy(&ns_i1, "svcE", "app.ns.echo.ns", 0);
        wa.deploy(&ns_ca, "svcC", "app.ns.client.ns", 0);
        serve(&ns_i1, "inst0");
        eventually(20, "an answer through the round-robin IP", || {
            tcp_ask(&ns_ca, rr, 8080).and_then(|a| if a.starts_with("inst0") { Ok(()) } else { Err(a) })
        });
        let c = wa.counters();
        assert_eq!(c["ebpf"], false, "{c}");
        assert!(c["events"]["forward_translated"].as_u64().unwrap() > 0, "the tun proxy translated it: {c}");
    });
}

/// A TCP stream through a service IP on the eBPF path keeps going while worker A's NetManager is killed
/// (kill -9) and started again: the pinned programs and maps carry it, the new NetManager re-adopts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_stream_survives_netmanager_restart() {
    if !is_root() {
        eprintln!("skipping ebpf_stream_survives_netmanager_restart: needs root (network namespaces, eBPF)");
        return;
    }
    stream_across_restart(true).await;
}

/// The same on the tun path: the stream stalls while A's NetManager is down (no datapath at all) and goes
/// on after the restart, with the conversion table the proxy saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tun_stream_survives_netmanager_restart() {
    if !is_root() {
        eprintln!("skipping tun_stream_survives_netmanager_restart: needs root (network namespaces, tun)");
        return;
    }
    stream_across_restart(false).await;
}

async fn stream_across_restart(ebpf: bool) {
    let dir = tempfile::tempdir().unwrap();
    let flags: &[&str] = if ebpf { &[] } else { &["--no-ebpf"] };
    let (mut wa, mut wb, rr, _closest, _rootsvc, _cluster) = world(dir.path(), flags, flags).await;
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        let (_i1, ns_i1) = instance();
        let (_ca, ns_ca) = instance();
        // tun path: a decoy instance 0 without the echo server takes the first contact (round-robin
        // position 0) and would take the stream's packets too if the restarted proxy had forgotten that
        // the stream went to instance 1
        let decoy = (!ebpf).then(instance);
        if let Some((_, ns_d)) = &decoy {
            wb.deploy(ns_d, "svcE", "app.ns.echo.ns", 0);
            serve(ns_d, "decoy");
        }
        wb.deploy(&ns_i1, "svcE", "app.ns.echo.ns", 1);
        wa.deploy(&ns_ca, "svcC", "app.ns.client.ns", 0);
        serve(&ns_i1, "inst1");
        // an echo server on 9000
        let _ = in_ns(&ns_i1, || {
            let l = std::net::TcpListener::bind("0.0.0.0:9000").unwrap();
            for mut c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        // first contact resolves the service through the tun path; the stream after it is a kernel flow
        if ebpf {
            eventually(20, "service resolved", || tcp_ask(&ns_ca, rr, 8080).map(|_| ()));
        } else {
            // both instances known to A before the first contact, which goes to the decoy
            eventually(20, "service resolved with both instances", || {
                let a = tcp_ask(&ns_ca, rr, 8080)?;
                if a == "decoy" {
                    Ok(())
                } else {
                    Err(format!("first contact answered by {a}"))
                }
            });
        }
        let before = if ebpf { wa.counters()["ebpf"]["new_flow"].as_u64().unwrap() } else { 0 };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, progress2) = (stop.clone(), progress.clone());
        let stream = in_ns(&ns_ca, move || -> Result<u64, String> {
            let mut c = TcpStream::connect_timeout(&SocketAddr::from((rr, 9000)), Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut n = 0u64;
            let mut buf = [0u8; 1024];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let msg = [(n % 251) as u8; 1024];
                c.write_all(&msg).map_err(|e| format!("write after {n} round trips: {e}"))?;
                c.read_exact(&mut buf).map_err(|e| format!("read after {n} round trips: {e}"))?;
                if buf != msg {
                    return Err(format!("corrupted echo after {n} round trips"));
                }
                n += 1;
                progress2.store(n, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(n)
        });
        let advance = |what: &str| {
            let from = progress.load(std::sync::atomic::Ordering::Relaxed);
            eventually(10, what, || {
                let now = progress.load(std::sync::atomic::Ordering::Relaxed);
                if now >= from + 50 {
                    Ok(())
                } else {
                    Err(format!("{from} -> {now} round trips"))
                }
            });
        };
        advance("stream running");
        if ebpf {
            assert!(wa.counters()["ebpf"]["new_flow"].as_u64().unwrap() > before, "the stream is a fast-path flow");
        } else {
            // the proxy saved the stream's conversion
            let saved = wa.data.join("proxy-flows");
            eventually(10, "conversion table saved", || match std::fs::read_to_string(&saved) {
                Ok(t) if t.lines().any(|l| l.split_whitespace().nth(4) == Some("9000")) => Ok(()),
                other => Err(format!("{other:?}")),
            });
        }
        // kill -9: no userspace datapath on A at all for a while
        drop(wa.nm.take());
        if ebpf {
            advance("stream keeps going while A's NetManager is down");
        }
        wa.start_nm();
        advance("stream keeps going after A's NetManager is back");
        if ebpf {
            let c = wa.counters();
            assert!(c["ebpf"]["new_flow"].as_u64().unwrap() > 0, "counters survive too: {c}");
            assert!(wa.log_text().contains("re-adopted the pinned fast-path maps"), "{}", wa.log_text());
        } else {
            assert!(wa.log_text().contains("restored the conversions of the previous run"), "{}", wa.log_text());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = stream.join().unwrap().expect("the stream survived");
        eprintln!("{n} round trips across the restart");
    });
}

/// The same with plain packets (no tun or UDP offloads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_plain_packets() {
    if !is_root() {
        eprintln!("skipping two_workers_plain_packets: needs root (network namespaces, tun)");
        return;
    }
    two_workers(&["--no-tun-offload", "--no-ebpf"], &["--no-tun-offload", "--no-ebpf"]).await;
}

async fn two_workers(extra_a: &[&str], extra_b: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (mut wa, mut wb, rr, closest, _rootsvc, _cluster) = world(dir.path(), extra_a, extra_b).await;
    let (ebpf_a, ebpf_b) = (!extra_a.contains(&"--no-ebpf"), !extra_b.contains(&"--no-ebpf"));
    let ipb = wb.ip;
    let t0 = Instant::now();
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        eprintln!("both NetManagers ready in {:?}", t0.elapsed());

        // a service with one instance per worker, and a client instance on each worker
        let (_i0, ns_i0) = instance();
        let (_i1, ns_i1) = instance();
        let (_ca, ns_ca) = instance();
        let (_cb, ns_cb) = instance();
        let ip0 = wa.deploy(&ns_i0, "svcE", "app.ns.echo.ns", 0);
        let ip1 = wb.deploy(&ns_i1, "svcE", "app.ns.echo.ns", 1);
        wa.deploy(&ns_ca, "svcC", "app.ns.client.ns", 0);
        wb.deploy(&ns_cb, "svcC", "app.ns.client.ns", 1);
        eprintln!("instances: inst0 {ip0} on A ({}), inst1 {ip1} on B ({}); rr {rr}, closest {closest}", wa.ip, wb.ip);
        serve(&ns_i0, "inst0");
        serve(&ns_i1, "inst1");

        // first contact: the service IP is unknown to A, resolved on the fly
        let t1 = Instant::now();
        eventually(20, "first TCP answer through the round-robin IP", || tcp_ask(&ns_ca, rr, 8080).map(|_| ()));
        eprintln!("first answer after {:?}", t1.elapsed());

        // round-robin per connection: both instances answer (once both registrations reached A)
        let mut last = Vec::new();
        eventually(20, "round robin over both instances (TCP)", || {
            let answers: Vec<String> = (0..6).map(|_| tcp_ask(&ns_ca, rr, 8080).unwrap_or_else(|e| e)).collect();
            let t = tally(&answers);
            last = answers;
            if t.get("inst0") == Some(&3) && t.get("inst1") == Some(&3) {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        });
        eprintln!("TCP round robin: {last:?}");
        let answers: Vec<String> = (0..6).map(|_| udp_ask(&ns_ca, rr, 8081).unwrap_or_else(|e| e)).collect();
        let t = tally(&answers);
        assert!(t.get("inst0") == Some(&3) && t.get("inst1") == Some(&3), "UDP round robin: {answers:?}");
        eprintln!("UDP round robin: {answers:?}");

        // closest: the local instance, from either side
        all_answer(4, "inst0", || tcp_ask(&ns_ca, closest, 8080)).unwrap_or_else(|a| panic!("closest from A: {a}"));
        eventually(20, "closest from B", || all_answer(4, "inst1", || tcp_ask(&ns_cb, closest, 8080)));
        all_answer(4, "inst1", || udp_ask(&ns_cb, closest, 8081))
            .unwrap_or_else(|a| panic!("closest from B (UDP): {a}"));

        // bulk TCP both ways across the overlay, every byte checked: on the tun path with offloads the
        // receiver rebuilds super-packets from runs of segments, which must keep every byte in order
        let runs_before = wb.counters()["events"]["runs_reassembled"].as_u64().unwrap_or(0);
        let supers_before = wb.counters()["events"]["super_packets_received"].as_u64().unwrap_or(0);
        let ev = |c: &Value, k: &str| c["events"][k].as_u64().unwrap_or(0);
        let a_before = wa.counters();
        sink(&ns_i1);
        sink(&ns_i0);
        bulk(&ns_ca, ip1, 24 << 20).unwrap_or_else(|e| panic!("bulk A -> B: {e}"));
        let a_after = wa.counters();
        let reads = ev(&a_after, "tun_reads") - ev(&a_before, "tun_reads");
        let sends = ev(&a_after, "tunnel_sends") - ev(&a_before, "tunnel_sends");
        eprintln!("bulk A -> B: A read {reads} packets from its tun and sent {sends} times");
        // on the tun path with offloads instances build super-packets that cross as one UDP send each
        let kernel_default = |extra: &[&str]| !extra.contains(&"--no-ebpf") || extra.contains(&"--no-tun-offload");
        for (w, ns, extra) in [(&wa, &ns_ca, extra_a), (&wb, &ns_cb, extra_b)] {
            let want = if kernel_default(extra) { 65535 } else { oak_netmanager::proxy::instance_gso_max_segs(1450) };
            assert_eq!(gso_max_segs(ns), want, "eth0 of a client instance on {}", w.ip);
        }
        if !ebpf_a && !extra_a.contains(&"--no-tun-offload") {
            assert!(reads > 0 && sends <= reads, "one send per super-packet: {reads} reads, {sends} sends");
        }
        // the tunnel's datagrams bypass connection tracking (raw-table rules that matched packets)
        for (w, ebpf) in [(&wa, ebpf_a), (&wb, ebpf_b)] {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", w.ns.path()))
                .args(["iptables", "-w", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let hits = |what: &str| -> u64 {
                let line = text
                    .lines()
                    .find(|l| l.contains(what))
                    .unwrap_or_else(|| panic!("no rule {what:?} on {}: {text}", w.ip));
                line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap()
            };
            // (an eBPF worker takes the tunnel's data in front of netfilter)
            let tunnel = hits("oak:obr0:tunnel");
            assert!((ebpf || tunnel > 0) && text.contains("dpt:50103"), "tunnel NOTRACK on {}: {text}", w.ip);
            assert!(hits("/* oak:obr0 */") > 0, "overlay NOTRACK on {}: {text}", w.ip);
        }
        bulk(&ns_cb, ip0, 24 << 20).unwrap_or_else(|e| panic!("bulk B -> A: {e}"));
        let runs = wb.counters()["events"]["runs_reassembled"].as_u64().unwrap_or(0) - runs_before;
        eprintln!("bulk transfers intact; B rebuilt {runs} super-packets from runs");
        if !ebpf_a && !ebpf_b && !extra_a.contains(&"--no-tun-offload") {
            assert!(runs > 0, "the tun receiver took runs of segments as super-packets: {}", wb.counters());
        }
        if ebpf_a && !ebpf_b {
            // over a veth underlay an eBPF sender's GSO packets reach the tun receiver uncut
            let supers = wb.counters()["events"]["super_packets_received"].as_u64().unwrap_or(0) - supers_before;
            assert!(supers > 0, "B took the eBPF sender's super-packets whole: {}", wb.counters());
        }

        // ICMP echo to a service IP
        let pid_ca = ns_ca.split('/').nth(2).unwrap().to_string();
        let ok = Command::new("nsenter")
            .args(["-t", &pid_ca, "-n", "busybox", "ping", "-c", "2", "-W", "2", &rr.to_string()])
            .output()
            .unwrap();
        assert!(ok.status.success(), "ping {rr}: {}", String::from_utf8_lossy(&ok.stdout));

        // RTT probes ran; A measured B
        eventually(10, "RTT probes answered", || {
            let c = wa.counters();
            if c["events"]["probe_replies"].as_u64().unwrap() > 0 {
                Ok(())
            } else {
                Err(format!("{c}"))
            }
        });
        let ca = wa.counters();
        eprintln!("counters A: {ca}");
        if ebpf_a {
            // after the first contact (resolved by the tun path) the flows ran in the kernel
            let e = &ca["ebpf"];
            assert!(e["new_flow"].as_u64().unwrap() >= 10, "{ca}");
            assert!(e["encap"].as_u64().unwrap() > 0 && e["decap"].as_u64().unwrap() > 0, "{ca}");
            assert!(e["local_deliver"].as_u64().unwrap() > 0 && e["rev_nat"].as_u64().unwrap() > 0, "{ca}");
            // the programs' aya-log records reach the NetManager's log
            eventually(5, "eBPF log records in the NetManager's log", || {
                if wa.log_text().contains("new flow to service") {
                    Ok(())
                } else {
                    Err("not yet".into())
                }
            });
        } else {
            assert_eq!(ca["ebpf"], false, "{ca}");
            assert!(ca["events"]["forward_translated"].as_u64().unwrap() > 0, "{ca}");
        }
        let cb = wb.counters();
        eprintln!("counters B: {cb}");
        if ebpf_b {
            assert!(cb["ebpf"]["decap"].as_u64().unwrap() > 0, "B took tunnel traffic in the kernel: {cb}");
        }

        // garbage on B's tunnel port is dropped and counted
        let before = wb.counters();
        let target = SocketAddr::from((ipb, 50103));
        in_ns(&wa.ns.path(), move || {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.send_to(b"definitely not a tunnel packet", target).unwrap();
            u.send_to(&[0x4f], target).unwrap();
            u.send_to(&[0x4f, 1, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 1], target).unwrap();
            u.send_to(&[0x4f, 7, 0, 0, 0, 0, 0, 0], target).unwrap();
        })
        .join()
        .unwrap();
        eventually(5, "garbage counted", || {
            let c = wb.counters();
            let d = |k: &str| c["drops"][k].as_u64().unwrap() - before["drops"][k].as_u64().unwrap();
            if d("tunnel_bad_magic") == 1
                && d("tunnel_short") == 1
                && d("tunnel_malformed_inner") == 1
                && d("tunnel_bad_version") == 1
            {
                Ok(())
            } else {
                Err(format!("{c}"))
            }
        });

        // a burst queues datagrams on B's tunnel socket faster than B answers them: every one the kernel
        // delivered is handled (a batch of reads must not read one datagram more than it handles)
        const BURST: u64 = 3000;
        let udp_drops = |ns: String| {
            in_ns(&ns, || {
                // the kernel's count of datagrams dropped for a full receive buffer (Udp: RcvbufErrors)
                let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
                let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
                let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
                let at = names.split_whitespace().position(|n| n == "RcvbufErrors").unwrap();
                values.split_whitespace().nth(at).unwrap().parse::<u64>().unwrap()
            })
            .join()
            .unwrap()
        };
        // A's periodic RTT probes also reach B's tunnel socket while the burst is handled: they are counted
        // on both sides (B reads its count first, so every probe in it was already counted by A)
        let before = wb.counters();
        let a_probes = |c: &Value| c["events"]["probes_sent"].as_u64().unwrap();
        let a_before = a_probes(&wa.counters());
        let kernel_before = udp_drops(wb.ns.path());
        in_ns(&wa.ns.path(), move || {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            for id in 0..BURST as u32 {
                let p = oak_netmanager::proxy::packet::probe(oak_netmanager::proxy::packet::TYPE_PROBE_REQUEST, id, 1);
                u.send_to(&p, target).unwrap();
            }
        })
        .join()
        .unwrap();
        eventually(10, "every probe of the burst handled", || {
            let c = wb.counters();
            let handled =
                c["events"]["probe_requests"].as_u64().unwrap() - before["events"]["probe_requests"].as_u64().unwrap();
            let kernel = udp_drops(wb.ns.path()) - kernel_before;
            let periodic = a_probes(&wa.counters()) - a_before;
            if handled + kernel == BURST + periodic {
                Ok(())
            } else {
                Err(format!("{handled} of {BURST} (+{periodic} periodic from A) handled, {kernel} dropped by the kernel (full buffer); {c}"))
            }
        });

        // NetManager A restarts: tun and routes come back, both instances are reachable again
        drop(wa.nm.take());
        let t2 = Instant::now();
        wa.start_nm();
        eventually(20, "round robin after A's restart", || {
            let answers: Vec<String> = (0..4).map(|_| tcp_ask(&ns_ca, rr, 8080).unwrap_or_else(|e| e)).collect();
            let t = tally(&answers);
            if t.get("inst0") == Some(&2) && t.get("inst1") == Some(&2) {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        });
        eprintln!("round robin again {:?} after A's restart", t2.elapsed());

        // undeploy inst1 on B: traffic moves to inst0 within seconds
        let (code, body) = http(
            &wb.ns.path(),
            API,
            "POST",
            "/container/undeploy",
            Some(json!({"serviceName": "app.ns.echo.ns", "serviceId": "svcE", "instanceNumber": 1})),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let t3 = Instant::now();
        eventually(15, "traffic moves to the remaining instance", || {
            all_answer(4, "inst0", || tcp_ask(&ns_ca, rr, 8080))
        });
        eprintln!("traffic on inst0 only {:?} after the undeploy", t3.elapsed());
        all_answer(4, "inst0", || udp_ask(&ns_ca, rr, 8081)).unwrap_or_else(|a| panic!("UDP after undeploy: {a}"));
    });
}

/// `gso_max_segs` of eth0 in the instance netns `ns` (a /proc/PID/ns/net path).
fn gso_max_segs(ns: &str) -> u32 {
    let pid = ns.split('/').nth(2).unwrap();
    let out = Command::new("nsenter").args(["-t", pid, "-n", "ip", "-d", "link", "show", "eth0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    let n = words.find(|w| *w == "gso_max_segs").and_then(|_| words.next()).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("no gso_max_segs in: {text}"))
}

fn fnv1a(h: &mut u64, data: &[u8]) {
    for b in data {
        *h = (*h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
}

/// A TCP server on 9100 in `ns`: reads a connection to its end, answers the byte count and FNV-1a hash.
fn sink(ns: &str) {
    let _ = in_ns(ns, || {
        let l = std::net::TcpListener::bind("0.0.0.0:9100").unwrap();
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let (mut n, mut h, mut buf) = (0u64, 0xcbf29ce484222325u64, vec![0u8; 1 << 16]);
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                    fnv1a(&mut h, &buf[..k]);
                }
                let _ = c.write_all(format!("{n} {h:016x}").as_bytes());
            });
        }
    });
}

/// Sends `len` pseudo-random bytes from `ns` to `ip`:9100 (a [`sink`]) and checks its count and hash.
fn bulk(ns: &str, ip: Ipv4Addr, len: usize) -> Result<(), String> {
    in_ns(ns, move || {
        let mut x: u64 = 0x2545f4914f6cdd1d;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut h = 0xcbf29ce484222325u64;
        fnv1a(&mut h, &data);
        let mut c = TcpStream::connect_timeout(&SocketAddr::from((ip, 9100)), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(&data).map_err(|e| format!("send: {e}"))?;
        c.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        c.read_to_string(&mut answer).map_err(|e| format!("answer: {e}"))?;
        let want = format!("{len} {h:016x}");
        if answer == want {
            Ok(())
        } else {
            Err(format!("the sink got {answer:?}, sent {want:?}"))
        }
    })
    .join()
    .unwrap()
}

/// iperf3 client in `ns_pid`'s namespace (or a named netns) against `server`; returns bits/s received.
fn iperf(client: &[&str], server: Ipv4Addr, secs: u32) -> f64 {
    let mut args: Vec<String> = client.iter().map(|s| s.to_string()).collect();
    args.extend(["iperf3", "-c", &server.to_string(), "-t", &secs.to_string(), "-J"].map(String::from));
    let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!("iperf3 {:?}: retransmits {}", &args[..2], v["end"]["sum_sent"]["retransmits"]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 {args:?}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Benchmark core: single-stream TCP with iperf3, plain veth between the two host namespaces vs the tun
/// overlay (client instance on A → service IP → instance on B). Prints the ratio. Slow and machine
/// dependent, so ignored by default: `OAK_NM_BIN=$CARGO_TARGET_DIR/release/NetManager cargo test -p
/// oak-netmanager --test tun_proxy -- --ignored --nocapture bench` (OAK_BENCH_SECS: duration, default 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_veth_vs_tun_overlay() {
    if !is_root() || Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("skipping bench_veth_vs_tun_overlay: needs root and iperf3");
        return;
    }
    let secs: u32 = std::env::var("OAK_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let (mut wa, mut wb, rr, _closest, _rootsvc, _cluster) = world(dir.path(), &["--no-ebpf"], &["--no-ebpf"]).await;
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        let (_srv, ns_srv) = instance();
        let (_cli, ns_cli) = instance();
        wb.deploy(&ns_srv, "svcE", "app.ns.echo.ns", 0);
        wa.deploy(&ns_cli, "svcC", "app.ns.client.ns", 0);
        let pid = |ns: &str| ns.split('/').nth(2).unwrap().to_string();
        let (ps, pc) = (pid(&ns_srv), pid(&ns_cli));
        // servers: one on host B (underlay), one in the instance (overlay)
        let _s1 = Proc(
            Command::new("ip").args(["netns", "exec", &wb.ns.0, "iperf3", "-s"]).stdout(Stdio::null()).spawn().unwrap(),
        );
        let _s2 = Proc(
            Command::new("nsenter").args(["-t", &ps, "-n", "iperf3", "-s"]).stdout(Stdio::null()).spawn().unwrap(),
        );
        std::thread::sleep(Duration::from_millis(500));
        // make sure the overlay path is up (resolution) before measuring
        eventually(20, "overlay reachable", || {
            let ok = Command::new("nsenter")
                .args(["-t", &pc, "-n", "busybox", "ping", "-c", "1", "-W", "1", &rr.to_string()])
                .status()
                .unwrap();
            if ok.success() {
                Ok(())
            } else {
                Err("no ping".into())
            }
        });
        let veth = iperf(&["ip", "netns", "exec", &wa.ns.0], wb.ip, secs);
        let tun = iperf(&["nsenter", "-t", &pc, "-n"], rr, secs);
        eprintln!(
            "single-stream TCP: plain veth {:.2} Gbit/s, tun overlay via service IP {:.2} Gbit/s, ratio {:.1} %",
            veth / 1e9,
            tun / 1e9,
            100.0 * tun / veth
        );
        eprintln!("counters A: {}", wa.counters());
        eprintln!("counters B: {}", wb.counters());
        for w in [&wa, &wb] {
            let out = Command::new("ip").args(["-n", &w.ns.0, "-s", "link", "show", "otun0"]).output().unwrap();
            eprintln!(
                "{} otun0: {}",
                w.ns.0,
                String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        let out = Command::new("ip").args(["netns", "exec", &wb.ns.0, "cat", "/proc/net/snmp"]).output().unwrap();
        eprintln!(
            "B udp: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("Udp:"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    });
}

/// A UDP relay in namespace `ns` on `listen_port` that forwards to `upstream` and back, each datagram
/// delayed by `delay` (this kernel has no netem): a worker behind it is "far away".
fn delay_relay(ns: &str, listen_port: u16, upstream: SocketAddr, delay: Duration) {
    let _ = in_ns(ns, move || {
        let front = std::sync::Arc::new(UdpSocket::bind(("0.0.0.0", listen_port)).unwrap());
        let mut ups: std::collections::HashMap<SocketAddr, std::sync::Arc<UdpSocket>> = Default::default();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = front.recv_from(&mut buf) {
            let up = ups
                .entry(peer)
                .or_insert_with(|| {
                    let u = std::sync::Arc::new(UdpSocket::bind("0.0.0.0:0").unwrap());
                    u.connect(upstream).unwrap();
                    let (u2, f2) = (u.clone(), front.clone());
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 65536];
                        while let Ok(n) = u2.recv(&mut b) {
                            std::thread::sleep(delay);
                            let _ = f2.send_to(&b[..n], peer);
                        }
                    });
                    u
                })
                .clone();
            std::thread::sleep(delay);
            let _ = up.send(&buf[..n]);
        }
    });
}

/// Closest by measured RTT between two *remote* instances: three worker hosts on a LAN (a bridge in its
/// own namespace); worker C is reached through a relay adding 15 ms each way, on worker A's host. The far
/// instance has the lower instance number (the tie-breaker), so choosing the near one proves the RTT is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closest_follows_measured_rtt() {
    closest_by_rtt("closest_follows_measured_rtt", false, true).await;
}

/// The same with workers A and B on the eBPF fast path, the relay on a host of its own: A's kernel
/// balances and picks the closest instance (from the same RTTs) and carries the flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closest_follows_measured_rtt_ebpf() {
    closest_by_rtt("closest_follows_measured_rtt_ebpf", true, false).await;
}

/// On the eBPF fast path with C's endpoint (the relay) an address of A's own host: the kernel could not
/// own the replies (they come back over loopback), so A leaves that service whole to the tun path, which
/// balances it and picks the closest; A's counters and log say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_leaves_a_service_behind_an_endpoint_on_this_host_to_the_tun_path() {
    closest_by_rtt("ebpf_leaves_a_service_behind_an_endpoint_on_this_host_to_the_tun_path", true, true).await;
}

async fn closest_by_rtt(name: &str, ebpf: bool, relay_on_a: bool) {
    if !is_root() {
        eprintln!("skipping {name}: needs root (network namespaces, tun, eBPF)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let lan = Netns::new("otpl");
    sh(&["ip", "-n", &lan.0, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &lan.0, "link", "set", "br0", "up"]);
    // hosts A, B, C and R (the relay's own host, used when it is not on A)
    let hosts: Vec<Netns> = ["otpa", "otpb", "otpc", "otpr"].iter().map(|p| Netns::new(p)).collect();
    for (i, h) in hosts.iter().enumerate() {
        let port = format!("l{i}");
        sh(&["ip", "-n", &lan.0, "link", "add", &port, "type", "veth", "peer", "name", "up0", "netns", &h.0]);
        sh(&["ip", "-n", &lan.0, "link", "set", &port, "master", "br0"]);
        sh(&["ip", "-n", &lan.0, "link", "set", &port, "up"]);
        sh(&["ip", "-n", &h.0, "addr", "add", &format!("192.168.77.{}/24", i + 1), "dev", "up0"]);
        sh(&["ip", "-n", &h.0, "link", "set", "up0", "up"]);
    }
    let [ha, hb, hc, hr]: [Netns; 4] = hosts.try_into().ok().unwrap();
    let ipa = Ipv4Addr::new(192, 168, 77, 1);
    let relay = if relay_on_a { ipa } else { Ipv4Addr::new(192, 168, 77, 4) };

    let (_rootsvc, _cluster, rr, closest) = services(dir, &ha).await;

    // worker C advertises the relay (port 50200) as its tunnel endpoint
    let relay_host = if relay_on_a { ha.path() } else { hr.path() };
    delay_relay(&relay_host, 50200, SocketAddr::from(([192, 168, 77, 3], 50200)), Duration::from_millis(15));
    // C is on the tun path in every variant: the relay is a userspace socket on a veth underlay, so it
    // hands on an eBPF sender's inner checksums as the offload left them (partial); the tun path completes
    // them (flag 0), an eBPF receiver relies on the kernel's offload state, which the relay does not keep
    // (over real links the sending device completes them before the wire)
    let mk = |ns: Netns, advertised: Ipv4Addr, port: u16, tag: &str| {
        let fast = ebpf && tag != "c";
        let cfg = dir.join(format!("netcfg-{tag}.json"));
        let node = unique(&format!("node{tag}"));
        std::fs::write(
            &cfg,
            json!({"NodePublicAddress": advertised.to_string(), "NodePublicPort": port.to_string(),
                   "ClusterUrl": ipa.to_string(), "ClusterNetPort": "10110", "NodeName": node})
            .to_string(),
        )
        .unwrap();
        Worker {
            ns,
            ip: advertised,
            cfg,
            data: dir.join(format!("nm-{tag}")),
            log: dir.join(format!("nm-{tag}.log")),
            nm: None,
            extra: if fast { pin_flags() } else { vec!["--no-ebpf".into()] },
            pins: fast.then(|| pin_dir(&node)),
        }
    };
    let mut wa = mk(ha, ipa, 50103, "a");
    let mut wb = mk(hb, Ipv4Addr::new(192, 168, 77, 2), 50103, "b");
    let mut wc = mk(hc, relay, 50200, "c");
    let (_lan, _hr) = (lan, hr);
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        wc.start_nm();
        let (_ic, ns_ic) = instance();
        let (_ib, ns_ib) = instance();
        let (_ca, ns_ca) = instance();
        wc.deploy(&ns_ic, "svcE", "app.ns.echo.ns", 0); // far, but first in instance order
        wb.deploy(&ns_ib, "svcE", "app.ns.echo.ns", 1);
        wa.deploy(&ns_ca, "svcC", "app.ns.client.ns", 0);
        serve(&ns_ic, "far");
        serve(&ns_ib, "near");
        // both are reachable (C through the relay)
        eventually(30, "round robin over both remote instances", || {
            let answers: Vec<String> = (0..4).map(|_| tcp_ask(&ns_ca, rr, 8080).unwrap_or_else(|e| e)).collect();
            let t = tally(&answers);
            if t.get("far") == Some(&2) && t.get("near") == Some(&2) {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        });
        // once both RTTs are measured (a probe to C takes 30 ms there and back), closest is the near one, for
        // TCP and UDP; before that an unmeasured worker can look nearest or farthest
        let t0 = Instant::now();
        eventually(20, "RTTs to both remote workers measured", || {
            let c = wa.counters();
            if ["192.168.77.2:50103".to_string(), format!("{relay}:50200")].iter().all(|ep| c["rtt_us"][ep].is_u64()) {
                Ok(())
            } else {
                Err(format!("{}", c["rtt_us"]))
            }
        });
        eventually(20, "closest = the worker with the lower RTT", || {
            all_answer(4, "near", || tcp_ask(&ns_ca, closest, 8080))
        });
        eprintln!("closest picked the near worker {:?} after the first probes could run", t0.elapsed());
        // which datapath carries them: four new TCP flows and four UDP datagrams from fresh sockets
        let before = wa.counters();
        all_answer(4, "near", || tcp_ask(&ns_ca, closest, 8080)).unwrap_or_else(|a| panic!("closest (TCP): {a}"));
        all_answer(4, "near", || udp_ask(&ns_ca, closest, 8081)).unwrap_or_else(|a| panic!("closest (UDP): {a}"));
        let c = wa.counters();
        let ebpf_delta = |k: &str| c["ebpf"][k].as_u64().unwrap_or(0) - before["ebpf"][k].as_u64().unwrap_or(0);
        let proxy_delta = |k: &str| c["events"][k].as_u64().unwrap_or(0) - before["events"][k].as_u64().unwrap_or(0);
        match (ebpf, relay_on_a) {
            (false, _) => assert!(proxy_delta("forward_translated") >= 8, "{c}"),
            (true, false) => {
                assert!(ebpf_delta("new_flow") >= 8 && ebpf_delta("encap") >= 8, "flows not taken by the kernel: {c}");
                assert_eq!(ebpf_delta("pass_tun_service"), 0, "{c}");
            }
            (true, true) => {
                assert!(ebpf_delta("pass_tun_service") >= 8, "service not left to the tun path: {c}");
                assert_eq!(ebpf_delta("new_flow"), 0, "{c}");
                assert!(proxy_delta("forward_translated") >= 8, "{c}");
                let log = wa.log_text();
                assert!(
                    log.contains("service left to the tun path") && log.contains(&format!("{relay}:50200")),
                    "A did not say why the service stays on the tun path:\n{log}"
                );
            }
        }
        let rtt = |ep: &str| c["rtt_us"][ep].as_u64().unwrap_or_else(|| panic!("no RTT for {ep}: {c}"));
        let (near, far) = (rtt("192.168.77.2:50103"), rtt(&format!("{relay}:50200")));
        eprintln!("A measured RTT: near {near} µs, far {far} µs");
        assert!(far >= 30_000 && near < far, "near {near} µs, far {far} µs");
    });
}
