//! Pulling from a registry with the NodeEngine's own OCI distribution client (containerd 1.6 has no
//! Transfer service): a tiny HTTP registry inside the test serves the busybox OCI layout, asks for a
//! bearer token first, and the instance must run from the pulled image. Root + containerd only
//! (skipped with a printed reason otherwise).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use oak_node_engine::runtime::instance_id;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "oak-test-token";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Default, Clone)]
struct Repo {
    /// tag or digest → (media type, manifest bytes)
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// digest → bytes
    blobs: HashMap<String, Vec<u8>>,
}

#[derive(Default)]
struct Registry {
    repos: HashMap<String, Repo>,
    /// "GET <path> -> <status>" for every request, in order.
    log: Mutex<Vec<String>>,
}

/// The blobs of an OCI layout tar and the descriptor of its (only) manifest.
fn read_layout(archive: &Path) -> (HashMap<String, Vec<u8>>, Value) {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    let mut files = HashMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.header().entry_type().is_file() {
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(p, data);
    }
    let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let desc = index["manifests"][0].clone();
    let blobs = files
        .into_iter()
        .filter_map(|(p, d)| p.strip_prefix("blobs/sha256/").map(|h| (format!("sha256:{h}"), d)))
        .collect();
    (blobs, desc)
}

fn digest(b: &[u8]) -> String {
    oak_node_engine::testimage::digest(b)
}

