//! WorkerRegistry gRPC service: one long-lived session per worker (the worker dials in); the stream
//! handling is the shared [`crate::session`], this file says what a worker's messages mean.

use std::net::SocketAddr;
use std::sync::Arc;

use oak_proto::v1 as pb;
use pb::worker_message::Msg;
use tonic::{Request, Response, Status, Streaming};

use super::Cluster;
use crate::session::{self, Answer, Outbox, Tier};

pub struct Registry {
    pub cluster: Arc<Cluster>,
}

impl Tier for Cluster {
    type In = pb::WorkerMessage;
    type Out = pb::ClusterToWorker;
    type Hello = pb::WorkerHello;
    const PEER: &'static str = "worker";
    const HELLO: &'static str = "WorkerHello";

    fn hello(first: pb::WorkerMessage) -> Option<pb::WorkerHello> {
        match first.msg {
            Some(Msg::Hello(h)) => Some(h),
            _ => None,
        }
    }

    fn rejected(reason: String) -> pb::ClusterToWorker {
        pb::ClusterToWorker { msg: Some(pb::cluster_to_worker::Msg::Rejected(pb::RegistrationRejected { reason })) }
    }

    fn accept(
        &self,
        hello: pb::WorkerHello,
        identity: Option<oak_trust::PeerId>,
        peer: Option<SocketAddr>,
        tx: Outbox<pb::ClusterToWorker>,
    ) -> anyhow::Result<(String, u64)> {
        self.on_worker_hello(&hello, identity, peer, tx)
    }

    fn on_message(&self, node: &str, m: pb::WorkerMessage) -> bool {
        if !self.touch(node) {
            tracing::info!(node_id = %node, "message from a worker marked down; it must register again");
            return false;
        }
        match m.msg {
            Some(Msg::Metrics(r)) => self.on_metrics(node, r),
            Some(Msg::Instance(st)) => self.on_worker_status(node, &st),
            Some(Msg::Logs(c)) => self.on_logs(c),
            Some(Msg::Hello(_)) => tracing::warn!(node_id = %node, "duplicate WorkerHello ignored"),
            None => {}
        }
        true
    }

    fn on_disconnect(&self, node: &str, conn: u64) {
        self.on_worker_disconnect(node, conn)
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

#[tonic::async_trait]
impl pb::worker_registry_server::WorkerRegistry for Registry {
    type SessionStream = Answer<pb::ClusterToWorker>;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        session::serve(self.cluster.clone(), req).await
    }
}

impl oak_trust::Registrar for Cluster {
    fn kinds(&self) -> &'static [&'static str] {
        &["node", "netmanager"]
    }

    /// A new NodeEngine or NetManager: a new id, recorded as a member.
    fn admit(&self, kind: &str, name: &str, _token_id: &str) -> Result<String, Status> {
        let id = crate::root::store::new_id();
        self.store
            .add_member(&format!("{kind}/{id}"), name)
            .map_err(|e| Status::internal(format!("recording the member: {e:#}")))?;
        Ok(id)
    }
}
