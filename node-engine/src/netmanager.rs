//! Client of the local NetManager API (http://127.0.0.1:<port>).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployRequest<'a> {
    pub pid: u32,
    pub service_name: &'a str,
    pub service_id: &'a str,
    pub instance_number: u32,
    pub port_mappings: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UndeployRequest<'a> {
    pub service_name: &'a str,
    pub service_id: &'a str,
    pub instance_number: u32,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DeployAnswer {
    #[serde(rename = "nsAddress", default)]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6", default)]
    pub ns_address_v6: String,
}

#[derive(Debug, Clone)]
pub struct NetManagerClient {
    port: u16,
    http: reqwest::Client,
}

impl NetManagerClient {
    pub fn new(port: u16) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        Self { port, http }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn post<T: Serialize, R: for<'de> Deserialize<'de> + Default>(
        &self,
        path: &str,
        body: &T,
        what: &str,
    ) -> anyhow::Result<R> {
        let url = format!("{}{}", self.base(), path);
        let resp = self.http.post(&url).json(body).send().await.map_err(|e| {
            anyhow::anyhow!(
                "NetManager timeout: no answer to {what} from the NetManager at 127.0.0.1:{} ({e}); \
                 check that the NetManager runs and that -n/--netmanager-port is right",
                self.port
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("NetManager at 127.0.0.1:{} refused {what}: HTTP {status}: {}", self.port, text.trim());
        }
        if text.trim().is_empty() {
            return Ok(R::default());
        }
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("NetManager at 127.0.0.1:{} sent an unreadable answer to {what}: {e}", self.port)
        })
    }

    /// Wires the network namespace of `pid`; returns the instance's overlay addresses.
    pub async fn deploy(&self, req: &DeployRequest<'_>) -> anyhow::Result<DeployAnswer> {
        self.post("/container/deploy", req, "/container/deploy").await
    }

    pub async fn undeploy(&self, req: &UndeployRequest<'_>) -> anyhow::Result<()> {
        let _: serde_json::Value = self.post("/container/undeploy", req, "/container/undeploy").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = DeployRequest {
            pid: 42,
            service_name: "a.b.c.d",
            service_id: "s1",
            instance_number: 3,
            port_mappings: "80:8080",
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pid":42,"serviceName":"a.b.c.d","serviceId":"s1","instanceNumber":3,"portMappings":"80:8080"})
        );
        let a: DeployAnswer = serde_json::from_str(r#"{"nsAddress":"10.18.0.3","nsAddressv6":""}"#).unwrap();
        assert_eq!(a.ns_address, "10.18.0.3");
    }

    #[tokio::test]
    async fn unreachable_is_a_clear_timeout() {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c = NetManagerClient::new(port);
        let r = DeployRequest { pid: 1, service_name: "x", service_id: "y", instance_number: 0, port_mappings: "" };
        let e = c.deploy(&r).await.unwrap_err().to_string();
        assert!(e.starts_with("NetManager timeout"), "{e}");
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
