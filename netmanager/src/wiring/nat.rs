//! iptables rules of the worker: MASQUERADE for egress from the worker subnet to outside the overlay,
//! FORWARD accepts for the bridge, DNAT for the SLA port mappings. Every rule carries a comment
//! (`oak:<bridge>` or `oak:<bridge>:<service>/<instance>`) so it is added once and removed precisely.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

/// The overlay as a whole (10.16.0.0/12 covers worker subnets 10.18/16, the tun 10.19/16 and 10.30/16).
pub const OVERLAY: &str = "10.16.0.0/12";

pub use oak_proto::ports::{parse_port_mappings, PortMapping, PortMappingError};

fn iptables(args: &[&str]) -> Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output().context("running iptables (is it installed?)")
}

fn run(args: &[&str]) -> Result<()> {
    let out = iptables(args)?;
    if !out.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Add `rule` to `table`/`chain` unless it is there already.
fn ensure(table: &str, chain: &str, insert: bool, rule: &[&str]) -> Result<()> {
    let mut check = vec!["-t", table, "-C", chain];
    check.extend_from_slice(rule);
    if iptables(&check)?.status.success() {
        return Ok(());
    }
    let mut add = vec!["-t", table, if insert { "-I" } else { "-A" }, chain];
    add.extend_from_slice(rule);
    run(&add)
}

/// Delete every rule of `table`/`chain` whose comment is exactly `comment`.
fn delete_commented(table: &str, chain: &str, comment: &str) -> Result<()> {
    delete_where(table, chain, |c| c == comment)
}

/// Deletes the rules of `chain` whose comment satisfies `matches`.
fn delete_where(table: &str, chain: &str, matches: impl Fn(&str) -> bool) -> Result<()> {
    let out = iptables(&["-t", table, "-S", chain])?;
    if !out.status.success() {
        bail!("iptables -t {table} -S {chain}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<String> = line.split_whitespace().map(|w| w.trim_matches('"').to_string()).collect();
        let has = words.windows(2).any(|w| w[0] == "--comment" && matches(&w[1]));
        if !has || words.first().map(String::as_str) != Some("-A") {
            continue;
        }
        let mut args: Vec<&str> = vec!["-t", table, "-D"];
        args.extend(words[1..].iter().map(String::as_str));
        run(&args)?;
    }
    Ok(())
}

fn bridge_comment(bridge: &str) -> String {
    format!("oak:{bridge}")
}

fn instance_comment(bridge: &str, service_id: &str, instance: u32) -> String {
    format!("oak:{bridge}:{}", oak_proto::instance_key(service_id, instance))
}

pub fn ensure_bridge_rules(bridge: &str, subnet: Ipv4Net) -> Result<()> {
    let c = bridge_comment(bridge);
    let s = subnet.to_string();
    ensure(
        "nat",
        "POSTROUTING",
        false,
        &["-s", &s, "!", "-d", OVERLAY, "-m", "comment", "--comment", &c, "-j", "MASQUERADE"],
    )?;
    ensure("filter", "FORWARD", true, &["-i", bridge, "-m", "comment", "--comment", &c, "-j", "ACCEPT"])?;
    ensure("filter", "FORWARD", true, &["-o", bridge, "-m", "comment", "--comment", &c, "-j", "ACCEPT"])?;
    // traffic inside the overlay is never NATed (see the masquerade above): no connection tracking for it,
    // except to this host's own addresses (e.g. an instance using a port mapping through its gateway)
    let untracked = [
        "-s",
        OVERLAY,
        "-d",
        OVERLAY,
        "-m",
        "addrtype",
        "!",
        "--dst-type",
        "LOCAL",
        "-m",
        "comment",
        "--comment",
        &c,
        "-j",
        "NOTRACK",
    ];
    if let Err(e) = ensure("raw", "PREROUTING", true, &untracked) {
        tracing::warn!("overlay traffic stays connection-tracked (slower): {e:#}");
    }
    Ok(())
}

fn tunnel_comment(bridge: &str) -> String {
    format!("oak:{bridge}:tunnel")
}

/// The tunnel's datagrams (UDP to and from `port`) are not connection-tracked. Connection tracking serves
/// NAT leaving the overlay and port mappings; on a worker a tun-path packet crosses netfilter up to four
/// times (instance to tun, tunnel out, tunnel in, tun to instance); exempting the tunnel and the overlay's
/// own traffic made single-stream TCP over the tun path ~4 % faster here (four A/B pairs, 8.28 against
/// 7.98 Gbit/s on average, every pair in the same direction).
/// Best effort: without the raw table the overlay only runs slower. Rules of an earlier port go first.
pub fn ensure_tunnel_untracked(bridge: &str, port: u16) {
    let c = tunnel_comment(bridge);
    let p = port.to_string();
    let r = delete_commented("raw", "PREROUTING", &c)
        .and_then(|_| delete_commented("raw", "OUTPUT", &c))
        .and_then(|_| {
            ensure(
                "raw",
                "PREROUTING",
                true,
                &["-p", "udp", "--dport", &p, "-m", "comment", "--comment", &c, "-j", "NOTRACK"],
            )
        })
        .and_then(|_| {
            ensure(
                "raw",
                "OUTPUT",
                true,
                &["-p", "udp", "--sport", &p, "-m", "comment", "--comment", &c, "-j", "NOTRACK"],
            )
        });
    if let Err(e) = r {
        tracing::warn!("tunnel datagrams stay connection-tracked (slower): {e:#}");
    }
}

/// Every rule of this bridge: its own and its instances' port mappings (teardown of the whole worker).
pub fn remove_all_rules(bridge: &str) -> Result<()> {
    let own = bridge_comment(bridge);
    let prefix = format!("{own}:");
    for (table, chain) in [("nat", "POSTROUTING"), ("nat", "PREROUTING"), ("nat", "OUTPUT"), ("filter", "FORWARD")] {
        delete_where(table, chain, |c| c == own || c.starts_with(&prefix))?;
    }
    // best effort, as they were added
    for chain in ["PREROUTING", "OUTPUT"] {
        let _ = delete_where("raw", chain, |c| c == own || c.starts_with(&prefix));
    }
    Ok(())
}

/// Removes the bridge's own rules (masquerade, forward accepts, tunnel untracking).
pub fn remove_bridge_rules(bridge: &str) -> Result<()> {
    let c = bridge_comment(bridge);
    delete_commented("nat", "POSTROUTING", &c)?;
    delete_commented("filter", "FORWARD", &c)?;
    // best effort, as they were added
    let t = tunnel_comment(bridge);
    let _ = delete_commented("raw", "PREROUTING", &c);
    let _ = delete_commented("raw", "PREROUTING", &t);
    let _ = delete_commented("raw", "OUTPUT", &t);
    Ok(())
}

/// Host ports the platform listens on (and ssh): never mapped to an instance, on any worker.
pub const SYSTEM_PORTS: &[(u16, &str)] = &[
    (22, "ssh"),
    (6000, "the NetManager's local API"),
    (10000, "the root's REST API"),
    (10099, "the root's service manager"),
    (10100, "the cluster's worker registration"),
    (10110, "the cluster network service"),
    (50052, "the root's cluster registration"),
    (50103, "the overlay tunnel"),
];

fn entry(p: &PortMapping) -> String {
    format!("{}:{}/{}", p.host, p.container, p.proto)
}

/// Checks an instance's host ports before any rule is written: none of the system's ports (nor `reserved`,
/// the ports this worker itself uses), none twice in the request, none that another instance already maps
/// (`taken`: its mappings and whose they are).
pub fn check_port_mappings<'a>(
    ports: &[PortMapping],
    reserved: &[(u16, &str)],
    taken: impl IntoIterator<Item = (&'a PortMapping, &'a str)>,
) -> Result<(), PortMappingError> {
    let taken: Vec<(&PortMapping, &str)> = taken.into_iter().collect();
    for (i, p) in ports.iter().enumerate() {
        let refuse = |why: String| Err(PortMappingError { entry: entry(p), why });
        if let Some((_, what)) = SYSTEM_PORTS.iter().chain(reserved).find(|(port, _)| *port == p.host) {
            return refuse(format!("host port {} is reserved for {what}", p.host));
        }
        if ports[..i].iter().any(|o| o.host == p.host && o.proto == p.proto) {
            return refuse(format!("host port {}/{} is mapped twice in this request", p.host, p.proto));
        }
        if let Some((_, owner)) = taken.iter().find(|(o, _)| o.host == p.host && o.proto == p.proto) {
            return refuse(format!("host port {}/{} is already mapped to instance {owner}", p.host, p.proto));
        }
    }
    Ok(())
}

pub fn add_port_mappings(
    bridge: &str,
    service_id: &str,
    instance: u32,
    ip: Ipv4Addr,
    ports: &[PortMapping],
) -> Result<()> {
    let c = instance_comment(bridge, service_id, instance);
    for p in ports {
        let dport = p.host.to_string();
        let to = format!("{ip}:{}", p.container);
        // both chains: tagged with the instance, to the instance's port
        let dnat = ["-m", "comment", "--comment", &c, "-j", "DNAT", "--to-destination", &to];
        // from elsewhere, to one of this host's addresses (never traffic passing through to another host)
        let from_outside = ["-p", &p.proto, "--dport", &dport, "-m", "addrtype", "--dst-type", "LOCAL"];
        ensure("nat", "PREROUTING", false, &[&from_outside[..], &dnat].concat())?;
        // from this host to one of its own addresses except loopback
        let from_here =
            ["-p", &p.proto, "!", "-d", "127.0.0.0/8", "--dport", &dport, "-m", "addrtype", "--dst-type", "LOCAL"];
        ensure("nat", "OUTPUT", false, &[&from_here[..], &dnat].concat())?;
    }
    Ok(())
}

pub fn remove_port_mappings(bridge: &str, service_id: &str, instance: u32) -> Result<()> {
    let c = instance_comment(bridge, service_id, instance);
    delete_commented("nat", "PREROUTING", &c)?;
    delete_commented("nat", "OUTPUT", &c)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(host: u16, container: u16, proto: &str) -> PortMapping {
        PortMapping { host, container, proto: proto.into() }
    }

    #[test]
    fn system_reserved_repeated_and_taken_host_ports_are_refused() {
        let none = std::iter::empty();
        assert!(check_port_mappings(&[pm(8080, 80, "tcp"), pm(8080, 53, "udp")], &[], none).is_ok());
        let e = check_port_mappings(&[pm(22, 22, "tcp")], &[], std::iter::empty()).unwrap_err();
        assert_eq!(e.entry, "22:22/tcp");
        assert!(e.why.contains("reserved for ssh"), "{e}");
        let e = check_port_mappings(&[pm(10000, 80, "tcp")], &[], std::iter::empty()).unwrap_err();
        assert!(e.why.contains("root's REST API"), "{e}");
        let e = check_port_mappings(&[pm(7000, 80, "udp")], &[(7000, "this worker's tunnel")], std::iter::empty())
            .unwrap_err();
        assert!(e.why.contains("this worker's tunnel"), "{e}");
        let e = check_port_mappings(&[pm(8080, 80, "tcp"), pm(8080, 81, "tcp")], &[], std::iter::empty()).unwrap_err();
        assert!(e.why.contains("twice"), "{e}");
        let held = pm(8080, 80, "tcp");
        let e = check_port_mappings(&[pm(8080, 8080, "tcp")], &[], [(&held, "web/0")]).unwrap_err();
        assert!(e.why.contains("already mapped to instance web/0"), "{e}");
        assert!(check_port_mappings(&[pm(8080, 80, "udp")], &[], [(&held, "web/0")]).is_ok(), "another protocol");
    }
}
