//! The cluster's session with the root (ClusterRegistry on port 50052). The cluster dials out, so it
//! works behind NAT; it re-registers whenever the root restarts or the link drops. With several root
//! replicas it tries them in turn: only the leader accepts clusters, so the one that answers is it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oak_proto::v1 as pb;
use pb::root_message::Msg;
use tokio::sync::mpsc;

use super::Cluster;

/// Reconnects forever: at once to the next replica when there are several, then with backoff (0.5 s
/// doubling to 5 s; reset after a session that lasted) once every replica was tried.
pub async fn run(cluster: Arc<Cluster>) {
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0u32;
    let roots = cluster.cfg.root.clone();
    let mut tried = 0;
    loop {
        let started = Instant::now();
        let url = roots.grpc().to_string();
        match session(&cluster, &url).await {
            Ok(()) => tracing::warn!(root = %url, "root session ended; registering again"),
            Err(e) => {
                failures += 1;
                // one clear line first, then quieter retries
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(
                        root = %url,
                        "cannot register with the root orchestrator: {e:#} (check --root-address/SYSTEM_MANAGER_URL and that the root's port 50052 is reachable); retrying"
                    );
                } else {
                    tracing::debug!(root = %url, "root registration failed: {e:#}");
                }
            }
        }
        cluster.set_root_tx(None);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
            tried = 0;
        }
        if roots.len() > 1 {
            roots.advance();
            tried += 1;
            if tried < roots.len() {
                continue;
            }
            tried = 0;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(cluster: &Arc<Cluster>, url: &str) -> Result<()> {
    // joining too goes to the replica tried now (the first one may not lead)
    let (channel, _) = cluster
        .root_member
        .at(url)
        .channel(url, |ep| {
            ep.connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
        .await?;
    let mut client = pb::cluster_registry_client::ClusterRegistryClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel::<pb::ClusterMessage>();
    tx.send(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Hello(cluster.hello())) })
        .expect("receiver alive");
    let mut inbound = client
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    let first = inbound.message().await.context("waiting for the welcome")?.context("root closed the session")?;
    let interval = match first.msg {
        Some(Msg::Welcome(w)) => {
            cluster.on_welcome(&w)?;
            tracing::info!(cluster_id = %w.cluster_id, cluster_name = %cluster.cfg.cluster_name, root = %url, "registered with the root");
            Duration::from_millis(u64::from(w.report_interval_ms).max(100))
        }
        Some(Msg::Rejected(r)) => bail!("the root rejected the registration: {}", r.reason),
        other => bail!("expected a ClusterWelcome, got {other:?}"),
    };
    cluster.set_root_tx(Some(tx.clone()));
    // aggregates: periodically, and soon after capacity changes
    let c = cluster.clone();
    let reporter = crate::task::AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = c.capacity_changed.notified() => {
                    // let a burst of registrations settle into one report
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let m = pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Aggregate(c.aggregate())) };
            if tx.send(m).is_err() {
                break;
            }
        }
    }));
    let r = async {
        while let Some(m) = inbound.message().await.context("root stream")? {
            match m.msg {
                Some(Msg::Deploy(d)) => cluster.on_deploy(d),
                Some(Msg::Undeploy(u)) => cluster.on_undeploy(u),
                Some(Msg::Logs(r)) => cluster.on_logs_request(r),
                Some(Msg::Rejected(r)) => bail!("the root ended the registration: {}", r.reason),
                Some(Msg::Welcome(_)) | None => {}
            }
        }
        Ok(())
    }
    .await;
    drop(reporter);
    r
}
