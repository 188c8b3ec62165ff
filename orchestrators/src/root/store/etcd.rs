//! The etcd store backend: the root's tables as keys `<prefix>/<table>/<key>` (JSON values) in an etcd
//! cluster, so the root's state outlives its machine and replicas can share it.
//!
//! The store's API is synchronous and runs inside tokio tasks as well as on plain threads, so the etcd
//! client lives on a thread of its own with its own (current-thread) runtime: each call spawns its
//! request there and waits on a std channel with a deadline. A caller's runtime is never asked to block on
//! itself, and an unreachable etcd gives an error naming the endpoints, never a hang. Within that deadline
//! a request that met a member down (or a leader election) is tried again, so it can reach another member.
//!
//! A write transaction holds the process's one writer slot for its life (as redb does), reads
//! (linearizable) through to etcd merged with its own buffered writes, and commits them as one etcd Txn,
//! guarded by the [`Fence`] when one is set and by "still absent" for every key made with
//! [`RawTx::put_new`]. Other reads inside a transaction are not compared at commit: the single writer and
//! the fence (one leader) are what keep them current. A request carries at most what etcd's
//! `--max-request-bytes` allows (1.5 MiB by default), which bounds one value (the overlay plan is one
//! document) and one commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};
use parking_lot::{Condvar, Mutex};

use super::{Backend, Fence, Location, RawTx};

/// How to reach etcd and where the root's keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`), any member of the cluster.
    pub endpoints: Vec<String>,
    /// Every key of the store starts with `<prefix>/`.
    pub prefix: String,
    /// How long connecting to an endpoint may take.
    pub connect_timeout: Duration,
    /// How long one request (a read, a commit) may take.
    pub request_timeout: Duration,
    /// The most writes one transaction may commit: etcd's `--max-txn-ops` (128 unless the server says
    /// otherwise). A larger transaction fails before it is sent.
    pub max_txn_ops: usize,
    /// Fence every commit from the start (see [`Fence`]; later changed with `Store::set_fence`).
    pub fence: Option<Fence>,
}

/// The key prefix unless one is configured.
pub const DEFAULT_PREFIX: &str = "/oakestra/root";
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

impl EtcdConfig {
    /// These endpoints with the default prefix, timeouts (3 s to connect, 5 s a request) and op limit.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            fence: None,
        }
    }
}

/// Keys read per request when listing a table (each page at the first page's revision, so a list is one
/// snapshot); keeps a response well under gRPC's 4 MiB message limit.
const PAGE: i64 = 200;

/// The backend; its transactions share the client with it.
pub(super) struct EtcdBackend(Arc<Shared>);

struct Shared {
    client: Client,
    /// The client thread's runtime; its thread ends when `_stop` is dropped.
    rt: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The endpoints, comma-separated, for errors.
    endpoints: String,
    cfg: EtcdConfig,
    fence: Mutex<Option<Fence>>,
    /// The writer slot: true while a transaction is open.
    writing: Mutex<bool>,
    writer_done: Condvar,
}

/// The bytes after which no key with `prefix` sorts (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdBackend {
    pub(super) fn open(cfg: &EtcdConfig) -> Result<Self> {
        Ok(Self(Arc::new(Shared::open(cfg)?)))
    }
}

