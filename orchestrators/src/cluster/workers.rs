//! WorkerRegistry gRPC service: one long-lived session per worker (the worker dials in).

use std::sync::Arc;

use oak_proto::v1 as pb;
use pb::worker_message::Msg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Cluster;

pub struct Registry {
    pub cluster: Arc<Cluster>,
}

#[tonic::async_trait]
impl pb::worker_registry_server::WorkerRegistry for Registry {
    type SessionStream = UnboundedReceiverStream<Result<pb::ClusterToWorker, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream closed before WorkerHello"))?;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be a WorkerHello"));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (node, conn) = match self.cluster.on_worker_hello(&hello, peer, tx.clone()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(?peer, "rejecting worker registration: {e:#}");
                let _ = tx.send(Ok(pb::ClusterToWorker {
                    msg: Some(pb::cluster_to_worker::Msg::Rejected(pb::RegistrationRejected {
                        reason: format!("{e:#}"),
                    })),
                }));
                return Ok(Response::new(UnboundedReceiverStream::new(rx)));
            }
        };
        drop(tx); // the cluster holds the session's sender; dropping it there ends the stream
        let cluster = self.cluster.clone();
        let mut stopping = self.cluster.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = stopping.wait_for(|v| *v) => break,
                };
                match next {
                    Ok(Some(m)) => {
                        if !cluster.touch(&node) {
                            tracing::info!(node_id = %node, "message from a worker marked down; it must register again");
                            break;
                        }
                        match m.msg {
                            Some(Msg::Metrics(r)) => cluster.on_metrics(&node, r),
                            Some(Msg::Instance(st)) => cluster.on_worker_status(&node, &st),
                            Some(Msg::Hello(_)) => tracing::warn!(node_id = %node, "duplicate WorkerHello ignored"),
                            None => {}
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(node_id = %node, "worker stream error: {e}");
                        break;
                    }
                }
            }
            cluster.on_worker_disconnect(&node, conn);
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}
