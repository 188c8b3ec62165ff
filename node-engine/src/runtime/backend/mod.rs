//! What runs an instance: one [`Backend`] per SLA `virtualization`. The runtime's verbs (deploy,
//! monitor, undeploy, adopt) are written once against this trait; a new kind of workload (a
//! microVM, say) is a new implementation registered in [`super::Runtime::connect`], nothing else.

pub mod container;
pub mod qemu;

use std::collections::HashSet;

use async_trait::async_trait;
use oak_proto::v1::ServiceSpec;
use oak_proto::InstanceState;
use serde::{Deserialize, Serialize};

/// An instance created, not yet started.
#[derive(Debug, Clone)]
pub struct Created {
    /// The process whose network namespace the NetManager wires, when the instance has one
    /// before it starts; `None`: the instance is not wired.
    pub pid: Option<u32>,
    /// The detail reported with CREATED.
    pub detail: String,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    /// Its process exited with this status (128 + signal when killed); the runtime tells a crash
    /// from a completion.
    Code(u32),
    /// The backend knows the outcome itself (the task vanished, the hypervisor failed).
    Ended { state: InstanceState, detail: String, exit_code: Option<i32> },
}

/// An instance this NodeEngine created but does not track (found by its key).
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub job_name: String,
}

/// Where a re-adopted instance stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Resumed {
    /// Still running: the backend watches it again.
    Running,
    /// It exited with this status while no NodeEngine watched.
    Exited(u32),
    /// Gone or in a state it cannot leave; the detail says which.
    Dead(String),
}

/// What a backend keeps next to a running instance (container labels, a VM's `instance.json`)
/// to re-adopt it after a NodeEngine restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub service_id: String,
    pub instance_number: u32,
    pub job_name: String,
    pub one_shot: bool,
    pub memory_mb: u64,
    pub pid: u32,
}

/// An instance left by an earlier NodeEngine process.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub record: Record,
    pub ns_address: String,
    pub state: Resumed,
}

/// One way of running instances. Ids are the runtime's instance ids ([`super::instance_id`]);
/// every verb but `create` and `start` is safe to call for an id the backend does not have.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The SLA `virtualization` it runs (`container`, `unikernel`).
    fn virtualization(&self) -> &'static str;

    /// Why it cannot run instances on this worker; `None` when it can.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Fetches what the instance needs and creates it, stopped.
    async fn create(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<Created>;

    /// Keeps the overlay address the NetManager gave, for re-adoption.
    async fn remember_ns_address(&self, _id: &str, _ns_address: &str) {}

    /// Starts a created instance; returns its pid.
    async fn start(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<u32>;

    /// Asks a [`Backend::start`] in progress for `id` (or about to begin) to give up: an undeploy is
    /// waiting for it. The start then fails and removes nothing itself.
    fn cancel_start(&self, _id: &str) {}

    /// Waits until the instance ends. An error is transient: the caller retries.
    async fn wait(&self, id: &str) -> anyhow::Result<Exit>;

    /// Stops the instance (SIGTERM, the grace period, SIGKILL) and removes everything of it.
    async fn stop(&self, id: &str, pid: u32) -> anyhow::Result<()>;

    /// Removes at once whatever is left under `id` (a failed create, an earlier instance's
    /// leftovers); best effort.
    async fn delete(&self, id: &str);

    /// The instance's memory use now, if measurable (`pid`: its task or VM, as the runtime knows it).
    fn memory_usage(&self, _id: &str, _pid: u32) -> Option<u64> {
        None
    }

    /// CPU time the instance has used so far (µs), if measurable (`pid` as for [`Backend::memory_usage`]).
    fn cpu_time_us(&self, _id: &str, _pid: u32) -> Option<u64> {
        None
    }

    /// How often the kernel OOM-killed the instance; `None` when it cannot be read.
    fn oom_kills(&self, id: &str) -> Option<u64>;

    /// An instance of `service_id` number `n` this NodeEngine made and no longer tracks.
    async fn find(&self, _service_id: &str, _n: u32) -> anyhow::Result<Option<Found>> {
        Ok(None)
    }

    /// The instances an earlier NodeEngine left, except those whose key (`service_id/n`) is in
    /// `known`; running ones are watched again.
    async fn adopt(&self, known: &HashSet<String>) -> anyhow::Result<Vec<Adopted>>;
}
