//! Client of the local NetManager API (http://127.0.0.1:<port>). The JSON bodies are the shared
//! contract in [`oak_proto::netmanager_api`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use oak_proto::netmanager_api::{DeployAnswer, DeployRequest, UndeployRequest};
use oak_proto::v1::WorkerNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct NetManagerClient {
    port: u16,
    /// The file holding the NetManager's API credential (read at each call: the NetManager may start, or
    /// make its credential, after the NodeEngine).
    credential: PathBuf,
    http: reqwest::Client,
}

/// The NetManager's credential file with its default data directory.
pub const DEFAULT_CREDENTIAL: &str = "/var/lib/oakestra-rs/netmanager/api-token";

impl NetManagerClient {
    pub fn new(port: u16, credential: &Path) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        Self { port, credential: credential.to_path_buf(), http }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// POSTs `body` to `path`; an empty answer is `R::default()`.
    async fn post<T: Serialize, R: for<'de> Deserialize<'de> + Default>(
        &self,
        path: &str,
        body: &T,
    ) -> anyhow::Result<R> {
        let url = format!("{}{}", self.base(), path);
        let secret = std::fs::read_to_string(&self.credential).map_err(|e| {
            anyhow::anyhow!(
                "NetManager credential {}: {e}; it is written by the NetManager into its --data-dir \
                 (--netmanager-credential names the file)",
                self.credential.display()
            )
        })?;
        let req = self.http.post(&url).bearer_auth(secret.trim()).json(body);
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "NetManager timeout: no answer to {path} from the NetManager at 127.0.0.1:{} ({e}); \
                 check that the NetManager runs and that -n/--netmanager-port is right",
                self.port
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("NetManager at 127.0.0.1:{} refused {path}: HTTP {status}: {}", self.port, text.trim());
        }
        if text.trim().is_empty() {
            return Ok(R::default());
        }
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("NetManager at 127.0.0.1:{} sent an unreadable answer to {path}: {e}", self.port)
        })
    }

    /// Wires the network namespace of `req.pid`; returns the instance's overlay addresses.
    pub async fn deploy(&self, req: &DeployRequest) -> anyhow::Result<DeployAnswer> {
        self.post("/container/deploy", req).await
    }

    pub async fn undeploy(&self, req: &UndeployRequest) -> anyhow::Result<()> {
        let _: serde_json::Value = self.post("/container/undeploy", req).await?;
        Ok(())
    }

    /// The overlay summary for the cluster (datapath, subnet, non-zero counters); None while the NetManager
    /// does not answer within a second.
    pub async fn network(&self) -> Option<WorkerNetwork> {
        let get = |path: &str| {
            let url = format!("{}{path}", self.base());
            async move {
                let r = self.http.get(url).timeout(Duration::from_secs(1)).send().await.ok()?;
                r.error_for_status().ok()?.json::<Value>().await.ok()
            }
        };
        let status = get("/status").await?;
        let counters = get("/counters").await?;
        Some(summarize(&status, &counters))
    }
}

/// Polls the NetManager's overlay summary every `every` into a watch channel the metrics read (so a slow
/// NetManager never delays a heartbeat).
pub fn watch_network(client: NetManagerClient, every: Duration) -> watch::Receiver<Option<WorkerNetwork>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.send(client.network().await).is_err() {
                return;
            }
        }
    });
    rx
}

/// The NetManager's `/status` and `/counters` answers as the summary a worker reports: the datapath
/// (`ebpf` when the fast path is loaded, `tun` with the proxy alone), and its non-zero counters as
/// `tun.<event>`, `tun.drop.<reason>` and `ebpf.<counter>`.
pub fn summarize(status: &Value, counters: &Value) -> WorkerNetwork {
    let datapath = if status["ebpf"] == true {
        "ebpf"
    } else if status["proxy"] == true {
        "tun"
    } else {
        "none"
    };
    let mut out = std::collections::HashMap::new();
    for (section, prefix) in [("events", "tun."), ("drops", "tun.drop."), ("ebpf", "ebpf.")] {
        for (k, v) in counters[section].as_object().into_iter().flatten() {
            if let Some(n) = v.as_u64().filter(|n| *n > 0) {
                out.insert(format!("{prefix}{k}"), n);
            }
        }
    }
    let endpoint = match (status["publicAddress"].as_str(), status["tunnelPort"].as_u64()) {
        (Some(a), Some(p)) => format!("{a}:{p}"),
        _ => String::new(),
    };
    let c = &counters["coordinate"];
    let coordinate = c["position"].as_array().map(|p| oak_proto::v1::NetCoordinate {
        position: p.iter().filter_map(Value::as_f64).collect(),
        height: c["height"].as_f64().unwrap_or_default(),
        error: c["error"].as_f64().unwrap_or(1.0),
    });
    WorkerNetwork {
        datapath: datapath.to_string(),
        subnet: status["subnet"].as_str().unwrap_or_default().to_string(),
        tunnel_endpoint: endpoint,
        counters: out,
        coordinate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_the_datapath_and_keeps_nonzero_counters() {
        let status = serde_json::json!({"ready": true, "subnet": "10.18.0.64/26", "publicAddress": "192.0.2.7",
            "tunnelPort": 50103, "proxy": true, "ebpf": true});
        let counters = serde_json::json!({"proxy": true, "events": {"tunnel_tx": 5, "tun_rx": 0},
            "drops": {"no_route": 2, "fragment": 0}, "dropped_total": 2, "ebpf": {"pass_unverified_peer": 3, "redirect": 0},
            "coordinate": {"position": [120.5, -3.0], "height": 40.0, "error": 0.2}});
        let n = summarize(&status, &counters);
        assert_eq!(n.datapath, "ebpf");
        assert_eq!(n.subnet, "10.18.0.64/26");
        assert_eq!(n.tunnel_endpoint, "192.0.2.7:50103");
        let mut keys: Vec<_> = n.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        keys.sort();
        assert_eq!(keys, ["ebpf.pass_unverified_peer=3", "tun.drop.no_route=2", "tun.tunnel_tx=5"]);
        let c = n.coordinate.expect("the worker's coordinate");
        assert_eq!((c.position, c.height, c.error), (vec![120.5, -3.0], 40.0, 0.2));
        // the proxy alone: tun; nothing: none
        let tun = summarize(&serde_json::json!({"proxy": true, "ebpf": false}), &serde_json::json!({"ebpf": false}));
        assert_eq!((tun.datapath.as_str(), tun.counters.len()), ("tun", 0));
        assert_eq!(summarize(&serde_json::json!({}), &serde_json::json!({})).datapath, "none");
    }

    #[tokio::test]
    async fn unreachable_is_a_clear_timeout() {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("api-token");
        std::fs::write(&cred, "secret").unwrap();
        let c = NetManagerClient::new(port, &cred);
        let r = DeployRequest { pid: 1, service_name: "x".into(), service_id: "y".into(), ..Default::default() };
        let e = c.deploy(&r).await.unwrap_err().to_string();
        assert!(e.starts_with("NetManager timeout"), "{e}");
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
