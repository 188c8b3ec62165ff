//! The Linux guest of a microVM, assembled on the worker from its packages: a kernel (Debian's
//! `linux-image-*`, or `--microvm-kernel`), the static busybox (`busybox-static`) and an init that
//! mounts the instance's root filesystem (the OCI image's rootfs, shared by 9p), configures `eth0` from
//! the `oak.*` kernel parameters, runs the image's entrypoint/cmd with the image's and the SLA's
//! environment, turns the ACPI power button (QMP `system_powerdown`) into SIGTERM for it, and reports
//! its exit code on the console before powering off.
//!
//! The initramfs is two `newc` archives one after the other, which the kernel unpacks in turn: the
//! guest's (built once per kernel, cached under the data directory) and the instance's (`/oak/run.sh`,
//! the one command to run).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where Debian's busybox-static installs it.
pub const BUSYBOX: &str = "/bin/busybox";

/// The 9p mount tag of the instance's root filesystem.
pub const ROOTFS_TAG: &str = "rootfs";

/// The console line prefix of everything the guest's init says.
pub const SAYS: &str = "oak-microvm:";

/// What init prints once the workload has been started (after the network is up).
pub const STARTED: &str = "oak-microvm: started";

/// What init prints when the workload ended, followed by its exit status (128 + signal when killed).
pub const EXITED: &str = "oak-microvm: workload exited with code ";

/// Modules the guest loads, by name (dependencies come from `modules.dep`): virtio over MMIO (the only
/// bus of qemu's microvm machine), its network card, 9p for the root filesystem, and the ACPI power
/// button with the event device init reads it from.
pub const MODULES: [&str; 6] = ["virtio_mmio", "virtio_net", "9pnet_virtio", "9p", "button", "evdev"];

/// A kernel to boot guests with, and its modules.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestKernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

impl GuestKernel {
    /// `vmlinuz` (`/boot/vmlinuz-<version>`) with its modules (`/usr/lib/modules/<version>`).
    pub fn at(vmlinuz: &Path) -> Result<Self> {
        let name = vmlinuz.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let version = name
            .strip_prefix("vmlinuz-")
            .with_context(|| format!("{}: a guest kernel is named vmlinuz-<version>", vmlinuz.display()))?;
        let modules = Path::new("/usr/lib/modules").join(version);
        if !vmlinuz.is_file() {
            bail!("guest kernel {} does not exist", vmlinuz.display());
        }
        if !modules.join("modules.dep").is_file() {
            bail!("guest kernel {}: its modules are not in {}", vmlinuz.display(), modules.display());
        }
        Ok(Self { vmlinuz: vmlinuz.to_path_buf(), modules })
    }

    /// The newest kernel in /boot whose modules are installed.
    pub fn newest() -> Option<Self> {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
            .collect();
        found.sort();
        found.iter().rev().find_map(|p| Self::at(p).ok())
    }

    /// The kernel `--microvm-kernel` names, or the newest one; the error says what to install.
    pub fn find(configured: Option<&Path>) -> Result<Self> {
        match configured {
            Some(p) => Self::at(p),
            None => Self::newest().context(
                "no guest kernel for microVMs: no /boot/vmlinuz-<version> with its modules (install linux-image-amd64, \
                 or give --microvm-kernel)",
            ),
        }
    }

    fn version(&self) -> String {
        self.modules.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    }
}

