//! Attacks on the control plane's trust (at the root's cluster port and the cluster's worker port), from a
//! host of their own: the real root-orchestrator,
//! cluster-orchestrator and simulated workers as processes in network namespaces joined by veth, the
//! `token` commands run as the operator would. Each attack must fail with a clear reason while the live
//! cluster keeps its session and its instance.

use std::process::Command;
use std::time::Duration;

use oak_proto::v1 as pb;
use serde_json::{json, Value};
use testbed::{bin, require_root, wait_for, Api, Net};

const PW: &str = "test-admin-pw";

/// `root-orchestrator token …` on the root's data directory: its standard output.
fn token_cmd(root_dir: &str, args: &[&str]) -> String {
    let out = Command::new(bin("root-orchestrator"))
        .args(["--data-dir", root_dir, "token"])
        .args(args)
        .output()
        .expect("root-orchestrator token runs");
    assert!(out.status.success(), "token {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A cluster joining the root at `url` with `token`, from the current network namespace: its id (after
/// a welcome), or the reason it got none.
fn join_as_cluster(url: &str, token: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let m = oak_trust::Member::in_memory(url, oak_trust::ROOT_SERVER, "cluster", "intruder", token);
        let (ch, creds) =
            m.channel(url, |e| e.connect_timeout(Duration::from_secs(5))).await.map_err(|e| format!("{e:#}"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = pb::ClusterHello { cluster_name: "edge-1".into(), ..Default::default() };
        tx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Hello(hello)) }).unwrap();
        let mut inbound = pb::cluster_registry_client::ClusterRegistryClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        match inbound.message().await.map_err(|s| s.message().to_string())?.and_then(|m| m.msg) {
            Some(pb::root_message::Msg::Welcome(w)) => {
                assert_eq!(w.cluster_id, creds.identity.id, "the welcome names the certificate's identity");
                Ok(w.cluster_id)
            }
            Some(pb::root_message::Msg::Rejected(r)) => Err(r.reason),
            other => Err(format!("{other:?}")),
        }
    })
}

/// A worker (NodeEngine) joining the cluster at `url` with `token`, from the current network namespace:
/// its node id (after a welcome), or the reason it got none.
fn join_as_worker(url: &str, token: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let m = oak_trust::Member::in_memory(url, oak_trust::CLUSTER_SERVER, "node", "w1", token);
        let (ch, _) =
            m.channel(url, |e| e.connect_timeout(Duration::from_secs(5))).await.map_err(|e| format!("{e:#}"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = pb::WorkerHello { node_name: "w1".into(), ..Default::default() };
        tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Hello(hello)) }).unwrap();
        let mut inbound = pb::worker_registry_client::WorkerRegistryClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let r = match inbound.message().await.map_err(|s| s.message().to_string())?.and_then(|m| m.msg) {
            Some(pb::cluster_to_worker::Msg::Welcome(w)) => Ok(w.node_id),
            Some(pb::cluster_to_worker::Msg::Rejected(r)) => Err(r.reason),
            other => Err(format!("{other:?}")),
        };
        drop(tx);
        r
    })
}

/// `cluster-orchestrator token …` on the cluster's data directory: its standard output.
fn cluster_token_cmd(dir: &str, args: &[&str]) -> String {
    let out = Command::new(bin("cluster-orchestrator"))
        .args(["--data-dir", dir, "token"])
        .args(args)
        .output()
        .expect("cluster-orchestrator token runs");
    assert!(out.status.success(), "token {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A ClusterHello without TLS: whatever answer there is (there must be none).
fn plaintext_hello(url: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = pb::ClusterHello { cluster_name: "edge-1".into(), ..Default::default() };
        tx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Hello(hello)) }).unwrap();
        let mut s = pb::cluster_registry_client::ClusterRegistryClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        s.message().await.map_err(|s| s.to_string())?;
        Ok(())
    })
}

