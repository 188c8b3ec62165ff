//! Task and server helpers.

/// Aborts the task when dropped, so a helper task never outlives the future that started it (also when
/// that future is itself aborted).
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves a gRPC router on a bound listener until the process ends (tests bind port 0 first).
pub async fn serve_grpc(
    what: &str,
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "{what} listening");
    router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await?;
    Ok(())
}
