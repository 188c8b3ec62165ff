//! A device: a [`Host`]'s network namespace plus a mount namespace of its own, so what runs inside sees the
//! file system a separate machine would. `/etc` and `/usr/local` are overlays on the machine's (writes stay
//! in the device; our own configuration and binaries are hidden, so only what a bundle installs is there),
//! `/run`, `/var/lib` and `/var/log` are empty tmpfs, `/sys` shows the device's network interfaces (the
//! machine's cgroup hierarchy, v1 or v2, is mounted again below it), and the device has its own bpffs (pinned maps do not collide). A device can run its own containerd.
//!
//! The mount namespace is kept alive by a bind mount of `/proc/<pid>/ns/mnt` (as `ip netns` does for
//! network namespaces); processes join it and the network namespace with `nsenter`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::run;
use crate::net::Host;
use crate::proc::Proc;

/// Paths of a bundle's binaries and configuration that a device must not inherit from the machine.
const HIDDEN: &[&str] = &[
    "/etc/netmanager",
    "/etc/oakestra-rs",
    "/etc/systemd/system/oak-root.service",
    "/etc/systemd/system/oak-cluster.service",
    "/etc/systemd/system/oak-netmanager.service",
    "/etc/systemd/system/oak-nodeengine.service",
    "/usr/local/bin/root-orchestrator",
    "/usr/local/bin/cluster-orchestrator",
    "/usr/local/bin/NodeEngine",
    "/usr/local/bin/NetManager",
    "/usr/local/bin/oak-image",
    "/usr/local/lib/oakestra-rs",
];

pub struct Device {
    pub name: String,
    pub ip: Ipv4Addr,
    netns: String,
    dir: PathBuf,
    /// The bind mounts that keep the mount and UTS namespaces.
    mnt: PathBuf,
    uts: PathBuf,
    logs: PathBuf,
    /// The device's containerd, when started: kept here so that it outlives everything else of the test
    /// and removes the instances when the device goes.
    containerd: Mutex<Option<Proc>>,
}

