//! Cluster sessions: registration (ClusterHello, reconciliation of what the cluster holds), liveness,
//! capacity reports, and sending root messages to a cluster.

use std::time::Instant;

use anyhow::{anyhow, Result};
use oak_proto::v1 as pb;
use tokio::sync::mpsc;

use super::instances::deploy_msg;
use super::records::{AggregateRecord, ClusterRecord, ServiceRecord};
use super::store::{CLUSTERS, SERVICES};
use super::{Outgoing, Root};

pub(super) type Outbox = mpsc::UnboundedSender<Result<pb::RootMessage, tonic::Status>>;

/// A connected cluster's session.
pub(super) struct Session {
    conn: u64,
    tx: Outbox,
    last_seen: Instant,
}

impl Root {
    pub fn is_active(&self, cluster_id: &str) -> bool {
        if self.ha.as_ref().is_some_and(|h| !h.is_leader()) {
            // a follower has no sessions: what the leader last stored of the cluster tells
            let seen = self.store.get::<ClusterRecord>(CLUSTERS, cluster_id).ok().flatten().map(|c| c.last_seen_ms);
            let stale = self.cfg.cluster_stale.as_millis() as u64;
            return seen.is_some_and(|t| oak_proto::now_ms().saturating_sub(t) <= stale);
        }
        let s = self.sessions.lock();
        s.get(cluster_id).is_some_and(|s| s.last_seen.elapsed() <= self.cfg.cluster_stale)
    }

    pub(super) fn has_session(&self, cluster_id: &str) -> bool {
        self.sessions.lock().contains_key(cluster_id)
    }

    pub fn send(&self, out: Outgoing) {
        let s = self.sessions.lock();
        for (cid, m) in out {
            match s.get(&cid) {
                Some(sess) => {
                    if sess.tx.send(Ok(m)).is_err() {
                        tracing::warn!(cluster_id = %cid, "cluster session closed; message dropped");
                    }
                }
                None => tracing::warn!(cluster_id = %cid, "no session for cluster; message dropped"),
            }
        }
    }

    /// Registers the session of cluster `cid` (the identity its certificate names); returns (cluster id,
    /// connection number). A second session of a live cluster replaces the first: only the holder of the
    /// cluster's certificate can open one.
    /// `address`: where the cluster's session comes from, as the root sees it (empty when unknown).
    pub fn on_hello(
        &self,
        cid: &str,
        hello: &pb::ClusterHello,
        address: &str,
        tx_out: Outbox,
    ) -> Result<(String, u64)> {
        if hello.cluster_name.is_empty() || hello.cluster_name.len() > 128 {
            return Err(anyhow!("cluster_name must be 1..128 characters"));
        }
        let conn = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Outgoing::new();
        let cid = cid.to_string();
        self.store.update(|tx| {
            let Some(prev) = tx.get::<ClusterRecord>(CLUSTERS, &cid)? else {
                return Ok(Err(anyhow!(
                    "cluster {cid} is not registered at this root (its record was removed): remove the cluster's \
                     <data-dir>/identity and join again with a join token"
                )));
            };
            let rec = ClusterRecord {
                cluster_id: cid.clone(),
                cluster_name: hello.cluster_name.clone(),
                cluster_location: hello.cluster_location.clone(),
                version: hello.version.clone(),
                aggregate: hello.aggregate.as_ref().map(AggregateRecord::from).unwrap_or_default(),
                last_seen_ms: oak_proto::now_ms(),
                ip: address.to_string(),
                ..prev
            };
            tx.put(CLUSTERS, &cid, &rec)?;
            Ok(Ok(()))
        })??;
        let workers = hello.aggregate.as_ref().map(|a| a.workers.clone()).unwrap_or_default();
        self.workers.lock().insert(cid.clone(), workers);
        // Welcome goes first on the new session.
        let _ = tx_out.send(Ok(pb::RootMessage {
            msg: Some(pb::root_message::Msg::Welcome(pb::ClusterWelcome {
                cluster_id: cid.clone(),
                report_interval_ms: self.cfg.report_interval_ms,
            })),
        }));
        self.sessions.lock().insert(cid.clone(), Session { conn, tx: tx_out, last_seen: Instant::now() });
        // Reconcile: apply what the cluster holds, re-send what it lacks.
        self.store.update(|tx| {
            for st in &hello.instances {
                self.apply_status(tx, &cid, st, &mut out)?;
            }
            let services: Vec<ServiceRecord> = tx.list(SERVICES)?;
            for mut svc in services {
                let mut changed = false;
                let mut i = 0;
                while i < svc.instance_list.len() {
                    let inst = &svc.instance_list[i];
                    let reported = hello
                        .instances
                        .iter()
                        .any(|s| s.service_id == svc.microservice_id && s.instance_number == inst.instance_number);
                    if inst.cluster_id == cid && !reported {
                        if inst.undeploying {
                            svc.instance_list.remove(i);
                            changed = true;
                            continue;
                        }
                        out.push((cid.clone(), deploy_msg(self.placement_spec(tx, &svc)?, inst.instance_number)));
                    }
                    i += 1;
                }
                if changed {
                    tx.put(SERVICES, &svc.microservice_id, &svc)?;
                }
            }
            Ok(())
        })?;
        self.send(out);
        tracing::info!(cluster_id = %cid, cluster_name = %hello.cluster_name, %address, location = %hello.cluster_location, instances = hello.instances.len(), "cluster registered");
        self.grown.lock().insert(cid.clone());
        self.capacity_changed.notify_one();
        Ok((cid, conn))
    }

