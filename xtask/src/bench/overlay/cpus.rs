//! The two CPU layouts: which CPUs each worker gets, and binding processes and threads to them.

use std::fs;

use super::Layout;

/// Which worker a process belongs to (for the `hosts` layout's CPU split).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    A,
    B,
}

/// One layout on this machine: the CPUs of worker A and of worker B.
#[derive(Clone)]
pub(super) struct Placement {
    pub(super) layout: Layout,
    pub(super) a: Vec<usize>,
    pub(super) b: Vec<usize>,
}

impl Placement {
    pub(super) fn cpus(&self, side: Side) -> &[usize] {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

/// The CPUs this process may use.
pub(super) fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect(),
    }
}

/// The placements of `layouts` on this machine; `hosts` needs at least two CPUs and is left out (with a
/// word) without them.
pub(super) fn placements(layouts: &[Layout]) -> Vec<Placement> {
    let all = allowed_cpus();
    let mut out = Vec::new();
    for &layout in layouts {
        match layout {
            Layout::Shared => out.push(Placement { layout, a: all.clone(), b: all.clone() }),
            Layout::Hosts if all.len() >= 2 => {
                let (a, b) = all.split_at(all.len() / 2);
                out.push(Placement { layout, a: a.to_vec(), b: b.to_vec() });
            }
            Layout::Hosts => {
                eprintln!("    the hosts layout needs 2 CPUs or more; this machine offers {}: left out", all.len())
            }
        }
    }
    out
}

/// `cpus` as a sysfs CPU mask (comma-separated 32-bit hex groups, highest first).
pub(super) fn cpu_mask(cpus: &[usize]) -> String {
    let groups = cpus.iter().max().map(|m| m / 32 + 1).unwrap_or(1);
    let mut words = vec![0u32; groups];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    words.iter().rev().map(|w| format!("{w:x}")).collect::<Vec<_>>().join(",")
}

pub(super) fn cpu_set(cpus: &[usize]) -> nix::sched::CpuSet {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        let _ = set.set(c);
    }
    set
}

/// Binds every thread of `pid` to `cpus` (threads it starts later inherit it); a process that is gone is
/// skipped.
pub(super) fn pin_process(pid: u32, cpus: &[usize]) {
    let set = cpu_set(cpus);
    let tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for tid in tids {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
    }
}

/// Binds the calling thread to `cpus`.
pub(super) fn pin_thread(cpus: &[usize]) {
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu_set(cpus));
}

#[cfg(test)]
mod tests {
    use super::cpu_mask;

    #[test]
    fn cpu_masks() {
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 1, 2, 3]), "f");
        assert_eq!(cpu_mask(&[2, 3]), "c");
        assert_eq!(cpu_mask(&[33]), "2,0");
        assert_eq!(cpu_mask(&[0, 32, 64]), "1,1,1");
    }
}
