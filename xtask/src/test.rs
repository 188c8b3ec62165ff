//! `cargo xtask test`: the README's test command. Sets the machine up, checks formatting and clippy (the lint
//! gate, before anything is built for the tests), builds every binary once, builds the eBPF object, then
//! runs the whole workspace test suite (nextest when present, else cargo test).
use clap::Args;

use crate::util::{cargo, have, sh, step};

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Skip `setup` (when you know the machine is ready).
    #[arg(long)]
    pub no_setup: bool,
    /// Skip the lint gate (formatting, clippy) while iterating locally; CI always lints.
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments passed to the test runner (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    if !args.no_setup {
        crate::setup::run()?;
    }
    if !args.no_lint {
        crate::lint::run()?;
    } else if std::env::var_os("CI").is_some() {
        anyhow::bail!("--no-lint is for local runs: CI must lint");
    }
    crate::ebpf::build()?;
    step("building all binaries (the end-to-end tests start them as processes)");
    sh(cargo().args(["build", "--workspace", "--bins", "--tests"]))?;
    step("cross-building the worker binaries for aarch64 (the bundle test checks them under qemu-user)");
    crate::dist::build_for(crate::dist::ARM, false, &["NodeEngine", "NetManager", "oak-image"])?;
    step("bundling the debug build (the field tests install these bundles on simulated devices)");
    crate::dist::run(crate::dist::Args {
        role: vec!["root".into(), "cluster".into(), "worker".into()],
        out_dir: Some(crate::util::target_dir().join("dist-test")),
        skip_build: true,
        profile: "debug".into(),
        target: vec![crate::dist::HOST.into()],
    })?;
    if nix::unistd::geteuid().is_root() {
        // the NodeEngine's tests talk to a real containerd
        crate::up::ensure_containerd()?;
    } else {
        eprintln!("WARNING: not root: tests that need network namespaces, containerd or eBPF will be skipped");
    }
    let nextest = have("cargo-nextest");
    step(&format!("running the test suite ({})", if nextest { "cargo nextest" } else { "cargo test" }));
    let mut cmd = cargo();
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast", "--test-threads", "4"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    if !args.rest.is_empty() {
        cmd.arg("--").args(&args.rest);
    }
    sh(&mut cmd)
}
