//! The worker protocol against a tiny in-test cluster (tonic `WorkerRegistry` server).

mod common;

use std::time::Duration;

use oak_node_engine::runtime::instance_id;
use oak_node_engine::session::{self, SessionConfig};
use oak_proto::v1::{
    cluster_to_worker, worker_message,
    worker_registry_server::{WorkerRegistry, WorkerRegistryServer},
    ClusterToWorker, DeployInstance, UndeployInstance, WorkerMessage, WorkerWelcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

type Down = mpsc::Sender<Result<ClusterToWorker, Status>>;
type Session = (Down, mpsc::UnboundedReceiver<WorkerMessage>, Option<oak_trust::PeerId>);

/// Each session: the sender for messages down to the worker, the worker's messages, and who its
/// certificate names.
struct FakeCluster {
    sessions: mpsc::UnboundedSender<Session>,
}

/// The test cluster's authority admits any NodeEngine under a fixed id.
struct Admit;

impl oak_trust::Registrar for Admit {
    fn kinds(&self) -> &'static [&'static str] {
        &["node"]
    }
    fn admit(&self, _kind: &str, _name: &str, _token: &str) -> Result<String, Status> {
        Ok("node-42".into())
    }
}

#[tonic::async_trait]
impl WorkerRegistry for FakeCluster {
    type SessionStream = ReceiverStream<Result<ClusterToWorker, Status>>;

    async fn session(&self, req: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let (down_tx, down_rx) = mpsc::channel(16);
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let who = oak_trust::peer_id(&req);
        let mut inbound = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if up_tx.send(m).is_err() {
                    break;
                }
            }
        });
        self.sessions.send((down_tx, up_rx, who)).map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(down_rx)))
    }
}

async fn next_msg(rx: &mut mpsc::UnboundedReceiver<WorkerMessage>) -> worker_message::Msg {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("worker message within 60 s")
        .expect("session open")
        .msg
        .expect("message body")
}

/// The worker's next session (within 30 s) and its first message, which must be a Hello.
async fn next_session(
    sessions: &mut mpsc::UnboundedReceiver<Session>,
) -> (Down, mpsc::UnboundedReceiver<WorkerMessage>, oak_proto::v1::WorkerHello) {
    let (down_tx, mut up, who) = tokio::time::timeout(Duration::from_secs(30), sessions.recv()).await.unwrap().unwrap();
    assert_eq!(who, Some(oak_trust::PeerId::new("node", "node-42")), "the session is the joined worker's");
    let worker_message::Msg::Hello(hello) = next_msg(&mut up).await else { panic!("first message is not Hello") };
    (down_tx, up, hello)
}

fn down(msg: cluster_to_worker::Msg) -> Result<ClusterToWorker, Status> {
    Ok(ClusterToWorker { msg: Some(msg) })
}

/// Waits for an instance status of `service_id` in `wanted`, skipping metrics; panics on FAILED.
async fn wait_instance(
    rx: &mut mpsc::UnboundedReceiver<WorkerMessage>,
    service_id: &str,
    wanted: &str,
    seen: &mut Vec<String>,
) -> oak_proto::v1::InstanceStatus {
    loop {
        if let worker_message::Msg::Instance(st) = next_msg(rx).await {
            if st.service_id != service_id {
                continue;
            }
            seen.push(st.status.clone());
            if st.status == wanted {
                return st;
            }
            assert_ne!(st.status, "FAILED", "instance failed: {} / logs {}", st.detail, st.logs);
        }
    }
}

/// A cluster's certificate authority in `dir`.
fn authority(dir: &std::path::Path) -> std::sync::Arc<oak_trust::Authority> {
    std::sync::Arc::new(oak_trust::Authority::open(dir, "test CA", oak_trust::CLUSTER_SERVER).unwrap())
}

/// Serves the fake cluster with the real TLS and joining of a cluster.
fn serve(
    a: std::sync::Arc<oak_trust::Authority>,
    l: tokio::net::TcpListener,
    sessions: mpsc::UnboundedSender<Session>,
) {
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(a.server_tls())
            .unwrap()
            .add_service(oak_trust::Enrollment::server(a.clone(), std::sync::Arc::new(Admit)))
            .add_service(WorkerRegistryServer::new(FakeCluster { sessions }))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
}

