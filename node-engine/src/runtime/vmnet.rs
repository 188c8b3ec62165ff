//! A VM's network, wired like a container's. A holder process (`sleep infinity`) owns a network namespace
//! of its own; the NetManager wires that namespace as it wires a container (its pid in the deploy
//! request): `eth0` with the instance's overlay address, MAC, MTU and default route. Inside it, a tap for
//! the VM's virtio-net device is joined to `eth0` by two tc redirects (u32 match-all, mirred), Kata's
//! "tcfilter" model: every frame that reaches `eth0` goes to the guest and back, so the guest takes
//! `eth0`'s address, MAC and MTU (given on its kernel command line) and both datapaths treat it as any
//! instance. qemu joins the namespace when it starts.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// The tap's name inside the VM's namespace.
pub const TAP: &str = "tap0";
/// The holder's pid, in the VM's directory.
const HOLDER_FILE: &str = "netns-holder.pid";

/// What the guest configures on its network device: the address, prefix, gateway, MAC and MTU the
/// NetManager gave the namespace's `eth0`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub mtu: u32,
}

impl GuestNet {
    /// Kernel command line parameters that carry it: `oak.ip=<ip>/<prefix> oak.gw= oak.mtu= oak.mac=`
    /// for an init that configures the device, and Unikraft's `netdev.ipv4_*` names for unikernels built
    /// with lwip.
    pub fn kernel_args(&self) -> Vec<String> {
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0));
        vec![
            format!("oak.ip={}/{}", self.ip, self.prefix),
            format!("oak.gw={}", self.gateway),
            format!("oak.mtu={}", self.mtu),
            format!("oak.mac={}", self.mac),
            format!("netdev.ipv4_addr={}", self.ip),
            format!("netdev.ipv4_gw_addr={}", self.gateway),
            format!("netdev.ipv4_subnet_mask={mask}"),
        ]
    }

    /// qemu's network device (`device`: `virtio-net-pci`, or `virtio-net-device` on virtio-mmio) on the
    /// tap, with `eth0`'s MAC.
    pub fn qemu_args(&self, device: &str) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("tap,id=oaknet,ifname={TAP},script=no,downscript=no"),
            "-device".into(),
            format!("{device},netdev=oaknet,mac={}", self.mac),
        ]
    }
}

/// Starts the holder of a new network namespace for VM `id` (its pid recorded in `dir`); answers its pid.
pub fn spawn_holder(dir: &Path) -> anyhow::Result<u32> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new("sleep");
    cmd.arg("infinity").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: unshare(2) and setsid(2) are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the holder of the VM's network namespace (sleep infinity)")?;
    let pid = child.id();
    // not waited for: it lives as long as the VM, across NodeEngine restarts
    drop(child);
    std::fs::write(dir.join(HOLDER_FILE), pid.to_string())?;
    Ok(pid)
}

/// The holder recorded in `dir`, if it still runs.
pub fn holder(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(HOLDER_FILE)).ok()?.trim().parse().ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmd.starts_with(b"sleep\0infinity").then_some(pid)
}

/// Stops the holder recorded in `dir` (its namespace goes with the last process in it).
pub fn stop_holder(dir: &Path) {
    if let Some(pid) = holder(dir) {
        // SAFETY: plain kill(2) of the holder checked above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        // reap it when it is our child (a holder a NodeEngine restart re-adopted is reaped by init)
        // SAFETY: waitpid on a pid; WNOHANG-free wait for our own child only.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::__WALL) };
    }
}

