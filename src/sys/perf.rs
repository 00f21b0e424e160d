//! Perf events: the [`Sys`] trait the ring reader is generic over, the
//! subset of `perf_event_attr` the daemon sets, and [`RealSys`], which
//! issues `perf_event_open`, the `PERF_EVENT_IOC_*` ioctls, the ring mmap
//! and `poll` on the real kernel.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

use nix::errno::Errno;
use perf_event_open_sys as perf;

use super::ring_map::{page_size, Backing, RingMap};
use super::{clock_gettime_ns, SysError};

/// Largest poll timeout in milliseconds (what fits `poll`'s `int`).
const MAX_POLL_TIMEOUT_MS: u128 = i32::MAX as u128;

/// How often the kernel wakes the ring reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// After this many samples (`wakeup_events`).
    Events(u32),
    /// After this many bytes are in the ring (`watermark` + `wakeup_watermark`).
    Bytes(u32),
}

/// The subset of `perf_event_attr` the daemon uses: one tracepoint sampled on
/// every hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerfEventConfig {
    /// tracefs event id (`events/<group>/<name>/id`), the attr's `config`.
    pub tracepoint_id: u64,
    /// `PERF_SAMPLE_*` bits.
    pub sample_type: u64,
    /// Clock for sample timestamps (`use_clockid`); `None` is the kernel's
    /// default perf clock.
    pub clockid: Option<libc::clockid_t>,
    /// Wakeup policy.
    pub wakeup: Wakeup,
}

/// The syscalls the perf ring reader needs. [`RealSys`] issues them;
/// `fake::FakeSys` simulates them in memory for tests and benchmarks.
pub trait Sys {
    /// An open perf event. Dropping it closes the event.
    type Fd: AsRawFd;

    /// `perf_event_open(attr, pid = -1, cpu, group_fd = -1, FD_CLOEXEC)`;
    /// the event starts disabled.
    fn perf_event_open(&self, config: &PerfEventConfig, cpu: u32) -> Result<Self::Fd, SysError>;
    /// `PERF_EVENT_IOC_ID`: the id the kernel puts in samples.
    fn perf_event_id(&self, fd: &Self::Fd) -> Result<u64, SysError>;
    /// `PERF_EVENT_IOC_SET_OUTPUT`: send `fd`'s samples to `target`'s ring.
    fn perf_event_set_output(&self, fd: &Self::Fd, target: &Self::Fd) -> Result<(), SysError>;
    /// `PERF_EVENT_IOC_ENABLE`.
    fn perf_event_enable(&self, fd: &Self::Fd) -> Result<(), SysError>;
    /// `PERF_EVENT_IOC_DISABLE`.
    fn perf_event_disable(&self, fd: &Self::Fd) -> Result<(), SysError>;
    /// `PERF_EVENT_IOC_SET_FILTER` with a tracefs filter expression.
    fn perf_event_set_filter(&self, fd: &Self::Fd, filter: &CStr) -> Result<(), SysError>;
    /// Maps the ring of `fd`: one metadata page and `data_pages` data pages
    /// (a power of two), read-write so the reader owns `data_tail`.
    fn mmap_ring(&self, fd: &Self::Fd, data_pages: usize) -> Result<RingMap, SysError>;
    /// Waits until one of `fds` is readable or `timeout` passes; sets
    /// `revents` and returns the number of ready fds. EINTR counts as 0.
    fn poll(&self, fds: &mut [libc::pollfd], timeout: Duration) -> Result<usize, SysError>;
    /// `clock_gettime(clock)` in nanoseconds.
    fn clock_gettime(&self, clock: libc::clockid_t) -> Result<u64, SysError>;
    /// The system page size.
    fn page_size(&self) -> usize;
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSys;

fn perf_ioctl_result(request: &'static str, fd: RawFd, rc: libc::c_int) -> Result<(), SysError> {
    if rc < 0 {
        Err(SysError::Ioctl {
            request,
            fd,
            errno: Errno::last(),
        })
    } else {
        Ok(())
    }
}

impl Sys for RealSys {
    type Fd = OwnedFd;

