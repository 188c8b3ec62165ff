//! VMs as qemu processes: unikernels (see [`crate::runtime::unikernel`] for the image and the command
//! line) and microVMs (an OCI image's rootfs booted by a Linux guest, [`crate::runtime::guest`]). A
//! record next to each VM lets a restarted NodeEngine find it. With a NetManager, a VM is wired like a
//! container: through a network namespace held for it ([`crate::runtime::vmnet`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use oak_proto::v1::ServiceSpec;
use oak_proto::{instance_key, InstanceState};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::{Adopted, Backend, Created, Exit, Record, Resumed};
use crate::runtime::containerd::Containerd;
use crate::runtime::guest::{self, GuestKernel, Workload};
use crate::runtime::logs::Logs;
use crate::runtime::unikernel::{self, Accel, Boot, ExitRx, MicroVmBoot};
use crate::runtime::{qmp, spec, vmnet};

/// What kind of guest a [`QemuBackend`] boots.
enum Kind {
    /// A unikernel image (`kernel`, optional initramfs) on qemu's default machine.
    Unikernel,
    /// An OCI image's rootfs (a containerd snapshot held by a lease, mounted and shared by 9p) under a
    /// Linux guest on qemu's microvm machine.
    MicroVm { ctr: Containerd, kernel: Result<GuestKernel, String> },
}

/// Runs `unikernel` or `microvm` instances (only when enabled with -u).
pub struct QemuBackend {
    kind: Kind,
    enabled: bool,
    /// A NetManager wires instances: VMs get a network namespace and a network device.
    networked: bool,
    data_dir: PathBuf,
    logs: Logs,
    stop_grace: Duration,
    /// How long a VM on the overlay has to answer at its address before it is stopped as FAILED.
    answer_timeout: Duration,
    accel: Accel,
    /// The exit of every VM this process started or re-adopted, by instance id.
    exits: Mutex<HashMap<String, ExitRx>>,
    /// Set for a VM whose start an undeploy cancelled, by instance id (see [`Backend::cancel_start`]);
    /// cleared by the undeploy's stop (and once a start has finished), never by a deploy, which may run
    /// after the undeploy asked.
    cancelled: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// A microVM's rootfs snapshot, and the lease holding it and its image.
fn snapshot_key(id: &str) -> String {
    format!("oak-vm-{id}")
}

impl QemuBackend {
    fn with(kind: Kind, cfg: &crate::runtime::RuntimeConfig, logs: Logs) -> Self {
        Self {
            kind,
            enabled: cfg.unikernel,
            networked: cfg.netmanager_port != 0,
            data_dir: cfg.data_dir.clone(),
            logs,
            stop_grace: cfg.stop_grace,
            answer_timeout: cfg.vm_answer_timeout,
            accel: cfg.vm_accel,
            exits: Mutex::default(),
            cancelled: Mutex::default(),
        }
    }

    /// The cancel flag of `id`'s start.
    fn cancel_flag(&self, id: &str) -> Arc<AtomicBool> {
        self.cancelled.lock().entry(id.to_string()).or_default().clone()
    }

    /// Kills the qemu `pid` this start launched, waits for it, and says the start was cancelled.
    async fn abandon(&self, pid: u32, exited: &mut ExitRx) -> anyhow::Error {
        // SAFETY: kill(2) of the qemu this start launched; its exit channel says it has not been reaped.
        if exited.borrow().is_none() {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|c| c.is_some())).await;
        anyhow!("undeployed while the guest was starting")
    }

    /// The unikernel backend of the runtime configured by `cfg`, consoles in `logs`.
    pub fn unikernel(cfg: &crate::runtime::RuntimeConfig, logs: Logs) -> Self {
        Self::with(Kind::Unikernel, cfg, logs)
    }

    /// The microVM backend: images and rootfs snapshots from `ctr`, guests booted with the kernel
    /// `cfg` names (or the newest in /boot).
    pub fn microvm(cfg: &crate::runtime::RuntimeConfig, logs: Logs, ctr: Containerd) -> Self {
        let kernel = GuestKernel::find(cfg.microvm_kernel.as_deref()).map_err(|e| format!("{e:#}"));
        Self::with(Kind::MicroVm { ctr, kernel }, cfg, logs)
    }

    /// Where a VM's files are: `<data dir>/unikernels/<id>` or `<data dir>/microvms/<id>`.
    fn dir(&self, id: &str) -> PathBuf {
        self.root().join(id)
    }

