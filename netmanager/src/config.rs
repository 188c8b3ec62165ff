//! `/etc/netmanager/netcfg.json` (Oakestra's field names, plus ours).
//!
//! Oakestra writes ports as strings ("50103"); numbers are accepted too. Unknown fields and wrong types
//! are errors that name the field.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
pub const DEFAULT_CLUSTER_NET_PORT: u16 = 10110;

#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// Tunnel endpoint address of this worker; `0.0.0.0` = detect from the default route.
    pub node_public_address: Ipv4Addr,
    /// Tunnel UDP port.
    pub node_public_port: u16,
    /// Cluster orchestrator host, as written (a host name, IPv4 or IPv6 address, optionally with a port and
    /// http://, which are ignored: the network service is at `cluster_net_port`).
    pub cluster_url: String,
    /// Accepted for compatibility with Oakestra's file, unused.
    pub cluster_mqtt_port: Option<u16>,
    /// Port of the cluster network service.
    pub cluster_net_port: u16,
    /// Stable node name for the subnet lease (ours; default: the host name).
    pub node_name: Option<String>,
    /// Interface the tunnel traffic uses (Oakestra's DefaultInterface); detected when absent.
    pub default_interface: Option<String>,
}

const FIELDS: &[&str] = &[
    "NodePublicAddress",
    "NodePublicPort",
    "ClusterUrl",
    "ClusterMqttPort",
    "ClusterNetPort",
    "NodeName",
    "DefaultInterface",
    // Oakestra's, accepted so its files work unchanged; they have no meaning here
    "Debug",
    "PublicIPNetworking",
    "MqttCert",
    "MqttKey",
];

fn port(field: &str, v: &Value) -> Result<u16> {
    let n = match v {
        Value::String(s) => {
            s.trim().parse::<u64>().with_context(|| format!("field {field}: {s:?} is not a port number"))?
        }
        Value::Number(n) => n.as_u64().with_context(|| format!("field {field}: {n} is not a port number"))?,
        other => bail!("field {field}: expected a port (string or number), got {}", kind(other)),
    };
    if n == 0 || n > 65535 {
        bail!("field {field}: port {n} out of range 1..65535");
    }
    Ok(n as u16)
}

