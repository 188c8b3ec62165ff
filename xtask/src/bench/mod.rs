//! `cargo xtask bench <name>`: benchmarks that print ratios against a baseline measured in the same run.

pub mod control_plane;
pub mod deploy;
pub mod overlay;
mod stats;
mod vms;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Register simulated workers in several clusters, deploy services, report placement latency and RSS.
    ControlPlane(control_plane::Args),
    /// Data plane on two worker namespaces: plain veth, routed instances without overlay, kernel VXLAN,
    /// NetManager tun overlay and eBPF fast path; TCP throughput (1 and 8 streams) and request-response
    /// latency, as ratios of plain veth measured beside each in the same round.
    Overlay(overlay::Args),
    /// 1-DOC stack with real containerd: deploy request -> RUNNING vs containerd alone; unikernels and
    /// microVMs (TCG, and KVM where it works) vs qemu booting the same guest alone, RSS per instance;
    /// NodeEngine idle RSS/CPU.
    Deploy(deploy::Args),
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::ControlPlane(args) => control_plane::run(args),
        Bench::Overlay(args) => overlay::run(args),
        Bench::Deploy(args) => deploy::run(args),
    }
}
