//! An instance's way through the root: placed on a cluster (the root scheduler), deployed, undeployed, its
//! status reports applied, and unplaced instances retried.

use std::collections::HashSet;

use anyhow::Result;
use oak_proto::v1 as pb;
use oak_proto::InstanceState;

use super::records::{ClusterRecord, InstanceRecord, ServiceRecord};
use super::scheduler::{self, ClusterView, Unplaced};
use super::store::{Tx, CLUSTERS, SERVICES};
use super::{Outgoing, Root};
use crate::latency;

/// The part of a detail that records what clusters reported ("cluster 'x' reported ..."), kept across
/// capacity-change retries so the user still sees why earlier clusters refused.
fn previous_refusals(detail: &str) -> String {
    let Some(r) = detail.find(" reported ") else { return String::new() };
    detail[..r].rfind("cluster '").map(|p| detail[p..].to_string()).unwrap_or_default()
}

pub(super) fn deploy_msg(spec: pb::ServiceSpec, n: u32) -> pb::RootMessage {
    pb::RootMessage {
        msg: Some(pb::root_message::Msg::Deploy(pb::DeployInstance { service: Some(spec), instance_number: n })),
    }
}

fn undeploy_msg(service_id: &str, n: u32) -> pb::RootMessage {
    pb::RootMessage {
        msg: Some(pb::root_message::Msg::Undeploy(pb::UndeployInstance {
            service_id: service_id.to_string(),
            instance_number: n,
        })),
    }
}

impl Root {
    /// `svc`'s spec as the schedulers take it: with its latency constraints resolved to the workers they
    /// measure to, each with the network coordinate its cluster last reported
    /// ([`crate::latency`]). An area is a worker's name, else a cluster's (its live workers); a
    /// connectivity target is a microservice id, else a `microservice_name` of the same application, else
    /// a job name (the workers its running instances are on). A name that resolves to nothing gives a
    /// target without workers, which no placement meets (and the reason says so).
    pub(super) fn placement_spec(&self, tx: &Tx, svc: &ServiceRecord) -> Result<pb::ServiceSpec> {
        let mut spec = svc.spec();
        let ms = &svc.sla;
        let areas: Vec<_> = ms.constraints.iter().filter(|c| c.kind == "latency").collect();
        if areas.is_empty() && ms.connectivity.is_empty() {
            return Ok(spec);
        }
        let workers = self.workers.lock().clone();
        let point = |w: &pb::WorkerSummary| pb::LatencyPoint {
            node_name: w.node_name.clone(),
            coordinate: w.resources.as_ref().and_then(|r| r.network.as_ref()?.coordinate.clone()),
        };
        let live = |w: &&pb::WorkerSummary| w.state == "live";
        if !areas.is_empty() {
            let clusters: Vec<ClusterRecord> = tx.list(CLUSTERS)?;
            for c in areas {
                let mut points: Vec<_> =
                    workers.values().flatten().filter(live).filter(|w| w.node_name == c.area).map(point).collect();
                if points.is_empty() {
                    if let Some(cl) = clusters.iter().find(|x| x.cluster_name == c.area) {
                        points = workers.get(&cl.cluster_id).into_iter().flatten().filter(live).map(point).collect();
                    }
                }
                spec.latency.push(pb::LatencyTarget {
                    kind: latency::AREA.into(),
                    name: c.area.clone(),
                    threshold_ms: c.threshold,
                    points,
                    convergence_time_s: c.convergence_time,
                });
            }
        }
        if !ms.connectivity.is_empty() {
            let services: Vec<ServiceRecord> = tx.list(SERVICES)?;
            for t in &ms.connectivity {
                let id = t.target_microservice_id.as_str();
                let target = services
                    .iter()
                    .find(|s| s.microservice_id == id)
                    .or_else(|| {
                        services
                            .iter()
                            .find(|s| s.application_id == svc.application_id && s.sla.microservice_name == id)
                    })
                    .or_else(|| services.iter().find(|s| s.job_name == id));
                let (name, points) = match target {
                    None => (id.to_string(), Vec::new()),
                    Some(ts) => {
                        let on = |i: &InstanceRecord| {
                            workers.get(&i.cluster_id)?.iter().find(|w| w.node_id == i.worker_id).map(point)
                        };
                        let running = ts
                            .instance_list
                            .iter()
                            .filter(|i| i.status == InstanceState::Running && !i.undeploying)
                            .filter_map(on);
                        (ts.job_name.clone(), running.collect())
                    }
                };
                for c in t.con_constraints.iter().filter(|c| c.kind == "latency") {
                    spec.latency.push(pb::LatencyTarget {
                        kind: latency::SERVICE.into(),
                        name: name.clone(),
                        threshold_ms: c.threshold,
                        points: points.clone(),
                        convergence_time_s: c.convergence_time,
                    });
                }
            }
        }
        Ok(spec)
    }

