//! A Linux guest for unikernel tests, built offline from packages: Debian's kernel (`linux-image-*`,
//! installed by `cargo xtask setup`) and an initramfs with the static busybox, the kernel's virtio-net
//! modules and an init that configures `eth0` from the `oak.ip=`/`oak.gw=`/`oak.mtu=` kernel parameters
//! (as the NodeEngine passes them), says so on the console, and serves a page on port 8080. Packed as
//! the unikernel `code` format: a `.tar.gz` with `kernel` and `initramfs.cpio`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::runtime::guest::{load_order, newc, GuestKernel, BUSYBOX};
use crate::testimage::append_file;

/// What the guest prints on its console once its network is configured.
pub const READY: &str = "oak-guest: network ready";

/// The modules that give the guest its virtio-net device, by name; their dependencies are added from
/// `modules.dep`.
const MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

/// Writes `<dir>/<name>.tar.gz` holding the kernel and an initramfs whose httpd serves `page` as
/// `/index.html`; answers its path.
pub fn build_linux_guest(dir: &Path, name: &str, page: &str) -> Result<PathBuf> {
    let GuestKernel { vmlinuz, modules } = GuestKernel::newest()
        .context("no kernel in /boot with its modules (apt install linux-image-amd64; xtask setup)")?;
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
