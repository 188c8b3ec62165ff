//! UDP segmentation offloads for the tunnel socket: send a run of equal-sized datagrams to one worker with
//! one `sendmsg` (UDP_SEGMENT), receive coalesced runs with one `recvmsg` (UDP_GRO). Both are optional:
//! callers fall back to one datagram per syscall when the kernel refuses.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;

/// Ask the kernel to hand coalesced datagram runs to this socket (a `gso_size` comes with each read).
pub fn enable_gro(fd: RawFd) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: fd is a socket; the option value is a c_int of the given size
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            UDP_GRO,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Sets the receive and send buffers of socket `fd` to `bytes`: `SO_*BUFFORCE` first (root may exceed the
/// system's limit), the plain option when that is refused.
pub fn socket_buffers(fd: RawFd, bytes: libc::c_int) {
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let set = |opt| {
            // SAFETY: fd is a live socket, the value is a c_int of the size passed
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &bytes as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            let _ = set(plain);
        }
    }
}

fn sockaddr(to: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = to.port().to_be();
    sa.sin_addr.s_addr = u32::from(*to.ip()).to_be();
    sa
}

/// One `sendmsg` to `to` of the concatenation of `parts` (one iovec each, gathered by the kernel), cut by the
/// kernel into datagrams of `seg` bytes (the last may be shorter; parts need not align with datagrams).
pub fn send_segments(fd: RawFd, parts: &[&[u8]], seg: u16, to: SocketAddrV4) -> io::Result<usize> {
    let mut sa = sockaddr(to);
    let mut iov: Vec<libc::iovec> =
        parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }).collect();
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr/cmsg built per cmsg(3): the control buffer is large enough for CMSG_SPACE(2); the
    // iovecs point into `parts`, alive for the call
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut sa as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        let n = libc::sendmsg(fd, &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// One `recvmsg`: (bytes, source, gso_size when the kernel coalesced a run of datagrams).
pub fn recv_segments(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr/cmsg per cmsg(3); the kernel writes at most msg_namelen / msg_controllen bytes
    unsafe {
        let mut sa: libc::sockaddr_storage = zeroed();
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut sa as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let from = if sa.ss_family as libc::c_int == libc::AF_INET {
            let sin = &*(&sa as *const _ as *const libc::sockaddr_in);
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let mut gso = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if v > 0 {
                    gso = Some(v as usize);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, from, gso))
    }
}
