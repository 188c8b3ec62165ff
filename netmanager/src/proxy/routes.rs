//! The kernel routes into the tun: the service IP space and every remote worker subnet, kept equal to the
//! tables.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use tokio::task::JoinHandle;

use super::engine::SERVICE_SPACE;
use crate::tables::{Snapshot, Tables};

/// Routes what the tables ask for into the tun (ifindex `idx`) and keeps following them; returns the
/// tasks doing it (the netlink connection and the follower). Fails when the service space could not be
/// routed.
pub async fn follow(tables: &Tables, idx: u32, tun_name: &str) -> Result<[JoinHandle<()>; 2]> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let conn_task = tokio::spawn(conn);
    let mut installed = BTreeSet::new();
    let mut rx = tables.subscribe();
    sync_routes(&handle, idx, &desired_routes(&tables.snapshot()), &mut installed).await;
    anyhow::ensure!(installed.contains(&SERVICE_SPACE), "could not route {SERVICE_SPACE} into {tun_name}");
    let t2 = tables.clone();
    let route_task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let d = desired_routes(&t2.snapshot());
            sync_routes(&handle, idx, &d, &mut installed).await;
        }
    });
    Ok([conn_task, route_task])
}

fn route_msg(handle: &rtnetlink::Handle, net: Ipv4Net, idx: u32) -> rtnetlink::RouteAddRequest<Ipv4Addr> {
    handle
        .route()
        .add()
        .v4()
        .destination_prefix(net.network(), net.prefix_len())
        .output_interface(idx)
        .scope(netlink_packet_route::route::RouteScope::Link)
}

/// Make the kernel routes into the tun match `desired` (adds replace; removals ignore missing routes).
async fn sync_routes(
    handle: &rtnetlink::Handle,
    idx: u32,
    desired: &BTreeSet<Ipv4Net>,
    installed: &mut BTreeSet<Ipv4Net>,
) {
    for net in desired.difference(&installed.clone()) {
        match route_msg(handle, *net, idx).replace().execute().await {
            Ok(()) => {
                installed.insert(*net);
                tracing::debug!(%net, "route into the tun added");
            }
            Err(e) => tracing::warn!(%net, error = %e, "adding route into the tun failed"),
        }
    }
    for net in installed.difference(desired).copied().collect::<Vec<_>>() {
        let mut req = route_msg(handle, net, idx);
        let msg = req.message_mut().clone();
        if let Err(e) = handle.route().del(msg).execute().await {
            tracing::debug!(%net, error = %e, "removing route from the tun");
        }
        installed.remove(&net);
    }
}

/// The routes into the tun a snapshot asks for.
fn desired_routes(s: &Snapshot) -> BTreeSet<Ipv4Net> {
    let mut d: BTreeSet<Ipv4Net> = s.routes.keys().filter(|n| Some(**n) != s.local_subnet).copied().collect();
    d.insert(SERVICE_SPACE);
    d
}
