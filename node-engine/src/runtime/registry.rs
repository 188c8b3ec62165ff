//! Client side of the OCI distribution protocol (pull only), for containerd without the Transfer
//! service (containerd 1.6): manifests and blobs are fetched here, verified, and written into
//! containerd's content store by [`super::containerd::Containerd`].
//!
//! * `GET /v2/<name>/manifests/<ref>` (OCI index/manifest, Docker manifest list/manifest); an index is
//!   resolved to the manifest for `linux/<go arch>`.
//! * `GET /v2/<name>/blobs/<digest>` for config and layers; every sha256 digest is verified.
//! * Anonymous bearer tokens: a `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`
//!   fetches a token from the realm and retries.
//! * `docker.io` is served by `registry-1.docker.io`. Plain HTTP is used for `http://host/…`
//!   references, for registries listed in `--insecure-registries` / `OAK_INSECURE_REGISTRIES`
//!   (`host:port,…`) and for `localhost` / loopback addresses; other IP-literal registries fall back
//!   to HTTP when HTTPS cannot be reached.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use parking_lot::RwLock;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::info;

use super::image::{self, Blob, ImportPlan, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};
use super::oci;

static INSECURE: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registries (`host[:port]`) to reach over plain HTTP, in addition to `OAK_INSECURE_REGISTRIES`.
pub fn set_insecure_registries(list: Vec<String>) {
    let list = list.into_iter().map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect();
    *INSECURE.write() = list;
}

fn is_insecure(host: &str) -> bool {
    let env = std::env::var("OAK_INSECURE_REGISTRIES").unwrap_or_default();
    let strip = |s: &str| {
        s.trim().trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/').to_string()
    };
    env.split(',').map(strip).chain(INSECURE.read().iter().map(|s| strip(s))).any(|h| !h.is_empty() && h == host)
}

/// The host part without port (`[::1]:5000` → `::1`).
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host_only(host);
    h == "localhost" || h.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

fn is_ip_literal(host: &str) -> bool {
    host_only(host).parse::<std::net::IpAddr>().is_ok()
}

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryRef {
    /// `host[:port]` as written in the image name (`docker.io`, `127.0.0.1:5000`).
    pub host: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
    /// Given as `http://…`.
    pub explicit_http: bool,
}

impl RegistryRef {
    /// Parses an image reference (`busybox`, `host:port/name:tag`, `name@sha256:…`,
    /// `http://host:port/name:tag`).
    pub fn parse(code: &str) -> anyhow::Result<Self> {
        let code = code.trim();
        let (explicit_http, rest) = if let Some(r) = code.strip_prefix("http://") {
            (true, r)
        } else if let Some(r) = code.strip_prefix("https://") {
            (false, r)
        } else {
            (false, code)
        };
        let norm = image::normalize_reference(rest.trim_end_matches('/'))?;
        let (host, path) = norm.split_once('/').with_context(|| format!("invalid image reference '{code}'"))?;
        let (name_tag, digest) = match path.split_once('@') {
            Some((n, d)) => (n, Some(d.to_string())),
            None => (path, None),
        };
        let (repository, tag) = match name_tag.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n.to_string(), Some(t.to_string())),
            _ => (name_tag.to_string(), None),
        };
        if let Some(d) = &digest {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| anyhow!("invalid image reference '{code}': only sha256 digests are supported"))?;
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!("invalid image reference '{code}': malformed digest {d}");
            }
        }
        Ok(Self { host: host.to_string(), repository, tag, digest, explicit_http })
    }

    /// The containerd image name (`docker.io/library/busybox:latest`, no scheme).
    pub fn name(&self) -> String {
        let mut s = format!("{}/{}", self.host, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }

    /// The host serving the registry API.
    pub fn api_host(&self) -> &str {
        if self.host == "docker.io" || self.host == "index.docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        }
    }

    /// What to ask `/manifests/` for: the digest if given, the tag otherwise.
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Plain HTTP (explicit `http://`, insecure list, loopback)?
    pub fn plain_http(&self) -> bool {
        self.explicit_http || is_insecure(&self.host) || is_loopback(&self.host)
    }

    fn base_url(&self, http: bool) -> String {
        format!("{}://{}", if http { "http" } else { "https" }, self.api_host())
    }
}

/// A descriptor (digest, media type, size).
#[derive(Debug, Clone, PartialEq)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

