//! The SLA `port` field, `host:container[/tcp|udp];...`: which host ports an instance is exposed on. One
//! parser for the root (which checks SLAs and who may ask for which ports) and the NetManager (which
//! installs the DNAT rules).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    /// "tcp" or "udp"
    pub proto: String,
}

/// An entry of the SLA `port` field that is not `host:container[/tcp|udp]`.
#[derive(Debug, thiserror::Error)]
#[error("port mapping {entry:?}: {why}")]
pub struct PortMappingError {
    pub entry: String,
    pub why: String,
}

fn parse_port(s: &str, what: &str, entry: &str) -> Result<u16, PortMappingError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PortMappingError {
            entry: entry.into(),
            why: format!("{what} port {s:?} is not a port number 1..65535"),
        }),
    }
}

/// Parse the SLA `port` field: "host:container[/tcp|udp];..." (a bare "port" maps the same port).
pub fn parse_port_mappings(text: &str) -> Result<Vec<PortMapping>, PortMappingError> {
    let mut out = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (ports, proto) = match entry.split_once('/') {
            Some((p, proto)) => (p, proto.trim().to_ascii_lowercase()),
            None => (entry, "tcp".to_string()),
        };
        if proto != "tcp" && proto != "udp" {
            let why = format!("protocol {proto:?} is not tcp or udp");
            return Err(PortMappingError { entry: entry.into(), why });
        }
        let (host, container) = match ports.split_once(':') {
            Some((h, c)) => (parse_port(h, "host", entry)?, parse_port(c, "container", entry)?),
            None => {
                let p = parse_port(ports, "host", entry)?;
                (p, p)
            }
        };
        out.push(PortMapping { host, container, proto });
    }
    Ok(out)
}

impl PortMapping {
    /// A host port below 1024 (binding one needs privileges on the host).
    pub fn is_privileged(&self) -> bool {
        self.host < 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings() {
        let m = parse_port_mappings("8080:80/tcp; 5353:53/UDP;9000").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[1], PortMapping { host: 5353, container: 53, proto: "udp".into() });
        assert_eq!((m[2].host, m[2].container, m[2].proto.as_str()), (9000, 9000, "tcp"));
        assert!(parse_port_mappings("").unwrap().is_empty());
        assert!(parse_port_mappings("80:x").unwrap_err().to_string().contains("container port"));
        assert!(parse_port_mappings("80:80/sctp").unwrap_err().to_string().contains("sctp"));
        assert!(parse_port_mappings("0:80").unwrap_err().to_string().contains("host port"));
    }
}
