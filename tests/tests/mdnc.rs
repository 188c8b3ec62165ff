//! MDNC (many clusters, root apart) end to end: one root host, two cluster hosts (cluster A and cluster B,
//! each a real `cluster-orchestrator` registered with the root) and one worker host per cluster, each
//! running the real `NetManager` binary against its own cluster (netcfg.json `ClusterUrl`).
//!
//! One application is created through the root's REST API (a service `echo` and a `client`); its service
//! IPs (round-robin and closest) come from the root. Instances are `sleep` processes in fresh network
//! namespaces wired through the NetManager's local API (`POST /container/deploy`), serving TCP from threads
//! that joined their namespace. Checked:
//! - a client instance in cluster A reaches the only `echo` instance, in cluster B, by the round-robin IP
//!   (first contact: A's NetManager asks cluster A, which asks the root) and by the closest IP;
//! - after `POST /container/undeploy` of that instance in B, the client's connections stop reaching it
//!   within seconds;
//! - a new `echo` instance wired in cluster A is reached by the client through the same service IPs.
//!
//! Run once with the eBPF fast path on both NetManagers (their default) and once with `--no-ebpf` (the tun
//! path), sharing the scenario.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{bin, in_netns, require_root, wait_for, Api, Host, Net, Proc};

const PW: &str = "mdnc-admin-pw";
const PORT: u16 = 8080;

#[test]
fn mdnc_cross_cluster_service_ip_ebpf() {
    if !require_root("mdnc_cross_cluster_service_ip_ebpf") {
        return;
    }
    mdnc(&[]);
}

#[test]
fn mdnc_cross_cluster_service_ip_tun() {
    if !require_root("mdnc_cross_cluster_service_ip_tun") {
        return;
    }
    mdnc(&["--no-ebpf"]);
}

/// An "instance": a `sleep` process in a fresh network namespace; killed when dropped.
struct Instance {
    child: Child,
    ns: String,
}

impl Instance {
    fn new() -> Instance {
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let child = Command::new("unshare").args(["-n", "sleep", "600"]).stdin(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        let ns = format!("/proc/{pid}/ns/net");
        wait_for("unshare to enter a fresh netns", Duration::from_secs(5), || {
            std::fs::read_link(&ns).ok().filter(|n| *n != own).map(|_| ())
        });
        Instance { child, ns }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// A TCP server on PORT answering `name` (write and close); returns once it listens.
    fn serve(&self, name: &'static str) {
        let l = in_netns(&self.ns, || TcpListener::bind(("0.0.0.0", PORT)).unwrap()).unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(format!("{name}\n").as_bytes());
            }
        });
    }
    /// One TCP connection to `ip`:PORT from this instance; the answer, or the error.
    fn ask(&self, ip: Ipv4Addr) -> Result<String, String> {
        in_netns(&self.ns, move || {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
            Ok(out.trim().to_string())
        })
        .unwrap_or_else(|e| Err(format!("{e:#}")))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until Ok, panicking after `timeout` with the last error and `diag()` (the
/// workers' datapath counters).
fn until<T>(what: &str, timeout: Duration, diag: &dyn Fn() -> String, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {e}\n{}", diag())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A worker host running a NetManager (local API on 127.0.0.1:6000 inside the host).
struct Worker<'a> {
    host: &'a Host,
    nm: Proc,
    /// The NetManager's API credential file (in its data dir).
    credential: std::path::PathBuf,
}

impl Worker<'_> {
    fn api(&self, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut api = Api::at("http://127.0.0.1:6000");
        api.token = Some(std::fs::read_to_string(&self.credential).unwrap().trim().to_string());
        let path = path.to_string();
        self.host.run(move || api.call(method, &path, body.as_ref()))
    }
    fn deploy(&self, inst: &Instance, job: &str, sid: &str, n: u32) -> Ipv4Addr {
        let body = json!({"pid": inst.pid(), "serviceName": job, "serviceId": sid, "instanceNumber": n});
        let (c, v) = self.api("POST", "/container/deploy", Some(body));
        assert_eq!(c, 200, "deploy {job} #{n} on {}: {v}", self.host.name);
        v["nsAddress"].as_str().unwrap().parse().unwrap()
    }
    fn undeploy(&self, job: &str, sid: &str, n: u32) {
        let body = json!({"serviceName": job, "serviceId": sid, "instanceNumber": n});
        let (c, v) = self.api("POST", "/container/undeploy", Some(body));
        assert_eq!(c, 200, "undeploy {job} #{n} on {}: {v}", self.host.name);
    }
    fn counters(&self) -> Value {
        self.api("GET", "/counters", None).1
    }
}

fn sla() -> Value {
    let ms = |name: &str| {
        json!({"microserviceID":"","microservice_name":name,"microservice_namespace":"test","virtualization":"container",
               "code":"docker.io/library/busybox:latest","memory":32,"vcpus":0.1})
    };
    json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"mdnc",
      "application_namespace":"test","application_desc":"MDNC","microservices":[ms("echo"), ms("client")]}]})
}