impl Desc {
    fn from_json(v: &Value, default_mt: &str) -> anyhow::Result<Self> {
        Ok(Self {
            media_type: v["mediaType"].as_str().unwrap_or(default_mt).to_string(),
            digest: v["digest"].as_str().context("descriptor without digest")?.to_string(),
            size: v["size"].as_i64().unwrap_or(-1),
        })
    }
}

/// The image manifest for this platform.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub desc: Desc,
    pub data: Vec<u8>,
    pub config: Desc,
    pub layers: Vec<Desc>,
}

/// `key="value"` pairs of a `WWW-Authenticate: Bearer …` challenge.
pub fn parse_bearer_challenge(h: &str) -> Option<HashMap<String, String>> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() {
            break;
        }
        chars.next(); // '='
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n)
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), val.trim().to_string());
    }
    out.contains_key("realm").then_some(out)
}

fn verify(what: &str, expected: &str, data: &[u8]) -> anyhow::Result<()> {
    let Some(hex) = expected.strip_prefix("sha256:") else {
        bail!("{what}: unsupported digest algorithm in {expected} (only sha256)");
    };
    let got = format!("{:x}", Sha256::digest(data));
    if got != hex {
        bail!("digest mismatch for {what}: expected {expected}, got sha256:{got}");
    }
    Ok(())
}

/// A registry session for one reference (keeps the bearer token).
pub struct RegistryClient {
    r: RegistryRef,
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

impl RegistryClient {
    pub fn new(r: &RegistryRef) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("oak-node-engine/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { base: r.base_url(r.plain_http()), r: r.clone(), http, token: None })
    }

    pub fn reference(&self) -> &RegistryRef {
        &self.r
    }

