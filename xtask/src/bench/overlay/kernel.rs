//! The kernel's own datapaths measured beside the NetManager's: routed instances without an overlay, and
//! kernel VXLAN. Each puts an instance namespace on both workers, is measured, and is taken away again.

use std::net::Ipv4Addr;

use testbed::ip;

use super::cpus::Placement;
use super::measure::{measure, Plain, Row};
use super::world::{Ns, World};
use super::{Args, IP_A, IP_B, ROUTED, VXLAN};

/// A datapath of the kernel's own.
#[derive(Clone, Copy)]
pub(super) enum Kernel {
    /// An instance namespace behind a veth on each worker, the kernel forwarding between them over the
    /// underlay (what the same topology costs without any overlay).
    Routed,
    /// Kernel VXLAN (what Flannel does): an instance namespace behind a bridge on each worker (as Flannel's
    /// cni0 + flannel.1), the other worker's instance subnet routed over `vx0`.
    Vxlan,
}

impl Kernel {
    fn label(self) -> &'static str {
        match self {
            Kernel::Routed => ROUTED,
            Kernel::Vxlan => VXLAN,
        }
    }

    /// The instance namespaces' prefix (`obr`, `obv`) and the subnet of worker N's instance (`10.250.N.0/24`).
    fn names(self) -> (&'static str, u8) {
        match self {
            Kernel::Routed => ("obr", 250),
            Kernel::Vxlan => ("obv", 244),
        }
    }

    /// Wires instance namespace `inst` into worker `wn` (worker number `mine`, the other one `theirs` at
    /// underlay address `peer`).
    fn wire(self, wn: &str, inst: &str, peer: Ipv4Addr, mine: u8, theirs: u8) -> anyhow::Result<()> {
        let net = self.names().1;
        let host_end = match self {
            Kernel::Routed => {
                ip(&["-n", wn, "link", "add", "rth0", "type", "veth", "peer", "name", "eth0", "netns", inst])?;
                ip(&["-n", wn, "addr", "add", &format!("10.{net}.{mine}.1/24"), "dev", "rth0"])?;
                "rth0"
            }
            Kernel::Vxlan => {
                let peer = peer.to_string();
                let vx = ["link", "add", "vx0", "type", "vxlan", "id", "42", "remote", &peer, "dstport", "4789"];
                ip(&[&["-n", wn][..], &vx, &["dev", "up0"]].concat())?;
                ip(&["-n", wn, "addr", "add", &format!("10.99.0.{mine}/24"), "dev", "vx0"])?;
                ip(&["-n", wn, "link", "set", "vx0", "up"])?;
                ip(&["-n", wn, "link", "add", "vxbr0", "type", "bridge"])?;
                ip(&["-n", wn, "addr", "add", &format!("10.{net}.{mine}.1/24"), "dev", "vxbr0"])?;
                ip(&["-n", wn, "link", "set", "vxbr0", "up"])?;
                ip(&["-n", wn, "link", "add", "vxh0", "type", "veth", "peer", "name", "eth0", "netns", inst])?;
                ip(&["-n", wn, "link", "set", "vxh0", "master", "vxbr0"])?;
                "vxh0"
            }
        };
        ip(&["-n", wn, "link", "set", host_end, "up"])?;
        ip(&["-n", inst, "addr", "add", &format!("10.{net}.{mine}.2/24"), "dev", "eth0"])?;
        // the overlays' instance MTU, so every datapath's TCP uses the same segment size
        ip(&["-n", inst, "link", "set", "eth0", "mtu", "1450", "up"])?;
        ip(&["-n", inst, "route", "add", "default", "via", &format!("10.{net}.{mine}.1")])?;
        let (via, dev) = match self {
            Kernel::Routed => (peer.to_string(), "up0"),
            Kernel::Vxlan => (format!("10.99.0.{theirs}"), "vx0"),
        };
        ip(&["-n", wn, "route", "add", &format!("10.{net}.{theirs}.0/24"), "via", &via, "dev", dev])
    }

    /// Takes the datapath away from worker `wn` again (the other worker is `theirs`), so it cannot interfere
    /// with the overlays.
    fn unwire(self, wn: &str, theirs: u8) {
        match self {
            Kernel::Routed => {
                let _ = ip(&["-n", wn, "route", "del", &format!("10.250.{theirs}.0/24")]);
                let _ = ip(&["-n", wn, "link", "del", "rth0"]);
            }
            Kernel::Vxlan => {
                let _ = ip(&["-n", wn, "link", "del", "vx0"]);
                let _ = ip(&["-n", wn, "link", "del", "vxbr0"]);
            }
        }
    }
}

/// Sets `k` up on workers `na` and `nb` (run `id`), measures it from A's instance to B's beside plain veth,
/// and takes it away again; its rows.
pub(super) fn measure_kernel(
    w: &mut World,
    a: &Args,
    places: &[Placement],
    plain: &mut Plain,
    k: Kernel,
    workers: (&str, &str),
    id: u32,
) -> anyhow::Result<Vec<Row>> {
    let (na, nb) = workers;
    let (prefix, net) = k.names();
    let (ia, ib) = (format!("{prefix}a{id}"), format!("{prefix}b{id}"));
    for (wn, inst, peer, mine, theirs) in [(na, &ia, IP_B, 1u8, 2u8), (nb, &ib, IP_A, 2, 1)] {
        w.add_netns(inst)?;
        k.wire(wn, inst, peer, mine, theirs)?;
    }
    let (client, server) = (Ns::Named(ia), Ns::Named(ib));
    let rows = measure(w, a, places, k.label(), &client, &server, Ipv4Addr::new(10, net, 2, 2), Some(plain))?;
    for (wn, theirs) in [(na, 2), (nb, 1)] {
        k.unwire(wn, theirs);
    }
    Ok(rows)
}
