//! What the kernel records about a container in its cgroup (v1 or v2): memory use and OOM kills.

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
