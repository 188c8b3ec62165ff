//! Control plane across hosts: the real root-orchestrator, cluster-orchestrator and simulated workers
//! (the real worker protocol) as processes in separate network namespaces joined by veth.

use std::time::Duration;

use serde_json::{json, Value};
use testbed::{bin, require_root, wait_for, Api, Net};

const PW: &str = "test-admin-pw";

fn sla(name: &str, memory: u64, vcpus: f64) -> Value {
    json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":name,
      "application_namespace":"test","application_desc":"","microservices":[
        {"microserviceID":"","microservice_name":"web","microservice_namespace":"test","virtualization":"container",
         "code":"docker.io/library/nginx:latest","memory":memory,"vcpus":vcpus}]}]})
}

struct Cp {
    net: Net,
    api: Api,
}

impl Cp {
    fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (api, path) = (self.api.clone(), path.to_string());
        self.net.host("root").run(move || api.call(method, &path, body.as_ref()))
    }
    fn get(&self, path: &str) -> Value {
        self.call("GET", path, None).1
    }
    fn login(&mut self) {
        let mut api = self.api.clone();
        self.api = self.net.host("root").run(move || {
            wait_for("root API", Duration::from_secs(20), || api.login("Admin", PW).ok());
            api
        });
    }
    fn active_nodes(&self) -> u64 {
        self.get("/api/clusters/active")
            .as_array()
            .and_then(|a| a.first())
            .and_then(|c| c["active_nodes"].as_u64())
            .unwrap_or(0)
    }
    /// Creates the application and deploys one instance; returns the service id.
    fn deploy(&self, name: &str, memory: u64, vcpus: f64) -> String {
        let (c, v) = self.call("POST", "/api/application", Some(sla(name, memory, vcpus)));
        assert_eq!(c, 200, "{v}");
        let app = v.as_array().unwrap().iter().find(|a| a["application_name"] == name).unwrap().clone();
        let sid = app["microservices"][0].as_str().unwrap().to_string();
        let (c, v) = self.call("POST", &format!("/api/service/{sid}/instance"), None);
        assert_eq!(c, 200, "{v}");
        sid
    }
    fn instance0(&self, sid: &str) -> Value {
        self.get(&format!("/api/service/{sid}"))["instance_list"][0].clone()
    }
}

fn root_args(dir: &str) -> Vec<String> {
    vec!["--data-dir".into(), dir.into(), "--report-interval-ms".into(), "300".into()]
}