    /// GET with bearer-token handling (one token round trip on 401).
    async fn get(&mut self, url: &str, accept: Option<&str>) -> anyhow::Result<reqwest::Response> {
        let mut authed = false;
        loop {
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(reqwest::header::ACCEPT, a);
            }
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| anyhow!("registry unreachable: GET {url} failed: {}", oak_trust::error_chain(&e)))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && !authed {
                authed = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_bearer_challenge)
                    .ok_or_else(|| {
                        anyhow!("GET {url}: 401 Unauthorized without a bearer challenge (only anonymous token auth is supported)")
                    })?;
                self.token = Some(self.fetch_token(&challenge).await?);
                continue;
            }
            return Ok(resp);
        }
    }

    async fn fetch_token(&self, c: &HashMap<String, String>) -> anyhow::Result<String> {
        let realm = &c["realm"];
        let scope = c.get("scope").cloned().unwrap_or_else(|| format!("repository:{}:pull", self.r.repository));
        let mut query = vec![("scope", scope.as_str())];
        if let Some(s) = c.get("service") {
            query.push(("service", s.as_str()));
        }
        let resp =
            self.http.get(realm).query(&query).send().await.map_err(|e| {
                anyhow!("token service unreachable: GET {realm} failed: {}", oak_trust::error_chain(&e))
            })?;
        let status = resp.status();
        if !status.is_success() {
            bail!("token service {realm} answered {status} (only anonymous pulls are supported)");
        }
        let v: Value = resp.json().await.with_context(|| format!("token service {realm}: answer is not JSON"))?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string)
            .with_context(|| format!("token service {realm}: answer has no token"))
    }

    async fn get_manifest(&mut self, reference: &str) -> anyhow::Result<(String, Vec<u8>)> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.r.repository);
        let resp = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            bail!("manifest not found: GET {url} answered 404");
        }
        if !status.is_success() {
            bail!("GET {url} answered {status}");
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let data = read_limited(resp, &format!("manifest {reference} (GET {url})"), image::MAX_DOCUMENT).await?;
        if reference.starts_with("sha256:") {
            verify(&format!("manifest {reference}"), reference, &data)?;
        }
        let doc: Value = serde_json::from_slice(&data).with_context(|| format!("GET {url}: not JSON"))?;
        let mt =
            doc["mediaType"]
                .as_str()
                .map(str::to_string)
                .filter(|s| !s.is_empty())
                .or_else(|| (!ct.is_empty() && ct != "application/json").then_some(ct))
                .unwrap_or_else(|| {
                    if doc.get("manifests").is_some() {
                        MT_OCI_INDEX.into()
                    } else {
                        MT_OCI_MANIFEST.into()
                    }
                });
        Ok((mt, data))
    }

    /// Fetches the manifest for `linux/<arch>` (through an index if the reference names one).
    pub async fn resolve(&mut self, arch: &str) -> anyhow::Result<Manifest> {
        let reference = self.r.manifest_ref().to_string();
        let first = match self.get_manifest(&reference).await {
            Err(e)
                if !self.r.plain_http()
                    && is_ip_literal(&self.r.host)
                    && e.to_string().starts_with("registry unreachable") =>
            {
                info!(registry = %self.r.host, "HTTPS failed, trying plain HTTP");
                self.base = self.r.base_url(true);
                self.get_manifest(&reference).await.map_err(|e2| anyhow!("{e:#}; over plain HTTP: {e2:#}"))?
            }
            r => r?,
        };
        let (mut mt, mut data) = first;
        let mut digest = image::sha256_digest(&data);
        if mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST {
            let idx: oci::Index = serde_json::from_slice(&data).context("image index is not JSON")?;
            let m = oci::select(&idx.manifests, arch)?;
            let d = Desc { media_type: m.media_type.clone(), digest: m.digest.clone(), size: m.size };
            let (mt2, data2) = self.get_manifest(&d.digest).await?;
            mt = if d.media_type.is_empty() { mt2 } else { d.media_type.clone() };
            data = data2;
            digest = d.digest;
        }
        if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
            bail!("unsupported manifest media type {mt} (need an OCI or Docker v2 schema 2 manifest)");
        }
        let doc: Value = serde_json::from_slice(&data).context("image manifest is not JSON")?;
        let config = Desc::from_json(&doc["config"], image::MT_OCI_CONFIG).context("manifest config")?;
        let layers = doc["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| Desc::from_json(l, image::MT_OCI_LAYER))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("manifest layers")?;
        Ok(Manifest { desc: Desc { media_type: mt, digest, size: data.len() as i64 }, data, config, layers })
    }

    /// Downloads a blob, verifying size and digest; `what` names it in logs and errors ("config" is held to
    /// the document limit, anything else to the blob limit).
    pub async fn fetch_blob(&mut self, d: &Desc, what: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}/v2/{}/blobs/{}", self.base, self.r.repository, d.digest);
        let resp = self.get(&url, None).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            bail!("{what} {} not found: GET {url} answered 404", d.digest);
        }
        if !status.is_success() {
            bail!("GET {url} answered {status}");
        }
        let limit = if what == "config" { image::MAX_DOCUMENT } else { image::MAX_BLOB };
        image::check_size(&format!("{what} {}", d.digest), d.size.max(0) as u64, limit)?;
        let mut data = Vec::with_capacity((d.size.max(0) as u64).min(image::PREALLOCATE) as usize);
        let mut hasher = Sha256::new();
        let mut stream = resp.bytes_stream();
        let mut last_log = std::time::Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| anyhow!("downloading {what} {} from {url}: {}", d.digest, oak_trust::error_chain(&e)))?;
            hasher.update(&chunk);
            data.extend_from_slice(&chunk);
            if d.size >= 0 && data.len() as i64 > d.size {
                bail!("{what} {}: registry sent more than the {} bytes of the manifest", d.digest, d.size);
            }
            image::check_size(&format!("{what} {}", d.digest), data.len() as u64, limit)?;
            if last_log.elapsed() > Duration::from_secs(2) {
                last_log = std::time::Instant::now();
                info!(image = %self.r.name(), blob = %d.digest, bytes = data.len(), total = d.size, "downloading {what}");
            }
        }
        let got = format!("sha256:{:x}", hasher.finalize());
        if got != d.digest {
            bail!("digest mismatch for {what} {}: the registry sent {} bytes hashing to {got}", d.digest, data.len());
        }
        if d.size >= 0 && data.len() as i64 != d.size {
            bail!("{what} {}: got {} bytes, the manifest says {}", d.digest, data.len(), d.size);
        }
        Ok(data)
    }
}

/// The manifest blob with its GC labels, and the plan that writes it (after `fetched`, the config
/// and layer blobs not yet in the content store) and names the image.
pub fn plan_from_manifest(name: &str, m: &Manifest, fetched: Vec<Blob>) -> ImportPlan {
    let mut labels = HashMap::new();
    labels.insert("containerd.io/gc.ref.content.config".to_string(), m.config.digest.clone());
    for (i, l) in m.layers.iter().enumerate() {
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
    }
    let mut blobs = fetched;
    blobs.push(Blob {
        digest: m.desc.digest.clone(),
        media_type: m.desc.media_type.clone(),
        data: m.data.clone(),
        labels,
    });
    ImportPlan {
        name: name.to_string(),
        blobs,
        target_media_type: m.desc.media_type.clone(),
        target_digest: m.desc.digest.clone(),
        target_size: m.desc.size,
    }
}