    fn root(&self) -> PathBuf {
        self.data_dir.join(match self.kind {
            Kind::Unikernel => "unikernels",
            Kind::MicroVm { .. } => "microvms",
        })
    }

    /// Creates a microVM's root filesystem and initramfs in `dir`; answers the image's name.
    async fn create_microvm(
        &self,
        ctr: &Containerd,
        kernel: &GuestKernel,
        spec: &ServiceSpec,
        id: &str,
        dir: &Path,
    ) -> anyhow::Result<String> {
        let (k, cache) = (kernel.clone(), self.data_dir.join("microvm-guest"));
        let base = tokio::task::spawn_blocking(move || guest::base_initramfs(&k, &cache))
            .await?
            .context("building the microVM guest's initramfs")?;
        let key = snapshot_key(id);
        ctr.create_named_lease(&key).await?;
        let img = ctr
            .ensure_image_leased(&spec.code, &key)
            .await
            .map_err(|e| anyhow!("image '{}' unavailable: {e:#}", spec.code))?;
        let workload = Workload {
            args: spec::process_args(&img.config, spec),
            env: spec::process_env(&img.config, spec),
            workdir: img.config.working_dir.clone().unwrap_or_default(),
            user: img.config.user.clone().unwrap_or_default(),
        };
        let mut initrd = std::fs::read(&base)?;
        initrd.extend(workload.cpio()?);
        std::fs::write(dir.join("initrd.cpio"), initrd)?;
        let mounts = ctr.prepare_rootfs(&key, &img.chain_id, Some(&key)).await?;
        mount_rootfs(&mounts, &dir.join("rootfs"))?;
        Ok(img.name)
    }

