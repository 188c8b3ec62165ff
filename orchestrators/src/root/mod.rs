//! Root orchestrator: REST API (axum), cluster registry (tonic), store (embedded redb or etcd), root scheduler.

pub mod api;
mod applications;
pub mod auth;
pub mod ca_sync;
pub mod error;
pub mod grpc;
pub mod ha;
mod instances;
pub mod join;
mod logs;
pub mod netsvc;
pub mod openapi;
pub mod passwords;
pub mod records;
pub mod scheduler;
mod sessions;
pub mod store;
mod usage;
pub mod users;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use oak_proto::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::Notify;

pub use applications::ApplicationUpdate;
use auth::Auth;
pub use records::{service_status, AggregateRecord, ApplicationRecord, ClusterRecord, InstanceRecord, ServiceRecord};
use sessions::Session;
use store::Store;

/// The name of the root's certificate authority.
pub const CA_NAME: &str = "oakestra-rs root CA";

/// Root orchestrator settings (see the binary's `--help`).
#[derive(Debug, Clone)]
pub struct Config {
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Service manager (overlay address management for clusters), Oakestra's port 10099.
    pub netsvc_addr: SocketAddr,
    /// The CA, join tokens and generated files; the embedded store too, unless `etcd` is set.
    pub data_dir: PathBuf,
    /// Keep the store (and the overlay address plan) in etcd instead of `<data-dir>/root.redb`; the root
    /// is then one replica of possibly several, led by one ([`ha`]).
    pub etcd: Option<store::EtcdConfig>,
    /// With `etcd`: this replica's REST API as the others reach it (default: http(s)://<the address this
    /// machine reaches etcd from>:<API port>).
    pub advertise_api: Option<String>,
    /// With `etcd`: the leadership lease's time to live (a dead leader is replaced within about this).
    pub leader_lease: Duration,
    pub admin_password: Option<String>,
    pub cluster_stale: Duration,
    pub retry_interval: Duration,
    /// Aggregate report interval told to clusters in ClusterWelcome.
    pub report_interval_ms: u32,
    /// Worker subnet blocks (16 subnets each) one cluster may hold.
    pub max_blocks_per_cluster: u32,
    /// Serve the REST API over HTTPS with this certificate chain and key (PEM files); plain HTTP when unset.
    pub tls: Option<TlsFiles>,
    /// Serve the REST API over HTTPS with a certificate the root's CA issues for these names (when `tls`
    /// is unset; written to `<data-dir>/ca/api.pem`).
    pub api_tls_names: Vec<String>,
    /// A join token clusters may join with (added at start); None: one is made at first start. Either
    /// way the first token is written whole to `<data-dir>/join-token`.
    pub join_token: Option<String>,
    /// Proxies (the dashboard) whose `X-Forwarded-For` names the source of a login attempt.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Shared state of a running root orchestrator.
pub struct Root {
    pub store: Store,
    /// The clusters' certificate authority and join tokens (`<data-dir>/ca`).
    pub authority: Arc<oak_trust::Authority>,
    /// Overlay address management: worker blocks for clusters, service IPs, cross-cluster resolution.
    pub net: netsvc::RootNetSvc,
    pub auth: Auth,
    pub cfg: Config,
    sessions: Mutex<HashMap<String, Session>>,
    /// The live workers each cluster last reported (inspection only, not stored: a cluster reports them
    /// again with its next aggregate).
    workers: Mutex<HashMap<String, Vec<pb::WorkerSummary>>>,
    /// What each instance used over time, from the workers' samples (kept in memory, see [`usage`]).
    pub usage: usage::Usage,
    /// Logs requests waiting for their cluster's answer: request id -> (cluster asked, where the answer goes).
    pending_logs: Mutex<HashMap<u64, (String, tokio::sync::oneshot::Sender<pb::LogsChunk>)>>,
    next_logs: std::sync::atomic::AtomicU64,
    next_conn: std::sync::atomic::AtomicU64,
    /// Woken when a cluster registers or reports more capacity: retries unplaced instances.
    pub capacity_changed: Notify,
    /// Clusters that registered or grew since the last retry: they are tried again even by instances
    /// they already refused.
    grown: Mutex<HashSet<String>>,
    /// Set once both listeners are bound (readiness for /api/health).
    pub ready: std::sync::atomic::AtomicBool,
    /// Becomes true when shutdown begins; session tasks end on it.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Set on a replicated root (on etcd): its part in the leader election.
    pub ha: Option<ha::Replica>,
}

/// A message for a cluster, sent after the write transaction committed.
pub type Outgoing = Vec<(String, pb::RootMessage)>;

/// Brings the service IPs in line with the stored services at start (see
/// [`netsvc::RootNetSvc::reconcile_services`]), saying what it changed.
fn reconcile_service_ips(store: &Store, net: &netsvc::RootNetSvc) -> Result<()> {
    let services: Vec<records::ServiceRecord> = store.list(store::SERVICES)?;
    let stored: Vec<_> = services
        .iter()
        .map(|s| {
            let ip = |v: &str| v.parse().ok();
            (s.microservice_id.clone(), s.job_name.clone(), ip(&s.sla.addresses.rr_ip), ip(&s.sla.addresses.closest_ip))
        })
        .collect();
    let (released, restored) = net.reconcile_services(&stored)?;
    if !released.is_empty() {
        tracing::warn!(services = ?released, "released the service IPs of services that are not stored (left by an interrupted create or delete)");
    }
    if !restored.is_empty() {
        tracing::warn!(services = ?restored, "restored the service IPs of stored services that had none");
    }
    Ok(())
}

impl Root {
    pub fn open(mut cfg: Config) -> Result<Arc<Self>> {
        // the CA and generated files live here whichever the store (the embedded one makes it too)
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&cfg.data_dir)
                .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
        }
        let store = Store::open_with(&cfg.data_dir, cfg.etcd.as_ref())?;
        let auth = Auth::init(&store, &cfg.data_dir, cfg.admin_password.as_deref())?;
        let net = netsvc::RootNetSvc::open_for(&store, &cfg.data_dir)?;
        let ha = match &cfg.etcd {
            None => {
                reconcile_service_ips(&store, &net)?;
                None
            }
            // a replica reconciles when it becomes the leader (its writes are fenced then)
            Some(etcd) => Some(ha::Replica::new(ha::HaConfig {
                endpoints: etcd.endpoints.clone(),
                election: format!("{}/leader", etcd.prefix.trim_end_matches('/')),
                advertise_api: match &cfg.advertise_api {
                    Some(a) => a.clone(),
                    None => ha::default_advertise(&etcd.endpoints, cfg.api_addr, cfg.tls.is_some()),
                },
                lease_ttl: cfg.leader_lease,
            })?),
        };
        let ca_dir = cfg.data_dir.join("ca");
        let authority = Arc::new(match ha {
            None => oak_trust::Authority::open(&ca_dir, CA_NAME, oak_trust::ROOT_SERVER)?,
            // replicas share one CA (and its join tokens): the first one's, kept in the store
            Some(_) => ca_sync::open_authority(&store, &ca_dir, CA_NAME, oak_trust::ROOT_SERVER)?,
        });
        authority
            .init_tokens(cfg.join_token.as_deref(), &cfg.data_dir.join("join-token"), "clusters")
            .map_err(|e| anyhow!("--token: {e:#}"))?;
        if ha.is_some() {
            // a join token made here now reaches the other replicas
            ca_sync::sync_dir(&store, &ca_dir)?;
        }
        if cfg.tls.is_none() && !cfg.api_tls_names.is_empty() {
            let files = TlsFiles { cert: cfg.data_dir.join("ca/api.pem"), key: cfg.data_dir.join("ca/api.key") };
            authority
                .issue_server(&cfg.api_tls_names, &files.cert, &files.key)
                .map_err(|e| anyhow!("--api-tls-names: {e:#}"))?;
            tracing::info!(names = ?cfg.api_tls_names, ca = %cfg.data_dir.join("ca/ca.pem").display(), "the API's certificate comes from the root's CA: clients trust that CA");
            cfg.tls = Some(files);
        }
        let root = Arc::new(Self {
            store,
            authority,
            net,
            auth,
            cfg,
            sessions: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            usage: Default::default(),
            pending_logs: Mutex::new(HashMap::new()),
            next_logs: std::sync::atomic::AtomicU64::new(1),
            next_conn: 1.into(),
            capacity_changed: Notify::new(),
            grown: Mutex::new(HashSet::new()),
            ready: false.into(),
            stopping: tokio::sync::watch::channel(false).0,
            ha,
        });
        {
            // only clusters this root registered lease worker subnets, each up to its quota
            let weak = Arc::downgrade(&root);
            root.net.set_policy(netsvc::LeasePolicy {
                max_blocks_per_cluster: root.cfg.max_blocks_per_cluster,
                is_registered: Box::new(move |cid| {
                    weak.upgrade().is_some_and(|r| {
                        matches!(r.store.get::<records::ClusterRecord>(store::CLUSTERS, cid), Ok(Some(_)))
                    })
                }),
            });
        }
        Ok(root)
    }
}

