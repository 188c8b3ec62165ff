//! What the kernel records about a container in its cgroup (v1 or v2): CPU time, memory use and OOM kills.

/// The cgroup of container `id` in containerd namespace `namespace` (as the runtime spec names it).
pub fn path(namespace: &str, id: &str) -> String {
    format!("/{namespace}/{id}")
}

/// Number of OOM kills recorded in the instance's memory cgroup (v1 or v2), if readable.
pub fn oom_kills(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    let candidates = [
        format!("/sys/fs/cgroup/{rel}/memory.events"),
        format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
        format!("/sys/fs/cgroup/unified/{rel}/memory.events"),
    ];
    candidates.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let mut it = line.split_whitespace();
            (it.next() == Some("oom_kill")).then(|| it.next()?.parse().ok()).flatten()
        })
    })
}

/// Current memory use of the instance's cgroup (v1 or v2), if readable.
pub fn memory_usage(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    [format!("/sys/fs/cgroup/{rel}/memory.current"), format!("/sys/fs/cgroup/memory/{rel}/memory.usage_in_bytes")]
        .iter()
        .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
}

/// CPU time the instance's cgroup (v1 or v2) has used so far, in µs, if readable.
pub fn cpu_time_us(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    let v2 = std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/cpu.stat")).ok().and_then(|t| cpu_stat_usage_us(&t));
    // v1: cpuacct.usage is in ns
    v2.or_else(|| {
        let ns: u64 =
            std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/{rel}/cpuacct.usage")).ok()?.trim().parse().ok()?;
        Some(ns / 1000)
    })
}

/// `usage_usec` of a v2 `cpu.stat`.
fn cpu_stat_usage_us(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_stat_usage() {
        let t = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(super::cpu_stat_usage_us(t), Some(123456));
        assert_eq!(super::cpu_stat_usage_us("user_usec 5\n"), None);
    }
}