impl Shared {
    fn open(cfg: &EtcdConfig) -> Result<Self> {
        let endpoints = cfg.endpoints.join(",");
        if cfg.endpoints.is_empty() {
            bail!("no etcd endpoints given");
        }
        let prefix = cfg.prefix.trim_end_matches('/');
        if prefix.is_empty() {
            bail!("the etcd key prefix is empty: the root needs a prefix of its own (e.g. /oakestra/root)");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the etcd client's runtime")?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd-client".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = stopped.await;
                })
            })
            .context("starting the etcd client's thread")?;
        // one attempt may take half the request's time, so a member that accepts connections but does not
        // answer leaves time to try another
        let opts =
            ConnectOptions::new().with_connect_timeout(cfg.connect_timeout).with_timeout(cfg.request_timeout / 2);
        let eps = cfg.endpoints.clone();
        let client = call(&handle, &endpoints, cfg.request_timeout, "connecting", move || {
            Client::connect(eps.clone(), Some(opts.clone()))
        })?;
        let me = Self {
            client,
            rt: handle,
            _stop: stop,
            endpoints,
            cfg: EtcdConfig { prefix: prefix.to_string(), ..cfg.clone() },
            fence: Mutex::new(cfg.fence.clone()),
            writing: Mutex::new(false),
            writer_done: Condvar::new(),
        };
        // the client connects lazily: one read proves etcd answers (and says what is there)
        let root = format!("{prefix}/").into_bytes();
        let end = prefix_end(&root);
        let keys =
            me.run("reading the store's keys", move |mut c| {
                let (root, end) = (root.clone(), end.clone());
                async move {
                    c.get(root, Some(GetOptions::new().with_range(end).with_count_only())).await.map(|r| r.count())
                }
            })?;
        tracing::info!(endpoints = %me.endpoints, prefix, keys, "store on etcd");
        Ok(me)
    }

    /// Runs `f` with the client on the client's thread (again after a transient failure, see [`call`]),
    /// waiting at most the request timeout.
    fn run<R, F>(&self, what: &str, mut f: impl FnMut(Client) -> F + Send + 'static) -> Result<R>
    where
        F: std::future::Future<Output = Result<R, etcd_client::Error>> + Send + 'static,
        R: Send + 'static,
    {
        let client = self.client.clone();
        call(&self.rt, &self.endpoints, self.cfg.request_timeout, what, move || f(client.clone()))
    }

    fn key(&self, table: &str, key: &str) -> Vec<u8> {
        format!("{}/{table}/{key}", self.cfg.prefix).into_bytes()
    }

    fn table_prefix(&self, table: &str) -> Vec<u8> {
        format!("{}/{table}/", self.cfg.prefix).into_bytes()
    }

    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let k = self.key(table, key);
        self.run(&format!("reading {table}/{key}"), move |mut c| {
            let k = k.clone();
            async move {
                let mut r = c.get(k, None).await?;
                Ok(r.take_kvs().into_iter().next().map(|kv| kv.into_key_value().1))
            }
        })
    }

    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let start = self.table_prefix(table);
        let strip = start.len();
        let end = prefix_end(&start);
        let entries = self.run(&format!("listing {table}"), move |mut c| {
            let (start, end) = (start.clone(), end.clone());
            async move { list_pages(&mut c, start, end).await }
        })?;
        entries
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8(k[strip..].to_vec())
                    .map_err(|_| anyhow!("etcd at {}: a key of table {table} is not UTF-8", self.endpoints))?;
                Ok((key, v))
            })
            .collect()
    }
}

/// Every key and value in `[start, end)`, a page at a time, all pages at the first one's revision.
async fn list_pages(
    c: &mut Client,
    start: Vec<u8>,
    end: Vec<u8>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, etcd_client::Error> {
    let (mut from, mut revision, mut out) = (start, 0, Vec::new());
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut r = c.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = r.header().map_or(0, |h| h.revision());
        }
        let more = r.more();
        let kvs = r.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        out.extend(kvs.into_iter().map(|kv| kv.into_key_value()));
        if !more {
            break;
        }
    }
    Ok(out)
}

/// Whether a failed attempt may go to another endpoint: etcd or the connection was unavailable (a
/// member down, no leader, a leader change) or the attempt timed out. Retrying a commit is safe: it is a
/// set of whole values and deletes, so applying it twice leaves what applying it once does, and under a
/// fence only while this process still leads.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(s.code(), Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded)
        }
        _ => false,
    }
}

/// Runs attempts made by `attempt` on the client's runtime until one succeeds, fails for good, or the
/// deadline (`timeout` from now) passes, and waits for the outcome (with a last-resort deadline of our
/// own), naming the endpoints and what was asked in any error. A transient failure (see [`transient`]) is
/// tried again after a short backoff: the client spreads requests over the endpoints and has no health
/// check of its own, so a request may land on a member that is down.
fn call<R, Fut>(
    rt: &tokio::runtime::Handle,
    endpoints: &str,
    timeout: Duration,
    what: &str,
    mut attempt: impl FnMut() -> Fut + Send + 'static,
) -> Result<R>
where
    R: Send + 'static,
    Fut: std::future::Future<Output = Result<R, etcd_client::Error>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        let outcome = loop {
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Err(e)) if transient(&e) && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!("etcd: {e}; trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                r => break r,
            }
        };
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(anyhow!("etcd at {endpoints}: {what}: {e}")),
        Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(anyhow!("etcd at {endpoints}: {what}: no answer within {timeout:?}"))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(anyhow!("etcd at {endpoints}: {what}: the etcd client's thread has stopped"))
        }
    }
}

impl Backend for EtcdBackend {
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.0.get_raw(table, key)
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.0.list_raw(table)
    }

    fn write(&self) -> Result<Box<dyn RawTx>> {
        let mut writing = self.0.writing.lock();
        while *writing {
            self.0.writer_done.wait(&mut writing);
        }
        *writing = true;
        Ok(Box::new(EtcdTx {
            shared: self.0.clone(),
            writes: Mutex::new(BTreeMap::new()),
            new: Mutex::new(BTreeSet::new()),
        }))
    }

    fn set_fence(&self, fence: Option<Fence>) -> Result<()> {
        match &fence {
            Some(f) => tracing::info!(key = %f.key, create_revision = f.create_revision, "store commits fenced"),
            None => tracing::info!("store commits no longer fenced"),
        }
        *self.0.fence.lock() = fence;
        Ok(())
    }

    fn location(&self) -> Location {
        Location::Etcd { endpoints: self.0.cfg.endpoints.clone(), prefix: self.0.cfg.prefix.clone() }
    }
}

