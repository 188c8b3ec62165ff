//! The root's certificate authority shared by its replicas through the store: the files under
//! `<data-dir>/ca/` (`ca.pem`, `ca.key`, `server.pem`, `server.key`, `join-tokens/*.json`, `api.pem`,
//! `api.key` when made) are also kept in the store's [`CA_FILES`] table, so every replica, on whatever
//! machine, serves the one CA its clusters trust and checks the same join tokens.
//!
//! **The store is the source of truth.** [`sync_dir`] makes a directory agree with it, store first:
//!
//! 1. It reads every stored file and checks each path (relative, inside the directory, no `..`, no hidden
//!    component): one bad entry refuses the whole sync, naming it, before anything is written or uploaded.
//! 2. It uploads the local files the store does not hold, in one transaction that puts only the keys
//!    still absent inside it. The first replica to commit a CA wins: a replica that made its own CA at the
//!    same time finds the keys taken and uploads nothing of it (how exactly: see below).
//! 3. It reads the store back and writes every stored file whose bytes differ locally, through a temporary
//!    file renamed into place (files 0600, directories 0700), never through a symlink.
//!
//! So a stored file deleted or changed only locally comes back as the store has it — a join token revoked
//! or made by editing this replica's files included. A deliberate local change is published with
//! [`publish`] (the store's copy is replaced), then the other replicas take it at their next sync. Files
//! are never deleted anywhere: the store only grows, as join tokens do.
//!
//! Not synced: names starting with `.` (this module's temporary files), `oak-trust`'s temporary files
//! (`<name>.tmp<pid>`), symlinks, other non-regular files and names that are not UTF-8.
//!
//! At start, [`open_authority`] syncs, opens the [`oak_trust::Authority`] (which makes a CA when none came
//! from the store), syncs again to upload it, and opens it again when that second sync took another
//! replica's files instead.
//!
//! Step 2 puts with [`Tx::put_new`](super::store::Tx::put_new), so "first committer wins" holds across
//! replicas: the embedded store has one writer (this process); on etcd the commit requires every key it
//! makes still absent, so of two replicas whose uploads overlap the later commit fails whole, and its sync
//! tries once more against the store as the winner left it (uploading nothing of its own CA, then writing
//! the winner's files here).
//!
//! Values are JSON `{"path": "<relative path>", "data": "<base64>"}` under the key `<relative path>`; the
//! path is in the value because the store lists values without their keys. A stored CA is a few kB and a
//! join token a few hundred bytes; the first upload is one etcd transaction, so it must stay under etcd's
//! `--max-txn-ops` (128 by default) files.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::store::{Store, Table};

/// The CA's files, keyed by their path relative to the CA directory (`ca.pem`, `join-tokens/<id>.json`).
pub const CA_FILES: Table = "ca_files";

/// Every synced file's mode: keys and join tokens are secrets, and `oak-trust` writes the certificates
/// 0600 as well.
const FILE_MODE: u32 = 0o600;
/// How often an upload is tried: a commit that failed is tried once more against what the store then
/// holds (a store that refuses a conflicting commit, or one that was not reachable for a moment).
const UPLOAD_ATTEMPTS: usize = 2;
/// The files [`oak_trust::Authority`] reads once, at open.
const AUTHORITY_FILES: [&str; 4] = ["ca.pem", "ca.key", "server.pem", "server.key"];

/// What one sync changed, for the log: relative paths, sorted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Written locally from the store (missing here, or different).
    pub downloaded: Vec<String>,
    /// Put into the store from here (the store had no such file).
    pub uploaded: Vec<String>,
}

impl SyncReport {
    /// Whether the sync replaced a file an open [`oak_trust::Authority`] read at open (the CA or the
    /// server certificate): that authority is stale and must be opened again.
    pub fn authority_changed(&self) -> bool {
        self.downloaded.iter().any(|p| AUTHORITY_FILES.contains(&p.as_str()))
    }
}