fn mdnc(nm_flags: &[&str]) {
    let ebpf = !nm_flags.contains(&"--no-ebpf");
    let net = Net::new(&["root", "ca", "cb", "wa", "wb"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let p = |s: &str| d.join(s).display().to_string();
    let root_ip = net.host("root").ip.to_string();

    let root_args = ["--data-dir", &p("root")];
    let _root =
        net.host("root").spawn("root", &bin("root-orchestrator"), &root_args, &[("OAK_ADMIN_PASSWORD", PW)]).unwrap();
    let clusters: Vec<Proc> = [("ca", "mdnc-a", "48.26,11.67,1000"), ("cb", "mdnc-b", "52.52,13.40,1000")]
        .iter()
        .map(|(h, name, loc)| {
            let args = ["--root-address", root_ip.as_str(), "--data-dir", &p(h), "--heartbeat-interval-ms", "500"];
            let env = [("CLUSTER_NAME", *name), ("CLUSTER_LOCATION", *loc)];
            net.host(h).spawn(&format!("cluster-{h}"), &bin("cluster-orchestrator"), &args, &env).unwrap()
        })
        .collect();
    // the cluster network service starts once the root has welcomed the cluster (it needs the cluster id)
    for c in &clusters {
        c.wait_log("cluster network service listening", Duration::from_secs(30)).unwrap();
    }

    let start_nm = |w: &str, cluster: &str| {
        let h = net.host(w);
        let cfg = d.join(format!("netcfg-{w}.json"));
        let doc = json!({"NodePublicAddress": h.ip.to_string(), "NodePublicPort": "50103",
                         "ClusterUrl": net.host(cluster).ip.to_string(), "ClusterNetPort": "10110", "NodeName": w});
        std::fs::write(&cfg, doc.to_string()).unwrap();
        let cfg = cfg.display().to_string();
        let data = p(&format!("nm-{w}"));
        let mut args =
            vec!["-c", cfg.as_str(), "--data-dir", data.as_str(), "--log-level", "oak_netmanager=debug,info"];
        args.extend(nm_flags);
        let nm = h.spawn(&format!("netmanager-{w}"), &bin("NetManager"), &args, &[]).unwrap();
        Worker { host: h, nm, credential: std::path::Path::new(&data).join("api-token") }
    };
    let wa = start_nm("wa", "ca");
    let wb = start_nm("wb", "cb");
    for w in [&wa, &wb] {
        w.nm.wait_log("NetManager ready", Duration::from_secs(60)).unwrap();
        let (c, st) = w.api("GET", "/status", None);
        assert_eq!(c, 200, "{st}");
        assert_eq!(st["proxy"], true, "{} status: {st}", w.host.name);
        assert_eq!(st["ebpf"], ebpf, "{} status (flags {nm_flags:?}): {st}", w.host.name);
        eprintln!("{}: {st}", w.host.name);
    }

    // the application, through the root's REST API
    let root = net.host("root");
    let mut api = Api::new(root.ip);
    api = root.run(move || {
        wait_for("root API login", Duration::from_secs(20), || api.login("Admin", PW).ok());
        api
    });
    let call = |m: &'static str, path: &str, body: Option<Value>| {
        let (api, path) = (api.clone(), path.to_string());
        root.run(move || api.call(m, &path, body.as_ref()))
    };
    let (c, v) = call("POST", "/api/application", Some(sla()));
    assert_eq!(c, 200, "{v}");
    let apps = v.as_array().unwrap_or_else(|| panic!("{v}"));
    let app = apps.iter().find(|a| a["application_name"] == "mdnc").unwrap_or_else(|| panic!("{v}")).clone();
    let svcs: Vec<Value> = app["microservices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| {
            let (c, s) = call("GET", &format!("/api/service/{}", id.as_str().unwrap()), None);
            assert_eq!(c, 200, "{s}");
            s
        })
        .collect();
    let by_name = |n: &str| {
        svcs.iter().find(|s| s["microservice_name"] == n).unwrap_or_else(|| panic!("no {n}: {svcs:?}")).clone()
    };
    let (echo, client) = (by_name("echo"), by_name("client"));
    let sid = echo["microserviceID"].as_str().unwrap().to_string();
    let job = echo["job_name"].as_str().unwrap().to_string();
    let ip_of = |k: &str| -> Ipv4Addr {
        echo["addresses"][k].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no addresses.{k}: {echo}"))
    };
    let (rr, closest) = (ip_of("rr_ip"), ip_of("closest_ip"));
    let csid = client["microserviceID"].as_str().unwrap().to_string();
    let cjob = client["job_name"].as_str().unwrap().to_string();
    eprintln!("service {job} ({sid}): rr {rr}, closest {closest}; client {cjob} ({csid})");

    // echo #0 in cluster B, the client in cluster A
    let b0 = Instance::new();
    let ip_b0 = wb.deploy(&b0, &job, &sid, 0);
    b0.serve("echo-b0");
    let cli = Instance::new();
    let ip_cli = wa.deploy(&cli, &cjob, &csid, 0);
    eprintln!("echo #0 {ip_b0} on wb (cluster B), client {ip_cli} on wa (cluster A)");
    // on a timeout: both workers' datapath counters, routes, and each side's route to the other instance
    let diag = || {
        let mut out = String::new();
        for (w, peer) in [(&wa, ip_b0), (&wb, ip_cli)] {
            let sh = |cmd: &[&str]| w.host.exec(cmd).unwrap_or_else(|e| format!("{e:#}\n"));
            out += &format!("counters {}: {}\n", w.host.name, w.counters());
            out += &format!("{} ip route:\n{}", w.host.name, sh(&["ip", "route"]));
            out += &format!("{} ip route get {peer}: {}", w.host.name, sh(&["ip", "route", "get", &peer.to_string()]));
        }
        out
    };

    // first contact: unknown to A's NetManager, resolved through cluster A, which asks the root
    let t = Instant::now();
    until("the client in A reaching echo #0 in B by the round-robin IP", Duration::from_secs(30), &diag, || {
        cli.ask(rr).and_then(|a| if a == "echo-b0" { Ok(()) } else { Err(a) })
    });
    eprintln!("rr {rr} answered by echo-b0 {:?} after the deploys", t.elapsed());
    for _ in 0..5 {
        assert_eq!(cli.ask(rr), Ok("echo-b0".to_string()), "every connection by rr");
    }
    until("the client in A reaching echo #0 in B by the closest IP", Duration::from_secs(20), &diag, || {
        cli.ask(closest).and_then(|a| if a == "echo-b0" { Ok(()) } else { Err(a) })
    });
    for _ in 0..3 {
        assert_eq!(cli.ask(closest), Ok("echo-b0".to_string()), "every connection by closest");
    }
    let ca = wa.counters();
    eprintln!("counters wa: {ca}");
    eprintln!("counters wb: {}", wb.counters());
    assert!(
        ca["events"]["resolves"].as_u64().unwrap_or(0) >= 1,
        "wa resolved the service IP through its cluster: {ca}"
    );
    if ebpf {
        assert!(ca["ebpf"]["encap"].as_u64().unwrap_or(0) > 0, "the flows ran on wa's fast path: {ca}");
    } else {
        assert_eq!(ca["ebpf"], false, "{ca}");
        assert!(ca["events"]["forward_translated"].as_u64().unwrap_or(0) > 0, "{ca}");
    }

    // undeploy echo #0 in B: the client's connections stop reaching it
    wb.undeploy(&job, &sid, 0);
    let t = Instant::now();
    let errs = until("the client's connections to stop reaching echo #0", Duration::from_secs(15), &diag, || {
        let answers: Vec<Result<String, String>> = (0..3).map(|_| cli.ask(rr)).collect();
        if answers.iter().all(|a| a.is_err()) {
            Ok(answers)
        } else {
            Err(format!("{answers:?}"))
        }
    });
    eprintln!("rr unreachable {:?} after the undeploy: {errs:?}", t.elapsed());
    assert!(cli.ask(closest).is_err(), "closest after the undeploy");

    // a new echo instance in cluster A: the same service IPs reach it
    let a1 = Instance::new();
    let ip_a1 = wa.deploy(&a1, &job, &sid, 1);
    a1.serve("echo-a1");
    eprintln!("echo #1 {ip_a1} on wa (cluster A)");
    let t = Instant::now();
    until("the client reaching the new echo #1 in A by the round-robin IP", Duration::from_secs(20), &diag, || {
        cli.ask(rr).and_then(|a| if a == "echo-a1" { Ok(()) } else { Err(a) })
    });
    eprintln!("rr {rr} answered by echo-a1 {:?} after its deploy", t.elapsed());
    for _ in 0..5 {
        assert_eq!(cli.ask(rr), Ok("echo-a1".to_string()), "every connection by rr after the move");
    }
    until("the client reaching echo #1 by the closest IP", Duration::from_secs(20), &diag, || {
        cli.ask(closest).and_then(|a| if a == "echo-a1" { Ok(()) } else { Err(a) })
    });
    eprintln!("counters wa: {}", wa.counters());
    eprintln!("counters wb: {}", wb.counters());
    drop(clusters);
}
