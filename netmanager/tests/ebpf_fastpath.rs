//! The eBPF fast path in the kernel (needs root and the object from `cargo xtask build-ebpf`): two worker
//! hosts (network namespaces joined by a veth "underlay"), each with a bridge and instance namespaces
//! wired as the NetManager wires them. The programs translate a service IP to instances on both workers
//! (round-robin per flow), deliver locally with `bpf_redirect_peer`, encapsulate to the other worker in the
//! tun path's tunnel format and decapsulate there; replies get the service IP back. An instance reaches
//! itself through its own service IP (both ends translated). The counters show the
//! traffic took the eBPF path. No userspace datapath runs in this test: if the programs did not do it,
//! nothing would.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ipnet::Ipv4Net;
use oak_netmanager::ebpf::{FastPath, FastPathConfig};
use oak_netmanager::tables::{InstanceEndpoint, ServiceEntry, Snapshot};

use common::sh;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", dev]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = v[0]["address"].as_str().unwrap();
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

struct Topo {
    names: Vec<String>,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A worker namespace with bridge `oak0` (gateway = first host of `subnet`) and uplink `up0`.
fn worker(t: &mut Topo, ns: &str, subnet: Ipv4Net) {
    sh(&["ip", "netns", "add", ns]);
    t.names.push(ns.into());
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    // as the NetManager does (a new namespace inherits the host's setting, 0 on a fresh machine); the
    // kernel's FIB lookup for a program answers "forwarding disabled" without it
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(&["ip", "-n", ns, "link", "add", "oak0", "type", "bridge"]);
    let gw = format!("{}/{}", subnet.hosts().next().unwrap(), subnet.prefix_len());
    sh(&["ip", "-n", ns, "addr", "add", &gw, "dev", "oak0"]);
    sh(&["ip", "-n", ns, "link", "set", "oak0", "up"]);
}

/// An instance namespace on `worker` with address `ip`, veth `host_if` on the bridge; returns its MAC.
fn instance(t: &mut Topo, worker: &str, ns: &str, host_if: &str, ip: Ipv4Addr, subnet: Ipv4Net) -> [u8; 6] {
    sh(&["ip", "netns", "add", ns]);
    t.names.push(ns.into());
    sh(&["ip", "-n", worker, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns]);
    sh(&["ip", "-n", worker, "link", "set", host_if, "master", "oak0", "up"]);
    sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/{}", subnet.prefix_len()), "dev", "eth0"]);
    // room for the 36-byte tunnel overhead on a 1500-byte underlay, as the tun path's MTU
    sh(&["ip", "-n", ns, "link", "set", "eth0", "mtu", "1450", "up"]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    let gw = subnet.hosts().next().unwrap().to_string();
    sh(&["ip", "-n", ns, "route", "add", "default", "via", &gw]);
    mac_of(ns, "eth0")
}

/// A TCP server in `ns` answering every connection with `name` (and what it received, for size checks).
fn serve(ns: &str, name: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    testbed::spawn_in_netns(ns, move || {
        let l = TcpListener::bind("0.0.0.0:8080").expect("bind");
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0;
                // read a length-prefixed request, answer name + byte count
                let mut len = [0u8; 4];
                if c.read_exact(&mut len).is_err() {
                    return;
                }
                let want = u32::from_be_bytes(len) as usize;
                while n < want {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                let _ = c.write_all(format!("{name} {n} {peer}").as_bytes());
            });
        }
    })
    .expect("the instance's namespace");
    rx.recv_timeout(Duration::from_secs(5)).expect("server up");
}

/// Connects from `ns` to `to`, sends `size` bytes, returns the answer.
fn ask(ns: &str, to: SocketAddr, size: usize) -> String {
    testbed::in_netns(ns, move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect to the service IP");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = vec![7u8; size];
        c.write_all(&(size as u32).to_be_bytes()).unwrap();
        c.write_all(&body).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).expect("answer");
        let local = c.local_addr().unwrap();
        format!("{s} | {local}")
    })
    .expect("thread in netns")
}

