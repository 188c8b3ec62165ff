//! The user guide's topologies on separate devices, from the release bundles (`cargo xtask dist`). Every
//! device is a network namespace with a mount and UTS namespace of its own ([`Device`]): its own `/etc`,
//! `/usr/local`, `/var/lib`, `/run`, bpffs and host name. On each, the role's bundle is unpacked and its
//! `install.sh` run as on a real machine, the installed sample configuration is edited as the README says,
//! and the installed systemd units are started the way systemd would. Nothing from `target/` runs: the
//! bundles of the debug build are made by `cargo xtask test` (into `<target>/dist-test`).
//!
//! - M-DOC: root (with its dashboard, which answers on port 80) and cluster on one device, two workers on
//!   two others. A service with two instances on one worker is reached by its round-robin IP (both
//!   instances answer) and its closest IP from a client instance on the other worker. Prints the time from
//!   the worker bundle on the device to "worker registered" and the worker's resident memory at idle.
//! - MDNC: the root alone, two clusters on two devices, one worker each (A's on the eBPF fast path, B's on
//!   the tun path only); the service in cluster B is reached from a client in cluster A.
//! - Hybrid: the root alone; a device that is both the cluster and one of its workers (with unikernels
//!   enabled through its worker.env), and a second worker.
//! - Troubleshoot (the guide's cases): a cluster without name and location warns naming the variables; a
//!   worker whose cluster is unreachable stops with "NetManager timeout" naming the address it tried and its
//!   netcfg.json; a worker whose cluster has no subnet for it stops with "bad network received" and the
//!   cluster's reason.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{bin_dir, require_root, wait_for, Api, Device, Net, Proc};

const PW: &str = "field-admin-pw";
const IMAGE: &str = "/var/lib/oakestra-rs/images/busybox.tar";

/// The bundles `cargo xtask test` made of the debug build; None (skip) outside CI when they are missing.
fn bundles(test: &str) -> Option<PathBuf> {
    if !require_root(test) {
        return None;
    }
    // OAK_FIELD_BUNDLES: other bundles of this version (the README's figures come from the release ones)
    let dir = match std::env::var_os("OAK_FIELD_BUNDLES") {
        Some(d) => PathBuf::from(d),
        None => bin_dir().parent().expect("target dir").join("dist-test"),
    };
    if !dir.join(bundle_name("worker")).exists() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: `cargo xtask test` makes it", dir.display());
        eprintln!("SKIPPED {test}: no bundles in {} (cargo xtask test makes them)", dir.display());
        return None;
    }
    let containerd = std::process::Command::new("containerd").arg("--version").output();
    if !containerd.is_ok_and(|o| o.status.success()) {
        assert!(std::env::var_os("CI").is_none(), "containerd is installed by `cargo xtask setup`");
        eprintln!("SKIPPED {test}: no containerd");
        return None;
    }
    Some(dir)
}

fn bundle_name(role: &str) -> String {
    format!("oakestra-rs-{role}-{}-x86_64-unknown-linux-gnu.tar.gz", env!("CARGO_PKG_VERSION"))
}

/// Unpacks the role's bundle on the device and runs its install.sh (no DESTDIR: the device's own /).
fn install(dev: &Device, bundles: &Path, role: &str) {
    let tarball = bundles.join(bundle_name(role));
    let dir = bundle_name(role).trim_end_matches(".tar.gz").to_string();
    let out = dev
        .sh(&format!(
            "mkdir -p /var/lib/bundles && tar -xzf {} -C /var/lib/bundles && /var/lib/bundles/{dir}/install.sh",
            tarball.display()
        ))
        .unwrap();
    assert!(out.contains(&format!("installed the {role} bundle")), "install.sh on {}: {out}", dev.name);
}

/// Sets `KEY=value` lines of an installed environment file, as a user editing it would.
fn set_env(dev: &Device, file: &str, vars: &[(&str, &str)]) {
    let mut lines: Vec<String> = dev.read(file).unwrap().lines().map(str::to_string).collect();
    for (k, v) in vars {
        let line = format!("{k}={v}");
        match lines.iter_mut().find(|l| l.starts_with(&format!("{k}=")) || l.starts_with(&format!("#{k}="))) {
            Some(l) => *l = line,
            None => lines.push(line),
        }
    }
    dev.write(file, &(lines.join("\n") + "\n")).unwrap();
}

