//! In-process tests: the real API and gRPC server on port-0 listeners with a temp data dir.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oak_proto::v1 as pb;
use oak_proto::InstanceState;
use serde_json::{json, Value};

use super::{Config, Root};

/// The join token of the test roots (clusters of the tests register with it).
pub(crate) const JOIN_TOKEN: &str = "testjoin.testjoinsecret0123456789abcdef";

/// A cluster that joins the root at `url` with `token` (its certificate kept in memory).
pub(crate) fn member(url: &str, token: &str) -> oak_trust::Member {
    oak_trust::Member::in_memory(url, oak_trust::ROOT_SERVER, "cluster", "test", token)
}

/// The ClusterRegistry client of `m` at `url` (joining first if it has not).
pub(crate) async fn registry(
    m: &oak_trust::Member,
    url: &str,
) -> Result<pb::cluster_registry_client::ClusterRegistryClient<tonic::transport::Channel>, String> {
    let (ch, _) = m.channel(url, |e| e).await.map_err(|e| format!("{e:#}"))?;
    Ok(pb::cluster_registry_client::ClusterRegistryClient::new(ch))
}

/// A real root on port-0 listeners (also used by the cluster orchestrator's tests).
pub(crate) struct Harness {
    pub(crate) api: String,
    pub(crate) grpc: String,
    /// The service manager (root network service).
    pub(crate) net: String,
    http: reqwest::Client,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) async fn start(dir: &std::path::Path) -> Harness {
    start_with(dir, None).await
}

/// A real root whose store is on `etcd` (the embedded one under `dir` when None).
pub(crate) async fn start_with(dir: &std::path::Path, etcd: Option<super::store::EtcdConfig>) -> Harness {
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let net_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = Config {
        netsvc_addr: net_l.local_addr().unwrap(),
        api_addr: api_l.local_addr().unwrap(),
        grpc_addr: grpc_l.local_addr().unwrap(),
        data_dir: dir.to_path_buf(),
        etcd: etcd.clone(),
        advertise_api: Some(format!("http://{}", api_l.local_addr().unwrap())),
        leader_lease: Duration::from_secs(2),
        admin_password: Some("s3cret".into()),
        cluster_stale: Duration::from_secs(30),
        retry_interval: Duration::from_secs(3600),
        report_interval_ms: 1000,
        max_blocks_per_cluster: 2,
        tls: None,
        join_token: Some(JOIN_TOKEN.into()),
        trusted_proxies: Vec::new(),
        api_tls_names: vec![],
    };
    let root: Arc<Root> = Root::open(cfg.clone()).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let task = if etcd.is_some() {
        // a replica binds the cluster-facing ports itself once it leads
        drop((grpc_l, net_l));
        tokio::spawn(super::serve_replica(root, api_l, shutdown))
    } else {
        tokio::spawn(super::serve(root, api_l, grpc_l, net_l, shutdown))
    };
    let api = format!("http://{}", cfg.api_addr);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{api}/api/health")).send().await {
            // a replica: once it leads (the only one here)
            let leads = |v: &Value| etcd.is_none() || v["role"] == "leader";
            if r.status() == 200 && r.json::<Value>().await.is_ok_and(|v| leads(&v)) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "root never became healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r: Value = http
        .post(format!("{api}/api/auth/login"))
        .json(&json!({"username":"Admin","password":"s3cret"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Harness {
        api,
        grpc: format!("http://{}", cfg.grpc_addr),
        net: format!("http://{}", cfg.netsvc_addr),
        http,
        token: r["token"].as_str().unwrap().to_string(),
        stop: Some(stop),
        task,
        _dir: None,
    }
}

impl Harness {
    pub(crate) async fn req(&self, m: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.request(m, format!("{}{path}", self.api)).bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }
    pub(crate) async fn get(&self, path: &str) -> Value {
        self.req(reqwest::Method::GET, path, None).await.1
    }
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("graceful stop").unwrap().unwrap();
    }
}

fn sla(name: &str, memory: Value) -> Value {
    json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":name,
      "application_namespace":"test","application_desc":"demo","microservices":[
        {"microserviceID":"","microservice_name":"nginx","microservice_namespace":"test","virtualization":"container",
         "code":"docker.io/library/nginx:latest","memory":memory,"vcpus":1,"port":"80:80"}]}]})
}

