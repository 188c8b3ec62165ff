//! The engine's unit tests: translation both ways, selection, hairpinning, eviction, the saved table, and
//! a seeded fuzz of both directions.

use super::*;
use crate::proxy::packet::tests::checksums_ok;
use crate::tables::ServiceEntry;
use etherparse::PacketBuilder;
use oak_proto::vivaldi::Coord;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn snap() -> Snapshot {
    let mut s = Snapshot { local_subnet: Some("10.18.0.0/26".parse().unwrap()), ..Default::default() };
    let remote: SocketAddr = "192.0.2.2:50103".parse().unwrap();
    let me: SocketAddr = "192.0.2.1:50103".parse().unwrap();
    s.routes.insert("10.18.0.64/26".parse().unwrap(), remote);
    let inst = |n, a: &str, w| InstanceEndpoint {
        service_id: "s".into(),
        job_name: "a.b.c.d".into(),
        instance_number: n,
        ns_ip: ip(a),
        worker: w,
        rtt_us: None,
    };
    s.services.insert(
        "s".into(),
        ServiceEntry {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            rr_ip: Some(ip("10.30.0.5")),
            closest_ip: Some(ip("10.30.0.6")),
            instances: vec![inst(0, "10.18.0.3", me), inst(1, "10.18.0.66", remote)],
        },
    );
    s
}

fn udp(src: &str, dst: &str, sp: u16, dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(ip(src).octets(), ip(dst).octets(), 64).udp(sp, dp).write(&mut v, b"payload").unwrap();
    v
}

fn addrs(pkt: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let p = packet::parse(pkt, Reason::TunMalformed).unwrap();
    let l = p.l4.unwrap();
    (p.src, l.sport, p.dst, l.dport)
}

/// The tun path translates a GSO super-packet once, on its header, then cuts it: every segment carries
/// the translation, its own sequence number and right checksums, and the payload arrives in order.
#[test]
fn super_packet_translated_once_then_split() {
    let s = snap();
    let mut e = Engine::new(Arc::new(Counters::new()));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut pkt = Vec::new();
    PacketBuilder::ipv4(ip("10.18.0.2").octets(), ip("10.30.0.5").octets(), 64)
        .tcp(41000, 80, 5000, 4000)
        .ack(1)
        .write(&mut pkt, &payload)
        .unwrap();
    // what the kernel hands over with offloads: the TCP checksum field holds only the pseudo-header sum
    pkt[36..38].copy_from_slice(&[0x12, 0x34]);
    let mut hdr = tun_rs::VirtioNetHdr {
        flags: 1,
        gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 1400, // not trusted
        gso_size: 1000,
        csum_start: 20,
        csum_offset: 16,
    };
    assert!(crate::proxy::offload::gso_header_fixup(&mut hdr, &pkt));
    assert_eq!(hdr.hdr_len, 40);
    let v = e.outbound(&mut pkt, &s, Instant::now());
    assert!(matches!(v, Verdict::ToTun | Verdict::Encap(_)), "{v:?}");
    let mut segs = vec![vec![0u8; 1600]; 8];
    let mut sizes = vec![0usize; 8];
    let n = tun_rs::gso_split(&mut pkt, hdr, &mut segs, &mut sizes, 8, false).unwrap();
    assert_eq!(n, 3);
    let mut got = Vec::new();
    let first = addrs(&segs[0][8..8 + sizes[0]]);
    assert!([ip("10.18.0.3"), ip("10.18.0.66")].contains(&first.2) && first.3 == 80, "{first:?}");
    for (i, (seg, len)) in segs.iter().zip(&sizes).take(n).enumerate() {
        let p = &seg[8..8 + len];
        assert!(checksums_ok(p), "segment {i}");
        assert_eq!(addrs(p), first, "segment {i}");
        let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
        assert_eq!(seq, 5000 + 1000 * i as u32);
        got.extend_from_slice(&p[40..]);
    }
    assert_eq!(got, payload);
    // a header that does not fit the packet is refused
    let mut bad = hdr;
    bad.csum_start = 4000;
    assert!(!crate::proxy::offload::gso_header_fixup(&mut bad, &pkt));
}