/// Starts the root from its unit; returns it and its join token for clusters.
fn start_root(dev: &Device) -> (Proc, String) {
    set_env(dev, "/etc/oakestra-rs/root.env", &[("OAK_ADMIN_PASSWORD", PW)]);
    let p = dev.start_unit("oak-root.service").unwrap();
    p.wait_log("root orchestrator listening", Duration::from_secs(30)).unwrap();
    let token = dev.read("/var/lib/oakestra-rs/root/join-token").unwrap().trim().to_string();
    assert!(token.starts_with("oak10"), "a pinned join token: {token}");
    (p, token)
}

/// Starts a cluster orchestrator from its unit with the guide's variables; returns it and its worker token.
fn start_cluster(dev: &Device, root: Ipv4Addr, name: &str, location: &str, token: &str) -> (Proc, String) {
    set_env(
        dev,
        "/etc/oakestra-rs/cluster.env",
        &[
            ("SYSTEM_MANAGER_URL", &root.to_string()),
            ("CLUSTER_NAME", name),
            ("CLUSTER_LOCATION", location),
            ("OAK_CLUSTER_TOKEN", token),
        ],
    );
    let p = dev.start_unit("oak-cluster.service").unwrap();
    p.wait_log("registered with the root", Duration::from_secs(30)).unwrap();
    let token = dev.read("/var/lib/oakestra-rs/cluster/worker-join-token").unwrap().trim().to_string();
    (p, token)
}

struct Worker {
    netmanager: Proc,
    nodeengine: Proc,
}

/// Installs the worker bundle and starts containerd, the NetManager and the NodeEngine as the guide says:
/// netcfg.json edited (this device's address, the cluster's), the NodeEngine with `-n 6000`. Returns the
/// worker and the time from the bundle on the device (unpack, install.sh, configuration, containerd, both
/// daemons) to "registered with the cluster orchestrator".
fn start_worker(
    dev: &Device,
    bundles: &Path,
    image: &Path,
    cluster: Ipv4Addr,
    token: &str,
    more: &[(&str, &str)],
) -> (Worker, Duration) {
    let t0 = Instant::now();
    install(dev, bundles, "worker");
    let cluster = cluster.to_string();
    let mut vars = vec![("CLUSTER_ADDRESS", cluster.as_str()), ("OAK_WORKER_TOKEN", token)];
    vars.extend_from_slice(more);
    set_env(dev, "/etc/oakestra-rs/worker.env", &vars);
    let mut cfg: Value = serde_json::from_str(&dev.read("/etc/netmanager/netcfg.json").unwrap()).unwrap();
    cfg["NodePublicAddress"] = json!(dev.ip.to_string());
    cfg["ClusterUrl"] = json!(cluster.to_string());
    dev.write("/etc/netmanager/netcfg.json", &serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dev.start_containerd().unwrap();
    let netmanager = dev.start_unit("oak-netmanager.service").unwrap();
    netmanager.wait_log("NetManager ready", Duration::from_secs(30)).unwrap();
    let nodeengine = dev.start_unit("oak-nodeengine.service").unwrap();
    nodeengine.wait_log("registered with the cluster orchestrator", Duration::from_secs(30)).unwrap();
    let took = t0.elapsed();
    dev.sh(&format!("mkdir -p /var/lib/oakestra-rs/images && cp {} {IMAGE}", image.display())).unwrap();
    (Worker { netmanager, nodeengine }, took)
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    kb / 1024.0
}

/// The REST API of the root at `root`, called from a thread inside `net`'s host `from`.
struct Client<'a> {
    net: &'a Net,
    from: String,
    api: Api,
}

impl<'a> Client<'a> {
    fn login(net: &'a Net, from: &str, root: Ipv4Addr) -> Self {
        let mut api = Api::new(root);
        api = net.host(from).run(move || {
            wait_for("the root API", Duration::from_secs(20), || api.login("Admin", PW).ok());
            api
        });
        Client { net, from: from.to_string(), api }
    }

    fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (api, path) = (self.api.clone(), path.to_string());
        self.net.host(&self.from).run(move || api.call(method, &path, body.as_ref()))
    }

    fn service(&self, sid: &str) -> Value {
        let (c, v) = self.call("GET", &format!("/api/service/{sid}"), None);
        assert_eq!(c, 200, "{v}");
        v
    }
}