/// One file in the store.
#[derive(Serialize, Deserialize)]
struct StoredFile {
    /// The file's path under the CA directory, `/`-separated: the same as its key.
    path: String,
    /// Its bytes, base64 (standard alphabet, padded).
    data: String,
}

impl StoredFile {
    fn new(path: &str, bytes: &[u8]) -> Self {
        Self { path: path.to_string(), data: base64::engine::general_purpose::STANDARD.encode(bytes) }
    }
}

/// Why `path` may not name a file under the directory, if it may not.
fn bad_path(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("it is empty");
    }
    if path.starts_with('/') {
        return Some("it is absolute");
    }
    if path.contains('\0') {
        return Some("it holds a NUL byte");
    }
    for c in path.split('/') {
        if c == ".." {
            return Some("it climbs out with `..`");
        }
        if c.is_empty() || c == "." {
            return Some("it has an empty or `.` component");
        }
        if c.starts_with('.') {
            return Some("it has a hidden component (never synced)");
        }
    }
    None
}

/// Every file the store holds, checked: paths safe and unique, data base64. One bad entry is an error
/// naming it.
fn stored(entries: Vec<StoredFile>) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for f in entries {
        if let Some(why) = bad_path(&f.path) {
            bail!(
                "the store's {CA_FILES} entry {:?} is not a path inside the CA directory ({why}): refusing it, \
                 nothing was synced",
                f.path
            );
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&f.data)
            .with_context(|| format!("the store's {CA_FILES} entry {:?}: its data is not base64", f.path))?;
        if files.insert(f.path.clone(), bytes).is_some() {
            bail!("the store's {CA_FILES} holds {:?} twice: refusing it, nothing was synced", f.path);
        }
    }
    // a file may not also be a directory of another one (`a` and `a/b`)
    for p in files.keys() {
        let mut parents = p.match_indices('/').map(|(i, _)| &p[..i]);
        if let Some(q) = parents.find(|q| files.contains_key(*q)) {
            bail!("the store's {CA_FILES} holds both the file {q:?} and {p:?} under it: nothing was synced");
        }
    }
    Ok(files)
}

fn read_store(store: &Store) -> Result<BTreeMap<String, Vec<u8>>> {
    stored(store.list(CA_FILES)?)
}

/// Whether `name` is one of `oak-trust`'s temporary files (`<stem>.tmp<pid>`, renamed into place once
/// written).
fn trust_temp(name: &str) -> bool {
    name.rsplit_once('.')
        .and_then(|(_, ext)| ext.strip_prefix("tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Every regular file under `dir` (relative paths), skipping what is not synced (see the module doc).
fn scan(dir: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let path = e.path();
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            tracing::warn!(path = %path.display(), "not synced: the name is not UTF-8");
            continue;
        };
        if name.starts_with('.') || trust_temp(&name) {
            continue;
        }
        let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let ty = e.file_type().with_context(|| format!("reading {}", path.display()))?;
        if ty.is_dir() {
            scan(&path, &key, out)?;
        } else if ty.is_file() {
            out.insert(key, std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        } else {
            tracing::warn!(path = %path.display(), "not synced: not a regular file or directory");
        }
    }
    Ok(())
}

/// The file `rel` names under `dir`, after checking that every directory on the way is a real one (not a
/// symlink, not a file) and, with `create`, making the missing ones (0700). The file itself may be
/// missing; a directory in its place is an error.
fn target(dir: &Path, rel: &str, create: bool) -> Result<PathBuf> {
    let mut p = dir.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    let (file, parents) = parts.split_last().ok_or_else(|| anyhow!("an empty path"))?;
    for c in parents {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} is not a directory (a symlink or a file): not writing {rel} through it", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if create {
                    oak_trust::private_dir(&p)?;
                }
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    p.push(file);
    if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
        bail!("{} is a directory: not replacing it with the store's file {rel}", p.display());
    }
    Ok(p)
}