async fn poll<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn api_login_crud_errors_and_unplaceable_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    // 401 without / with a bad token, and bad login
    let r = h.http.get(format!("{}/api/applications", h.api)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    let r = h.http.get(format!("{}/api/applications", h.api)).bearer_auth("x.y.z").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .http
        .post(format!("{}/api/auth/login", h.api))
        .json(&json!({"username":"Admin","password":"Admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // create
    let (c, v) = h.req(reqwest::Method::POST, "/api/application", Some(sla("demo", json!(100)))).await;
    assert_eq!(c, 200, "{v}");
    let apps = v.as_array().unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0]["application_name"], "demo");
    let app_id = apps[0]["applicationID"].as_str().unwrap().to_string();
    assert_eq!(app_id.len(), 24);
    let sid = apps[0]["microservices"][0].as_str().unwrap().to_string();

    // duplicate -> 409; malformed -> 400 naming the field; nothing stored
    let (c, _) = h.req(reqwest::Method::POST, "/api/application", Some(sla("demo", json!(100)))).await;
    assert_eq!(c, 409);
    let (c, v) = h.req(reqwest::Method::POST, "/api/application", Some(sla("other", json!(-5)))).await;
    assert_eq!(c, 400);
    assert!(v["message"].as_str().unwrap().contains("applications[0].microservices[0].memory"), "{v}");
    let (_, v) = h.req(reqwest::Method::GET, "/api/applications", None).await;
    assert_eq!(v.as_array().unwrap().len(), 1, "malformed SLA must store nothing: {v}");
    // Oakestra's clients spell some paths with a trailing slash: both reach the same handler
    let (c, v) = h.req(reqwest::Method::POST, "/api/application/", Some(sla("demo", json!(100)))).await;
    assert_eq!(c, 409, "{v}");
    let (c, v) = h.req(reqwest::Method::GET, "/api/applications/", None).await;
    assert_eq!((c, v.as_array().map(Vec::len)), (200, Some(1)), "{v}");
    let (c, v) = h.req(reqwest::Method::GET, "/api/no/such/endpoint", None).await;
    assert_eq!(c, 404, "{v}");
    assert!(v["message"].is_string(), "{v}");

    // reads, 404s
    let (c, v) = h.req(reqwest::Method::GET, &format!("/api/services/{app_id}"), None).await;
    assert_eq!(c, 200);
    assert_eq!(v[0]["microserviceID"], sid.as_str());
    assert_eq!(v[0]["job_name"], "demo.test.nginx.test");
    let (c, _) = h.req(reqwest::Method::GET, "/api/service/000000000000000000000000", None).await;
    assert_eq!(c, 404);
    let (c, _) = h.req(reqwest::Method::GET, "/api/application/000000000000000000000000", None).await;
    assert_eq!(c, 404);

    // deploy with no cluster: 200 with the reason; instance shows it; service status stays in vocabulary
    let (c, v) = h.req(reqwest::Method::POST, &format!("/api/service/{sid}/instance"), None).await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["instance_number"], 0, "{v}");
    assert!(v["message"].as_str().unwrap().contains("not placed yet"), "{v}");
    assert_eq!(v["status"], "NoActiveClusterWithCapacity");
    assert!(v["status_detail"].as_str().unwrap().starts_with("NoTargetCluster: "), "{v}");
    let (_, s) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
    assert_eq!(s["instance_list"][0]["status"], "NoActiveClusterWithCapacity");
    assert_eq!(s["status"], "NoActiveClusterWithCapacity");
    assert!(s["instance_list"][0]["status_detail"].as_str().unwrap().starts_with("NoTargetCluster: "));

    // clusters lists (both spellings)
    for p in ["/api/clusters/", "/api/clusters", "/api/clusters/active"] {
        let (c, v) = h.req(reqwest::Method::GET, p, None).await;
        assert_eq!(c, 200, "{p}");
        assert_eq!(v, json!([]));
    }
    // docs
    let (c, d) = h.req(reqwest::Method::GET, "/api/docs/openapi.json", None).await;
    assert_eq!(c, 200);
    assert!(d["paths"]["/api/application"]["post"].is_object());

    // undeploy unplaced instance: removed at once; delete app removes services
    let (c, _) = h.req(reqwest::Method::DELETE, &format!("/api/service/{sid}/instance/0"), None).await;
    assert_eq!(c, 200);
    let (_, s) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
    assert_eq!(s["instance_list"], json!([]));
    let (c, _) = h.req(reqwest::Method::DELETE, &format!("/api/application/{app_id}"), None).await;
    assert_eq!(c, 200);
    let (c, _) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
    assert_eq!(c, 404);
    h.stop().await;
}

