//! Crash-safe store (redb) holding users, applications, services (with instances), clusters and meta.
//! Values are JSON documents keyed by id; every API mutation is one write transaction.

use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
pub const APPLICATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("applications");
pub const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
pub const CLUSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("clusters");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Join tokens clusters register with (hashed).
/// Revoked token ids (logged out, or refresh tokens used once) with their expiry.
pub const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_tokens");

pub type Table = TableDefinition<'static, &'static str, &'static [u8]>;

pub struct Store {
    db: Database,
}

/// A write transaction; dropped without `commit` it stores nothing.
pub struct Tx {
    tx: redb::WriteTransaction,
}

impl Tx {
    pub fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>> {
        let table = self.tx.open_table(t)?;
        let v = table.get(key)?;
        match v {
            Some(g) => Ok(Some(serde_json::from_slice(g.value())?)),
            None => Ok(None),
        }
    }
    pub fn list<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<T>> {
        let table = self.tx.open_table(t)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }
    pub fn put<T: Serialize>(&self, t: Table, key: &str, v: &T) -> Result<()> {
        let bytes = serde_json::to_vec(v)?;
        self.tx.open_table(t)?.insert(key, bytes.as_slice())?;
        Ok(())
    }
    pub fn delete(&self, t: Table, key: &str) -> Result<()> {
        self.tx.open_table(t)?.remove(key)?;
        Ok(())
    }
    pub fn commit(self) -> Result<()> {
        self.tx.commit()?;
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) `<dir>/root.redb`. The store holds the JWT secret and the password hashes, so
    /// the directory is made 0700 and the file 0600.
    pub fn open(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making data dir {} private (0700)", dir.display()))?;
        let path = dir.join("root.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private (0600)", path.display()))?;
        let tx = db.begin_write()?;
        for t in [USERS, APPLICATIONS, SERVICES, CLUSTERS, META, REVOKED] {
            tx.open_table(t)?;
        }
        tx.commit()?;
        Ok(Self { db })
    }

    pub fn write(&self) -> Result<Tx> {
        Ok(Tx { tx: self.db.begin_write()? })
    }

    /// Runs `f` in one write transaction and commits when it returns Ok.
    pub fn update<R>(&self, f: impl FnOnce(&Tx) -> Result<R>) -> Result<R> {
        let tx = self.write()?;
        let r = f(&tx)?;
        tx.commit()?;
        Ok(r)
    }

    pub fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>> {
        let rt = self.db.begin_read()?;
        let table = rt.open_table(t)?;
        match table.get(key)? {
            Some(g) => Ok(Some(serde_json::from_slice(g.value())?)),
            None => Ok(None),
        }
    }

    pub fn list<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<T>> {
        let rt = self.db.begin_read()?;
        let table = rt.open_table(t)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (_, v) = e?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_aborted_tx() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.update(|tx| tx.put(APPLICATIONS, "a1", &serde_json::json!({"n": 1}))).unwrap();
            // a transaction that fails stores nothing
            let r: Result<()> = s.update(|tx| {
                tx.put(APPLICATIONS, "a2", &serde_json::json!({"n": 2}))?;
                anyhow::bail!("boom")
            });
            assert!(r.is_err());
        }
        let s = Store::open(dir.path()).unwrap();
        let v: Option<serde_json::Value> = s.get(APPLICATIONS, "a1").unwrap();
        assert_eq!(v.unwrap()["n"], 1);
        assert!(s.get::<serde_json::Value>(APPLICATIONS, "a2").unwrap().is_none());
        let id = new_id();
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
