//! OCI runtime spec for an instance: image config merged with the SLA.

use oak_proto::v1::ServiceSpec;
use serde::Deserialize;
use serde_json::{json, Value};

/// The part of an OCI/Docker image config that matters for running it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl ImageConfig {
    /// Extracts `.config` from a full image config JSON document.
    pub fn from_image_json(doc: &[u8]) -> anyhow::Result<Self> {
        #[derive(Deserialize)]
        struct Full {
            #[serde(default)]
            config: Option<ImageConfig>,
        }
        let full: Full = serde_json::from_slice(doc)?;
        Ok(full.config.unwrap_or_default())
    }
}

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CFS period used for vcpus limits (µs).
pub const CPU_PERIOD: u64 = 100_000;

/// Process arguments: SLA `cmd` replaces the image's Entrypoint+Cmd; SLA `args` replace the image Cmd
/// (Docker semantics) or are appended to the SLA `cmd`.
pub fn process_args(image: &ImageConfig, spec: &ServiceSpec) -> Vec<String> {
    if !spec.cmd.is_empty() {
        let mut a = spec.cmd.clone();
        a.extend(spec.args.iter().cloned());
        return a;
    }
    let mut a = image.entrypoint.clone().unwrap_or_default();
    if !spec.args.is_empty() {
        a.extend(spec.args.iter().cloned());
    } else {
        a.extend(image.cmd.clone().unwrap_or_default());
    }
    a
}

/// Environment: the image's, overridden key by key by the SLA's; PATH defaulted.
pub fn process_env(image: &ImageConfig, spec: &ServiceSpec) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let key = |s: &str| s.split('=').next().unwrap_or("").to_string();
    for e in image.env.iter().flatten().chain(spec.environment.iter()) {
        let k = key(e);
        if k.is_empty() {
            continue;
        }
        let entry = if e.contains('=') { e.clone() } else { format!("{e}=") };
        match env.iter_mut().find(|x| key(x) == k) {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| key(e) == "PATH") {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    env
}

fn parse_user(user: Option<&str>) -> (u32, u32) {
    let Some(u) = user.filter(|u| !u.is_empty()) else {
        return (0, 0);
    };
    let mut it = u.splitn(2, ':');
    let uid = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let gid = it.next().and_then(|s| s.parse().ok()).unwrap_or(uid);
    (uid, gid)
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The capabilities this process may hand on (its bounding set): a runtime refuses to start a
/// container with one outside it, and hosts differ (a VM or sandbox may lack CAP_SYS_RESOURCE, say).
fn bounding_caps() -> &'static std::collections::HashSet<String> {
    static CAPS: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    CAPS.get_or_init(|| match caps::read(None, caps::CapSet::Bounding) {
        Ok(set) => set.iter().map(|c| c.to_string()).collect(),
        Err(e) => {
            tracing::warn!("reading this process's capability bounding set: {e}; assuming the default set only");
            DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
        }
    })
}

/// An instance's capabilities: the default set, or (privileged, Admin only) all this process has; either
/// way only those this process may hand on.
fn instance_caps(privileged: bool) -> Vec<String> {
    let bounding = bounding_caps();
    if privileged {
        let mut all: Vec<String> = bounding.iter().cloned().collect();
        all.sort();
        all
    } else {
        DEFAULT_CAPS.iter().filter(|c| bounding.contains(**c)).map(|c| c.to_string()).collect()
    }
}

/// Processes (and threads) one instance may have: a fork bomb stays inside its instance.
pub const PIDS_LIMIT: i64 = 1024;

/// System calls an unprivileged instance gets EPERM for: kernel modules and keyrings, mounts and new
/// namespaces, tracing and other processes' memory, clocks, reboot and swap, eBPF and perf, NUMA
/// placement, raw I/O ports, and the obsolete ones. Everything else is allowed (the runtime's own
/// capability set already bounds what the allowed calls can do). Names the kernel does not have on this
/// architecture are skipped by the runtime.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The seccomp filter of an unprivileged instance: [`DENIED_SYSCALLS`] fail with EPERM; calls of
/// another architecture (32-bit calls on a 64-bit host) are refused by the runtime's default.
fn seccomp_profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}],
    })
}

/// RLIMIT_NOFILE for instances: this process's hard limit (raising above it may be refused), max 1M.
fn nofile_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: r is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let max = r.rlim_max as u64;
    max.clamp(1024, 1_048_576)
}

/// Host name for an instance (max 63 characters, DNS-label characters only).
pub fn hostname_for(id: &str) -> String {
    let h: String = id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let h = h.trim_matches('-');
    h.chars().take(63).collect::<String>().trim_end_matches('-').to_string()
}

