//! In-process control plane: a real root (API + registry + service manager) and a real cluster
//! orchestrator on port-0 listeners, workers speaking the real protocol over real sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oak_proto::v1 as pb;
use oak_proto::InstanceState;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Cluster, Config};
use crate::simworker::SimWorker;

use crate::root::tests::{start as start_root, Harness as RootH};

/// The worker join token of the test clusters.
pub(crate) const WORKER_TOKEN: &str = "testwork.testworkerjoinsecret0123456789";

/// A NodeEngine (or `kind`) of the cluster at `url`, joined with `token` (its certificate in memory).
fn worker_member(url: &str, kind: &'static str, name: &str, token: &str) -> oak_trust::Member {
    oak_trust::Member::in_memory(url, oak_trust::CLUSTER_SERVER, kind, name, token)
}

struct ClusterH {
    cluster: Arc<Cluster>,
    workers_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ClusterH {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("cluster stops").unwrap().unwrap();
    }
}

async fn start_cluster(dir: &std::path::Path, root: &RootH, name: &str, stale: Duration) -> ClusterH {
    start_cluster_with(dir, root, name, stale, Duration::from_secs(3600)).await
}

async fn start_cluster_with(
    dir: &std::path::Path,
    root: &RootH,
    name: &str,
    stale: Duration,
    remove_after: Duration,
) -> ClusterH {
    let workers_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let net_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = Config {
        cluster_name: name.into(),
        cluster_location: "48.1,11.6,1000".into(),
        root: super::RootReplicas::one(&root.grpc, &root.net),
        worker_addr: workers_l.local_addr().unwrap(),
        netsvc_addr: net_l.local_addr().unwrap(),
        data_dir: dir.to_path_buf(),
        heartbeat_interval: Duration::from_millis(100),
        worker_stale: stale,
        worker_remove_after: remove_after,
        redeploy_after: Duration::from_millis(300),
        token: crate::root::tests::JOIN_TOKEN.into(),
        worker_token: WORKER_TOKEN.into(),
    };
    // a stopped cluster's tasks may still hold its store for a moment
    let deadline = Instant::now() + Duration::from_secs(10);
    let cluster = loop {
        match Cluster::open(cfg.clone()) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot open the cluster: {e:#}"),
        }
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(super::serve(cluster.clone(), workers_l, net_l, async move {
        let _ = rx.await;
    }));
    ClusterH { cluster, workers_url: format!("http://{}", cfg.worker_addr), stop: Some(stop), task }
}

fn sim(url: &str, name: &str, cores: u32, mem: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        SimWorker {
            cluster_url: url.into(),
            name: name.into(),
            cpu_cores: cores,
            memory_mb: mem,
            arch: "amd64".into(),
            virtualization: vec!["container".into()],
            start_delay: Duration::from_millis(20),
            token: WORKER_TOKEN.into(),
        }
        .run(),
    )
}

async fn poll<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn sla(name: &str, memory: u64, vcpus: f64) -> Value {
    json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":name,
      "application_namespace":"test","application_desc":"","microservices":[
        {"microserviceID":"","microservice_name":"web","microservice_namespace":"test","virtualization":"container",
         "code":"docker.io/library/nginx:latest","memory":memory,"vcpus":vcpus}]}]})
}

/// Creates an application with one service and deploys one instance; returns the service id.
async fn deploy(root: &RootH, name: &str, memory: u64, vcpus: f64) -> String {
    let (c, v) = root.req(reqwest::Method::POST, "/api/application", Some(sla(name, memory, vcpus))).await;
    assert_eq!(c, 200, "{v}");
    let app = v.as_array().unwrap().iter().find(|a| a["application_name"] == name).unwrap().clone();
    let sid = app["microservices"][0].as_str().unwrap().to_string();
    let (c, v) = root.req(reqwest::Method::POST, &format!("/api/service/{sid}/instance"), None).await;
    assert_eq!(c, 200, "{v}");
    sid
}

async fn instance0(root: &RootH, sid: &str) -> Value {
    root.get(&format!("/api/service/{sid}")).await["instance_list"][0].clone()
}

async fn active_nodes(root: &RootH) -> u64 {
    let v = root.get("/api/clusters/active").await;
    v.as_array().and_then(|a| a.first()).and_then(|c| c["active_nodes"].as_u64()).unwrap_or(0)
}