impl Root {
    /// A replica becoming the leader: the overlay address plan as the store holds it now (the previous
    /// leader changed it), the service IPs reconciled with the services, no leftovers of an earlier term.
    pub(crate) fn take_over(&self) -> Result<()> {
        self.end_sessions();
        // join tokens made or revoked through another replica since this one started, and the API
        // tokens revoked through it (logged out, refreshed)
        ca_sync::sync_dir(&self.store, &self.cfg.data_dir.join("ca"))?;
        self.auth.reload_revoked(&self.store)?;
        self.grown.lock().clear();
        self.net.reload()?;
        reconcile_service_ips(&self.store, &self.net)
    }

    /// Ends every cluster session (the leadership ended) and forgets what they reported.
    pub(crate) fn end_sessions(&self) {
        self.sessions.lock().clear();
        self.workers.lock().clear();
    }
}

/// Runs the root orchestrator until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let root = Root::open(cfg.clone())?;
    let api_l = crate::task::listen(cfg.api_addr, "--api-addr").await?;
    if root.ha.is_some() {
        return serve_replica(root, api_l, shutdown).await;
    }
    let grpc_l = crate::task::listen(cfg.grpc_addr, "--grpc-addr").await?;
    let net_l = crate::task::listen(cfg.netsvc_addr, "--netsvc-addr").await?;
    serve(root, api_l, grpc_l, net_l, shutdown).await
}

