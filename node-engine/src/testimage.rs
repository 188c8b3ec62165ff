//! Minimal OCI image archives built from a static busybox, offline: for edge sites without a registry
//! (and for the tests). `cargo xtask image` writes one; the NodeEngine imports such archives when an SLA's
//! `code` is a path (`oci-archive:/path/img.tar`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Where Debian's busybox-static installs it.
pub use crate::runtime::guest::BUSYBOX;

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Appends a regular file (mtime 0, so archives are reproducible).
pub fn append_file(t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    t.append_data(&mut h, path, data)
}

/// Appends a directory.
pub fn append_dir(t: &mut tar::Builder<Vec<u8>>, path: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    t.append_data(&mut h, path, std::io::empty())
}

/// Appends a symbolic link.
pub fn append_symlink(t: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(0);
    t.append_link(&mut h, path, target)
}

/// Writes an OCI image layout tar (single layer: busybox + applet symlinks + /www/index.html with
/// "hello-oak") named `name` (e.g. `localhost/busybox:oak`) into `dir`; returns its path.
pub fn build_busybox_image(dir: &Path, name: &str) -> Result<PathBuf> {
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "www", "tmp", "etc", "proc", "sys", "dev", "run"] {
        append_dir(&mut layer, d)?;
    }
    let bb = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (install busybox-static)"))?;
    append_file(&mut layer, "bin/busybox", &bb, 0o755)?;
    for applet in ["sh", "httpd", "sleep", "wget", "echo", "cat", "ls"] {
        append_symlink(&mut layer, &format!("bin/{applet}"), "busybox")?;
    }
    append_file(&mut layer, "www/index.html", b"hello-oak", 0o644)?;
    let layer = layer.into_inner()?;
    let layer_digest = digest(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": oak_proto::arch::this_machine(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "IMAGE_VAR=from-image"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name},
        }],
    }))?;

    let mut out = tar::Builder::new(Vec::new());
    append_file(&mut out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
    append_file(&mut out, "index.json", &index, 0o644)?;
    for (d, data) in [(&layer_digest, &layer), (&config_digest, &config), (&manifest_digest, &manifest)] {
        append_file(&mut out, &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), data, 0o644)?;
    }
    let path = dir.join("busybox-oci.tar");
    std::fs::write(&path, out.into_inner()?).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
