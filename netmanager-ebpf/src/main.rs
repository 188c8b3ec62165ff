//! NetManager fast path: TC programs doing in the kernel what the tun proxy does in userspace, one file per
//! attach point:
//!
//! * [`inst`]: `oak_inst_ingress` (TC ingress of the host side of every instance's veth, i.e. packets the
//!   instance sends): service IP -> instance translation with per-flow state (round-robin per new flow, or
//!   the closest instance), reverse translation of replies, then delivery straight into a local instance
//!   (`bpf_redirect_peer`) or encapsulation to the hosting worker (`bpf_skb_adjust_room` +
//!   `bpf_redirect_neigh` out of the uplink).
//! * [`uplink`]: `oak_uplink_ingress` (TC ingress of the worker's uplink): decapsulation of tunnel
//!   datagrams, reverse translation of replies to flows this worker translated, delivery into the local
//!   instance.
//!
//! Shared helpers by concern: [`packet`] (parsing, address rewriting), [`deliver`] (local delivery and
//! encapsulation). The tunnel format is the tun path's (netmanager/DESIGN.md): outer IPv4 + UDP to the
//! tunnel port, an 8-byte header (0x4F, version 1, type 0, flags 0, id 0), the raw inner IPv4 packet.
//! Anything the fast path does not know (unknown service IPs, mid-flow TCP it did not start, probes,
//! fragments, IPv6) passes on unchanged to the kernel and so to the tun path.
//!
//! Each program is a thin entry around a `try_` function: every early exit is one `?` carrying an
//! [`Exit`], which names the counter it bumps and the action it returns.
#![no_std]
#![no_main]

mod deliver;
mod inst;
mod packet;
mod uplink;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use netmanager_ebpf_common::{map_name, Config, Counter, FlowKey, FlowVal, LocalEndpoint, Route, Service};

/// A `#[map]` static whose name is the one `map_name` gives the loader (a mismatch does not compile).
macro_rules! oak_map {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $init:expr) => {
        const _: () = assert!(map_name::same(stringify!($name), map_name::$name), "map name differs from map_name");
        $(#[$doc])*
        #[map]
        static $name: $ty = $init;
    };
}

oak_map!(SERVICES: HashMap<u32, Service> = HashMap::with_max_entries(4096, 0));
oak_map!(
    /// Round-robin position per service IP.
    RR: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0)
);
oak_map!(CT: LruHashMap<FlowKey, FlowVal> = LruHashMap::with_max_entries(65536, 0));
oak_map!(LOCAL: HashMap<u32, LocalEndpoint> = HashMap::with_max_entries(1024, 0));
oak_map!(ROUTES: HashMap<u32, Route> = HashMap::with_max_entries(4096, 0));
oak_map!(CONFIG: Array<Config> = Array::with_max_entries(1, 0));
oak_map!(COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0));

#[inline(always)]
fn add(c: Counter, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(c.slot()) {
        unsafe { *p += n };
    }
}

#[inline(always)]
fn count(c: Counter) {
    add(c, 1);
}

/// Why a program stops before the end of its path.
#[derive(Clone, Copy)]
enum Exit {
    /// Not the fast path's business (no config yet, not IPv4, not tunnel traffic, probes): passed on,
    /// uncounted.
    Ignore,
    /// Passed on unchanged to the kernel and so to the tun path, counted under a reason.
    Pass(Counter),
    /// Dropped, counted under a reason.
    Drop(Counter),
}

/// What a program's `try_` function ends in: the TC action, or the early exit.
type Verdict = Result<i32, Exit>;

/// The TC action of a verdict, counting an early exit under its reason.
#[inline(always)]
fn finish(v: Verdict) -> i32 {
    match v {
        Ok(action) => action,
        Err(Exit::Ignore) => TC_ACT_OK as i32,
        Err(Exit::Pass(c)) => {
            count(c);
            TC_ACT_OK as i32
        }
        Err(Exit::Drop(c)) => {
            count(c);
            TC_ACT_SHOT as i32
        }
    }
}

/// This worker's configuration, once userspace has filled the maps and turned the fast path on.
#[inline(always)]
fn config() -> Result<&'static Config, Exit> {
    match CONFIG.get(0) {
        Some(c) if c.enabled == 1 => Ok(c),
        _ => Err(Exit::Ignore),
    }
}

#[classifier]
pub fn oak_inst_ingress(mut ctx: TcContext) -> i32 {
    finish(inst::try_inst_ingress(&mut ctx))
}

#[classifier]
pub fn oak_uplink_ingress(mut ctx: TcContext) -> i32 {
    finish(uplink::try_uplink_ingress(&mut ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible (the programs call GPL-only helpers: bpf_redirect_peer, bpf_fib_lookup); the crate's
/// Cargo.toml license says the same.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
