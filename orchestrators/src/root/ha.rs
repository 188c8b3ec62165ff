//! A replicated root: several root orchestrators on one etcd cluster (`--etcd-endpoints`), one of them the
//! leader at a time, elected with etcd's election API on a lease.
//!
//! * **The leader** runs what must run once: cluster registration (port 50052), the service manager
//!   (10099) and the retry of unplaced instances. Its store commits are fenced on its leadership key
//!   ([`crate::root::store::Fence`]): once another replica leads, a late write of the old leader fails
//!   instead of landing. It binds the cluster-facing ports only while it leads, so a cluster that lists
//!   every replica (`--root-address a,b,c`) registers with whichever answers: the leader.
//! * **Followers** serve the REST API's reads from the store and forward every write (and the reads
//!   that need the leader's sessions: a cluster's live workers, an instance's logs) to the leader's API,
//!   which the election's value names (`--advertise-api`).
//! * **Losing the lease** (etcd unreachable, a partition) ends the term before the lease can have run out
//!   on etcd's side: the cluster-facing servers stop, the sessions end, and the replica campaigns again
//!   as a follower. A leader that shuts down resigns, so a follower takes over at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::store::Fence;
use super::Root;

/// A header a forwarded request carries, so a replica that is not the leader either does not forward it
/// again (a loop while the leadership moves).
const FORWARDED: &str = "x-oak-forwarded-by";
/// The most a forwarded request body may hold.
const MAX_FORWARD_BODY: usize = 64 << 20;

/// The replication settings of a root on etcd.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// The election's name (a key prefix in etcd).
    pub election: String,
    /// This replica's REST API as the other replicas reach it (the election's value).
    pub advertise_api: String,
    /// The leadership lease's time to live: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
}

/// What this replica is now.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Not leading; the leader's API when one is known.
    Follower {
        leader_api: Option<String>,
    },
    Leader,
}

/// A replica's part in the election, shared with the API (which forwards by it).
pub struct Replica {
    pub cfg: HaConfig,
    role: watch::Sender<Role>,
    client: reqwest::Client,
}

impl Replica {
    pub fn new(cfg: HaConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .context("the HTTP client that forwards requests to the leader")?;
        Ok(Self { cfg, role: watch::channel(Role::Follower { leader_api: None }).0, client })
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.role.borrow() == Role::Leader
    }

    fn set(&self, r: Role) {
        self.role.send_if_modified(|cur| {
            let changed = *cur != r;
            *cur = r;
            changed
        });
    }
}

/// This replica's API as the others reach it, when not configured: the address this machine reaches the
/// first etcd endpoint from (the network the replicas share), at the API's port.
pub fn default_advertise(endpoints: &[String], api: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let ip = if api.ip().is_unspecified() {
        endpoints
            .first()
            .and_then(|e| e.rsplit("://").next().map(|hp| hp.trim_end_matches('/').to_string()))
            .and_then(|hp| {
                use std::net::ToSocketAddrs;
                let target = hp.to_socket_addrs().ok()?.next()?;
                let bind: std::net::SocketAddr = if target.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = std::net::UdpSocket::bind(bind).ok()?;
                s.connect(target).ok()?;
                Some(s.local_addr().ok()?.ip())
            })
            .unwrap_or(api.ip())
    } else {
        api.ip()
    };
    format!("{scheme}://{}", std::net::SocketAddr::new(ip, api.port()))
}

/// Whether a request needs the leader: every write, and the reads answered from the leader's memory or
/// files (a cluster's live workers, an instance's logs, which come through the cluster's session; the
/// join tokens, which a follower's CA directory has only as of its last sync).
fn needs_leader(method: &Method, path: &str) -> bool {
    !(method == Method::GET || method == Method::HEAD)
        || path.ends_with("/workers")
        || path.contains("/logs")
        || path.starts_with("/api/join-tokens")
}

/// API middleware: on a follower, a request that needs the leader goes to the leader's API and its answer
/// comes back unchanged; without a known leader it is refused with 503 and the reason.
pub async fn forward(State(root): State<Arc<Root>>, req: Request, next: Next) -> Response {
    let Some(ha) = root.ha.as_ref() else { return next.run(req).await };
    if !needs_leader(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let leader = match ha.role() {
        Role::Leader => return next.run(req).await,
        Role::Follower { leader_api } => leader_api,
    };
    let unavailable = |why: String| {
        let body = serde_json::json!({ "message": why });
        (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], axum::Json(body)).into_response()
    };
    let Some(leader) = leader.filter(|l| *l != ha.cfg.advertise_api) else {
        return unavailable("no root replica leads right now (an election is under way): retry in a moment".into());
    };
    if req.headers().contains_key(FORWARDED) {
        return unavailable(format!("this replica does not lead any more; the leader is {leader}: retry"));
    }
    match proxy(ha, &root.cfg.trusted_proxies, &leader, req).await {
        Ok(r) => r,
        Err(e) => unavailable(format!("forwarding to the leading replica {leader} failed: {e:#}")),
    }
}