#[tokio::test]
async fn register_schedule_run_and_report_no_resources() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-a", Duration::from_secs(30)).await;
    let w1 = sim(&cl.workers_url, "small", 1, 512);
    let w2 = sim(&cl.workers_url, "big", 4, 4096);
    poll("two active workers in the root's view", || async { active_nodes(&root).await == 2 }).await;
    let c = &root.get("/api/clusters/active").await[0];
    assert_eq!(c["cluster_name"], "edge-a");
    assert_eq!(c["cluster_location"], "48.1,11.6,1000");
    assert_eq!(c["total_cpu_cores"], 5);
    assert_eq!(c["memory_in_mb"], 4608);

    // needs 2 cores and 1 GB: only "big" fits
    let sid = deploy(&root, "fits", 1024, 2.0).await;
    poll("instance RUNNING", || async { instance0(&root, &sid).await["status"] == "RUNNING" }).await;
    let i = instance0(&root, &sid).await;
    assert_eq!(i["node_name"], "big", "{i}");
    assert_eq!(i["cluster_name"], "edge-a");
    assert_eq!(cl.cluster.instance(&sid, 0).unwrap().node_name, "big");
    // the service got overlay service IPs from the root's service manager
    let svc = root.get(&format!("/api/service/{sid}")).await;
    assert!(svc["addresses"]["rr_ip"].as_str().unwrap().starts_with("10.30."), "{svc}");

    // fits nowhere: 3 cores requested, no worker has them -> root status vocabulary + guide's name
    let sid2 = deploy(&root, "toobig", 100, 3.5).await;
    poll("unplaceable instance reported", || async {
        let i = instance0(&root, &sid2).await;
        i["status"] == "NoActiveClusterWithCapacity"
            && i["status_detail"].as_str().unwrap_or("").contains("NoResourcesAvailable")
    })
    .await;
    // the cluster forgot it (the root owns retries)
    assert!(cl.cluster.instance(&sid2, 0).is_none());

    // undeploy reaches the worker and comes back
    let (c, _) = root.req(reqwest::Method::DELETE, &format!("/api/service/{sid}/instance/0"), None).await;
    assert_eq!(c, 200);
    poll("instance removed after undeploy", || async {
        root.get(&format!("/api/service/{sid}")).await["instance_list"].as_array().is_some_and(|l| l.is_empty())
    })
    .await;
    assert!(cl.cluster.instance(&sid, 0).is_none());
    w1.abort();
    w2.abort();
    cl.stop().await;
    root.stop().await;
}

/// A worker that registers and reports, then goes silent while keeping its connection open.
async fn silent_worker(
    url: &str,
    name: &str,
) -> (mpsc::UnboundedSender<pb::WorkerMessage>, tonic::Streaming<pb::ClusterToWorker>) {
    let (ch, _) = worker_member(url, "node", name, WORKER_TOKEN).channel(url, |e| e).await.unwrap();
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(ch);
    let (tx, rx) = mpsc::unbounded_channel();
    let res = pb::NodeResources {
        cpu_cores: 8,
        memory_total_mb: 8192,
        memory_free_mb: 8192,
        arch: "amd64".into(),
        virtualization: vec!["container".into()],
        ..Default::default()
    };
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::WorkerHello {
            node_name: name.into(),
            resources: Some(res),
            ..Default::default()
        })),
    })
    .unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let w = inbound.message().await.unwrap().unwrap();
    assert!(matches!(w.msg, Some(pb::cluster_to_worker::Msg::Welcome(_))), "{w:?}");
    (tx, inbound)
}

