//! The root's store: users, applications, services (with instances), clusters, meta, revoked tokens and,
//! on etcd, the overlay address plan. Values are JSON documents keyed by id in named tables; every API
//! mutation is one write transaction, atomic in either backend.
//!
//! Two backends sit behind one byte-level trait ([`Backend`], [`RawTx`]): the embedded redb file
//! `<data-dir>/root.redb` (the default, [`embedded`]) and etcd ([`etcd`], keys `<prefix>/<table>/<key>`), which
//! keeps the root's state off its machine so replicas can share it. The typed JSON helpers ([`Tx`],
//! [`Store::update`], [`Store::get`], [`Store::list`]) are the same over both.

mod embedded;
pub mod etcd;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};

pub use etcd::EtcdConfig;

/// A table's name (a redb table, an etcd key segment).
pub type Table = &'static str;

pub const USERS: Table = "users";
pub const APPLICATIONS: Table = "applications";
pub const SERVICES: Table = "services";
pub const CLUSTERS: Table = "clusters";
pub const META: Table = "meta";
/// Revoked token ids (logged out, or refresh tokens used once) with their expiry.
pub const REVOKED: Table = "revoked_tokens";
/// The overlay address plan (one document, [`NET_STATE`]) when the store is on etcd; the embedded store
/// keeps it in its own file, `<data-dir>/net.redb`, as before.
pub const NET: Table = "net";
/// The key of the overlay address plan in [`NET`].
pub const NET_STATE: &str = "state";

/// The tables the root keeps (made at open in the embedded store, so reading one never fails).
pub(crate) const TABLES: [Table; 6] = [USERS, APPLICATIONS, SERVICES, CLUSTERS, META, REVOKED];

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded store, this file.
    Embedded(PathBuf),
    /// etcd at these endpoints, under this key prefix.
    Etcd { endpoints: Vec<String>, prefix: String },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(p) => write!(f, "{}", p.display()),
            Self::Etcd { endpoints, prefix } => write!(f, "etcd {} under {prefix}", endpoints.join(",")),
        }
    }
}

/// Guards every commit of a leader: the commit stores its writes only while `key` (an absolute etcd key,
/// the leader's election key) still has this create revision, i.e. was not deleted or made again by
/// another leader since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

/// A store backend: bytes by table and key.
pub trait Backend: Send + Sync {
    /// The value of `key` in `table`, as last committed.
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Every entry of `table`, ordered by key.
    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Begins a write transaction. One is open at a time in a process: this waits for the current one.
    fn write(&self) -> Result<Box<dyn RawTx>>;
    /// Fences (or, with None, stops fencing) every later commit; see [`Fence`].
    fn set_fence(&self, fence: Option<Fence>) -> Result<()>;
    /// Where the data is.
    fn location(&self) -> Location;
}