async fn proxy(ha: &Replica, trusted: &[std::net::IpAddr], leader: &str, req: Request) -> Result<Response> {
    let peer = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    // the source as this replica sees it (a proxy it trusts may name the client), one value: the leader
    // limits logins by it when it trusts the replicas as proxies (`--trusted-proxy`)
    let forwarded = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let source = peer.map(|p| super::auth::Auth::login_source(p, forwarded, trusted));
    let (parts, body) = req.into_parts();
    let url = format!("{}{}", leader.trim_end_matches('/'), parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let body = axum::body::to_bytes(body, MAX_FORWARD_BODY).await.context("reading the request body")?;
    let mut out = ha.client.request(parts.method.clone(), &url).body(body);
    let xff = HeaderName::from_static("x-forwarded-for");
    for (k, v) in &parts.headers {
        if k != axum::http::header::HOST && k != axum::http::header::CONTENT_LENGTH && *k != xff {
            out = out.header(k, v);
        }
    }
    out = out.header(FORWARDED, &ha.cfg.advertise_api);
    if let Some(ip) = source {
        out = out.header(xff, ip.to_string());
    }
    let r = out.send().await.with_context(|| format!("{} {url}", parts.method))?;
    let mut resp = Response::builder().status(r.status().as_u16());
    for (k, v) in r.headers() {
        if k != axum::http::header::TRANSFER_ENCODING && k != axum::http::header::CONNECTION {
            resp = resp.header(k, v);
        }
    }
    let bytes = r.bytes().await.context("reading the leader's answer")?;
    Ok(resp.body(Body::from(bytes))?)
}

/// Runs a replica until `stop` becomes true: campaigns, and while it leads runs the cluster-facing
/// services; the API runs all along (the caller serves it).
pub async fn run(root: Arc<Root>, stop: watch::Receiver<bool>) {
    let ha = root.ha.as_ref().expect("a replicated root");
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        match term(&root, stop.clone()).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(endpoints = ?ha.cfg.endpoints, "leader election: {e:#}; campaigning again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        ha.set(Role::Follower { leader_api: None });
    }
}

/// One campaign: as a follower until elected (keeping the leader's API known), then as the leader until
/// the lease is lost or the replica stops.
async fn term(root: &Arc<Root>, stop: watch::Receiver<bool>) -> Result<()> {
    let ha = root.ha.as_ref().expect("a replicated root");
    let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
    let mut client = etcd_client::Client::connect(&ha.cfg.endpoints, Some(opts)).await.context("connecting to etcd")?;
    let granted = tokio::time::timeout(
        Duration::from_secs(5),
        client.lease_grant(ha.cfg.lease_ttl.as_secs().max(2) as i64, None),
    )
    .await
    .context("granting the leadership lease: etcd did not answer")??;
    let lease = granted.id();
    // the lease as etcd granted it (whole seconds): what the step-down budget is measured against
    let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
    let (keeper, acks) = client.lease_keep_alive(lease).await.context("keeping the lease alive")?;
    // renewed by a task of its own, whatever the term is busy with (a take-over's store work)
    let (lost_tx, mut lost) = watch::channel(None::<String>);
    let renewer = crate::task::AbortOnDrop(tokio::spawn(renew(keeper, acks, ttl, lost_tx)));
    let r = campaign_and_lead(root, &mut client, lease, &mut lost, stop).await;
    drop(renewer);
    if r.is_err() {
        // no other replica should wait for this lease to run out
        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
    }
    r
}

async fn campaign_and_lead(
    root: &Arc<Root>,
    client: &mut etcd_client::Client,
    lease: i64,
    lost: &mut watch::Receiver<Option<String>>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let ha = root.ha.as_ref().expect("a replicated root");
    let lease_lost = |lost: &mut watch::Receiver<Option<String>>| {
        let mut lost = lost.clone();
        async move {
            let why = lost.wait_for(Option::is_some).await.map(|w| w.clone().unwrap_or_default());
            anyhow::anyhow!(why.unwrap_or_else(|_| "the lease's keep-alive ended".into()))
        }
    };
    // the campaign's key is attached to the lease, which the renewer keeps alive meanwhile
    let mut election = client.election_client();
    let campaign = election.campaign(ha.cfg.election.clone(), ha.cfg.advertise_api.clone(), lease);
    tokio::pin!(campaign);
    let mut observer = client.election_client();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let leader_key = loop {
        tokio::select! {
            r = &mut campaign => break r.context("campaigning")?.take_leader().context("elected without a leader key")?,
            _ = tick.tick() => {
                // the tokens the leader revoked (logouts, refreshes) are refused here too
                let r2 = root.clone();
                match tokio::task::spawn_blocking(move || r2.auth.reload_revoked(&r2.store)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("reloading the revoked tokens: {e:#}"),
                    Err(e) => tracing::debug!("reloading the revoked tokens: {e}"),
                }
                let known = tokio::time::timeout(Duration::from_secs(2), observer.leader(ha.cfg.election.clone())).await;
                let leader_api = match known {
                    Ok(Ok(r)) => r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string),
                    _ => None,
                };
                ha.set(Role::Follower { leader_api });
            }
            e = lease_lost(lost) => return Err(e),
            _ = super::stopped(stop.clone()) => return Ok(()),
        }
    };
    let key = leader_key.key_str().context("the leadership key")?.to_string();
    tracing::info!(replica = %ha.cfg.advertise_api, key = %key, revision = leader_key.rev(), "this replica leads the root");
    root.store.set_fence(Some(Fence { key: key.clone(), create_revision: leader_key.rev() }))?;
    let lead = async {
        let r2 = root.clone();
        tokio::task::spawn_blocking(move || r2.take_over()).await.context("taking over")??;
        let grpc_l = crate::task::listen(root.cfg.grpc_addr, "--grpc-addr").await?;
        let net_l = crate::task::listen(root.cfg.netsvc_addr, "--netsvc-addr").await?;
        let (term_stop, term_rx) = watch::channel(false);
        let mut services = super::spawn_cluster_facing(root, grpc_l, net_l, term_rx)?;
        ha.set(Role::Leader);
        // join tokens made by `token` on another machine reach the leader's files
        let mut sync = tokio::time::interval(Duration::from_secs(5));
        sync.tick().await;
        let ended = loop {
            tokio::select! {
                e = lease_lost(lost) => break Err(e),
                _ = super::stopped(stop.clone()) => break Ok(()),
                _ = sync.tick() => {
                    let r2 = root.clone();
                    let dir = root.cfg.data_dir.join("ca");
                    match tokio::task::spawn_blocking(move || super::ca_sync::sync_dir(&r2.store, &dir)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("syncing the CA directory with the store: {e:#}"),
                        Err(e) => tracing::warn!("syncing the CA directory with the store: {e}"),
                    }
                }
            }
        };
        ha.set(Role::Follower { leader_api: None });
        term_stop.send_replace(true);
        root.end_sessions();
        services.abort_all();
        while services.join_next().await.is_some() {}
        ended
    };
    let r: Result<()> = lead.await;
    match &r {
        Ok(()) => {
            // stopping: hand the leadership over at once
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                client.resign(Some(etcd_client::ResignOptions::new().with_leader(leader_key))),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
            tracing::info!("resigned the root's leadership");
        }
        Err(e) => tracing::warn!("the root's leadership ended: {e:#}; following again"),
    }
    r
}

