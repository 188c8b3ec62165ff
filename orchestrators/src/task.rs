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

/// A gRPC server of an authority: TLS with its certificate (callers present theirs) and its Enrollment
/// service, where newcomers join with a join token; the port's own services are added to it.
pub fn trusted<R: oak_trust::Registrar>(
    authority: &std::sync::Arc<oak_trust::Authority>,
    registrar: std::sync::Arc<R>,
) -> anyhow::Result<tonic::transport::server::Router> {
    let server = tonic::transport::Server::builder();
    // (without TLS only to measure what it costs: `oak_trust::PLAINTEXT_ENV`)
    let mut server = if oak_trust::plaintext() { server } else { server.tls_config(authority.server_tls())? };
    Ok(server.add_service(oak_trust::Enrollment::server(authority.clone(), registrar)))
}

/// Resolves at SIGINT or SIGTERM (logged), for a daemon's graceful stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