#[tokio::test]
async fn cluster_session_deploy_status_escalation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let (_, v) = h.req(reqwest::Method::POST, "/api/application", Some(sla("web", json!(100)))).await;
    let sid = v[0]["microservices"][0].as_str().unwrap().to_string();

    // a fake cluster
    let agg = pb::ClusterAggregate {
        active_nodes: 1,
        total_cpu_cores: 4,
        max_free_cpu_cores: 4.0,
        max_free_memory_mb: 4096,
        memory_in_mb: 4096,
        free_memory_in_mb: 4096,
        virtualization: vec!["container".into()],
        arch: vec!["amd64".into()],
        workers: vec![pb::WorkerSummary {
            node_id: "n1".into(),
            node_name: "w1".into(),
            address: "10.0.0.5".into(),
            resources: Some(pb::NodeResources {
                cpu_cores: 4,
                arch: "x86_64".into(),
                network: Some(pb::WorkerNetwork {
                    datapath: "ebpf".into(),
                    subnet: "10.18.0.0/26".into(),
                    tunnel_endpoint: "10.0.0.5:50103".into(),
                    counters: [("tun.tunnel_tx".to_string(), 7)].into_iter().collect(),
                    coordinate: Some(pb::NetCoordinate { position: vec![250.0, -12.5], height: 30.0, error: 0.1 }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let hello = || pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Hello(pb::ClusterHello {
            cluster_name: "c1".into(),
            cluster_location: "48.1,11.5,1000".into(),
            aggregate: Some(agg.clone()),
            ..Default::default()
        })),
    };
    let c1 = member(&h.grpc, JOIN_TOKEN);
    let mut client = registry(&c1, &h.grpc).await.unwrap();
    let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
    ctx.send(hello()).unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(crx)).await.unwrap().into_inner();
    let Some(pb::root_message::Msg::Welcome(w)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no welcome")
    };
    assert_eq!(w.cluster_id.len(), 24);
    let (_, cl) = h.req(reqwest::Method::GET, "/api/clusters/active", None).await;
    assert_eq!(cl[0]["cluster_name"], "c1");
    assert_eq!(cl[0]["cluster_location"], "48.1,11.5,1000");
    assert_eq!(cl[0]["active"], true);
    // its workers as it reported them, by name or id; an unknown cluster is 404
    for key in ["c1", w.cluster_id.as_str()] {
        let (c, ws) = h.req(reqwest::Method::GET, &format!("/api/cluster/{key}/workers"), None).await;
        assert_eq!(c, 200, "{ws}");
        assert_eq!((ws[0]["node_name"].as_str(), ws[0]["arch"].as_str()), (Some("w1"), Some("amd64")), "{ws}");
        assert_eq!(ws[0]["network"]["datapath"], "ebpf", "{ws}");
        assert_eq!(ws[0]["network"]["counters"]["tun.tunnel_tx"], 7, "{ws}");
        let coord = &ws[0]["network"]["coordinate"];
        assert_eq!((coord["position"][0].as_f64(), coord["error"].as_f64()), (Some(250.0), Some(0.1)), "{ws}");
    }
    let (c, v) = h.req(reqwest::Method::GET, "/api/cluster/nosuch/workers", None).await;
    assert_eq!(c, 404, "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("cluster nosuch"), "{v}");
    // a later report replaces the list
    ctx.send(pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Aggregate(pb::ClusterAggregate { workers: vec![], ..agg.clone() })),
    })
    .unwrap();
    poll("no workers reported", || async {
        h.req(reqwest::Method::GET, "/api/cluster/c1/workers", None).await.1 == json!([])
    })
    .await;

    // deploy -> Deploy on the session
    let (_, v) = h.req(reqwest::Method::POST, &format!("/api/service/{sid}/instance"), None).await;
    assert_eq!(v["status"], "CLUSTER_SCHEDULED", "{v}");
    let Some(pb::root_message::Msg::Deploy(d)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no deploy")
    };
    assert_eq!(d.instance_number, 0);
    assert_eq!(d.service.as_ref().unwrap().job_name, "web.test.nginx.test");
    let status = |s: InstanceState, detail: &str| pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Instance(pb::InstanceStatus {
            service_id: sid.clone(),
            instance_number: 0,
            status: s.as_str().into(),
            detail: detail.into(),
            node_id: "n1".into(),
            node_name: "w1".into(),
            public_ip: "10.0.0.5".into(),
            ..Default::default()
        })),
    };
    ctx.send(status(InstanceState::Running, "")).unwrap();
    poll("RUNNING", || async {
        let (_, s) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
        s["status"] == "RUNNING" && s["instance_list"][0]["publicip"] == "10.0.0.5"
    })
    .await;

    // logs: the root asks the cluster holding the instance and answers with what the cluster sends back
    let logs_path = format!("/api/service/{sid}/instance/0/logs?offset=2&max=100");
    let answer = async {
        let Some(pb::root_message::Msg::Logs(r)) = inbound.message().await.unwrap().unwrap().msg else {
            panic!("no logs request")
        };
        assert_eq!((r.service_id.as_str(), r.instance_number, r.offset, r.max_bytes), (sid.as_str(), 0, 2, 100));
        let chunk = pb::LogsChunk {
            request_id: r.request_id,
            offset: 2,
            size: 9,
            data: b"llo web".to_vec(),
            error: String::new(),
        };
        ctx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Logs(chunk)) }).unwrap();
    };
    let ((c, v), ()) = tokio::join!(h.req(reqwest::Method::GET, &logs_path, None), answer);
    assert_eq!(c, 200, "{v}");
    assert_eq!(
        (v["text"].as_str(), v["offset"].as_u64(), v["next_offset"].as_u64()),
        (Some("llo web"), Some(2), Some(9)),
        "{v}"
    );
    // the cluster's error comes back as 503 naming it; an unknown instance is 404
    let answer = async {
        let Some(pb::root_message::Msg::Logs(r)) = inbound.message().await.unwrap().unwrap().msg else {
            panic!("no logs request")
        };
        let chunk = pb::LogsChunk {
            request_id: r.request_id,
            error: "the worker of instance x is not connected".into(),
            ..Default::default()
        };
        ctx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Logs(chunk)) }).unwrap();
    };
    let tail_path = format!("/api/service/{sid}/instance/0/logs");
    let ((c, v), ()) = tokio::join!(h.req(reqwest::Method::GET, &tail_path, None), answer);
    assert_eq!(c, 503, "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("not connected"), "{v}");
    let (c, _) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}/instance/7/logs"), None).await;
    assert_eq!(c, 404);

    // status for an unknown instance -> root tells the cluster to undeploy it
    ctx.send(pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Instance(pb::InstanceStatus {
            service_id: "ffffffffffffffffffffffff".into(),
            instance_number: 3,
            status: InstanceState::Running.as_str().into(),
            ..Default::default()
        })),
    })
    .unwrap();
    let Some(pb::root_message::Msg::Undeploy(u)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no undeploy")
    };
    assert_eq!((u.service_id.as_str(), u.instance_number), ("ffffffffffffffffffffffff", 3));

    // the only cluster says no capacity -> escalated to NoActiveClusterWithCapacity / NoResourcesAvailable
    ctx.send(status(InstanceState::NoWorkerCapacity, "NoResourcesAvailable: asked 1 cpu, best worker had 0.5"))
        .unwrap();
    poll("escalation", || async {
        let (_, s) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
        let i = &s["instance_list"][0];
        i["status"] == "NoActiveClusterWithCapacity"
            && i["status_detail"].as_str().unwrap_or("").starts_with("NoResourcesAvailable: ")
            && i["status_detail"].as_str().unwrap_or("").contains("best worker had 0.5")
    })
    .await;
    drop(ctx);
    drop(inbound);
    let cid = w.cluster_id.clone();
    h.stop().await;

    // restart on the same dir: everything is still there, and the cluster keeps its id on reconnect
    let h = start(dir.path()).await;
    let (c, s) = h.req(reqwest::Method::GET, &format!("/api/service/{sid}"), None).await;
    assert_eq!(c, 200);
    assert_eq!(s["instance_list"][0]["status"], "NoActiveClusterWithCapacity");
    let (_, cl) = h.req(reqwest::Method::GET, "/api/clusters/", None).await;
    assert_eq!(cl[0]["cluster_id"], cid.as_str());
    assert_eq!(cl[0]["active"], false);
    // an impostor without TLS gets no session; one with the join token becomes another cluster, never c1
    let plain = tonic::transport::Endpoint::from_shared(h.grpc.clone()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let (itx, irx) = tokio::sync::mpsc::unbounded_channel();
        itx.send(hello()).unwrap();
        let r = pb::cluster_registry_client::ClusterRegistryClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(irx))
            .await;
        assert!(r.is_err(), "a plaintext session was answered");
    }
    let impostor = member(&h.grpc, JOIN_TOKEN);
    let (itx, irx) = tokio::sync::mpsc::unbounded_channel();
    // (with no capacity, so the unplaced instance still waits for c1)
    let bare = pb::ClusterHello { cluster_name: "c1".into(), ..Default::default() };
    itx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Hello(bare)) }).unwrap();
    let mut answer = registry(&impostor, &h.grpc)
        .await
        .unwrap()
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(irx))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::root_message::Msg::Welcome(wi)) = answer.message().await.unwrap().unwrap().msg else {
        panic!("no welcome")
    };
    assert_ne!(wi.cluster_id, cid, "a join token makes a new cluster, never an existing one");
    drop((itx, answer));
    // the real cluster comes back with its certificate
    let mut client = registry(&c1, &h.grpc).await.unwrap();
    let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
    ctx.send(hello()).unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(crx)).await.unwrap().into_inner();
    let Some(pb::root_message::Msg::Welcome(w2)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no welcome")
    };
    assert_eq!(w2.cluster_id, cid);
    // registration triggers a retry of the unplaced instance -> Deploy again
    let Some(pb::root_message::Msg::Deploy(d)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no redeploy")
    };
    assert_eq!(d.instance_number, 0);
    // graceful stop with the cluster session still open
    h.stop().await;
    drop(ctx);
    drop(inbound);
}

