//! System call boundary: every syscall, ioctl and mmap of the daemon.
//!
//! Everything that talks to the kernel goes through this module so that the
//! rest of the daemon is safe code and can be tested without privileges:
//!
//! * the [`Sys`] trait covers what the perf ring reader needs
//!   (`perf_event_open`, the `PERF_EVENT_IOC_*` ioctls, mmap of rings, poll,
//!   `clock_gettime`). [`RealSys`] issues the real syscalls; `fake::FakeSys`
//!   (built for tests and with the `test-util` feature) is an in-memory
//!   stand-in whose rings are written by a test producer.
//!   The ring reader is generic over it (`Rings<S: Sys = RealSys>`).
//! * free functions cover the rest: mounting tracefs, capability checks,
//!   clock reads, CPU pinning, thread ids.
//!
//! Errors carry the syscall name, the errno and, for perf events, the
//! tracefs event id and CPU.
//!
//! One file per concern:
//!
//! | module | what |
//! | --- | --- |
//! | `perf` | the [`Sys`] trait, perf event configuration, [`RealSys`] |
//! | `ring_map` | the mapped ring pages ([`RingMap`]) and the page size |
//! | `clock` | `clock_gettime` |
//! | `mount` | mounting and unmounting tracefs |
//! | `caps` | effective capabilities |
//! | `thread` | CPU pinning and thread ids |
//! | `malloc` | the C allocator's trim and mmap thresholds |
//! | [`node`] | `uname` and the interface addresses (the node's facts) |
//! | [`trigger`] | sockets, addresses and credential changes that trigger the offset guesser's probes |
//! | [`packet`] | AF_PACKET capture sockets |
//! | `fake` | the in-memory kernel for tests and benchmarks |

mod caps;
mod clock;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod malloc;
mod mount;
pub mod node;
pub mod packet;
mod perf;
mod ring_map;
mod thread;
pub mod trigger;

use std::os::fd::RawFd;
use std::path::PathBuf;

use nix::errno::Errno;

pub use caps::{
    effective_capabilities, has_capability, parse_cap_eff, CAP_NET_ADMIN, CAP_PERFMON,
    CAP_SYS_ADMIN,
};
pub use clock::clock_gettime_ns;
pub use malloc::tune_allocator;
pub use mount::{mount_fs, umount};
pub use perf::{PerfEventConfig, RealSys, Sys, Wakeup};
pub use ring_map::{page_size, RingMap};
pub use thread::{current_tid, pin_current_thread};

/// A failed system call.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// `perf_event_open` failed for one event on one CPU.
    #[error("perf_event_open(tracepoint id {event_id}, cpu {cpu}): {errno}")]
    PerfEventOpen {
        /// tracefs event id.
        event_id: u64,
        /// CPU the event was opened on.
        cpu: u32,
        /// The error.
        errno: Errno,
    },
    /// An ioctl on a perf event fd failed.
    #[error("ioctl {request} on perf fd {fd}: {errno}")]
    Ioctl {
        /// Name of the request (`PERF_EVENT_IOC_ID`, ...).
        request: &'static str,
        /// The fd.
        fd: RawFd,
        /// The error.
        errno: Errno,
    },
    /// mmap of a perf ring failed.
    #[error("mmap of {len} bytes on perf fd {fd}: {errno}")]
    Mmap {
        /// The fd.
        fd: RawFd,
        /// Requested length.
        len: usize,
        /// The error.
        errno: Errno,
    },
    /// The kernel's ring metadata is inconsistent.
    #[error("perf ring on fd {fd}: {what}")]
    RingLayout {
        /// The fd.
        fd: RawFd,
        /// What is wrong.
        what: String,
    },
    /// poll failed.
    #[error("poll on {nfds} fds: {errno}")]
    Poll {
        /// Number of fds polled.
        nfds: usize,
        /// The error.
        errno: Errno,
    },
    /// clock_gettime failed.
    #[error("clock_gettime(clock id {clock}): {errno}")]
    ClockGettime {
        /// The clock id.
        clock: libc::clockid_t,
        /// The error.
        errno: Errno,
    },
    /// mount failed.
    #[error("mount {fstype} on {target}: {errno}")]
    Mount {
        /// Filesystem type.
        fstype: String,
        /// Mount point.
        target: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// umount failed.
    #[error("umount {target}: {errno}")]
    Umount {
        /// Mount point.
        target: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// sched_setaffinity failed.
    #[error("sched_setaffinity(cpu {cpu}): {errno}")]
    SetAffinity {
        /// The CPU.
        cpu: u32,
        /// The error.
        errno: Errno,
    },
    /// A procfs/sysfs file could not be read or parsed.
    #[error("reading {path}: {what}")]
    ProcFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// A socket, address or credential call of the offset guesser failed.
    #[error("{call}({what}): {errno}")]
    Guess {
        /// The system call or ioctl.
        call: &'static str,
        /// Its arguments, for the message.
        what: String,
        /// The error.
        errno: Errno,
    },
}
