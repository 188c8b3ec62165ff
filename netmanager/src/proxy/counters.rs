//! Datapath counters: every dropped packet is counted under exactly one reason; events count what passed.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

macro_rules! names {
    ($(#[$m:meta])* $name:ident { $($v:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($v),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),*];
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s),* }
            }
        }
    };
}

names! {
    /// Why a packet was dropped.
    Reason {
        TunMalformed = "tun_malformed",
        NotIpv4 = "not_ipv4",
        Fragment = "fragment",
        UnsupportedProtocol = "unsupported_protocol",
        UnknownService = "unknown_service",
        NoInstance = "no_instance",
        NoRoute = "no_route",
        FlowTableFull = "flow_table_full",
        TunnelShort = "tunnel_short",
        TunnelBadMagic = "tunnel_bad_magic",
        TunnelBadVersion = "tunnel_bad_version",
        TunnelBadType = "tunnel_bad_type",
        TunnelBadProbe = "tunnel_bad_probe",
        TunnelMalformedInner = "tunnel_malformed_inner",
        TunnelUnknownPeer = "tunnel_unknown_peer",
        TunnelSpoofedInner = "tunnel_spoofed_inner",
        NotForThisNode = "not_for_this_node",
        SendError = "send_error",
        TunWriteError = "tun_write_error",
    }
}

names! {
    /// Things that happened (not drops). `tun_rx_bytes`: bytes of the packets read from the tun (what
    /// local instances sent into the tun path).
    Event {
        TunReads = "tun_reads",
        TunRx = "tun_rx",
        TunRxBytes = "tun_rx_bytes",
        TunTx = "tun_tx",
        TunnelSends = "tunnel_sends",
        TunnelRx = "tunnel_rx",
        TunnelTx = "tunnel_tx",
        TunnelRxBytes = "tunnel_rx_bytes",
        TunnelTxBytes = "tunnel_tx_bytes",
        ForwardTranslated = "forward_translated",
        ReverseTranslated = "reverse_translated",
        FlowsCreated = "flows_created",
        FlowsEvicted = "flows_evicted",
        ProbesSent = "probes_sent",
        ProbeRequests = "probe_requests",
        ProbeReplies = "probe_replies",
        Resolves = "resolves",
        HeldReplayed = "held_replayed",
        ChecksumsCompleted = "checksums_completed",
        RunsReassembled = "runs_reassembled",
        SuperPacketsReceived = "super_packets_received",
    }
}

/// Shared, lock-free counters (the datapath writes, the local API reads).
#[derive(Debug)]
pub struct Counters {
    drops: Vec<AtomicU64>,
    events: Vec<AtomicU64>,
    /// Last measured RTT per worker tunnel endpoint (µs), published by the datapath every probe round.
    rtt: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Per endpoint: the RTT the coordinates predict (µs), and the estimate "closest" ranks by (the
    /// prediction when confident, else the measured one), both set every probe round.
    rtt_predicted: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
    rtt_closest: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
    /// This worker's Vivaldi coordinate, moved by every probe reply that carries the peer's.
    coord: parking_lot::Mutex<oak_proto::vivaldi::Coord>,
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    pub fn new() -> Self {
        Self {
            drops: Reason::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            events: Event::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            rtt: Default::default(),
            rtt_predicted: Default::default(),
            rtt_closest: Default::default(),
            coord: Default::default(),
        }
    }

    pub fn drop_packet(&self, r: Reason) {
        self.drops[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn drop_packets(&self, r: Reason, n: u64) {
        self.drops[r as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn event(&self, e: Event) {
        self.events[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, e: Event, n: u64) {
        self.events[e as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn dropped(&self, r: Reason) -> u64 {
        self.drops[r as usize].load(Ordering::Relaxed)
    }

    pub fn count(&self, e: Event) -> u64 {
        self.events[e as usize].load(Ordering::Relaxed)
    }

    pub fn total_dropped(&self) -> u64 {
        self.drops.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn set_rtt(&self, endpoint: String, us: u64) {
        self.rtt.lock().insert(endpoint, us);
    }

    /// Every peer's RTTs (µs, by endpoint): the last measured, the coordinates' prediction, the estimate
    /// "closest" ranks by.
    pub fn set_peer_rtts(
        &self,
        measured: impl IntoIterator<Item = (String, u64)>,
        predicted: impl IntoIterator<Item = (String, u64)>,
        closest: impl IntoIterator<Item = (String, u64)>,
    ) {
        *self.rtt.lock() = measured.into_iter().collect();
        *self.rtt_predicted.lock() = predicted.into_iter().collect();
        *self.rtt_closest.lock() = closest.into_iter().collect();
    }

    /// This worker's Vivaldi coordinate.
    pub fn coord(&self) -> oak_proto::vivaldi::Coord {
        *self.coord.lock()
    }

    /// Moves this worker's coordinate by one measurement: `rtt_us` to a peer at `remote` (what its probe
    /// reply carried) and returns the moved coordinate.
    pub fn observe_peer(&self, remote: &oak_proto::vivaldi::Coord, rtt_us: u64) -> oak_proto::vivaldi::Coord {
        // the nanoseconds of the clock break the tie of two workers at the same place
        let jitter = f64::from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos(),
        ) / 1e9;
        let mut c = self.coord.lock();
        c.update(remote, rtt_us as f64, jitter);
        *c
    }

    /// `{"drops": {reason: n, ...}, "events": {event: n, ...}, "dropped_total": n, "rtt_us": {endpoint:
    /// measured µs}, "rtt_predicted_us": {endpoint: the coordinates' prediction}, "rtt_closest_us":
    /// {endpoint: what "closest" ranks by}, "coordinate": {...}}`
    pub fn to_json(&self) -> Value {
        let drops: Map<String, Value> =
            Reason::ALL.iter().map(|r| (r.name().to_string(), self.dropped(*r).into())).collect();
        let events: Map<String, Value> =
            Event::ALL.iter().map(|e| (e.name().to_string(), self.count(*e).into())).collect();
        let rtt = self.rtt.lock().clone();
        let predicted = self.rtt_predicted.lock().clone();
        let closest = self.rtt_closest.lock().clone();
        let c = self.coord();
        let coord = serde_json::json!({"position": c.pos, "height": c.height, "error": c.error});
        serde_json::json!({"drops": drops, "events": events, "dropped_total": self.total_dropped(), "rtt_us": rtt,
            "rtt_predicted_us": predicted, "rtt_closest_us": closest, "coordinate": coord})
    }
}