/// Builds the runtime spec. `cgroups_path` is where the instance's cgroup goes (relative to the
/// cgroup root), so its memory events can be read back after an exit.
pub fn build_spec(id: &str, image: &ImageConfig, spec: &ServiceSpec, cgroups_path: &str) -> Value {
    let args = process_args(image, spec);
    let env = process_env(image, spec);
    let (uid, gid) = parse_user(image.user.as_deref());
    let cwd = image.working_dir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
    let nofile = nofile_limit();
    let caps = instance_caps(spec.privileged);

    let mut resources = json!({
        "devices": [{"allow": spec.privileged, "access": "rwm"}],
        "pids": {"limit": PIDS_LIMIT},
    });
    if spec.memory_mb > 0 {
        resources["memory"] = json!({"limit": spec.memory_mb.saturating_mul(1024 * 1024)});
    }
    if spec.vcpus > 0.0 {
        let quota = (spec.vcpus * CPU_PERIOD as f64).round().max(1000.0) as i64;
        resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD});
    }

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
    ];
    if std::path::Path::new("/etc/resolv.conf").exists() {
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}));
    }

    let mut linux = json!({
        "resources": resources,
        "cgroupsPath": cgroups_path,
        // A new network namespace (no path): the NetManager wires it.
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
        ],
    });
    if !spec.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi"
        ]);
        linux["readonlyPaths"] = json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]);
        linux["seccomp"] = seccomp_profile();
    }

    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": !spec.privileged,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname_for(id),
        "mounts": mounts,
        "linux": linux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: Some(vec!["/bin/busybox".into()]),
            cmd: Some(vec!["httpd".into(), "-f".into()]),
            env: Some(vec!["PATH=/bin".into(), "A=1".into(), "B=2".into()]),
            working_dir: Some("/www".into()),
            user: Some("1000:1001".into()),
        }
    }

    #[test]
    fn args_merge() {
        let mut s = ServiceSpec::default();
        assert_eq!(process_args(&image(), &s), ["/bin/busybox", "httpd", "-f"]);
        s.args = vec!["sleep".into(), "5".into()];
        assert_eq!(process_args(&image(), &s), ["/bin/busybox", "sleep", "5"]);
        s.cmd = vec!["/bin/sh".into(), "-c".into()];
        s.args = vec!["echo hi".into()];
        assert_eq!(process_args(&image(), &s), ["/bin/sh", "-c", "echo hi"]);
    }

    #[test]
    fn env_merge() {
        let s = ServiceSpec { environment: vec!["B=20".into(), "C=3".into()], ..Default::default() };
        assert_eq!(process_env(&image(), &s), ["PATH=/bin", "A=1", "B=20", "C=3"]);
        let bare = process_env(&ImageConfig::default(), &s);
        assert_eq!(bare[0], DEFAULT_PATH);
        assert_eq!(bare.len(), 3);
    }

    #[test]
    fn limits() {
        let s = ServiceSpec { memory_mb: 16, vcpus: 0.5, ..Default::default() };
        let v = build_spec("app.ns.svc.ns.instance.0", &image(), &s, "/oakestra/x");
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 16 * 1024 * 1024);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(v["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(v["linux"]["cgroupsPath"], "/oakestra/x");
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(v["process"]["user"]["gid"], 1001);
        assert_eq!(v["process"]["cwd"], "/www");
        assert_eq!(v["hostname"], "app-ns-svc-ns-instance-0");
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let net = ns.iter().find(|n| n["type"] == "network").expect("network namespace");
        assert!(net.get("path").is_none(), "new netns, not a path");

        assert_eq!(v["linux"]["resources"]["pids"]["limit"], PIDS_LIMIT);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        let denied = v["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap();
        assert!(denied.iter().any(|n| n == "unshare") && denied.iter().any(|n| n == "bpf"));
        let privileged = build_spec("x", &image(), &ServiceSpec { privileged: true, ..Default::default() }, "/o/x");
        assert!(privileged["linux"].get("seccomp").is_none(), "a privileged instance (Admin only) has no filter");
        assert_eq!(privileged["process"]["noNewPrivileges"], false);
        assert_eq!(privileged["linux"]["resources"]["pids"]["limit"], PIDS_LIMIT, "but still a pids limit");
        // capabilities: named as the runtime expects, and never more than this process holds
        let bounding = bounding_caps();
        assert!(bounding.iter().all(|c| c.starts_with("CAP_")), "{bounding:?}");
        assert!(instance_caps(true).iter().all(|c| bounding.contains(c)));
        let default = instance_caps(false);
        assert!(default.len() <= DEFAULT_CAPS.len() && default.iter().all(|c| bounding.contains(c)));
        if bounding.contains("CAP_SYS_ADMIN") {
            assert!(instance_caps(true).contains(&"CAP_SYS_ADMIN".to_string()));
            assert!(!default.contains(&"CAP_SYS_ADMIN".to_string()));
        }

        let unlimited = build_spec("x", &image(), &ServiceSpec::default(), "/o/x");
        assert!(unlimited["linux"]["resources"].get("memory").is_none());
        assert!(unlimited["linux"]["resources"].get("cpu").is_none());
    }

    #[test]
    fn image_config_from_json() {
        let c = ImageConfig::from_image_json(
            br#"{"architecture":"amd64","config":{"Entrypoint":["/bin/busybox"],"Cmd":["sh"],"Env":["X=1"]}}"#,
        )
        .unwrap();
        assert_eq!(c.entrypoint.unwrap(), ["/bin/busybox"]);
        assert_eq!(c.cmd.unwrap(), ["sh"]);
        assert_eq!(ImageConfig::from_image_json(b"{}").unwrap(), ImageConfig::default());
    }
}
