//! ClusterRegistry gRPC service: one long-lived session per cluster.

use std::sync::Arc;

use oak_proto::v1 as pb;
use pb::cluster_message::Msg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Root;

pub struct Registry {
    pub root: Arc<Root>,
}

#[tonic::async_trait]
impl pb::cluster_registry_server::ClusterRegistry for Registry {
    type SessionStream = UnboundedReceiverStream<Result<pb::RootMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::ClusterMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream closed before ClusterHello"))?;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be a ClusterHello"));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (cid, conn) = match self.root.on_hello(&hello, tx.clone()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(?peer, "rejecting cluster registration: {e:#}");
                let _ = tx.send(Ok(pb::RootMessage {
                    msg: Some(pb::root_message::Msg::Rejected(pb::RegistrationRejected { reason: format!("{e:#}") })),
                }));
                return Ok(Response::new(UnboundedReceiverStream::new(rx)));
            }
        };
        let root = self.root.clone();
        let mut stopping = self.root.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = stopping.wait_for(|v| *v) => break,
                };
                match next {
                    Ok(Some(m)) => {
                        root.touch(&cid);
                        let r = match m.msg {
                            Some(Msg::Aggregate(a)) => root.on_aggregate(&cid, &a),
                            Some(Msg::Instance(st)) => root.on_instance_status(&cid, &st),
                            Some(Msg::Hello(_)) => {
                                tracing::warn!(cluster_id = %cid, "duplicate ClusterHello ignored");
                                Ok(())
                            }
                            None => Ok(()),
                        };
                        if let Err(e) = r {
                            tracing::error!(cluster_id = %cid, "handling cluster message: {e:#}");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(cluster_id = %cid, "cluster stream error: {e}");
                        break;
                    }
                }
            }
            root.on_disconnect(&cid, conn);
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}
