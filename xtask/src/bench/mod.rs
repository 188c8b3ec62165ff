//! `cargo xtask bench <name>`: benchmarks that print ratios against a baseline measured in the same run.

pub mod control_plane;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Register simulated workers in several clusters, deploy services, report placement latency and RSS.
    ControlPlane(control_plane::Args),
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::ControlPlane(args) => control_plane::run(args),
    }
}
