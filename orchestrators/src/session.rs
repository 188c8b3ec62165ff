//! The registration stream both tiers serve (clusters dial the root, workers dial their cluster): the
//! first message must be a hello; a refused hello gets one rejection message and the stream ends; an
//! accepted one is read until the peer hangs up, the stream fails, the handler ends it or the process
//! stops. Each tier says what its messages mean by implementing [`Tier`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The sending half of a session: what the tier keeps to talk to the peer.
pub type Outbox<T> = mpsc::UnboundedSender<Result<T, Status>>;
/// The answer stream of a session.
pub type Answer<T> = UnboundedReceiverStream<Result<T, Status>>;

/// One side of a registration stream.
pub trait Tier: Send + Sync + 'static {
    /// What the peer sends.
    type In: Send + 'static;
    /// What the tier answers.
    type Out: Send + 'static;
    type Hello;
    /// The peer's name in logs: "worker" or "cluster".
    const PEER: &'static str;
    /// The first message's type name, for the error when it is something else.
    const HELLO: &'static str;

    /// The hello inside a first message, if it is one.
    fn hello(first: Self::In) -> Option<Self::Hello>;
    /// The message that tells a peer its registration was refused.
    fn rejected(reason: String) -> Self::Out;
    /// Registers the peer: its id and this connection's number, or why it is refused.
    /// `identity` is what the peer's client certificate names (None without one).
    fn accept(
        &self,
        hello: Self::Hello,
        identity: Option<oak_trust::PeerId>,
        peer: Option<SocketAddr>,
        tx: Outbox<Self::Out>,
    ) -> anyhow::Result<(String, u64)>;
    /// Handles one later message; `false` ends the session.
    fn on_message(&self, id: &str, msg: Self::In) -> bool;
    /// The session's connection `conn` ended.
    fn on_disconnect(&self, id: &str, conn: u64);
    /// Becomes true when the process shuts down.
    fn stopping(&self) -> watch::Receiver<bool>;
}

/// Serves one registration stream for `tier`.
pub async fn serve<T: Tier>(tier: Arc<T>, req: Request<Streaming<T::In>>) -> Result<Response<Answer<T::Out>>, Status> {
    let peer = req.remote_addr();
    let identity = oak_trust::peer_id(&req);
    let mut inbound = req.into_inner();
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument(format!("stream closed before {}", T::HELLO)))?;
    let Some(hello) = T::hello(first) else {
        return Err(Status::invalid_argument(format!("the first message must be a {}", T::HELLO)));
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let (id, conn) = match tier.accept(hello, identity, peer, tx.clone()) {
        Ok(v) => v,
        Err(e) => {
            let peer = peer.map(|p| oak_proto::endpoint::observed(p.ip()).to_string()).unwrap_or_default();
            tracing::warn!(%peer, "rejecting {} registration: {e:#}", T::PEER);
            let _ = tx.send(Ok(T::rejected(format!("{e:#}"))));
            return Ok(Response::new(UnboundedReceiverStream::new(rx)));
        }
    };
    drop(tx); // the tier holds the session's sender; dropping it there ends the stream
    let mut stopping = tier.stopping();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = stopping.wait_for(|v| *v) => break,
            };
            match next {
                Ok(Some(m)) => {
                    if !tier.on_message(&id, m) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(peer_id = %id, "{} stream error: {e}", T::PEER);
                    break;
                }
            }
        }
        tier.on_disconnect(&id, conn);
    });
    Ok(Response::new(UnboundedReceiverStream::new(rx)))
}