#[test]
fn service_status_uses_oakestra_vocabulary() {
    use super::{service_status, InstanceRecord};
    use InstanceState::*;
    let i = |n: u32, s: InstanceState, d: &str| InstanceRecord { status_detail: d.into(), ..InstanceRecord::new(n, s) };
    assert_eq!(service_status(&[]).0, "UNDEPLOYED");
    let (s, d) = service_status(&[i(0, Failed, "exit 1"), i(1, Running, "")]);
    assert_eq!(s, "RUNNING");
    assert!(d.starts_with("1/2 instances running"), "{d}");
    let (s, d) = service_status(&[i(0, NoActiveClusterWithCapacity, "NoTargetCluster: no cluster is registered")]);
    assert_eq!(s, "NoActiveClusterWithCapacity");
    assert!(d.contains("NoTargetCluster: "), "{d}");
    assert_eq!(service_status(&[i(0, NodeScheduled, ""), i(1, ClusterScheduled, "")]).0, "NODE_SCHEDULED");
}

impl Harness {
    /// A request with another user's token (`None`: no token at all).
    async fn req_as(&self, token: Option<&str>, m: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.request(m, format!("{}{path}", self.api));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    async fn login_as(&self, user: &str, password: &str) -> (u16, Value) {
        let body = json!({"username": user, "password": password});
        self.req_as(None, reqwest::Method::POST, "/api/auth/login", Some(body)).await
    }
}

fn with_service(mut sla: Value, field: &str, value: Value) -> Value {
    sla["applications"][0]["microservices"][0][field] = value;
    sla
}

#[tokio::test]
async fn users_see_only_their_own_and_need_admin_for_privileges() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    // the cluster lists are not public
    let (c, v) = h.req_as(None, Method::GET, "/api/clusters", None).await;
    assert_eq!(c, 401, "{v}");

