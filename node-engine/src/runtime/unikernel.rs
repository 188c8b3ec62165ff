//! Unikernels on qemu (only with -u): the SLA `code` is a `.tar.gz` (local path or http:// URL)
//! holding `kernel` and optionally `initramfs.cpio`. KVM is used when /dev/kvm works, TCG otherwise.
//! With a NetManager, the VM gets a virtio-net device in a network namespace the NetManager wired
//! ([`super::vmnet`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use oak_proto::v1::ServiceSpec;
use tokio::sync::watch;
use tracing::{info, warn};

use super::vmnet::GuestNet;

/// How a VM ended: exit code (or 128+signal); None while running.
pub type ExitRx = watch::Receiver<Option<i32>>;

pub fn vm_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("unikernels").join(id)
}

/// Downloads (http://) or copies the archive and extracts `kernel` / `initramfs.cpio` into `dir`.
pub async fn fetch_image(code: &str, dir: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    std::fs::create_dir_all(dir)?;
    let bytes = if code.starts_with("http://") || code.starts_with("https://") {
        info!(url = code, "downloading unikernel image");
        let resp = reqwest::get(code).await.with_context(|| format!("cannot download unikernel image {code}"))?;
        if !resp.status().is_success() {
            bail!("cannot download unikernel image {code}: HTTP {}", resp.status());
        }
        let what = format!("unikernel image {code}");
        super::registry::read_limited(resp, &what, super::image::MAX_BLOB).await?
    } else {
        let p = code.strip_prefix("file://").unwrap_or(code);
        let len = std::fs::metadata(p).with_context(|| format!("cannot read unikernel image {p}"))?.len();
        super::image::check_size(&format!("unikernel image {p}"), len, super::image::MAX_BLOB)?;
        std::fs::read(p).with_context(|| format!("cannot read unikernel image {p}"))?
    };
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || extract(&bytes, &dir)).await?
}

/// The kernel and (when the archive had one) the initramfs that [`fetch_image`] put in `dir`.
pub fn image_files(dir: &Path) -> (PathBuf, Option<PathBuf>) {
    let initrd = dir.join("initramfs.cpio");
    (dir.join("kernel"), initrd.exists().then_some(initrd))
}

fn extract(bytes: &[u8], dir: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let reader: Box<dyn Read> =
        if bytes.starts_with(&[0x1f, 0x8b]) { Box::new(flate2::read::GzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut ar = tar::Archive::new(reader);
    let (mut kernel, mut initrd) = (None, None);
    for e in ar.entries().context("unikernel image is not a tar(.gz) archive")? {
        let mut e = e.context("corrupt unikernel archive")?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e.path()?.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let target = match name.as_str() {
            "kernel" => dir.join("kernel"),
            "initramfs.cpio" | "initrd" | "initramfs.cpio.gz" => dir.join("initramfs.cpio"),
            _ => continue,
        };
        let mut f = std::fs::File::create(&target)?;
        std::io::copy(&mut e, &mut f)?;
        if name == "kernel" {
            kernel = Some(target);
        } else {
            initrd = Some(target);
        }
    }
    let kernel = kernel.context("unikernel archive has no `kernel` file")?;
    Ok((kernel, initrd))
}

/// What a VM boots, and on which machine.
#[derive(Debug, Clone, Copy)]
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// The console's file.
    pub log: &'a Path,
    pub net: Option<&'a GuestNet>,
    /// A microVM; `None`: a unikernel on qemu's default machine.
    pub microvm: Option<MicroVmBoot<'a>>,
}

/// A microVM's part: qemu's `microvm` machine (virtio over MMIO, no PCI, no firmware), the instance's
/// root filesystem shared by 9p, and a QMP socket to stop it cleanly.
#[derive(Debug, Clone, Copy)]
pub struct MicroVmBoot<'a> {
    pub rootfs: &'a Path,
    pub qmp: &'a Path,
    pub hostname: &'a str,
}

