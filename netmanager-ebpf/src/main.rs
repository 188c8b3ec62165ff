//! NetManager eBPF programs. For now one TC classifier that counts what crosses the host side of an
//! instance's veth and lets everything pass; the translation/encapsulation fast path grows here.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};

/// Index 0: packets, index 1: bytes.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[classifier]
pub fn oak_tc_count(ctx: TcContext) -> i32 {
    if let Some(p) = COUNTERS.get_ptr_mut(0) {
        unsafe { *p += 1 };
    }
    if let Some(b) = COUNTERS.get_ptr_mut(1) {
        unsafe { *b += ctx.len() as u64 };
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
