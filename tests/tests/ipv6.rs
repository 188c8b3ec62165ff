//! The control plane over IPv6 (Oakestra's override-ipv6-enabled), with the real binaries in network
//! namespaces:
//!
//! - `control_plane_over_ipv6_only`: root and cluster hosts have IPv6 addresses only (their IPv4 address
//!   is removed), every server listens on `[::]`, every client is pointed at an IPv6 literal (the cluster
//!   at a bare `fd00:99::1`, the NodeEngine at a bare `-a`, the NetManager at a bare `ClusterUrl`). The
//!   cluster registers at the root, the worker at the cluster, its NetManager leases a subnet, and each
//!   tier reports the IPv6 address it saw the other at; the worker still advertises its IPv4 tunnel
//!   endpoint.
//! - `wrong_node_ip_is_explained`: IPv4 clients of `[::]` listeners are recorded by their IPv4 address
//!   (not `::ffff:…`), and a NetManager whose NodePublicAddress is not the address the cluster sees warns
//!   "Wrong Node IP", naming both and its netcfg.json.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{bin, ip, require_root, wait_for, Api, Host, Net, Proc};

const PW: &str = "test-admin-pw";
const WAIT: Duration = Duration::from_secs(60);

/// Gives `h` the IPv6 address `fd00:99::n` (no duplicate detection: usable at once); returns it.
fn add_ipv6(h: &Host, n: u8) -> String {
    let a = format!("fd00:99::{n}");
    ip(&["-n", &h.ns, "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]).unwrap();
    a
}

/// Removes `h`'s IPv4 address: whatever it reaches afterwards, it reaches over IPv6.
fn remove_ipv4(h: &Host) {
    ip(&["-n", &h.ns, "addr", "del", &format!("{}/24", h.ip), "dev", "eth0"]).unwrap();
    let left = h.exec(&["ip", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(!left.contains("inet "), "{} still has IPv4: {left}", h.name);
}

fn containerd_ready() -> bool {
    Command::new("ctr").arg("version").output().is_ok_and(|o| o.status.success())
}

/// The line of `p`'s log that contains every one of `parts` (waiting for it).
fn log_line(p: &Proc, parts: &[&str]) -> String {
    wait_for(&format!("{}: a log line with {parts:?}", p.name), WAIT, || {
        p.output().lines().find(|l| parts.iter().all(|s| l.contains(s))).map(str::to_string)
    })
}

/// Logs in to the root API at `base` from inside `h`; a call function for that host.
fn root_api(h: &Host, base: String) -> impl Fn(&'static str, &str) -> (u16, Value) + '_ {
    let mut api = Api::at(base);
    api = h.run(move || {
        wait_for("root API login", WAIT, || api.login("Admin", PW).ok());
        api
    });
    move |method, path| {
        let (api, path) = (api.clone(), path.to_string());
        h.run(move || api.call(method, &path, None))
    }
}

/// A NetManager on `h` (tun path, no eBPF) with this netcfg.json; its process and config path.
fn start_netmanager(net: &Net, h: &Host, netcfg: Value) -> (Proc, String) {
    let d = net.dir.path();
    let cfg = d.join(format!("netcfg-{}.json", h.name));
    std::fs::write(&cfg, netcfg.to_string()).unwrap();
    let cfg = cfg.display().to_string();
    let data = d.join(format!("nm-{}", h.name)).display().to_string();
    let nm = h
        .spawn(
            &format!("netmanager-{}", h.name),
            &bin("NetManager"),
            &["-c", &cfg, "--data-dir", &data, "--no-ebpf"],
            &[],
        )
        .unwrap();
    (nm, cfg)
}

/// A root on `h` with every listener on `[::]` (plus `more` flags).
fn start_root(net: &Net, h: &Host, more: &[&str]) -> Proc {
    let dir = net.dir.path().join("root").display().to_string();
    let mut args = vec!["--data-dir", &dir, "--api-addr", "[::]:10000", "--grpc-addr", "[::]:50052"];
    args.extend(["--netsvc-addr", "[::]:10099"]);
    args.extend_from_slice(more);
    let root = h.spawn("root", &bin("root-orchestrator"), &args, &[("OAK_ADMIN_PASSWORD", PW)]).unwrap();
    root.wait_log("root orchestrator listening", WAIT).unwrap();
    root
}

/// A cluster on `h` with both listeners on `[::]`, pointed at `root` (plus `more` flags).
fn start_cluster(net: &Net, h: &Host, root: &str, name: &str, more: &[&str]) -> Proc {
    let dir = net.dir.path().join("cluster").display().to_string();
    let mut args = vec!["--root-address", root, "--data-dir", &dir, "--worker-addr", "[::]:10100"];
    args.extend(["--netsvc-addr", "[::]:10110"]);
    args.extend_from_slice(more);
    let env = [("CLUSTER_NAME", name), ("CLUSTER_LOCATION", "48.26,11.67,1000")];
    h.spawn("cluster", &bin("cluster-orchestrator"), &args, &env).unwrap()
}

#[test]
fn control_plane_over_ipv6_only() {
    if !require_root("control_plane_over_ipv6_only") {
        return;
    }
    let net = Net::new(&["root", "cluster", "w1"]).unwrap();
    let (root_h, cluster_h, w1) = (net.host("root"), net.host("cluster"), net.host("w1"));
    let root6 = add_ipv6(root_h, 1);
    let cluster6 = add_ipv6(cluster_h, 2);
    let w16 = add_ipv6(w1, 3);
    // root and cluster speak IPv6 only; the worker keeps its IPv4 address for the tunnel alone
    remove_ipv4(root_h);
    remove_ipv4(cluster_h);
    let p = |s: &str| net.dir.path().join(s).display().to_string();

    let root = start_root(&net, root_h, &["--report-interval-ms", "300"]);
    // the root given bare: fd00:99::1
    let cluster = start_cluster(&net, cluster_h, &root6, "v6", &["--heartbeat-interval-ms", "500"]);
    cluster.wait_log("registered with the root", WAIT).unwrap();
    cluster.wait_log("cluster network service listening", WAIT).unwrap();
    // the root saw the cluster at its IPv6 address
    log_line(&root, &["cluster registered", &format!("address={cluster6}")]);

    // the worker: NetManager pointed at the bare IPv6 literal, its tunnel endpoint its IPv4 address
    let (nm, _) = start_netmanager(
        &net,
        w1,
        json!({"NodePublicAddress": w1.ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": cluster6,
               "NodeName": "w1"}),
    );
    nm.wait_log("NetManager ready", WAIT).unwrap();
    let seen = log_line(&nm, &["tunnel endpoint", "advertised"]);
    assert!(seen.contains(&format!("tunnel endpoint {}:50103 advertised", w1.ip)), "{seen}");
    assert!(seen.contains(&format!("the cluster sees this worker at {w16}")) && seen.contains("over IPv6"), "{seen}");
    assert!(!nm.output().contains("Wrong Node IP"), "no Wrong Node IP over IPv6:\n{}", nm.output());

    // the worker's registration: the NodeEngine (containerd here) or a simulated worker
    let worker = if containerd_ready() {
        let credential = net.dir.path().join("nm-w1/api-token").display().to_string();
        let ctr_ns = format!("oak-ipv6-{}", std::process::id());
        let images = p("images");
        let args = [
            "-a",
            &cluster6, // bare: fd00:99::2
            "-n",
            "6000",
            "--netmanager-credential",
            &credential,
            "--data-dir",
            &p("ne"),
            "--namespace",
            &ctr_ns,
            "--node-name",
            "w1",
            "--image-dir",
            &images,
        ];
        let ne = w1.spawn("nodeengine", &bin("NodeEngine"), &args, &[]).unwrap();
        let line = log_line(&ne, &["registered with the cluster orchestrator"]);
        assert!(line.contains(&format!("at http://[{cluster6}]:10100")), "{line}");
        assert!(line.contains(&format!("it sees this worker at {w16}")), "{line}");
        ne
    } else {
        eprintln!("containerd is not running: a simulated worker registers instead of the NodeEngine");
        let at = format!("[{cluster6}]:10100");
        w1.spawn_sim_worker(&at, "w1", &[]).unwrap()
    };
    log_line(&cluster, &["worker registered", "worker=w1", &format!("address={w16}")]);
    log_line(&cluster, &["joined", "identity=netmanager/", &format!("peer={w16} ")]);

    // the root's API over IPv6, from the cluster's host: the cluster active with its worker, at its address
    let call = root_api(cluster_h, format!("http://[{root6}]:10000"));
    let c = wait_for("the cluster active with its worker", WAIT, || {
        let (_, v) = call("GET", "/api/clusters/active");
        v.as_array().and_then(|a| a.first()).filter(|c| c["active_nodes"] == 1).cloned()
    });
    assert_eq!(c["cluster_name"], "v6", "{c}");
    assert_eq!(c["ip"], cluster6.as_str(), "the root shows where the cluster's session comes from: {c}");
    drop(worker);
}

#[test]
fn wrong_node_ip_is_explained() {
    if !require_root("wrong_node_ip_is_explained") {
        return;
    }
    // IPv4 hosts, servers on [::]: every client is an IPv4-mapped peer there
    let net = Net::new(&["root", "cluster", "w1"]).unwrap();
    let (root_h, cluster_h, w1) = (net.host("root"), net.host("cluster"), net.host("w1"));
    let root = start_root(&net, root_h, &[]);
    let root_url = format!("http://{}:50052", root_h.ip);
    let cluster = start_cluster(&net, cluster_h, &root_url, "v4-on-v6", &[]);
    cluster.wait_log("cluster network service listening", WAIT).unwrap();
    log_line(&root, &["cluster registered", &format!("address={} ", cluster_h.ip)]);
    log_line(&root, &["joined", "identity=cluster/", &format!("peer={} ", cluster_h.ip)]);

    // NodePublicAddress is an address of no host here: the cluster sees the worker at its own
    let wrong = "10.99.0.200";
    assert_ne!(wrong, w1.ip.to_string());
    let (nm, cfg) = start_netmanager(
        &net,
        w1,
        json!({"NodePublicAddress": wrong, "NodePublicPort": "50103", "ClusterUrl": cluster_h.ip.to_string(),
               "NodeName": "w1"}),
    );
    nm.wait_log("NetManager ready", WAIT).unwrap();
    let warning = log_line(&nm, &["Wrong Node IP"]);
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("advertises tunnel endpoint {wrong}")), "{warning}");
    assert!(warning.contains(&format!("the cluster sees it at {}", w1.ip)), "{warning}");
    assert!(warning.contains(&format!("other workers will send tunnel traffic to {wrong}")), "{warning}");
    assert!(warning.contains(&format!("set NodePublicAddress in {cfg}")), "{warning}");
    assert!(!warning.contains("::ffff:"), "an IPv4 worker is named by its IPv4 address: {warning}");
    log_line(&cluster, &["joined", "identity=netmanager/", &format!("peer={} ", w1.ip)]);

    // a worker's session: recorded by its IPv4 address too
    let at = cluster_h.ip.to_string();
    let _w = w1.spawn_sim_worker(&at, "w1", &[]).unwrap();
    let line = log_line(&cluster, &["worker registered", "worker=w1"]);
    assert!(line.contains(&format!("address={} ", w1.ip)), "{line}");
    let call = root_api(cluster_h, format!("http://{}:10000", root_h.ip));
    let c = wait_for("the cluster active with its worker", WAIT, || {
        let (_, v) = call("GET", "/api/clusters/active");
        v.as_array().and_then(|a| a.first()).filter(|c| c["active_nodes"] == 1).cloned()
    });
    assert_eq!(c["ip"], cluster_h.ip.to_string(), "{c}");
}