/// Keeps the lease alive, a renewal every third of `ttl`; says why in `lost` (and ends) once it was not
/// renewed for two thirds of `ttl`: then it may run out on etcd's side any moment, and this replica must
/// not act as the leader any more.
async fn renew(
    mut keeper: etcd_client::LeaseKeeper,
    mut acks: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let mut last_ok = Instant::now();
    let deadline = ttl * 2 / 3;
    loop {
        let budget = deadline.saturating_sub(last_ok.elapsed()).max(Duration::from_millis(50));
        let renewed = tokio::time::timeout(budget, async {
            keeper.keep_alive().await?;
            acks.message().await
        })
        .await;
        let why = match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                last_ok = Instant::now();
                tokio::time::sleep(ttl / 3).await;
                continue;
            }
            Ok(Ok(Some(_))) => "the leadership lease ran out".to_string(),
            Ok(Ok(None)) => "etcd ended the lease's keep-alive stream".to_string(),
            Ok(Err(e)) => format!("renewing the leadership lease: {e}"),
            Err(_) if last_ok.elapsed() >= deadline => {
                format!("the leadership lease was not renewed for {:.1?} (etcd unreachable?)", last_ok.elapsed())
            }
            Err(_) => continue,
        };
        lost.send_replace(Some(why));
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_session_reads_need_the_leader() {
        assert!(!needs_leader(&Method::GET, "/api/applications"));
        assert!(!needs_leader(&Method::GET, "/api/service/abc"));
        assert!(needs_leader(&Method::POST, "/api/application"));
        assert!(needs_leader(&Method::DELETE, "/api/service/abc/instance/0"));
        assert!(needs_leader(&Method::GET, "/api/cluster/edge/workers"));
        assert!(needs_leader(&Method::GET, "/api/service/abc/instance/0/logs"));
        assert!(needs_leader(&Method::GET, "/api/join-tokens"));
    }
}