#[tokio::test]
async fn worker_that_misses_heartbeats_loses_its_instance_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-b", Duration::from_millis(800)).await;
    // the silent worker is the biggest, so it gets the instance first
    let (tx, mut inbound) = silent_worker(&cl.workers_url, "flaky").await;
    poll("flaky registered", || async { active_nodes(&root).await == 1 }).await;
    let sid = deploy(&root, "moving", 256, 1.0).await;
    let d = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.unwrap().unwrap().unwrap();
    let Some(pb::cluster_to_worker::Msg::Deploy(d)) = d.msg else { panic!("expected a deploy, got {d:?}") };
    assert_eq!(d.service.as_ref().unwrap().service_id, sid);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Instance(pb::InstanceStatus {
            service_id: sid.clone(),
            instance_number: d.instance_number,
            status: InstanceState::Running.as_str().into(),
            ..Default::default()
        })),
    })
    .unwrap();
    poll("RUNNING on flaky", || async {
        let i = instance0(&root, &sid).await;
        i["status"] == "RUNNING" && i["node_name"] == "flaky"
    })
    .await;
    // a healthy worker joins; flaky says nothing more (its connection stays open)
    let w = sim(&cl.workers_url, "steady", 2, 2048);
    let t0 = Instant::now();
    poll("instance moved to steady and RUNNING", || async {
        let i = instance0(&root, &sid).await;
        i["status"] == "RUNNING" && i["node_name"] == "steady"
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(700), "moved before the worker was stale");
    let live = cl.cluster.live_workers();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].1, "steady");
    // the report up shows both: flaky lost (with when it last spoke), steady live; the sums count steady alone
    let a = cl.cluster.aggregate();
    let states: Vec<(&str, &str)> = a.workers.iter().map(|w| (w.node_name.as_str(), w.state.as_str())).collect();
    assert_eq!(states, [("flaky", "lost"), ("steady", "live")], "{a:?}");
    let flaky = &a.workers[0];
    assert!(flaky.last_report_ms > 0 && flaky.last_report_ms < a.workers[1].last_report_ms, "{a:?}");
    assert_eq!((a.active_nodes, a.total_cpu_cores), (1, 2), "{a:?}");
    // the detail says why it moved
    let st = cl.cluster.instance(&sid, 0).unwrap();
    assert_eq!(st.node_name, "steady");
    drop(tx);
    w.abort();
    cl.stop().await;
    root.stop().await;
}

async fn next_deploy(inbound: &mut tonic::Streaming<pb::ClusterToWorker>) -> pb::DeployInstance {
    let m = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.unwrap().unwrap().unwrap();
    let Some(pb::cluster_to_worker::Msg::Deploy(d)) = m.msg else { panic!("expected a deploy, got {m:?}") };
    d
}

/// An instance its worker reports FAILED is placed again after the redeploy delay (300 ms here), which
/// doubles when it fails again; the root sees why and when.
#[tokio::test]
async fn a_failed_instance_is_placed_again_after_a_growing_delay() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-r", Duration::from_secs(60)).await;
    let (tx, mut inbound) = silent_worker(&cl.workers_url, "only").await;
    poll("only registered", || async { active_nodes(&root).await == 1 }).await;
    let sid = deploy(&root, "crashing", 256, 1.0).await;
    let report = |n: u32, st: InstanceState, detail: &str| {
        tx.send(pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::Instance(pb::InstanceStatus {
                service_id: sid.clone(),
                instance_number: n,
                status: st.as_str().into(),
                detail: detail.into(),
                ..Default::default()
            })),
        })
        .unwrap()
    };
    let d = next_deploy(&mut inbound).await;
    let mut gaps = Vec::new();
    for _ in 0..2 {
        report(d.instance_number, InstanceState::Failed, "qemu exited (code 137)");
        let t = Instant::now();
        let again = next_deploy(&mut inbound).await;
        gaps.push(t.elapsed());
        assert_eq!(again.instance_number, d.instance_number);
    }
    assert!(gaps[0] >= Duration::from_millis(280), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(580), "the delay doubles: {gaps:?}");
    // the root heard the failure, with when it is placed again, then the new placement
    let st = cl.cluster.instance(&sid, d.instance_number).unwrap();
    assert_eq!(st.status, "NODE_SCHEDULED", "{st:?}");
    assert!(
        st.detail.contains("FAILED on worker 'only' (qemu exited (code 137)") && st.detail.contains("failure 2"),
        "{}",
        st.detail
    );
    report(d.instance_number, InstanceState::Running, "");
    poll("RUNNING again", || async { instance0(&root, &sid).await["status"] == "RUNNING" }).await;
    drop(tx);
    cl.stop().await;
    root.stop().await;
}

#[tokio::test]
async fn cluster_restart_keeps_placements_and_reregisters() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-c", Duration::from_secs(30)).await;
    let w = sim(&cl.workers_url, "w", 2, 2048);
    poll("worker registered", || async { active_nodes(&root).await == 1 }).await;
    let sid = deploy(&root, "keep", 128, 0.5).await;
    poll("RUNNING", || async { instance0(&root, &sid).await["status"] == "RUNNING" }).await;
    let cluster_id = root.get("/api/clusters/active").await[0]["cluster_id"].clone();
    w.abort();
    cl.stop().await;

    // same data dir: same cluster id, the placement is known before the worker is back
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-c", Duration::from_secs(30)).await;
    assert_eq!(cl.cluster.instance(&sid, 0).unwrap().status, "RUNNING");
    let w = sim(&cl.workers_url, "w", 2, 2048);
    poll("cluster active again with its worker", || async { active_nodes(&root).await == 1 }).await;
    let clusters = root.get("/api/clusters/").await;
    assert_eq!(clusters.as_array().unwrap().len(), 1, "re-registration must not create a second cluster: {clusters}");
    assert_eq!(clusters[0]["cluster_id"], cluster_id);
    // the worker (a new simulated process: it lost its instance) gets it deployed again and it runs
    poll("RUNNING again", || async {
        cl.cluster.instance(&sid, 0).is_some_and(|s| s.status == "RUNNING")
            && instance0(&root, &sid).await["status"] == "RUNNING"
    })
    .await;
    w.abort();
    cl.stop().await;
    root.stop().await;
}