/// Module files (relative to the modules directory) to load for `wanted`, dependencies first.
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let deps: std::collections::HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim(), d.split_whitespace().collect()))
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    for w in wanted {
        let file = format!("/{w}.ko");
        let Some((m, d)) = deps.iter().find(|(m, _)| m.ends_with(&file)) else {
            bail!("module {w} is not in modules.dep (a kernel with {w} built in needs no module: not supported here)");
        };
        // modules.dep lists a module's dependencies so that the last is loaded first
        for x in d.iter().rev().chain(std::iter::once(m)) {
            if !order.iter().any(|o| o == x) {
                order.push(x.to_string());
            }
        }
    }
    Ok(order)
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs: `dirs`, then `files`
/// (path, content, mode), then the trailer.
pub fn newc(files: &[(String, Vec<u8>, u32)], dirs: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        ino += 1;
        out.extend(header.as_bytes());
        out.extend(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    for d in dirs {
        entry(&mut out, d, 0o040755, &[]);
    }
    for (path, data, mode) in files {
        entry(&mut out, path, 0o100000 | mode, data);
    }
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// `s` quoted for a POSIX shell: one word, nothing expanded.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's init. It runs the instance's `oak_app` (from `/oak/run.sh`) in the background and waits;
/// the power button sends the workload SIGTERM; its exit ends the VM.
fn init_script(insmod: &str) -> String {
    // Runs inside the instance's root: finds the program in the image's PATH (busybox would run its own
    // applet for a bare name), enters the working directory, drops to the image's user, then execs.
    let launch = r#"wd=$1; user=$2; shift 2; p=$1; shift
case $p in */*) ;; *)
  found=; IFS=:; for d in $PATH; do if [ -f "$d/$p" ] && [ -x "$d/$p" ]; then found=$d/$p; break; fi; done; unset IFS
  [ -n "$found" ] || { echo "oak-microvm: $p: not found in PATH ($PATH)"; exit 127; }
  p=$found;;
esac
mkdir -p "$wd" && cd "$wd" || { echo "oak-microvm: cannot enter the working directory $wd"; exit 126; }
[ -z "$user" ] || exec /.oak/busybox chpst -u "$user" "$p" "$@"
exec "$p" "$@""#;
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
say() {{ echo "{SAYS} $*"; }}
halt() {{ sync; poweroff -f; sleep 10; }}
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
{insmod}for a in $(cat /proc/cmdline); do
  case $a in oak.ip=*) IP=${{a#oak.ip=}};; oak.gw=*) GW=${{a#oak.gw=}};; oak.mtu=*) MTU=${{a#oak.mtu=}};;
    oak.hostname=*) hostname "${{a#oak.hostname=}}";; esac
done
ip link set lo up
if [ -n "$IP" ]; then
  ip link set eth0 mtu "${{MTU:-1500}}" up && ip addr add "$IP" dev eth0 && ip route add default via "$GW" \
    || {{ say "cannot configure eth0 with $IP via $GW"; halt; }}
  say "network ready eth0 $IP via $GW"
fi
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {ROOTFS_TAG} /newroot \
  || {{ say "cannot mount the root filesystem (9p tag {ROOTFS_TAG})"; halt; }}
for d in proc sys dev tmp .oak; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys; mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs -o size=8m oak /newroot/.oak && cp /bin/busybox /newroot/.oak/busybox
OAK_LAUNCH='{launch}'
. /oak/run.sh
oak_app &
APP=$!
say "started pid $APP"
if [ -e /dev/input/event0 ]; then
  (dd if=/dev/input/event0 of=/dev/null bs=24 count=1 2>/dev/null && say "stop requested: SIGTERM to the workload" \
    && kill -TERM $APP) &
fi
wait $APP
code=$?
echo "{EXITED}$code"
halt
"#
    )
}

/// The guest's own initramfs for `kernel` (busybox, modules, init), built on first use and kept in
/// `cache_dir` (`guest-<kernel version>.cpio`).
pub fn base_initramfs(kernel: &GuestKernel, cache_dir: &Path) -> Result<PathBuf> {
    let out = cache_dir.join(format!("guest-{}.cpio", kernel.version()));
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (install busybox-static)"))?;
    let dep = std::fs::read_to_string(kernel.modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", kernel.modules.display()))?;
    let order = load_order(&dep, &MODULES)?;
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![("bin/busybox".into(), busybox, 0o755)];
    let mut insmod = String::new();
    for m in &order {
        let base = Path::new(m).file_name().unwrap_or_default().to_string_lossy().to_string();
        let data = std::fs::read(kernel.modules.join(m)).with_context(|| format!("reading module {m}"))?;
        files.push((format!("lib/modules/{base}"), data, 0o644));
        insmod.push_str(&format!("insmod /lib/modules/{base} || say \"insmod {base} failed\"\n"));
    }
    files.push(("init".into(), init_script(&insmod).into_bytes(), 0o755));
    let cpio = newc(&files, &["bin", "dev", "lib", "lib/modules", "newroot", "oak", "proc", "sys", "tmp"]);
    // rebuilt when busybox, the modules or this init changed: the file is compared, not trusted by name
    if std::fs::read(&out).ok().as_deref() != Some(&cpio[..]) {
        std::fs::create_dir_all(cache_dir)?;
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, &cpio)?;
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

/// What one instance runs in its microVM.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workload {
    /// Program and arguments (the image's entrypoint and cmd, or the SLA's).
    pub args: Vec<String>,
    /// `KEY=value`, PATH included.
    pub env: Vec<String>,
    pub workdir: String,
    /// The image's user (`name`, `uid` or `uid:gid`); empty: root.
    pub user: String,
}

impl Workload {
    /// `/oak/run.sh`: defines `oak_app`, which replaces itself with the workload inside the root.
    pub fn script(&self) -> Result<String> {
        if self.args.is_empty() {
            bail!("the image has neither Entrypoint nor Cmd, and the SLA gives no cmd: nothing to run");
        }
        let q = |v: &[String]| v.iter().map(|s| sh_quote(s)).collect::<Vec<_>>().join(" ");
        let workdir = if self.workdir.is_empty() { "/" } else { &self.workdir };
        Ok(format!(
            "oak_app() {{\n  exec env -i {} chroot /newroot /.oak/busybox sh -c \"$OAK_LAUNCH\" oak-run {} {} {}\n}}\n",
            q(&self.env),
            sh_quote(workdir),
            sh_quote(&chpst_user(&self.user)),
            q(&self.args)
        ))
    }

    /// The instance's part of the initramfs.
    pub fn cpio(&self) -> Result<Vec<u8>> {
        Ok(newc(&[("oak/run.sh".into(), self.script()?.into_bytes(), 0o644)], &[]))
    }
}

/// An OCI `user` as busybox `chpst -u` takes it: names as they are, numeric ids with a leading `:`
/// (group 0 when none is given, as Docker does without an /etc/passwd entry).
fn chpst_user(user: &str) -> String {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match user.split_once(':') {
        None if numeric(user) => format!(":{user}:0"),
        Some((u, g)) if numeric(u) && numeric(g) => format!(":{u}:{g}"),
        _ => user.to_string(),
    }
}

/// The workload's exit status as init reported it on the console `log` (its last report).
pub fn reported_exit(console: &str) -> Option<u32> {
    console.lines().rev().find_map(|l| l.trim().strip_prefix(EXITED)?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_dependencies_first() {
        let dep = "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko \
                   kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
                   kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let names: Vec<String> = load_order(dep, &["virtio_mmio", "virtio_net"])
            .unwrap()
            .iter()
            .map(|m| Path::new(m).file_stem().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net"]);
        assert!(load_order(dep, &["e1000"]).unwrap_err().to_string().contains("e1000"));
    }

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let c = newc(&[("init".into(), b"#!/bin/sh\n".to_vec(), 0o755)], &["bin"]);
        assert!(c.starts_with(b"070701"));
        assert!(c.len().is_multiple_of(4));
        let s = String::from_utf8_lossy(&c);
        // the name and its NUL padded to 4 bytes (110 + 5 = 115: one more), then the data
        assert!(s.contains("bin\0") && s.contains("init\0\0#!/bin/sh\n") && s.contains("TRAILER!!!\0"), "{s:?}");
    }

    #[test]
    fn workload_script_quotes_every_word() {
        let w = Workload {
            args: vec!["/bin/echo".into(), "it's $HOME".into()],
            env: vec!["PATH=/bin".into(), "A=b c".into()],
            workdir: String::new(),
            user: "1000".into(),
        };
        let s = w.script().unwrap();
        assert!(s.contains(r#"env -i 'PATH=/bin' 'A=b c' chroot /newroot"#), "{s}");
        assert!(s.contains(r#"oak-run '/' ':1000:0' '/bin/echo' 'it'\''s $HOME'"#), "{s}");
        let err = Workload::default().script().unwrap_err().to_string();
        assert!(err.contains("neither Entrypoint nor Cmd"), "{err}");
    }

    #[test]
    fn users_for_chpst() {
        assert_eq!(chpst_user(""), "");
        assert_eq!(chpst_user("nobody"), "nobody");
        assert_eq!(chpst_user("1000:100"), ":1000:100");
        assert_eq!(chpst_user("www:www"), "www:www");
    }

    #[test]
    fn the_last_reported_exit_counts() {
        let log = format!("boot\n{EXITED}3\n{EXITED}143\r\n[ 1.0] reboot: Power down\n");
        assert_eq!(reported_exit(&log), Some(143));
        assert_eq!(reported_exit("no report"), None);
    }

    #[test]
    fn init_runs_the_workload_and_reports_its_exit() {
        let s = init_script("insmod /lib/modules/x.ko\n");
        assert!(s.starts_with("#!/bin/busybox sh\n") && s.contains("insmod /lib/modules/x.ko"));
        assert!(s.contains(&format!("mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {ROOTFS_TAG}")));
        assert!(s.contains(". /oak/run.sh\noak_app &") && s.contains(&format!("echo \"{EXITED}$code\"")));
        // the launch script is put in single quotes: it must hold none itself
        let launch = s.split("OAK_LAUNCH='").nth(1).unwrap().split("'\n. /oak/run.sh").next().unwrap();
        assert!(!launch.contains('\''), "{launch}");
    }
}