    // Admin registers bob; bob may not register anyone, nor list users
    let reg = json!({"name": "bob", "password": "bobs-pw"});
    let (c, v) = h.req(Method::POST, "/api/auth/register", Some(reg.clone())).await;
    assert_eq!((c, &v["roles"]), (200, &json!(["Application_Provider"])), "{v}");
    let (c, _) = h.req(Method::POST, "/api/auth/register", Some(reg)).await;
    assert_eq!(c, 409);
    let (c, v) = h
        .req(Method::POST, "/api/auth/register", Some(json!({"name": "eve", "password": "x", "roles": ["root"]})))
        .await;
    assert_eq!((c, v["field"].as_str()), (400, Some("roles")), "{v}");
    let (c, v) = h.login_as("bob", "bobs-pw").await;
    assert_eq!(c, 200, "{v}");
    let bob = v["token"].as_str().unwrap().to_string();
    let bob_refresh = v["refresh_token"].as_str().unwrap().to_string();
    let (c, v) =
        h.req_as(Some(&bob), Method::POST, "/api/auth/register", Some(json!({"name": "eve", "password": "pw"}))).await;
    assert_eq!(c, 403, "{v}");
    assert!(v["message"].as_str().unwrap().contains("Admin role"), "{v}");
    let (c, _) = h.req_as(Some(&bob), Method::GET, "/api/users", None).await;
    assert_eq!(c, 403);
    let (c, v) = h.req_as(Some(&bob), Method::GET, "/api/cluster/any/workers", None).await;
    assert_eq!(c, 403, "worker details (node addresses) are for the Admin: {v}");
    let (c, v) = h.req_as(Some(&bob), Method::GET, "/api/user/bob", None).await;
    assert_eq!((c, v["name"].as_str()), (200, Some("bob")), "{v}");
    assert!(v.get("password_hash").is_none(), "a user document never shows the hash: {v}");
    let (c, _) = h.req_as(Some(&bob), Method::GET, "/api/user/Admin", None).await;
    assert_eq!(c, 403);

    // Admin's application is invisible to bob
    let (c, v) = h.req(Method::POST, "/api/application", Some(sla("adminapp", json!(100)))).await;
    assert_eq!(c, 200, "{v}");
    let admin_app = v[0]["applicationID"].as_str().unwrap().to_string();
    let (c, v) = h.req_as(Some(&bob), Method::GET, "/api/applications", None).await;
    assert_eq!((c, v), (200, json!([])));
    let (c, _) = h.req_as(Some(&bob), Method::GET, &format!("/api/application/{admin_app}"), None).await;
    assert_eq!(c, 404);
    let (c, _) = h.req_as(Some(&bob), Method::DELETE, &format!("/api/application/{admin_app}"), None).await;
    assert_eq!(c, 404);