#[test]
fn mdoc_placement_no_resources_malformed_sla_and_worker_loss() {
    if !require_root("mdoc_placement_no_resources_malformed_sla_and_worker_loss") {
        return;
    }
    let net = Net::new(&["root", "cluster", "w1", "w2"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let root_dir = d.join("root").display().to_string();
    let ra: Vec<String> = root_args(&root_dir);
    let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
    let _root = net.host("root").spawn("root", &bin("root-orchestrator"), &ra, &[("OAK_ADMIN_PASSWORD", PW)]).unwrap();
    let cluster_dir = d.join("cluster").display().to_string();
    let root_ip = net.host("root").ip.to_string();
    let fast = ["--heartbeat-interval-ms", "200", "--worker-stale-ms", "2000"];
    let cluster =
        net.host("cluster").spawn_cluster(&root_ip, &cluster_dir, "edge-1", "48.26,11.67,1000", &fast).unwrap();
    let cl_addr = format!("{}:10100", net.host("cluster").ip);
    let mut workers = Vec::new();
    for w in ["w1", "w2"] {
        let size = ["--cpu-cores", "2", "--memory-mb", "2048"];
        workers.push(net.host(w).spawn_sim_worker(&cl_addr, w, &size).unwrap());
    }
    let mut cp = Cp { api: Api::new(net.host("root").ip), net };

    // no token, bad token: 401
    cp.login();
    let tok = cp.api.token.take();
    let (c, v) = cp.call("GET", "/api/applications", None);
    assert_eq!(c, 401, "{v}");
    cp.api.token = Some("not.a.token".into());
    let (c, v) = cp.call("GET", "/api/applications", None);
    assert_eq!(c, 401, "{v}");
    cp.api.token = tok;

    wait_for("both workers registered in the root's view", Duration::from_secs(20), || {
        (cp.active_nodes() == 2).then_some(())
    });
    let cl = &cp.get("/api/clusters/active")[0];
    assert_eq!(cl["cluster_name"], "edge-1");
    assert_eq!(cl["total_cpu_cores"], 4);

    // deploy: placed on a worker, RUNNING
    let sid = cp.deploy("app1", 256, 1.0);
    let first = wait_for("instance RUNNING", Duration::from_secs(20), || {
        let i = cp.instance0(&sid);
        (i["status"] == "RUNNING").then(|| i["node_name"].as_str().unwrap_or("").to_string())
    });
    assert!(first == "w1" || first == "w2", "{first}");
    let svc = cp.get(&format!("/api/service/{sid}"));
    assert!(svc["addresses"]["rr_ip"].as_str().unwrap().starts_with("10.30."), "{svc}");

    // fits nowhere: the status keeps Oakestra's vocabulary, the detail names NoResourcesAvailable
    let big = cp.deploy("app2", 256, 8.0);
    wait_for("NoResourcesAvailable reported", Duration::from_secs(20), || {
        let i = cp.instance0(&big);
        (i["status"] == "NoActiveClusterWithCapacity"
            && i["status_detail"].as_str().unwrap_or("").contains("NoResourcesAvailable"))
        .then_some(())
    });

    // malformed SLA: 400 naming the field, nothing stored
    let before = cp.get("/api/applications").as_array().unwrap().len();
    let mut bad = sla("app3", 100, 1.0);
    bad["applications"][0]["microservices"][0]["vcpus"] = json!("lots");
    let (c, v) = cp.call("POST", "/api/application", Some(bad));
    assert_eq!(c, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("applications[0].microservices[0].vcpus"), "{v}");
    assert_eq!(cp.get("/api/applications").as_array().unwrap().len(), before);

    // the worker running the instance hangs (SIGSTOP: connection open, no heartbeats): it moves
    let (idx, other) = if first == "w1" { (0, "w2") } else { (1, "w1") };
    workers[idx].freeze();
    wait_for("instance RUNNING on the other worker", Duration::from_secs(30), || {
        let i = cp.instance0(&sid);
        (i["status"] == "RUNNING" && i["node_name"] == other).then_some(())
    });
    cluster.wait_log("missed heartbeats", Duration::from_secs(5)).unwrap();
    wait_for("root sees one active worker", Duration::from_secs(20), || (cp.active_nodes() == 1).then_some(()));
    // it comes back: registers again, and the stale copy it still holds is undeployed there
    workers[idx].thaw();
    wait_for("worker back", Duration::from_secs(30), || (cp.active_nodes() == 2).then_some(()));
    cluster.wait_log("not placed there", Duration::from_secs(20)).unwrap();
    let i = cp.instance0(&sid);
    assert_eq!(i["node_name"], other, "the instance stays where it moved: {i}");
}

#[test]
fn root_kill9_and_restart_keeps_applications_and_the_cluster_returns() {
    if !require_root("root_kill9_and_restart_keeps_applications_and_the_cluster_returns") {
        return;
    }
    let net = Net::new(&["root", "cluster", "w1"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let root_dir = d.join("root").display().to_string();
    let ra: Vec<String> = root_args(&root_dir);
    let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
    let mut root =
        net.host("root").spawn("root", &bin("root-orchestrator"), &ra, &[("OAK_ADMIN_PASSWORD", PW)]).unwrap();
    let root_ip = net.host("root").ip.to_string();
    let cluster_dir = d.join("cluster").display().to_string();
    let hb = ["--heartbeat-interval-ms", "200"];
    let _cluster = net.host("cluster").spawn_cluster(&root_ip, &cluster_dir, "edge-2", "somewhere", &hb).unwrap();
    let cl_addr = format!("{}:10100", net.host("cluster").ip);
    let _w = net.host("w1").spawn_sim_worker(&cl_addr, "w1", &[]).unwrap();
    let mut cp = Cp { api: Api::new(net.host("root").ip), net };
    cp.login();
    wait_for("worker registered", Duration::from_secs(20), || (cp.active_nodes() == 1).then_some(()));
    let sid = cp.deploy("keep", 128, 0.5);
    wait_for("RUNNING", Duration::from_secs(20), || (cp.instance0(&sid)["status"] == "RUNNING").then_some(()));
    let rr = cp.get(&format!("/api/service/{sid}"))["addresses"]["rr_ip"].clone();
    let cluster_id = cp.get("/api/clusters/")[0]["cluster_id"].clone();

    root.kill9();
    let mut root = cp.net.host("root").spawn("root-2", &bin("root-orchestrator"), &ra, &[]).unwrap();
    cp.login(); // the admin password is the stored one (no env this time)
    let apps = cp.get("/api/applications");
    assert!(apps.as_array().unwrap().iter().any(|a| a["application_name"] == "keep"), "{apps}");
    let svc = cp.get(&format!("/api/service/{sid}"));
    assert_eq!(svc["addresses"]["rr_ip"], rr, "service IP survives: {svc}");
    wait_for("cluster registered again", Duration::from_secs(30), || (cp.active_nodes() == 1).then_some(()));
    let clusters = cp.get("/api/clusters/");
    assert_eq!(clusters.as_array().unwrap().len(), 1, "{clusters}");
    assert_eq!(clusters[0]["cluster_id"], cluster_id);
    assert_eq!(cp.instance0(&sid)["status"], "RUNNING");
    // and it still places new work
    let sid2 = cp.deploy("after", 64, 0.1);
    wait_for("new instance RUNNING after the restart", Duration::from_secs(20), || {
        (cp.instance0(&sid2)["status"] == "RUNNING").then_some(())
    });
    assert!(root.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()), "root exits cleanly on SIGTERM");
}

#[test]
fn cluster_without_name_or_location_warns_and_keeps_trying_the_root() {
    if !require_root("cluster_without_name_or_location_warns_and_keeps_trying_the_root") {
        return;
    }
    let net = Net::new(&["cluster"]).unwrap();
    let dir = net.dir.path().join("c").display().to_string();
    let c = net
        .host("cluster")
        .spawn("cluster", &bin("cluster-orchestrator"), &["--root-address", "10.99.0.200", "--data-dir", &dir], &[])
        .unwrap();
    c.wait_log("CLUSTER_NAME is not set", Duration::from_secs(10)).unwrap();
    c.wait_log("CLUSTER_LOCATION is not set", Duration::from_secs(10)).unwrap();
    c.wait_log("cannot register with the root orchestrator", Duration::from_secs(20)).unwrap();
    assert!(c.output().contains("10.99.0.200:50052"), "the warning names what it tried: {}", c.output());
}