fn string<'a>(field: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().with_context(|| format!("field {field}: expected a string, got {}", kind(v)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl NetConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("netcfg is not valid JSON")?;
        let Value::Object(map) = value else { bail!("netcfg must be a JSON object, got {}", kind(&value)) };
        Self::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self> {
        for k in map.keys() {
            if !FIELDS.contains(&k.as_str()) {
                bail!("unknown field {k:?} (known fields: {})", FIELDS.join(", "));
            }
        }
        let node_public_address = match map.get("NodePublicAddress") {
            None => Ipv4Addr::UNSPECIFIED,
            Some(v) => {
                let s = string("NodePublicAddress", v)?;
                s.trim().parse().with_context(|| format!("field NodePublicAddress: {s:?} is not an IPv4 address"))?
            }
        };
        let node_public_port =
            map.get("NodePublicPort").map(|v| port("NodePublicPort", v)).transpose()?.unwrap_or(DEFAULT_TUNNEL_PORT);
        let cluster_url = match map.get("ClusterUrl") {
            None => bail!("field ClusterUrl is missing (the cluster orchestrator's host)"),
            Some(v) => string("ClusterUrl", v)?.trim().to_string(),
        };
        if cluster_url.is_empty() {
            bail!("field ClusterUrl is empty (the cluster orchestrator's host)");
        }
        oak_proto::endpoint::Endpoint::parse(&cluster_url).map_err(|e| anyhow::anyhow!("field ClusterUrl: {e}"))?;
        let cluster_mqtt_port = map.get("ClusterMqttPort").map(|v| port("ClusterMqttPort", v)).transpose()?;
        let cluster_net_port = map
            .get("ClusterNetPort")
            .map(|v| port("ClusterNetPort", v))
            .transpose()?
            .unwrap_or(DEFAULT_CLUSTER_NET_PORT);
        let node_name = map.get("NodeName").map(|v| string("NodeName", v).map(str::to_string)).transpose()?;
        let default_interface = map
            .get("DefaultInterface")
            .map(|v| string("DefaultInterface", v).map(|s| s.trim().to_string()))
            .transpose()?
            .filter(|s| !s.is_empty());
        Ok(Self {
            node_public_address,
            node_public_port,
            cluster_url,
            cluster_mqtt_port,
            cluster_net_port,
            node_name,
            default_interface,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// gRPC URL of the cluster network service: ClusterUrl's host (an IPv6 one in brackets) at
    /// ClusterNetPort (a port in ClusterUrl is the orchestrator's, not the network service's).
    pub fn cluster_net_url(&self) -> String {
        match oak_proto::endpoint::Endpoint::parse(&self.cluster_url) {
            Ok(e) => format!("http://{}:{}", e.url_host(), self.cluster_net_port),
            // (checked when the file was read)
            Err(_) => format!("http://{}:{}", self.cluster_url, self.cluster_net_port),
        }
    }

    /// The public address, detecting it from the default route when configured as 0.0.0.0.
    pub fn public_address(&self) -> Result<Ipv4Addr> {
        if !self.node_public_address.is_unspecified() {
            return Ok(self.node_public_address);
        }
        detect_public_address()
    }
}

/// Source address the kernel picks for the default route (no packet is sent).
pub fn detect_public_address() -> Result<Ipv4Addr> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect("192.0.2.1:9")
        .context("NodePublicAddress is 0.0.0.0 and there is no default route to detect it from")?;
    match sock.local_addr()?.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Ok(ip),
        other => bail!("could not detect NodePublicAddress from the default route (got {other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oakestra_file_with_string_ports() {
        let c = NetConfig::parse(
            r#"{"NodePublicAddress":"0.0.0.0","NodePublicPort":"50103","ClusterUrl":"10.0.0.5","ClusterMqttPort":"10003"}"#,
        )
        .unwrap();
        assert_eq!(c.node_public_port, 50103);
        assert_eq!(c.cluster_mqtt_port, Some(10003));
        assert_eq!(c.cluster_net_port, 10110);
        assert!(c.node_public_address.is_unspecified());
        assert_eq!(c.cluster_net_url(), "http://10.0.0.5:10110");
        let c = NetConfig::parse(r#"{"ClusterUrl":"http://c:1234","ClusterNetPort":9000,"NodePublicPort":6}"#).unwrap();
        assert_eq!((c.node_public_port, c.cluster_net_url().as_str()), (6, "http://c:9000"));
    }

    #[test]
    fn cluster_url_takes_ipv6() {
        for url in ["fd00::1", "[fd00::1]", "[fd00::1]:10100", "http://[fd00::1]:10100/"] {
            let c = NetConfig::parse(&format!(r#"{{"ClusterUrl":"{url}"}}"#)).unwrap();
            assert_eq!(c.cluster_net_url(), "http://[fd00::1]:10110", "{url}");
        }
        let c = NetConfig::parse(r#"{"ClusterUrl":"10.0.0.5:10100","ClusterNetPort":"9000"}"#).unwrap();
        assert_eq!(c.cluster_net_url(), "http://10.0.0.5:9000");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"fd00::1::2:10110"}"#).unwrap_err());
        assert!(e.contains("field ClusterUrl") && e.contains("[addr]:port"), "{e}");
        // the tunnel endpoint stays IPv4
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","NodePublicAddress":"fd00::3"}"#).unwrap_err());
        assert!(e.contains("NodePublicAddress") && e.contains("not an IPv4 address"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","Bogus":1}"#).unwrap_err());
        assert!(e.contains("unknown field \"Bogus\""), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","NodePublicPort":"abc"}"#).unwrap_err());
        assert!(e.contains("NodePublicPort"), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","NodePublicPort":true}"#).unwrap_err());
        assert!(e.contains("NodePublicPort") && e.contains("boolean"), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":5}"#).unwrap_err());
        assert!(e.contains("ClusterUrl"), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"NodePublicPort":"1"}"#).unwrap_err());
        assert!(e.contains("ClusterUrl is missing"), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","NodePublicAddress":"1.2.3"}"#).unwrap_err());
        assert!(e.contains("NodePublicAddress"), "{e}");
        let e = format!("{:#}", NetConfig::parse(r#"{"ClusterUrl":"x","ClusterNetPort":70000}"#).unwrap_err());
        assert!(e.contains("ClusterNetPort") && e.contains("out of range"), "{e}");
    }
}
