//! A replicated root: three root orchestrators on one etcd, each in a network namespace of its own, a
//! cluster that lists all three (`--root-address r1,r2,r3`) with simulated workers, and a client sending
//! a stream of deploys through the replicas in turn (followers forward writes to the leader).
//!
//! * The leader is killed with SIGKILL during the stream: another replica leads within a few seconds, the
//!   cluster registers with it, every application whose creation was acknowledged is still there, and no
//!   instance is placed twice (one instance per service; the workers reserve exactly one instance's
//!   resources per service).
//! * The new leader is partitioned away and back: the other live replica leads, and the cut one, back,
//!   follows, serves reads and forwards a write.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{bin, require_root, wait_for, Api, Net, Proc};

const PW: &str = "ha-admin-pw";
const REPLICAS: [&str; 3] = ["r1", "r2", "r3"];

fn etcd_binary() -> Option<std::path::PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"].iter().map(std::path::PathBuf::from).find(|p| p.exists())
}

fn api(ip: Ipv4Addr) -> Api {
    let mut a = Api::new(ip);
    wait_for("the root API", Duration::from_secs(30), || a.login("Admin", PW).ok());
    a
}

/// `/api/health` of the replica at `ip`: (role, leader).
fn health(ip: Ipv4Addr) -> (String, String) {
    let (_, v) = Api::new(ip).call("GET", "/api/health", None);
    (v["role"].as_str().unwrap_or_default().to_string(), v["leader"].as_str().unwrap_or_default().to_string())
}

fn rs_ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn sla(name: &str) -> Value {
    json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
        "application_name": name, "application_namespace": "ha", "application_desc": "",
        "microservices": [{"microserviceID": "", "microservice_name": "web", "microservice_namespace": "ha",
          "virtualization": "container", "code": "docker.io/library/nginx:latest", "memory": 16, "vcpus": 0.01}]}]})
}

struct Replicas {
    procs: Vec<Option<Proc>>,
    ips: Vec<Ipv4Addr>,
    /// A replica cut off the network (not asked).
    cut: Option<usize>,
}

impl Replicas {
    /// The index of the replica that leads, as the replicas themselves say (exactly one).
    fn leader(&self, client: &testbed::Host) -> Option<usize> {
        let ips = self.ips.clone();
        let alive: Vec<bool> = self.procs.iter().enumerate().map(|(i, p)| p.is_some() && self.cut != Some(i)).collect();
        client.run(move || {
            let leading: Vec<usize> = (0..ips.len()).filter(|i| alive[*i] && health(ips[*i]).0 == "leader").collect();
            (leading.len() == 1).then(|| leading[0])
        })
    }
}

