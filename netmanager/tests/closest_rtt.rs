//! Closest by measured RTT between two *remote* instances: three worker hosts on a LAN, worker C behind a
//! relay that delays every datagram, on the tun path and on the eBPF fast path (where a service behind an
//! endpoint on this host is left whole to the tun path).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::json;

use common::*;

/// A UDP relay in namespace `ns` on `listen_port` that forwards to `upstream` and back, each datagram
/// delayed by `delay` (this kernel has no netem): a worker behind it is "far away".
fn delay_relay(ns: &str, listen_port: u16, upstream: SocketAddr, delay: Duration) {
    testbed::spawn_in_netns(ns, move || {
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
    })
    .unwrap();
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

    let (_rootsvc, _cluster, rr, closest, token) = services(dir, &ha).await;

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
            extra: [if fast { pin_flags() } else { vec!["--no-ebpf".into()] }, token.to_vec()].concat(),
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
