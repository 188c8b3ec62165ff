//! The fields of the OCI image documents the NodeEngine reads (index / Docker manifest list,
//! manifest, config), typed, and the one rule that picks this worker's manifest from an index.

use std::collections::HashMap;

use serde::Deserialize;

/// A content descriptor (an index's entry, a manifest's config or layer).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// The platform an index entry is for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_unknown = |s: &str| if s.is_empty() { "?".to_string() } else { s.to_string() };
        write!(f, "{}/{}", or_unknown(&self.os), or_unknown(&self.architecture))?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// An OCI image index or a Docker manifest list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An OCI image manifest or a Docker v2 schema 2 manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config that decide whether and how it runs here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// No entry of an index is for this worker.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no manifest for this platform linux/{arch} in the image index (it has: {have})")]
pub struct NoPlatform {
    pub arch: String,
    pub have: String,
}

/// This worker's entry of an index, for Linux on `arch` (Go's name). The rule: the first entry
/// whose platform is os `linux` (an empty os counts as linux) and architecture `arch` (any
/// spelling, see [`oak_proto::arch::normalize`]); else the first entry without a platform (a
/// single-platform layout often omits it; the config's architecture is checked on unpack); else
/// none. Variants are not compared: the worker does not know its own.
pub fn select<'a>(manifests: &'a [Descriptor], arch: &str) -> Result<&'a Descriptor, NoPlatform> {
    let arch = oak_proto::arch::normalize(arch);
    let ours =
        |p: &Platform| (p.os.is_empty() || p.os == "linux") && oak_proto::arch::normalize(&p.architecture) == arch;
    manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(ours))
        .or_else(|| manifests.iter().find(|d| d.platform.is_none()))
        .ok_or_else(|| {
            let have: Vec<String> =
                manifests.iter().map(|d| d.platform.clone().unwrap_or_default().to_string()).collect();
            NoPlatform { arch, have: have.join(", ") }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest: &str, platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            digest: digest.into(),
            platform: platform.map(|(os, arch)| Platform { os: os.into(), architecture: arch.into(), variant: None }),
            ..Default::default()
        }
    }

    #[test]
    fn picks_this_platform() {
        // Exact os+arch wins over an earlier foreign entry and over an entry without platform.
        let idx = [entry("a", Some(("linux", "s390x"))), entry("b", None), entry("c", Some(("linux", "amd64")))];
        assert_eq!(select(&idx, "amd64").unwrap().digest, "c");
        // Any spelling of the architecture; an empty os is linux; another os is not.
        assert_eq!(select(&[entry("d", Some(("", "x86_64")))], "amd64").unwrap().digest, "d");
        assert!(select(&[entry("w", Some(("windows", "amd64")))], "amd64").is_err());
        // A single-platform layout's entry without platform.
        assert_eq!(select(&[entry("e", None)], "arm64").unwrap().digest, "e");
        // Only foreign entries (and attestations): none, naming what the index has.
        let e = select(&[entry("f", Some(("linux", "s390x"))), entry("g", Some(("unknown", "unknown")))], "amd64")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "no manifest for this platform linux/amd64 in the image index (it has: linux/s390x, unknown/unknown)"
        );
        assert!(select(&[], "amd64").is_err());
    }

    #[test]
    fn reads_documents() {
        let idx: Index = serde_json::from_str(
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"sha256:1","size":3,
                "platform":{"os":"linux","architecture":"arm","variant":"v7"}}]}"#,
        )
        .unwrap();
        assert_eq!(idx.manifests[0].platform.as_ref().unwrap().to_string(), "linux/arm/v7");
        let m: Manifest =
            serde_json::from_str(r#"{"config":{"digest":"sha256:c"},"layers":[{"digest":"sha256:l"}]}"#).unwrap();
        assert_eq!((m.config.digest.as_str(), m.layers.len()), ("sha256:c", 1));
        let c: Config =
            serde_json::from_str(r#"{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":["sha256:d"]}}"#)
                .unwrap();
        assert_eq!(c.rootfs.diff_ids, ["sha256:d"]);
    }
}
