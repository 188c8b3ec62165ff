//! Cluster placement: pick the worker for one instance. Pure function, no I/O.
//!
//! A worker qualifies when it offers the service's virtualization, one of its architectures, matches a
//! `direct` constraint naming a node and meets the latency constraints by its network coordinate
//! ([`crate::latency`]). Among qualified workers, one fits when its free CPU, memory and GPUs
//! cover the request; free means what the worker reports as idle, minus what instances already placed on
//! it have reserved and not yet shown in its metrics. The fitting worker with the most free CPU wins
//! (ties: more free memory, then name), which spreads load the way Oakestra's best-fit does.

use oak_proto::v1::{NodeResources, ServiceSpec};
use oak_proto::{arch, InstanceState};
use InstanceState::{NoQualifiedWorkerFound, NoWorkerCapacity};

use crate::latency;

/// What the scheduler knows about one live worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerView {
    pub id: String,
    pub name: String,
    pub resources: NodeResources,
    /// vcpus / memory / gpus requested by instances placed on this worker.
    pub reserved_cpu: f64,
    pub reserved_memory_mb: u64,
    pub reserved_gpus: u32,
}

impl WorkerView {
    /// CPU cores free for new instances: the cores no placed instance has asked for. What the worker is
    /// busy with right now does not refuse a deployment (a small device compiling something would refuse
    /// everything); it only ranks workers, see [`WorkerView::idle_cpu`].
    pub fn free_cpu(&self) -> f64 {
        (f64::from(self.resources.cpu_cores) - self.reserved_cpu).max(0.0)
    }

    /// Cores idle now and not asked for: the ranking among workers that fit.
    pub fn idle_cpu(&self) -> f64 {
        let r = &self.resources;
        let idle = f64::from(r.cpu_cores) * (1.0 - (r.cpu_percent / 100.0).clamp(0.0, 1.0));
        idle.min(self.free_cpu())
    }

    /// Memory (MB) free for new instances.
    pub fn free_memory_mb(&self) -> u64 {
        let r = &self.resources;
        r.memory_free_mb.min(r.memory_total_mb.saturating_sub(self.reserved_memory_mb))
    }

    pub fn free_gpus(&self) -> u32 {
        (self.resources.gpus.len() as u32).saturating_sub(self.reserved_gpus)
    }
}

/// Why an instance cannot be placed: `status` is what the cluster reports up ([`NoWorkerCapacity`] or
/// [`NoQualifiedWorkerFound`]), `detail` starts with the user guide's name (`NoResourcesAvailable: ...`)
/// and says which worker lacked what.
#[derive(Debug, Clone, PartialEq)]
pub struct NoFit {
    pub status: InstanceState,
    pub detail: String,
}