/// A worker session with no NetManager, dialling the test's cluster on `port`.
fn session_config(env: &common::Env, port: u16, node_name: &str, token: &str) -> SessionConfig {
    SessionConfig {
        cluster_url: format!("http://127.0.0.1:{port}"),
        node_name: node_name.into(),
        data_dir: env.data_dir(),
        netmanager_port: 0,
        token: token.into(),
        unikernel: false,
        location: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_welcome_metrics_deploy_undeploy_and_reconnect() {
    require_containerd!();
    let env = common::Env::new("session");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sess_tx, mut sess_rx) = mpsc::unbounded_channel();
    let ca_dir = tempfile::tempdir().unwrap();
    let a = authority(ca_dir.path());
    let (token, _) = a.tokens.create(&a.pin(), 0, "test").unwrap();
    serve(a, listener, sess_tx);

    let (rt, events) = env.runtime().await;
    let scfg = session_config(&env, port, "test-worker", &token);
    let worker = tokio::spawn(session::run(scfg, rt.clone(), events));

    // Hello first.
    let (down_tx, mut up, hello) = next_session(&mut sess_rx).await;
    let kept = std::fs::read_to_string(env.data_dir().join("identity/identity")).unwrap();
    assert_eq!(kept, "node/node-42", "the certificate is kept in <data-dir>/identity");
    assert_eq!(hello.node_name, "test-worker");
    assert_eq!(hello.netmanager_port, 0);
    assert!(hello.instances.is_empty());
    assert!(!hello.version.is_empty());
    let res = hello.resources.expect("resources in Hello");
    assert!(res.cpu_cores >= 1 && res.memory_total_mb > 0);
    assert_eq!(res.virtualization, ["container"]);

    down_tx
        .send(down(cluster_to_worker::Msg::Welcome(WorkerWelcome {
            node_id: "node-42".into(),
            cluster_id: "c1".into(),
            cluster_name: "test-cluster".into(),
            heartbeat_interval_ms: 100,
            observed_address: "127.0.0.1".into(),
        })))
        .await
        .unwrap();

    // Metrics flow at the heartbeat interval.
    let t0 = tokio::time::Instant::now();
    for _ in 0..3 {
        let worker_message::Msg::Metrics(m) = next_msg(&mut up).await else { panic!("expected metrics") };
        assert!(m.cpu_cores >= 1);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "3 heartbeats at 100 ms took {:?}", t0.elapsed());
    assert_eq!(std::fs::read_to_string(env.data_dir().join("node_id")).unwrap(), "node-42");

    // Deploy → CREATING … RUNNING.
    let spec = env.spec("svc-sess", &["/bin/sleep", "600"]);
    let id = instance_id(&spec.job_name, 1);
    down_tx
        .send(down(cluster_to_worker::Msg::Deploy(DeployInstance { service: Some(spec.clone()), instance_number: 1 })))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let running = wait_instance(&mut up, "svc-sess", "RUNNING", &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "RUNNING"]);
    assert_eq!(running.node_id, "node-42");
    assert_eq!(running.node_name, "test-worker");
    assert_eq!(running.instance_number, 1);
    assert!(running.timestamp_ms > 0);

    // The cluster drops the stream: the worker reconnects and re-sends Hello with its node id and
    // the running instance.
    drop(down_tx);
    drop(up);
    let (down_tx, mut up, hello) = next_session(&mut sess_rx).await;
    assert_eq!(hello.instances.len(), 1, "{:?}", hello.instances);
    assert_eq!(hello.instances[0].service_id, "svc-sess");
    assert_eq!(hello.instances[0].status, "RUNNING");
    down_tx
        .send(down(cluster_to_worker::Msg::Welcome(WorkerWelcome {
            node_id: "node-42".into(),
            heartbeat_interval_ms: 100,
            ..Default::default()
        })))
        .await
        .unwrap();

    // Undeploy → UNDEPLOYED, nothing left.
    down_tx
        .send(down(cluster_to_worker::Msg::Undeploy(UndeployInstance {
            service_id: "svc-sess".into(),
            instance_number: 1,
        })))
        .await
        .unwrap();
    let st = wait_instance(&mut up, "svc-sess", "UNDEPLOYED", &mut Vec::new()).await;
    assert_eq!(st.node_id, "node-42");
    common::assert_gone(&rt, &id).await;

    worker.abort();
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connection_is_retried() {
    require_containerd!();
    let env = common::Env::new("noclu");
    let (rt, events) = env.runtime().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ca_dir = tempfile::tempdir().unwrap();
    let a = authority(ca_dir.path());
    let (token, _) = a.tokens.create(&a.pin(), 0, "test").unwrap();
    let scfg = session_config(&env, port, "w", &token);
    let worker = tokio::spawn(session::run(scfg, rt.clone(), events));
    // The first attempt meets a peer that hangs up without speaking HTTP/2 …
    let (first, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.unwrap().unwrap();
    drop(first);
    // … then a real cluster appears on the same port: the worker must retry and say Hello.
    let (sess_tx, mut sess_rx) = mpsc::unbounded_channel();
    serve(a, listener, sess_tx);
    let (_down, mut up, _) =
        tokio::time::timeout(Duration::from_secs(30), sess_rx.recv()).await.expect("worker retried").unwrap();
    assert!(matches!(next_msg(&mut up).await, worker_message::Msg::Hello(_)));
    worker.abort();
    env.cleanup(&rt).await;
}