    fn views(&self, tx: &Tx) -> Result<Vec<ClusterView>> {
        let cls: Vec<ClusterRecord> = tx.list(CLUSTERS)?;
        Ok(cls
            .into_iter()
            .map(|c| ClusterView {
                active: self.is_active(&c.cluster_id),
                id: c.cluster_id,
                name: c.cluster_name,
                aggregate: c.aggregate.to_pb(),
                location: c.cluster_location,
            })
            .collect())
    }

    /// Places instance `idx` of `svc`; on success queues the Deploy in `out`.
    fn place_instance(
        &self,
        tx: &Tx,
        svc: &mut ServiceRecord,
        idx: usize,
        out: &mut Outgoing,
        prior: &str,
    ) -> Result<bool> {
        let views = self.views(tx)?;
        let spec = self.placement_spec(tx, svc)?;
        let inst = &mut svc.instance_list[idx];
        inst.last_modified_ms = oak_proto::now_ms();
        match scheduler::place(&spec, &views, &inst.tried_clusters) {
            Ok(cid) => {
                let name = views.iter().find(|v| v.id == cid).map(|v| v.name.clone()).unwrap_or_default();
                inst.status = InstanceState::ClusterScheduled;
                inst.status_detail = format!("scheduled on cluster '{name}'");
                inst.cluster_id = cid.clone();
                inst.cluster_name = name;
                inst.worker_id.clear();
                inst.node_name.clear();
                inst.publicip.clear();
                let n = inst.instance_number;
                out.push((cid, deploy_msg(spec, n)));
                Ok(true)
            }
            Err(Unplaced { status, detail }) => {
                inst.status = status;
                inst.status_detail = if prior.is_empty() { detail } else { format!("{detail}; {prior}") };
                inst.cluster_id.clear();
                inst.cluster_name.clear();
                Ok(false)
            }
        }
    }

    /// Adds one instance to a service and tries to place it. Returns the new instance.
    pub fn deploy_instance(&self, service_id: &str) -> Result<Option<InstanceRecord>> {
        let mut out = Outgoing::new();
        let r = self.store.update(|tx| {
            let Some(mut svc) = tx.get::<ServiceRecord>(SERVICES, service_id)? else { return Ok(None) };
            if svc.sla.addresses.rr_ip.is_empty() {
                // a service stored before service IPs were allocated at creation
                let (rr, cl) = self.net.allocate_service_ips(&svc.microservice_id, &svc.job_name)?;
                svc.sla.addresses.rr_ip = rr.to_string();
                svc.sla.addresses.closest_ip = cl.to_string();
            }
            let n = svc.next_instance;
            svc.next_instance += 1;
            svc.instance_list.push(InstanceRecord::new(n, InstanceState::Requested));
            let idx = svc.instance_list.len() - 1;
            self.place_instance(tx, &mut svc, idx, &mut out, "")?;
            let inst = svc.instance_list[idx].clone();
            tx.put(SERVICES, service_id, &svc)?;
            Ok(Some(inst))
        })?;
        self.send(out);
        if let Some(i) = &r {
            tracing::info!(service_id, instance = i.instance_number, status = %i.status, detail = %i.status_detail, "deploy requested");
        }
        Ok(r)
    }

    /// Undeploys instance `n`. Returns false if unknown.
    pub fn undeploy_instance(&self, service_id: &str, n: u32) -> Result<bool> {
        let mut out = Outgoing::new();
        let found = self.store.update(|tx| {
            let Some(mut svc) = tx.get::<ServiceRecord>(SERVICES, service_id)? else { return Ok(false) };
            let Some(pos) = svc.instance_list.iter().position(|i| i.instance_number == n) else { return Ok(false) };
            let inst = &mut svc.instance_list[pos];
            if !inst.cluster_id.is_empty() && self.has_session(&inst.cluster_id) {
                inst.undeploying = true;
                inst.status_detail = "undeploy requested".into();
                out.push((inst.cluster_id.clone(), undeploy_msg(service_id, n)));
            } else {
                svc.instance_list.remove(pos);
            }
            tx.put(SERVICES, service_id, &svc)?;
            Ok(true)
        })?;
        self.send(out);
        Ok(found)
    }

    /// Queues undeploys for every instance of a deleted service (the caller deletes the record).
    pub fn undeploy_all(&self, svc: &ServiceRecord, out: &mut Outgoing) {
        for i in &svc.instance_list {
            if !i.cluster_id.is_empty() {
                out.push((i.cluster_id.clone(), undeploy_msg(&svc.microservice_id, i.instance_number)));
            }
        }
    }

    /// Applies one InstanceStatus reported by cluster `cluster_id`.
    pub fn on_instance_status(&self, cluster_id: &str, st: &pb::InstanceStatus) -> Result<()> {
        let mut out = Outgoing::new();
        self.store.update(|tx| self.apply_status(tx, cluster_id, st, &mut out))?;
        self.send(out);
        Ok(())
    }