#[tokio::test]
async fn a_worker_gone_for_long_is_removed_and_its_subnet_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster_with(
        &dir.path().join("cluster"),
        &root,
        "edge-d",
        Duration::from_millis(500),
        Duration::from_millis(500),
    )
    .await;
    // the network service runs once the cluster has its id
    poll("cluster network service up", || async { cl.cluster.netsvc.get().is_some() }).await;
    let net = cl.cluster.netsvc.get().unwrap().clone();
    let subnet = net.lease_subnet("nm-gone", "gone", "192.0.2.7", 50103, None).await.unwrap();
    let (tx, _inbound) = silent_worker(&cl.workers_url, "gone").await;
    poll("registered", || async { cl.cluster.live_workers().len() == 1 }).await;
    // silent: down after 0.5 s, removed 0.5 s later, lease released
    poll("worker removed", || async { cl.cluster.live_workers().is_empty() && net.subnet_of("gone").is_none() }).await;
    // the same subnet is free again for a new worker
    assert_eq!(net.lease_subnet("nm-new", "newcomer", "192.0.2.8", 50103, None).await.unwrap(), subnet);
    drop(tx);
    cl.stop().await;
    root.stop().await;
}

/// One hello to the cluster's worker registry as `m`: the welcome, or the reason it was refused.
async fn hello_as(m: &oak_trust::Member, name: &str) -> Result<pb::WorkerWelcome, String> {
    let (ch, _) = m.channel(&m.url, |e| e).await.map_err(|e| format!("{e:#}"))?;
    let mut client = pb::worker_registry_client::WorkerRegistryClient::new(ch);
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = pb::WorkerHello { node_name: name.into(), ..Default::default() };
    tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Hello(hello)) }).unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let m = inbound.message().await.unwrap().unwrap().msg;
    drop(tx);
    match m {
        Some(pb::cluster_to_worker::Msg::Welcome(w)) => Ok(w),
        Some(pb::cluster_to_worker::Msg::Rejected(r)) => Err(r.reason),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_worker_is_who_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = start_root(&dir.path().join("root")).await;
    let cl = start_cluster(&dir.path().join("cluster"), &root, "edge-t", Duration::from_secs(30)).await;
    let url = cl.workers_url.as_str();
    // no TLS: no session
    if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await {
        let (tx, rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
        let r = pb::worker_registry_client::WorkerRegistryClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await;
        assert!(r.is_err(), "a plaintext session was answered");
        drop(tx);
    }
    // no token, a wrong token: no certificate, nothing registered
    let e = hello_as(&worker_member(url, "node", "victim", ""), "victim").await.unwrap_err();
    assert!(e.contains("no join token given"), "{e}");
    let e = hello_as(&worker_member(url, "node", "victim", "guess.guess"), "victim").await.unwrap_err();
    assert!(e.contains("not one of this authority's"), "{e}");
    assert!(cl.cluster.live_workers().is_empty());
    // the real worker joins: its node id is the one its certificate names
    let real = worker_member(url, "node", "victim", WORKER_TOKEN);
    let w = hello_as(&real, "victim").await.unwrap();
    assert_eq!(w.node_id, real.credentials().unwrap().unwrap().identity.id);
    // a stranger with the join token and the same name is another worker, never the victim
    let other = hello_as(&worker_member(url, "node", "victim", WORKER_TOKEN), "victim").await.unwrap();
    assert_ne!(other.node_id, w.node_id, "a worker of the same name is another worker");
    // a NetManager's certificate does not open a worker session
    let e = hello_as(&worker_member(url, "netmanager", "victim", WORKER_TOKEN), "victim").await.unwrap_err();
    assert!(e.contains("is not a worker's NodeEngine"), "{e}");
    // the real worker comes back under its id
    let back = hello_as(&real, "victim").await.unwrap();
    assert_eq!(back.node_id, w.node_id);
    cl.stop().await;
    root.stop().await;
}