fn not_qualified(spec: &ServiceSpec, w: &WorkerView) -> Option<String> {
    let r = &w.resources;
    if !spec.virtualization.is_empty() && !r.virtualization.iter().any(|v| v == &spec.virtualization) {
        return Some(format!(
            "does not offer virtualization '{}' (offers {:?})",
            spec.virtualization, r.virtualization
        ));
    }
    if !arch::matches(&spec.arch, &r.arch) {
        return Some(format!("is {} (SLA allows {:?})", r.arch, spec.arch));
    }
    let nodes: Vec<&str> = spec
        .constraints
        .iter()
        .filter(|c| c.r#type == "direct" && !c.node.is_empty())
        .map(|c| c.node.as_str())
        .collect();
    if !nodes.is_empty() && !nodes.contains(&w.name.as_str()) && !nodes.contains(&w.id.as_str()) {
        return Some(format!("is not the node the SLA's direct constraint names ({nodes:?})"));
    }
    latency::worker_misfit(r.network.as_ref().and_then(|n| n.coordinate.as_ref()), &spec.latency)
}

fn no_room(spec: &ServiceSpec, w: &WorkerView) -> Option<String> {
    let (cpu, mem, gpus) = (w.free_cpu(), w.free_memory_mb(), w.free_gpus());
    if spec.vcpus > cpu + 1e-9 {
        return Some(format!("has {cpu:.2} free cores, {} requested", spec.vcpus));
    }
    if spec.memory_mb > mem {
        return Some(format!("has {mem} MB free memory, {} MB requested", spec.memory_mb));
    }
    if spec.vgpus > gpus {
        return Some(format!("has {gpus} free GPUs, {} requested", spec.vgpus));
    }
    None
}

/// Joins per-worker reasons, at most five named.
fn reasons(list: &[(String, String)]) -> String {
    let mut s: Vec<String> = list.iter().take(5).map(|(n, why)| format!("worker '{n}' {why}")).collect();
    if list.len() > 5 {
        s.push(format!("and {} more", list.len() - 5));
    }
    s.join("; ")
}

/// Chooses the worker id for `spec` among `workers` (live ones only).
pub fn place(spec: &ServiceSpec, workers: &[WorkerView]) -> Result<String, NoFit> {
    if workers.is_empty() {
        return Err(NoFit {
            status: NoWorkerCapacity,
            detail: "NoResourcesAvailable: the cluster has no active worker".into(),
        });
    }
    let mut unqualified = Vec::new();
    let mut full = Vec::new();
    let mut best: Option<&WorkerView> = None;
    for w in workers {
        if let Some(why) = not_qualified(spec, w) {
            unqualified.push((w.name.clone(), why));
            continue;
        }
        if let Some(why) = no_room(spec, w) {
            full.push((w.name.clone(), why));
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let (fc, bc) = (w.idle_cpu(), b.idle_cpu());
                fc > bc + 1e-9
                    || ((fc - bc).abs() <= 1e-9
                        && (w.free_memory_mb() > b.free_memory_mb()
                            || (w.free_memory_mb() == b.free_memory_mb() && w.name < b.name)))
            }
        };
        if better {
            best = Some(w);
        }
    }
    if let Some(b) = best {
        return Ok(b.id.clone());
    }
    let ask = format!(
        "asked for {} vcpus, {} MB memory, {} GPUs, {} on {:?}",
        spec.vcpus,
        spec.memory_mb,
        spec.vgpus,
        if spec.virtualization.is_empty() { "any virtualization" } else { &spec.virtualization },
        if spec.arch.is_empty() { vec!["any arch".to_string()] } else { spec.arch.clone() }
    );
    if full.is_empty() {
        Err(NoFit {
            status: NoQualifiedWorkerFound,
            detail: format!("NoResourcesAvailable: {ask}; no worker qualifies: {}", reasons(&unqualified)),
        })
    } else {
        let mut all = full;
        all.extend(unqualified);
        Err(NoFit { status: NoWorkerCapacity, detail: format!("NoResourcesAvailable: {ask}; {}", reasons(&all)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oak_proto::v1 as pb;
    use oak_proto::v1::Constraint;

    fn worker(name: &str, cores: u32, cpu_pct: f64, free_mb: u64) -> WorkerView {
        WorkerView {
            id: format!("id-{name}"),
            name: name.into(),
            resources: NodeResources {
                cpu_cores: cores,
                cpu_percent: cpu_pct,
                memory_total_mb: 8192,
                memory_free_mb: free_mb,
                arch: "amd64".into(),
                virtualization: vec!["container".into()],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn spec(vcpus: f64, memory_mb: u64) -> ServiceSpec {
        ServiceSpec { vcpus, memory_mb, virtualization: "container".into(), ..Default::default() }
    }

    #[test]
    fn picks_the_worker_with_most_free_cpu() {
        let ws = [worker("a", 4, 90.0, 4000), worker("b", 4, 10.0, 4000), worker("c", 2, 0.0, 4000)];
        assert_eq!(place(&spec(0.5, 100), &ws).unwrap(), "id-b");
    }

    #[test]
    fn reservations_count_until_metrics_show_them() {
        let mut b = worker("b", 4, 0.0, 4000);
        b.reserved_cpu = 3.5;
        let ws = [worker("a", 2, 0.0, 4000), b];
        assert_eq!(place(&spec(1.0, 100), &ws).unwrap(), "id-a");
        let mut c = worker("c", 4, 0.0, 4000);
        c.reserved_memory_mb = 8000; // total 8192
        let e = place(&spec(0.1, 500), &[c]).unwrap_err();
        assert_eq!(e.status, NoWorkerCapacity);
        assert!(e.detail.contains("192 MB free memory, 500 MB requested"), "{}", e.detail);
    }

    #[test]
    fn no_capacity_names_resources_available_and_each_worker() {
        let ws = [worker("a", 2, 50.0, 300), worker("b", 1, 0.0, 9000)];
        let e = place(&spec(2.5, 512), &ws).unwrap_err();
        assert_eq!(e.status, NoWorkerCapacity);
        assert!(e.detail.starts_with("NoResourcesAvailable: "), "{}", e.detail);
        assert!(e.detail.contains("worker 'a' has 2.00 free cores"), "{}", e.detail);
        assert!(e.detail.contains("worker 'b' has 1.00 free cores"), "{}", e.detail);
        // memory: 'a' has the cores but reports only 300 MB free
        let e = place(&spec(1.0, 512), &ws[..1]).unwrap_err();
        assert!(e.detail.contains("worker 'a' has 300 MB free memory, 512 MB requested"), "{}", e.detail);
        let e = place(&spec(1.0, 1), &[]).unwrap_err();
        assert!(e.detail.contains("no active worker"));
    }

    #[test]
    fn qualification_virtualization_arch_and_direct_node() {
        let ws = [worker("a", 4, 0.0, 4000), worker("b", 4, 50.0, 4000)];
        let mut s = spec(0.1, 10);
        s.virtualization = "unikernel".into();
        let e = place(&s, &ws).unwrap_err();
        assert_eq!(e.status, NoQualifiedWorkerFound);
        assert!(e.detail.contains("does not offer virtualization 'unikernel'"), "{}", e.detail);

        let mut s = spec(0.1, 10);
        s.arch = vec!["arm64".into()];
        assert_eq!(place(&s, &ws).unwrap_err().status, NoQualifiedWorkerFound);
        s.arch = vec!["x86_64".into()];
        assert_eq!(place(&s, &ws).unwrap(), "id-a");

        let mut s = spec(0.1, 10);
        s.constraints = vec![Constraint { r#type: "direct".into(), node: "b".into(), ..Default::default() }];
        assert_eq!(place(&s, &ws).unwrap(), "id-b", "direct constraint beats free CPU");
        s.constraints[0].node = "zzz".into();
        assert!(place(&s, &ws).unwrap_err().detail.contains("direct constraint"));
    }

    #[test]
    fn a_busy_worker_still_takes_work_but_ranks_last() {
        let ws = [worker("busy", 2, 100.0, 4000), worker("calm", 2, 10.0, 4000)];
        assert_eq!(place(&spec(0.5, 100), &ws).unwrap(), "id-calm");
        assert_eq!(place(&spec(0.5, 100), &ws[..1]).unwrap(), "id-busy", "load alone does not refuse a deployment");
    }

    #[test]
    fn gpus_are_filtered() {
        let mut a = worker("a", 4, 0.0, 4000);
        a.resources.gpus = vec![Default::default()];
        let ws = [a, worker("b", 8, 0.0, 4000)];
        let mut s = spec(0.1, 10);
        s.vgpus = 1;
        assert_eq!(place(&s, &ws).unwrap(), "id-a");
        s.vgpus = 2;
        assert!(place(&s, &ws).unwrap_err().detail.contains("free GPUs"));
    }
    #[test]
    fn latency_constraint_keeps_workers_within_the_threshold_and_says_by_how_much() {
        let at = |x: f64| pb::NetCoordinate { position: vec![x, 0.0], height: 50.0, error: 0.1 };
        let with = |mut w: WorkerView, x: f64| {
            w.resources.network = Some(pb::WorkerNetwork { coordinate: Some(at(x)), ..Default::default() });
            w
        };
        // 'far' is idler but 25 ms from the users; 'near' is 2 ms away
        let ws = [with(worker("far", 4, 0.0, 4000), 25_000.0), with(worker("near", 4, 80.0, 4000), 2_000.0)];
        let mut s = spec(0.1, 10);
        s.latency = vec![pb::LatencyTarget {
            kind: latency::AREA.into(),
            name: "users".into(),
            threshold_ms: 10.0,
            points: vec![pb::LatencyPoint { node_name: "u".into(), coordinate: Some(at(0.0)) }],
            convergence_time_s: 0,
        }];
        assert_eq!(place(&s, &ws).unwrap(), "id-near");
        let e = place(&s, &ws[..1]).unwrap_err();
        assert_eq!(e.status, NoQualifiedWorkerFound);
        assert!(
            e.detail.contains("worker 'far' is 25.1 ms from area 'users', latency threshold 10 ms (15.1 ms over)"),
            "{}",
            e.detail
        );
    }
}
