//! End to end on this machine (needs root): root service manager + cluster network service in-process on
//! loopback, a NetManager leasing its subnet, then a real process in a fresh netns wired through the
//! local API and unwired again.

mod common;

use oak_orchestrators::{cluster, root};

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{instance, is_root, unique};

fn link_exists(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}")).exists()
}

/// The services (over their TLS); the cluster's port and a worker join token.
async fn start_services(
    dir: &std::path::Path,
) -> (String, cluster::netsvc::ClusterNetSvc, root::netsvc::RootNetSvc, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let n = oak_orchestrators::testing::net_services(dir, l).await;
    (port.to_string(), n.cluster, n.root, n.worker_token)
}

/// TCP proxy; dropping it closes the listener and every proxied connection.
struct Proxy {
    port: u16,
    _tasks: tokio::task::JoinSet<()>,
}

impl Proxy {
    async fn start(port: u16, upstream: u16) -> Proxy {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut down, _)) = l.accept().await else { return };
                conns.spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Proxy { port, _tasks: tasks }
    }
}

fn write_config(dir: &std::path::Path, cluster_port: &str, node: &str) -> std::path::PathBuf {
    let p = dir.join("netcfg.json");
    std::fs::write(
        &p,
        json!({"NodePublicAddress":"127.0.0.1","NodePublicPort":"50103","ClusterUrl":"127.0.0.1",
               "ClusterMqttPort":"10003","ClusterNetPort":cluster_port,"NodeName":node})
        .to_string(),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_wire_ping_undeploy() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster_port, cluster, rootsvc, token) = start_services(dir.path()).await;
    // the service gets its IPs at the root when it is created
    let (rr, _closest) = rootsvc.allocate_service_ips("svc1", "app.ns.web.ns").unwrap();

    let node = unique("n");
    let bridge = unique("ot");
    let proxy = Proxy::start(0, cluster_port.parse().unwrap()).await;
    let proxy_port = proxy.port;
    let cfg = write_config(dir.path(), &proxy_port.to_string(), &node);
    let running = oak_netmanager::start(oak_netmanager::Options {
        config_path: cfg,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("nm"),
        bridge: bridge.clone(),
        proxy: None,
        ebpf: None,
        token,
    })
    .await
    .expect("NetManager starts");
    struct Cleanup(std::sync::Arc<oak_netmanager::wiring::Wiring>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let w = self.0.clone();
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(async move { w.destroy().await })
            })
            .join();
        }
    }
    let _cleanup = Cleanup(running.wiring.clone());

    let subnet = running.control.subnet().unwrap();
    assert_eq!(subnet.prefix_len(), 26);
    assert_eq!(cluster.subnet_of(&node), Some(subnet), "cluster recorded the lease");
    let gw = subnet.hosts().next().unwrap();
    assert!(link_exists(&bridge));

    let http = reqwest::Client::new();
    let base = format!("http://{}", running.api_addr);
    let st: Value = http.get(format!("{base}/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["ready"], true);
    assert_eq!(st["subnet"], subnet.to_string());

    // a real process in a fresh netns
    let (child, _) = instance();
    let pid = child.0.id();

    // bad requests are rejected with a reason
    // the instance endpoints need the credential the NetManager wrote into its data dir (0600)
    let cred_file = dir.path().join("nm").join("api-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cred_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(running.credential.secret, std::fs::read_to_string(&cred_file).unwrap().trim());
    let body = json!({"pid": pid, "serviceName": "app.ns.web.ns", "serviceId": "svc1", "instanceNumber": 0});
    for wrong in [None, Some("not-the-credential")] {
        let mut rq = http.post(format!("{base}/container/deploy")).json(&body);
        if let Some(w) = wrong {
            rq = rq.bearer_auth(w);
        }
        let r = rq.send().await.unwrap();
        assert_eq!(r.status(), 401, "{wrong:?}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains("api-token"), "names the credential file: {e}");
    }
    assert!(running.wiring.attachments().await.is_empty(), "nothing wired without the credential");
    let http = reqwest::Client::builder()
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {}", running.credential.secret).parse().unwrap())]
                .into_iter()
                .collect(),
        )
        .build()
        .unwrap();
    let r = http.post(format!("{base}/container/deploy")).json(&json!({"pid": pid})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("serviceName"), "{body}");

    let r = http
        .post(format!("{base}/container/deploy"))
        .json(&json!({"pid": pid, "serviceName": "app.ns.web.ns", "serviceId": "svc1", "instanceNumber": 0,
                      "portMappings": "18080:80/tcp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let ns_ip: std::net::Ipv4Addr = body["nsAddress"].as_str().unwrap().parse().unwrap();
    assert!(subnet.contains(&ns_ip) && ns_ip != gw, "{ns_ip} in {subnet}");

    let pid_s = pid.to_string();
    let out = Command::new("nsenter")
        .args(["-t", &pid_s, "-n", "ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{ns_ip}/26")), "eth0 inside the netns: {text}");
    let out = Command::new("nsenter").args(["-t", &pid_s, "-n", "ip", "-4", "route"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("default via {gw}")), "routes inside: {text}");
    let ok = Command::new("nsenter")
        .args(["-t", &pid_s, "-n", "busybox", "ping", "-c", "1", "-W", "3", &gw.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "ping from the instance to the bridge gateway {gw}");
    // the GSO segment limit of the instance's eth0 follows the datapath, also for instances already wired
    let segs = || {
        let out =
            Command::new("nsenter").args(["-t", &pid_s, "-n", "ip", "-d", "link", "show", "eth0"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut w = text.split_whitespace();
        w.find(|x| *x == "gso_max_segs").and_then(|_| w.next()).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0)
    };
    assert_eq!(segs(), 65535, "no proxy: the kernel's default");
    running.wiring.set_instance_gso_max_segs(44).await;
    assert_eq!(segs(), 44);
    // the limit is recorded as every wired instance's: the same call again enters no namespace (changed by
    // hand behind its back, eth0 keeps the hand-set value)
    let set_by_hand = |n: &str| {
        assert!(Command::new("nsenter")
            .args(["-t", &pid_s, "-n", "ip", "link", "set", "eth0", "gso_max_segs", n])
            .status()
            .unwrap()
            .success())
    };
    set_by_hand("65535");
    running.wiring.set_instance_gso_max_segs(44).await;
    assert_eq!(segs(), 65535, "a recorded limit is not applied again");
    set_by_hand("44");
    running.wiring.set_instance_gso_max_segs(oak_netmanager::wiring::GSO_MAX_SEGS_DEFAULT).await;
    assert_eq!(segs(), 65535);
    // an eth0 that is not the instance's (a recorded pid may name another process by now) is left alone
    let mac = |m: &str| {
        assert!(Command::new("nsenter")
            .args(["-t", &pid_s, "-n", "ip", "link", "set", "eth0", "address", m])
            .status()
            .unwrap()
            .success())
    };
    let own_mac: String =
        oak_netmanager::wiring::instance_mac(ns_ip).iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    mac("02:00:00:00:00:01");
    running.wiring.set_instance_gso_max_segs(44).await;
    assert_eq!(segs(), 65535, "a foreign eth0 keeps its limit");
    mac(&own_mac);
    running.wiring.set_instance_gso_max_segs(oak_netmanager::wiring::GSO_MAX_SEGS_DEFAULT).await;
    let nat = String::from_utf8_lossy(
        &Command::new("iptables").args(["-w", "-t", "nat", "-S", "PREROUTING"]).output().unwrap().stdout,
    )
    .to_string();
    assert!(nat.contains(&format!("{ns_ip}:80")) && nat.contains("18080"), "DNAT rule: {nat}");
    let rule = nat.lines().find(|l| l.contains("18080") && l.contains("DNAT")).unwrap();
    assert!(rule.contains("--dst-type LOCAL"), "only traffic to this host's own addresses is mapped: {rule}");
    // host ports that are the system's, this worker's, or another instance's are refused, naming why; the
    // refused instance is not wired
    let (other, _) = instance();
    for (ports, why) in [
        ("18080:80/tcp", "already mapped to instance svc1/0"),
        ("22:22", "reserved for ssh"),
        ("10000:80", "root's REST API"),
        ("19090:80;19090:81", "mapped twice"),
    ] {
        let r = http
            .post(format!("{base}/container/deploy"))
            .json(&json!({"pid": other.0.id(), "serviceName": "app.ns.other.ns", "serviceId": "svc2",
                          "instanceNumber": 0, "portMappings": ports}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ports}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(why), "{ports}: {body}");
    }
    assert_eq!(running.wiring.attachments().await.len(), 1, "nothing of the refused instance was wired");

    // a restart (a fresh Wiring over the same bridge and data dir) keeps the allocation: the address in use
    // is not handed out again
    {
        let again = oak_netmanager::wiring::Wiring::setup(&bridge, subnet, &dir.path().join("nm"), &[]).await.unwrap();
        let atts = again.attachments().await;
        assert_eq!(atts.len(), 1);
        assert_eq!(atts[0].ip, ns_ip);
        let (child2, _) = instance();
        let pid2 = child2.0.id();
        let ip2 = again.attach(pid2, "svc2", "app.ns.other.ns", 0, "").await.unwrap();
        assert_ne!(ip2, ns_ip);
        assert!(again.detach("svc2", 0).await.unwrap().is_some());
    }

    // the instance is registered and resolvable through the cluster (with the root's service IPs)
    let deadline = Instant::now() + Duration::from_secs(5);
    let entry = loop {
        let e = running.control.resolve_name("app.ns.web.ns").await.unwrap();
        if let Some(e) = e.filter(|e| !e.instances.is_empty()) {
            break e;
        }
        assert!(Instant::now() < deadline, "instance never became resolvable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entry.rr_ip, Some(rr));
    assert_eq!(entry.instances[0].ns_ip, ns_ip);
    assert!(running.tables.snapshot().service_by_ip(rr).is_some());

    // a second worker joins: its route is pushed to us over the subscription
    let other = cluster.lease_subnet("nm-other", "other-node", "192.0.2.50", 50103, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running.tables.snapshot().routes.contains_key(&other) {
        assert!(Instant::now() < deadline, "route for {other} never pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // undeploy removes the veth, the DNAT rule, and the registration (pushed to us as interested party)
    let host_veth = running.wiring.attachments().await[0].host_veth.clone();
    assert!(link_exists(&host_veth));
    let r = http
        .post(format!("{base}/container/undeploy"))
        .json(&json!({"serviceName": "app.ns.web.ns", "serviceId": "svc1", "instanceNumber": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!link_exists(&host_veth), "host veth removed");
    let nat = String::from_utf8_lossy(
        &Command::new("iptables").args(["-w", "-t", "nat", "-S", "PREROUTING"]).output().unwrap().stdout,
    )
    .to_string();
    assert!(!nat.contains(&format!("oak:{bridge}:")), "DNAT removed: {nat}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running.tables.snapshot().services.get("svc1").is_some_and(|s| s.instances.is_empty()) {
        assert!(Instant::now() < deadline, "instance removal never pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // idempotent
    let r = http
        .post(format!("{base}/container/undeploy"))
        .json(&json!({"serviceId": "svc1", "instanceNumber": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // masquerade for egress leaving the overlay
    let post = String::from_utf8_lossy(
        &Command::new("iptables").args(["-w", "-t", "nat", "-S", "POSTROUTING"]).output().unwrap().stdout,
    )
    .to_string();
    assert!(post.lines().any(|l| l.contains(&subnet.to_string()) && l.contains("MASQUERADE")), "{post}");
    // traffic inside the overlay is exempt from connection tracking
    let raw_rules = || {
        String::from_utf8_lossy(
            &Command::new("iptables").args(["-w", "-t", "raw", "-S", "PREROUTING"]).output().unwrap().stdout,
        )
        .to_string()
    };
    let raw = raw_rules();
    assert!(
        raw.lines().any(|l| l.contains("-s 10.16.0.0/12 -d 10.16.0.0/12")
            && l.contains(&format!("oak:{bridge}"))
            && l.contains("NOTRACK")),
        "{raw}"
    );

    // the cluster network service restarts: the NetManager notices, re-subscribes and gets pushes again
    // (the NetManager talks to it through a proxy whose death closes every connection, like a process exit)
    drop(proxy);
    let mut connected = running.connected.clone();
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| !*c)).await.expect("drop noticed").unwrap();
    let _proxy = Proxy::start(proxy_port, cluster_port.parse().unwrap()).await;
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c)).await.expect("re-subscribed").unwrap();
    let third = cluster.lease_subnet("nm-third", "third-node", "192.0.2.51", 50103, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !running.tables.snapshot().routes.contains_key(&third) {
        assert!(Instant::now() < deadline, "route for {third} never pushed after reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running.tables.snapshot().routes.contains_key(&other), "routes re-sent on re-subscription");
    running.stop();
    // removing the worker's wiring removes its rules, the exemption too
    _cleanup.0.destroy().await.unwrap();
    let raw = raw_rules();
    assert!(!raw.contains(&format!("oak:{bridge}")), "{raw}");
}

#[tokio::test]
async fn unreachable_cluster_is_a_fatal_timeout() {
    // a listener that accepts but never speaks HTTP/2
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().take(4) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &port.to_string(), "n");
    let t0 = Instant::now();
    let err = match oak_netmanager::start(oak_netmanager::Options {
        config_path: cfg,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("nm"),
        bridge: unique("ou"),
        proxy: None,
        ebpf: None,
        // any well-formed token: the cluster never answers
        token: "abc.def".into(),
    })
    .await
    {
        Ok(_) => panic!("start must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("NetManager timeout: cannot reach the cluster network service"), "{err}");
    assert!(err.contains("ClusterUrl") && err.contains("netcfg.json"), "{err}");
    assert!(t0.elapsed() >= Duration::from_secs(9), "gave up too early: {:?}", t0.elapsed());
}

/// A cluster network service that answers leases with a wrong network (a fake, only for this test).
struct BadCluster(&'static str);

type Updates = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::NetUpdate, tonic::Status>> + Send>>;
use oak_proto::net::v1 as pb;

#[tonic::async_trait]
impl pb::cluster_net_service_server::ClusterNetService for BadCluster {
    async fn lease_subnet(
        &self,
        _: tonic::Request<pb::LeaseSubnetRequest>,
    ) -> Result<tonic::Response<pb::LeaseSubnetReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::LeaseSubnetReply {
            subnet: self.0.into(),
            cluster_id: "bad".into(),
            ..Default::default()
        }))
    }
    async fn release_subnet(
        &self,
        _: tonic::Request<pb::ReleaseSubnetRequest>,
    ) -> Result<tonic::Response<pb::Ack>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn register_instance(
        &self,
        _: tonic::Request<pb::InstanceAddress>,
    ) -> Result<tonic::Response<pb::Ack>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn deregister_instance(
        &self,
        _: tonic::Request<pb::InstanceKey>,
    ) -> Result<tonic::Response<pb::Ack>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn resolve(
        &self,
        _: tonic::Request<pb::ResolveRequest>,
    ) -> Result<tonic::Response<pb::ResolveReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    type SubscribeStream = Updates;
    async fn subscribe(
        &self,
        _: tonic::Request<pb::SubscribeRequest>,
    ) -> Result<tonic::Response<Updates>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
}

#[tokio::test]
async fn bad_network_received_is_fatal() {
    for (answer, why) in
        [("10.18.0.0/24", "expected a /26"), ("172.16.0.0/26", "outside"), ("nonsense", "not an IPv4 subnet")]
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        // the fake speaks the real TLS and joining, so the NetManager gets as far as the lease
        let a = std::sync::Arc::new(
            oak_trust::Authority::open(&dir.path().join("ca"), "test CA", oak_trust::CLUSTER_SERVER).unwrap(),
        );
        let (token, _) = a.tokens.create(&a.pin(), 0, "test").unwrap();
        let admit = std::sync::Arc::new(oak_orchestrators::testing::Admit(&["netmanager"]));
        let server = tokio::spawn(
            oak_orchestrators::task::trusted(&a, admit)
                .unwrap()
                .add_service(pb::cluster_net_service_server::ClusterNetServiceServer::new(BadCluster(answer)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let cfg = write_config(dir.path(), &port.to_string(), "n");
        let err = match oak_netmanager::start(oak_netmanager::Options {
            config_path: cfg,
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("nm"),
            bridge: unique("ob"),
            proxy: None,
            ebpf: None,
            token,
        })
        .await
        {
            Ok(_) => panic!("start must fail for {answer}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.starts_with("bad network received: ") && err.contains(why), "{answer}: {err}");
        server.abort();
    }
}
