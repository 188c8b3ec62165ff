//! 1-DOC end to end: root, cluster, NetManager and NodeEngine on one host (a network namespace), real
//! containerd. Through the REST API: submit an SLA whose image is a local OCI archive (no registry here),
//! deploy, see it RUNNING with an overlay address, fetch a page from it over the overlay, see the worker with
//! its datapath and counters in `/api/cluster/{id}/workers`, read and follow its log, restart the
//! NodeEngine (the container keeps running and is re-adopted), undeploy (task and container gone).

use std::process::Command;
use std::time::Duration;

use oak_proto::InstanceState;
use serde_json::{json, Value};
use testbed::{require_root, wait_for, Api, Net};

mod common;

fn containerd_ready() -> bool {
    Command::new("ctr").arg("version").output().is_ok_and(|o| o.status.success())
}

fn containers(ns: &str) -> String {
    let out = Command::new("ctr").args(["-n", ns, "containers", "ls", "-q"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn one_doc_deploy_reach_restart_undeploy() {
    if !require_root("one_doc_deploy_reach_restart_undeploy") {
        return;
    }
    if !containerd_ready() {
        assert!(std::env::var_os("CI").is_none(), "containerd is not running (cargo xtask test starts it)");
        eprintln!("SKIPPED one_doc_deploy_reach_restart_undeploy: containerd is not running");
        return;
    }
    let net = Net::new(&["doc"]).unwrap();
    let h = net.host("doc");
    let d = net.dir.path().to_path_buf();
    let ctr_ns = format!("oak-1doc-{}", std::process::id());
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:1doc").unwrap();
    let mut stack = common::start(h, &d, &ctr_ns);

    let mut api = Api::new(h.ip);
    api = h.run(move || {
        wait_for("root API", Duration::from_secs(20), || api.login("Admin", common::ADMIN_PASSWORD).ok());
        api
    });
    let call = |m: &'static str, path: &str, body: Option<Value>| {
        let (api, path) = (api.clone(), path.to_string());
        h.run(move || api.call(m, &path, body.as_ref()))
    };
    wait_for("the worker registered with its real resources", Duration::from_secs(30), || {
        let c = call("GET", "/api/clusters/active", None).1;
        (c[0]["active_nodes"] == 1 && c[0]["total_cpu_cores"].as_u64().unwrap_or(0) >= 1).then_some(())
    });

    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"web",
      "application_namespace":"doc","application_desc":"1-DOC","microservices":[{"microserviceID":"","microservice_name":"httpd",
      "microservice_namespace":"doc","virtualization":"container","code":format!("oci-archive:{}", image.display()),
      "cmd":["sh","-c","echo serving /www; exec httpd -f -p 8080 -h /www"],"memory":64,"vcpus":0.5}]}]});
    let (c, v) = call("POST", "/api/application", Some(sla));
    assert_eq!(c, 200, "{v}");
    let sid = v[0]["microservices"][0].as_str().unwrap().to_string();
    let (c, v) = call("POST", &format!("/api/service/{sid}/instance"), None);
    assert_eq!(c, 200, "{v}");
    let mut seen = Vec::new();
    let inst = wait_for("instance RUNNING", Duration::from_secs(60), || {
        let i = call("GET", &format!("/api/service/{sid}"), None).1["instance_list"][0].clone();
        let st = i["status"].as_str().unwrap_or("").to_string();
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        let state = InstanceState::parse(&st);
        assert!(!matches!(state, Some(InstanceState::Failed | InstanceState::Dead)), "instance failed: {i}");
        (state == Some(InstanceState::Running)).then_some(i)
    });
    eprintln!("states seen: {seen:?}");
    assert_eq!(inst["node_name"], "doc-worker", "{inst}");
    let addr = inst["ns_address"].as_str().unwrap_or("").to_string();
    assert!(addr.starts_with("10.18."), "the instance has an overlay address: {inst}");
    let url = format!("http://{addr}:8080/index.html");
    let fetch = move || ureq::get(&url).timeout(Duration::from_secs(3)).call().ok().and_then(|r| r.into_string().ok());
    let page = h.run({
        let f = fetch.clone();
        move || wait_for("the page over the overlay", Duration::from_secs(20), f)
    });
    assert_eq!(page, "hello-oak");
    // the root shows the worker as its cluster reports it, with its overlay: datapath, subnet, counters
    let worker = wait_for("the worker's overlay in /api/cluster/doc/workers", Duration::from_secs(20), || {
        let (c, ws) = call("GET", "/api/cluster/doc/workers", None);
        assert_eq!(c, 200, "{ws}");
        let w = ws[0].clone();
        w["network"]["counters"].as_object().is_some_and(|c| !c.is_empty()).then_some(w)
    });
    assert_eq!(worker["node_name"], "doc-worker", "{worker}");
    // the instance's output, through root, cluster and worker; following from next_offset gives nothing new
    let (c, logs) = call("GET", &format!("/api/service/{sid}/instance/0/logs"), None);
    assert_eq!(c, 200, "{logs}");
    assert!(logs["text"].as_str().unwrap_or_default().contains("serving /www"), "{logs}");
    let next = logs["next_offset"].as_u64().unwrap();
    let (c, more) = call("GET", &format!("/api/service/{sid}/instance/0/logs?offset={next}"), None);
    assert_eq!((c, more["text"].as_str(), more["offset"].as_u64()), (200, Some(""), Some(next)), "{more}");
    assert!(matches!(worker["network"]["datapath"].as_str(), Some("ebpf" | "tun")), "{worker}");
    let subnet = worker["network"]["subnet"].as_str().unwrap_or_default();
    assert!(subnet.starts_with("10.18.") && subnet.ends_with("/26"), "{worker}");
    assert_eq!(worker["network"]["tunnel_endpoint"], format!("{}:50103", h.ip), "{worker}");
    let task = containers(&ctr_ns);
    assert!(task.contains(".instance.0"), "the container is in containerd: {task}");

    // NodeEngine restart: the container keeps running and is re-adopted
    assert!(stack.nodeengine.terminate(Duration::from_secs(20)).is_some(), "NodeEngine stops on SIGTERM");
    let _ne2 = common::spawn_nodeengine(h, "nodeengine-2", &stack.ne_args);
    assert_eq!(h.run(fetch.clone()).as_deref(), Some("hello-oak"), "served while the NodeEngine was away");
    wait_for("still RUNNING after the restart", Duration::from_secs(30), || {
        let i = call("GET", &format!("/api/service/{sid}"), None).1["instance_list"][0].clone();
        (i["status"] == "RUNNING").then_some(())
    });

    // undeploy: gone from the API and from containerd
    let (c, _) = call("DELETE", &format!("/api/service/{sid}/instance/0"), None);
    assert_eq!(c, 200);
    wait_for("instance removed", Duration::from_secs(30), || {
        call("GET", &format!("/api/service/{sid}"), None).1["instance_list"]
            .as_array()
            .is_some_and(|l| l.is_empty())
            .then_some(())
    });
    wait_for("container removed from containerd", Duration::from_secs(20), || {
        (!containers(&ctr_ns).contains(".instance.0")).then_some(())
    });
    assert!(h.run(fetch).is_none(), "nothing answers after the undeploy");
    // the imported image and the namespace go too (content is garbage-collected with the image)
    let images = Command::new("ctr").args(["-n", &ctr_ns, "images", "ls", "-q"]).output().unwrap();
    for img in String::from_utf8_lossy(&images.stdout).lines() {
        let _ = Command::new("ctr").args(["-n", &ctr_ns, "images", "rm", "--sync", img]).output();
    }
    let rm = Command::new("ctr").args(["namespaces", "rm", &ctr_ns]).output().unwrap();
    assert!(
        rm.status.success(),
        "nothing left in containerd namespace {ctr_ns}: {}",
        String::from_utf8_lossy(&rm.stderr)
    );
}
