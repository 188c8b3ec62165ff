//! The NetManager's datapath counters (`tun.<event>`, `tun.drop.<reason>`, `ebpf.<counter>`, as the root's
//! worker view names them) grouped and named in words.

use std::collections::BTreeMap;

/// The groups, in the order a page shows them.
pub const GROUPS: [&str; 5] =
    ["eBPF fast path", "eBPF: left to the tun path", "eBPF: drops and errors", "tun path", "tun path: drops by reason"];

/// A counter's group and its name in words; counters this dashboard does not know keep their own name.
pub fn describe(key: &str) -> (&'static str, String) {
    if let Some(reason) = key.strip_prefix("tun.drop.") {
        return (GROUPS[4], words(reason, TUN_DROPS));
    }
    if let Some(event) = key.strip_prefix("tun.") {
        return (GROUPS[3], words(event, TUN_EVENTS));
    }
    if let Some(c) = key.strip_prefix("ebpf.") {
        let group = if c.starts_with("pass_") {
            GROUPS[1]
        } else if c.starts_with("drop_") || c.starts_with("err_") {
            GROUPS[2]
        } else {
            GROUPS[0]
        };
        return (group, words(c, EBPF));
    }
    (GROUPS[3], key.to_string())
}

/// Whether the counter counts bytes (shown as B/KiB/MiB), not packets or events.
pub fn is_bytes(key: &str) -> bool {
    key.ends_with("_bytes")
}

/// A counter as a page shows it: its key, its name in words, its value.
pub type Row<'a> = (&'a str, String, u64);

/// The counters by group, in [`GROUPS`] order, each sorted by its words.
pub fn grouped(counters: &BTreeMap<String, u64>) -> Vec<(&'static str, Vec<Row<'_>>)> {
    GROUPS
        .iter()
        .map(|g| {
            let mut rows: Vec<Row> = counters
                .iter()
                .filter_map(|(k, v)| {
                    let (group, label) = describe(k);
                    (group == *g).then_some((k.as_str(), label, *v))
                })
                .collect();
            rows.sort_by(|a, b| a.1.cmp(&b.1));
            (*g, rows)
        })
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

fn words(name: &str, known: &[(&str, &str)]) -> String {
    known.iter().find(|(k, _)| *k == name).map(|(_, w)| w.to_string()).unwrap_or_else(|| name.replace('_', " "))
}

const TUN_EVENTS: &[(&str, &str)] = &[
    ("tun_reads", "reads from the tun device"),
    ("tun_rx", "packets from local instances"),
    ("tun_rx_bytes", "bytes from local instances"),
    ("tun_tx", "packets to local instances"),
    ("tunnel_sends", "tunnel sends"),
    ("tunnel_rx", "tunnel packets received"),
    ("tunnel_tx", "tunnel packets sent"),
    ("tunnel_rx_bytes", "tunnel bytes received"),
    ("tunnel_tx_bytes", "tunnel bytes sent"),
    ("forward_translated", "packets to a service IP translated to an instance"),
    ("reverse_translated", "replies translated back to the service IP"),
    ("flows_created", "flows created"),
    ("flows_evicted", "flows evicted"),
    ("probes_sent", "RTT probes sent"),
    ("probe_requests", "RTT probes answered"),
    ("probe_replies", "RTT probe replies"),
    ("resolves", "service look-ups at the cluster"),
    ("held_replayed", "held packets replayed after a look-up"),
];

const TUN_DROPS: &[(&str, &str)] = &[
    ("not_ipv4", "not IPv4"),
    ("unknown_service", "unknown service IP"),
    ("no_instance", "service without a running instance"),
    ("no_route", "no route to the instance's worker"),
    ("flow_table_full", "flow table full"),
    ("tunnel_unknown_peer", "tunnel packet from an unknown worker"),
    ("tunnel_spoofed_inner", "tunnel packet with a spoofed inner source"),
    ("not_for_this_node", "not for this worker"),
    ("send_error", "send error"),
    ("tun_write_error", "tun write error"),
];

const EBPF: &[(&str, &str)] = &[
    ("new_flow", "new flows"),
    ("fwd_nat", "packets to a service IP translated to an instance"),
    ("rev_nat", "replies translated back to the service IP"),
    ("local_deliver", "delivered to a local instance"),
    ("hairpin", "an instance reaching itself through its service IP"),
    ("encap", "encapsulated to another worker"),
    ("decap", "decapsulated from another worker"),
    ("fast_bytes", "bytes on the fast path"),
    ("redirect_fib", "sent with a resolved next hop"),
    ("redirect_neigh", "sent while resolving the next hop"),
    ("pass_unknown_service", "unknown service IP"),
    ("pass_tcp_midflow", "TCP flow started before the fast path"),
    ("pass_bad_tunnel", "not a valid tunnel packet"),
    ("pass_no_backend", "no instance known to the fast path"),
    ("pass_unknown_flow", "flow the fast path does not know"),
    ("pass_tun_service", "service left to the tun path"),
    ("pass_unverified_peer", "sender not verified by the fast path"),
    ("pass_other", "other"),
    ("drop_not_for_node", "dropped: not for this worker"),
    ("err_adjust_room", "error: making room for the tunnel header"),
    ("err_redirect", "error: redirect"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_grouped_and_named_in_words() {
        assert_eq!(
            describe("tun.drop.no_route"),
            ("tun path: drops by reason", "no route to the instance's worker".into())
        );
        assert_eq!(describe("tun.tunnel_tx_bytes"), ("tun path", "tunnel bytes sent".into()));
        assert_eq!(describe("ebpf.fast_bytes"), ("eBPF fast path", "bytes on the fast path".into()));
        assert_eq!(describe("ebpf.pass_tcp_midflow").0, "eBPF: left to the tun path");
        assert_eq!(describe("ebpf.err_redirect").0, "eBPF: drops and errors");
        // one this dashboard does not know: its own name, readable
        assert_eq!(describe("tun.drop.some_new_reason"), ("tun path: drops by reason", "some new reason".into()));
        assert!(is_bytes("tun.tunnel_rx_bytes") && !is_bytes("tun.tunnel_rx"));
    }

    #[test]
    fn groups_in_order_without_empty_ones() {
        let c: BTreeMap<String, u64> =
            [("tun.tun_rx", 4), ("ebpf.encap", 2), ("tun.drop.no_route", 1)].map(|(k, v)| (k.to_string(), v)).into();
        let g = grouped(&c);
        let names: Vec<&str> = g.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["eBPF fast path", "tun path", "tun path: drops by reason"]);
        assert_eq!(g[2].1, vec![("tun.drop.no_route", "no route to the instance's worker".to_string(), 1)]);
    }
}
