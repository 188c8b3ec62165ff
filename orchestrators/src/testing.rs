//! The network services of a root and a cluster, in-process over their real TLS (for the NetManager's
//! and the services' own tests): a root service manager with its CA, a cluster that joined it, and the
//! cluster network service with the cluster's CA and a worker join token. [`etcd`] runs a real etcd for
//! the root's store on etcd.

pub mod etcd;

use std::path::Path;
use std::sync::Arc;

use oak_trust::{Authority, Member, Registrar};
use tonic::Status;

use crate::cluster::netsvc::ClusterNetSvc;
use crate::root::netsvc::RootNetSvc;

/// Admits any newcomer of the given kinds under a new id (the orchestrators record theirs).
pub struct Admit(pub &'static [&'static str]);

impl Registrar for Admit {
    fn kinds(&self) -> &'static [&'static str] {
        self.0
    }
    fn admit(&self, _kind: &str, _name: &str, _token: &str) -> Result<String, Status> {
        Ok(crate::root::store::new_id())
    }
}

/// A root service manager and one cluster network service.
pub struct NetServices {
    pub root: RootNetSvc,
    pub root_url: String,
    pub root_authority: Arc<Authority>,
    pub cluster: ClusterNetSvc,
    pub cluster_id: String,
    pub cluster_authority: Arc<Authority>,
    /// A join token of the cluster, for NetManagers.
    pub worker_token: String,
}

/// Serves a root service manager on loopback and the cluster network service on `cluster_l`.
pub async fn net_services(dir: &Path, cluster_l: tokio::net::TcpListener) -> NetServices {
    let root_authority =
        Arc::new(Authority::open(&dir.join("root/ca"), crate::root::CA_NAME, oak_trust::ROOT_SERVER).unwrap());
    let (cluster_token, _) = root_authority.tokens.create(&root_authority.pin(), 0, "test").unwrap();
    let root = RootNetSvc::open(&dir.join("root")).unwrap();
    // the first block (10.18.0.0/22) goes to no one, so the cluster's subnets never collide with a 1-DOC
    // cluster running on the same host (its first worker has 10.18.0.0/26)
    root.lease_block("placeholder").unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let root_url = format!("http://{}", l.local_addr().unwrap());
    let trust = crate::task::trusted(&root_authority, Arc::new(Admit(&["cluster"]))).unwrap();
    tokio::spawn(crate::root::netsvc::serve_listener(root.clone(), l, trust));
    let member =
        Member::new(&root_url, oak_trust::ROOT_SERVER, "cluster", "c", &cluster_token, dir.join("cluster/identity"));
    let cluster_id = member.ensure_joined().await.unwrap().identity.id;
    let cluster = ClusterNetSvc::open(
        &dir.join("cluster"),
        &member,
        &crate::cluster::RootReplicas::one("", &root_url),
        &cluster_id,
    )
    .unwrap();
    let cluster_authority =
        Arc::new(Authority::open(&dir.join("cluster/ca"), crate::cluster::CA_NAME, oak_trust::CLUSTER_SERVER).unwrap());
    let (worker_token, _) = cluster_authority.tokens.create(&cluster_authority.pin(), 0, "test").unwrap();
    let trust = crate::task::trusted(&cluster_authority, Arc::new(Admit(&["node", "netmanager"]))).unwrap();
    tokio::spawn(crate::cluster::netsvc::serve_listener(cluster.clone(), cluster_l, trust));
    NetServices { root, root_url, root_authority, cluster, cluster_id, cluster_authority, worker_token }
}