#[test]
fn round_robin_per_flow_both_directions() {
    let s = snap();
    let mut e = Engine::new(Arc::new(Counters::new()));
    let now = Instant::now();
    let mut seen = Vec::new();
    for sport in [1000u16, 1001, 1002, 1003] {
        let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
        let v = e.outbound(&mut pkt, &s, now);
        assert!(checksums_ok(&pkt));
        let (src, sp, dst, dp) = addrs(&pkt);
        assert_eq!(dp, 53);
        seen.push(dst);
        // the same flow sticks to the same instance
        let mut again = udp("10.18.0.2", "10.30.0.5", sport, 53);
        assert_eq!(e.outbound(&mut again, &s, now), v);
        assert_eq!(addrs(&again).2, dst);
        if dst == ip("10.18.0.66") {
            // remote: src unchanged, encapsulated; the reply comes back through the tunnel
            assert_eq!((src, sp), (ip("10.18.0.2"), sport));
            assert_eq!(v, Verdict::Encap("192.0.2.2:50103".parse().unwrap()));
            let mut reply = udp("10.18.0.66", "10.18.0.2", 53, sport);
            assert_eq!(e.inbound(&mut reply, &s, now, false), Verdict::ToTun);
            assert_eq!(addrs(&reply), (ip("10.30.0.5"), 53, ip("10.18.0.2"), sport));
            assert!(checksums_ok(&reply));
        } else {
            // local: hairpin through the service IP
            assert_eq!(dst, ip("10.18.0.3"));
            assert_eq!(src, ip("10.30.0.5"));
            assert_eq!(v, Verdict::ToTun);
            let mut reply = udp("10.18.0.3", "10.30.0.5", 53, sp);
            assert_eq!(e.outbound(&mut reply, &s, now), Verdict::ToTun);
            assert_eq!(addrs(&reply), (ip("10.30.0.5"), 53, ip("10.18.0.2"), sport));
            assert!(checksums_ok(&reply));
        }
    }
    assert_eq!(seen, vec![ip("10.18.0.3"), ip("10.18.0.66"), ip("10.18.0.3"), ip("10.18.0.66")]);
    assert_eq!(e.flows(), 4);
    e.evict(now + Duration::from_secs(61));
    assert_eq!(e.flows(), 0);
    assert_eq!(e.counters.count(Event::FlowsEvicted), 4);
}

#[test]
fn conversions_survive_export_and_import() {
    let s = snap();
    let mut e = Engine::new(Arc::new(Counters::new()));
    let now = Instant::now();
    let mut chosen = Vec::new();
    for sport in [2000u16, 2001] {
        let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
        e.outbound(&mut pkt, &s, now);
        chosen.push(addrs(&pkt));
    }
    assert_ne!(chosen[0].2, chosen[1].2, "one local, one remote instance");
    let saved = e.export();
    let changes = e.changes();
    // a restarted proxy: its round-robin position is new, but the flows keep their instances
    let mut e2 = Engine::new(Arc::new(Counters::new()));
    assert_eq!(e2.import(&format!("{saved}garbage line\n1 2 3\n"), now), 2);
    for (sport, before) in [2000u16, 2001].into_iter().zip(&chosen) {
        let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
        e2.outbound(&mut pkt, &s, now);
        assert_eq!(&addrs(&pkt), before, "flow {sport} keeps its instance and translation");
    }
    // replies are translated back as before
    let remote = chosen.iter().find(|c| c.2 == ip("10.18.0.66")).unwrap();
    let mut reply = udp("10.18.0.66", "10.18.0.2", 53, remote.1);
    assert_eq!(e2.inbound(&mut reply, &s, now, false), Verdict::ToTun);
    assert_eq!(addrs(&reply).0, ip("10.30.0.5"));
    assert!(e.changes() == changes && changes >= 2);
}

#[test]
fn closest_and_unknown_and_removal() {
    let mut s = snap();
    let mut e = Engine::new(Arc::new(Counters::new()));
    let now = Instant::now();
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
    e.outbound(&mut pkt, &s, now);
    assert_eq!(addrs(&pkt).2, ip("10.18.0.3"), "closest = local");
    let mut pkt = udp("10.18.0.2", "10.30.0.9", 5, 53);
    assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Resolve(ip("10.30.0.9")));
    // the local instance goes away: the flow moves
    s.services.get_mut("s").unwrap().instances.remove(0);
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
    e.outbound(&mut pkt, &s, now);
    assert_eq!(addrs(&pkt).2, ip("10.18.0.66"));
    s.services.get_mut("s").unwrap().instances.clear();
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
    assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Drop(Reason::NoInstance));
    assert_eq!(e.counters.dropped(Reason::NoInstance), 1);
    // not for us
    let mut pkt = udp("10.18.0.66", "10.18.0.100", 5, 53);
    assert_eq!(e.inbound(&mut pkt, &s, now, false), Verdict::Drop(Reason::NotForThisNode));
    let mut pkt = udp("10.18.0.2", "172.16.0.1", 5, 53);
    assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Drop(Reason::NoRoute));
}