/// Runs `args` inside the network namespace of `pid` (nsenter); answers stdout, or an error naming the
/// command and what it printed.
fn inside(pid: u32, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .args(args)
        .output()
        .with_context(|| format!("running nsenter {} (util-linux)", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} in the VM's network namespace: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads what the NetManager gave `eth0` in the holder's namespace, then adds the tap and the two
/// redirects. Answers what the guest must configure.
pub fn plumb(holder: u32) -> anyhow::Result<GuestNet> {
    let addr: Value = serde_json::from_str(&inside(holder, &["ip", "-j", "addr", "show", "dev", "eth0"])?)
        .context("ip -j addr: not JSON")?;
    let route: Value = serde_json::from_str(&inside(holder, &["ip", "-j", "-4", "route", "show", "default"])?)
        .context("ip -j route: not JSON")?;
    let net = guest_net(&addr, &route)?;
    inside(holder, &["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])?;
    inside(holder, &["ip", "link", "set", TAP, "mtu", &net.mtu.to_string(), "up"])?;
    for (from, to) in [("eth0", TAP), (TAP, "eth0")] {
        inside(holder, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
        inside(
            holder,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0",
                "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )
        .map_err(|e| anyhow!("{e:#} (the kernel needs cls_u32 and act_mirred)"))?;
    }
    Ok(net)
}

/// The guest's network from `ip -j addr show dev eth0` and `ip -j route show default`.
fn guest_net(addr: &Value, route: &Value) -> anyhow::Result<GuestNet> {
    let link = addr.get(0).context("no eth0 in the VM's network namespace (the NetManager did not wire it)")?;
    let inet = link["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["family"] == "inet"))
        .context("eth0 has no IPv4 address")?;
    let ip: Ipv4Addr = inet["local"].as_str().unwrap_or_default().parse().context("eth0's address")?;
    let prefix = inet["prefixlen"].as_u64().filter(|p| *p <= 32).context("eth0's prefix length")? as u8;
    let gateway: Ipv4Addr = route
        .get(0)
        .and_then(|r| r["gateway"].as_str())
        .context("no default route in the VM's network namespace")?
        .parse()
        .context("the default route's gateway")?;
    let mac = link["address"].as_str().context("eth0's MAC")?.to_string();
    let mtu = link["mtu"].as_u64().context("eth0's MTU")? as u32;
    Ok(GuestNet { ip, prefix, gateway, mac, mtu })
}

/// The ARP request "who has `guest`? tell `asker`", from `mac`, broadcast.
fn arp_request(mac: [u8; 6], asker: Ipv4Addr, guest: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&asker.octets());
    f[38..42].copy_from_slice(&guest.octets());
    f
}

/// Whether `frame` is an ARP reply from `guest`.
fn is_arp_reply_from(frame: &[u8], guest: Ipv4Addr) -> bool {
    frame.len() >= 42 && frame[12..14] == [8, 6] && frame[20..22] == [0, 2] && frame[28..32] == guest.octets()
}

/// How a wait for the guest ended.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// It answered ARP for its address, after this long.
    Answered(std::time::Duration),
    /// `gone()` said the VM ended first.
    Gone,
    /// Nothing within the time given.
    Silent,
}

/// Asks the guest for its own address (an ARP request on the tap, as from its gateway, every 250 ms)
/// until it answers, `gone()` says the VM ended, or `timeout` passes: the sign that the guest is up,
/// whatever its network stack. The frames are read from a packet socket on the tap inside the VM's
/// namespace, which sees the guest's frames before the redirect to `eth0` takes them.
pub fn wait_for_guest(
    holder: u32,
    net: &GuestNet,
    timeout: std::time::Duration,
    gone: impl Fn() -> bool + Send + 'static,
) -> anyhow::Result<Answer> {
    let (guest, asker) = (net.ip, net.gateway);
    let ns = format!("/proc/{holder}/ns/net");
    let h = oak_netns::spawn_in_netns(&ns, move || -> anyhow::Result<Answer> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let started = std::time::Instant::now();
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all)) };
        if fd < 0 {
            bail!("a packet socket in the VM's namespace: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no {TAP} in the VM's namespace");
        }
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below make it the tap's broadcast address.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let sll_ptr = &sll as *const libc::sockaddr_ll as *const libc::sockaddr;
        let sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: sll is a valid sockaddr_ll of the length given.
        if unsafe { libc::bind(sock.as_raw_fd(), sll_ptr, sll_len) } != 0 {
            bail!("binding to {TAP}: {}", std::io::Error::last_os_error());
        }
        let tick = libc::timeval { tv_sec: 0, tv_usec: 250_000 };
        // SAFETY: a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tick as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let request = arp_request([0x02, 0x4f, 0xff, 0xff, 0xff, 0xfe], asker, guest);
        let mut buf = [0u8; 2048];
        loop {
            if gone() {
                return Ok(Answer::Gone);
            }
            if started.elapsed() > timeout {
                return Ok(Answer::Silent);
            }
            // SAFETY: the request and the address are valid for the lengths given.
            let sent =
                unsafe { libc::sendto(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0, sll_ptr, sll_len) };
            if sent < 0 {
                bail!("sending ARP on {TAP}: {}", std::io::Error::last_os_error());
            }
            let round = std::time::Instant::now();
            while round.elapsed() < std::time::Duration::from_millis(250) {
                // SAFETY: buf is valid for its length.
                let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    break; // the receive timeout: ask again
                }
                if is_arp_reply_from(&buf[..n as usize], guest) {
                    return Ok(Answer::Answered(started.elapsed()));
                }
            }
        }
    })?;
    oak_netns::join(&ns, h)?
}