/// Makes `path` hold `bytes` (0600) unless it does already, written whole ([`oak_trust::write_private`]:
/// a crash leaves the old file or the new one). Whether the bytes were written.
fn write_file(path: &Path, bytes: &[u8]) -> Result<bool> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.is_file() && std::fs::read(path).is_ok_and(|old| old == bytes) {
            if m.permissions().mode() & 0o7777 != FILE_MODE {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
                    .with_context(|| format!("chmod {}", path.display()))?;
            }
            return Ok(false);
        }
    }
    oak_trust::write_private(path, bytes)?;
    Ok(true)
}

/// Makes `dir` (the CA directory, made 0700 when missing) and the store agree, the store winning: see the
/// module doc. An entry of the store that is not a safe relative path is refused by name, and then
/// nothing is uploaded or written.
pub fn sync_dir(store: &Store, dir: &Path) -> Result<SyncReport> {
    oak_trust::private_dir(dir)?;
    let mut report = SyncReport::default();
    let mut before = read_store(store)?;
    for attempt in 1..=UPLOAD_ATTEMPTS {
        let mut local = BTreeMap::new();
        scan(dir, "", &mut local)?;
        let missing: BTreeMap<String, Vec<u8>> = local.into_iter().filter(|(k, _)| !before.contains_key(k)).collect();
        if missing.is_empty() {
            break;
        }
        let committed = store.update(|tx| {
            // the decision is made here, inside the transaction: only keys still absent are put
            let held: BTreeSet<String> = tx.list::<StoredFile>(CA_FILES)?.into_iter().map(|f| f.path).collect();
            let mut put = Vec::new();
            for (path, bytes) in &missing {
                if !held.contains(path) {
                    tx.put_new(CA_FILES, path, &StoredFile::new(path, bytes))?;
                    put.push(path.clone());
                }
            }
            Ok(put)
        });
        match committed {
            Ok(put) => {
                report.uploaded = put;
                break;
            }
            Err(e) if attempt < UPLOAD_ATTEMPTS => {
                tracing::warn!(dir = %dir.display(), "uploading the CA's files failed, trying again: {e:#}");
                before = read_store(store)?;
            }
            Err(e) => return Err(e.context(format!("uploading the CA's files in {} to the store", dir.display()))),
        }
    }
    // the store's files as committed, ours or another replica's
    let files = read_store(store)?;
    // every target is checked before the first write, so a bad one writes nothing
    for path in files.keys() {
        target(dir, path, false)?;
    }
    for (path, bytes) in &files {
        if write_file(&target(dir, path, true)?, bytes)? {
            report.downloaded.push(path.clone());
        }
    }
    Ok(report)
}