#[test]
fn service_ip_across_two_workers_in_the_kernel() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED service_ip_across_two_workers_in_the_kernel: needs root");
        return;
    }
    let Some(obj) = oak_netmanager::ebpf::default_object() else {
        assert!(std::env::var_os("CI").is_none(), "eBPF object missing: `cargo xtask build-ebpf` builds it");
        eprintln!("SKIPPED service_ip_across_two_workers_in_the_kernel: no eBPF object (cargo xtask build-ebpf)");
        return;
    };
    let id = format!("{}{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
    let mut t = Topo { names: vec![] };
    let (w1, w2) = (format!("fpw1{id}"), format!("fpw2{id}"));
    let s1: Ipv4Net = "10.18.0.0/26".parse().unwrap();
    let s2: Ipv4Net = "10.18.0.64/26".parse().unwrap();
    worker(&mut t, &w1, s1);
    worker(&mut t, &w2, s2);
    sh(&["ip", "-n", &w1, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", &w2]);
    sh(&["ip", "-n", &w1, "addr", "add", "192.168.77.1/24", "dev", "up0"]);
    sh(&["ip", "-n", &w2, "addr", "add", "192.168.77.2/24", "dev", "up0"]);
    sh(&["ip", "-n", &w1, "link", "set", "up0", "up"]);
    sh(&["ip", "-n", &w2, "link", "set", "up0", "up"]);
    let (c_ns, i1_ns, i2_ns) = (format!("fpc{id}"), format!("fpi1{id}"), format!("fpi2{id}"));
    let c_ip: Ipv4Addr = "10.18.0.3".parse().unwrap();
    let i1_ip: Ipv4Addr = "10.18.0.2".parse().unwrap();
    let i2_ip: Ipv4Addr = "10.18.0.66".parse().unwrap();
    let c_mac = instance(&mut t, &w1, &c_ns, "vc", c_ip, s1);
    let i1_mac = instance(&mut t, &w1, &i1_ns, "vi1", i1_ip, s1);
    let i2_mac = instance(&mut t, &w2, &i2_ns, "vi2", i2_ip, s2);
    serve(&i1_ns, "i1");
    serve(&i2_ns, "i2");

    let rr: Ipv4Addr = "10.30.0.5".parse().unwrap();
    let closest: Ipv4Addr = "10.30.0.6".parse().unwrap();
    let ep1: SocketAddr = "192.168.77.1:50103".parse().unwrap();
    let ep2: SocketAddr = "192.168.77.2:50103".parse().unwrap();
    let snap = |local: Ipv4Net| {
        let inst = |n, ip, worker| InstanceEndpoint {
            service_id: "s".into(),
            job_name: "app.ns.web.ns".into(),
            instance_number: n,
            ns_ip: ip,
            worker,
            rtt_us: None,
        };
        let mut s = Snapshot { local_subnet: Some(local), ..Default::default() };
        s.services.insert(
            "s".into(),
            ServiceEntry {
                service_id: "s".into(),
                job_name: "app.ns.web.ns".into(),
                rr_ip: Some(rr),
                closest_ip: Some(closest),
                instances: vec![inst(0, i1_ip, ep1), inst(1, i2_ip, ep2)],
            },
        );
        let (other, ep) = if local == s1 { (s2, ep2) } else { (s1, ep1) };
        s.routes.insert(other, ep);
        s
    };
    let load = |ns: &str, subnet: Ipv4Net, public: &str, locals: Vec<(&'static str, Ipv4Addr, [u8; 6])>| {
        let (gw_mac, obj, snap, ns2) = (mac_of(ns, "oak0"), obj.clone(), snap(subnet), ns.to_string());
        let public: Ipv4Addr = public.parse().unwrap();
        testbed::in_netns(&ns2, move || {
            let mut fp = FastPath::load(
                &obj,
                FastPathConfig {
                    uplink: "up0".into(),
                    source_ip: public,
                    tunnel_port: 50103,
                    subnet,
                    worker_prefix: 26,
                    service_net: "10.30.0.0/16".parse().unwrap(),
                    gateway_mac: gw_mac,
                    pin_dir: None,
                },
            )
            .expect("the kernel takes the fast path");
            for (dev, ip, mac) in locals {
                fp.attach_instance(dev, ip, mac).expect("attach to the instance veth");
            }
            fp.sync(&snap).expect("maps filled");
            fp.enable().unwrap();
            fp
        })
        .expect("thread in netns")
    };
    let fp1 = load(&w1, s1, "192.168.77.1", vec![("vc", c_ip, c_mac), ("vi1", i1_ip, i1_mac)]);
    let fp2 = load(&w2, s2, "192.168.77.2", vec![("vi2", i2_ip, i2_mac)]);

    // round-robin per new flow: both instances answer; the client always sees the service IP as peer
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..6 {
        let a = ask(&c_ns, SocketAddr::new(rr.into(), 8080), 1000);
        let who = a.split_whitespace().next().unwrap().to_string();
        assert!(a.contains(" 1000 10.18.0.3:"), "the instance sees the client's own address: {a}");
        *seen.entry(who).or_default() += 1;
    }
    assert_eq!(seen.get("i1"), Some(&3), "{seen:?}");
    assert_eq!(seen.get("i2"), Some(&3), "{seen:?}");
    // bulk transfers (many full-size segments, GSO on the veths): round-robin sends one through the tunnel
    let mut bulk = Vec::new();
    for _ in 0..2 {
        let a = ask(&c_ns, SocketAddr::new(rr.into(), 8080), 4 * 1024 * 1024);
        assert!(a.contains(" 4194304 "), "{a}");
        bulk.push(a.split_whitespace().next().unwrap().to_string());
    }
    bulk.sort();
    assert_eq!(bulk, ["i1", "i2"]);

    // closest: the local instance
    for _ in 0..3 {
        let a = ask(&c_ns, SocketAddr::new(closest.into(), 8080), 10);
        assert!(a.starts_with("i1 "), "{a}");
    }

    // an instance reaching its own service: round-robin takes it to itself every other flow (the closest
    // IP always); to itself it arrives from the service IP, and its answer is translated back on the way
    let mut own: HashMap<String, usize> = HashMap::new();
    for _ in 0..4 {
        let a = ask(&i1_ns, SocketAddr::new(rr.into(), 8080), 1000);
        let who = a.split_whitespace().next().unwrap().to_string();
        let peer = if who == "i1" { "10.30.0.5" } else { "10.18.0.2" };
        assert!(a.contains(&format!(" 1000 {peer}:")), "{who} sees the client as {peer}: {a}");
        *own.entry(who).or_default() += 1;
    }
    assert_eq!((own.get("i1"), own.get("i2")), (Some(&2), Some(&2)), "{own:?}");
    for _ in 0..2 {
        let a = ask(&i1_ns, SocketAddr::new(closest.into(), 8080), 10);
        assert!(a.starts_with("i1 10 10.30.0.6:"), "itself, from its closest IP: {a}");
    }

    let c1 = fp1.counters().unwrap();
    let c2 = fp2.counters().unwrap();
    eprintln!("worker 1: {c1:?}\nworker 2: {c2:?}");
    assert_eq!(c1["new_flow"], 17, "{c1:?}");
    assert!(c1["hairpin"] > 0, "flows of an instance to itself: {c1:?}");
    assert!(c2["fast_bytes"] > 4 * 1024 * 1024, "the bulk crossed worker 2's fast path: {c2:?}");
    assert!(c1["fwd_nat"] > 0 && c1["rev_nat"] > 0, "translation both ways on the client's worker: {c1:?}");
    assert!(c1["local_deliver"] > 0, "hairpin to the local instance via redirect_peer: {c1:?}");
    assert!(c1["encap"] > 0 && c1["decap"] > 0, "to and from worker 2 through the tunnel: {c1:?}");
    assert!(c2["decap"] > 0 && c2["encap"] > 0 && c2["local_deliver"] > 0, "{c2:?}");
    for c in [&c1, &c2] {
        // every encapsulated packet left by one of the two redirects; once the neighbour was resolved (by
        // the kernel, for the first packets), by the FIB's next hop
        assert_eq!(c["redirect_fib"] + c["redirect_neigh"], c["encap"], "{c:?}");
        assert!(c["redirect_fib"] > 0, "the FIB's next hop was used: {c:?}");
    }
    assert_eq!(c2["new_flow"], 0, "worker 2 only routes: {c2:?}");
    assert_eq!(c1["pass_bad_tunnel"] + c2["pass_bad_tunnel"], 0);
    assert_eq!(c1["pass_unknown_flow"] + c2["pass_unknown_flow"], 0, "every tunnel packet belonged to a known flow");
    drop(t);
}
