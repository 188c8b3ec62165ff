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

/// CT value. Forward (client -> service IP): `addr` is the chosen instance. Reverse (instance -> client):
/// `addr` is the service IP to put back as source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowVal {
    pub addr: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
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

/// ROUTES value, keyed by a remote worker subnet's network address (/26): its tunnel endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Route {
    pub worker_ip: u32,
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

/// Counter slots (PerCpuArray<u64> COUNTERS).
pub mod counter {
    pub const NEW_FLOW: u32 = 0;
    pub const FWD_NAT: u32 = 1;
    pub const REV_NAT: u32 = 2;
    pub const LOCAL_DELIVER: u32 = 3;
    pub const ENCAP: u32 = 4;
    pub const DECAP: u32 = 5;
    pub const FAST_BYTES: u32 = 6;
    pub const PASS_UNKNOWN_SERVICE: u32 = 7;
    pub const PASS_TCP_MIDFLOW: u32 = 8;
    /// Not a valid tunnel data header: left to the tun path, which counts it by reason.
    pub const PASS_BAD_TUNNEL: u32 = 9;
    pub const DROP_NOT_FOR_NODE: u32 = 10;
    pub const ERR_ADJUST_ROOM: u32 = 11;
    pub const ERR_REDIRECT: u32 = 12;
    pub const PASS_NO_BACKEND: u32 = 13;
    pub const PASS_OTHER: u32 = 14;
    /// Tunnel data for a flow the fast path does not know (e.g. one the tun path translated): left to it.
    pub const PASS_UNKNOWN_FLOW: u32 = 15;
    /// Encapsulated packets sent with the next hop from `bpf_fib_lookup` (MACs written, `bpf_redirect`).
    pub const REDIRECT_FIB: u32 = 16;
    /// Encapsulated packets left to `bpf_redirect_neigh` (no resolved neighbour for the next hop yet).
    pub const REDIRECT_NEIGH: u32 = 17;
    /// Packets to a service left whole to the tun path (`KIND_TUN`).
    pub const PASS_TUN_SERVICE: u32 = 18;
    pub const COUNT: u32 = 19;
    /// Names, in slot order (what the NetManager API shows).
    pub const NAMES: [&str; COUNT as usize] = [
        "new_flow",
        "fwd_nat",
        "rev_nat",
        "local_deliver",
        "encap",
        "decap",
        "fast_bytes",
        "pass_unknown_service",
        "pass_tcp_midflow",
        "pass_bad_tunnel",
        "drop_not_for_node",
        "err_adjust_room",
        "err_redirect",
        "pass_no_backend",
        "pass_other",
        "pass_unknown_flow",
        "redirect_fib",
        "redirect_neigh",
        "pass_tun_service",
    ];
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
