//! The VM part of `cargo xtask bench deploy`: a unikernel (a Linux guest in the unikernel format, built by
//! `oak-image --linux-guest`) and a microVM (the bench's busybox image serving /www) deployed through the
//! REST API of the bench's 1-DOC stack, request -> RUNNING (the guest answers ARP at its overlay address),
//! under TCG and, where it can run guests, KVM. The baseline, in the same run: qemu booting the same guest
//! alone (same kernel, initramfs, command line, memory, accelerator; a user-mode network card for the
//! overlay) until the guest says its network is up. And the resident memory of each instance's qemu.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use testbed::in_netns;

use super::deploy::Stack;
use super::stats::{pct, rss_kb};
use crate::util::step;

/// What the test guest's init prints once eth0 is configured (`oak_node_engine::testguest::READY`).
const UNIKERNEL_READY: &str = "oak-guest: network ready";
/// What the microVM guest's init prints once eth0 is configured.
const MICROVM_READY: &str = "oak-microvm: network ready";
/// The guests' memory (MiB), in the SLA and for qemu alone.
const MEMORY_MB: u32 = 128;

/// Median and 95th percentile (ms).
#[derive(Debug, Clone, Copy)]
pub struct Times {
    pub median: f64,
    pub p95: f64,
}

impl Times {
    fn of(mut v: Vec<f64>) -> Self {
        Self { median: pct(&mut v, 0.5), p95: pct(&mut v, 0.95) }
    }
}

/// One kind of VM under one accelerator.
pub struct Row {
    pub kind: &'static str,
    pub accel: &'static str,
    /// REST API deploy -> RUNNING, or why it was not measured.
    pub deploy: Result<Times, String>,
    /// qemu alone booting the same guest, or why it was not measured.
    pub alone: Result<Times, String>,
    /// qemu's resident memory per instance (MiB, median), once RUNNING.
    pub rss_mib: f64,
}

fn kvm_openable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file())
}

/// Whether /boot holds a kernel (`vmlinuz-*`) to boot guests with.
fn has_kernel() -> bool {
    let entries = std::fs::read_dir("/boot").into_iter().flatten().flatten();
    entries.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
}

