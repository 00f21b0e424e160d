//! Loopback traffic with random addresses and ports that triggers the
//! guess probes. Everything stays on `lo`: IPv4 uses random addresses of
//! 127.0.0.0/8; IPv6 uses random ULA addresses added to `lo` for the
//! duration of the guessing (or IPv4-mapped loopback addresses when IPv6
//! is off on `lo`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrLike};

use crate::sys::trigger::{self as gsys, AddrOp};

use super::GuessError;

/// Lowest random port used.
const PORT_MIN: u16 = 20_000;
/// Highest random port used.
const PORT_MAX: u16 = 60_999;
/// Attempts to find a free random port.
const BIND_ATTEMPTS: u32 = 32;
/// How long a freshly added IPv6 address may stay unusable (tentative).
const ADDR_READY_WAIT: Duration = Duration::from_secs(2);
/// Pause between bind attempts on a tentative address.
const ADDR_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Prefix length of the guessing addresses (host routes).
const HOST_PREFIX_V6: u32 = 128;
/// First byte of a locally assigned ULA (fd00::/8).
const ULA_FIRST_BYTE: u8 = 0xfd;
/// The loopback interface.
const LOOPBACK: &str = "lo";
/// IPPROTO_UDPLITE.
pub const IPPROTO_UDPLITE: i32 = 136;

/// A random port in [`PORT_MIN`, `PORT_MAX`].
pub fn random_port() -> u16 {
    fastrand::u16(PORT_MIN..=PORT_MAX)
}

/// A random address 127.a.b.c with a, b, c in 1..=254.
pub fn random_v4() -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        fastrand::u8(1..=254),
        fastrand::u8(1..=254),
        fastrand::u8(1..=254),
    )
}

/// A random unique local address fdxx:…, never ending in 0.
pub fn random_ula() -> Ipv6Addr {
    let mut b = [0u8; 16];
    fastrand::fill(&mut b);
    b[0] = ULA_FIRST_BYTE;
    b[15] |= 1;
    Ipv6Addr::from(b)
}

/// The exact-length socket address (`sockaddr_in` is 16 bytes,
/// `sockaddr_in6` 28: the kernel sees these lengths in `msg_namelen`).
enum Sa {
    V4(SockaddrIn),
    V6(SockaddrIn6),
}

impl Sa {
    fn of(a: SocketAddr) -> Sa {
        match a {
            SocketAddr::V4(v) => Sa::V4(SockaddrIn::from(v)),
            SocketAddr::V6(v) => Sa::V6(SockaddrIn6::from(v)),
        }
    }

    fn like(&self) -> &dyn SockaddrLike {
        match self {
            Sa::V4(a) => a,
            Sa::V6(a) => a,
        }
    }
}

fn sys_err(call: &'static str, what: String, errno: Errno) -> GuessError {
    GuessError::Sys(crate::sys::SysError::Guess { call, what, errno })
}

fn domain(ip: IpAddr) -> i32 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    }
}

/// Binds `fd` to `ip` and a random free port; waits for a tentative IPv6
/// address to become usable. Returns the bound address.
fn bind_random(fd: &OwnedFd, ip: IpAddr) -> Result<SocketAddr, GuessError> {
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        let a = SocketAddr::new(ip, random_port());
        match socket::bind(fd.as_raw_fd(), Sa::of(a).like()) {
            Ok(()) => return Ok(a),
            Err(Errno::EADDRINUSE) if attempts < BIND_ATTEMPTS => attempts += 1,
            Err(Errno::EADDRNOTAVAIL) if start.elapsed() < ADDR_READY_WAIT => {
                std::thread::sleep(ADDR_RETRY_PAUSE)
            }
            Err(e) => return Err(sys_err("bind", a.to_string(), e)),
        }
    }
}