    /// Removes the VM's files, its network namespace's holder and (a microVM) its root filesystem.
    async fn remove_files(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        vmnet::stop_holder(&dir);
        if let Kind::MicroVm { ctr, .. } = &self.kind {
            unmount(&dir.join("rootfs"))?;
            let key = snapshot_key(id);
            ctr.remove_snapshot(&key).await?;
            ctr.delete_lease(&key).await;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Waits until the microVM's console says its workload started; stops it (FAILED) when that takes
    /// longer than the answer timeout, fails at once when qemu exits first.
    async fn wait_for_start(
        &self,
        id: &str,
        log: &Path,
        exited: &mut ExitRx,
        cancel: &AtomicBool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.answer_timeout;
        let started = || crate::runtime::logs::tail_file(log, 64 * 1024).contains(guest::STARTED);
        loop {
            if cancel.load(Ordering::Relaxed) {
                let pid = unikernel::find_vm(id).unwrap_or(0);
                return Err(self.abandon(pid, exited).await);
            }
            if started() {
                info!(instance = id, "the microVM's workload started");
                return Ok(());
            }
            let console = || crate::runtime::logs::tail_file(log, 600).trim().to_string();
            if let Some(code) = *exited.borrow() {
                anyhow::bail!(
                    "qemu exited (code {code}) before the workload started; its console ends:\n{}",
                    console()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                if let Some(pid) = unikernel::find_vm(id) {
                    // SAFETY: kill(2) of the qemu running this instance, which has not exited (checked above).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|c| c.is_some())).await;
                anyhow::bail!(
                    "the microVM's workload did not start within {:?} (--vm-answer-timeout), so the VM was stopped; \
                     its console ends:\n{}",
                    self.answer_timeout,
                    console()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), exited.changed()).await;
        }
    }

    /// Kills a VM of `id` still running that this process does not watch (an earlier instance's), and
    /// waits (up to 5 s) until it is gone.
    async fn kill_stray(&self, id: &str) {
        if let Some(pid) = unikernel::find_vm(id) {
            warn!(instance = id, pid, "killing a VM left by an earlier instance");
            // SAFETY: kill(2) of a qemu process whose command line names this instance's files.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            for _ in 0..100 {
                if !unikernel::is_our_vm(pid, id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Mounts a snapshot's mounts (one overlay or bind mount, as containerd's overlayfs snapshotter gives)
/// on `target`.
fn mount_rootfs(mounts: &[containerd_client::types::Mount], target: &Path) -> anyhow::Result<()> {
    use std::ffi::CString;
    let [m] = mounts else {
        anyhow::bail!("the rootfs snapshot has {} mounts; one was expected", mounts.len());
    };
    std::fs::create_dir_all(target)?;
    let bind = m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
    let mut flags = if bind { libc::MS_BIND | libc::MS_REC } else { 0 };
    if m.options.iter().any(|o| o == "ro") {
        flags |= libc::MS_RDONLY;
    }
    let data: Vec<&str> =
        m.options.iter().map(String::as_str).filter(|o| !matches!(*o, "bind" | "rbind" | "ro" | "rw")).collect();
    let c = |s: &str| CString::new(s).map_err(|_| anyhow!("NUL in mount argument {s:?}"));
    let (src, dst, fstype, data) =
        (c(&m.source)?, c(&target.display().to_string())?, c(&m.r#type)?, c(&data.join(","))?);
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("mounting the rootfs ({} {}) on {}: {e}", m.r#type, m.source, target.display());
    }
    Ok(())
}

/// Unmounts `target` if something is mounted there (lazily: a process still in it does not keep it).
fn unmount(target: &Path) -> anyhow::Result<()> {
    let Ok(c) = std::ffi::CString::new(target.display().to_string()) else {
        return Ok(());
    };
    // SAFETY: umount2(2) with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(e).with_context(|| format!("unmounting {}", target.display()));
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for QemuBackend {
    fn virtualization(&self) -> &'static str {
        match self.kind {
            Kind::Unikernel => "unikernel",
            Kind::MicroVm { .. } => "microvm",
        }
    }

    fn unavailable(&self) -> Option<String> {
        if !self.enabled {
            return Some(format!("{} support not enabled (start with -u=true)", self.virtualization()));
        }
        if crate::metrics::find_qemu().is_none() {
            return Some("no qemu-system-* binary for this architecture in PATH (install qemu-system)".into());
        }
        match &self.kind {
            Kind::Unikernel => None,
            Kind::MicroVm { kernel, .. } => microvm_unavailable(kernel.as_ref().err().map(String::as_str)),
        }
    }

    async fn create(&self, spec: &ServiceSpec, _n: u32, id: &str) -> anyhow::Result<Created> {
        crate::metrics::find_qemu()
            .ok_or_else(|| anyhow!("no qemu-system-* binary for this architecture in PATH (install qemu-system)"))?;
        // refused here, before anything is fetched, when the VM could not run anyway
        unikernel::choose_kvm(self.accel)?;
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir)?;
        let detail = match &self.kind {
            Kind::Unikernel => {
                let (kernel, _) = unikernel::fetch_image(&spec.code, &dir)
                    .await
                    .map_err(|e| anyhow!("unikernel image '{}' unavailable: {e:#}", spec.code))?;
                format!("kernel {}", kernel.display())
            }
            Kind::MicroVm { ctr, kernel } => {
                let kernel = kernel.as_ref().map_err(|e| anyhow!("{e}"))?;
                let image = self.create_microvm(ctr, kernel, spec, id, &dir).await?;
                format!("microVM of {image} on {}", kernel.vmlinuz.display())
            }
        };
        // the namespace the NetManager wires next, and the VM joins when it starts
        let holder = if self.networked { Some(vmnet::spawn_holder(&dir)?) } else { None };
        Ok(Created { pid: holder, detail })
    }

    async fn start(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<u32> {
        let qemu = crate::metrics::find_qemu().context("qemu-system-* vanished from PATH")?;
        let dir = self.dir(id);
        let (kernel, initrd) = match &self.kind {
            Kind::Unikernel => unikernel::image_files(&dir),
            Kind::MicroVm { kernel, .. } => {
                (kernel.as_ref().map_err(|e| anyhow!("{e}"))?.vmlinuz.clone(), Some(dir.join("initrd.cpio")))
            }
        };
        let (rootfs, qmp_path, hostname) = (dir.join("rootfs"), dir.join(qmp::SOCKET), spec::hostname_for(id));
        let log = self.logs.path(id);
        let _ = std::fs::remove_file(&log);
        let net = match self.networked.then(|| vmnet::holder(&dir)) {
            None => None,
            Some(None) => anyhow::bail!("the VM's network namespace is gone (its holder process ended)"),
            Some(Some(holder)) => {
                let net = tokio::task::spawn_blocking(move || vmnet::plumb(holder))
                    .await?
                    .context("connecting the VM's network device to its namespace")?;
                Some((holder, net))
            }
        };
        // recorded before qemu is spawned (pid 0 until it is known), so a NodeEngine killed in between
        // finds the VM by its command line when it starts again instead of leaving it orphaned
        let mut rec = Record {
            id: id.to_string(),
            service_id: spec.service_id.clone(),
            instance_number: n,
            job_name: spec.job_name.clone(),
            one_shot: spec.one_shot,
            memory_mb: spec.memory_mb,
            pid: 0,
        };
        let record = dir.join("instance.json");
        std::fs::write(&record, serde_json::to_vec(&rec)?)?;
        let boot = Boot {
            kernel: &kernel,
            initrd: initrd.as_deref(),
            log: &log,
            net: net.as_ref().map(|(_, n)| n),
            microvm: matches!(self.kind, Kind::MicroVm { .. }).then(|| MicroVmBoot {
                rootfs: &rootfs,
                qmp: &qmp_path,
                hostname: &hostname,
            }),
        };
        let cancel = self.cancel_flag(id);
        if cancel.load(Ordering::Relaxed) {
            anyhow::bail!("undeployed before the VM started");
        }
        let (pid, exit) = unikernel::launch(&qemu, spec, &boot, net.as_ref().map(|(h, _)| *h), self.accel).await?;
        let mut exited = exit.clone();
        self.exits.lock().insert(id.to_string(), exit);
        rec.pid = pid;
        std::fs::write(&record, serde_json::to_vec(&rec)?)?;
        // a microVM off the overlay is RUNNING once its init says the workload started
        if net.is_none() && matches!(self.kind, Kind::MicroVm { .. }) {
            self.wait_for_start(id, &log, &mut exited, &cancel).await?;
        }
        // on the overlay, RUNNING means the guest answers there, not that qemu started
        if let Some((holder, net)) = net {
            let ip = net.ip;
            let (watch, timeout, stop) = (exited.clone(), self.answer_timeout, cancel.clone());
            let answer = tokio::task::spawn_blocking(move || {
                vmnet::wait_for_guest(holder, &net, timeout, move || {
                    watch.borrow().is_some() || stop.load(Ordering::Relaxed)
                })
            })
            .await??;
            if cancel.load(Ordering::Relaxed) {
                return Err(self.abandon(pid, &mut exited).await);
            }
            let console = || crate::runtime::logs::tail_file(&log, 600).trim().to_string();
            match answer {
                vmnet::Answer::Answered(after) => {
                    info!(instance = %id, %ip, ?after, "the guest answers on the overlay")
                }
                vmnet::Answer::Gone => {
                    let code = exited.borrow().unwrap_or(-1);
                    anyhow::bail!(
                        "qemu exited (code {code}) before the guest answered at {ip}; its console ends:\n{}",
                        console()
                    );
                }
                vmnet::Answer::Silent => {
                    // SAFETY: kill(2) of the qemu this call started, which has not exited (checked above).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|c| c.is_some())).await;
                    anyhow::bail!(
                        "the guest did not answer at {ip} (ARP) within {timeout:?} (--vm-answer-timeout), so the VM \
                         was stopped; its console ends:\n{}",
                        console()
                    );
                }
            }
        }
        self.cancelled.lock().remove(id);
        Ok(pid)
    }

    fn cancel_start(&self, id: &str) {
        self.cancel_flag(id).store(true, Ordering::Relaxed);
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Exit> {
        let exit = self.exits.lock().get(id).cloned();
        let code = match exit {
            Some(mut exit) => exit.wait_for(|c| c.is_some()).await.ok().and_then(|c| *c).unwrap_or(-1),
            None => -1,
        };
        let log = self.logs.path(id);
        if let Kind::MicroVm { .. } = self.kind {
            // the guest's init reports its workload's exit before it powers the VM off
            let console = crate::runtime::logs::tail_file(&log, 4096);
            if let Some(workload) = guest::reported_exit(&console) {
                return Ok(Exit::Code(workload));
            }
            if code == 0 {
                let detail = format!(
                    "the microVM stopped before its workload ended (kernel panic or init failure); its console \
                     ends:\n{}",
                    crate::runtime::logs::tail_file(&log, 600).trim()
                );
                return Ok(Exit::Ended { state: InstanceState::Failed, detail, exit_code: None });
            }
        }
        if code == -1 {
            // a re-adopted qemu is not this process's child: its exit status cannot be read
            let detail = format!(
                "qemu exited; its exit status is unknown (the VM was re-adopted after a NodeEngine restart); its \
                 console ends:\n{}",
                crate::runtime::logs::tail_file(&log, 600).trim()
            );
            return Ok(Exit::Ended { state: InstanceState::Failed, detail, exit_code: None });
        }
        if let Some(line) = unikernel::kvm_failure(&log, code) {
            let detail =
                format!("qemu failed under KVM ({line}); KVM disabled for later VMs, a redeploy runs with TCG");
            return Ok(Exit::Ended { state: InstanceState::Failed, detail, exit_code: Some(code) });
        }
        Ok(Exit::Code(code as u32))
    }

    async fn stop(&self, id: &str, pid: u32) -> anyhow::Result<()> {
        self.cancelled.lock().remove(id);
        let exit = self.exits.lock().remove(id);
        // While the exit channel is empty the pid is still ours: our unreaped child, or (re-adopted)
        // a process whose pidfd has not fired.
        if let Some(mut exit) = exit.filter(|e| pid != 0 && e.borrow().is_none()) {
            let graceful = match self.kind {
                // the guest's init turns the ACPI power button into SIGTERM for its workload
                Kind::MicroVm { .. } => match qmp::command(&self.dir(id).join(qmp::SOCKET), "system_powerdown").await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(instance = id, "cannot ask the microVM to power down through QMP ({e:#}); SIGTERM");
                        false
                    }
                },
                Kind::Unikernel => false,
            };
            if !graceful {
                // SAFETY: plain kill(2) on the VM's pid (see above).
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(self.stop_grace, exit.wait_for(|c| c.is_some())).await.is_err() {
                warn!(instance = id, grace = ?self.stop_grace, "the VM did not stop within the grace period: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|c| c.is_some())).await;
            }
        }
        self.remove_files(id).await
    }

    async fn delete(&self, id: &str) {
        self.exits.lock().remove(id);
        self.kill_stray(id).await;
        if let Err(e) = self.remove_files(id).await {
            warn!(instance = id, "removing the VM's leftovers: {e:#}");
        }
    }

    fn memory_usage(&self, _id: &str, pid: u32) -> Option<u64> {
        unikernel::process_rss(pid).filter(|_| pid != 0)
    }

    fn cpu_time_us(&self, _id: &str, pid: u32) -> Option<u64> {
        unikernel::process_cpu_us(pid).filter(|_| pid != 0)
    }

    fn oom_kills(&self, _id: &str) -> Option<u64> {
        // A VM's memory limit is its own RAM size: the host does not OOM-kill it for using it.
        Some(0)
    }

    async fn adopt(&self, known: &HashSet<String>) -> anyhow::Result<Vec<Adopted>> {
        let Ok(dirs) = std::fs::read_dir(self.root()) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for d in dirs.flatten() {
            let Ok(bytes) = std::fs::read(d.path().join("instance.json")) else {
                continue;
            };
            let Ok(mut rec) = serde_json::from_slice::<Record>(&bytes) else {
                continue;
            };
            if known.contains(&instance_key(&rec.service_id, rec.instance_number)) {
                continue;
            }
            if rec.pid == 0 {
                // killed between recording the VM and learning qemu's pid: look for it
                rec.pid = unikernel::find_vm(&rec.id).unwrap_or(0);
            }
            let alive = rec.pid != 0 && unikernel::is_our_vm(rec.pid, &rec.id);
            let state = match alive.then(|| unikernel::watch_foreign(rec.pid).ok()).flatten() {
                Some(exit) => {
                    info!(instance = %rec.id, pid = rec.pid, kind = self.virtualization(), "re-adopted running VM");
                    self.exits.lock().insert(rec.id.clone(), exit);
                    Resumed::Running
                }
                None => Resumed::Dead("VM not running after NodeEngine restart".into()),
            };
            out.push(Adopted { record: rec, ns_address: String::new(), state });
        }
        Ok(out)
    }
}

/// Why this worker cannot run microVMs (`kernel_error`: why no guest kernel was found); `None` when it can.
pub fn microvm_unavailable(kernel_error: Option<&str>) -> Option<String> {
    if std::env::consts::ARCH != "x86_64" {
        return Some(format!(
            "microVMs need qemu's microvm machine, which exists for x86_64 (this is {})",
            std::env::consts::ARCH
        ));
    }
    if let Some(e) = kernel_error {
        return Some(e.to_string());
    }
    if !Path::new(guest::BUSYBOX).is_file() {
        return Some(format!("microVMs need a static busybox at {} (install busybox-static)", guest::BUSYBOX));
    }
    None
}