/// Repos: `oak/busybox` (tag `1` → an index with a foreign platform and ours), `oak/corrupt` (tag
/// `1` → the manifest, but the layer blob is served with one byte flipped), `oak/foreign` (tag `1` →
/// an index without our platform).
fn build_registry(archive: &Path) -> Registry {
    let (blobs, desc) = read_layout(archive);
    let mdigest = desc["digest"].as_str().unwrap().to_string();
    let manifest = blobs[&mdigest].clone();
    let arch = oak_proto::arch::this_machine();
    let foreign = if arch == "s390x" { "riscv64" } else { "s390x" };
    let other = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(b"x"), "size": 1},
        "layers": []}))
    .unwrap();
    let other_desc = json!({"mediaType": MT_MANIFEST, "digest": digest(&other), "size": other.len(),
        "platform": {"os": "linux", "architecture": foreign}});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            other_desc,
            {"mediaType": MT_MANIFEST, "digest": mdigest, "size": manifest.len(),
             "platform": {"os": "linux", "architecture": arch}},
        ],
    }))
    .unwrap();
    let foreign_index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [other_desc],
    }))
    .unwrap();

    let mut good = Repo { blobs: blobs.clone(), ..Default::default() };
    good.manifests.insert("1".into(), (MT_INDEX.into(), index.clone()));
    good.manifests.insert(digest(&index), (MT_INDEX.into(), index));
    good.manifests.insert(mdigest.clone(), (MT_MANIFEST.into(), manifest.clone()));
    good.manifests.insert(digest(&other), (MT_MANIFEST.into(), other.clone()));

    let mdoc: Value = serde_json::from_slice(&manifest).unwrap();
    let layer = mdoc["layers"][0]["digest"].as_str().unwrap().to_string();
    let mut corrupt = good.clone();
    corrupt.manifests.insert("1".into(), (MT_MANIFEST.into(), manifest));
    let l = corrupt.blobs.get_mut(&layer).unwrap();
    let last = l.len() - 1;
    l[last] ^= 0xff;

    let mut foreign_repo = good.clone();
    foreign_repo.manifests.insert("1".into(), (MT_INDEX.into(), foreign_index));

    // hostile: a manifest of 5 MiB, and a manifest whose layer claims 1 TiB
    let mut huge = good.clone();
    let mut big = mdoc.clone();
    big["annotations"] = json!({"padding": "x".repeat(5 << 20)});
    huge.manifests.insert("1".into(), (MT_MANIFEST.into(), serde_json::to_vec(&big).unwrap()));
    let mut liar = good.clone();
    let mut lying = mdoc.clone();
    lying["layers"][0]["size"] = json!(1u64 << 40);
    liar.manifests.insert("1".into(), (MT_MANIFEST.into(), serde_json::to_vec(&lying).unwrap()));

    let mut repos = HashMap::new();
    repos.insert("oak/huge".to_string(), huge);
    repos.insert("oak/liar".to_string(), liar);
    repos.insert("oak/busybox".to_string(), good);
    repos.insert("oak/corrupt".to_string(), corrupt);
    repos.insert("oak/foreign".to_string(), foreign_repo);
    Registry { repos, ..Default::default() }
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn handle(reg: &Registry, port: u16, target: &str, headers: &HashMap<String, String>) -> Vec<u8> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/token" {
        if !query.contains("service=oak-test") || !query.contains("scope=repository") {
            return response("400 Bad Request", &[], b"bad token request");
        }
        let body = serde_json::to_vec(&json!({"token": TOKEN})).unwrap();
        return response("200 OK", &[("Content-Type", "application/json".into())], &body);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return response("404 Not Found", &[], b"");
    };
    let (repo, kind, reference) = match rest.rsplit_once("/manifests/") {
        Some((r, x)) => (r, "manifests", x),
        None => match rest.rsplit_once("/blobs/") {
            Some((r, x)) => (r, "blobs", x),
            None => return response("404 Not Found", &[], b""),
        },
    };
    if headers.get("authorization").map(String::as_str) != Some(format!("Bearer {TOKEN}").as_str()) {
        let challenge = format!(
            "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"oak-test\",scope=\"repository:{repo}:pull\""
        );
        return response(
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
        );
    }
    let Some(r) = reg.repos.get(repo) else {
        return response("404 Not Found", &[], br#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#);
    };
    if kind == "manifests" {
        match r.manifests.get(reference) {
            Some((mt, data)) => {
                response("200 OK", &[("Content-Type", mt.clone()), ("Docker-Content-Digest", digest(data))], data)
            }
            None => response("404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
        }
    } else {
        match r.blobs.get(reference) {
            Some(data) => response("200 OK", &[("Content-Type", "application/octet-stream".into())], data),
            None => response("404 Not Found", &[], br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
        }
    }
}

/// Serves `reg` on 127.0.0.1:0 (HTTP/1.1, one request per connection); returns the port.
async fn serve(reg: Arc<Registry>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let reg = reg.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).to_string();
                let mut lines = text.split("\r\n");
                let first = lines.next().unwrap_or_default();
                let mut parts = first.split_whitespace();
                let method = parts.next().unwrap_or_default().to_string();
                let target = parts.next().unwrap_or_default().to_string();
                let headers: HashMap<String, String> = lines
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let resp = handle(&reg, port, &target, &headers);
                let status = String::from_utf8_lossy(&resp[9..12]).to_string();
                reg.log.lock().push(format!("{method} {target} -> {status}"));
                let _ = sock.write_all(&resp).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_is_pulled_from_a_registry_with_token_auth_and_runs() {
    require_containerd!();
    let env = common::Env::new("pull");
    let reg = Arc::new(build_registry(&env.archive));
    let port = serve(reg.clone()).await;
    let (rt, mut rx) = env.runtime().await;
    let image = format!("127.0.0.1:{port}/oak/busybox:1");
    let mut spec = env.spec("svc-pull", &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.code = image.clone();
    let id = instance_id(&spec.job_name, 0);
    rt.deploy(spec, 0);
    let mut seen = Vec::new();
    common::wait_for(&mut rx, "svc-pull", &["RUNNING"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "RUNNING"]);

    let log = reg.log.lock().clone();
    eprintln!("registry requests:\n  {}", log.join("\n  "));
    assert!(log[0].starts_with("GET /v2/oak/busybox/manifests/1 -> 401"), "first request is challenged: {log:?}");
    assert!(log[1].starts_with("GET /token?") && log[1].ends_with("-> 200"), "{log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("GET /token")).count(), 1, "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("GET /v2/oak/busybox/blobs/") && l.ends_with("200")), "{log:?}");
    assert!(log.iter().skip(2).all(|l| l.ends_with("200")), "{log:?}");

    let pid = rt.pid_of("svc-pull", 0).expect("pid known");
    let body = common::wait_http_in_netns(pid, 8080, "/index.html").await;
    assert_eq!(body.expect("httpd answers"), "hello-oak");

    // A second deploy of the same reference uses the stored image: no new registry request.
    let before = reg.log.lock().len();
    let mut again = env.spec("svc-pull2", &["/bin/sh", "-c", "echo again-$IMAGE_VAR"]);
    again.code = image.clone();
    again.one_shot = true;
    rt.deploy(again.clone(), 0);
    let done = common::wait_for(&mut rx, "svc-pull2", &["COMPLETED"], &mut Vec::new()).await;
    assert!(done.logs.contains("again-from-image"), "logs: {:?}", done.logs);
    assert_eq!(reg.log.lock().len(), before);

    rt.undeploy("svc-pull", 0).await.expect("undeploy");
    common::wait_for(&mut rx, "svc-pull", &["UNDEPLOYED"], &mut seen).await;
    rt.undeploy("svc-pull2", 0).await.expect("undeploy");
    common::assert_gone(&rt, &id).await;
    common::assert_gone(&rt, &instance_id(&again.job_name, 0)).await;
    rt.containerd().delete_image_sync(&image, true).await.unwrap();
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_failures_fail_the_instance_clearly() {
    require_containerd!();
    let env = common::Env::new("pullbad");
    let reg = Arc::new(build_registry(&env.archive));
    let port = serve(reg.clone()).await;
    let (rt, mut rx) = env.runtime().await;

    let cases = [
        ("svc-corrupt", format!("127.0.0.1:{port}/oak/corrupt:1"), "digest mismatch for layer 1/1"),
        ("svc-404", format!("127.0.0.1:{port}/oak/busybox:nope"), "404"),
        ("svc-foreign", format!("127.0.0.1:{port}/oak/foreign:1"), "no manifest for this platform"),
        ("svc-huge", format!("127.0.0.1:{port}/oak/huge:1"), "more than the 4194304-byte limit"),
        (
            "svc-liar",
            format!("127.0.0.1:{port}/oak/liar:1"),
            "is 1099511627776 bytes, more than the 2147483648-byte limit",
        ),
        // Explicit http:// on a port nobody listens on: the URL tried is named.
        (
            "svc-down",
            "http://127.0.0.1:1/oak/busybox:1".to_string(),
            "registry unreachable: GET http://127.0.0.1:1/v2/oak/busybox/manifests/1",
        ),
    ];
    for (svc, code, want) in &cases {
        let mut spec = env.spec(svc, &[]);
        spec.code = code.clone();
        rt.deploy(spec.clone(), 0);
        let mut seen = Vec::new();
        let f = common::wait_for(&mut rx, svc, &["FAILED"], &mut seen).await;
        eprintln!("{svc}: {}", f.detail);
        assert_eq!(seen, ["CREATING", "FAILED"]);
        let name = code.trim_start_matches("http://");
        assert!(f.detail.contains(name), "names the reference: {}", f.detail);
        assert!(f.detail.contains(want), "wanted '{want}' in: {}", f.detail);
        common::assert_gone(&rt, &instance_id(&spec.job_name, 0)).await;
        rt.undeploy(svc, 0).await.expect("undeploy");
        assert!(rt.containerd().ensure_image(code).await.is_err(), "no image record was created for {code}");
    }
    // the worker kept serving through all of it
    rt.deploy(env.spec("svc-after", &["/bin/sh", "-c", "echo after"]), 0);
    common::wait_for(&mut rx, "svc-after", &["RUNNING", "COMPLETED"], &mut Vec::new()).await;
    rt.undeploy("svc-after", 0).await.expect("undeploy");
    env.cleanup(&rt).await;
}