/// A path as a qemu option value (commas doubled).
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// qemu arguments (without the binary).
pub fn qemu_args(spec: &ServiceSpec, boot: &Boot, kvm: bool) -> Vec<String> {
    let mem = if spec.memory_mb > 0 { spec.memory_mb } else { 64 };
    let smp = spec.vcpus.ceil().max(1.0) as u32;
    let mut a: Vec<String> = Vec::new();
    if boot.microvm.is_some() {
        a.extend(["-M".into(), "microvm".into()]);
    }
    a.extend([
        "-kernel".into(),
        boot.kernel.display().to_string(),
        "-m".into(),
        mem.to_string(),
        "-smp".into(),
        smp.to_string(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-chardev".into(),
        format!("file,id=serial0,path={},append=on", qemu_path(boot.log)),
        "-serial".into(),
        "chardev:serial0".into(),
    ]);
    if let Some(i) = boot.initrd {
        a.push("-initrd".into());
        a.push(i.display().to_string());
    }
    let mut append = vec!["console=ttyS0".to_string()];
    if let Some(n) = boot.net {
        a.extend(n.qemu_args(if boot.microvm.is_some() { "virtio-net-device" } else { "virtio-net-pci" }));
        append.extend(n.kernel_args());
    }
    match &boot.microvm {
        Some(m) => {
            a.extend([
                "-fsdev".into(),
                format!("local,id=rootfs,path={},security_model=passthrough", qemu_path(m.rootfs)),
                "-device".into(),
                format!("virtio-9p-device,fsdev=rootfs,mount_tag={}", super::guest::ROOTFS_TAG),
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", qemu_path(m.qmp)),
            ]);
            // quiet: the console is the workload's log; panic=-1 with -no-reboot: a panic ends qemu
            append.extend(["quiet".into(), "panic=-1".into(), format!("oak.hostname={}", m.hostname)]);
            // qemu's microvm machine has no HPET and no ACPI PM timer: a guest kernel calibrates its TSC
            // against the PIT alone, which fails on a loaded host under TCG (the TSC is then unusable and
            // the boot hangs). Under TCG the guest's TSC is the host's: give its frequency.
            if let Some(khz) = host_tsc_khz().filter(|_| !kvm) {
                append.push(format!("tsc_early_khz={khz}"));
            }
        }
        // a unikernel's arguments are its kernel command line; a microVM's are its workload's
        None => append.extend(spec.args.iter().cloned()),
    }
    a.push("-append".into());
    a.push(append.join(" "));
    if kvm {
        a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]);
    } else {
        a.extend(["-accel".into(), "tcg".into()]);
    }
    a
}

/// The host's TSC frequency in kHz (x86_64), measured once against the monotonic clock.
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        *KHZ.get_or_init(|| {
            let mut rates: Vec<u64> = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    // SAFETY: rdtsc has no preconditions on x86_64.
                    let c = unsafe { core::arch::x86_64::_rdtsc() };
                    std::thread::sleep(Duration::from_millis(20));
                    // SAFETY: as above.
                    let c2 = unsafe { core::arch::x86_64::_rdtsc() };
                    let ns = t.elapsed().as_nanos().max(1) as u64;
                    c2.saturating_sub(c) * 1_000_000 / ns
                })
                .collect();
            rates.sort_unstable();
            Some(rates[2]).filter(|k| *k > 0)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Set once qemu failed under KVM on this host (nested KVM can be flaky): later VMs use TCG.
