//! Layouts of the fast path's maps, shared by the kernel programs (`netmanager-ebpf`) and the NetManager's
//! loader. All addresses are IPv4 in network byte order as `u32` read straight from packet bytes
//! (`u32::from_ne_bytes(octets)`), ports likewise in network byte order.
#![no_std]

/// Instances a service IP can balance over in the fast path (more fall back to the tun path).
pub const MAX_BACKENDS: usize = 32;

/// The tunnel header of the NetManager's UDP overlay (see netmanager/DESIGN.md): magic, version, type,
/// flags, then a u32 id. Type 0 carries a raw inner IPv4 packet.
pub const TUNNEL_MAGIC: u8 = 0x4F;
pub const TUNNEL_VERSION: u8 = 1;
pub const TUNNEL_TYPE_DATA: u8 = 0;
pub const TUNNEL_HDR_LEN: usize = 8;
/// Outer IPv4 (20) + UDP (8) + tunnel header (8).
pub const ENCAP_LEN: usize = 36;

pub const KIND_ROUND_ROBIN: u8 = 0;
pub const KIND_CLOSEST: u8 = 1;
/// A service the fast path leaves whole to the tun path: one of its instances is behind a tunnel endpoint
/// the kernel cannot own both directions of (an address of this host: a relay or port forward here, or a
/// second NetManager). Translating only some of its flows in the kernel would skew the balancing.
pub const KIND_TUN: u8 = 2;

/// SERVICES value, keyed by a service IP (round-robin and closest IPs each have an entry).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub kind: u8,
    /// Number of valid entries in `backends`.
    pub count: u8,
    /// For KIND_CLOSEST: index of the nearest backend.
    pub closest: u8,
    pub _pad: u8,
    pub backends: [u32; MAX_BACKENDS],
}

/// CT key: one direction of a flow as seen in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub const CT_FORWARD: u8 = 1;
pub const CT_REVERSE: u8 = 2;
/// A flow the fast path carries without translation (arriving at a server, or the reply direction of a
/// flow a local instance opened to a remote instance IP): decapsulate and deliver.
pub const CT_PASSTHROUGH: u8 = 3;
/// A flow of an instance to itself through a service IP (`Hairpin`), either direction: the source becomes
/// the service IP and the destination the instance (the kernel drops a packet that arrives with one of its
/// own addresses as source, and answers a local source on loopback, past the reverse translation).
pub const CT_HAIRPIN: u8 = 4;

/// CT value. Forward (client -> service IP): `addr` is the chosen instance. Reverse (instance -> client):
/// `addr` is the service IP to put back as source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowVal {
    pub addr: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
}

impl FlowVal {
    /// Direction `dir` (`CT_*`) of a flow, with its address.
    pub const fn new(addr: u32, dir: u8) -> Self {
        Self { addr, dir, _pad: [0; 3] }
    }
}

/// LOCAL value, keyed by an instance's overlay IP: where to hand its packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalEndpoint {
    /// ifindex of the host side of the instance's veth (redirect_peer delivers into the instance).
    pub ifindex: u32,
    /// MAC of the instance's interface.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// ROUTES value, keyed by a remote worker subnet's network address (/26): its tunnel endpoint, and the
/// addresses its datagrams may come from (the endpoint's, or the one its cluster saw).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Route {
    pub worker_ip: u32,
    /// The worker's second address (its `worker_ip` when it has none).
    pub src_ip: u32,
    /// Tunnel UDP port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// CONFIG[0]: this worker.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Local worker subnet network address and mask (network byte order).
    pub subnet: u32,
    pub subnet_mask: u32,
    /// Mask applied to a destination to find its ROUTES key (the worker subnet prefix, /26).
    pub route_mask: u32,
    /// Service IP space (10.30.0.0/16) and its mask.
    pub service_net: u32,
    pub service_mask: u32,
    /// Source of encapsulated packets (the uplink's own address: NodePublicAddress when the uplink holds
    /// it) and the uplink they leave by.
    pub public_ip: u32,
    pub uplink_ifindex: u32,
    /// Tunnel UDP port we listen on, network byte order.
    pub tunnel_port: u16,
    /// MAC of the bridge (the instances' gateway), source MAC of delivered packets.
    pub gw_mac: [u8; 6],
    /// 1 when the fast path is on (userspace has filled the maps).
    pub enabled: u32,
}

/// The names of the object's maps (the `#[map]` statics in `netmanager-ebpf`, checked there at compile
/// time), which the loader looks up and pins under.
pub mod map_name {
    pub const SERVICES: &str = "SERVICES";
    /// Round-robin position per service IP.
    pub const RR: &str = "RR";
    pub const CT: &str = "CT";
    pub const LOCAL: &str = "LOCAL";
    pub const ROUTES: &str = "ROUTES";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    /// Every map of the object (all pinned when the NetManager pins).
    pub const ALL: [&str; 7] = [SERVICES, RR, CT, LOCAL, ROUTES, CONFIG, COUNTERS];

    /// `a == b`, usable in constants (the kernel side asserts its statics' names with it).
    pub const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $v:ident = $name:literal,)*) => {
        /// The fast path's counters: slots of `PerCpuArray<u64> COUNTERS`, in declaration order, and the
        /// names the NetManager API shows them under. Every early exit of a program counts under one of
        /// them (or under none when the packet is simply not the fast path's business).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $v,)*
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Counter] = &[$(Counter::$v,)*];
            /// Number of slots of COUNTERS.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Its slot in COUNTERS.
            #[inline(always)]
            pub const fn slot(self) -> u32 {
                self as u32
            }

            /// Its name in the NetManager API.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$v => $name,)*
                }
            }
        }
    };
}

counters! {
    NewFlow = "new_flow",
    FwdNat = "fwd_nat",
    RevNat = "rev_nat",
    LocalDeliver = "local_deliver",
    Encap = "encap",
    Decap = "decap",
    FastBytes = "fast_bytes",
    PassUnknownService = "pass_unknown_service",
    PassTcpMidflow = "pass_tcp_midflow",
    /// Not a valid tunnel data header: left to the tun path, which counts it by reason.
    PassBadTunnel = "pass_bad_tunnel",
    DropNotForNode = "drop_not_for_node",
    ErrAdjustRoom = "err_adjust_room",
    ErrRedirect = "err_redirect",
    PassNoBackend = "pass_no_backend",
    PassOther = "pass_other",
    /// Tunnel data for a flow the fast path does not know (e.g. one the tun path translated): left to it.
    PassUnknownFlow = "pass_unknown_flow",
    /// Encapsulated packets sent with the next hop from `bpf_fib_lookup` (MACs written, `bpf_redirect`).
    RedirectFib = "redirect_fib",
    /// Encapsulated packets left to `bpf_redirect_neigh` (no resolved neighbour for the next hop yet).
    RedirectNeigh = "redirect_neigh",
    /// Packets to a service left whole to the tun path (`KIND_TUN`).
    PassTunService = "pass_tun_service",
    /// Tunnel data whose outer source is not the worker of its inner source (as far as ROUTES knows): left
    /// to the tun path, which drops it as `tunnel_unknown_peer` or `tunnel_spoofed_inner` unless its
    /// fuller tables know the sender.
    PassUnverifiedPeer = "pass_unverified_peer",
    /// Packets of flows whose chosen instance is their own client (an instance reaching itself through
    /// its service IP), both ends translated (`CT_HAIRPIN`).
    Hairpin = "hairpin",
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowVal {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::Config {}
}