/// Where an instance must go: a worker (node name = the device's host name), in a cluster when given.
fn direct(cluster: Option<&str>, node: &str) -> Value {
    match cluster {
        Some(c) => json!([{"type": "direct", "cluster": c, "node": node}]),
        None => json!([{"type": "direct", "node": node}]),
    }
}

/// Deploys a web service with two instances on `web_at` and a client on `client_at`, then fetches from the
/// client instance's network namespace (on `client_dev`) by the web service's round-robin IP until both
/// instances answered, and once by its closest IP. `app` names the application: each test its own, since
/// instance ids name the cgroups, which the devices' containerds share with the machine. (The fetch is the
/// machine's curl run in that namespace: the static busybox `wget` of the test image crashes resolving even
/// a literal address.)
fn deploy_and_reach(api: &Client, app: &str, web_at: Value, client_at: Value, client_dev: &Device) {
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
      "application_name": app, "application_namespace": "dev", "application_desc": "from bundles",
      "microservices": [
        {"microserviceID": "", "microservice_name": "web", "microservice_namespace": "dev",
         "virtualization": "container", "code": format!("oci-archive:{IMAGE}"),
         "cmd": ["sh", "-c", "cat /proc/sys/kernel/hostname > /www/who; exec httpd -f -p 8080 -h /www"],
         "memory": 32, "vcpus": 0.1, "constraints": web_at},
        {"microserviceID": "", "microservice_name": "client", "microservice_namespace": "dev",
         "virtualization": "container", "code": format!("oci-archive:{IMAGE}"), "cmd": ["sleep", "3600"],
         "memory": 32, "vcpus": 0.1, "constraints": client_at}]}]});
    let (c, v) = api.call("POST", "/api/application", Some(sla));
    assert_eq!(c, 200, "{v}");
    let ids: Vec<String> =
        v[0]["microservices"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let svcs: Vec<Value> = ids.iter().map(|id| api.service(id)).collect();
    let by_name = |n: &str| svcs.iter().find(|s| s["microservice_name"] == n).unwrap().clone();
    let (web, client) = (by_name("web"), by_name("client"));
    let (web_id, client_id) = (web["microserviceID"].as_str().unwrap(), client["microserviceID"].as_str().unwrap());
    for (sid, n) in [(web_id, 2), (client_id, 1)] {
        for _ in 0..n {
            let (c, v) = api.call("POST", &format!("/api/service/{sid}/instance"), None);
            assert_eq!(c, 200, "{v}");
        }
    }
    for (sid, n) in [(web_id, 2), (client_id, 1)] {
        wait_for("the instances RUNNING", Duration::from_secs(90), || {
            let list = api.service(sid)["instance_list"].as_array().cloned().unwrap_or_default();
            for i in &list {
                assert!(!matches!(i["status"].as_str(), Some("FAILED" | "DEAD")), "instance failed: {i}");
            }
            (list.len() == n && list.iter().all(|i| i["status"] == "RUNNING")).then_some(())
        });
    }
    let web = api.service(web_id);
    let ip = |k: &str| web["addresses"][k].as_str().unwrap_or_else(|| panic!("no addresses.{k}: {web}")).to_string();
    let (rr, closest) = (ip("rr_ip"), ip("closest_ip"));
    let task = format!("{}.instance.0", client["job_name"].as_str().unwrap());
    let mut n = 0;
    let mut fetch = |addr: &str| {
        n += 1;
        client_dev
            .sh(&format!(
                "pid=$(ctr -n oakestra tasks ls | awk '$1 == \"{task}\" {{print $2}}'); \
                 nsenter -t \"$pid\" -n curl -sS -m 3 http://{addr}:8080/who"
            ))
            .map_err(|e| {
                if n % 10 == 1 {
                    eprintln!("fetch {n} from {addr}: {e:#}");
                }
            })
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut seen = BTreeSet::new();
    wait_for("both web instances answering the round-robin IP", Duration::from_secs(60), || {
        if let Some(who) = fetch(&rr) {
            seen.insert(who);
        }
        (seen.len() == 2).then_some(())
    });
    for who in &seen {
        assert!(who.ends_with("instance-0") || who.ends_with("instance-1"), "an instance's host name: {seen:?}");
    }
    let who = wait_for("an answer on the closest IP", Duration::from_secs(30), || fetch(&closest));
    assert!(seen.contains(&who), "the closest IP reaches one of the instances: {who} not in {seen:?}");
}

#[test]
fn m_doc_from_bundles() {
    let Some(bundles) = bundles("m_doc_from_bundles") else { return };
    let net = Net::new(&["ctl", "w1", "w2"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:field").unwrap();
    let [ctl, w1, w2] = ["ctl", "w1", "w2"].map(|n| Device::new(net.host(n), &d).unwrap());
    install(&ctl, &bundles, "root");
    install(&ctl, &bundles, "cluster");
    let (_root, join) = start_root(&ctl);
    // the root bundle's dashboard, from its unit
    let dash = ctl.start_unit("oak-dashboard.service").unwrap();
    dash.wait_log("dashboard listening on", Duration::from_secs(30)).unwrap();
    let health = net.host("ctl").run(|| ureq::get("http://127.0.0.1/healthz").call().ok()?.into_string().ok());
    assert_eq!(health.as_deref(), Some("ok"), "the dashboard answers on port 80");
    let (_cluster, wtoken) = start_cluster(&ctl, Ipv4Addr::LOCALHOST, "field-mdoc", "48.26,11.67,1000", &join);
    let (worker1, took) = start_worker(&w1, &bundles, &image, ctl.ip, &wtoken, &[]);
    let (_worker2, _) = start_worker(&w2, &bundles, &image, ctl.ip, &wtoken, &[]);
    let (nm, ne) = (rss_mib(worker1.netmanager.pid()), rss_mib(worker1.nodeengine.pid()));
    eprintln!(
        "FIGURES worker bundle -> registered: {:.1} s; idle RSS: NetManager {nm:.1} MiB, NodeEngine {ne:.1} MiB",
        took.as_secs_f64()
    );
    let api = Client::login(&net, "ctl", ctl.ip);
    wait_for("two workers in the cluster", Duration::from_secs(30), || {
        let c = api.call("GET", "/api/clusters/active", None).1;
        (c[0]["active_nodes"] == 2).then_some(())
    });
    deploy_and_reach(&api, "mdoc", direct(None, "w2"), direct(None, "w1"), &w1);
}

#[test]
fn mdnc_from_bundles() {
    let Some(bundles) = bundles("mdnc_from_bundles") else { return };
    let net = Net::new(&["root", "ca", "cb", "wa", "wb"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:field").unwrap();
    let [root, ca, cb, wa, wb] = ["root", "ca", "cb", "wa", "wb"].map(|n| Device::new(net.host(n), &d).unwrap());
    install(&root, &bundles, "root");
    let (_root, join) = start_root(&root);
    install(&ca, &bundles, "cluster");
    install(&cb, &bundles, "cluster");
    let (_ca, ta) = start_cluster(&ca, root.ip, "cluster-a", "48.26,11.67,1000", &join);
    let (_cb, tb) = start_cluster(&cb, root.ip, "cluster-b", "52.52,13.40,1000", &join);
    let (_wa, _) = start_worker(&wa, &bundles, &image, ca.ip, &ta, &[]);
    // cluster B's worker on the tun path alone (NETMANAGER_OPTS in worker.env), A's with the eBPF fast path
    let (worker_b, _) = start_worker(&wb, &bundles, &image, cb.ip, &tb, &[("NETMANAGER_OPTS", "--no-ebpf")]);
    let log = worker_b.netmanager.output();
    assert!(log.contains("fast_path=false"), "the tun path only: {log}");
    let api = Client::login(&net, "root", root.ip);
    wait_for("two clusters with a worker each", Duration::from_secs(30), || {
        let c = api.call("GET", "/api/clusters/active", None).1;
        let list = c.as_array().cloned().unwrap_or_default();
        (list.len() == 2 && list.iter().all(|c| c["active_nodes"] == 1)).then_some(())
    });
    deploy_and_reach(&api, "mdnc", direct(Some("cluster-b"), "wb"), direct(Some("cluster-a"), "wa"), &wa);
}

#[test]
fn hybrid_from_bundles() {
    let Some(bundles) = bundles("hybrid_from_bundles") else { return };
    let net = Net::new(&["root", "edge", "w2"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:field").unwrap();
    let [root, edge, w2] = ["root", "edge", "w2"].map(|n| Device::new(net.host(n), &d).unwrap());
    install(&root, &bundles, "root");
    let (_root, join) = start_root(&root);
    // the cluster host is also a worker of its cluster
    install(&edge, &bundles, "cluster");
    let (_cluster, wtoken) = start_cluster(&edge, root.ip, "edge", "48.26,11.67,1000", &join);
    // with unikernels too (NODEENGINE_OPTS in worker.env reaches the NodeEngine through its unit)
    let (edge_worker, _) = start_worker(&edge, &bundles, &image, edge.ip, &wtoken, &[("NODEENGINE_OPTS", "-u=true")]);
    let log = edge_worker.nodeengine.output();
    assert!(log.contains("unikernel support enabled") || log.contains("-u/--unikernel given"), "{log}");
    let (_w2, _) = start_worker(&w2, &bundles, &image, edge.ip, &wtoken, &[]);
    let api = Client::login(&net, "root", root.ip);
    wait_for("two workers in the hybrid cluster", Duration::from_secs(30), || {
        let c = api.call("GET", "/api/clusters/active", None).1;
        (c[0]["active_nodes"] == 2).then_some(())
    });
    deploy_and_reach(&api, "hybrid", direct(None, "edge"), direct(None, "w2"), &w2);
}

#[test]
fn troubleshoot_cases_from_bundles() {
    let Some(bundles) = bundles("troubleshoot_cases_from_bundles") else { return };
    let net = Net::new(&["ctl", "w1"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let [ctl, w1] = ["ctl", "w1"].map(|n| Device::new(net.host(n), &d).unwrap());
    install(&ctl, &bundles, "root");
    install(&ctl, &bundles, "cluster");
    // a root that leases no worker subnets to clusters: their workers get none
    set_env(&ctl, "/etc/oakestra-rs/root.env", &[("OAK_MAX_BLOCKS_PER_CLUSTER", "0")]);
    let (_root, join) = start_root(&ctl);
    // CLUSTER_NAME and CLUSTER_LOCATION left empty in cluster.env: the cluster registers and says what is missing
    let (cluster, wtoken) = start_cluster(&ctl, Ipv4Addr::LOCALHOST, "", "", &join);
    let log = cluster.output();
    for var in ["CLUSTER_NAME is not set", "CLUSTER_LOCATION is not set"] {
        assert!(log.contains(var), "the cluster warns `{var}`: {log}");
    }

    // a worker whose netcfg.json names an address where no cluster answers: NetManager timeout, naming both
    install(&w1, &bundles, "worker");
    set_env(&w1, "/etc/oakestra-rs/worker.env", &[("CLUSTER_ADDRESS", "10.99.0.250"), ("OAK_WORKER_TOKEN", &wtoken)]);
    let mut cfg: Value = serde_json::from_str(&w1.read("/etc/netmanager/netcfg.json").unwrap()).unwrap();
    cfg["NodePublicAddress"] = json!(w1.ip.to_string());
    cfg["ClusterUrl"] = json!("10.99.0.250");
    w1.write("/etc/netmanager/netcfg.json", &cfg.to_string()).unwrap();
    let mut nm = w1.start_unit("oak-netmanager.service").unwrap();
    nm.wait_log("NetManager timeout", Duration::from_secs(60)).unwrap();
    let st = nm.terminate(Duration::from_secs(10));
    let log = nm.output();
    assert!(st.is_some_and(|s| !s.success()), "the NetManager stops with an error: {log}");
    assert!(log.contains("10.99.0.250") && log.contains("/etc/netmanager/netcfg.json"), "{log}");

    // the right cluster, which has no subnet to give: bad network received, with the cluster's reason
    cfg["ClusterUrl"] = json!(ctl.ip.to_string());
    w1.write("/etc/netmanager/netcfg.json", &cfg.to_string()).unwrap();
    let mut nm = w1.start_unit("oak-netmanager.service").unwrap();
    nm.wait_log("bad network received", Duration::from_secs(30)).unwrap();
    let st = nm.terminate(Duration::from_secs(10));
    let log = nm.output();
    assert!(st.is_some_and(|s| !s.success()), "the NetManager stops with an error: {log}");
    assert!(log.contains("gave this worker no subnet") && log.contains("block"), "the cluster's reason: {log}");
}
