//! What the fast path's SERVICES and ROUTES maps should hold for a snapshot of the tables: the tun path's
//! tables seen as kernel map entries, with the services the kernel cannot serve whole left to the tun path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use netmanager_ebpf_common::{Route, Service, KIND_CLOSEST, KIND_ROUND_ROBIN, KIND_TUN, MAX_BACKENDS};

use crate::select;
use crate::tables::Snapshot;

/// An address as the programs read it from packet bytes.
pub fn raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// A port as the programs read it from packet bytes.
pub fn raw_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// What SERVICES and ROUTES should hold for a snapshot.
#[derive(Debug, Default)]
pub struct MapPlan {
    pub services: HashMap<u32, Service>,
    pub routes: HashMap<u32, Route>,
    /// Services left whole to the tun path (`KIND_TUN`) -> why.
    pub tun_only: BTreeMap<String, String>,
}

/// ROUTES: every remote worker subnet whose tunnel endpoint is not an address of this host (`own`):
/// packets to such an endpoint would have to be delivered here, and its replies would come back over
/// loopback, past the uplink program, so the tun path carries them. SERVICES: each service IP with its
/// instances in the order of [`select::in_order`]; a service with an instance the
/// kernel cannot reach (no route, or more than MAX_BACKENDS instances) is marked `KIND_TUN` so the tun
/// path balances all of its flows. Closest: the index [`select::closest`] picks.
pub fn plan_maps(snap: &Snapshot, worker_prefix: u8, own: &HashSet<Ipv4Addr>) -> MapPlan {
    let mut plan = MapPlan::default();
    for (net, ep) in &snap.routes {
        if Some(*net) == snap.local_subnet {
            continue;
        }
        if let SocketAddr::V4(v4) = ep {
            if !own.contains(v4.ip()) {
                let src_ip = raw(snap.sources.get(net).copied().unwrap_or(*v4.ip()));
                let r = Route { worker_ip: raw(*v4.ip()), src_ip, port: raw_port(v4.port()), _pad: 0 };
                plan.routes.insert(raw(net.network()), r);
            }
        }
    }
    for s in snap.services.values() {
        let mut insts = select::in_order(&s.instances);
        // the programs' ROUTES key: the destination's worker subnet
        let routed =
            |ip: Ipv4Addr| plan.routes.contains_key(&raw(Ipv4Net::new(ip, worker_prefix).expect("prefix").network()));
        let why = if insts.len() > MAX_BACKENDS {
            Some(format!("{} instances, the kernel balances over at most {MAX_BACKENDS}", insts.len()))
        } else {
            insts.iter().find(|i| !snap.is_local(i.ns_ip) && !routed(i.ns_ip)).map(|i| match snap.route_for(i.ns_ip) {
                Some(ep) => format!("instance {} is behind tunnel endpoint {ep}, an address of this host", i.ns_ip),
                None => format!("no route to instance {} yet", i.ns_ip),
            })
        };
        insts.truncate(MAX_BACKENDS);
        let mut backends = [0u32; MAX_BACKENDS];
        for (k, i) in insts.iter().enumerate() {
            backends[k] = raw(i.ns_ip);
        }
        let closest = select::closest(snap, &insts, |i| i.rtt_us).unwrap_or(0) as u8;
        let base = Service { kind: KIND_ROUND_ROBIN, count: insts.len() as u8, closest, _pad: 0, backends };
        let (rr_kind, closest_kind) = match why {
            Some(why) => {
                plan.tun_only.insert(s.job_name.clone(), why);
                (KIND_TUN, KIND_TUN)
            }
            None => (KIND_ROUND_ROBIN, KIND_CLOSEST),
        };
        if let Some(ip) = s.rr_ip {
            plan.services.insert(raw(ip), Service { kind: rr_kind, ..base });
        }
        if let Some(ip) = s.closest_ip {
            plan.services.insert(raw(ip), Service { kind: closest_kind, ..base });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{InstanceEndpoint, ServiceEntry};

    fn inst(n: u32, ip: &str, worker: &str, rtt: Option<u64>) -> InstanceEndpoint {
        InstanceEndpoint {
            service_id: "s1".into(),
            job_name: "app.ns.echo.ns".into(),
            instance_number: n,
            ns_ip: ip.parse().unwrap(),
            worker: worker.parse().unwrap(),
            rtt_us: rtt,
        }
    }

    /// This worker: 10.18.0.0/26 at 192.168.77.1:50103; worker B (10.18.0.64/26) at 192.168.77.2:50103;
    /// worker C (10.18.0.128/26) advertises 192.168.77.1:50200, an address of this host (a relay here).
    fn snap(instances: Vec<InstanceEndpoint>) -> Snapshot {
        let mut s = Snapshot { local_subnet: Some("10.18.0.0/26".parse().unwrap()), ..Default::default() };
        s.routes.insert("10.18.0.0/26".parse().unwrap(), "192.168.77.1:50103".parse().unwrap());
        s.routes.insert("10.18.0.64/26".parse().unwrap(), "192.168.77.2:50103".parse().unwrap());
        s.routes.insert("10.18.0.128/26".parse().unwrap(), "192.168.77.1:50200".parse().unwrap());
        s.services.insert(
            "s1".into(),
            ServiceEntry {
                service_id: "s1".into(),
                job_name: "app.ns.echo.ns".into(),
                rr_ip: Some("10.30.0.2".parse().unwrap()),
                closest_ip: Some("10.30.0.3".parse().unwrap()),
                instances,
            },
        );
        s
    }

    fn own() -> HashSet<Ipv4Addr> {
        ["127.0.0.1", "192.168.77.1"].iter().map(|a| a.parse().unwrap()).collect()
    }

    fn svc(p: &MapPlan, ip: &str) -> Service {
        p.services[&raw(ip.parse().unwrap())]
    }

    #[test]
    fn routes_skip_the_local_subnet_and_endpoints_on_this_host() {
        let p = plan_maps(&snap(vec![]), 26, &own());
        let keys: HashSet<u32> = p.routes.keys().copied().collect();
        assert_eq!(keys, HashSet::from([raw("10.18.0.64".parse().unwrap())]));
        let r = p.routes[&raw("10.18.0.64".parse().unwrap())];
        assert_eq!((r.worker_ip, r.port), (raw("192.168.77.2".parse().unwrap()), raw_port(50103)));
        assert_eq!(r.src_ip, r.worker_ip, "without a second address the endpoint's is the only one");
        // a worker behind a relay: its datagrams may come from the address its cluster saw
        let mut s = snap(vec![]);
        s.sources.insert("10.18.0.64/26".parse().unwrap(), "192.168.77.9".parse().unwrap());
        let r = plan_maps(&s, 26, &own()).routes[&raw("10.18.0.64".parse().unwrap())];
        assert_eq!(r.src_ip, raw("192.168.77.9".parse().unwrap()));
    }

    #[test]
    fn a_service_reachable_in_the_kernel_is_balanced_there() {
        // instance numbers out of order on purpose: backends follow the instance number
        let p = plan_maps(
            &snap(vec![
                inst(1, "10.18.0.66", "192.168.77.2:50103", Some(300)),
                inst(0, "10.18.0.2", "192.168.77.1:50103", None),
            ]),
            26,
            &own(),
        );
        assert!(p.tun_only.is_empty(), "{:?}", p.tun_only);
        let rr = svc(&p, "10.30.0.2");
        assert_eq!((rr.kind, rr.count), (KIND_ROUND_ROBIN, 2));
        assert_eq!(&rr.backends[..2], &[raw("10.18.0.2".parse().unwrap()), raw("10.18.0.66".parse().unwrap())]);
        let c = svc(&p, "10.30.0.3");
        assert_eq!((c.kind, c.closest), (KIND_CLOSEST, 0), "the local instance is the closest");
    }

    #[test]
    fn closest_is_by_rtt_not_by_a_shared_endpoint_address() {
        // two remote instances, the one on B measured nearer; C's endpoint has this host's address (a
        // relay here) but C's instance is not local, so it must not count as RTT 0. With C's endpoint not
        // on this host the kernel serves the service:
        let mut s = snap(vec![
            inst(0, "10.18.0.130", "192.168.77.1:50200", Some(30_000)),
            inst(1, "10.18.0.66", "192.168.77.2:50103", Some(200)),
        ]);
        let elsewhere = HashSet::from(["192.168.77.9".parse().unwrap()]);
        let p = plan_maps(&s, 26, &elsewhere);
        assert!(p.tun_only.is_empty(), "{:?}", p.tun_only);
        assert_eq!(svc(&p, "10.30.0.3").closest, 1, "B (200 µs) is nearer than C (30 ms)");
        // an unmeasured RTT loses against a measured one
        s.services.get_mut("s1").unwrap().instances[1].rtt_us = None;
        assert_eq!(svc(&plan_maps(&s, 26, &elsewhere), "10.30.0.3").closest, 0);
    }

    #[test]
    fn an_instance_behind_an_endpoint_on_this_host_leaves_the_service_to_the_tun_path() {
        let p = plan_maps(
            &snap(vec![
                inst(0, "10.18.0.130", "192.168.77.1:50200", Some(30_000)),
                inst(1, "10.18.0.66", "192.168.77.2:50103", Some(200)),
            ]),
            26,
            &own(),
        );
        assert_eq!(svc(&p, "10.30.0.2").kind, KIND_TUN);
        assert_eq!(svc(&p, "10.30.0.3").kind, KIND_TUN);
        let why = &p.tun_only["app.ns.echo.ns"];
        assert!(why.contains("10.18.0.130") && why.contains("192.168.77.1:50200"), "{why}");
    }

    #[test]
    fn no_route_yet_or_too_many_instances_leave_the_service_to_the_tun_path() {
        let p = plan_maps(&snap(vec![inst(0, "10.18.0.200", "192.168.77.5:50103", None)]), 26, &own());
        assert_eq!(svc(&p, "10.30.0.2").kind, KIND_TUN);
        assert!(p.tun_only["app.ns.echo.ns"].contains("no route"), "{:?}", p.tun_only);
        let many = (0..MAX_BACKENDS as u32 + 1)
            .map(|n| inst(n, &format!("10.18.0.{}", n + 2), "192.168.77.1:50103", None))
            .collect();
        let p = plan_maps(&snap(many), 26, &own());
        assert_eq!(svc(&p, "10.30.0.2").kind, KIND_TUN);
        assert!(p.tun_only["app.ns.echo.ns"].contains("at most 32"), "{:?}", p.tun_only);
    }
}
