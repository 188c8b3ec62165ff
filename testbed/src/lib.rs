//! The one test harness every test and benchmark uses: network namespaces as hosts joined by a switch
//! ([`Net`], [`Host`]), the real binaries running inside them ([`Proc`]), work on threads inside a namespace
//! ([`in_netns`], [`spawn_in_netns`]), hosts with a file system of their own ([`Device`], where release bundles
//! are installed), a client of the root's REST API ([`Api`]), and a relay host that delays the traffic to
//! one other host ([`Delay`]).
//!
//! Namespaces need root: [`require_root`] tells a test to skip, with the reason printed, where it is missing.

mod api;
mod bins;
mod cmd;
mod delay;
mod device;
mod net;
mod proc;
mod vms;
mod wait;

pub use api::Api;
pub use bins::{bin, bin_dir, require_root};
pub use cmd::{ip, run};
pub use delay::Delay;
pub use device::Device;
pub use net::{Host, Net};
pub use oak_netns::{in_netns, join, netns_path, spawn_in_netns};
pub use proc::Proc;
pub use vms::stop_vms_under;
pub use wait::wait_for;

/// The join token every root and cluster orchestrator started by the harness has (`OAK_CLUSTER_TOKEN`).
pub const JOIN_TOKEN: &str = "testbed.testbedjoinsecret0123456789abcdef";
/// The worker join token of the harness's cluster orchestrators and workers (`OAK_WORKER_TOKEN`).
pub const WORKER_TOKEN: &str = "testbedw.testbedworkerjoinsecret0123456789";
