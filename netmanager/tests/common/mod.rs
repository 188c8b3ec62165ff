//! What the NetManager's integration tests share (they need root): worker hosts as network namespaces
//! running the real `NetManager` binary, the root and cluster network services in-process, instances as
//! processes in namespaces of their own, and clients and servers on threads inside those namespaces
//! ([`testbed`]).
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use oak_orchestrators::{cluster, root};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Netns(pub String);
impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let n = unique(prefix);
        sh(&["ip", "netns", "add", &n]);
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        Netns(n)
    }
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A process in a fresh netns (an "instance").
pub fn instance() -> (Proc, String) {
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
pub fn http(ns: &str, port: u16, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
    http_as(ns, port, None, method, path, body)
}

/// [`http`] with the NetManager's API credential (`Authorization: Bearer`).
pub fn http_as(
    ns: &str,
    port: u16,
    credential: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let (method, path) = (method.to_string(), path.to_string());
    let auth = credential.map(|c| format!("Authorization: Bearer {c}\r\n")).unwrap_or_default();
    testbed::in_netns(ns, move || -> Result<(u16, Value), String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        let code: u16 = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad answer {out:?}"))?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, serde_json::from_str(body).unwrap_or(Value::Null)))
    })
    .unwrap()
}

/// TCP and UDP servers answering `name` (TCP on 8080: write and close; UDP on 8081: echo the name).
pub fn serve(ns: &str, name: &'static str) {
    testbed::spawn_in_netns(ns, move || {
        let l = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(format!("{name}\n").as_bytes());
        }
    })
    .unwrap();
    testbed::spawn_in_netns(ns, move || {
        let u = UdpSocket::bind("0.0.0.0:8081").unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(name.as_bytes(), from);
        }
    })
    .unwrap();
}

pub fn tcp_ask(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    testbed::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_string())
    })
    .unwrap()
}

pub fn udp_ask(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    testbed::in_netns(ns, move || {
        let u = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        u.send_to(b"who?", (ip, port)).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 100];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    })
    .unwrap()
}

/// A bpffs for the fast path's pins, mounted in this (the machine's) mount namespace: `ip netns exec`
/// gives each NetManager a private /sys, so pins under its /sys/fs/bpf would die with the process.
pub fn test_bpffs() -> String {
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
pub fn pin_flags() -> Vec<String> {
    vec!["--bpf-pin-root".into(), test_bpffs()]
}

/// Where a fast-path NetManager of node `node` (bridge obr0) pins its maps and links.
pub fn pin_dir(node: &str) -> PathBuf {
    PathBuf::from(test_bpffs()).join("oakestra-rs").join(format!("{node}-obr0"))
}

/// Ok when all `n` answers of `ask` are `want`; otherwise the answers (errors as their text).
pub fn all_answer(n: usize, want: &str, ask: impl Fn() -> Result<String, String>) -> Result<(), String> {
    let answers: Vec<String> = (0..n).map(|_| ask().unwrap_or_else(|e| e)).collect();
    if answers.iter().all(|a| a == want) {
        Ok(())
    } else {
        Err(format!("{answers:?}"))
    }
}

pub fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}

/// A worker host: a namespace running the NetManager binary.
pub struct Worker {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub cfg: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub nm: Option<Proc>,
    /// Extra NetManager flags (e.g. --no-tun-offload).
    pub extra: Vec<String>,
    /// The fast path's pin directory (removed when the worker goes away).
    pub pins: Option<PathBuf>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.nm.take());
        if let Some(p) = &self.pins {
            oak_netmanager::ebpf::remove_pins(p);
        }
    }
}

pub const API: u16 = 6000;

impl Worker {
    pub fn start_nm(&mut self) {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn deploy(&self, ns_of_pid: &str, service_id: &str, job: &str, n: u32) -> Ipv4Addr {
        let pid: u32 = ns_of_pid.split('/').nth(2).unwrap().parse().unwrap();
        let (code, body) = http_as(
            &self.ns.path(),
            API,
            Some(&self.credential()),
            "POST",
            "/container/deploy",
            Some(json!({"pid": pid, "serviceName": job, "serviceId": service_id, "instanceNumber": n})),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        body["nsAddress"].as_str().unwrap().parse().unwrap()
    }

    pub fn counters(&self) -> Value {
        http(&self.ns.path(), API, "GET", "/counters", None).unwrap().1
    }

    /// The NetManager's local API credential (written into its data dir).
    pub fn credential(&self) -> String {
        std::fs::read_to_string(self.data.join("api-token")).unwrap().trim().to_string()
    }
}

pub fn write_config(path: &Path, ip: Ipv4Addr, cluster: Ipv4Addr, node: &str) {
    std::fs::write(
        path,
        json!({"NodePublicAddress": ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": cluster.to_string(),
               "ClusterNetPort": "10110", "NodeName": node})
        .to_string(),
    )
    .unwrap();
}

/// Ask until `ok` holds for an answer, or panic after `secs`.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> Result<(), String>) {
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
/// `ha`'s namespace) and `svcE`/`app.ns.echo.ns` allocated at the root: the services, its rr and closest IPs,
/// and the NetManagers' flag with the cluster's worker join token.
pub async fn services(
    dir: &Path,
    ha: &Netns,
) -> (root::netsvc::RootNetSvc, cluster::netsvc::ClusterNetSvc, Ipv4Addr, Ipv4Addr, [String; 2]) {
    let std_l = testbed::in_netns(&ha.path(), || std::net::TcpListener::bind("0.0.0.0:10110").unwrap()).unwrap();
    std_l.set_nonblocking(true).unwrap();
    let n = oak_orchestrators::testing::net_services(dir, tokio::net::TcpListener::from_std(std_l).unwrap()).await;
    let (rr, closest) = n.root.allocate_service_ips("svcE", "app.ns.echo.ns").unwrap();
    (n.root, n.cluster, rr, closest, ["--token".into(), n.worker_token])
}

/// Two worker hosts joined by a veth pair, the root + cluster network services (the cluster's listener in
/// host A's namespace), and `svcE`/`app.ns.echo.ns` allocated at the root (returns its rr and closest IPs).
pub async fn world(
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

    let (rootsvc, cluster, rr, closest, token) = services(dir, &ha).await;

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
                v.extend(token.clone());
                v
            },
            pins: ebpf.then(|| pin_dir(&node)),
        }
    };
    let (wa, wb) = (mk(ha, ipa, "a", extra_a), mk(hb, ipb, "b", extra_b));
    (wa, wb, rr, closest, rootsvc, cluster)
}