/// A write transaction on raw bytes. Its reads see its own writes; dropped without [`RawTx::commit`] it
/// stores nothing.
pub trait RawTx: Send {
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>>;
    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>>;
    fn put(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()>;
    /// Puts `value` under a `key` that must be absent: when it is there (in the embedded store, now; on
    /// etcd, at commit: another writer made it since) the put or the commit fails and nothing is stored.
    /// (On etcd a commit tried again after its answer was lost may find the key its first try made: a
    /// caller that sees the failure reads the store again.)
    fn put_new(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()>;
    fn delete(&self, table: &str, key: &str) -> Result<()>;
    /// Stores every write at once, or none.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// The root's store; cheap to clone (the clones share one backend).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

/// A write transaction; dropped without `commit` it stores nothing.
pub struct Tx {
    raw: Box<dyn RawTx>,
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("decoding {table}/{key} from the store"))
}

fn decode_all<T: DeserializeOwned>(table: &str, entries: Vec<(String, Vec<u8>)>) -> Result<Vec<T>> {
    entries.into_iter().map(|(k, v)| decode(table, &k, &v)).collect()
}

impl Tx {
    pub fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>> {
        self.raw.get(t, key)?.map(|v| decode(t, key, &v)).transpose()
    }
    pub fn list<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<T>> {
        decode_all(t, self.raw.list(t)?)
    }
    pub fn put<T: Serialize>(&self, t: Table, key: &str, v: &T) -> Result<()> {
        self.raw.put(t, key, serde_json::to_vec(v)?)
    }
    /// Puts `v` under a `key` no writer has made, checked when the transaction commits (see
    /// [`RawTx::put_new`]): of two writers creating one key, the first to commit wins, the other's commit
    /// fails whole.
    pub fn put_new<T: Serialize>(&self, t: Table, key: &str, v: &T) -> Result<()> {
        self.raw.put_new(t, key, serde_json::to_vec(v)?)
    }
    pub fn delete(&self, t: Table, key: &str) -> Result<()> {
        self.raw.delete(t, key)
    }
    pub fn commit(self) -> Result<()> {
        self.raw.commit()
    }
}

impl Store {
    /// Opens (or creates) the embedded store `<dir>/root.redb`. It holds the JWT secret and the password
    /// hashes, so the directory is made 0700 and the file 0600.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self { backend: Arc::new(embedded::RedbBackend::open(dir)?) })
    }

    /// Connects to etcd (failing within the configured timeouts, naming the endpoints, when it does not
    /// answer).
    pub fn open_etcd(cfg: &EtcdConfig) -> Result<Self> {
        Ok(Self { backend: Arc::new(etcd::EtcdBackend::open(cfg)?) })
    }

    /// etcd when `etcd` is given, else the embedded store under `data_dir`.
    pub fn open_with(data_dir: &Path, etcd: Option<&EtcdConfig>) -> Result<Self> {
        match etcd {
            Some(cfg) => Self::open_etcd(cfg),
            None => Self::open(data_dir),
        }
    }

    /// A store over any backend.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// Where the data is.
    pub fn location(&self) -> Location {
        self.backend.location()
    }

    /// Fences every later commit on `fence` (etcd only; see [`Fence`]); None lifts it.
    pub fn set_fence(&self, fence: Option<Fence>) -> Result<()> {
        self.backend.set_fence(fence)
    }

    pub fn write(&self) -> Result<Tx> {
        Ok(Tx { raw: self.backend.write()? })
    }

    /// Runs `f` in one write transaction and commits when it returns Ok.
    pub fn update<R>(&self, f: impl FnOnce(&Tx) -> Result<R>) -> Result<R> {
        let tx = self.write()?;
        let r = f(&tx)?;
        tx.commit()?;
        Ok(r)
    }

    pub fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>> {
        self.backend.get(t, key)?.map(|v| decode(t, key, &v)).transpose()
    }

    pub fn list<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<T>> {
        decode_all(t, self.backend.list(t)?)
    }

    /// One key of the store as the home of a [`crate::persisted::Persisted`] document.
    pub(crate) fn document(&self, table: Table, key: &'static str) -> StoreDocument {
        StoreDocument { store: self.clone(), table, key }
    }
}

/// A [`crate::persisted::Persisted`] document kept under one key of the store (written in one fenced
/// transaction like any other change).
pub(crate) struct StoreDocument {
    store: Store,
    table: Table,
    key: &'static str,
}

impl crate::persisted::Document for StoreDocument {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        self.store.backend.get(self.table, self.key)
    }
    fn save(&self, json: Vec<u8>) -> Result<()> {
        let tx = self.store.backend.write()?;
        tx.put(self.table, self.key, json)?;
        tx.commit()
    }
    fn describe(&self) -> String {
        format!("{}/{} in {}", self.table, self.key, self.store.location())
    }
}

/// A fresh 24-hex-char id (like a Mongo ObjectId): 4 bytes of unix seconds + 8 random bytes.
pub fn new_id() -> String {
    let secs = (oak_proto::now_ms() / 1000) as u32;
    let r: [u8; 8] = rand::random();
    let mut s = format!("{secs:08x}");
    for b in r {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