/// Runs the VM measurements on `stack` (its API at `api`, `auth` the Admin's header); `n` deployments per
/// kind and accelerator.
pub fn run(stack: &mut Stack, api: &str, auth: &str, bins: &Path, n: u32) -> anyhow::Result<Vec<Row>> {
    let Some(qemu) = find_qemu() else {
        step("no qemu-system-x86_64 in PATH: VMs not measured (cargo xtask setup installs it)");
        return Ok(Vec::new());
    };
    if !has_kernel() {
        step("no /boot/vmlinuz-*: VMs not measured (cargo xtask setup installs linux-image-amd64)");
        return Ok(Vec::new());
    }
    let work = stack.work.clone();
    step("building the Linux guest (unikernel format) beside the bench image (oak-image --linux-guest)");
    let out = Command::new(bins.join("oak-image"))
        .arg("--out-dir")
        .arg(work.join("img"))
        .args(["--name", "localhost/oak/bench:1", "--linux-guest"])
        .output()?;
    if !out.status.success() {
        bail!("oak-image --linux-guest: {}", String::from_utf8_lossy(&out.stderr));
    }
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let (image, guest) = match printed.lines().collect::<Vec<_>>()[..] {
        [i, g] => (i.to_string(), g.to_string()),
        _ => bail!("oak-image printed {printed:?}"),
    };
    let alone = work.join("alone");
    std::fs::create_dir_all(&alone)?;
    crate::util::sh(Command::new("tar").arg("-xzf").arg(&guest).arg("-C").arg(&alone))?;

    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
      "application_name":"benchvm","application_namespace":"bench","application_desc":"","microservices":[
        {"microserviceID":"","microservice_name":"uk","microservice_namespace":"bench","virtualization":"unikernel",
         "code":guest,"memory":MEMORY_MB,"vcpus":1},
        {"microserviceID":"","microservice_name":"mvm","microservice_namespace":"bench","virtualization":"microvm",
         "code":format!("oci-archive:{image}"),"cmd":["httpd","-f","-p","8080","-h","/www"],"memory":MEMORY_MB,"vcpus":1}]}]});
    let (a, h) = (api.to_string(), auth.to_string());
    let sids: Vec<String> = in_netns(&stack.ns, move || -> anyhow::Result<Vec<String>> {
        let apps: Value =
            ureq::post(&format!("{a}/api/application")).set("Authorization", &h).send_json(sla)?.into_json()?;
        let app =
            apps.as_array().into_iter().flatten().find(|x| x["application_name"] == "benchvm").context("no app")?;
        let ids: Vec<String> = app["microservices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let mut by_name = Vec::new();
        for name in ["uk", "mvm"] {
            let id = ids
                .iter()
                .find(|id| {
                    ureq::get(&format!("{a}/api/service/{id}"))
                        .set("Authorization", &h)
                        .call()
                        .ok()
                        .and_then(|r| r.into_json::<Value>().ok())
                        .is_some_and(|s| s["microservice_name"] == name)
                })
                .with_context(|| format!("no service {name}"))?;
            by_name.push(id.clone());
        }
        Ok(by_name)
    })??;

    let captured = work.join("alone-microvm");
    // the kernel and command line each kind of guest was given by the NodeEngine, for qemu alone
    let mut booted: std::collections::HashMap<&str, (String, String)> = std::collections::HashMap::new();
    let mut rows = Vec::new();
    for (accel, flag) in [("TCG", "tcg"), ("KVM", "kvm")] {
        if flag == "kvm" && !kvm_openable() {
            for kind in ["unikernel", "microVM"] {
                let why = "no usable /dev/kvm".to_string();
                rows.push(Row { kind, accel, deploy: Err(why.clone()), alone: Err(why), rss_mib: f64::NAN });
            }
            continue;
        }
        let log = work.join("nodeengine.log");
        let registered =
            || std::fs::read_to_string(&log).unwrap_or_default().matches("registered with the cluster").count();
        let before = registered();
        stack.restart_nodeengine(&["--vm-accel", flag])?;
        let t = Instant::now();
        while registered() <= before {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the NodeEngine (--vm-accel {flag}) did not register within 60 s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (kind, sid) in [("unikernel", &sids[0]), ("microVM", &sids[1])] {
            step(&format!("{kind} under {accel}: {n} deployments through the REST API"));
            let mut times = Vec::new();
            let mut rss = Vec::new();
            let mut failed = None;
            for k in 1..=n {
                match deploy_once(&stack.ns, api, auth, sid) {
                    Ok((ms, num)) => {
                        times.push(ms);
                        let (pid, args) = running_qemu(&work.join("ne")).unwrap_or_default();
                        rss.push(if pid == 0 { 0.0 } else { rss_kb(pid) as f64 / 1024.0 });
                        if kind == "microVM" && !captured.exists() {
                            capture_microvm(&work.join("ne").join("microvms"), &captured)?;
                        }
                        let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
                        if let (Some(kernel), Some(append)) = (arg("-kernel"), arg("-append")) {
                            booted.insert(kind, (kernel.clone(), alone_append(append)));
                        }
                        eprintln!("    deployment {k}/{n}: {ms:.0} ms, qemu RSS {:.1} MiB", rss.last().unwrap());
                        undeploy(&stack.ns, api, auth, sid, num)?;
                    }
                    Err(e) => {
                        eprintln!("    {kind} under {accel} not measured: {e:#}");
                        failed = Some(format!("{e:#}").lines().next().unwrap_or_default().to_string());
                        // whatever is left of it goes before the next kind
                        let _ = undeploy(&stack.ns, api, auth, sid, 0);
                        break;
                    }
                }
            }
            let deploy = match failed {
                Some(why) => Err(why),
                None => Ok(Times::of(times)),
            };
            let mut rss_sorted = rss;
            let rss_mib = pct(&mut rss_sorted, 0.5);
            step(&format!("{kind} under {accel}: qemu alone booting the same guest {n} times"));
            let kvm = flag == "kvm";
            // a command line taken from a TCG guest: under KVM the guest has kvm-clock, no TSC hint
            let guest = booted.get(kind).map(|(kernel, a)| {
                let words = a.split_whitespace().filter(|w| !(kvm && w.starts_with("tsc_early_khz=")));
                (Path::new(kernel), words.collect::<Vec<_>>().join(" "))
            });
            let alone_r = match (kind, guest) {
                (_, None) => Err(format!("no {kind} ran to take its kernel and command line from")),
                ("unikernel", Some((_, a))) => {
                    boot_alone(&qemu, &unikernel_alone_args(&alone, &a), UNIKERNEL_READY, kvm, n, &work)
                }
                (_, Some((kernel, a))) => {
                    boot_alone(&qemu, &microvm_alone_args(kernel, &captured, &a), MICROVM_READY, kvm, n, &work)
                }
            };
            rows.push(Row { kind, accel, deploy, alone: alone_r, rss_mib });
        }
    }
    Ok(rows)
}

/// Deploys an instance of `sid` and waits until it is RUNNING: (ms, instance number).
fn deploy_once(ns: &str, api: &str, auth: &str, sid: &str) -> anyhow::Result<(f64, u64)> {
    let (a, h, sid) = (api.to_string(), auth.to_string(), sid.to_string());
    in_netns(ns, move || -> anyhow::Result<(f64, u64)> {
        let t = Instant::now();
        let r: Value =
            ureq::post(&format!("{a}/api/service/{sid}/instance")).set("Authorization", &h).call()?.into_json()?;
        let num = r["instance_number"].as_u64().context("no instance number")?;
        super::deploy::wait_running(&a, &h, &sid, num, Duration::from_secs(240))?;
        Ok((t.elapsed().as_secs_f64() * 1e3, num))
    })?
}

/// Undeploys every instance of `sid` (`num` first) and waits until none is left.
fn undeploy(ns: &str, api: &str, auth: &str, sid: &str, num: u64) -> anyhow::Result<()> {
    let (a, h, sid) = (api.to_string(), auth.to_string(), sid.to_string());
    in_netns(ns, move || -> anyhow::Result<()> {
        let list = |a: &str| -> anyhow::Result<Vec<u64>> {
            let v: Value = ureq::get(&format!("{a}/api/service/{sid}")).set("Authorization", &h).call()?.into_json()?;
            Ok(v["instance_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["instance_number"].as_u64())
                .collect())
        };
        let mut nums = list(&a)?;
        nums.sort_by_key(|x| *x != num);
        for k in nums {
            let _ = ureq::delete(&format!("{a}/api/service/{sid}/instance/{k}")).set("Authorization", &h).call();
        }
        let t = Instant::now();
        while !list(&a)?.is_empty() {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("undeploy did not finish within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })?
}

/// The qemu running a VM of the NodeEngine whose data is under `ne_dir`: its pid and arguments.
fn running_qemu(ne_dir: &Path) -> Option<(u32, Vec<String>)> {
    let needle = ne_dir.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let c = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = c.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
        (args.iter().any(|a| a.contains("qemu-system")) && args.iter().any(|a| a.contains(&needle)))
            .then_some((pid, args))
    })
}

/// A guest's kernel command line for qemu alone: its overlay address replaced by qemu's user-mode network.
fn alone_append(append: &str) -> String {
    append
        .split_whitespace()
        .filter(|w| !w.starts_with("oak.mac=") && !w.starts_with("netdev."))
        .map(|w| match w.split_once('=') {
            Some(("oak.ip", _)) => "oak.ip=10.0.2.15/24".to_string(),
            Some(("oak.gw", _)) => "oak.gw=10.0.2.2".to_string(),
            Some(("oak.mtu", _)) => "oak.mtu=1500".to_string(),
            _ => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Copies the running microVM's initramfs and root filesystem to `to` (for qemu alone).
fn capture_microvm(vms: &Path, to: &Path) -> anyhow::Result<()> {
    let vm = std::fs::read_dir(vms)?.flatten().next().context("no microVM directory")?.path();
    std::fs::create_dir_all(to.join("rootfs"))?;
    std::fs::copy(vm.join("initrd.cpio"), to.join("initrd.cpio"))?;
    crate::util::sh(Command::new("cp").arg("-a").arg(vm.join("rootfs").join(".")).arg(to.join("rootfs")))?;
    Ok(())
}

fn common_args(console: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-m",
        &MEMORY_MB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-serial".into(), format!("file:{}", console.display())]);
    a
}

/// The unikernel guest booted alone: its kernel, initramfs and command line (`append`), on a user-mode
/// network card.
/// qemu's arguments for a boot whose console goes to the given file.
type BootArgs = Box<dyn Fn(&Path) -> Vec<String>>;

fn unikernel_alone_args(dir: &Path, append: &str) -> BootArgs {
    let (dir, append) = (dir.to_path_buf(), append.to_string());
    Box::new(move |console| {
        let mut a = common_args(console);
        a.extend(["-kernel".into(), dir.join("kernel").display().to_string()]);
        a.extend(["-initrd".into(), dir.join("initramfs.cpio").display().to_string()]);
        a.extend(["-netdev".into(), "user,id=n0".into(), "-device".into(), "virtio-net-pci,netdev=n0".into()]);
        a.extend(["-append".into(), append.clone()]);
        a
    })
}

/// The microVM booted alone: the kernel and command line (`append`) the NodeEngine gave it, the instance's
/// initramfs and a copy of its root.
fn microvm_alone_args(vmlinuz: &Path, captured: &Path, append: &str) -> BootArgs {
    let (vmlinuz, captured, append) = (vmlinuz.to_path_buf(), captured.to_path_buf(), append.to_string());
    Box::new(move |console| {
        let mut a: Vec<String> = vec!["-M".into(), "microvm".into()];
        a.extend(common_args(console));
        a.extend(["-kernel".into(), vmlinuz.display().to_string()]);
        a.extend(["-initrd".into(), captured.join("initrd.cpio").display().to_string()]);
        a.extend([
            "-fsdev".into(),
            format!("local,id=rootfs,path={},security_model=passthrough", captured.join("rootfs").display()),
            "-device".into(),
            "virtio-9p-device,fsdev=rootfs,mount_tag=rootfs".into(),
            "-netdev".into(),
            "user,id=n0".into(),
            "-device".into(),
            "virtio-net-device,netdev=n0".into(),
        ]);
        a.extend(["-append".into(), append.clone()]);
        a
    })
}

/// Boots qemu with `args` `n` times until its console shows `ready`: the times, or why not.
fn boot_alone(
    qemu: &Path,
    args: &dyn Fn(&Path) -> Vec<String>,
    ready: &str,
    kvm: bool,
    n: u32,
    work: &Path,
) -> Result<Times, String> {
    let mut times = Vec::new();
    for k in 1..=n {
        let console = work.join(format!("alone-console-{k}.log"));
        let _ = std::fs::remove_file(&console);
        let mut a = args(&console);
        a.extend(if kvm {
            ["-accel", "kvm", "-cpu", "host"].map(String::from).to_vec()
        } else {
            vec!["-accel".into(), "tcg".into()]
        });
        let t = Instant::now();
        let mut child = Command::new(qemu)
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
        let r = loop {
            if std::fs::read_to_string(&console).unwrap_or_default().contains(ready) {
                break Ok(t.elapsed().as_secs_f64() * 1e3);
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err);
                break Err(format!("qemu exited ({st}): {}", err.lines().next().unwrap_or_default()));
            }
            if t.elapsed() > Duration::from_secs(240) {
                break Err(format!("the guest did not say {ready:?} within 240 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.kill();
        let _ = child.wait();
        match r {
            Ok(ms) => {
                eprintln!("    boot {k}/{n}: {ms:.0} ms");
                times.push(ms);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Times::of(times))
}

/// Prints the VM rows under the deploy bench's figures.
pub fn print(rows: &[Row], n: u32) {
    if rows.is_empty() {
        return;
    }
    println!(
        "  VMs ({n} deployments each, {MEMORY_MB} MB, 1 vcpu): REST API deploy -> RUNNING (the guest answers ARP at its \
         overlay address) vs qemu alone booting the same guest until its network is up"
    );
    for r in rows {
        let t = |x: &Result<Times, String>| match x {
            Ok(t) => format!("median {:7.1} ms  p95 {:7.1} ms", t.median, t.p95),
            Err(e) => format!("not measured: {e}"),
        };
        let ratio = match (&r.deploy, &r.alone) {
            (Ok(d), Ok(a)) => format!("  ({:.2}x / {:.2}x alone)", d.median / a.median, d.p95 / a.p95),
            _ => String::new(),
        };
        let rss =
            if r.rss_mib.is_finite() { format!(", qemu RSS {:.1} MiB per instance", r.rss_mib) } else { String::new() };
        println!("    {:9} {}  deploy {}{ratio}{rss}", r.kind, r.accel, t(&r.deploy));
        println!("    {:9}      alone  {}", "", t(&r.alone));
    }
}

#[cfg(test)]
mod tests {
    use super::alone_append;

    #[test]
    fn the_guests_command_line_on_a_user_mode_network() {
        let a = "console=ttyS0 oak.ip=10.18.0.5/26 oak.gw=10.18.0.1 oak.mtu=1450 oak.mac=02:4f:0a:12:00:05 \
                 netdev.ipv4_addr=10.18.0.5 quiet tsc_early_khz=2000000";
        assert_eq!(
            alone_append(a),
            "console=ttyS0 oak.ip=10.0.2.15/24 oak.gw=10.0.2.2 oak.mtu=1500 quiet tsc_early_khz=2000000"
        );
    }
}
