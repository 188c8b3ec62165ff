//! What the wiring does inside an instance's network namespace, on a thread that joined it (through
//! [`oak_netns::in_netns`]) with a netlink connection of its own: eth0 configured at wiring time, its GSO segment
//! limit changed later.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use super::{instance_mac, link_by_name, link_index, set_gso_max_segs, GSO_MAX_SEGS_DEFAULT, INSTANCE_MTU};
use oak_netns as netns;

/// Runs `f` with a netlink handle on a throw-away thread that joins the network namespace `ns`.
fn in_netns<F, Fut>(ns: &File, f: F) -> Result<()>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    // the namespace the caller holds open, by its descriptor: the pid's may name another process by now
    let path = format!("/proc/self/fd/{}", ns.as_raw_fd());
    netns::in_netns(&path, move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let (conn, h, _) = rtnetlink::new_connection().context("netlink socket inside the netns")?;
            tokio::spawn(conn);
            f(h).await
        })
    })
    .context("entering the instance netns")?
}

/// Sets `gso_max_segs` of eth0 in the instance netns `ns`, if that eth0 is the instance's (its MAC is
/// derived from `ip`): a pid recorded for an instance that is gone may name another process by now.
pub fn set_gso_inside(ns: File, ip: Ipv4Addr, segs: u32) -> Result<()> {
    in_netns(&ns, move |h| async move {
        let link = link_by_name(&h, "eth0").await?.context("no eth0 in the instance netns")?;
        let mac = link.attributes.iter().find_map(|a| match a {
            netlink_packet_route::link::LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        });
        if mac.as_deref() != Some(&instance_mac(ip)[..]) {
            bail!("eth0 there is not this instance's (MAC {mac:02x?})");
        }
        set_gso_max_segs(&h, link.header.index, segs).await.context("setting gso_max_segs on eth0")
    })
}

/// Runs on a throw-away thread that joins the instance's netns: rename to eth0 (MTU, MAC), its GSO segment
/// limit, address, up, lo up, default route via the gateway.
pub fn configure_inside(ns: File, peer_tmp: &str, ip: Ipv4Addr, prefix: u8, gw: Ipv4Addr, segs: u32) -> Result<()> {
    let peer_tmp = peer_tmp.to_string();
    in_netns(&ns, move |h| async move {
        let idx = link_index(&h, &peer_tmp).await?.with_context(|| format!("{peer_tmp} not in the netns"))?;
        if let Some(old) = link_index(&h, "eth0").await? {
            if old != idx {
                bail!("the instance netns already has an eth0");
            }
        }
        h.link()
            .set(idx)
            .name("eth0".into())
            .mtu(INSTANCE_MTU)
            .address(instance_mac(ip).to_vec())
            .execute()
            .await
            .context("renaming to eth0 (MTU, MAC)")?;
        // a speed setting: an instance is wired without it if the kernel refuses it
        if segs != GSO_MAX_SEGS_DEFAULT {
            if let Err(e) = set_gso_max_segs(&h, idx, segs).await {
                tracing::warn!(%ip, segs, "eth0's GSO segment limit not set (the tun path runs slower): {e}");
            }
        }
        h.address().add(idx, ip.into(), prefix).execute().await.with_context(|| format!("adding {ip}/{prefix}"))?;
        h.link().set(idx).up().execute().await.context("setting eth0 up")?;
        if let Some(lo) = link_index(&h, "lo").await? {
            h.link().set(lo).up().execute().await.context("setting lo up")?;
        }
        h.route()
            .add()
            .v4()
            .gateway(gw)
            .output_interface(idx)
            .execute()
            .await
            .with_context(|| format!("adding default route via {gw}"))?;
        Ok(())
    })
}
