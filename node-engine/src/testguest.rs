//! A Linux guest for unikernel tests, built offline from packages: Debian's kernel (`linux-image-*`,
//! installed by `cargo xtask setup`) and an initramfs with the static busybox, the kernel's virtio-net
//! modules and an init that configures `eth0` from the `oak.ip=`/`oak.gw=`/`oak.mtu=` kernel parameters
//! (as the NodeEngine passes them), says so on the console, and serves a page on port 8080. Packed as
//! the unikernel `code` format: a `.tar.gz` with `kernel` and `initramfs.cpio`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::testimage::{append_file, BUSYBOX};

/// What the guest prints on its console once its network is configured.
pub const READY: &str = "oak-guest: network ready";

/// The modules that give the guest its virtio-net device, by name; their dependencies are added from
/// `modules.dep`.
const MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

/// The newest kernel in /boot with its modules: (vmlinuz, modules directory).
pub fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = Path::new("/usr/lib/modules").join(&version);
            modules.join("modules.dep").exists().then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
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

/// Writes `<dir>/<name>.tar.gz` holding the kernel and an initramfs whose httpd serves `page` as
/// `/index.html`; answers its path.
pub fn build_linux_guest(dir: &Path, name: &str, page: &str) -> Result<PathBuf> {
    let (vmlinuz, modules) =
        find_kernel().context("no kernel in /boot with its modules (apt install linux-image-amd64; xtask setup)")?;
    let dep = std::fs::read_to_string(modules.join("modules.dep"))?;
    let order = load_order(&dep, &MODULES)?;
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        ("bin/busybox".into(), std::fs::read(BUSYBOX).with_context(|| format!("{BUSYBOX} (busybox-static)"))?, 0o755),
        ("www/index.html".into(), page.as_bytes().to_vec(), 0o644),
    ];
    let mut insmod = String::new();
    for m in &order {
        let base = Path::new(m).file_name().unwrap_or_default().to_string_lossy().to_string();
        files.push((format!("lib/modules/{base}"), std::fs::read(modules.join(m))?, 0o644));
        insmod.push_str(&format!("insmod /lib/modules/{base} || echo \"oak-guest: insmod {base} failed\"\n"));
    }
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
{insmod}for a in $(cat /proc/cmdline); do
  case $a in oak.ip=*) IP=${{a#oak.ip=}};; oak.gw=*) GW=${{a#oak.gw=}};; oak.mtu=*) MTU=${{a#oak.mtu=}};; esac
done
ip link set lo up
if [ -n "$IP" ]; then
  ip link set eth0 mtu "${{MTU:-1500}}" up && ip addr add "$IP" dev eth0 && ip route add default via "$GW" \
    && echo "{READY} eth0 $IP via $GW"
fi
exec httpd -f -p 8080 -h /www
"#
    );
    files.push(("init".into(), init.into_bytes(), 0o755));
    let cpio = newc(&files, &["bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp", "www"]);
    let kernel = std::fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let mut t = tar::Builder::new(Vec::new());
    append_file(&mut t, "kernel", &kernel, 0o644)?;
    append_file(&mut t, "initramfs.cpio", &cpio, 0o644)?;
    let tar = t.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar)?;
    let out = dir.join(format!("{name}.tar.gz"));
    std::fs::write(&out, gz.finish()?)?;
    Ok(out)
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs: `dirs`, then `files`
/// (path, content, mode), then the trailer.
fn newc(files: &[(String, Vec<u8>, u32)], dirs: &[&str]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_dependencies_first() {
        let dep = "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
                   kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
                   kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
                   kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let names: Vec<String> = load_order(dep, &MODULES)
            .unwrap()
            .iter()
            .map(|m| Path::new(m).file_stem().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
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
}
