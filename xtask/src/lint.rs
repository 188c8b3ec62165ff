//! `cargo xtask lint`, and the gate `cargo xtask test` runs before any test: formatting (the workspace and
//! the eBPF crate, which is outside it) and clippy with every warning an error. Fails on the first check
//! that does not pass, saying which and how to fix it.
use std::process::Command;

use anyhow::Context;

use crate::util::{cargo, sh, step, workspace_root};

/// Runs every check in order; the first failure ends it.
pub fn run() -> anyhow::Result<()> {
    step("lint: cargo fmt --all -- --check");
    check(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "formatting differs from rustfmt.toml: run `cargo fmt --all`",
    )?;

    step("lint: cargo +stable fmt --check in netmanager-ebpf/ (outside the workspace)");
    check(
        Command::new("cargo")
            .current_dir(workspace_root().join("netmanager-ebpf"))
            // its rust-toolchain.toml pins a nightly for the build; formatting uses stable's rustfmt
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .args(["+stable", "fmt", "--check"]),
        "netmanager-ebpf's formatting differs: run `cargo +stable fmt` in netmanager-ebpf/",
    )?;

    step("lint: cargo clippy --workspace --all-targets -- -D warnings");
    check(
        cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
        "clippy found warnings (above): fix them, or allow one lint where it is wrong with a comment saying why",
    )?;
    step("lint: clean");
    Ok(())
}

/// Runs `cmd` with its output shown; a failure names the check and the fix.
fn check(cmd: &mut Command, fix: &str) -> anyhow::Result<()> {
    sh(cmd).with_context(|| format!("lint failed: {fix}"))
}