#[test]
fn impostor_clusters_are_refused_and_the_live_cluster_keeps_its_session() {
    if !require_root("impostor_clusters_are_refused_and_the_live_cluster_keeps_its_session") {
        return;
    }
    let net = Net::new(&["root", "cluster", "w1", "intruder"]).unwrap();
    let d = net.dir.path().to_path_buf();
    let root_dir = d.join("root").display().to_string();
    let _root = net
        .host("root")
        .spawn(
            "root",
            &bin("root-orchestrator"),
            &["--data-dir", &root_dir, "--report-interval-ms", "300"],
            &[("OAK_ADMIN_PASSWORD", PW)],
        )
        .unwrap();
    let root_ip = net.host("root").ip.to_string();
    let mut api = Api::new(net.host("root").ip);
    api = net.host("root").run(move || {
        wait_for("root API", Duration::from_secs(20), || api.login("Admin", PW).ok());
        api
    });
    // the cluster joins with the whole token the root wrote (its CA pinned)
    let pinned = std::fs::read_to_string(d.join("root/join-token")).unwrap().trim().to_string();
    assert!(pinned.starts_with("oak10"), "{pinned}");
    let cluster_dir = d.join("cluster").display().to_string();
    let tok = ["--token", pinned.as_str()];
    let _cluster =
        net.host("cluster").spawn_cluster(&root_ip, &cluster_dir, "edge-1", "48.26,11.67,1000", &tok).unwrap();
    let cl_addr = format!("{}:10100", net.host("cluster").ip);
    let _w = net.host("w1").spawn_sim_worker(&cl_addr, "w1", &[]).unwrap();
    let call = |method: &'static str, path: &str, body: Option<Value>| {
        let (api, path) = (api.clone(), path.to_string());
        net.host("root").run(move || api.call(method, &path, body.as_ref()))
    };
    wait_for("the cluster and its worker active", Duration::from_secs(30), || {
        let (_, v) = call("GET", "/api/clusters/active", None);
        (v[0]["active_nodes"] == 1).then_some(())
    });
    let live = call("GET", "/api/clusters/active", None).1[0]["cluster_id"].as_str().unwrap().to_string();
    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":"kept","application_namespace":"test","application_desc":"","microservices":[
        {"microserviceID":"","microservice_name":"web","microservice_namespace":"test","virtualization":"container",
         "code":"docker.io/library/nginx:latest","memory":128,"vcpus":0.5}]}]});
    let (c, v) = call("POST", "/api/application", Some(sla));
    assert_eq!(c, 200, "{v}");
    let sid = v.as_array().unwrap()[0]["microservices"][0].as_str().unwrap().to_string();
    call("POST", &format!("/api/service/{sid}/instance"), None);
    let running = || call("GET", &format!("/api/service/{sid}"), None).1["instance_list"][0].clone();
    wait_for("instance RUNNING", Duration::from_secs(20), || (running()["status"] == "RUNNING").then_some(()));

    // the attacks, from the intruder's host
    let url = format!("http://{root_ip}:50052");
    let pin = pinned.trim_start_matches("oak10").split("::").next().unwrap().to_string();
    let attack = |token: String| {
        let url = url.clone();
        net.host("intruder").run(move || join_as_cluster(&url, &token))
    };
    // no TLS: no answer at all
    let u = url.clone();
    assert!(net.host("intruder").run(move || plaintext_hello(&u)).is_err(), "a plaintext hello was answered");
    // a forged secret under a real token id
    let id = pinned.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    let e = attack(format!("oak10{pin}::{id}.{}", "X".repeat(32))).unwrap_err();
    assert!(e.contains("not one of this authority's"), "{e}");
    // a token pinned to another CA: the intruder's client refuses the root before sending anything
    let e = attack(format!("oak10{}::{id}.{}", "0".repeat(64), "X".repeat(32))).unwrap_err();
    assert!(e.contains("not the one the join token pins"), "{e}");
    // an expired token (made by the operator's command with a 1 s lifetime)
    let expiring = token_cmd(&root_dir, &["create", "--ttl", "1s", "--description", "expires"]);
    let exp_id = expiring.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    wait_for("the token listed as expired", Duration::from_secs(10), || {
        token_cmd(&root_dir, &["list"]).lines().any(|l| l.starts_with(&exp_id) && l.contains("expired")).then_some(())
    });
    let e = attack(expiring).unwrap_err();
    assert!(e.contains(&format!("join token {exp_id} has expired")), "{e}");
    // a revoked one
    let revoked = token_cmd(&root_dir, &["create", "--ttl", "1h"]);
    let rev_id = revoked.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    token_cmd(&root_dir, &["revoke", &rev_id]);
    let e = attack(revoked).unwrap_err();
    assert!(e.contains(&format!("join token {rev_id} was revoked")), "{e}");
    // a valid token makes a new cluster, never the live one, whatever name it gives
    let other = attack(pinned.clone()).unwrap();
    assert_ne!(other, live, "a join token took over the live cluster");

    // the same against the cluster's worker port, with the cluster's own tokens
    let wurl = format!("http://{cl_addr}");
    let wattack = |token: String| {
        let u = wurl.clone();
        net.host("intruder").run(move || join_as_worker(&u, &token))
    };
    let first = std::fs::read_to_string(d.join("cluster/worker-join-token")).unwrap().trim().to_string();
    let wpin = first.trim_start_matches("oak10").split("::").next().unwrap().to_string();
    let wid = first.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    let e = wattack(format!("oak10{wpin}::{wid}.{}", "X".repeat(32))).unwrap_err();
    assert!(e.contains("not one of this authority's"), "{e}");
    let e = wattack(format!("oak10{pin}::{wid}.{}", "X".repeat(32))).unwrap_err();
    assert!(e.contains("not the one the join token pins"), "a root token pins the root's CA, not the cluster's: {e}");
    let expiring = cluster_token_cmd(&cluster_dir, &["create", "--ttl", "1s"]);
    let exp_id = expiring.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    wait_for("the worker token listed as expired", Duration::from_secs(10), || {
        cluster_token_cmd(&cluster_dir, &["list"])
            .lines()
            .any(|l| l.starts_with(&exp_id) && l.contains("expired"))
            .then_some(())
    });
    let e = wattack(expiring).unwrap_err();
    assert!(e.contains("has expired"), "{e}");
    let revoked = cluster_token_cmd(&cluster_dir, &["create"]);
    let rev_id = revoked.split("::").nth(1).unwrap().split('.').next().unwrap().to_string();
    cluster_token_cmd(&cluster_dir, &["revoke", &rev_id]);
    let e = wattack(revoked).unwrap_err();
    assert!(e.contains("was revoked"), "{e}");
    let w1_id = running()["worker_id"].as_str().unwrap_or_default().to_string();
    let stranger = wattack(first).unwrap();
    assert!(!w1_id.is_empty() && stranger != w1_id, "a join token took over worker w1 ({w1_id})");

    // the live cluster kept its session and its instance
    let (_, v) = call("GET", "/api/clusters/active", None);
    let me = v.as_array().unwrap().iter().find(|c| c["cluster_id"] == live.as_str()).cloned();
    assert!(me.is_some_and(|c| c["active_nodes"] == 1), "the live cluster is still active: {v}");
    let i = running();
    assert_eq!((i["status"].as_str(), i["cluster_id"].as_str()), (Some("RUNNING"), Some(live.as_str())), "{i}");
    assert_eq!(i["worker_id"].as_str(), Some(w1_id.as_str()), "the instance stayed on w1: {i}");
}
