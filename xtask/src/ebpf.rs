//! `cargo xtask build-ebpf`: builds netmanager-ebpf with nightly and copies the object to
//! `target/bpf/netmanager-ebpf.o`, where the NetManager looks for it.
use std::process::Command;

use anyhow::Context;

use crate::util::{sh, step, workspace_root};

/// The nightly that builds the eBPF crate. Pinned because bpf-linker links with the system LLVM (22):
/// a nightly on a newer LLVM writes bitcode it cannot read. Same as netmanager-ebpf/rust-toolchain.toml.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-01";

pub fn build() -> anyhow::Result<()> {
    let root = workspace_root();
    let crate_dir = root.join("netmanager-ebpf");
    let ebpf_target = crate::util::target_dir().join("ebpf");
    step(&format!("building eBPF programs ({EBPF_TOOLCHAIN}, bpfel-unknown-none)"));
    sh(Command::new("cargo")
        .current_dir(&crate_dir)
        // Do not inherit the host build's toolchain choice; rust-toolchain.toml selects nightly.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        // Its own target dir under the workspace's (which CI keeps as a cache).
        .env("CARGO_TARGET_DIR", &ebpf_target)
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["build", "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"]))?;
    let built = ebpf_target.join("bpfel-unknown-none/release/netmanager-ebpf");
    let out_dir = crate::util::target_dir().join("bpf");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("netmanager-ebpf.o");
    std::fs::copy(&built, &out).with_context(|| format!("copy {} -> {}", built.display(), out.display()))?;
    step(&format!("eBPF object: {}", out.display()));
    Ok(())
}
