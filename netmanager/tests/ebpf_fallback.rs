//! A kernel that refuses the fast path's programs: the NetManager says why, once, and serves the service
//! IPs on the tun path.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The fast path's object with the first instruction of its TC programs' section made invalid: the ELF
/// and its relocations stay sound, so the object loads and the kernel's verifier is what refuses it. None:
/// no object has been built.
fn refused_object(dir: &Path) -> Option<PathBuf> {
    let mut b = std::fs::read(oak_netmanager::ebpf::default_object()?).ok()?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    // ELF64 little endian: section headers at e_shoff, e_shnum of them, names in section e_shstrndx
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(&b, 0x28), u16_at(&b, 0x3a), u16_at(&b, 0x3c), u16_at(&b, 0x3e));
    let sh = |i: usize| shoff + i * shentsize;
    let names = u64_at(&b, sh(shstrndx) + 0x18);
    let text = (0..shnum)
        .find(|&i| {
            let n = names + u32_at(&b, sh(i));
            b[n..].starts_with(b"classifier\0")
        })
        .expect("the eBPF object has a `classifier` section (its TC programs)");
    let off = u64_at(&b, sh(text) + 0x18);
    b[off] = 0xff; // no such opcode
    let out = dir.join("refused.o");
    std::fs::write(&out, b).ok()?;
    Some(out)
}

/// A kernel that refuses the fast path's programs: the NetManager says why, once, and serves the service
/// IPs on the tun path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_programs_fall_back_to_the_tun_path() {
    if !is_root() {
        eprintln!("skipping refused_programs_fall_back_to_the_tun_path: needs root (network namespaces, eBPF)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(obj) = refused_object(dir.path()) else {
        assert!(std::env::var_os("CI").is_none(), "eBPF object missing: `cargo xtask build-ebpf` builds it");
        eprintln!("skipping refused_programs_fall_back_to_the_tun_path: no eBPF object");
        return;
    };
    let obj = obj.to_string_lossy().to_string();
    let (mut wa, mut wb, rr, _closest, _rootsvc, _cluster) =
        world(dir.path(), &["--ebpf-object", &obj], &["--no-ebpf"]).await;
    tokio::task::block_in_place(|| {
        wa.start_nm();
        wb.start_nm();
        let log = wa.log_text();
        let said = log
            .lines()
            .filter(|l| l.contains("eBPF fast path unavailable, running on the tun path only"))
            .collect::<Vec<_>>();
        assert_eq!(said.len(), 1, "the reason, once:\n{log}");
        eprintln!("A's NetManager: {}", said[0]);
        assert!(said[0].contains("refused"), "it names the kernel's refusal: {}", said[0]);
        let (_, st) = http(&wa.ns.path(), API, "GET", "/status", None).unwrap();
        assert_eq!(st["ebpf"], false, "{st}");
        // the tun path serves the service IP across the two workers
        let (_i1, ns_i1) = instance();
        let (_ca, ns_ca) = instance();
        wb.deploy(&ns_i1, "svcE", "app.ns.echo.ns", 0);
        wa.deploy(&ns_ca, "svcC", "app.ns.client.ns", 0);
        serve(&ns_i1, "inst0");
        eventually(20, "an answer through the round-robin IP", || {
            tcp_ask(&ns_ca, rr, 8080).and_then(|a| if a.starts_with("inst0") { Ok(()) } else { Err(a) })
        });
        let c = wa.counters();
        assert_eq!(c["ebpf"], false, "{c}");
        assert!(c["events"]["forward_translated"].as_u64().unwrap() > 0, "the tun proxy translated it: {c}");
    });
}
