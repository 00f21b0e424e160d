//! System calls used only by the struct offset guesser (`probe::guess`) to
//! trigger the operations its probes record: loopback IPv6 addresses,
//! sockets with an explicit protocol number, UDP checksum switching and
//! per-thread credential changes.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::SysError;

/// Adds or removes an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrOp {
    /// `SIOCSIFADDR`.
    Add,
    /// `SIOCDIFADDR`.
    Delete,
}

/// Interface index of `name` (`if_nametoindex`).
pub fn interface_index(name: &str) -> Result<u32, SysError> {
    nix::net::if_::if_nametoindex(name).map_err(|errno| SysError::Guess {
        call: "if_nametoindex",
        what: name.to_string(),
        errno,
    })
}

/// Adds or removes the IPv6 address `addr/prefix_len` on interface
/// `ifindex` with the `SIOCSIFADDR`/`SIOCDIFADDR` ioctls on an AF_INET6
/// socket (no netlink or `ip` needed).
pub fn ipv6_address(
    op: AddrOp,
    ifindex: u32,
    addr: Ipv6Addr,
    prefix_len: u32,
) -> Result<(), SysError> {
    let (request, call) = match op {
        AddrOp::Add => (libc::SIOCSIFADDR, "ioctl SIOCSIFADDR"),
        AddrOp::Delete => (libc::SIOCDIFADDR, "ioctl SIOCDIFADDR"),
    };
    let what = format!("{addr}/{prefix_len} ifindex {ifindex}");
    let err = |errno| SysError::Guess {
        call,
        what: what.clone(),
        errno,
    };
    let fd = socket_with_protocol(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
    let req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: prefix_len,
        ifr6_ifindex: i32::try_from(ifindex).map_err(|_| err(Errno::EINVAL))?,
    };
    // SAFETY: `fd` is an open socket owned by this function; `req` is a
    // fully initialised in6_ifreq that outlives the call, and both
    // requests only read it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &req as *const libc::in6_ifreq) };
    if rc < 0 {
        return Err(err(Errno::last()));
    }
    Ok(())
}

/// `socket(domain, ty | SOCK_CLOEXEC, protocol)` with any protocol
/// number (nix has no constant for e.g. IPPROTO_UDPLITE).
pub fn socket_with_protocol(domain: i32, ty: i32, protocol: i32) -> Result<OwnedFd, SysError> {
    // SAFETY: plain syscall with integer arguments; the returned fd is
    // checked and then owned exactly once.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(SysError::Guess {
            call: "socket",
            what: format!("{domain}, {ty}, {protocol}"),
            errno: Errno::last(),
        });
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Turns off UDP checksums on an IPv4 UDP socket (`SO_NO_CHECK`).
pub fn set_udp_no_check(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), SysError> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a valid open descriptor for the duration of the
    // call; the option value is a c_int that outlives the call and its
    // exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(SysError::Guess {
            call: "setsockopt",
            what: "SOL_SOCKET, SO_NO_CHECK".into(),
            errno: Errno::last(),
        });
    }
    Ok(())
}

/// User and group ids to give the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadIds {
    /// Real, effective, saved and file-system group ids.
    pub gid: [u32; 4],
    /// Real, effective, saved and file-system user ids.
    pub uid: [u32; 4],
}

/// Changes the credentials of the calling thread only (raw syscalls; the
/// C library wrappers would change every thread of the process):
/// `setresgid`, `setfsgid`, `setresuid`, `setfsuid`, in that order. The
/// thread loses its privileges: call it from a thread that exits
/// afterwards.
pub fn set_thread_ids(ids: ThreadIds) -> Result<(), SysError> {
    let [rg, eg, sg, fsg] = ids.gid;
    let [ru, eu, su, fsu] = ids.uid;
    let calls: [(&'static str, libc::c_long, [u32; 3]); 2] = [
        ("setresgid", libc::SYS_setresgid, [rg, eg, sg]),
        ("setresuid", libc::SYS_setresuid, [ru, eu, su]),
    ];
    for (i, (call, nr, [a, b, c])) in calls.into_iter().enumerate() {
        // SAFETY: raw credential syscall with integer arguments; it only
        // affects the calling thread.
        let rc = unsafe { libc::syscall(nr, a, b, c) };
        if rc < 0 {
            return Err(SysError::Guess {
                call,
                what: format!("{a}, {b}, {c}"),
                errno: Errno::last(),
            });
        }
        let (fs_nr, fs_id) = if i == 0 {
            (libc::SYS_setfsgid, fsg)
        } else {
            (libc::SYS_setfsuid, fsu)
        };
        // SAFETY: as above. setfs[ug]id returns the previous id, never an
        // error; the caller checks the result through the trace.
        let _ = unsafe { libc::syscall(fs_nr, fs_id) };
    }
    Ok(())
}