/// Serves on already-bound listeners (tests bind port 0).
pub async fn serve(
    root: Arc<Root>,
    api_l: tokio::net::TcpListener,
    grpc_l: tokio::net::TcpListener,
    net_l: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tracing::info!(api = %api_l.local_addr()?, grpc = %grpc_l.local_addr()?, data_dir = %root.cfg.data_dir.display(), store = %root.store.location(), "root orchestrator listening");
    let stop_rx = root.stopping.subscribe();
    on_shutdown(&root, shutdown);
    let mut cluster_facing = spawn_cluster_facing(&root, grpc_l, net_l, stop_rx.clone())?;
    let api = api_server(&root, api_l, stop_rx.clone()).await?;
    root.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::pin!(api);
    let mut stop_wait = stop_rx.clone();
    let grace = async move {
        let _ = stop_wait.wait_for(|v| *v).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let r = tokio::select! {
        a = &mut api => a,
        _ = grace => {
            tracing::warn!("connections still open 5 s after shutdown began; stopping anyway");
            Ok(())
        }
    };
    // the cluster-facing services end on the same signal (cluster registration once its sessions are
    // gone); they hold the root, its store too, until then
    let drained =
        tokio::time::timeout(Duration::from_secs(5), async { while cluster_facing.join_next().await.is_some() {} });
    if drained.await.is_err() {
        cluster_facing.abort_all();
        while cluster_facing.join_next().await.is_some() {}
    }
    r?;
    tracing::info!("root orchestrator stopped");
    Ok(())
}

/// A replicated root: the REST API all along, the cluster-facing services while this replica leads.
pub async fn serve_replica(
    root: Arc<Root>,
    api_l: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ha = root.ha.as_ref().context("serve_replica needs a replicated root (etcd)")?;
    tracing::info!(api = %api_l.local_addr()?, advertise = %ha.cfg.advertise_api, store = %root.store.location(), "root replica listening; campaigning for the leadership");
    let stop_rx = root.stopping.subscribe();
    on_shutdown(&root, shutdown);
    let election = tokio::spawn(ha::run(root.clone(), stop_rx.clone()));
    let api = api_server(&root, api_l, stop_rx.clone()).await?;
    root.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut stop_wait = stop_rx.clone();
    let grace = async move {
        let _ = stop_wait.wait_for(|v| *v).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let r = tokio::select! {
        r = api => r,
        _ = grace => {
            tracing::warn!("connections still open 5 s after shutdown began; stopping anyway");
            Ok(())
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    tracing::info!("root replica stopped");
    Ok(r?)
}

/// When `shutdown` resolves: marks the root stopping and ends the cluster sessions.
fn on_shutdown(root: &Arc<Root>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let r1 = root.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        r1.stopping.send_replace(true);
        // dropping the senders ends the cluster streams so the gRPC server can finish
        r1.sessions.lock().clear();
    });
}

/// Resolves once `stop` becomes true (or its sender is gone).
pub(crate) async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// What serves clusters, and only the leader of a replicated root runs: cluster registration (gRPC) on
/// `grpc_l`, the service manager on `net_l`, and the loop that retries unplaced instances; all end when
/// `stop` becomes true (or when the set is aborted).
fn spawn_cluster_facing(
    root: &Arc<Root>,
    grpc_l: tokio::net::TcpListener,
    net_l: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinSet<()>> {
    let mut set = tokio::task::JoinSet::new();
    let router = crate::task::trusted(&root.authority, root.clone())?;
    let net = root.net.clone();
    let net_stop = stopped(stop.clone());
    set.spawn(async move {
        tokio::select! {
            r = netsvc::serve_listener(net, net_l, router) => {
                if let Err(e) = r {
                    tracing::error!("the service manager stopped: {e:#}");
                }
            }
            _ = net_stop => {}
        }
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_l);
    let grpc = crate::task::trusted(&root.authority, root.clone())?
        .add_service(pb::cluster_registry_server::ClusterRegistryServer::new(grpc::Registry { root: root.clone() }))
        .serve_with_incoming_shutdown(incoming, stopped(stop.clone()));
    set.spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!("cluster registration stopped: {e:#}");
        }
    });
    let r2 = root.clone();
    let mut stop_retry = stop;
    set.spawn(async move {
        let mut tick = tokio::time::interval(r2.cfg.retry_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick completes immediately
        loop {
            let full = tokio::select! {
                _ = tick.tick() => true,
                _ = r2.capacity_changed.notified() => false,
                _ = stop_retry.wait_for(|v| *v) => break,
            };
            if let Err(e) = r2.retry_unplaced(full) {
                tracing::error!("retrying placements: {e:#}");
            }
        }
    });
    Ok(set)
}

/// The REST API on `api_l` (HTTPS when configured), until `stop` becomes true.
async fn api_server(
    root: &Arc<Root>,
    api_l: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>> {
    let app = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<std::net::SocketAddr>(
        api::service(root.clone()),
    );
    Ok(match &root.cfg.tls {
        None => Box::pin(std::future::IntoFuture::into_future(
            axum::serve(api_l, app).with_graceful_shutdown(stopped(stop)),
        )),
        Some(tls) => {
            let config =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await.map_err(|e| {
                    anyhow!("loading the API's certificate {} and key {}: {e}", tls.cert.display(), tls.key.display())
                })?;
            let handle = axum_server::Handle::new();
            let h2 = handle.clone();
            tokio::spawn(async move {
                stopped(stop).await;
                h2.graceful_shutdown(Some(Duration::from_secs(5)));
            });
            tracing::info!(cert = %tls.cert.display(), "REST API over HTTPS");
            Box::pin(axum_server::from_tcp_rustls(api_l.into_std()?, config)?.handle(handle).serve(app))
        }
    })
}

#[cfg(test)]
pub(crate) mod tests;
