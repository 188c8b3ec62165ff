//! What a failed test leaves of the VMs its NodeEngines ran (they outlive a NodeEngine by design): qemu
//! processes whose command line names the test's directory, the holders of their network namespaces
//! (recorded as `netns-holder.pid` under it) and microVM root filesystems mounted under it. Stopped and
//! unmounted when the test's network or environment is dropped, so one failure does not slow the rest.

use std::path::{Path, PathBuf};

/// Kills the VMs and namespace holders of NodeEngines whose data lies under `dir`, and unmounts what is
/// mounted under it.
pub fn stop_vms_under(dir: &Path) {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            // SAFETY: kill(2) of a qemu started for this test's directory.
            unsafe { nix::libc::kill(pid, nix::libc::SIGKILL) };
        }
    }
    for holder in files_named(dir, "netns-holder.pid") {
        let Some(pid) = std::fs::read_to_string(&holder).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.starts_with(b"sleep\0infinity") {
            // SAFETY: kill(2) of the namespace holder this test's NodeEngine recorded.
            unsafe { nix::libc::kill(pid, nix::libc::SIGKILL) };
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut under: Vec<&str> =
        mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&needle)).collect();
    // the deepest first
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: umount2(2) with a NUL-terminated path.
            unsafe { nix::libc::umount2(c.as_ptr(), nix::libc::MNT_DETACH) };
        }
    }
}

/// Files called `name` anywhere under `dir` (not following links).
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(e.path());
            } else if e.file_name() == name {
                out.push(e.path());
            }
        }
    }
    out
}
