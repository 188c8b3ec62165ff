//! Image references and local image archives (OCI layout tar, `docker save` tar); [`store`] gets an
//! image into containerd (import, pull, unpack).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::oci;

mod store;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const MT_DOCKER_LAYER_GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Largest manifest, index or image config read (the OCI distribution spec's limit for manifests): a
/// registry or archive cannot make the NodeEngine hold more for a document.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Largest blob (a layer) or archive entry held for import, whatever a manifest or tar header claims.
pub const MAX_BLOB: u64 = 2 << 30;
/// Largest whole image archive imported.
pub const MAX_ARCHIVE: u64 = 4 << 30;
/// Buffers grow as data arrives: a size a stranger wrote reserves at most this much up front.
pub const PREALLOCATE: u64 = 16 << 20;

/// Refuses a size over `limit` for `what`, before anything is read or reserved.
pub fn check_size(what: &str, size: u64, limit: u64) -> anyhow::Result<()> {
    if size > limit {
        bail!("{what} is {size} bytes, more than the {limit}-byte limit");
    }
    Ok(())
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

pub fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// Where an instance's image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// A registry reference, normalized (`docker.io/library/nginx:latest`).
    Reference(String),
    /// A registry reference given as `http://host[:port]/name[:tag]`: normalized, without the
    /// scheme; the registry is reached over plain HTTP.
    HttpReference(String),
    /// A local archive (OCI layout tar or `docker save` tar).
    Archive(PathBuf),
}

/// Interprets the SLA `code` field.
pub fn parse_source(code: &str) -> anyhow::Result<ImageSource> {
    let code = code.trim();
    if code.is_empty() {
        bail!("invalid image reference: the service has no `code` (image)");
    }
    for prefix in ["oci-archive:", "docker-archive:", "archive:", "file://"] {
        if let Some(p) = code.strip_prefix(prefix) {
            return Ok(ImageSource::Archive(PathBuf::from(p)));
        }
    }
    if code.starts_with('/') || code.starts_with("./") {
        return Ok(ImageSource::Archive(PathBuf::from(code)));
    }
    if let Some(r) = code.strip_prefix("http://") {
        return Ok(ImageSource::HttpReference(normalize_reference(r.trim_end_matches('/'))?));
    }
    if let Some(r) = code.strip_prefix("https://") {
        return Ok(ImageSource::Reference(normalize_reference(r.trim_end_matches('/'))?));
    }
    Ok(ImageSource::Reference(normalize_reference(code)?))
}

/// The local file an instance's `code` names, if it names one: a container's image archive, or a
/// unikernel's `.tar.gz` given as a path (not as a URL).
pub fn local_image_path(virtualization: &str, code: &str) -> Option<PathBuf> {
    if virtualization == "unikernel" {
        let code = code.trim();
        if code.starts_with("http://") || code.starts_with("https://") {
            return None;
        }
        return Some(PathBuf::from(code.strip_prefix("file://").unwrap_or(code)));
    }
    match parse_source(code) {
        Ok(ImageSource::Archive(p)) => Some(p),
        _ => None,
    }
}

/// A local image path the NodeEngine will not read.
#[derive(Debug, thiserror::Error)]
pub enum ImagePathError {
    #[error("image path {path}: {why}")]
    Unreadable { path: String, why: String },
    #[error(
        "image path {path} (really {real}) is outside the image directories ({dirs}): only archives under \
         --image-dir are deployed"
    )]
    Outside { path: String, real: String, dirs: String },
}

/// `path` with every link and `..` resolved, if that lies under one of `dirs` (themselves resolved).
pub fn check_image_path(path: &Path, dirs: &[PathBuf]) -> Result<PathBuf, ImagePathError> {
    let shown = path.display().to_string();
    let real = std::fs::canonicalize(path)
        .map_err(|e| ImagePathError::Unreadable { path: shown.clone(), why: e.to_string() })?;
    if dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| real.starts_with(d)) {
        return Ok(real);
    }
    let dirs = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(ImagePathError::Outside { path: shown, real: real.display().to_string(), dirs })
}

/// Docker-style normalization: `busybox` → `docker.io/library/busybox:latest`.
pub fn normalize_reference(r: &str) -> anyhow::Result<String> {
    let valid = !r.is_empty()
        && r.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        && !r.starts_with(['/', ':', '@', '.', '-'])
        && !r.ends_with(['/', ':', '@']);
    if !valid {
        bail!("invalid image reference '{r}': only [a-z0-9._-/:@] are allowed, e.g. docker.io/library/nginx:1.27");
    }
    let (name_part, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    let last_slash = name_part.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_part[last_slash..].rfind(':') {
        Some(i) => (&name_part[..last_slash + i], Some(&name_part[last_slash + i + 1..])),
        None => (name_part, None),
    };
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("invalid image reference '{r}': repository names must be lowercase");
    }
    let first = name.split('/').next().unwrap_or("");
    let has_domain = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    Ok(match (tag, digest) {
        (_, Some(d)) => format!("{full}{}@{d}", tag.map(|t| format!(":{t}")).unwrap_or_default()),
        (Some(t), None) => format!("{full}:{t}"),
        (None, None) => format!("{full}:latest"),
    })
}

