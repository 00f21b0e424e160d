//! AF_PACKET capture sockets (DNS capture): creation, classic BPF filter,
//! bind, receive and kernel drop statistics.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A classic BPF instruction, as `SO_ATTACH_FILTER` takes it.
pub type BpfInsn = libc::sock_filter;

/// Largest classic BPF program the kernel accepts (`BPF_MAXINSNS`).
pub const MAX_FILTER_INSNS: usize = 4096;

/// Errors of AF_PACKET socket operations.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// A system call failed.
    #[error("{call} on AF_PACKET socket failed: {source}")]
    Syscall {
        /// The failing call (and option, for setsockopt/getsockopt).
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The interface name could not be resolved to an index.
    #[error("network interface {name:?} not found: {source}")]
    Interface {
        /// The interface name as configured.
        name: String,
        /// The OS error from if_nametoindex.
        #[source]
        source: io::Error,
    },
    /// The interface name contains a NUL byte or is too long.
    #[error("invalid network interface name {name:?}")]
    InterfaceName {
        /// The interface name as configured.
        name: String,
    },
    /// The filter program is empty or longer than [`MAX_FILTER_INSNS`].
    #[error("classic BPF program has {len} instructions (allowed 1..={MAX_FILTER_INSNS})")]
    FilterLength {
        /// Number of instructions given.
        len: usize,
    },
}

/// Link-level framing of received packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `SOCK_RAW`: packets start with the link-layer header.
    Raw,
    /// `SOCK_DGRAM`: the link-layer header is removed; packets start at
    /// the network header and the protocol comes with the address.
    Cooked,
}

/// One received packet's metadata (the bytes are in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written to the buffer.
    pub captured: usize,
    /// Length of the packet as queued on the socket (after the filter's
    /// truncation); larger than `captured` when the buffer was too small.
    pub len: usize,
    /// Link-layer protocol in host order (ETH_P_IP, ETH_P_IPV6, ...).
    pub protocol: u16,
    /// Packet type (PACKET_HOST, PACKET_OUTGOING, ...).
    pub pkttype: u8,
    /// Index of the interface the packet was seen on.
    pub ifindex: i32,
}

/// Kernel counters of a packet socket since the previous read
/// (`PACKET_STATISTICS` resets them on every read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Statistics {
    /// Packets that passed the filter (including dropped ones).
    pub packets: u64,
    /// Packets dropped because the socket's receive queue was full.
    pub drops: u64,
}

/// Resolves an interface name to its index; `any` (or an empty name)
/// is index 0, meaning every interface.
pub fn interface_index(name: &str) -> Result<u32, PacketError> {
    if name.is_empty() || name == "any" {
        return Ok(0);
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(PacketError::InterfaceName {
            name: name.to_string(),
        });
    }
    let cname = CString::new(name).map_err(|_| PacketError::InterfaceName {
        name: name.to_string(),
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(PacketError::Interface {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// An AF_PACKET socket.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

fn syscall_err(call: &'static str) -> PacketError {
    PacketError::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

impl PacketSocket {
    /// Creates an AF_PACKET socket bound to no protocol, so that nothing
    /// is queued on it until [`PacketSocket::bind`]: attach the filter
    /// first and no unfiltered packet is ever delivered.
    pub fn open(framing: Framing) -> Result<Self, PacketError> {
        let ty = match framing {
            Framing::Raw => libc::SOCK_RAW,
            Framing::Cooked => libc::SOCK_DGRAM,
        };
        // SAFETY: plain socket(2) call with constant arguments; no pointers.
        let fd = unsafe { libc::socket(libc::AF_PACKET, ty | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(syscall_err("socket(AF_PACKET)"));
        }
        // SAFETY: `fd` was just returned by socket(2), is valid and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PacketSocket { fd })
    }

    /// Attaches a classic BPF program (`SO_ATTACH_FILTER`). The kernel
    /// copies and validates the program.
    pub fn attach_filter(&self, program: &[BpfInsn]) -> Result<(), PacketError> {
        if program.is_empty() || program.len() > MAX_FILTER_INSNS {
            return Err(PacketError::FilterLength { len: program.len() });
        }
        let prog = libc::sock_fprog {
            // Bounded by MAX_FILTER_INSNS above, so it fits in u16.
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points to `program`, which is valid for `len`
        // instructions for the duration of the call; the kernel only reads
        // it (copy_from_user) and the option length is the struct's size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(syscall_err("setsockopt(SO_ATTACH_FILTER)"));
        }
        Ok(())
    }

    /// Binds to `protocol` (an ETH_P_* value in host order, e.g.
    /// `ETH_P_ALL`) on interface `ifindex` (0 = every interface). From
    /// here on packets are queued.
    pub fn bind(&self, ifindex: u32, protocol: u16) -> Result<(), PacketError> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { MaybeUninit::zeroed().assume_init() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a fully initialised sockaddr_ll and the length
        // passed is its size; the kernel only reads it.
        let rc = unsafe {
            libc::bind(
                self.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(syscall_err("bind(AF_PACKET)"));
        }
        Ok(())
    }

    fn set_int_opt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
        call: &'static str,
    ) -> Result<(), PacketError> {
        // SAFETY: the option value is a c_int living on the stack for the
        // duration of the call, and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(syscall_err(call));
        }
        Ok(())
    }

    /// Sets the receive buffer size (`SO_RCVBUF`); the kernel doubles
    /// and caps it.
    pub fn set_recv_buffer(&self, bytes: usize) -> Result<(), PacketError> {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        self.set_int_opt(
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            value,
            "setsockopt(SO_RCVBUF)",
        )
    }

    /// Makes [`PacketSocket::recv`] return `Ok(None)` after `timeout`
    /// without a packet (`SO_RCVTIMEO`). A zero timeout blocks forever.
    pub fn set_recv_timeout(&self, timeout: Duration) -> Result<(), PacketError> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: `tv` is a valid timeval on the stack for the duration of
        // the call, and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(syscall_err("setsockopt(SO_RCVTIMEO)"));
        }
        Ok(())
    }

    /// Receives one packet into `buf` (`recvfrom` with `MSG_TRUNC`).
    /// Returns `Ok(None)` when the receive timeout expired or a signal
    /// interrupted the call.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<Received>, PacketError> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { MaybeUninit::zeroed().assume_init() };
        let mut addr_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `addr`
        // and `addr_len` are valid for writes and `addr_len` holds the
        // size of `addr`, so the kernel writes at most that much.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut addr_len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(PacketError::Syscall {
                    call: "recvfrom(AF_PACKET)",
                    source: err,
                }),
            };
        }
        // n >= 0 was checked above.
        let len = n as usize;
        Ok(Some(Received {
            captured: len.min(buf.len()),
            len,
            protocol: u16::from_be(addr.sll_protocol),
            pkttype: addr.sll_pkttype,
            ifindex: addr.sll_ifindex,
        }))
    }

    /// Reads and resets the kernel's counters (`PACKET_STATISTICS`).
    pub fn statistics(&self) -> Result<Statistics, PacketError> {
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are valid for writes, and `len` holds
        // the size of `stats`, so the kernel writes at most that much.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(syscall_err("getsockopt(PACKET_STATISTICS)"));
        }
        Ok(Statistics {
            packets: u64::from(stats.tp_packets),
            drops: u64::from(stats.tp_drops),
        })
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
