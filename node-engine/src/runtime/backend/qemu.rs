//! Unikernels as qemu processes (see [`crate::runtime::unikernel`] for the image and the
//! command line). A record next to each VM lets a restarted NodeEngine find it. With a NetManager, a VM
//! is wired like a container: through a network namespace held for it ([`crate::runtime::vmnet`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use oak_proto::v1::ServiceSpec;
use oak_proto::{instance_key, InstanceState};
use parking_lot::Mutex;
use tracing::info;

use super::{Adopted, Backend, Created, Exit, Record, Resumed};
use crate::runtime::logs::Logs;
use crate::runtime::unikernel::{self, ExitRx};
use crate::runtime::vmnet;

/// Runs `unikernel` instances (only when enabled with -u).
pub struct QemuBackend {
    enabled: bool,
    /// A NetManager wires instances: VMs get a network namespace and a network device.
    networked: bool,
    data_dir: PathBuf,
    logs: Logs,
    stop_grace: Duration,
    /// How long a VM on the overlay has to answer at its address before it is stopped as FAILED.
    answer_timeout: Duration,
    /// The exit of every VM this process started or re-adopted, by instance id.
    exits: Mutex<HashMap<String, ExitRx>>,
}

impl QemuBackend {
    /// The backend the runtime configured by `cfg` runs VMs with, their consoles in `logs`.
    pub fn new(cfg: &crate::runtime::RuntimeConfig, logs: Logs) -> Self {
        Self {
            enabled: cfg.unikernel,
            networked: cfg.netmanager_port != 0,
            data_dir: cfg.data_dir.clone(),
            logs,
            stop_grace: cfg.stop_grace,
            answer_timeout: cfg.vm_answer_timeout,
            exits: Mutex::default(),
        }
    }

    /// Removes the VM's files and its network namespace's holder.
    fn remove_files(&self, id: &str) -> anyhow::Result<()> {
        let dir = unikernel::vm_dir(&self.data_dir, id);
        vmnet::stop_holder(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn virtualization(&self) -> &'static str {
        "unikernel"
    }

    fn unavailable(&self) -> Option<String> {
        (!self.enabled).then(|| "unikernel support not enabled (start with -u=true)".to_string())
    }

    async fn create(&self, spec: &ServiceSpec, _n: u32, id: &str) -> anyhow::Result<Created> {
        crate::metrics::find_qemu()
            .ok_or_else(|| anyhow!("no qemu-system-* binary for this architecture in PATH (install qemu-system)"))?;
        let dir = unikernel::vm_dir(&self.data_dir, id);
        let (kernel, _) = unikernel::fetch_image(&spec.code, &dir)
            .await
            .map_err(|e| anyhow!("unikernel image '{}' unavailable: {e:#}", spec.code))?;
        // the namespace the NetManager wires next, and the VM joins when it starts
        let holder = if self.networked { Some(vmnet::spawn_holder(&dir)?) } else { None };
        Ok(Created { pid: holder, detail: format!("kernel {}", kernel.display()) })
    }

    async fn start(&self, spec: &ServiceSpec, n: u32, id: &str) -> anyhow::Result<u32> {
        let qemu = crate::metrics::find_qemu().context("qemu-system-* vanished from PATH")?;
        let dir = unikernel::vm_dir(&self.data_dir, id);
        let (kernel, initrd) = unikernel::image_files(&dir);
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
        let (pid, exit) =
            unikernel::launch(&qemu, spec, &kernel, initrd.as_deref(), &log, net.as_ref().map(|(h, n)| (*h, n)))
                .await?;
        let mut exited = exit.clone();
        self.exits.lock().insert(id.to_string(), exit);
        rec.pid = pid;
        std::fs::write(&record, serde_json::to_vec(&rec)?)?;
        // on the overlay, RUNNING means the guest answers there, not that qemu started
        if let Some((holder, net)) = net {
            let ip = net.ip;
            let (watch, timeout) = (exited.clone(), self.answer_timeout);
            let answer = tokio::task::spawn_blocking(move || {
                vmnet::wait_for_guest(holder, &net, timeout, move || watch.borrow().is_some())
            })
            .await??;
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
        Ok(pid)
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Exit> {
        let exit = self.exits.lock().get(id).cloned();
        let code = match exit {
            Some(mut exit) => exit.wait_for(|c| c.is_some()).await.ok().and_then(|c| *c).unwrap_or(-1),
            None => -1,
        };
        if code == -1 {
            let detail = "VM exited (exit code unknown)".to_string();
            return Ok(Exit::Ended { state: InstanceState::Dead, detail, exit_code: None });
        }
        if let Some(line) = unikernel::kvm_failure(&self.logs.path(id), code) {
            let detail =
                format!("qemu failed under KVM ({line}); KVM disabled for later VMs, a redeploy runs with TCG");
            return Ok(Exit::Ended { state: InstanceState::Failed, detail, exit_code: Some(code) });
        }
        Ok(Exit::Code(code as u32))
    }

    async fn stop(&self, id: &str, pid: u32) -> anyhow::Result<()> {
        let exit = self.exits.lock().remove(id);
        // While the exit channel is empty the pid is still ours: our unreaped child, or (re-adopted)
        // a process whose pidfd has not fired.
        if let Some(mut exit) = exit.filter(|e| pid != 0 && e.borrow().is_none()) {
            // SAFETY: plain kill(2) on the VM's pid (see above).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if tokio::time::timeout(self.stop_grace, exit.wait_for(|c| c.is_some())).await.is_err() {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|c| c.is_some())).await;
            }
        }
        self.remove_files(id)
    }

    async fn delete(&self, id: &str) {
        self.exits.lock().remove(id);
        let _ = self.remove_files(id);
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
        let Ok(dirs) = std::fs::read_dir(self.data_dir.join("unikernels")) else {
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
                    info!(instance = %rec.id, pid = rec.pid, "re-adopted running unikernel VM");
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
