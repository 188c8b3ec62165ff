//! Work on a thread inside a network namespace: the daemon's own helper for the netlink calls the wiring
//! makes inside an instance (the test harness `testbed` has the same semantics for the tests, but is not
//! a dependency of the daemon).
//!
//! A namespace is named either by a path (`/proc/<pid>/ns/net`, `/proc/self/fd/<n>`, `/run/netns/x`) or
//! by an `ip netns` name (`x`, meaning `/run/netns/x`). The namespace file is opened on the caller's
//! thread, so a missing namespace is an error before any thread starts; a fresh thread then enters it
//! (`setns(fd, CLONE_NEWNET)`) as its first step and runs the work there. The sockets the work opens live
//! in that namespace, and the caller's own thread never changes namespace (a thread that entered one is
//! never reused: it ends with the work).

use std::fs::File;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

/// The file of a network namespace: `ns` itself when it is a path, else `/run/netns/<ns>`.
pub fn netns_path(ns: &str) -> PathBuf {
    if ns.starts_with('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
    }
}

/// Runs `f` on a new thread inside network namespace `ns` and waits for its result. Errors name the
/// namespace: opening its file, entering it (needs CAP_SYS_ADMIN), or `f` panicking.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = netns_path(ns);
    let file = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        Ok(f())
    });
    thread.join().map_err(|_| anyhow!("thread in network namespace {ns} panicked"))?
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
