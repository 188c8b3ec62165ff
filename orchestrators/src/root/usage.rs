//! What each instance used over time (CPU, memory), as its worker samples it and its cluster reports it
//! with the workers: kept in memory for the services' `cpu_history` and `memory_history`, not stored (a
//! restarted root starts them again; writing them would cost a store write per instance and report).

use std::collections::{HashMap, VecDeque};

use oak_proto::v1 as pb;
use parking_lot::Mutex;
use serde_json::json;

use super::records::ServiceRecord;

/// Samples kept per instance.
pub const HISTORY: usize = 100;
/// An instance with no sample for this long (undeployed, its worker gone) is forgotten.
const FORGET_AFTER_MS: u64 = 10 * 60 * 1000;

#[derive(Default)]
struct History {
    /// (unix ms of the worker's report, CPU percent of one core, memory bytes), oldest first.
    samples: VecDeque<(u64, f64, u64)>,
}

/// Every instance's history, by instance key (`service_id/n`).
#[derive(Default)]
pub struct Usage {
    by_instance: Mutex<HashMap<String, History>>,
}

impl Usage {
    /// Records the use of the instances on the live workers of one cluster report. A report repeats a
    /// worker's last sample until its next heartbeat: a sample is recorded once, by its report time.
    pub fn record(&self, workers: &[pb::WorkerSummary]) {
        let mut all = self.by_instance.lock();
        let mut newest = 0;
        for w in workers.iter().filter(|w| w.state == "live") {
            let Some(r) = &w.resources else { continue };
            let t = w.last_report_ms;
            newest = newest.max(t);
            for u in &r.instances {
                let h = all.entry(oak_proto::instance_key(&u.service_id, u.instance_number)).or_default();
                if h.samples.back().is_some_and(|s| s.0 >= t) {
                    continue;
                }
                h.samples.push_back((t, u.cpu_percent, u.memory_bytes));
                if h.samples.len() > HISTORY {
                    h.samples.pop_front();
                }
            }
        }
        if newest > 0 {
            all.retain(|_, h| h.samples.back().is_some_and(|s| s.0 + FORGET_AFTER_MS > newest));
        }
    }

    /// Fills the instances' `cpu_history` and `memory_history` (Oakestra's `{"timestamp": s, "value": v}`
    /// lists) from what was recorded.
    pub fn fill(&self, services: &mut [ServiceRecord]) {
        let all = self.by_instance.lock();
        for svc in services {
            for inst in &mut svc.instance_list {
                let Some(h) = all.get(&oak_proto::instance_key(&svc.microservice_id, inst.instance_number)) else {
                    continue;
                };
                inst.cpu_history = h.samples.iter().map(|s| json!({"timestamp": s.0 / 1000, "value": s.1})).collect();
                inst.memory_history =
                    h.samples.iter().map(|s| json!({"timestamp": s.0 / 1000, "value": s.2})).collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::records::InstanceRecord;
    use oak_proto::InstanceState;

    fn worker(state: &str, t: u64, usage: &[(&str, u32, f64, u64)]) -> pb::WorkerSummary {
        pb::WorkerSummary {
            state: state.into(),
            last_report_ms: t,
            resources: Some(pb::NodeResources {
                instances: usage
                    .iter()
                    .map(|(s, n, c, m)| pb::InstanceUsage {
                        service_id: s.to_string(),
                        instance_number: *n,
                        cpu_percent: *c,
                        memory_bytes: *m,
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service(id: &str, n: u32) -> ServiceRecord {
        ServiceRecord {
            microservice_id: id.into(),
            application_id: String::new(),
            app_name: String::new(),
            app_ns: String::new(),
            job_name: String::new(),
            user_id: String::new(),
            sla: Default::default(),
            instance_list: vec![InstanceRecord::new(n, InstanceState::Running)],
            next_instance: n + 1,
        }
    }

    #[test]
    fn samples_once_per_worker_report_from_live_workers_only() {
        let u = Usage::default();
        u.record(&[worker("live", 10_000, &[("s", 0, 12.5, 100)])]);
        // the cluster reports again before the worker's next heartbeat: the same sample
        u.record(&[worker("live", 10_000, &[("s", 0, 12.5, 100)])]);
        u.record(&[worker("live", 12_000, &[("s", 0, 30.0, 200)])]);
        // a lost worker's last figures are not news
        u.record(&[worker("lost", 14_000, &[("s", 0, 99.0, 999)])]);
        let mut svcs = [service("s", 0)];
        u.fill(&mut svcs);
        let i = &svcs[0].instance_list[0];
        assert_eq!(
            i.cpu_history,
            vec![json!({"timestamp": 10, "value": 12.5}), json!({"timestamp": 12, "value": 30.0})]
        );
        assert_eq!(
            i.memory_history,
            vec![json!({"timestamp": 10, "value": 100}), json!({"timestamp": 12, "value": 200})]
        );
    }

    #[test]
    fn keeps_the_latest_samples_and_forgets_silent_instances() {
        let u = Usage::default();
        for k in 0..(HISTORY as u64 + 5) {
            u.record(&[worker("live", 1_000 * (k + 1), &[("s", 0, k as f64, k)])]);
        }
        let mut svcs = [service("s", 0)];
        u.fill(&mut svcs);
        let h = &svcs[0].instance_list[0].cpu_history;
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0]["value"], json!(5.0), "the oldest samples went first");
        // another instance reports for longer than the forget time: the silent one is dropped
        u.record(&[worker("live", 1_000 * (HISTORY as u64 + 5) + FORGET_AFTER_MS, &[("t", 0, 1.0, 1)])]);
        let mut svcs = [service("s", 0)];
        u.fill(&mut svcs);
        assert!(svcs[0].instance_list[0].cpu_history.is_empty());
    }
}