#[test]
fn closest_by_rtt_estimate() {
    let mut s = snap();
    let far: SocketAddr = "192.0.2.3:50103".parse().unwrap();
    s.routes.insert("10.18.0.128/26".parse().unwrap(), far);
    let svc = s.services.get_mut("s").unwrap();
    svc.instances.remove(0); // no local instance
    let mut far_inst = svc.instances[0].clone();
    far_inst.instance_number = 0;
    far_inst.ns_ip = ip("10.18.0.130");
    far_inst.worker = far;
    svc.instances.push(far_inst);
    let mut e = Engine::new(Arc::new(Counters::new()));
    let now = Instant::now();
    // coordinates unsure: the measured samples are the estimates
    let own = Coord::default();
    e.peers.record("192.0.2.2:50103".parse().unwrap(), 900, None, &own, now);
    e.peers.record(far, 300, None, &own, now);
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
    assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Encap(far));
    assert_eq!(addrs(&pkt).2, ip("10.18.0.130"));
    // the RTTs change: new flows follow, the existing one sticks
    e.peers.record(far, 5000, None, &own, now);
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 6, 53);
    e.outbound(&mut pkt, &s, now);
    assert_eq!(addrs(&pkt).2, ip("10.18.0.66"));
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
    e.outbound(&mut pkt, &s, now);
    assert_eq!(addrs(&pkt).2, ip("10.18.0.130"));
    // confident coordinates put the far worker far away: a new flow follows them even though the last
    // sample to it (one noisy one) says it is nearest, and even though the tables carry no RTT yet (an entry
    // the control plane just rewrote)
    let own = Coord { pos: [0.0, 0.0], height: 10.0, error: 0.1 };
    let at = |x: f64| Some(Coord { pos: [x, 0.0], height: 10.0, error: 0.1 });
    e.peers.record("192.0.2.2:50103".parse().unwrap(), 900, at(1000.0), &own, now);
    e.peers.record(far, 100, at(4000.0), &own, now);
    assert!(s.services["s"].instances.iter().all(|i| i.rtt_us.is_none()));
    let mut pkt = udp("10.18.0.2", "10.30.0.6", 7, 53);
    e.outbound(&mut pkt, &s, now);
    assert_eq!(addrs(&pkt).2, ip("10.18.0.66"));
}

#[test]
fn hairpin_port_collision() {
    let mut s = snap();
    s.services.get_mut("s").unwrap().instances.truncate(1);
    let mut e = Engine::new(Arc::new(Counters::new()));
    let now = Instant::now();
    let mut a = udp("10.18.0.2", "10.30.0.5", 7000, 53);
    let mut b = udp("10.18.0.4", "10.30.0.5", 7000, 53);
    e.outbound(&mut a, &s, now);
    e.outbound(&mut b, &s, now);
    let (pa, pb) = (addrs(&a).1, addrs(&b).1);
    assert_ne!(pa, pb);
    let mut rb = udp("10.18.0.3", "10.30.0.5", 53, pb);
    e.outbound(&mut rb, &s, now);
    assert_eq!(addrs(&rb), (ip("10.30.0.5"), 53, ip("10.18.0.4"), 7000));
}

/// Seeded fuzz: random and mutated packets never panic, and every dropped packet is counted once.
#[test]
fn fuzz_no_panic_and_counted() {
    let s = snap();
    let counters = Arc::new(Counters::new());
    let mut e = Engine::new(counters.clone());
    let now = Instant::now();
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let templates = [udp("10.18.0.2", "10.30.0.5", 1, 53), udp("10.18.0.66", "10.18.0.2", 53, 1), {
        let mut v = Vec::new();
        PacketBuilder::ipv4([10, 18, 0, 2], [10, 30, 0, 5], 64).tcp(5, 80, 1, 100).write(&mut v, b"abc").unwrap();
        v
    }];
    let (mut drops, mut resolves) = (0u64, 0u64);
    let mut gro = tun_rs::GROTable::new();
    let mut to_tun: Vec<Vec<u8>> = Vec::new();
    for round in 0..200_000u32 {
        let mut pkt: Vec<u8> = if round % 2 == 0 {
            let n = (rnd() % 80) as usize;
            (0..n).map(|_| rnd() as u8).collect()
        } else {
            let mut t = templates[(rnd() % 3) as usize].clone();
            for _ in 0..(rnd() % 4) {
                let i = (rnd() as usize) % t.len();
                t[i] = rnd() as u8;
            }
            if rnd() % 8 == 0 {
                t.truncate((rnd() as usize) % t.len());
            }
            t
        };
        let v = if round % 3 == 0 {
            // a whole tunnel datagram
            let mut d = vec![packet::MAGIC, packet::VERSION, packet::TYPE_DATA, 0, 0, 0, 0, 0];
            if rnd() % 4 == 0 {
                d[(rnd() % 8) as usize] = rnd() as u8;
            }
            d.extend_from_slice(&pkt);
            match packet::decode_tunnel(&d) {
                Ok(packet::Tunnel::Data(inner)) => {
                    let mut inner = inner.to_vec();
                    e.inbound(&mut inner, &s, now, false)
                }
                Ok(_) => Verdict::ToTun,
                Err(r) => {
                    counters.drop_packet(r);
                    Verdict::Drop(r)
                }
            }
        } else {
            e.outbound(&mut pkt, &s, now)
        };
        if v == Verdict::ToTun && round % 3 != 0 {
            // what the datapath would queue for the tun: GRO coalescing must survive it too
            let mut b = vec![0u8; 16];
            b.extend_from_slice(&pkt);
            to_tun.push(b);
            if to_tun.len() == 16 {
                let _ = gro.apply_gro(&mut to_tun, 16, rnd() % 2 == 0);
                to_tun.clear();
            }
        }
        match v {
            Verdict::Drop(_) => drops += 1,
            Verdict::Resolve(_) => resolves += 1,
            _ => {}
        }
    }
    assert_eq!(counters.total_dropped(), drops, "every drop counted exactly once");
    assert!(drops > 100_000, "most random input is dropped: {drops}");
    let _ = resolves;
}
