//! Instance wiring through a (fake) NetManager HTTP API.

mod common;

use oak_node_engine::runtime::{instance_id, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// What the fake NetManager was sent: path, JSON body, Authorization header.
type Call = (String, serde_json::Value, String);

/// A one-purpose HTTP/1.1 server: records each call, answers `answer` to /container/deploy.
async fn fake_netmanager(answer: &'static str) -> (u16, mpsc::UnboundedReceiver<Call>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().starts_with("authorization:").then(|| l[14..].trim().to_string())
                    })
                    .unwrap_or_default();
                let reply = if path == "/container/deploy" { answer } else { "{}" };
                let _ = tx.send((path, body, auth));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netmanager_wires_instances_and_is_told_of_undeploy() {
    require_containerd!();
    let env = common::Env::new("nm");
    let (port, mut calls) = fake_netmanager(r#"{"nsAddress":"10.18.0.7","nsAddressv6":"fc00::7"}"#).await;
    let mut cfg = env.runtime_config();
    cfg.netmanager_port = port;
    let (rt, mut rx) = Runtime::connect(cfg).await.unwrap();
    let mut spec = env.spec("svc-nm", &["/bin/sleep", "600"]);
    spec.port = "8080:80/tcp".into();
    let id = instance_id(&spec.job_name, 0);
    rt.deploy(spec.clone(), 0);
    let running = common::wait_for(&mut rx, "svc-nm", &["RUNNING"], &mut Vec::new()).await;
    assert_eq!(running.ns_address, "10.18.0.7");
    assert_eq!(running.ns_address_v6, "fc00::7");

    let (path, body, auth) = calls.recv().await.unwrap();
    assert_eq!(path, "/container/deploy");
    assert_eq!(auth, format!("Bearer {}", common::NM_CREDENTIAL), "the NetManager's credential is sent");
    assert_eq!(body["pid"], rt.pid_of("svc-nm", 0).unwrap());
    assert_eq!(body["serviceName"], spec.job_name.as_str());
    assert_eq!(body["serviceId"], "svc-nm");
    assert_eq!(body["instanceNumber"], 0);
    assert_eq!(body["portMappings"], "8080:80/tcp");

    // A restarted worker reports the overlay address it had.
    let (rt2, _rx2) = Runtime::connect(env.runtime_config()).await.unwrap();
    let adopted = rt2.adopt().await.unwrap();
    assert_eq!(adopted[0].ns_address, "10.18.0.7");

    rt.undeploy("svc-nm", 0).await.unwrap();
    let (path, body, auth) = calls.recv().await.unwrap();
    assert_eq!(path, "/container/undeploy");
    assert_eq!(auth, format!("Bearer {}", common::NM_CREDENTIAL));
    assert_eq!(body, serde_json::json!({"serviceName": spec.job_name, "serviceId": "svc-nm", "instanceNumber": 0}));
    common::wait_for(&mut rx, "svc-nm", &["UNDEPLOYED"], &mut Vec::new()).await;
    common::assert_gone(&rt, &id).await;
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_netmanager_fails_the_instance_clearly() {
    require_containerd!();
    let env = common::Env::new("nmdown");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = env.runtime_config();
    cfg.netmanager_port = port;
    let (rt, mut rx) = Runtime::connect(cfg).await.unwrap();
    let spec = env.spec("svc-nmdown", &["/bin/sleep", "600"]);
    rt.deploy(spec.clone(), 0);
    let mut seen = Vec::new();
    let f = common::wait_for(&mut rx, "svc-nmdown", &["FAILED"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "FAILED"]);
    assert!(f.detail.starts_with("NetManager timeout"), "{}", f.detail);
    assert!(f.detail.contains(&format!("127.0.0.1:{port}")), "{}", f.detail);
    // Nothing is left of the failed instance.
    common::assert_gone(&rt, &instance_id(&spec.job_name, 0)).await;
    rt.undeploy("svc-nmdown", 0).await.unwrap();
    env.cleanup(&rt).await;
}