/// The body of `resp`, refused as soon as it passes `limit` bytes (whatever Content-Length said).
pub async fn read_limited(resp: reqwest::Response, what: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    if let Some(len) = resp.content_length() {
        image::check_size(what, len, limit)?;
    }
    let mut data = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow!("reading {what}: {}", oak_trust::error_chain(&e)))?;
        data.extend_from_slice(&chunk);
        image::check_size(what, data.len() as u64, limit)?;
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = RegistryRef::parse("busybox").unwrap();
        assert_eq!(r.host, "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(r.name(), "docker.io/library/busybox:latest");
        assert!(!r.plain_http());

        let r = RegistryRef::parse("docker.io/library/nginx:1.27").unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/nginx");
        assert_eq!(r.manifest_ref(), "1.27");

        let r = RegistryRef::parse("127.0.0.1:5000/oak/busybox:1").unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository, "oak/busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert!(r.plain_http(), "loopback registries use HTTP");
        assert_eq!(r.base_url(r.plain_http()), "http://127.0.0.1:5000");

        let r = RegistryRef::parse("localhost:5000/x").unwrap();
        assert_eq!(r.manifest_ref(), "latest");
        assert!(r.plain_http());

        let r = RegistryRef::parse("http://registry.lan:5000/team/app:v2").unwrap();
        assert!(r.explicit_http && r.plain_http());
        assert_eq!(r.name(), "registry.lan:5000/team/app:v2");
        assert_eq!(r.base_url(true), "http://registry.lan:5000");

        let r = RegistryRef::parse("ghcr.io/a/b/c:tag").unwrap();
        assert_eq!((r.host.as_str(), r.repository.as_str()), ("ghcr.io", "a/b/c"));
        assert!(!r.plain_http());

        let d = format!("sha256:{}", "a".repeat(64));
        let r = RegistryRef::parse(&format!("alpine@{d}")).unwrap();
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.name(), format!("docker.io/library/alpine@{d}"));

        let r = RegistryRef::parse(&format!("myreg.io:443/x/y:1@{d}")).unwrap();
        assert_eq!(r.host, "myreg.io:443");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.manifest_ref(), d, "the digest wins over the tag");

        assert!(RegistryRef::parse("alpine@sha256:abc").is_err());
        assert!(RegistryRef::parse("alpine@md5:abc").is_err());
        assert!(RegistryRef::parse("Not A Ref!").is_err());
    }

    #[test]
    fn insecure_registries() {
        let r = RegistryRef::parse("10.9.8.7:5000/a:1").unwrap();
        assert!(!r.plain_http());
        set_insecure_registries(vec!["10.9.8.7:5000".into(), " other:1 ".into()]);
        assert!(r.plain_http());
        assert!(RegistryRef::parse("other:1/x").unwrap().plain_http());
        set_insecure_registries(vec![]);
        assert!(!r.plain_http());
        assert!(is_ip_literal("10.9.8.7:5000") && is_ip_literal("[::1]:5000"));
        assert!(is_loopback("[::1]:5000") && !is_loopback("example.com"));
    }

    #[test]
    fn bearer_challenges() {
        let c = parse_bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(c["realm"], "https://auth.docker.io/token");
        assert_eq!(c["service"], "registry.docker.io");
        assert_eq!(c["scope"], "repository:library/busybox:pull,push");
        let c = parse_bearer_challenge("bearer realm=http://x/t, service=s").unwrap();
        assert_eq!((c["realm"].as_str(), c["service"].as_str()), ("http://x/t", "s"));
        assert!(parse_bearer_challenge(r#"Basic realm="x""#).is_none());
        assert!(parse_bearer_challenge("Bearer service=x").is_none());
    }

    #[test]
    fn verifies_digests() {
        let d = image::sha256_digest(b"abc");
        assert!(verify("x", &d, b"abc").is_ok());
        let e = verify("layer", &d, b"abd").unwrap_err().to_string();
        assert!(e.contains("digest mismatch for layer"), "{e}");
    }
}