#[test]
fn three_replicas_survive_the_leaders_kill_and_a_partition() {
    let name = "three_replicas_survive_the_leaders_kill_and_a_partition";
    if !require_root(name) {
        return;
    }
    let Some(etcd) = etcd_binary() else {
        assert!(std::env::var_os("CI").is_none(), "etcd is missing (cargo xtask setup installs etcd-server)");
        eprintln!("SKIPPED {name}: no etcd binary (cargo xtask setup installs etcd-server)");
        return;
    };
    let net = Net::new(&["etcd", "r1", "r2", "r3", "cluster", "workers", "client"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let etcd_ip = net.host("etcd").ip;
    let (client_url, peer_url) = (format!("http://{etcd_ip}:2379"), format!("http://{etcd_ip}:2380"));
    let data = d.join("etcd").display().to_string();
    let _etcd = net
        .host("etcd")
        .spawn(
            "etcd",
            &etcd,
            &[
                "--name",
                "e1",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("e1={peer_url}"),
                "--max-txn-ops",
                "10000",
            ],
            &[],
        )
        .unwrap();
    let health_url = format!("{client_url}/health");
    net.host("client").run(move || {
        wait_for("etcd healthy", Duration::from_secs(30), || {
            let (c, v) = Api::at(&health_url).call("GET", "", None);
            (c == 200 && v["health"] == "true").then_some(())
        })
    });

    let start_replica = |i: usize, log: &str| -> Proc {
        let h = net.host(REPLICAS[i]);
        let dir = d.join(REPLICAS[i]).display().to_string();
        let advertise = format!("http://{}:10000", h.ip);
        h.spawn(
            log,
            &bin("root-orchestrator"),
            &[
                "--data-dir",
                &dir,
                "--etcd-endpoints",
                &client_url,
                "--advertise-api",
                &advertise,
                "--leader-lease-ms",
                "2000",
                "--report-interval-ms",
                "500",
                "--retry-interval-ms",
                "1000",
            ],
            &[("OAK_ADMIN_PASSWORD", PW)],
        )
        .unwrap()
    };
    // the first replica starts alone and leads; the others join as followers (one CA, kept in etcd)
    let mut rs = Replicas {
        procs: vec![Some(start_replica(0, "r1")), None, None],
        ips: REPLICAS.iter().map(|r| net.host(r).ip).collect(),
        cut: None,
    };
    let client = net.host("client");
    wait_for("r1 leads", Duration::from_secs(30), || (rs.leader(client) == Some(0)).then_some(()));
    rs.procs[1] = Some(start_replica(1, "r2"));
    rs.procs[2] = Some(start_replica(2, "r3"));
    let ips = rs.ips.clone();
    client.run(move || {
        for ip in ips {
            wait_for("a follower that knows the leader", Duration::from_secs(30), || {
                let (role, leader) = health(ip);
                (role == "leader" || (role == "follower" && !leader.is_empty())).then_some(())
            });
        }
    });

    // listed with a follower first: the cluster joins (and registers with) whichever replica leads
    let roots = [1, 2, 0].map(|i| rs.ips[i].to_string()).join(",");
    let cluster_dir = d.join("cluster").display().to_string();
    let _cluster = net
        .host("cluster")
        .spawn_cluster(&roots, &cluster_dir, "edge", "48.1,11.6", &["--heartbeat-interval-ms", "300"])
        .unwrap();
    let cl = format!("{}:10100", net.host("cluster").ip);
    let _workers = net.host("workers").spawn_sim_worker(&cl, "w", &["--count", "2"]).unwrap();
    let r1 = rs.ips[0];
    client.run(move || {
        let a = api(r1);
        wait_for("the cluster and its two workers", Duration::from_secs(60), || {
            let (_, c) = a.call("GET", "/api/clusters/active", None);
            (c[0]["active_nodes"].as_u64() == Some(2)).then_some(())
        });
    });

    // a stream of deploys through the replicas in turn; the leader is killed in the middle
    let leader = rs.leader(client).expect("one leader");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let ips = rs.ips.clone();
    let stream = std::thread::spawn({
        let ns = client.ns.clone();
        move || {
            testbed::in_netns(&ns, move || {
                let mut apis: Vec<Api> = ips.iter().map(|ip| api(*ip)).collect();
                let mut acked: Vec<(String, String)> = Vec::new();
                let mut refused = 0;
                // one request through the replicas in turn from `first`, as a client of a replicated root
                // does: on a refusal (no leader yet, a dead replica) the next one, a moment later
                let mut call = |first: usize, method: &str, path: &str, body: Option<&Value>, refused: &mut u32| {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut i = first;
                    loop {
                        let (c, v) = apis[i].call(method, path, body);
                        if c == 200 {
                            return v;
                        }
                        *refused += 1;
                        assert!(Instant::now() < deadline, "{method} {path}: refused by every replica: {c} {v}");
                        if c == 401 {
                            let mut fresh = Api::new(ips[i]);
                            if fresh.login("Admin", PW).is_ok() {
                                apis[i] = fresh;
                            }
                        }
                        i = (i + 1) % apis.len();
                        std::thread::sleep(Duration::from_millis(100));
                    }
                };
                for k in 0..40 {
                    if k == 15 {
                        tx.send(()).unwrap(); // kill the leader now
                    }
                    let name = format!("app{k}");
                    let v = call(k % 3, "POST", "/api/application", Some(&sla(&name)), &mut refused);
                    let app = v.as_array().and_then(|a| a.iter().find(|a| a["application_name"] == name.as_str()));
                    let sid = app.and_then(|a| a["microservices"][0].as_str()).expect("the new service").to_string();
                    call(k % 3, "POST", &format!("/api/service/{sid}/instance"), None, &mut refused);
                    acked.push((name, sid));
                }
                (acked, refused)
            })
            .unwrap()
        }
    });
    rx.recv().unwrap();
    let killed = Instant::now();
    rs.procs[leader].as_mut().unwrap().kill9();
    rs.procs[leader] = None;
    let new_leader = wait_for("a new leader", Duration::from_secs(30), || rs.leader(client).filter(|l| *l != leader));
    let took = killed.elapsed();
    let (acked, refused) = stream.join().unwrap();
    eprintln!(
        "new leader r{} {took:.1?} after the kill; {} deploys acknowledged, {refused} refused",
        new_leader + 1,
        acked.len()
    );
    assert!(took < Duration::from_secs(10), "a new leader took {took:?}");
    assert_eq!(acked.len(), 40, "every deploy went through, some after a retry");

    // every acknowledged application is there, each service with exactly one instance, placed once
    let survivor = rs.ips[new_leader];
    let acked2 = acked.clone();
    client.run(move || {
        let a = api(survivor);
        wait_for("the cluster registered with the new leader", Duration::from_secs(30), || {
            let (_, c) = a.call("GET", "/api/clusters/active", None);
            (c[0]["active_nodes"].as_u64() == Some(2)).then_some(())
        });
        for (name, sid) in &acked2 {
            let s = wait_for(&format!("{name} RUNNING"), Duration::from_secs(60), || {
                let (c, s) = a.call("GET", &format!("/api/service/{sid}"), None);
                (c == 200 && s["instance_list"][0]["status"] == "RUNNING").then_some(s)
            });
            assert_eq!(s["instance_list"].as_array().map(Vec::len), Some(1), "{name}: {s}");
        }
        let (_, apps) = a.call("GET", "/api/applications", None);
        let stored: Vec<&str> =
            apps.as_array().unwrap().iter().filter_map(|a| a["application_name"].as_str()).collect();
        for (name, _) in &acked2 {
            assert!(stored.contains(&name.as_str()), "acknowledged {name} lost: {stored:?}");
        }
        // the workers reserve one instance's CPU per service, no more: nothing was placed twice (the
        // cluster reports them every 500 ms)
        let want = apps.as_array().unwrap().len() as f64 * 0.01;
        let reserved = || {
            let (_, ws) = a.call("GET", "/api/cluster/edge/workers", None);
            ws.as_array().into_iter().flatten().map(|w| w["reserved_cpu"].as_f64().unwrap_or(0.0)).sum::<f64>()
        };
        let seen = wait_for("the workers' reservations reported", Duration::from_secs(10), || {
            let r = reserved();
            (r >= want - 1e-6).then_some(r)
        });
        assert!((seen - want).abs() < 1e-6, "reserved {seen} vcpus for {want} vcpus of instances: one placed twice");
    });

    // the leader partitioned away: the other live replica leads within a few seconds (the cut one stops
    // leading once it cannot renew its lease); back, the cut one follows again and serves reads
    let cut = new_leader;
    net.set_link(REPLICAS[cut], false).unwrap();
    rs.cut = Some(cut);
    let partitioned = Instant::now();
    let other = wait_for("a leader while the old one is cut off", Duration::from_secs(30), || {
        rs.leader(client).filter(|l| *l != cut)
    });
    eprintln!("r{} leads {:.1?} after r{} was cut off", other + 1, partitioned.elapsed(), cut + 1);
    net.set_link(REPLICAS[cut], true).unwrap();
    rs.cut = None;
    let (ip, n) = (rs.ips[cut], acked.len());
    let token = client.run(move || {
        wait_for("the partitioned replica follows again", Duration::from_secs(30), || {
            let (role, leader) = health(ip);
            (role == "follower" && !leader.is_empty()).then_some(())
        });
        let a = api(ip);
        let (c, apps) = a.call("GET", "/api/applications", None);
        assert_eq!(c, 200, "{apps}");
        assert!(apps.as_array().unwrap().len() >= n, "the follower reads every application: {apps}");
        // and forwards a write to the leader
        let (c, v) = a.call("POST", "/api/application", Some(&sla("late")));
        assert_eq!(c, 200, "{v}");
        // a join token made through it is the leader's, kept in the store for every replica
        let (c, t) = a.call("POST", "/api/join-tokens", Some(&json!({"description": "edge-2"})));
        assert_eq!(c, 200, "{t}");
        (t["id"].as_str().unwrap_or_default().to_string(), t["token"].as_str().unwrap_or_default().to_string())
    });
    // the cut replica leads again (the others stop): a cluster joins it with that token
    let (token_id, token) = token;
    assert!(!token_id.is_empty() && !token.is_empty(), "{token_id} {token}");
    for i in 0..3 {
        if i != cut {
            if let Some(p) = rs.procs[i].as_mut() {
                p.terminate(Duration::from_secs(10));
            }
            rs.procs[i] = None;
        }
    }
    wait_for("the once cut replica leads", Duration::from_secs(30), || (rs.leader(client) == Some(cut)).then_some(()));
    let cl2 = d.join("cluster2").display().to_string();
    let root_ip = rs.ips[cut].to_string();
    let _cluster2 =
        net.host("workers").spawn_cluster(&root_ip, &cl2, "edge-2", "48.1,11.6", &["--token", &token]).unwrap();
    client.run(move || {
        let a = api(rs_ip(&root_ip));
        wait_for("edge-2 registered with the token", Duration::from_secs(30), || {
            let (_, c) = a.call("GET", "/api/clusters/", None);
            c.as_array()?.iter().any(|c| c["cluster_name"] == "edge-2").then_some(())
        });
    });
}
