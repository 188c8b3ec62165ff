//! A state kept whole in memory and as one JSON document (the root's and the cluster's network services):
//! read under its lock, changed only through [`Persisted::mutate`], which stores the new state before it
//! replaces the old one, so a failed change leaves both untouched. The document lives in a redb file of its
//! own ([`Persisted::open`]) or, for a root on etcd, under one key of the root's store
//! ([`Persisted::open_in`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use parking_lot::{Mutex, MutexGuard};
use redb::{ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

const STATE: TableDefinition<&str, &str> = TableDefinition::new("netsvc_state");

/// Where a [`Persisted`] state's JSON document is kept: each save replaces it whole, atomically.
pub(crate) trait Document: Send + Sync {
    /// The stored document, None before the first save.
    fn load(&self) -> Result<Option<Vec<u8>>>;
    fn save(&self, json: Vec<u8>) -> Result<()>;
    /// Where the document is, for errors.
    fn describe(&self) -> String;
}

/// A redb file holding one document (table `netsvc_state`, key `state`).
struct RedbFile {
    db: redb::Database,
    path: PathBuf,
}

impl Document for RedbFile {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get("state")?.map(|v| v.value().as_bytes().to_vec()))
    }

    fn save(&self, json: Vec<u8>) -> Result<()> {
        let json = String::from_utf8(json).context("the state is not UTF-8 JSON")?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(STATE)?;
            t.insert("state", json.as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

pub(crate) struct Persisted<T> {
    doc: Box<dyn Document>,
    state: Mutex<T>,
}

impl<T: Serialize + DeserializeOwned + Default + Clone + PartialEq> Persisted<T> {
    /// Opens (or creates) the redb file at `path` and loads its state (the default when there is none yet).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let db = redb::Database::create(path).with_context(|| format!("opening {}", path.display()))?;
        Self::open_in(Box::new(RedbFile { db, path: path.to_path_buf() }))
    }

    /// Loads the state kept in `doc` (the default when there is none yet).
    pub(crate) fn open_in(doc: Box<dyn Document>) -> Result<Self> {
        let state = match doc.load().with_context(|| format!("loading {}", doc.describe()))? {
            Some(json) => serde_json::from_slice(&json)
                .with_context(|| format!("loading {}: decoding stored network state", doc.describe()))?,
            None => T::default(),
        };
        Ok(Self { doc, state: Mutex::new(state) })
    }

    /// Loads the state again from the document (another process may have changed it: a replicated
    /// root's previous leader).
    pub(crate) fn reload(&self) -> Result<()> {
        let state = match self.doc.load().with_context(|| format!("loading {}", self.doc.describe()))? {
            Some(json) => serde_json::from_slice(&json)
                .with_context(|| format!("loading {}: decoding stored network state", self.doc.describe()))?,
            None => T::default(),
        };
        *self.state.lock() = state;
        Ok(())
    }

    /// The state, for reading.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock()
    }

    /// Applies `f` to a copy of the state; when it succeeds and changed something, stores the copy, then
    /// makes it the state.
    pub(crate) fn mutate<R, E: From<anyhow::Error>>(&self, f: impl FnOnce(&mut T) -> Result<R, E>) -> Result<R, E> {
        let mut guard = self.state.lock();
        let mut next = guard.clone();
        let r = f(&mut next)?;
        if next != *guard {
            self.doc.save(serde_json::to_vec(&next).map_err(anyhow::Error::from)?)?;
            *guard = next;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_survives_reopening_and_a_failed_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let p: Persisted<Vec<u32>> = Persisted::open(&path).unwrap();
            assert!(p.lock().is_empty());
            p.mutate(|s| -> Result<()> {
                s.push(7);
                Ok(())
            })
            .unwrap();
            let e = p.mutate(|s| -> Result<()> {
                s.push(8);
                anyhow::bail!("refused")
            });
            assert!(e.is_err());
            assert_eq!(*p.lock(), vec![7]);
        }
        let p: Persisted<Vec<u32>> = Persisted::open(&path).unwrap();
        assert_eq!(*p.lock(), vec![7]);
    }
}
