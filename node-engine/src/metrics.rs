//! Node resources (the heartbeat payload), measured with sysinfo.

use std::path::{Path, PathBuf};

use oak_proto::v1::{Gpu, NodeResources};
use sysinfo::{Disks, System};

/// First `qemu-system-<arch>` binary found in PATH for this machine's architecture.
pub fn find_qemu() -> Option<PathBuf> {
    let name = match std::env::consts::ARCH {
        "x86_64" => "qemu-system-x86_64",
        "aarch64" => "qemu-system-aarch64",
        "arm" => "qemu-system-arm",
        "riscv64" => "qemu-system-riscv64",
        other => return find_in_path(&format!("qemu-system-{other}")),
    };
    find_in_path(name)
}

/// Whether /dev/kvm can be opened (qemu then runs with KVM, otherwise with TCG emulation).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Looks a program up in PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Collects node resources; keeps sysinfo state between calls so CPU usage is a delta.
pub struct MetricsCollector {
    sys: System,
    disk_path: PathBuf,
    unikernel: bool,
    location: String,
    gpu_probe: bool,
    /// The latest overlay summary of the local NetManager (see [`crate::netmanager::watch_network`]).
    network: Option<tokio::sync::watch::Receiver<Option<oak_proto::v1::WorkerNetwork>>>,
    /// The runtime whose running instances' use goes with every sample.
    runtime: Option<std::sync::Arc<crate::runtime::Runtime>>,
}

impl MetricsCollector {
    /// `disk_path`: the directory whose file system is reported as disk (the data dir).
    pub fn new(disk_path: &Path, unikernel: bool, location: String) -> Self {
        let mut sys = System::new().unwrap_or_else(|_| System::new().expect("sysinfo"));
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        Self {
            sys,
            disk_path: disk_path.to_path_buf(),
            unikernel,
            location,
            gpu_probe: find_in_path("nvidia-smi").is_some(),
            network: None,
            runtime: None,
        }
    }

    /// Virtualizations offered by this worker.
    pub fn virtualization(&self) -> Vec<String> {
        if let Some(rt) = &self.runtime {
            return rt.offered();
        }
        let mut v = vec!["container".to_string()];
        if self.unikernel && find_qemu().is_some() {
            v.push("unikernel".to_string());
        }
        v
    }

    /// A fresh sample.
    pub fn collect(&mut self) -> NodeResources {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let cpu_cores = match self.sys.cpus().len() {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        } as u32;
        let cpu_percent = (self.sys.global_cpu_usage() as f64).clamp(0.0, 100.0);
        let (disk_total_mb, disk_free_mb) = self.disk();
        NodeResources {
            cpu_cores,
            cpu_percent,
            memory_total_mb: self.sys.total_memory() / (1024 * 1024),
            memory_free_mb: self.sys.available_memory() / (1024 * 1024),
            disk_total_mb,
            disk_free_mb,
            arch: oak_proto::arch::this_machine(),
            gpus: if self.gpu_probe { nvidia_gpus() } else { Vec::new() },
            virtualization: self.virtualization(),
            location: self.location.clone(),
            network: self.network.as_ref().and_then(|rx| rx.borrow().clone()),
            instances: self.runtime.as_ref().map(|r| r.usage()).unwrap_or_default(),
        }
    }

    /// Reports the overlay summaries `rx` yields with every sample.
    pub fn with_network(mut self, rx: tokio::sync::watch::Receiver<Option<oak_proto::v1::WorkerNetwork>>) -> Self {
        self.network = Some(rx);
        self
    }

    /// Reports the use of `runtime`'s running instances with every sample.
    pub fn with_instances(mut self, runtime: std::sync::Arc<crate::runtime::Runtime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    fn disk(&self) -> (u64, u64) {
        let Ok(disks) = Disks::new_with_refreshed_list() else {
            return (0, 0);
        };
        let mut probe = self.disk_path.clone();
        while !probe.exists() {
            if !probe.pop() {
                break;
            }
        }
        let probe = probe.canonicalize().unwrap_or_else(|_| PathBuf::from("/"));
        let best = disks
            .iter()
            .filter(|d| probe.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        match best {
            Some(d) => (d.total_space() / (1024 * 1024), d.available_space() / (1024 * 1024)),
            None => statvfs_mb(&probe),
        }
    }
}

fn statvfs_mb(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize as u64;
    ((st.f_blocks as u64 * frsize) >> 20, (st.f_bavail as u64 * frsize) >> 20)
}

/// GPUs as nvidia-smi reports them (empty when it is absent or fails).
pub fn nvidia_gpus() -> Vec<Gpu> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,utilization.gpu", "--format=csv,noheader,nounits"])
        .output();
    match out {
        Ok(o) if o.status.success() => parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)),
        _ => Vec::new(),
    }
}

/// Parses `name, memory_mb, utilization` CSV lines.
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            Some(Gpu {
                name: f[0].to_string(),
                memory_mb: f[1].parse().unwrap_or(0),
                utilization_percent: f[2].parse().unwrap_or(0.0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sanity() {
        let mut m = MetricsCollector::new(Path::new("/tmp/does/not/exist/yet"), false, String::new());
        let r = m.collect();
        assert!(r.cpu_cores >= 1);
        assert!((0.0..=100.0).contains(&r.cpu_percent));
        assert!(r.memory_total_mb > 0);
        assert!(r.memory_free_mb <= r.memory_total_mb);
        assert!(r.disk_total_mb > 0, "disk of / must be found");
        assert!(r.disk_free_mb <= r.disk_total_mb);
        assert_eq!(r.arch, oak_proto::arch::this_machine());
        assert_eq!(r.virtualization, vec!["container".to_string()]);
        if find_in_path("nvidia-smi").is_none() {
            assert!(r.gpus.is_empty());
        }
    }

    #[test]
    fn unikernel_listed_only_with_qemu() {
        let m = MetricsCollector::new(Path::new("/"), true, String::new());
        assert_eq!(m.virtualization().contains(&"unikernel".to_string()), find_qemu().is_some());
    }

    #[test]
    fn nvidia_smi_csv() {
        let g = parse_nvidia_smi("NVIDIA A100, 40960, 12\n\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA A100");
        assert_eq!(g[0].memory_mb, 40960);
        assert_eq!(g[0].utilization_percent, 12.0);
    }
}
