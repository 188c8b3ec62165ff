//! Work on a thread inside a network namespace, for the NetManager daemon (the netlink calls its wiring
//! makes inside an instance) and for the test harness `testbed`. A namespace is named either by a path (`/proc/<pid>/ns/net`,
//! `/run/netns/x`) or by an `ip netns` name (`x`, meaning `/run/netns/x`). Work runs on a fresh thread that
//! enters the namespace, so the sockets it opens live there and the caller's own thread never changes
//! namespace.

use std::fs::File;
use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

/// The file of a network namespace: `ns` itself when it is a path, else `/run/netns/<ns>`.
pub fn netns_path(ns: &str) -> PathBuf {
    if ns.starts_with('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
    }
}

/// Starts `f` on a new thread inside network namespace `ns`. The namespace is opened before the thread
/// starts, so a missing one is an error here; entering it is the thread's first step.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let path = netns_path(ns);
    let file = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    Ok(std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        Ok(f())
    }))
}

/// Runs `f` inside network namespace `ns` and waits for its result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    join(ns, spawn_in_netns(ns, f)?)
}

/// Waits for a thread started by [`spawn_in_netns`]; its panic becomes an error naming the namespace.
pub fn join<T>(ns: &str, h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("thread in network namespace {ns} panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(netns_path("oak1a"), PathBuf::from("/run/netns/oak1a"));
        assert_eq!(netns_path("/proc/1/ns/net"), PathBuf::from("/proc/1/ns/net"));
    }

    #[test]
    fn a_missing_namespace_is_an_error_naming_it() {
        let e = in_netns("no-such-namespace-here", || ()).unwrap_err();
        assert!(format!("{e:#}").contains("/run/netns/no-such-namespace-here"), "{e:#}");
    }

    #[test]
    fn runs_inside_the_namespace() {
        // Our own namespace always exists; entering it needs CAP_SYS_ADMIN, so without root the error
        // must name the namespace instead.
        let me = format!("/proc/{}/ns/net", std::process::id());
        match in_netns(&me, || std::fs::read_link("/proc/thread-self/ns/net").unwrap()) {
            Ok(link) => assert_eq!(link, std::fs::read_link(&me).unwrap()),
            Err(e) => assert!(format!("{e:#}").contains(&me), "{e:#}"),
        }
    }

    #[test]
    fn a_panic_is_an_error_naming_the_namespace() {
        let me = format!("/proc/{}/ns/net", std::process::id());
        let e = in_netns(&me, || panic!("boom")).unwrap_err();
        assert!(format!("{e:#}").contains(&me), "{e:#}");
    }
}