    pub(super) fn apply_status(
        &self,
        tx: &Tx,
        cluster_id: &str,
        st: &pb::InstanceStatus,
        out: &mut Outgoing,
    ) -> Result<()> {
        let n = st.instance_number;
        let svc = tx.get::<ServiceRecord>(SERVICES, &st.service_id)?;
        let pos = svc.as_ref().and_then(|s| s.instance_list.iter().position(|i| i.instance_number == n));
        let (Some(mut svc), Some(pos)) = (svc, pos) else {
            if st.status != InstanceState::Undeployed.as_str() {
                tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, status = %st.status, "status for an instance the root does not have; telling the cluster to undeploy it");
                out.push((cluster_id.to_string(), undeploy_msg(&st.service_id, n)));
            }
            return Ok(());
        };
        if svc.instance_list[pos].cluster_id != cluster_id {
            if st.status != InstanceState::Undeployed.as_str() {
                tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, "instance is assigned to another cluster; telling this one to undeploy it");
                out.push((cluster_id.to_string(), undeploy_msg(&st.service_id, n)));
            }
            return Ok(());
        }
        let Some(state) = InstanceState::parse(&st.status) else {
            tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, status = %st.status, "status outside Oakestra's vocabulary ignored");
            return Ok(());
        };
        let inst = &mut svc.instance_list[pos];
        inst.last_modified_ms = oak_proto::now_ms();
        match state {
            InstanceState::Undeployed if inst.undeploying => {
                svc.instance_list.remove(pos);
            }
            InstanceState::NoWorkerCapacity | InstanceState::NoQualifiedWorkerFound if !inst.undeploying => {
                let cname = inst.cluster_name.clone();
                if !inst.tried_clusters.iter().any(|c| c == cluster_id) {
                    inst.tried_clusters.push(cluster_id.to_string());
                }
                let prior = format!("cluster '{cname}' reported {}: {}", st.status, st.detail);
                tracing::info!(service_id = %st.service_id, instance = n, %prior, "trying another cluster");
                self.place_instance(tx, &mut svc, pos, out, &prior)?;
            }
            _ => {
                inst.status = state;
                inst.status_detail = st.detail.clone();
                if !st.node_id.is_empty() {
                    inst.worker_id = st.node_id.clone();
                }
                if !st.node_name.is_empty() {
                    inst.node_name = st.node_name.clone();
                }
                if !st.public_ip.is_empty() {
                    inst.publicip = st.public_ip.clone();
                }
                if st.exit_code.is_some() {
                    inst.exit_code = st.exit_code;
                }
                if !st.ns_address.is_empty() {
                    inst.ns_address = st.ns_address.clone();
                }
                if !st.ns_address_v6.is_empty() {
                    inst.ns_address_v6 = st.ns_address_v6.clone();
                }
                if !st.logs.is_empty() {
                    inst.logs = st.logs.clone();
                }
                if state == InstanceState::Running {
                    inst.tried_clusters.clear();
                }
            }
        }
        tx.put(SERVICES, &svc.microservice_id, &svc)?;
        Ok(())
    }

    /// Retries every unplaced instance once. With `full`, clusters an instance already tried are
    /// eligible again (the periodic retry); otherwise only clusters that registered or grew since the last
    /// retry are (the capacity-change retry), so a cluster that keeps refusing is not hammered.
    /// Returns how many got placed.
    pub fn retry_unplaced(&self, full: bool) -> Result<usize> {
        let grown: HashSet<String> = std::mem::take(&mut *self.grown.lock());
        let mut out = Outgoing::new();
        let placed = self.store.update(|tx| {
            let mut placed = 0;
            let services: Vec<ServiceRecord> = tx.list(SERVICES)?;
            for mut svc in services {
                let mut changed = false;
                for idx in 0..svc.instance_list.len() {
                    let i = &mut svc.instance_list[idx];
                    if i.undeploying || !i.status.is_unplaced() {
                        continue;
                    }
                    if full {
                        i.tried_clusters.clear();
                    } else {
                        i.tried_clusters.retain(|c| !grown.contains(c));
                    }
                    let before = (i.status, i.status_detail.clone());
                    let prior = if full { String::new() } else { previous_refusals(&i.status_detail) };
                    if self.place_instance(tx, &mut svc, idx, &mut out, &prior)? {
                        placed += 1;
                        changed = true;
                    } else {
                        let i = &svc.instance_list[idx];
                        changed |= (i.status, i.status_detail.clone()) != before;
                    }
                }
                if changed {
                    tx.put(SERVICES, &svc.microservice_id, &svc)?;
                }
            }
            Ok(placed)
        })?;
        self.send(out);
        if placed > 0 {
            tracing::info!(placed, full, "retry placed instances");
        }
        Ok(placed)
    }
}
