//! Client of the local NetManager API (http://127.0.0.1:<port>). The JSON bodies are the shared
//! contract in [`oak_proto::netmanager_api`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use oak_proto::netmanager_api::{DeployAnswer, DeployRequest, UndeployRequest};
use serde::{Deserialize, Serialize};

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