pub static KVM_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Which accelerator VMs may use (`--vm-accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm works, TCG emulation otherwise (logged).
    #[default]
    Auto,
    /// KVM only: a VM that cannot have it FAILS.
    Kvm,
    /// TCG emulation only.
    Tcg,
}

/// Whether the next VM runs under KVM; an error when it may not run at all (KVM required, not usable).
/// `OAK_NODE_ENGINE_NO_KVM=1` makes `auto` use TCG.
pub fn choose_kvm(accel: Accel) -> anyhow::Result<bool> {
    let broken = KVM_BROKEN.load(std::sync::atomic::Ordering::Relaxed);
    match accel {
        Accel::Tcg => Ok(false),
        Accel::Kvm if !crate::metrics::kvm_usable() => {
            bail!("KVM is not usable on this worker (/dev/kvm cannot be opened) and TCG is off (--vm-accel kvm)")
        }
        Accel::Kvm if broken => {
            bail!("KVM failed on this worker for an earlier VM and TCG is off (--vm-accel kvm)")
        }
        Accel::Kvm => Ok(true),
        Accel::Auto => {
            Ok(crate::metrics::kvm_usable() && std::env::var_os("OAK_NODE_ENGINE_NO_KVM").is_none() && !broken)
        }
    }
}

/// Called when a VM ended: if qemu died of a KVM error, KVM is disabled for later VMs and the
/// reason is returned.
pub fn kvm_failure(log: &Path, code: i32) -> Option<String> {
    if code == 0 {
        return None;
    }
    let tail = super::logs::tail_file(log, 2048);
    // qemu's own lines, not the guest kernel's ("[    0.000000] ... kvm-clock")
    let line =
        tail.lines().find(|l| !l.trim_start().starts_with('[') && l.to_lowercase().contains("kvm"))?.trim().to_string();
    KVM_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
    Some(line)
}

/// Starts qemu (in the network namespace of `holder`, when given); returns its pid and a receiver that
/// gets the exit code.
pub async fn launch(
    qemu: &Path,
    spec: &ServiceSpec,
    boot: &Boot<'_>,
    holder: Option<u32>,
    accel: Accel,
) -> anyhow::Result<(u32, ExitRx)> {
    let mut kvm = choose_kvm(accel)?;
    let kind = if boot.microvm.is_some() { "microVM" } else { "unikernel VM" };
    loop {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(boot.log)?;
        let err = out.try_clone()?;
        let args = qemu_args(spec, boot, kvm);
        if kvm {
            info!(qemu = %qemu.display(), accel = "kvm", network = ?boot.net.map(|n| n.ip), "starting {kind}");
        } else {
            info!(qemu = %qemu.display(), accel = "tcg", network = ?boot.net.map(|n| n.ip),
                "starting {kind} under TCG emulation (no usable KVM, or --vm-accel tcg): slower than KVM");
        }
        let mut cmd = tokio::process::Command::new(qemu);
        if let Some(holder) = holder {
            super::vmnet::enter_before_exec(&mut cmd, holder)?;
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("cannot start {}", qemu.display()))?;
        let pid = child.id().unwrap_or(0);
        // A KVM that cannot be used makes qemu exit at once: fall back to TCG when allowed.
        if kvm {
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(700), child.wait()).await {
                let tail = super::logs::tail_file(boot.log, 2048);
                if tail.to_lowercase().contains("kvm") {
                    KVM_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
                    if accel == Accel::Kvm {
                        bail!("qemu could not use KVM and TCG is off (--vm-accel kvm): {}", tail.trim());
                    }
                    warn!(status = ?status, "qemu could not use KVM; using TCG emulation from now on");
                    kvm = false;
                    continue;
                }
                let (tx, rx) = watch::channel(Some(exit_code(status)));
                drop(tx);
                return Ok((pid, rx));
            }
        }
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(s) => exit_code(s),
                Err(_) => -1,
            };
            let _ = tx.send(Some(code));
        });
        return Ok((pid, rx));
    }
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// Watches a process that is not our child (re-adopted VM) through a pidfd; its exit code is
/// unknown, reported as -1.
pub fn watch_foreign(pid: u32) -> anyhow::Result<ExitRx> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as libc::c_int;
    if fd < 0 {
        bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid file descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `owned` is an OwnedFd moved into the AsyncFd, which keeps it open while registered.
    let afd =
        unsafe { tokio::io::unix::AsyncFd::register(owned) }.map_err(|e| anyhow::anyhow!("registering pidfd: {e}"))?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let _ = afd.readable().await;
        let _ = tx.send(Some(-1));
    });
    Ok(rx)
}

/// Resident memory of process `pid` (a VM's qemu: the guest's RAM it touched, and qemu's own), in bytes.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// CPU time process `pid` has used so far (user + system, all its threads), in µs.
pub fn process_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the fields after the command name, which is in parentheses and may hold spaces
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (rest.get(11)?.parse().ok()?, rest.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) * 1_000_000 / hz as u64)
}

/// The qemu process running VM `id`, if one does (its pid was never recorded).
pub fn find_vm(id: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_our_vm(*pid, id))
}

/// Whether `pid` is a qemu process running the VM `id` (its kernel path contains the id).
pub fn is_our_vm(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("qemu-system") && c.contains(id)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let me = std::process::id();
        assert!(process_rss(me).is_some_and(|b| b > 0));
        // busy until the kernel has accounted more CPU time (it counts in clock ticks)
        let before = process_cpu_us(me).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        while process_cpu_us(me).unwrap() <= before {
            for i in 0..100_000u64 {
                x = x.wrapping_add(i * i);
            }
            assert!(std::time::Instant::now() < deadline, "5 s of spinning and no CPU time accounted");
        }
        std::hint::black_box(x);
        assert_eq!(process_rss(u32::MAX), None);
    }

    fn boot<'a>(kernel: &'a Path, initrd: Option<&'a Path>, net: Option<&'a GuestNet>) -> Boot<'a> {
        Boot { kernel, initrd, log: Path::new("/l"), net, microvm: None }
    }

    #[test]
    fn args() {
        let s = ServiceSpec { memory_mb: 128, vcpus: 1.5, args: vec!["ip=10.0.0.2".into()], ..Default::default() };
        let a = qemu_args(&s, &boot(Path::new("/k"), Some(Path::new("/i")), None), false);
        let j = a.join(" ");
        assert!(j.contains("-m 128") && j.contains("-smp 2") && j.contains("-initrd /i"), "{j}");
        assert!(j.contains("-accel tcg") && j.contains("console=ttyS0 ip=10.0.0.2"), "{j}");
        assert!(!j.contains("-M microvm") && !j.contains("-qmp"), "{j}");
        let k = qemu_args(&ServiceSpec::default(), &boot(Path::new("/k"), None, None), true).join(" ");
        assert!(k.contains("-accel kvm -cpu host") && k.contains("-m 64") && !k.contains("-initrd"), "{k}");
        assert!(!k.contains("-netdev"), "no network device without a NetManager: {k}");
        let net = GuestNet {
            ip: "10.18.0.5".parse().unwrap(),
            prefix: 26,
            gateway: "10.18.0.1".parse().unwrap(),
            mac: "02:4f:0a:12:00:05".into(),
            mtu: 1450,
        };
        let n = qemu_args(&s, &boot(Path::new("/k"), None, Some(&net)), false).join(" ");
        assert!(n.contains("-netdev tap,id=oaknet,ifname=tap0") && n.contains("virtio-net-pci,netdev=oaknet"), "{n}");
        assert!(n.contains("mac=02:4f:0a:12:00:05"), "{n}");
        // the network first, the SLA's own arguments last (they may override)
        assert!(n.contains("console=ttyS0 oak.ip=10.18.0.5/26 ") && n.contains("255.255.255.192 ip=10.0.0.2 "), "{n}");

        // a microVM: its own machine, virtio over MMIO, the root by 9p, QMP; the SLA's args are not the kernel's
        let m = MicroVmBoot { rootfs: Path::new("/vm,1/rootfs"), qmp: Path::new("/vm/qmp.sock"), hostname: "h" };
        let b = Boot { microvm: Some(m), ..boot(Path::new("/k"), Some(Path::new("/i")), Some(&net)) };
        let v = qemu_args(&s, &b, false).join(" ");
        assert!(v.starts_with("-M microvm ") && v.contains("virtio-net-device,netdev=oaknet"), "{v}");
        assert!(v.contains("-fsdev local,id=rootfs,path=/vm,,1/rootfs,security_model=passthrough"), "{v}");
        assert!(v.contains("-device virtio-9p-device,fsdev=rootfs,mount_tag=rootfs"), "{v}");
        assert!(v.contains("-qmp unix:/vm/qmp.sock,server=on,wait=off") && v.contains("oak.hostname=h"), "{v}");
        assert!(!v.contains("ip=10.0.0.2") && !v.contains("virtio-net-pci"), "{v}");
        // under TCG the guest is told the TSC's frequency (its only clock there); under KVM it has kvm-clock
        assert!(v.contains("tsc_early_khz=") && host_tsc_khz().is_some_and(|k| k > 100_000), "{v}");
        assert!(!qemu_args(&s, &b, true).join(" ").contains("tsc_early_khz"));
    }

    #[test]
    fn accelerator_policy() {
        assert!(!choose_kvm(Accel::Tcg).unwrap());
        match choose_kvm(Accel::Kvm) {
            Ok(kvm) => assert!(kvm && crate::metrics::kvm_usable()),
            Err(e) => assert!(e.to_string().contains("TCG is off"), "{e}"),
        }
    }
}