    // privileged and host ports below 1024 need the Admin role; nothing is stored when refused
    let privileged = with_service(sla("bobapp", json!(100)), "privileged", json!(true));
    let (c, v) = h.req_as(Some(&bob), Method::POST, "/api/application", Some(privileged.clone())).await;
    assert_eq!(c, 403, "{v}");
    assert_eq!(v["field"], "applications[0].microservices[0].privileged", "{v}");
    let low_port = with_service(sla("bobapp", json!(100)), "port", json!("8080:80;443:443"));
    let (c, v) = h.req_as(Some(&bob), Method::POST, "/api/application", Some(low_port)).await;
    assert_eq!((c, v["field"].as_str()), (403, Some("applications[0].microservices[0].port")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("host port 443"), "{v}");
    let (_, v) = h.req_as(Some(&bob), Method::GET, "/api/applications", None).await;
    assert_eq!(v, json!([]), "a refused SLA stores nothing");
    let high_port = with_service(sla("bobapp", json!(100)), "port", json!("8080:80"));
    let (c, v) = h.req_as(Some(&bob), Method::POST, "/api/application", Some(high_port)).await;
    assert_eq!(c, 200, "{v}");
    let (c, _) = h
        .req(
            Method::POST,
            "/api/application",
            Some(with_service(sla("adminpriv", json!(100)), "privileged", json!(true))),
        )
        .await;
    assert_eq!(c, 200, "the Admin may ask for a privileged instance");
    let v = h.get("/api/applications").await;
    assert_eq!(v.as_array().unwrap().len(), 3, "the Admin sees everyone's applications: {v}");

    // refresh rotates: a refresh token works once; logout revokes the access token
    let body = json!({"refresh_token": bob_refresh});
    let (c, v) = h.req_as(None, Method::POST, "/api/auth/refresh", Some(body.clone())).await;
    assert_eq!(c, 200, "{v}");
    let bob2 = v["token"].as_str().unwrap().to_string();
    let (c, v) = h.req_as(None, Method::POST, "/api/auth/refresh", Some(body)).await;
    assert_eq!(c, 401, "a used refresh token is revoked: {v}");
    let (c, _) = h.req_as(Some(&bob), Method::POST, "/api/auth/logout", None).await;
    assert_eq!(c, 200);
    let (c, v) = h.req_as(Some(&bob), Method::GET, "/api/applications", None).await;
    assert_eq!(c, 401, "{v}");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    let (c, _) = h.req_as(Some(&bob2), Method::GET, "/api/applications", None).await;
    assert_eq!(c, 200, "other tokens stay valid");

    // bob changes his password (the old one must be right)
    let change = |old: &str| json!({"oldPassword": old, "newPassword": "bobs-new-pw"});
    let (c, v) = h.req_as(Some(&bob2), Method::POST, "/api/user/bob", Some(change("wrong"))).await;
    assert_eq!((c, v["field"].as_str()), (400, Some("oldPassword")), "{v}");
    let (c, _) = h.req_as(Some(&bob2), Method::POST, "/api/user/bob", Some(change("bobs-pw"))).await;
    assert_eq!(c, 200);
    assert_eq!(h.login_as("bob", "bobs-pw").await.0, 401);
    assert_eq!(h.login_as("bob", "bobs-new-pw").await.0, 200);

    // removing bob removes his applications and ends his tokens
    let (c, _) = h.req_as(Some(&bob2), Method::DELETE, "/api/user/bob", None).await;
    assert_eq!(c, 403);
    let (c, _) = h.req(Method::DELETE, "/api/user/Admin", None).await;
    assert_eq!(c, 400);
    let (c, _) = h.req(Method::DELETE, "/api/user/bob", None).await;
    assert_eq!(c, 200);
    let (c, v) = h.req_as(Some(&bob2), Method::GET, "/api/applications", None).await;
    assert_eq!(c, 401, "{v}");
    let v = h.get("/api/applications").await;
    assert_eq!(v.as_array().unwrap().len(), 2, "bob's application went with him: {v}");
    h.stop().await;
}

#[tokio::test]
async fn login_attempts_are_limited_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    // the harness logged in once already; keep guessing until the source is throttled. What may be
    // answered: the burst, plus what the rate refills while the (slow, Argon2) guesses run.
    use super::auth::{LOGIN_BURST, LOGIN_PER_MINUTE};
    let t0 = Instant::now();
    let allowed = |t0: Instant| LOGIN_BURST as f64 + t0.elapsed().as_secs_f64() * LOGIN_PER_MINUTE as f64 / 60.0 + 1.0;
    let mut answered = 1;
    let throttled = loop {
        let r = h
            .http
            .post(format!("{}/api/auth/login", h.api))
            .json(&json!({"username": "Admin", "password": "guess"}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            401 => answered += 1,
            429 => break r,
            other => panic!("unexpected answer {other}"),
        }
        assert!(answered as f64 <= allowed(t0), "{answered} wrong passwords answered in {:?}", t0.elapsed());
    };
    assert!(answered >= LOGIN_BURST, "the whole burst is answered before throttling ({answered})");
    let retry: u64 = throttled.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let v: Value = throttled.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("too many login attempts from 127.0.0.1"), "{v}");
    // the right password is throttled too: the limit is on attempts, not on failures
    let (c, _) = h.login_as("Admin", "s3cret").await;
    assert_eq!(c, 429);
    h.stop().await;
}

