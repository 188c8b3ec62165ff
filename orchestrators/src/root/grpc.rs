//! ClusterRegistry gRPC service: one long-lived session per cluster; the stream handling is the shared
//! [`crate::session`], this file says what a cluster's messages mean.

use std::net::SocketAddr;
use std::sync::Arc;

use oak_proto::v1 as pb;
use pb::cluster_message::Msg;
use tonic::{Request, Response, Status, Streaming};

use super::Root;
use crate::session::{self, Answer, Outbox, Tier};

pub struct Registry {
    pub root: Arc<Root>,
}

impl Tier for Root {
    type In = pb::ClusterMessage;
    type Out = pb::RootMessage;
    type Hello = pb::ClusterHello;
    const PEER: &'static str = "cluster";
    const HELLO: &'static str = "ClusterHello";

    fn hello(first: pb::ClusterMessage) -> Option<pb::ClusterHello> {
        match first.msg {
            Some(Msg::Hello(h)) => Some(h),
            _ => None,
        }
    }

    fn rejected(reason: String) -> pb::RootMessage {
        pb::RootMessage { msg: Some(pb::root_message::Msg::Rejected(pb::RegistrationRejected { reason })) }
    }

    fn accept(
        &self,
        hello: pb::ClusterHello,
        identity: Option<oak_trust::PeerId>,
        peer: Option<SocketAddr>,
        tx: Outbox<pb::RootMessage>,
    ) -> anyhow::Result<(String, u64)> {
        let cid = match identity {
            Some(p) if p.kind == "cluster" => p.id,
            Some(p) => anyhow::bail!("registration refused: {p} is not a cluster"),
            None => anyhow::bail!(
                "registration refused: no cluster certificate (a cluster joins with the root's join token first)"
            ),
        };
        // an IPv4 cluster of a `[::]` listener is recorded by its IPv4 address
        let address = peer.map(|p| oak_proto::endpoint::observed(p.ip()).to_string()).unwrap_or_default();
        self.on_hello(&cid, &hello, &address, tx)
    }

    fn on_message(&self, cid: &str, m: pb::ClusterMessage) -> bool {
        self.touch(cid);
        let r = match m.msg {
            Some(Msg::Aggregate(a)) => self.on_aggregate(cid, &a),
            Some(Msg::Instance(st)) => self.on_instance_status(cid, &st),
            Some(Msg::Logs(c)) => {
                self.on_logs(cid, c);
                Ok(())
            }
            Some(Msg::Hello(_)) => {
                tracing::warn!(cluster_id = %cid, "duplicate ClusterHello ignored");
                Ok(())
            }
            None => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!(cluster_id = %cid, "handling cluster message: {e:#}");
        }
        true
    }

    fn on_disconnect(&self, cid: &str, conn: u64) {
        Root::on_disconnect(self, cid, conn)
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

#[tonic::async_trait]
impl pb::cluster_registry_server::ClusterRegistry for Registry {
    type SessionStream = Answer<pb::RootMessage>;

    async fn session(
        &self,
        req: Request<Streaming<pb::ClusterMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        session::serve(self.root.clone(), req).await
    }
}
