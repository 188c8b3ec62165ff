//! Control-plane addresses as operators write them: the one parser for the cluster's root address
//! (`SYSTEM_MANAGER_URL`), the NodeEngine's `-a` and the NetManager's `ClusterUrl`, so every tier takes
//! IPv4, IPv6 and host names in the same forms.
//!
//! Accepted: `host`, `host:port`, `10.0.0.1`, `fd00::1` (a bare IPv6 literal has no port), `[fd00::1]`,
//! `[fd00::1]:50052`, and any of these behind `http://` or `https://` (a trailing `/` is ignored).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// An address the parser refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {input:?}: {why}")]
pub struct AddressError {
    pub input: String,
    pub why: String,
}

/// A parsed control-plane address: scheme, host (an IPv6 literal without its brackets) and the port, if
/// one was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Endpoint {
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let err = |why: &str| AddressError { input: input.to_string(), why: why.to_string() };
        let a = input.trim().trim_end_matches('/');
        let (scheme, rest) = match a.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("http".to_string(), a),
        };
        if scheme != "http" && scheme != "https" {
            return Err(err(&format!("scheme {scheme:?} is not http or https")));
        }
        if rest.contains('/') {
            return Err(err("has a path; give only host[:port]"));
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (h, after) = inner.split_once(']').ok_or_else(|| err("'[' without a closing ']'"))?;
            h.parse::<Ipv6Addr>().map_err(|_| err(&format!("{h:?} in brackets is not an IPv6 address")))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| err("expected :port after ']'"))?),
            };
            (h, port)
        } else if rest.parse::<Ipv6Addr>().is_ok() {
            (rest, None)
        } else {
            match rest.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(err("not an IPv6 address; an IPv6 address with a port is written [addr]:port"))
                }
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        let port = port
            .map(|p| {
                p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| err(&format!("port {p:?} is not 1..65535")))
            })
            .transpose()?;
        Ok(Self { scheme, host: host.to_string(), port })
    }

    /// The host as it goes into a URL or `host:port`: an IPv6 literal in brackets.
    pub fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// `scheme://host:port`, with the written port, else `default_port`.
    pub fn url(&self, default_port: u16) -> String {
        self.url_with_port(self.port.unwrap_or(default_port))
    }

    /// `scheme://host:port` with `port` whatever port was written (another service on the same host).
    pub fn url_with_port(&self, port: u16) -> String {
        format!("{}://{}:{port}", self.scheme, self.url_host())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{p}", self.scheme, self.url_host()),
            None => write!(f, "{}://{}", self.scheme, self.url_host()),
        }
    }
}

/// A peer's address as a server records it: an IPv4 client of a dual-stack (`[::]`) listener shows up as
/// `::ffff:a.b.c.d`, which is written back as the IPv4 address it is.
pub fn observed(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str, port: u16) -> String {
        Endpoint::parse(s).unwrap_or_else(|e| panic!("{e}")).url(port)
    }

    #[test]
    fn ipv4_names_and_urls() {
        assert_eq!(url("10.0.0.1", 50052), "http://10.0.0.1:50052");
        assert_eq!(url(" 10.0.0.1:6000 ", 50052), "http://10.0.0.1:6000");
        assert_eq!(url("http://root.example/", 50052), "http://root.example:50052");
        assert_eq!(url("https://root.example:443", 50052), "https://root.example:443");
        assert_eq!(url("HTTP://root", 1), "http://root:1");
    }

    #[test]
    fn ipv6_in_every_form() {
        for s in ["fd00::1", "[fd00::1]", "http://fd00::1", "http://[fd00::1]", "http://[fd00::1]/"] {
            assert_eq!(url(s, 50052), "http://[fd00::1]:50052", "{s}");
        }
        for s in ["[fd00::1]:7", "http://[fd00::1]:7"] {
            assert_eq!(url(s, 50052), "http://[fd00::1]:7", "{s}");
        }
        assert_eq!(url("::1", 10100), "http://[::1]:10100");
        assert_eq!(url("::ffff:10.0.0.1", 1), "http://[::ffff:10.0.0.1]:1");
        let e = Endpoint::parse("[fd00::1]:7").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.url_with_port(10099)),
            ("fd00::1", Some(7), "http://[fd00::1]:10099".into())
        );
    }

    #[test]
    fn refusals_say_why() {
        let why = |s: &str| Endpoint::parse(s).unwrap_err().to_string();
        assert!(why("fd00::1::2:50052").contains("[addr]:port"), "{}", why("fd00::1::2:50052"));
        assert!(why("[fd00::1").contains("closing ']'"));
        assert!(why("[nothex]").contains("not an IPv6 address"));
        assert!(why("[fd00::1]x").contains(":port after ']'"));
        assert!(why("10.0.0.1:http").contains("port \"http\""));
        assert!(why("10.0.0.1:0").contains("1..65535"));
        assert!(why("ftp://x").contains("scheme \"ftp\""));
        assert!(why("http://x/api").contains("path"));
        assert!(why("").contains("no host"));
        assert!(why(":50052").contains("no host"));
    }

    #[test]
    fn ipv4_mapped_peers_are_recorded_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.99.0.3".parse().unwrap();
        assert_eq!(observed(mapped), "10.99.0.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00:99::3".parse().unwrap();
        assert_eq!(observed(v6), v6);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(observed(v4), v4);
    }
}
