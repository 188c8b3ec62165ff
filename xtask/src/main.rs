//! Project tasks. `cargo xtask --help` lists them.

mod bench;
mod dist;
mod ebpf;
mod lint;
mod setup;
mod test;
mod up;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Project tasks: setup, build-ebpf, up/down (1-DOC), lint, test, bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install, idempotently, everything a fresh machine needs (Debian packages, nightly rust-src,
    /// bpf-linker); skips what is present.
    Setup,
    /// Build the eBPF programs (netmanager-ebpf) with nightly for bpfel-unknown-none.
    BuildEbpf,
    /// Start a 1-DOC cluster on this machine: containerd, root, cluster, NetManager, NodeEngine.
    Up(up::UpArgs),
    /// Stop everything `up` started and clean up.
    Down(up::DownArgs),
    /// Check formatting (workspace and netmanager-ebpf) and clippy with warnings as errors.
    Lint,
    /// Set up the machine, lint, build everything and run the whole test suite.
    Test(test::TestArgs),
    /// Release bundles per role (root, cluster, worker): binaries, systemd units, sample configuration,
    /// install.sh and SHA256SUMS in a .tar.gz each.
    Dist(dist::Args),
    /// Benchmarks: print results and ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => ebpf::build(),
        Cmd::Up(a) => up::up(a),
        Cmd::Down(a) => up::down(a),
        Cmd::Lint => lint::run(),
        Cmd::Test(a) => test::run(a),
        Cmd::Dist(a) => dist::run(a),
        Cmd::Bench(b) => bench::run(b),
    }
}