impl Device {
    /// Makes `host` a device; its private layers live under `dir`.
    pub fn new(host: &Host, dir: &Path) -> Result<Self> {
        let dir = dir.join(format!("device-{}", host.name));
        let holder = dir.join("ns");
        std::fs::create_dir_all(&holder)?;
        for d in ["etc", "usr-local"] {
            std::fs::create_dir_all(dir.join("upper").join(d))?;
            std::fs::create_dir_all(dir.join("work").join(d))?;
        }
        let h = holder.display().to_string();
        // a private mount to hold the namespace file (a bind onto a shared mount would propagate)
        run(&["mount", "--bind", &h, &h])?;
        run(&["mount", "--make-private", &h])?;
        let (mnt, uts) = (holder.join("mnt"), holder.join("uts"));
        File::create(&mnt)?;
        File::create(&uts)?;
        let dev = Device {
            name: host.name.clone(),
            ip: host.ip,
            netns: crate::netns_path(&host.ns).display().to_string(),
            dir: dir.clone(),
            mnt,
            uts,
            logs: dir.parent().unwrap_or(&dir).to_path_buf(),
            containerd: Mutex::new(None),
        };
        // its own host name too (the NodeEngine names its worker after it)
        run(&[
            "unshare",
            &format!("--mount={}", dev.mnt.display()),
            &format!("--uts={}", dev.uts.display()),
            "--propagation",
            "private",
            "hostname",
            &host.name,
        ])
        .context("creating the device's mount and UTS namespaces")?;
        let d = dir.display();
        let mut script = format!(
            "set -e
            mkdir -p {d}/cgroup
            mount --rbind /sys/fs/cgroup {d}/cgroup
            mount -t sysfs sysfs /sys
            mount --move {d}/cgroup /sys/fs/cgroup
            mount -t bpf bpf /sys/fs/bpf
            for p in /run /var/lib /var/log; do mount -t tmpfs -o mode=0755 tmpfs $p; done
            mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/upper/etc,workdir={d}/work/etc /etc
            mount -t overlay overlay -o lowerdir=/usr/local,upperdir={d}/upper/usr-local,workdir={d}/work/usr-local /usr/local
            rm -rf"
        );
        for p in HIDDEN {
            script.push(' ');
            script.push_str(p);
        }
        script.push_str(&format!("\necho {} > /etc/hostname\n", host.name));
        dev.sh(&script).context("setting up the device's file system")?;
        Ok(dev)
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns))
            .arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--uts={}", self.uts.display()))
            .arg("--");
        c
    }

    /// Runs a shell script inside the device; its stdout, or an error with its stderr.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.nsenter().args(["sh", "-c", script]).output()?;
        if !out.status.success() {
            bail!(
                "on device {}: `{}` failed: {}{}",
                self.name,
                script.trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Reads a file of the device.
    pub fn read(&self, path: &str) -> Result<String> {
        self.sh(&format!("cat '{path}'"))
    }

    /// Writes a file of the device (creating its directory).
    pub fn write(&self, path: &str, text: &str) -> Result<()> {
        let tmp = self.dir.join("incoming");
        std::fs::write(&tmp, text)?;
        self.sh(&format!("mkdir -p \"$(dirname '{path}')\" && cp '{}' '{path}'", tmp.display())).map(|_| ())
    }

    /// Starts `program` inside the device (its output in `<device>-<name>.log`).
    pub fn spawn(&self, name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let log = self.logs.join(format!("{}-{name}.log", self.name));
        let mut cmd = self.nsenter();
        cmd.arg(program).args(args).env_clear();
        cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::start(format!("{name}@{}", self.name), cmd, log, &format!("{program} on device {}", self.name))
    }

    /// Starts an installed systemd unit the way systemd would: its `EnvironmentFile` (a leading `-` makes it
    /// optional), then its `ExecStart`.
    pub fn start_unit(&self, unit: &str) -> Result<Proc> {
        let text = self.read(&format!("/etc/systemd/system/{unit}"))?;
        let mut prelude = String::from("set -a; ");
        let mut exec = None;
        for line in text.lines() {
            if let Some(f) = line.strip_prefix("EnvironmentFile=") {
                match f.strip_prefix('-') {
                    Some(f) => prelude.push_str(&format!("[ -f {f} ] && . {f}; ")),
                    None => prelude.push_str(&format!(". {f}; ")),
                }
            } else if let Some(e) = line.strip_prefix("ExecStart=") {
                exec = Some(e.to_string());
            }
        }
        let exec = exec.with_context(|| format!("{unit} has no ExecStart"))?;
        let script = format!("{prelude}set +a; exec {exec}");
        let name = unit.trim_end_matches(".service");
        self.spawn(name, "sh", &["-c", &script], &[("RUST_LOG", "info")])
    }

    /// Starts containerd inside the device (its state in the device's /run and /var/lib) and waits for it.
    /// It runs until the device is dropped.
    pub fn start_containerd(&self) -> Result<()> {
        let p = self.spawn("containerd", "containerd", &[], &[])?;
        *self.containerd.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        crate::wait_for("containerd on the device", Duration::from_secs(30), || {
            self.sh("ctr version").ok().map(|_| ())
        });
        Ok(())
    }

    /// The inode of the device's mount namespace.
    fn mnt_ino(&self) -> Option<u64> {
        std::fs::metadata(&self.mnt).ok().map(|m| m.ino())
    }

    /// Pids of the processes in the device (its mount namespace).
    pub fn pids(&self) -> Vec<i32> {
        let Some(ino) = self.mnt_ino() else { return Vec::new() };
        let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() == ino))
            .collect()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // instances first, while containerd runs (their processes live in namespaces of their own), then
        // everything in the device
        let _ = self.sh("for ns in $(ctr namespaces ls -q 2>/dev/null); do
               for t in $(ctr -n $ns tasks ls -q 2>/dev/null); do
                 ctr -n $ns tasks kill -s SIGKILL $t; ctr -n $ns tasks rm -f $t; ctr -n $ns containers rm $t
               done
             done 2>/dev/null");
        drop(self.containerd.lock().unwrap_or_else(|e| e.into_inner()).take());
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = run(&["umount", &self.mnt.display().to_string()]);
        let _ = run(&["umount", &self.uts.display().to_string()]);
        let _ = run(&["umount", "-l", &self.dir.join("ns").display().to_string()]);
    }
}