/// A write: the new value, or None for a delete.
type Writes = BTreeMap<(String, String), Option<Vec<u8>>>;

/// An open write transaction: it holds the writer slot until dropped.
struct EtcdTx {
    shared: Arc<Shared>,
    writes: Mutex<Writes>,
    /// The keys put with `put_new`: the commit requires them absent.
    new: Mutex<BTreeSet<(String, String)>>,
}

impl Drop for EtcdTx {
    fn drop(&mut self) {
        *self.shared.writing.lock() = false;
        self.shared.writer_done.notify_one();
    }
}

impl RawTx for EtcdTx {
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(w) = self.writes.lock().get(&(table.to_string(), key.to_string())) {
            return Ok(w.clone());
        }
        self.shared.get_raw(table, key)
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut all: BTreeMap<String, Vec<u8>> = self.shared.list_raw(table)?.into_iter().collect();
        let writes = self.writes.lock();
        let start = (table.to_string(), String::new());
        for ((_, k), v) in writes.range(start..).take_while(|((t, _), _)| t == table) {
            match v {
                Some(v) => all.insert(k.clone(), v.clone()),
                None => all.remove(k),
            };
        }
        Ok(all.into_iter().collect())
    }

    fn put(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()> {
        self.writes.lock().insert((table.to_string(), key.to_string()), Some(value));
        Ok(())
    }

    fn put_new(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()> {
        let k = (table.to_string(), key.to_string());
        self.writes.lock().insert(k.clone(), Some(value));
        self.new.lock().insert(k);
        Ok(())
    }

    fn delete(&self, table: &str, key: &str) -> Result<()> {
        let k = (table.to_string(), key.to_string());
        self.new.lock().remove(&k);
        self.writes.lock().insert(k, None);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let writes = std::mem::take(&mut *self.writes.lock());
        if writes.is_empty() {
            return Ok(());
        }
        let s = &self.shared;
        if writes.len() > s.cfg.max_txn_ops {
            bail!(
                "etcd at {}: this transaction writes {} keys, more than the {} operations etcd takes in one \
                 transaction (etcd's --max-txn-ops, told to the root as --etcd-max-txn-ops): nothing was stored",
                s.endpoints,
                writes.len(),
                s.cfg.max_txn_ops
            );
        }
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|((t, k), v)| match v {
                Some(v) => TxnOp::put(s.key(&t, &k), v, None),
                None => TxnOp::delete(s.key(&t, &k), None),
            })
            .collect();
        let fence = s.fence.lock().clone();
        let new = std::mem::take(&mut *self.new.lock());
        // etcd-client wants the compare first, then the writes, then what runs when the compare fails
        let mut compares: Vec<Compare> =
            new.iter().map(|(t, k)| Compare::version(s.key(t, k), CompareOp::Equal, 0)).collect();
        if let Some(f) = &fence {
            compares.push(Compare::create_revision(f.key.clone(), CompareOp::Equal, f.create_revision));
        }
        if compares.len() > s.cfg.max_txn_ops {
            bail!(
                "etcd at {}: this transaction makes {} keys new, more than the {} comparisons etcd takes in one \
                 transaction (etcd's --max-txn-ops): nothing was stored",
                s.endpoints,
                new.len(),
                s.cfg.max_txn_ops
            );
        }
        let mut txn = Txn::new();
        if !compares.is_empty() {
            txn = txn.when(compares);
        }
        txn = txn.and_then(ops);
        if let Some(f) = &fence {
            txn = txn.or_else([TxnOp::get(f.key.clone(), None)]);
        }
        let r = s.run("committing a transaction", move |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if r.succeeded() {
            return Ok(());
        }
        let taken = || {
            let keys: Vec<String> = new.iter().map(|(t, k)| format!("{t}/{k}")).collect();
            anyhow!(
                "etcd at {}: a key this transaction makes new ({}) was made by another writer first: nothing was \
                 stored",
                s.endpoints,
                keys.join(", ")
            )
        };
        let Some(f) = fence else {
            if !new.is_empty() {
                return Err(taken());
            }
            bail!("etcd at {}: a transaction without conditions was refused", s.endpoints);
        };
        let now = r.op_responses().into_iter().find_map(|o| match o {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.create_revision())),
            _ => None,
        });
        if now == Some(Some(f.create_revision)) && !new.is_empty() {
            // still fenced on the same key: what failed is a key made new
            return Err(taken());
        }
        let now = match now.flatten() {
            Some(rev) => format!("was made again (create revision {rev})"),
            None => "is gone".to_string(),
        };
        tracing::warn!(key = %f.key, create_revision = f.create_revision, "a commit lost its fence: {now}");
        bail!(
            "not the leader any more: the fence key {} {now}, no longer create revision {}; nothing was stored",
            f.key,
            f.create_revision
        )
    }
}