/// A blob to write into the content store.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub media_type: String,
    pub data: Vec<u8>,
    /// GC reference labels (a manifest references its config and layers).
    pub labels: HashMap<String, String>,
}

/// An archive, ready to be written: blobs in dependency order (children first), and the image record.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    pub name: String,
    pub blobs: Vec<Blob>,
    pub target_media_type: String,
    pub target_digest: String,
    pub target_size: i64,
}

fn read_tar(path: &Path) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open image archive {}", path.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut files = HashMap::new();
    let mut total = 0u64;
    for entry in ar.entries().with_context(|| format!("{} is not a tar archive", path.display()))? {
        let mut entry = entry.with_context(|| format!("corrupt tar archive {}", path.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().trim_start_matches("./").to_string();
        let size = entry.size();
        check_size(&format!("entry {name} of {}", path.display()), size, MAX_BLOB)?;
        total += size;
        check_size(&format!("image archive {}", path.display()), total, MAX_ARCHIVE)?;
        let mut data = Vec::with_capacity(size.min(PREALLOCATE) as usize);
        (&mut entry).take(size).read_to_end(&mut data)?;
        files.insert(name, data);
    }
    Ok(files)
}

fn default_name(path: &Path, tag: Option<&str>) -> String {
    let stem = path.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "image".into());
    let stem = stem.trim_end_matches(".tar").trim_end_matches(".oci");
    let clean: String =
        stem.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
    format!("import.local/{}:{}", clean, tag.unwrap_or("latest"))
}

/// Reads an archive and plans its import.
pub fn plan_import(path: &Path, arch: &str) -> anyhow::Result<ImportPlan> {
    let files = read_tar(path)?;
    if files.contains_key("index.json") {
        plan_oci(path, &files, arch)
    } else if files.contains_key("manifest.json") {
        plan_docker(path, &files)
    } else {
        bail!(
            "{} is neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            path.display()
        )
    }
}

fn blob_path(digest: &str) -> anyhow::Result<String> {
    let (alg, hex) = digest.split_once(':').with_context(|| format!("bad digest {digest}"))?;
    Ok(format!("blobs/{alg}/{hex}"))
}

fn plan_oci(path: &Path, files: &HashMap<String, Vec<u8>>, arch: &str) -> anyhow::Result<ImportPlan> {
    let index: oci::Index = serde_json::from_slice(&files["index.json"]).context("index.json is not JSON")?;
    if index.manifests.is_empty() {
        bail!("{}: index.json lists no manifest", path.display());
    }
    let top = oci::select(&index.manifests, arch).with_context(|| format!("{}", path.display()))?;
    let mut blobs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    add_oci_tree(files, top, &mut blobs, &mut seen)?;
    let ann = &top.annotations;
    let name = ann
        .get("io.containerd.image.name")
        .cloned()
        .or_else(|| {
            ann.get("org.opencontainers.image.ref.name").map(|r| {
                if r.contains('/') || r.contains(':') {
                    normalize_reference(r).unwrap_or_else(|_| default_name(path, None))
                } else {
                    default_name(path, Some(r))
                }
            })
        })
        .unwrap_or_else(|| default_name(path, None));
    let media_type = if top.media_type.is_empty() { MT_OCI_MANIFEST } else { &top.media_type };
    Ok(ImportPlan {
        name,
        blobs,
        target_media_type: media_type.to_string(),
        target_digest: top.digest.clone(),
        target_size: top.size,
    })
}

fn add_oci_tree(
    files: &HashMap<String, Vec<u8>>,
    desc: &oci::Descriptor,
    out: &mut Vec<Blob>,
    seen: &mut std::collections::HashSet<String>,
) -> anyhow::Result<()> {
    let digest = desc.digest.clone();
    if !seen.insert(digest.clone()) {
        return Ok(());
    }
    let media_type = desc.media_type.clone();
    let data = files.get(&blob_path(&digest)?).with_context(|| format!("archive lacks blob {digest}"))?.clone();
    if sha256_digest(&data) != digest {
        bail!("blob {digest} in the archive does not match its digest");
    }
    let mut labels = HashMap::new();
    if is_index(&media_type) {
        let doc: oci::Index = serde_json::from_slice(&data).with_context(|| format!("{digest} is not JSON"))?;
        for (i, m) in doc.manifests.iter().enumerate() {
            // Only children present in the archive (single-platform archives list others too).
            if files.contains_key(&blob_path(&m.digest)?) {
                add_oci_tree(files, m, out, seen)?;
                labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), m.digest.clone());
            }
        }
    } else if media_type == MT_OCI_MANIFEST || media_type == MT_DOCKER_MANIFEST {
        let doc: oci::Manifest = serde_json::from_slice(&data).with_context(|| format!("{digest} is not JSON"))?;
        add_oci_tree(files, &doc.config, out, seen)?;
        labels.insert("containerd.io/gc.ref.content.config".into(), doc.config.digest.clone());
        for (i, l) in doc.layers.iter().enumerate() {
            add_oci_tree(files, l, out, seen)?;
            labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
        }
    }
    out.push(Blob { digest, media_type, data, labels });
    Ok(())
}

