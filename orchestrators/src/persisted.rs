//! A state kept whole in memory and as one JSON document in a redb file (the root's and the cluster's
//! network services): read under its lock, changed only through [`Persisted::mutate`], which stores the
//! new state before it replaces the old one, so a failed change leaves both untouched.

use std::path::Path;

use anyhow::{Context, Result};
use parking_lot::{Mutex, MutexGuard};
use redb::{ReadableDatabase, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

const STATE: TableDefinition<&str, &str> = TableDefinition::new("netsvc_state");

pub(crate) struct Persisted<T> {
    db: redb::Database,
    state: Mutex<T>,
}

impl<T: Serialize + DeserializeOwned + Default + Clone + PartialEq> Persisted<T> {
    /// Opens (or creates) the file at `path` and loads its state (the default when there is none yet).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let db = redb::Database::create(path).with_context(|| format!("opening {}", path.display()))?;
        let state = Mutex::new(load(&db).with_context(|| format!("loading {}", path.display()))?);
        Ok(Self { db, state })
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
            self.save(&next)?;
            *guard = next;
        }
        Ok(r)
    }

    fn save(&self, state: &T) -> Result<()> {
        let json = serde_json::to_string(state)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(STATE)?;
            t.insert("state", json.as_str())?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn load<T: DeserializeOwned + Default>(db: &redb::Database) -> Result<T> {
    let tx = db.begin_read()?;
    let table = match tx.open_table(STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(T::default()),
        Err(e) => return Err(e.into()),
    };
    match table.get("state")? {
        Some(v) => serde_json::from_str(v.value()).context("decoding stored network state"),
        None => Ok(T::default()),
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