    fn perf_event_open(&self, config: &PerfEventConfig, cpu: u32) -> Result<OwnedFd, SysError> {
        let mut attr = perf::bindings::perf_event_attr {
            type_: perf::bindings::PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<perf::bindings::perf_event_attr>() as u32,
            config: config.tracepoint_id,
            sample_type: config.sample_type,
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = 1;
        attr.set_disabled(1);
        match config.wakeup {
            Wakeup::Events(n) => attr.__bindgen_anon_2.wakeup_events = n,
            Wakeup::Bytes(n) => {
                attr.set_watermark(1);
                attr.__bindgen_anon_2.wakeup_watermark = n;
            }
        }
        if let Some(clock) = config.clockid {
            attr.set_use_clockid(1);
            attr.clockid = clock;
        }
        let err = |errno| SysError::PerfEventOpen {
            event_id: config.tracepoint_id,
            cpu,
            errno,
        };
        let cpu_arg = libc::c_int::try_from(cpu).map_err(|_| err(Errno::EINVAL))?;
        // SAFETY: `attr` is a fully initialised perf_event_attr whose `size`
        // matches the struct; it asks for a disabled tracepoint sampling
        // event with no side effects on this process's memory.
        let fd = unsafe {
            perf::perf_event_open(
                &mut attr,
                -1,
                cpu_arg,
                -1,
                perf::bindings::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
            )
        };
        if fd < 0 {
            return Err(err(Errno::last()));
        }
        // SAFETY: `fd` was just returned by perf_event_open, is valid and
        // owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn perf_event_id(&self, fd: &OwnedFd) -> Result<u64, SysError> {
        let mut id = 0u64;
        // SAFETY: PERF_EVENT_IOC_ID writes one u64 through the pointer,
        // which points to a live local.
        let rc = unsafe { perf::ioctls::ID(fd.as_raw_fd(), &mut id) };
        perf_ioctl_result("PERF_EVENT_IOC_ID", fd.as_raw_fd(), rc)?;
        Ok(id)
    }

    fn perf_event_set_output(&self, fd: &OwnedFd, target: &OwnedFd) -> Result<(), SysError> {
        // SAFETY: both fds are open perf events; the ioctl takes an fd
        // number by value.
        let rc = unsafe { perf::ioctls::SET_OUTPUT(fd.as_raw_fd(), target.as_raw_fd()) };
        perf_ioctl_result("PERF_EVENT_IOC_SET_OUTPUT", fd.as_raw_fd(), rc)
    }

    fn perf_event_enable(&self, fd: &OwnedFd) -> Result<(), SysError> {
        // SAFETY: plain ioctl on an open perf fd with an integer argument.
        let rc = unsafe { perf::ioctls::ENABLE(fd.as_raw_fd(), 0) };
        perf_ioctl_result("PERF_EVENT_IOC_ENABLE", fd.as_raw_fd(), rc)
    }

    fn perf_event_disable(&self, fd: &OwnedFd) -> Result<(), SysError> {
        // SAFETY: plain ioctl on an open perf fd with an integer argument.
        let rc = unsafe { perf::ioctls::DISABLE(fd.as_raw_fd(), 0) };
        perf_ioctl_result("PERF_EVENT_IOC_DISABLE", fd.as_raw_fd(), rc)
    }

    fn perf_event_set_filter(&self, fd: &OwnedFd, filter: &CStr) -> Result<(), SysError> {
        // SAFETY: the kernel only reads the NUL-terminated string, which
        // lives for the duration of the call.
        let rc = unsafe {
            perf::ioctls::SET_FILTER(fd.as_raw_fd(), filter.as_ptr() as *mut libc::c_char)
        };
        perf_ioctl_result("PERF_EVENT_IOC_SET_FILTER", fd.as_raw_fd(), rc)
    }

    fn mmap_ring(&self, fd: &OwnedFd, data_pages: usize) -> Result<RingMap, SysError> {
        let page = self.page_size();
        let raw = fd.as_raw_fd();
        let len = data_pages
            .checked_add(1)
            .and_then(|p| p.checked_mul(page))
            .ok_or(SysError::Mmap {
                fd: raw,
                len: usize::MAX,
                errno: Errno::EOVERFLOW,
            })?;
        // SAFETY: a fresh shared mapping of a perf fd; the kernel chooses
        // the address, nothing else in the process is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SysError::Mmap {
                fd: raw,
                len,
                errno: Errno::last(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(SysError::Mmap {
            fd: raw,
            len,
            errno: Errno::EFAULT,
        })?;
        // SAFETY: `base` maps `len` bytes of which the first page is the
        // perf metadata page; on error the mapping is released by Drop.
        unsafe { RingMap::new(base, len, page, Backing::Mmap, raw) }
    }

    fn poll(&self, fds: &mut [libc::pollfd], timeout: Duration) -> Result<usize, SysError> {
        let ms = timeout.as_millis().min(MAX_POLL_TIMEOUT_MS) as libc::c_int;
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of
        // the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let errno = Errno::last();
            if errno == Errno::EINTR {
                return Ok(0);
            }
            return Err(SysError::Poll {
                nfds: fds.len(),
                errno,
            });
        }
        Ok(rc as usize)
    }

    fn clock_gettime(&self, clock: libc::clockid_t) -> Result<u64, SysError> {
        clock_gettime_ns(clock)
    }

    fn page_size(&self) -> usize {
        page_size()
    }
}
