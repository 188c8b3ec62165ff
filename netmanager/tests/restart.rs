//! A TCP stream through a service IP keeps going across a restart of worker A's NetManager (kill -9 and
//! start again): on the eBPF path the pinned programs and maps carry it meanwhile, on the tun path it
//! stalls and goes on with the conversion table the proxy saved.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

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
        testbed::spawn_in_netns(&ns_i1, || {
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
        })
        .unwrap();
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
        let stream = testbed::spawn_in_netns(&ns_ca, move || -> Result<u64, String> {
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
        })
        .unwrap();
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
        let n = testbed::join(&ns_ca, stream).unwrap().expect("the stream survived");
        eprintln!("{n} round trips across the restart");
    });
}
