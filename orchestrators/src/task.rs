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

/// Binds a server's listener; `what` names the flag (`--grpc-addr`) so a failure says which one to fix.
/// `[::]:port` takes IPv6 clients and, where `net.ipv6.bindv6only` is 0 (Linux's default), IPv4 clients
/// too; where it is 1 the listener is IPv6-only, which is said once here.
pub async fn listen(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if addr.is_ipv6() && !std::path::Path::new("/proc/net/if_inet6").exists() {
            " (IPv6 is disabled on this host: listen on an IPv4 address such as 0.0.0.0)"
        } else {
            ""
        };
        anyhow::anyhow!("binding {what} {addr}: {e}{hint}")
    })?;
    if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && v6_only() {
        tracing::warn!(
            "{what} {addr} takes IPv6 clients only: net.ipv6.bindv6only is 1 on this host, so IPv4 clients \
             cannot connect; set it to 0 (sysctl -w net.ipv6.bindv6only=0) for both, or listen on 0.0.0.0 for IPv4"
        );
    }
    Ok(l)
}

/// Whether a socket bound to `[::]` is IPv6-only on this host.
fn v6_only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1")
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