fn plan_docker(path: &Path, files: &HashMap<String, Vec<u8>>) -> anyhow::Result<ImportPlan> {
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).context("manifest.json is not JSON")?;
    let entry = manifest.as_array().and_then(|a| a.first()).context("manifest.json lists no image")?;
    let config_path = entry["Config"].as_str().context("manifest.json: no Config")?;
    let config = files.get(config_path).with_context(|| format!("archive lacks {config_path}"))?.clone();
    let mut blobs = Vec::new();
    let mut layer_descs = Vec::new();
    let mut labels = HashMap::new();
    for (i, l) in entry["Layers"].as_array().into_iter().flatten().enumerate() {
        let lp = l.as_str().context("bad layer path")?;
        let data = files.get(lp).with_context(|| format!("archive lacks layer {lp}"))?.clone();
        let gz = data.starts_with(&[0x1f, 0x8b]);
        let media_type = if gz { MT_DOCKER_LAYER_GZ } else { MT_DOCKER_LAYER };
        let digest = sha256_digest(&data);
        layer_descs.push(json!({"mediaType": media_type, "size": data.len(), "digest": digest}));
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), digest.clone());
        if !blobs.iter().any(|b: &Blob| b.digest == digest) {
            blobs.push(Blob { digest, media_type: media_type.into(), data, labels: HashMap::new() });
        }
    }
    let config_digest = sha256_digest(&config);
    labels.insert("containerd.io/gc.ref.content.config".into(), config_digest.clone());
    let manifest_doc = json!({
        "schemaVersion": 2,
        "mediaType": MT_DOCKER_MANIFEST,
        "config": {"mediaType": MT_DOCKER_CONFIG, "size": config.len(), "digest": config_digest},
        "layers": layer_descs,
    });
    blobs.push(Blob {
        digest: config_digest,
        media_type: MT_DOCKER_CONFIG.into(),
        data: config,
        labels: HashMap::new(),
    });
    let mdata = serde_json::to_vec(&manifest_doc)?;
    let mdigest = sha256_digest(&mdata);
    let size = mdata.len() as i64;
    blobs.push(Blob { digest: mdigest.clone(), media_type: MT_DOCKER_MANIFEST.into(), data: mdata, labels });
    let name = entry["RepoTags"]
        .as_array()
        .and_then(|t| t.first())
        .and_then(|t| t.as_str())
        .and_then(|t| normalize_reference(t).ok())
        .unwrap_or_else(|| default_name(path, None));
    Ok(ImportPlan {
        name,
        blobs,
        target_media_type: MT_DOCKER_MANIFEST.into(),
        target_digest: mdigest,
        target_size: size,
    })
}

/// Chain IDs of a layer stack (OCI image spec): chain(0)=diff(0), chain(n)=sha256(chain(n-1)+" "+diff(n)).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_entry_claiming_a_huge_size_is_refused_before_any_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("liar.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_path("blobs/sha256/aa").unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        drop(b);
        let e = read_tar(&path).unwrap_err().to_string();
        assert!(e.contains("blobs/sha256/aa") && e.contains("more than the 2147483648-byte limit"), "{e}");
    }

    #[test]
    fn references() {
        assert_eq!(normalize_reference("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(normalize_reference("nginx:1.27").unwrap(), "docker.io/library/nginx:1.27");
        assert_eq!(normalize_reference("oakestra/app:v1").unwrap(), "docker.io/oakestra/app:v1");
        assert_eq!(normalize_reference("ghcr.io/a/b").unwrap(), "ghcr.io/a/b:latest");
        assert_eq!(normalize_reference("localhost:5000/x:1").unwrap(), "localhost:5000/x:1");
        assert!(normalize_reference("Not A Ref!").is_err());
        assert!(normalize_reference("UPPER/case").is_err());
        assert_eq!(parse_source("oci-archive:/tmp/x.tar").unwrap(), ImageSource::Archive("/tmp/x.tar".into()));
        assert_eq!(parse_source("/tmp/x.tar").unwrap(), ImageSource::Archive("/tmp/x.tar".into()));
        assert!(parse_source("").is_err());
        assert_eq!(
            parse_source("http://127.0.0.1:5000/oak/busybox:1").unwrap(),
            ImageSource::HttpReference("127.0.0.1:5000/oak/busybox:1".into())
        );
        assert_eq!(parse_source("https://ghcr.io/a/b").unwrap(), ImageSource::Reference("ghcr.io/a/b:latest".into()));
        assert_eq!(
            parse_source("127.0.0.1:5000/oak/busybox:1").unwrap(),
            ImageSource::Reference("127.0.0.1:5000/oak/busybox:1".into())
        );
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(normalize_reference(&format!("busybox@{d}")).unwrap(), format!("docker.io/library/busybox@{d}"));
        assert_eq!(normalize_reference(&format!("localhost:5000/x:1@{d}")).unwrap(), format!("localhost:5000/x:1@{d}"));
    }

    #[test]
    fn chain() {
        let c = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256_digest(b"sha256:a sha256:b"));
    }
}