    pub fn touch(&self, cluster_id: &str) {
        if let Some(s) = self.sessions.lock().get_mut(cluster_id) {
            s.last_seen = Instant::now();
        }
    }

    /// The workers (live and lost) cluster `cluster_id` (its id or its name) reported last; none while the
    /// cluster is inactive. Admin only: they show node addresses.
    pub fn cluster_workers(
        &self,
        who: &super::auth::Identity,
        cluster: &str,
    ) -> Result<Vec<pb::WorkerSummary>, super::error::RootError> {
        who.require_admin("listing a cluster's workers")?;
        let id = match self.store.get::<ClusterRecord>(CLUSTERS, cluster)? {
            Some(c) => c.cluster_id,
            None => self
                .store
                .list::<ClusterRecord>(CLUSTERS)?
                .into_iter()
                .find(|c| c.cluster_name == cluster)
                .map(|c| c.cluster_id)
                .ok_or_else(|| super::error::RootError::NotFound(format!("cluster {cluster}")))?,
        };
        if !self.is_active(&id) {
            return Ok(Vec::new());
        }
        Ok(self.workers.lock().get(&id).cloned().unwrap_or_default())
    }

    pub fn on_aggregate(&self, cluster_id: &str, agg: &pb::ClusterAggregate) -> Result<()> {
        self.usage.record(&agg.workers);
        self.workers.lock().insert(cluster_id.to_string(), agg.workers.clone());
        let grew = self.store.update(|tx| {
            let Some(mut c) = tx.get::<ClusterRecord>(CLUSTERS, cluster_id)? else { return Ok(false) };
            let old = &c.aggregate;
            let grew = agg.active_nodes > old.active_nodes
                || agg.max_free_cpu_cores > old.max_free_cpu_cores + 1e-9
                || agg.max_free_memory_mb > old.max_free_memory_mb
                || agg.max_free_gpus > old.max_free_gpus
                || agg.virtualization.iter().any(|v| !old.virtualization.contains(v))
                || agg.arch.iter().any(|v| !old.arch.contains(v))
                || (agg.coordinate.is_some() && old.coordinate.is_none());
            c.aggregate = AggregateRecord::from(agg);
            c.last_seen_ms = oak_proto::now_ms();
            tx.put(CLUSTERS, cluster_id, &c)?;
            Ok(grew)
        })?;
        if grew {
            tracing::debug!(cluster_id, "cluster capacity grew; retrying unplaced instances");
            self.grown.lock().insert(cluster_id.to_string());
            self.capacity_changed.notify_one();
        }
        Ok(())
    }

    pub fn on_disconnect(&self, cluster_id: &str, conn: u64) {
        let mut s = self.sessions.lock();
        if s.get(cluster_id).is_some_and(|x| x.conn == conn) {
            s.remove(cluster_id);
            tracing::warn!(cluster_id, "cluster session ended; cluster is inactive");
        }
    }

    /// Registered clusters (with whether each is active), or only the active ones.
    pub fn clusters(&self, only_active: bool) -> Result<Vec<(ClusterRecord, bool)>> {
        let cls: Vec<ClusterRecord> = self.store.list(CLUSTERS)?;
        Ok(cls
            .into_iter()
            .map(|c| {
                let active = self.is_active(&c.cluster_id);
                (c, active)
            })
            .filter(|(_, active)| *active || !only_active)
            .collect())
    }
}
