//! The embedded store backend: one crash-safe redb file, `<data-dir>/root.redb`, a redb table per store
//! table (`&str` keys, JSON bytes). redb allows one write transaction at a time and commits it atomically.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{Backend, Fence, Location, RawTx, TABLES};

type Def<'a> = TableDefinition<'a, &'static str, &'static [u8]>;

pub(super) struct RedbBackend {
    db: Database,
    path: PathBuf,
}

impl RedbBackend {
    /// Opens (or creates) `<dir>/root.redb` with the root's tables; the directory 0700, the file 0600.
    pub(super) fn open(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making data dir {} private (0700)", dir.display()))?;
        let path = dir.join("root.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private (0600)", path.display()))?;
        let tx = db.begin_write()?;
        for t in TABLES {
            tx.open_table(Def::new(t))?;
        }
        tx.commit()?;
        Ok(Self { db, path })
    }
}

/// Every entry of an open table, by key.
fn entries(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in table.iter()? {
        let (k, v) = e?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

impl Backend for RedbBackend {
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let rt = self.db.begin_read()?;
        let t = match rt.open_table(Def::new(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let rt = self.db.begin_read()?;
        match rt.open_table(Def::new(table)) {
            Ok(t) => entries(&t),
            Err(TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&self) -> Result<Box<dyn RawTx>> {
        Ok(Box::new(RedbTx { tx: self.db.begin_write()? }))
    }

    fn set_fence(&self, fence: Option<Fence>) -> Result<()> {
        match fence {
            None => Ok(()),
            Some(f) => bail!(
                "cannot fence commits on {}: fencing needs the etcd store (the embedded store {} has one writer, \
                 this process)",
                f.key,
                self.path.display()
            ),
        }
    }

    fn location(&self) -> Location {
        Location::Embedded(self.path.clone())
    }
}

struct RedbTx {
    tx: redb::WriteTransaction,
}

impl RawTx for RedbTx {
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let t = self.tx.open_table(Def::new(table))?;
        let v = t.get(key)?.map(|v| v.value().to_vec());
        Ok(v)
    }
    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>> {
        entries(&self.tx.open_table(Def::new(table))?)
    }
    fn put(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()> {
        self.tx.open_table(Def::new(table))?.insert(key, value.as_slice())?;
        Ok(())
    }
    fn put_new(&self, table: &str, key: &str, value: Vec<u8>) -> Result<()> {
        // the one write transaction of the file: nobody can make the key between this check and the commit
        let mut t = self.tx.open_table(Def::new(table))?;
        if t.get(key)?.is_some() {
            bail!("{table}/{key} is there already: nothing was stored");
        }
        t.insert(key, value.as_slice())?;
        Ok(())
    }
    fn delete(&self, table: &str, key: &str) -> Result<()> {
        self.tx.open_table(Def::new(table))?.remove(key)?;
        Ok(())
    }
    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit()?;
        Ok(())
    }
}
