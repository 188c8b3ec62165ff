//! The cluster orchestrator's crash-safe store (redb, `<data-dir>/cluster.redb`): its cluster id, the
//! workers it has seen (id -> name) and every instance placement (protobuf-encoded record).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use oak_proto::v1::ClusterInstanceRecord;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// identity (`node/<id>`, `netmanager/<id>`) -> name: who joined this cluster.
const MEMBERS: TableDefinition<&str, &str> = TableDefinition::new("members");

pub struct ClusterStore {
    db: Database,
}

impl ClusterStore {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
        let path = dir.join("cluster.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let tx = db.begin_write()?;
        tx.open_table(META)?;
        tx.open_table(NODES)?;
        tx.open_table(MEMBERS)?;
        tx.open_table(INSTANCES)?;
        tx.commit()?;
        Ok(Self { db })
    }

    fn meta(&self, key: &str) -> Result<String> {
        let rt = self.db.begin_read()?;
        let t = rt.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()).unwrap_or_default())
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    pub fn cluster_id(&self) -> Result<String> {
        self.meta("cluster_id")
    }

    pub fn set_cluster_id(&self, id: &str) -> Result<()> {
        self.set_meta("cluster_id", id)
    }

    pub fn nodes(&self) -> Result<BTreeMap<String, String>> {
        let rt = self.db.begin_read()?;
        let t = rt.open_table(NODES)?;
        let mut m = BTreeMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            m.insert(k.value().to_string(), v.value().to_string());
        }
        Ok(m)
    }

    pub fn put_node(&self, id: &str, name: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(NODES)?.insert(id, name)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a member that joined (`node/<id>` or `netmanager/<id>`).
    pub fn add_member(&self, identity: &str, name: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(MEMBERS)?.insert(identity, name)?;
        tx.commit()?;
        Ok(())
    }

    pub fn is_member(&self, identity: &str) -> Result<bool> {
        let rt = self.db.begin_read()?;
        Ok(rt.open_table(MEMBERS)?.get(identity)?.is_some())
    }

    pub fn remove_node(&self, id: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(NODES)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    pub fn instances(&self) -> Result<Vec<ClusterInstanceRecord>> {
        let rt = self.db.begin_read()?;
        let t = rt.open_table(INSTANCES)?;
        let mut v = Vec::new();
        for e in t.iter()? {
            let (k, val) = e?;
            match ClusterInstanceRecord::decode(val.value()) {
                Ok(r) => v.push(r),
                Err(e) => tracing::error!(key = k.value(), "skipping undecodable stored instance: {e}"),
            }
        }
        Ok(v)
    }

    pub fn put_instance(&self, key: &str, rec: &ClusterInstanceRecord) -> Result<()> {
        let bytes = rec.encode_to_vec();
        let tx = self.db.begin_write()?;
        tx.open_table(INSTANCES)?.insert(key, bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete_instance(&self, key: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(INSTANCES)?.remove(key)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oak_proto::v1::{DeployInstance, InstanceStatus, ServiceSpec};

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = ClusterStore::open(dir.path()).unwrap();
            s.set_cluster_id("abc").unwrap();
            s.put_node("n1", "worker-1").unwrap();
            let rec = ClusterInstanceRecord {
                deploy: Some(DeployInstance {
                    service: Some(ServiceSpec { service_id: "s1".into(), memory_mb: 64, ..Default::default() }),
                    instance_number: 2,
                }),
                status: Some(InstanceStatus {
                    service_id: "s1".into(),
                    instance_number: 2,
                    status: oak_proto::InstanceState::Running.as_str().into(),
                    ..Default::default()
                }),
                undeploying: false,
            };
            s.put_instance("s1/2", &rec).unwrap();
            s.put_instance("s1/3", &rec).unwrap();
            s.delete_instance("s1/3").unwrap();
        }
        let s = ClusterStore::open(dir.path()).unwrap();
        assert_eq!(s.cluster_id().unwrap(), "abc");
        assert_eq!(s.nodes().unwrap().get("n1").map(String::as_str), Some("worker-1"));
        let all = s.instances().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].deploy.as_ref().unwrap().service.as_ref().unwrap().memory_mb, 64);
        assert_eq!(all[0].status.as_ref().unwrap().status, "RUNNING");
    }
}