/// A non-blocking TCP socket bound to `src_ip` that connected (or is
/// connecting) to `dst`. Nothing needs to listen: the probes fire when the
/// SYN is sent and the RST ends it. Close it by dropping it.
pub fn tcp_connect(src_ip: IpAddr, dst: SocketAddr) -> Result<(OwnedFd, SocketAddr), GuessError> {
    let fd =
        gsys::socket_with_protocol(domain(dst.ip()), libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
    let src = bind_random(&fd, src_ip)?;
    match socket::connect(fd.as_raw_fd(), Sa::of(dst).like()) {
        Ok(()) | Err(Errno::EINPROGRESS) | Err(Errno::ECONNREFUSED) => Ok((fd, src)),
        Err(e) => Err(sys_err("connect", dst.to_string(), e)),
    }
}

/// A UDP (or UDP-Lite, `protocol` [`IPPROTO_UDPLITE`]) socket bound to a
/// random port of `ip`; `no_check` turns IPv4 checksums off.
pub fn udp_socket(
    ip: IpAddr,
    protocol: i32,
    no_check: bool,
) -> Result<(OwnedFd, SocketAddr), GuessError> {
    let fd =
        gsys::socket_with_protocol(domain(ip), libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, protocol)?;
    if no_check {
        gsys::set_udp_no_check(fd.as_fd())?;
    }
    let a = bind_random(&fd, ip)?;
    Ok((fd, a))
}

/// A raw IPv4 socket of `protocol` bound to `ip` (needs CAP_NET_RAW).
pub fn raw_socket(ip: std::net::Ipv4Addr, protocol: i32) -> Result<OwnedFd, GuessError> {
    let fd = gsys::socket_with_protocol(
        libc::AF_INET,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        protocol,
    )?;
    let a = v4(ip, 0);
    socket::bind(fd.as_raw_fd(), Sa::of(a).like())
        .map_err(|e| sys_err("bind", a.to_string(), e))?;
    Ok(fd)
}

/// Sends `len` bytes from `fd` to `dst`.
pub fn send_to(fd: &OwnedFd, dst: SocketAddr, len: usize) -> Result<(), GuessError> {
    let mut buf = vec![0u8; len];
    fastrand::fill(&mut buf);
    socket::sendto(fd.as_raw_fd(), &buf, Sa::of(dst).like(), MsgFlags::empty())
        .map(|_| ())
        .map_err(|e| sys_err("sendto", dst.to_string(), e))
}

/// Drains a non-blocking socket's receive queue.
pub fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 2048];
    while socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).is_ok() {}
}

/// How IPv6 guessing addresses are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Mode {
    /// Random ULA addresses added to `lo` and removed afterwards.
    Ula,
    /// IPv4-mapped random loopback addresses (IPv6 off on `lo`).
    Mapped,
}

/// Random IPv6 addresses for the guesses; removes what it added on drop.
#[derive(Debug)]
pub struct V6Pool {
    mode: V6Mode,
    ifindex: u32,
    added: Vec<Ipv6Addr>,
}

impl V6Pool {
    /// A pool in `mode`.
    pub fn new(mode: V6Mode) -> Result<V6Pool, GuessError> {
        let ifindex = match mode {
            V6Mode::Ula => gsys::interface_index(LOOPBACK)?,
            V6Mode::Mapped => 0,
        };
        Ok(V6Pool {
            mode,
            ifindex,
            added: Vec::new(),
        })
    }

    /// The mode.
    pub fn mode(&self) -> V6Mode {
        self.mode
    }

    /// A fresh random local IPv6 address.
    pub fn fresh(&mut self) -> Result<Ipv6Addr, GuessError> {
        match self.mode {
            V6Mode::Mapped => Ok(random_v4().to_ipv6_mapped()),
            V6Mode::Ula => {
                let a = random_ula();
                gsys::ipv6_address(AddrOp::Add, self.ifindex, a, HOST_PREFIX_V6)?;
                self.added.push(a);
                Ok(a)
            }
        }
    }

    /// Addresses currently added to `lo`.
    pub fn added(&self) -> &[Ipv6Addr] {
        &self.added
    }
}

impl Drop for V6Pool {
    fn drop(&mut self) {
        for a in self.added.drain(..) {
            if let Err(e) = gsys::ipv6_address(AddrOp::Delete, self.ifindex, a, HOST_PREFIX_V6) {
                tracing::warn!(address = %a, error = %e, "cannot remove guessing address from lo");
            }
        }
    }
}

/// `SocketAddr` of an IPv6 address and port.
pub fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// `SocketAddr` of an IPv4 address and port.
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}
