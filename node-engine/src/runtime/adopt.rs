//! Adopt: after a NodeEngine restart, every backend reports the instances the earlier process
//! left; running ones are watched again, ended ones reported as they ended.

use std::collections::HashSet;
use std::sync::Arc;

use oak_proto::v1::InstanceStatus;
use oak_proto::{instance_key, InstanceState};

use super::backend::Resumed;
use super::{Instance, Runtime};

impl Runtime {
    /// Finds the instances this NodeEngine started, resumes watching running ones and returns
    /// the states of all it knows (for the Hello).
    pub async fn adopt(self: &Arc<Self>) -> anyhow::Result<Vec<InstanceStatus>> {
        for backend in &self.backends {
            let known: HashSet<String> = self.instances.lock().keys().cloned().collect();
            for a in backend.adopt(&known).await? {
                let rec = a.record;
                let (sid, n) = (rec.service_id.clone(), rec.instance_number);
                {
                    let mut map = self.instances.lock();
                    let key = instance_key(&sid, n);
                    if map.contains_key(&key) {
                        continue;
                    }
                    let mut inst = Instance::new(rec.id.clone(), rec.job_name, &sid, n, Some(backend.clone()));
                    inst.one_shot = rec.one_shot;
                    inst.memory_mb = rec.memory_mb;
                    inst.pid = rec.pid;
                    inst.status.ns_address = a.ns_address;
                    map.insert(key, inst);
                }
                match a.state {
                    Resumed::Running => {
                        let detail = "re-adopted after NodeEngine restart".to_string();
                        self.emit(&sid, n, InstanceState::Running, detail, None);
                        self.spawn_monitor(backend.clone(), sid, n, rec.id);
                    }
                    Resumed::Exited(code) => self.report_exit(backend.as_ref(), &sid, n, &rec.id, code),
                    Resumed::Dead(detail) => self.emit(&sid, n, InstanceState::Dead, detail, None),
                }
            }
        }
        Ok(self.instances())
    }
}