#[tokio::test]
async fn only_registered_clusters_lease_worker_blocks_up_to_their_quota() {
    use oak_proto::net::v1 as net;
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let lease = |cid: String| net::LeaseBlockRequest { cluster_id: cid };
    // without TLS: no answer
    if let Ok(ch) = tonic::transport::Endpoint::from_shared(h.net.clone()).unwrap().connect().await {
        let r = net::root_net_service_client::RootNetServiceClient::new(ch).lease_block(lease(String::new())).await;
        assert!(r.is_err(), "a plaintext lease was answered");
    }
    // a joined cluster leases up to its quota (2 in this harness), then is told why not
    let q1 = member(&h.grpc, JOIN_TOKEN);
    let mut client = registry(&q1, &h.grpc).await.unwrap();
    let (ch, creds) = q1.channel(&h.net, |e| e).await.unwrap();
    let mut sm = net::root_net_service_client::RootNetServiceClient::new(ch);
    let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
    ctx.send(pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Hello(pb::ClusterHello {
            cluster_name: "q1".into(),
            cluster_location: "48.1,11.5,1000".into(),
            ..Default::default()
        })),
    })
    .unwrap();
    let mut inbound =
        client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(crx)).await.unwrap().into_inner();
    let Some(pb::root_message::Msg::Welcome(w)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("no welcome")
    };
    assert_eq!(w.cluster_id, creds.identity.id);
    // it cannot lease for another cluster
    let e = sm.lease_block(lease("000000000000000000000000".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let a = sm.lease_block(lease(w.cluster_id.clone())).await.unwrap().into_inner();
    let b = sm.lease_block(lease(w.cluster_id.clone())).await.unwrap().into_inner();
    assert_ne!(a.block, b.block);
    assert_eq!(b.all_blocks.len(), 2);
    let e = sm.lease_block(lease(w.cluster_id.clone())).await.unwrap_err();
    assert!(e.message().contains("quota") && e.message().contains("--max-blocks-per-cluster 2"), "{}", e.message());
    drop(ctx);
    h.stop().await;
}

/// A root serving its API over HTTPS (`tls` files, or a certificate of its CA for `names`): its API port,
/// the stop signal and the serving task.
async fn https_root(
    data_dir: std::path::PathBuf,
    tls: Option<super::TlsFiles>,
    names: Vec<String>,
) -> (u16, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let net_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = api_l.local_addr().unwrap().port();
    let cfg = Config {
        netsvc_addr: net_l.local_addr().unwrap(),
        api_addr: api_l.local_addr().unwrap(),
        grpc_addr: grpc_l.local_addr().unwrap(),
        data_dir,
        etcd: None,
        advertise_api: None,
        leader_lease: Duration::from_secs(5),
        admin_password: Some("s3cret".into()),
        cluster_stale: Duration::from_secs(30),
        retry_interval: Duration::from_secs(3600),
        report_interval_ms: 1000,
        max_blocks_per_cluster: 2,
        tls,
        join_token: None,
        trusted_proxies: Vec::new(),
        api_tls_names: names,
    };
    let root = Root::open(cfg).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(super::serve(root, api_l, grpc_l, net_l, async move {
        let _ = rx.await;
    }));
    (port, stop, task)
}

#[tokio::test]
async fn the_api_serves_https_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let tls = super::TlsFiles { cert: dir.path().join("api.pem"), key: dir.path().join("api.key") };
    std::fs::write(&tls.cert, ck.cert.pem()).unwrap();
    std::fs::write(&tls.key, ck.key_pair.serialize_pem()).unwrap();
    let (port, stop, task) = https_root(dir.path().join("root"), Some(tls), vec![]).await;
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let https = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trusted.get(format!("{https}/api/health")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "the root never answered over HTTPS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = trusted
        .post(format!("{https}/api/auth/login"))
        .json(&json!({"username": "Admin", "password": "s3cret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap()["token"].is_string());
    // plain HTTP gets no HTTP answer, and a client that does not trust the certificate refuses it
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/api/health")).await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200), "plain HTTP must not be served");
    assert!(reqwest::get(format!("{https}/api/health")).await.is_err(), "an untrusted certificate is refused");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("graceful stop").unwrap().unwrap();
}

#[tokio::test]
async fn the_api_serves_https_with_a_certificate_of_the_roots_ca() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["127.0.0.1".into(), "root.example.org".into()];
    let (port, stop, task) = https_root(dir.path().join("root"), None, names).await;
    // a client that trusts the root's CA (the same CA the join tokens pin) talks HTTPS to it
    let ca = std::fs::read(dir.path().join("root/ca/ca.pem")).unwrap();
    let trusted =
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap()).build().unwrap();
    let https = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trusted.get(format!("{https}/api/health")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "the root never answered over HTTPS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reqwest::get(format!("{https}/api/health")).await.is_err(), "a client without the CA refuses it");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("root/ca/api.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("graceful stop").unwrap().unwrap();
}

#[tokio::test]
async fn new_clusters_need_a_valid_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let grpc = h.grpc.clone();
    let register = |token: String| {
        let (m, url) = (member(&grpc, &token), grpc.clone());
        async move {
            let mut client = registry(&m, &url).await?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tx.send(pb::ClusterMessage {
                msg: Some(pb::cluster_message::Msg::Hello(pb::ClusterHello {
                    cluster_name: "j1".into(),
                    ..Default::default()
                })),
            })
            .unwrap();
            let mut answer =
                client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
            let m = answer.message().await.unwrap().unwrap().msg;
            drop(tx);
            match m {
                Some(pb::root_message::Msg::Welcome(w)) => Ok(w.cluster_id),
                Some(pb::root_message::Msg::Rejected(r)) => Err(r.reason),
                other => panic!("{other:?}"),
            }
        }
    };
    assert!(register(String::new()).await.unwrap_err().contains("no join token given"));
    assert!(register("nosuchid.secret".into()).await.unwrap_err().contains("not one of this authority's"));
    let forged = JOIN_TOKEN.replace("secret", "sekret");
    assert!(register(forged).await.unwrap_err().contains("not one of this authority's"));
    assert_eq!(register(JOIN_TOKEN.into()).await.unwrap().len(), 24);

    // the Admin makes and revokes tokens; the secret is shown once, never listed
    let (c, t) = h.req(reqwest::Method::POST, "/api/join-tokens", Some(json!({"ttl_s": 3600}))).await;
    assert_eq!(c, 200, "{t}");
    let token = t["token"].as_str().unwrap().to_string();
    assert!(register(token.clone()).await.is_ok());
    let (_, list) = h.req(reqwest::Method::GET, "/api/join-tokens", None).await;
    assert!(!list.to_string().contains(&token) && !list.to_string().contains("hash"), "{list}");
    let id = t["id"].as_str().unwrap();
    let (c, _) = h.req(reqwest::Method::DELETE, &format!("/api/join-tokens/{id}"), None).await;
    assert_eq!(c, 200);
    assert!(register(token).await.unwrap_err().contains("revoked"));
    h.stop().await;
}

/// Applications and service IPs live in two stores: what a crash between their writes leaves is put right
/// when the root starts. A service never stored (a crash after its IPs were allocated) gives its addresses
/// back; a stored service whose addresses are missing gets exactly its own again; others keep theirs.
#[test]
fn service_ips_are_reconciled_with_the_stored_services_at_start() {
    use super::records::ServiceRecord;
    use super::store::{Store, SERVICES};
    let dir = tempfile::tempdir().unwrap();
    let (kept, restored, ghost) = {
        let store = Store::open(dir.path()).unwrap();
        let net = super::netsvc::RootNetSvc::open(dir.path()).unwrap();
        let record = |id: &str, job: &str| {
            let (rr, cl) = net.allocate_service_ips(id, job).unwrap();
            let mut r = ServiceRecord { microservice_id: id.into(), job_name: job.into(), ..Default::default() };
            (r.sla.addresses.rr_ip, r.sla.addresses.closest_ip) = (rr.to_string(), cl.to_string());
            store.update(|tx| tx.put(SERVICES, id, &r)).unwrap();
            r
        };
        let kept = record("svc-kept", "app.ns.kept.ns");
        let restored = record("svc-restored", "app.ns.restored.ns");
        // as if the root had died between writes: an allocation never stored, a record whose IPs went
        let ghost = net.allocate_service_ips("svc-ghost", "app.ns.ghost.ns").unwrap();
        net.release_service_ips("svc-restored").unwrap();
        (kept, restored, ghost)
    };
    let store = Store::open(dir.path()).unwrap();
    let net = super::netsvc::RootNetSvc::open(dir.path()).unwrap();
    super::reconcile_service_ips(&store, &net).unwrap();
    // the restored service holds its addresses again: nobody else may have them
    let ip = |v: &str| v.parse::<std::net::Ipv4Addr>().unwrap();
    let (rr, cl) = (ip(&restored.sla.addresses.rr_ip), ip(&restored.sla.addresses.closest_ip));
    let err = net.allocate_service_ips_as("svc-probe", "app.ns.probe.ns", Some(rr), Some(cl)).unwrap_err();
    assert!(err.to_string().contains("(svc-restored)"), "{err}");
    let ips = |r: &ServiceRecord| (r.sla.addresses.rr_ip.clone(), r.sla.addresses.closest_ip.clone());
    let now = |id: &str, job: &str| {
        let (rr, cl) = net.allocate_service_ips(id, job).unwrap();
        (rr.to_string(), cl.to_string())
    };
    assert_eq!(now("svc-kept", "app.ns.kept.ns"), ips(&kept));
    assert_eq!(now("svc-restored", "app.ns.restored.ns"), ips(&restored));
    // the ghost's addresses are free again: another service may ask for exactly them
    let taken = net.allocate_service_ips_as("svc-new", "app.ns.new.ns", Some(ghost.0), Some(ghost.1)).unwrap();
    assert_eq!(taken, ghost);
    // a second start finds nothing to change
    let stored = [kept, restored].map(|r| {
        let ip = |v: &str| v.parse().ok();
        (r.microservice_id.clone(), r.job_name.clone(), ip(&r.sla.addresses.rr_ip), ip(&r.sla.addresses.closest_ip))
    });
    let extra = ("svc-new".to_string(), "app.ns.new.ns".to_string(), Some(ghost.0), Some(ghost.1));
    let all = [stored[0].clone(), stored[1].clone(), extra];
    assert_eq!(net.reconcile_services(&all).unwrap(), (vec![], vec![]));
}

/// A root on etcd keeps everything it stores there: a second root with a fresh data dir (only the join
/// token given again) finds the Admin, the application and its service's addresses, and neither root
/// made an embedded store.
#[tokio::test]
async fn a_root_on_etcd_keeps_its_state_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = crate::testing::etcd::Etcd::start(dir.path()) else { return };
    let cfg = super::store::EtcdConfig::new(vec![etcd.endpoint.clone()]);
    let h = start_with(&dir.path().join("first"), Some(cfg.clone())).await;
    let (c, v) = h.req(reqwest::Method::POST, "/api/application", Some(sla("kept", json!(100)))).await;
    assert_eq!(c, 200, "{v}");
    let app_id = v[0]["applicationID"].as_str().unwrap().to_string();
    let (_, services) = h.req(reqwest::Method::GET, &format!("/api/services/{app_id}"), None).await;
    let rr_ip = services[0]["addresses"]["rr_ip"].as_str().unwrap().to_string();
    h.stop().await;

    let h = start_with(&dir.path().join("second"), Some(cfg.clone())).await;
    let (c, apps) = h.req(reqwest::Method::GET, "/api/applications", None).await;
    assert_eq!(c, 200, "{apps}");
    let apps = apps.as_array().unwrap();
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert_eq!(apps[0]["applicationID"], app_id.as_str());
    let (_, services) = h.req(reqwest::Method::GET, &format!("/api/services/{app_id}"), None).await;
    assert_eq!(services[0]["addresses"]["rr_ip"], rr_ip.as_str());
    h.stop().await;
    // the address plan is in etcd too, holding the service's address
    let store = super::store::Store::open_etcd(&cfg).unwrap();
    let plan: Value = store.get(super::store::NET, super::store::NET_STATE).unwrap().expect("the plan in etcd");
    assert!(plan.to_string().contains(&rr_ip), "{plan}");
    for d in ["first", "second"] {
        for f in ["root.redb", "net.redb"] {
            assert!(!dir.path().join(d).join(f).exists(), "{d}/{f} made beside an etcd store");
        }
    }
}