/// Puts the local file `rel` (relative to `dir`) into the store over whatever the store holds there: a
/// deliberate change made on this replica (a join token revoked, say) that [`sync_dir`] alone would take
/// back. The other replicas take it at their next sync.
pub fn publish(store: &Store, dir: &Path, rel: &str) -> Result<()> {
    if let Some(why) = bad_path(rel) {
        bail!("cannot publish {rel:?}: not a path inside the CA directory ({why})");
    }
    let path = target(dir, rel, false)?;
    let m = std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    if !m.is_file() {
        bail!("cannot publish {}: not a regular file", path.display());
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    store.update(|tx| tx.put(CA_FILES, rel, &StoredFile::new(rel, &bytes)))
}

/// Opens the authority kept in `dir` as the store has it: syncs, opens (making a CA named `ca_name` and a
/// server certificate for `server_name` when none came from the store), syncs again to upload what was
/// made, and opens again when that sync took another replica's CA or server certificate instead (two
/// replicas that started at once).
pub fn open_authority(store: &Store, dir: &Path, ca_name: &str, server_name: &str) -> Result<oak_trust::Authority> {
    let first = sync_dir(store, dir)?;
    let authority = oak_trust::Authority::open(dir, ca_name, server_name)?;
    let second = sync_dir(store, dir)?;
    tracing::info!(
        dir = %dir.display(),
        downloaded = ?[first.downloaded, second.downloaded.clone()].concat(),
        uploaded = ?[first.uploaded, second.uploaded.clone()].concat(),
        "the CA's files agree with the store"
    );
    if second.authority_changed() {
        return oak_trust::Authority::open(dir, ca_name, server_name);
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;
    use crate::root::store::EtcdConfig;
    use crate::testing::etcd::Etcd;

    const CA_NAME: &str = "test root CA";

    /// Keeps a test's stores alive (temp dirs, etcd).
    struct Keep {
        _dirs: Vec<tempfile::TempDir>,
        _etcd: Option<Etcd>,
    }

    /// Two replicas' stores on one embedded store (one process, so one `Store`), with a scratch dir.
    fn embedded() -> ([Store; 2], tempfile::TempDir, Keep) {
        let db = tempfile::tempdir().unwrap();
        let s = Store::open(db.path()).unwrap();
        ([s.clone(), s], tempfile::tempdir().unwrap(), Keep { _dirs: vec![db], _etcd: None })
    }

    /// Two replicas' stores on one etcd, each its own connection and writer (as two processes would
    /// have); None when there is no etcd binary (skipped, saying why, unless env CI is set).
    fn on_etcd() -> Option<([Store; 2], tempfile::TempDir, Keep)> {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path())?;
        let cfg = EtcdConfig { prefix: "/test/root".into(), ..EtcdConfig::new(vec![etcd.endpoint.clone()]) };
        let stores = [Store::open_etcd(&cfg).unwrap(), Store::open_etcd(&cfg).unwrap()];
        Some((stores, tempfile::tempdir().unwrap(), Keep { _dirs: vec![dir], _etcd: Some(etcd) }))
    }

    /// Runs a test body (`fn(&[Store; 2], &Path)`) on each backend.
    macro_rules! on_both {
        ($name:ident) => {
            mod $name {
                #[test]
                fn embedded() {
                    let (s, dir, _keep) = super::embedded();
                    super::$name(&s, dir.path());
                }
                #[test]
                fn etcd() {
                    if let Some((s, dir, _keep)) = super::on_etcd() {
                        super::$name(&s, dir.path());
                    }
                }
            }
        };
    }

    /// Every file under `dir` with its bytes and mode (`.`-names included: nothing may be left behind).
    fn files(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
        fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, (Vec<u8>, u32)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    assert_eq!(m.permissions().mode() & 0o777, 0o700, "{key}: directories are 0700");
                    walk(&e.path(), &key, out);
                } else {
                    out.insert(key, (std::fs::read(e.path()).unwrap(), m.permissions().mode() & 0o777));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, "", &mut out);
        out
    }

    fn keys(f: &BTreeMap<String, (Vec<u8>, u32)>) -> Vec<&str> {
        f.keys().map(String::as_str).collect()
    }

    /// (1) The first replica uploads its CA; a second with an empty dir gets the same files, 0600, and
    /// opens the same authority. A sync with nothing new changes nothing.
    fn the_first_replica_uploads_and_the_next_downloads(s: &[Store; 2], tmp: &Path) {
        let (a, b) = (tmp.join("a/ca"), tmp.join("b/ca"));
        let auth_a = oak_trust::Authority::open(&a, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        auth_a.tokens.create(&auth_a.pin(), 0, "first").unwrap();
        let r = sync_dir(&s[0], &a).unwrap();
        assert!(r.downloaded.is_empty(), "{r:?}");
        assert_eq!(r.uploaded.len(), 5, "ca.pem, ca.key, server.pem, server.key and the token: {r:?}");
        assert!(r.uploaded.iter().any(|p| p.starts_with("join-tokens/") && p.ends_with(".json")), "{r:?}");

        let r = sync_dir(&s[1], &b).unwrap();
        assert!(r.uploaded.is_empty(), "{r:?}");
        assert_eq!(r.downloaded.len(), 5, "{r:?}");
        assert!(r.authority_changed());
        let (fa, fb) = (files(&a), files(&b));
        assert_eq!(fa, fb, "byte-identical, same modes");
        assert!(fb.values().all(|(_, mode)| *mode == 0o600), "{:?}", keys(&fb));
        assert_eq!(std::fs::symlink_metadata(&b).unwrap().permissions().mode() & 0o777, 0o700);
        let auth_b = oak_trust::Authority::open(&b, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        assert_eq!(auth_b.pin(), auth_a.pin(), "the same CA");
        assert_eq!(files(&b), fb, "opening the downloaded authority changed nothing (its server certificate fits)");

        assert_eq!(sync_dir(&s[0], &a).unwrap(), SyncReport::default(), "nothing new");
        assert_eq!(sync_dir(&s[1], &b).unwrap(), SyncReport::default(), "nothing new");

        // a stored file lost (or changed) locally comes back as the store has it
        std::fs::remove_file(b.join("ca.key")).unwrap();
        std::fs::write(b.join("server.pem"), b"tampered").unwrap();
        let r = sync_dir(&s[1], &b).unwrap();
        assert_eq!(r.downloaded, ["ca.key", "server.pem"]);
        assert_eq!(files(&b), fa);
    }
    on_both!(the_first_replica_uploads_and_the_next_downloads);

    /// (2) Two replicas that each made their own CA: the one that commits first wins, the other ends with
    /// its files, byte for byte, and reopens to the same pin.
    fn two_ca_s_converge_on_the_first_committers(s: &[Store; 2], tmp: &Path) {
        let (a, b) = (tmp.join("a/ca"), tmp.join("b/ca"));
        let auth_a = oak_trust::Authority::open(&a, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        let auth_b = oak_trust::Authority::open(&b, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        assert_ne!(auth_a.pin(), auth_b.pin());
        let a_files = files(&a);
        assert_ne!(a_files, files(&b));

        let r = sync_dir(&s[0], &a).unwrap();
        assert_eq!(r.uploaded, ["ca.key", "ca.pem", "server.key", "server.pem"]);
        let r = sync_dir(&s[1], &b).unwrap();
        assert!(r.uploaded.is_empty(), "the store had them all: {r:?}");
        assert_eq!(r.downloaded, ["ca.key", "ca.pem", "server.key", "server.pem"]);
        assert!(r.authority_changed());
        assert_eq!(files(&b), a_files, "b took a's files");
        assert_eq!(sync_dir(&s[0], &a).unwrap(), SyncReport::default());
        assert_eq!(files(&a), a_files, "a kept its own");
        let reopened = oak_trust::Authority::open(&b, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        assert_eq!(reopened.pin(), auth_a.pin());
    }
    on_both!(two_ca_s_converge_on_the_first_committers);

    /// Two replicas starting at once through `open_authority`, each on its own thread (and, on etcd, its
    /// own connection): they end with one CA, byte-identical files and the same pin.
    fn replicas_opening_at_once_agree(s: &[Store; 2], tmp: &Path) {
        let barrier = std::sync::Barrier::new(2);
        let pins: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = ["a", "b"]
                .iter()
                .zip(s)
                .map(|(name, store)| {
                    let (dir, barrier) = (tmp.join(name).join("ca"), &barrier);
                    sc.spawn(move || {
                        barrier.wait();
                        open_authority(store, &dir, CA_NAME, oak_trust::ROOT_SERVER).unwrap().pin()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut late = Vec::new();
        for (store, name) in s.iter().zip(["a", "b"]) {
            late.push(sync_dir(store, &tmp.join(name).join("ca")).unwrap());
        }
        let (fa, fb) = (files(&tmp.join("a/ca")), files(&tmp.join("b/ca")));
        assert_eq!(fa, fb);
        let opened = oak_trust::Authority::open(&tmp.join("a/ca"), CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        // the first commit is the one both read back: nothing was left for a later sync
        assert_eq!(pins, [opened.pin(), opened.pin()]);
        assert_eq!(late, [SyncReport::default(), SyncReport::default()]);
    }
    on_both!(replicas_opening_at_once_agree);

    /// (3) A join token made on one replica is uploaded by its next sync and appears on the other at its
    /// next; a revocation published from the other comes back the other way. Temporary files stay local.
    fn a_new_join_token_travels(s: &[Store; 2], tmp: &Path) {
        let (a, b) = (tmp.join("a/ca"), tmp.join("b/ca"));
        let auth_a = oak_trust::Authority::open(&a, CA_NAME, oak_trust::ROOT_SERVER).unwrap();
        sync_dir(&s[0], &a).unwrap();
        sync_dir(&s[1], &b).unwrap();
        let auth_b = oak_trust::Authority::open(&b, CA_NAME, oak_trust::ROOT_SERVER).unwrap();

        let (token, t) = auth_a.tokens.create(&auth_a.pin(), 0, "for cluster 7").unwrap();
        let key = format!("join-tokens/{}.json", t.id);
        std::fs::write(a.join("join-tokens/half.tmp4242"), b"oak-trust writing").unwrap();
        std::fs::write(a.join(".hidden"), b"not synced").unwrap();
        assert!(auth_b.tokens.check(&token).is_err(), "b does not know it yet");
        let r = sync_dir(&s[0], &a).unwrap();
        assert_eq!(r, SyncReport { downloaded: vec![], uploaded: vec![key.clone()] });
        let r = sync_dir(&s[1], &b).unwrap();
        assert_eq!(r, SyncReport { downloaded: vec![key.clone()], uploaded: vec![] });
        assert!(!r.authority_changed());
        assert_eq!(std::fs::read(b.join(&key)).unwrap(), std::fs::read(a.join(&key)).unwrap());
        assert_eq!(std::fs::metadata(b.join(&key)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(auth_b.tokens.check(&token), Ok(t.id.clone()), "b takes the token (tokens are read per join)");
        assert!(!b.join("join-tokens/half.tmp4242").exists() && !b.join(".hidden").exists());

        // revoked on b only: the store wins and the revocation is undone ...
        assert!(auth_b.tokens.revoke(&t.id).unwrap());
        assert_eq!(sync_dir(&s[1], &b).unwrap().downloaded, [key.as_str()]);
        assert!(auth_b.tokens.check(&token).is_ok());
        // ... unless it is published
        assert!(auth_b.tokens.revoke(&t.id).unwrap());
        publish(&s[1], &b, &key).unwrap();
        assert_eq!(sync_dir(&s[1], &b).unwrap(), SyncReport::default());
        assert_eq!(sync_dir(&s[0], &a).unwrap().downloaded, [key.as_str()]);
        assert!(auth_a.tokens.check(&token).is_err(), "revoked on a too");
    }
    on_both!(a_new_join_token_travels);

    /// (4) A store entry naming a path outside the directory is refused by name, and nothing is written
    /// anywhere (nor uploaded): not outside, not the good entries either. A symlink out of the directory
    /// is not written through.
    fn a_path_out_of_the_directory_is_refused(s: &[Store; 2], tmp: &Path) {
        let dir = tmp.join("r/ca");
        let outside = tmp.join("r/evil");
        let absolute = tmp.join("abs-evil");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("local.pem"), b"mine").unwrap();
        s[0].update(|tx| tx.put(CA_FILES, "ca.pem", &StoredFile::new("ca.pem", b"good"))).unwrap();
        for bad in ["../evil", absolute.to_str().unwrap(), "join-tokens/../../evil", "a//b", ".hidden", ""] {
            let put = s[0].update(|tx| tx.put(CA_FILES, bad, &StoredFile::new(bad, b"owned")));
            if bad.is_empty() && put.is_err() {
                continue;
            }
            put.unwrap();
            let e = format!("{:#}", sync_dir(&s[1], &dir).unwrap_err());
            assert!(e.contains(&format!("{bad:?}")) && e.contains(CA_FILES), "names the entry {bad:?}: {e}");
            assert!(!outside.exists() && !absolute.exists());
            assert_eq!(keys(&files(&dir)), ["local.pem"], "nothing written for {bad:?}");
            s[0].update(|tx| tx.delete(CA_FILES, bad)).unwrap();
        }
        // a value whose path differs from its key: the path is what would be written, so it is checked
        s[0].update(|tx| tx.put(CA_FILES, "innocent", &StoredFile::new("../evil", b"owned"))).unwrap();
        let e = format!("{:#}", sync_dir(&s[1], &dir).unwrap_err());
        assert!(e.contains("\"../evil\""), "{e}");
        s[0].update(|tx| tx.delete(CA_FILES, "innocent")).unwrap();
        assert_eq!(s[0].list::<StoredFile>(CA_FILES).unwrap().len(), 1, "nothing was uploaded");

        // a directory of the CA that is a symlink out of it is not written through
        let elsewhere = tmp.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("join-tokens")).unwrap();
        s[0].update(|tx| tx.put(CA_FILES, "join-tokens/x.json", &StoredFile::new("join-tokens/x.json", b"t"))).unwrap();
        let e = format!("{:#}", sync_dir(&s[1], &dir).unwrap_err());
        assert!(e.contains("join-tokens") && e.contains("not a directory"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing written through the symlink");
        assert!(!dir.join("ca.pem").exists(), "checked before the first write");
        // (a local problem: the local file was uploaded all the same)
        assert_eq!(s[0].list::<StoredFile>(CA_FILES).unwrap().len(), 3);

        // data that is not base64 names the entry too
        std::fs::remove_file(dir.join("join-tokens")).unwrap();
        s[0].update(|tx| tx.put(CA_FILES, "x.pem", &StoredFile { path: "x.pem".into(), data: "%%".into() })).unwrap();
        let e = format!("{:#}", sync_dir(&s[1], &dir).unwrap_err());
        assert!(e.contains("\"x.pem\"") && e.contains("base64"), "{e}");
        s[0].update(|tx| tx.delete(CA_FILES, "x.pem")).unwrap();
        // with the bad entries gone, the sync goes through
        let r = sync_dir(&s[1], &dir).unwrap();
        assert_eq!(r, SyncReport { downloaded: vec!["ca.pem".into(), "join-tokens/x.json".into()], uploaded: vec![] });
        assert!(files(&dir).values().all(|(_, mode)| *mode == 0o600), "local.pem made 0600 too");
        // a file and a directory of the same name in the store
        s[0].update(|tx| tx.put(CA_FILES, "ca.pem/x", &StoredFile::new("ca.pem/x", b"x"))).unwrap();
        let e = format!("{:#}", sync_dir(&s[1], &dir).unwrap_err());
        assert!(e.contains("\"ca.pem\"") && e.contains("\"ca.pem/x\""), "{e}");
    }
    on_both!(a_path_out_of_the_directory_is_refused);

    #[test]
    fn paths() {
        for ok in ["ca.pem", "join-tokens/abc.json", "a/b/c"] {
            assert_eq!(bad_path(ok), None, "{ok}");
        }
        for bad in
            ["", "/etc/passwd", "..", "../x", "a/../b", "a/..", "./a", "a/./b", "a//b", "a/", ".x", "a/.b", "a\0b"]
        {
            assert!(bad_path(bad).is_some(), "{bad:?}");
        }
        assert!(trust_temp("ca.tmp123") && trust_temp("abc.tmp1"));
        assert!(!trust_temp("ca.pem") && !trust_temp("x.tmp") && !trust_temp("tmp12") && !trust_temp("a.tmp1x"));
    }
}