/// Joins the network namespace of `holder` before exec (for qemu's `pre_exec`): opens it now, enters it
/// in the child.
pub fn enter_before_exec(cmd: &mut tokio::process::Command, holder: u32) -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let ns: OwnedFd = std::fs::File::open(format!("/proc/{holder}/ns/net"))
        .with_context(|| format!("the VM's network namespace (holder pid {holder}) is gone"))?
        .into();
    // SAFETY: setns(2) is async-signal-safe; the fd stays open in the parent until the child has exec'd
    // (the closure owns it and the Command lives until spawn returns).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_guest_takes_eth0s_configuration() {
        let addr = json!([{"ifname": "eth0", "mtu": 1450, "address": "02:4f:0a:12:00:05",
            "addr_info": [{"family": "inet6", "local": "fe80::1", "prefixlen": 64},
                          {"family": "inet", "local": "10.18.0.5", "prefixlen": 26}]}]);
        let route = json!([{"dst": "default", "gateway": "10.18.0.1", "dev": "eth0"}]);
        let n = guest_net(&addr, &route).unwrap();
        assert_eq!(
            n,
            GuestNet {
                ip: "10.18.0.5".parse().unwrap(),
                prefix: 26,
                gateway: "10.18.0.1".parse().unwrap(),
                mac: "02:4f:0a:12:00:05".into(),
                mtu: 1450
            }
        );
        let k = n.kernel_args().join(" ");
        assert!(k.contains("oak.ip=10.18.0.5/26 oak.gw=10.18.0.1 oak.mtu=1450"), "{k}");
        assert!(k.contains("netdev.ipv4_subnet_mask=255.255.255.192"), "{k}");
        assert!(n
            .qemu_args("virtio-net-pci")
            .join(" ")
            .ends_with("virtio-net-pci,netdev=oaknet,mac=02:4f:0a:12:00:05"));
    }

    #[test]
    fn arp_request_and_reply() {
        let (gw, guest): (Ipv4Addr, Ipv4Addr) = ("10.18.0.1".parse().unwrap(), "10.18.0.5".parse().unwrap());
        let r = arp_request([2, 0x4f, 0xff, 0xff, 0xff, 0xfe], gw, guest);
        assert_eq!(&r[..6], &[0xff; 6]);
        assert_eq!(&r[12..22], &[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!((&r[28..32], &r[38..42]), (&gw.octets()[..], &guest.octets()[..]));
        assert!(!is_arp_reply_from(&r, guest), "a request is no answer");
        // the guest's answer: op 2, its address as the sender's
        let mut reply = r;
        reply[20..22].copy_from_slice(&[0, 2]);
        reply[28..32].copy_from_slice(&guest.octets());
        assert!(is_arp_reply_from(&reply, guest));
        assert!(!is_arp_reply_from(&reply, gw), "from another address");
        assert!(!is_arp_reply_from(&reply[..41], guest), "too short");
    }

    #[test]
    fn an_unwired_namespace_is_named() {
        let e = guest_net(&json!([]), &json!([])).unwrap_err().to_string();
        assert!(e.contains("NetManager did not wire it"), "{e}");
        let addr = json!([{"ifname": "eth0", "mtu": 1500, "address": "02:00:00:00:00:01", "addr_info": [
            {"family": "inet", "local": "10.18.0.5", "prefixlen": 26}]}]);
        let e = guest_net(&addr, &json!([])).unwrap_err().to_string();
        assert!(e.contains("no default route"), "{e}");
    }
}
