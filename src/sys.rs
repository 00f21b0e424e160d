//! System call boundary: every syscall, ioctl and mmap of the daemon.
//!
//! Everything that talks to the kernel goes through this module so that the
//! rest of the daemon is safe code and can be tested without privileges:
//!
//! * the [`Sys`] trait covers what the perf ring reader needs
//!   (`perf_event_open`, the `PERF_EVENT_IOC_*` ioctls, mmap of rings, poll,
//!   `clock_gettime`). [`RealSys`] issues the real syscalls; [`fake::FakeSys`]
//!   is an in-memory stand-in whose rings are written by a test producer.
//!   The ring reader is generic over it (`Rings<S: Sys = RealSys>`).
//! * free functions cover the rest: mounting tracefs, capability checks,
//!   clock reads, CPU pinning, thread ids.
//!
//! Errors carry the syscall name, the errno and, for perf events, the
//! tracefs event id and CPU.

use std::ffi::CStr;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use perf_event_open_sys as perf;

/// Byte offset of `data_head` in `struct perf_event_mmap_page`.
const META_DATA_HEAD: usize = std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_head);
/// Byte offset of `data_tail` in `struct perf_event_mmap_page`.
const META_DATA_TAIL: usize = std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_tail);
/// Byte offset of `data_offset` in `struct perf_event_mmap_page`.
const META_DATA_OFFSET: usize =
    std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_offset);
/// Byte offset of `data_size` in `struct perf_event_mmap_page`.
const META_DATA_SIZE: usize = std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_size);

/// Page size assumed when `sysconf(_SC_PAGESIZE)` fails.
const FALLBACK_PAGE_SIZE: usize = 4096;
/// Largest poll timeout in milliseconds (what fits `poll`'s `int`).
const MAX_POLL_TIMEOUT_MS: u128 = i32::MAX as u128;
/// Capability number of CAP_NET_ADMIN.
pub const CAP_NET_ADMIN: u32 = 12;
/// Capability number of CAP_SYS_ADMIN.
pub const CAP_SYS_ADMIN: u32 = 21;
/// Capability number of CAP_PERFMON (Linux 5.8+).
pub const CAP_PERFMON: u32 = 38;
/// Largest capability number representable in the `CapEff` mask.
const MAX_CAP: u32 = 63;

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
/// [`fake::FakeSys`] simulates them in memory for tests and benchmarks.
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

/// The system page size (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => FALLBACK_PAGE_SIZE,
    }
}

/// `clock_gettime(clock)` in nanoseconds.
pub fn clock_gettime_ns(clock: libc::clockid_t) -> Result<u64, SysError> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::from_raw(clock))
        .map_err(|errno| SysError::ClockGettime { clock, errno })?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Mounts a filesystem of type `fstype` (e.g. `tracefs`) at `target`.
pub fn mount_fs(fstype: &str, target: &Path) -> Result<(), SysError> {
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| SysError::Mount {
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        errno,
    })
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<(), SysError> {
    nix::mount::umount(target).map_err(|errno| SysError::Umount {
        target: target.to_path_buf(),
        errno,
    })
}

/// Parses the `CapEff:` line of a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The effective capability mask of this process (from `/proc/self/status`).
pub fn effective_capabilities() -> Result<u64, SysError> {
    let path = PathBuf::from("/proc/self/status");
    let text = fs::read_to_string(&path).map_err(|e| SysError::ProcFile {
        path: path.clone(),
        what: e.to_string(),
    })?;
    parse_cap_eff(&text).ok_or(SysError::ProcFile {
        path,
        what: "no parsable CapEff line".to_string(),
    })
}

/// Whether capability number `cap` is in the effective mask `mask`.
pub fn has_capability(mask: u64, cap: u32) -> bool {
    cap <= MAX_CAP && mask & (1u64 << cap) != 0
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u32) -> Result<(), SysError> {
    let err = |errno| SysError::SetAffinity { cpu, errno };
    let idx = usize::try_from(cpu).map_err(|_| err(Errno::EINVAL))?;
    if idx >= libc::CPU_SETSIZE as usize {
        return Err(err(Errno::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `idx` was checked against CPU_SETSIZE above.
    unsafe { libc::CPU_SET(idx, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc < 0 {
        return Err(err(Errno::last()));
    }
    Ok(())
}

/// Thread id of the calling thread.
pub fn current_tid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// What keeps a [`RingMap`]'s memory alive.
enum Backing {
    /// A kernel mapping, unmapped on drop.
    Mmap,
    /// Heap memory shared with a fake producer.
    Heap {
        _memory: std::sync::Arc<fake::FakeMemory>,
    },
}

/// A mapped perf ring: one metadata page followed by a power-of-two data
/// area. All access to the shared memory goes through its methods, which
/// follow the perf protocol: the producer (kernel) only writes bytes in
/// `[data_head, data_tail + data_size)`, the reader only reads
/// `[data_tail, data_head)` after an Acquire load of `data_head`, and gives
/// bytes back with a Release store of `data_tail`.
pub struct RingMap {
    base: NonNull<u8>,
    len: usize,
    data_offset: usize,
    data_size: u64,
    backing: Backing,
}

// SAFETY: the mapping is process-wide memory, access is synchronised through
// the atomic head/tail protocol, and the RingMap is only read through &self
// by its single owner.
unsafe impl Send for RingMap {}

// SAFETY: shared access only loads/stores the head and tail atomically and
// reads or writes data bytes in the disjoint regions the perf protocol
// assigns to the reader and to the (single) producer.
unsafe impl Sync for RingMap {}

impl std::fmt::Debug for RingMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingMap")
            .field("len", &self.len)
            .field("data_offset", &self.data_offset)
            .field("data_size", &self.data_size)
            .finish()
    }
}

impl RingMap {
    /// # Safety
    /// `base` must point to `len` readable and writable bytes, page aligned,
    /// that stay valid until `backing` is released, and whose first page is
    /// laid out as `struct perf_event_mmap_page`.
    unsafe fn new(
        base: NonNull<u8>,
        len: usize,
        page: usize,
        backing: Backing,
        fd: RawFd,
    ) -> Result<RingMap, SysError> {
        let mut map = RingMap {
            base,
            len,
            data_offset: 0,
            data_size: 0,
            backing,
        };
        let off = map.meta_u64(META_DATA_OFFSET).load(Ordering::Relaxed);
        let size = map.meta_u64(META_DATA_SIZE).load(Ordering::Relaxed);
        // Kernels before 4.1 leave data_offset/data_size zero.
        let (off, size) = if off == 0 && size == 0 {
            (page as u64, (len - page) as u64)
        } else {
            (off, size)
        };
        let fits = off
            .checked_add(size)
            .is_some_and(|end| end <= len as u64 && off >= page as u64);
        if !fits || !size.is_power_of_two() || size % 8 != 0 {
            return Err(SysError::RingLayout {
                fd,
                what: format!("data_offset {off} data_size {size} in a {len}-byte mapping"),
            });
        }
        map.data_offset = off as usize;
        map.data_size = size;
        Ok(map)
    }

    fn meta_u64(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the META_* constants, an 8-aligned
        // offset inside the first page of a page-aligned mapping that lives
        // as long as `self`; the kernel accesses it atomically too.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    /// Size of the data area in bytes (a power of two).
    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    /// `data_head`, loaded with Acquire: all bytes before it are written.
    pub fn load_head(&self) -> u64 {
        self.meta_u64(META_DATA_HEAD).load(Ordering::Acquire)
    }

    /// `data_tail` as last stored by the reader.
    pub fn load_tail(&self) -> u64 {
        self.meta_u64(META_DATA_TAIL).load(Ordering::Relaxed)
    }

    /// Stores `data_tail` with Release: the bytes before it may be reused.
    pub fn store_tail(&self, tail: u64) {
        self.meta_u64(META_DATA_TAIL).store(tail, Ordering::Release);
    }

    /// Borrows `len` bytes at ring position `pos` when they do not wrap
    /// around the end of the data area. The caller must only ask for bytes
    /// in `[data_tail, data_head)`.
    pub fn contiguous(&self, pos: u64, len: usize) -> Option<&[u8]> {
        let start = pos & (self.data_size - 1);
        if start.checked_add(len as u64)? > self.data_size {
            return None;
        }
        // SAFETY: `start + len <= data_size`, so the range lies inside the
        // data area of the live mapping; the producer does not write bytes
        // before data_tail + data_size, which the reader has not released.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(self.data_offset + start as usize),
                len,
            )
        })
    }

    /// Copies `dst.len()` bytes at ring position `pos` into `dst`, wrapping
    /// around the end of the data area. Returns false (copying nothing) when
    /// `dst` is larger than the data area.
    pub fn copy_out(&self, pos: u64, dst: &mut [u8]) -> bool {
        if dst.len() as u64 > self.data_size {
            return false;
        }
        let start = (pos & (self.data_size - 1)) as usize;
        let first = dst.len().min(self.data_size as usize - start);
        // SAFETY: `start + first <= data_size` and `dst.len() - first <=
        // start`, so both source ranges lie in the data area; `dst` is a
        // distinct exclusive buffer.
        unsafe {
            let data = self.base.as_ptr().add(self.data_offset);
            std::ptr::copy_nonoverlapping(data.add(start), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
        true
    }

    /// Writes `src` at ring position `pos`, wrapping (fake producer side).
    fn write_in(&self, pos: u64, src: &[u8]) {
        let start = (pos & (self.data_size - 1)) as usize;
        let first = src.len().min(self.data_size as usize - start);
        // SAFETY: only called by the fake producer with `src.len() <=
        // data_size` on bytes the reader has released; ranges checked as in
        // `copy_out`.
        unsafe {
            let data = self.base.as_ptr().add(self.data_offset);
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Mmap => {
                // SAFETY: `base`/`len` are exactly the mapping created in
                // `mmap_ring`, no borrow of it outlives `self`.
                let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
                if rc != 0 {
                    tracing::warn!(errno = %Errno::last(), "munmap of perf ring failed");
                }
            }
            Backing::Heap { .. } => {}
        }
    }
}

// ===========================================================================
// Offset guessing (`probe::guess`): loopback IPv6 addresses, sockets with an
// explicit protocol number and per-thread credential changes.
// ===========================================================================

/// System calls used only by the struct offset guesser.
pub mod guess {
    use super::*;
    use std::net::Ipv6Addr;

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
}

/// In-memory stand-in for the kernel side of perf rings, for tests and
/// benchmarks: rings are heap pages laid out like the kernel's, written by a
/// test producer with [`fake::FakeRing::write`].
pub mod fake {
    use super::*;
    use std::alloc::Layout;
    use std::sync::{Arc, Condvar, Mutex};

    /// Alignment of fake ring memory (a page).
    const FAKE_ALIGN: usize = 4096;
    /// First stream id handed out by [`FakeSys`].
    const FIRST_STREAM_ID: u64 = 1000;

    /// Page-aligned zeroed heap memory.
    pub struct FakeMemory {
        ptr: NonNull<u8>,
        layout: Layout,
    }

    // SAFETY: the memory is only accessed through RingMap/FakeRing methods
    // that follow the atomic head/tail protocol.
    unsafe impl Send for FakeMemory {}
    // SAFETY: as above.
    unsafe impl Sync for FakeMemory {}

    impl FakeMemory {
        fn new(len: usize) -> FakeMemory {
            let layout = match Layout::from_size_align(len.max(FAKE_ALIGN), FAKE_ALIGN) {
                Ok(l) => l,
                Err(_) => Layout::new::<u64>(),
            };
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
            FakeMemory { ptr, layout }
        }
    }

    impl Drop for FakeMemory {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with exactly this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }

    /// One fake perf event.
    #[derive(Debug)]
    pub struct FakeFd {
        raw: RawFd,
        state: Arc<Shared>,
    }

    impl AsRawFd for FakeFd {
        fn as_raw_fd(&self) -> RawFd {
            self.raw
        }
    }

    impl Drop for FakeFd {
        fn drop(&mut self) {
            if let Ok(mut st) = self.state.state.lock() {
                st.closed += 1;
            }
        }
    }

    /// What a fake event was opened with and what was done to it.
    #[derive(Debug, Clone)]
    pub struct FakeEvent {
        /// The configuration passed to `perf_event_open`.
        pub config: PerfEventConfig,
        /// CPU it was opened on.
        pub cpu: u32,
        /// Its stream id.
        pub stream_id: u64,
        /// Fd whose ring it writes into (itself unless redirected).
        pub output: RawFd,
        /// Whether it is enabled.
        pub enabled: bool,
        /// Last filter set.
        pub filter: Option<String>,
    }

    #[derive(Default)]
    struct State {
        events: Vec<FakeEvent>,
        rings: Vec<(RawFd, FakeRing)>,
        closed: usize,
        clock_ns: u64,
        reject_clocks: Vec<libc::clockid_t>,
    }

    #[derive(Default)]
    struct Shared {
        state: Mutex<State>,
        wake: Condvar,
    }

    impl std::fmt::Debug for Shared {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Shared")
        }
    }

    /// The fake kernel. Cloning shares the state, so a test keeps one clone
    /// to produce samples and inspect events while the reader owns another.
    #[derive(Clone, Default)]
    pub struct FakeSys {
        shared: Arc<Shared>,
    }

    impl std::fmt::Debug for FakeSys {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FakeSys")
        }
    }

    fn fake_fd_index(raw: RawFd) -> usize {
        raw as usize
    }

    impl FakeSys {
        /// A fake kernel with no events.
        pub fn new() -> FakeSys {
            FakeSys::default()
        }

        /// Makes `perf_event_open` fail with EINVAL for this clock.
        pub fn reject_clock(&self, clock: libc::clockid_t) {
            self.lock().reject_clocks.push(clock);
        }

        /// Sets what `clock_gettime` returns (for every clock).
        pub fn set_clock(&self, ns: u64) {
            self.lock().clock_ns = ns;
        }

        /// Events opened so far.
        pub fn events(&self) -> Vec<FakeEvent> {
            self.lock().events.clone()
        }

        /// Number of fake fds closed.
        pub fn closed(&self) -> usize {
            self.lock().closed
        }

        /// The ring mapped for `cpu`, if any.
        pub fn ring(&self, cpu: u32) -> Option<FakeRing> {
            let st = self.lock();
            st.rings
                .iter()
                .find(|(fd, _)| {
                    st.events
                        .get(fake_fd_index(*fd))
                        .is_some_and(|e| e.cpu == cpu)
                })
                .map(|(_, r)| r.clone())
        }

        /// Wakes a reader blocked in `poll`.
        pub fn notify(&self) {
            self.shared.wake.notify_all();
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.shared
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        fn with_event<T>(
            &self,
            fd: &FakeFd,
            request: &'static str,
            f: impl FnOnce(&mut FakeEvent) -> T,
        ) -> Result<T, SysError> {
            let mut st = self.lock();
            st.events
                .get_mut(fake_fd_index(fd.raw))
                .map(f)
                .ok_or(SysError::Ioctl {
                    request,
                    fd: fd.raw,
                    errno: Errno::EBADF,
                })
        }
    }

    impl Sys for FakeSys {
        type Fd = FakeFd;

        fn perf_event_open(&self, config: &PerfEventConfig, cpu: u32) -> Result<FakeFd, SysError> {
            let mut st = self.lock();
            if config
                .clockid
                .is_some_and(|c| st.reject_clocks.contains(&c))
            {
                return Err(SysError::PerfEventOpen {
                    event_id: config.tracepoint_id,
                    cpu,
                    errno: Errno::EINVAL,
                });
            }
            let raw = st.events.len() as RawFd;
            st.events.push(FakeEvent {
                config: *config,
                cpu,
                stream_id: FIRST_STREAM_ID + raw as u64,
                output: raw,
                enabled: false,
                filter: None,
            });
            Ok(FakeFd {
                raw,
                state: self.shared.clone(),
            })
        }

        fn perf_event_id(&self, fd: &FakeFd) -> Result<u64, SysError> {
            self.with_event(fd, "PERF_EVENT_IOC_ID", |e| e.stream_id)
        }

        fn perf_event_set_output(&self, fd: &FakeFd, target: &FakeFd) -> Result<(), SysError> {
            let target_cpu = self.with_event(target, "PERF_EVENT_IOC_SET_OUTPUT", |e| e.cpu)?;
            let raw = target.raw;
            let same_cpu = self.with_event(fd, "PERF_EVENT_IOC_SET_OUTPUT", |e| {
                e.output = raw;
                e.cpu == target_cpu
            })?;
            if !same_cpu {
                return Err(SysError::Ioctl {
                    request: "PERF_EVENT_IOC_SET_OUTPUT",
                    fd: fd.raw,
                    errno: Errno::EINVAL,
                });
            }
            Ok(())
        }

        fn perf_event_enable(&self, fd: &FakeFd) -> Result<(), SysError> {
            self.with_event(fd, "PERF_EVENT_IOC_ENABLE", |e| e.enabled = true)
        }

        fn perf_event_disable(&self, fd: &FakeFd) -> Result<(), SysError> {
            self.with_event(fd, "PERF_EVENT_IOC_DISABLE", |e| e.enabled = false)
        }

        fn perf_event_set_filter(&self, fd: &FakeFd, filter: &CStr) -> Result<(), SysError> {
            let text = filter.to_string_lossy().into_owned();
            self.with_event(fd, "PERF_EVENT_IOC_SET_FILTER", |e| e.filter = Some(text))
        }

        fn mmap_ring(&self, fd: &FakeFd, data_pages: usize) -> Result<RingMap, SysError> {
            let page = self.page_size();
            let len = (data_pages + 1) * page;
            let mem = Arc::new(FakeMemory::new(len));
            // SAFETY: fresh zeroed page-aligned memory of `len` bytes; the
            // metadata words are written before anyone else can see it.
            let meta = unsafe {
                let base = mem.ptr.as_ptr();
                AtomicU64::from_ptr(base.add(META_DATA_OFFSET).cast::<u64>())
                    .store(page as u64, Ordering::Relaxed);
                AtomicU64::from_ptr(base.add(META_DATA_SIZE).cast::<u64>())
                    .store((data_pages * page) as u64, Ordering::Relaxed);
                base
            };
            let reader_map = |mem: Arc<FakeMemory>| {
                // SAFETY: `meta` points to `len` bytes kept alive by `mem`,
                // laid out as a perf metadata page plus data.
                unsafe {
                    RingMap::new(
                        NonNull::new(meta).ok_or(SysError::Mmap {
                            fd: fd.raw,
                            len,
                            errno: Errno::ENOMEM,
                        })?,
                        len,
                        page,
                        Backing::Heap { _memory: mem },
                        fd.raw,
                    )
                }
            };
            let map = reader_map(mem.clone())?;
            let producer = FakeRing {
                map: Arc::new(reader_map(mem)?),
                sys: self.clone(),
            };
            self.lock().rings.push((fd.raw, producer));
            Ok(map)
        }

        fn poll(&self, fds: &mut [libc::pollfd], timeout: Duration) -> Result<usize, SysError> {
            let deadline = std::time::Instant::now() + timeout;
            let mut st = self.lock();
            loop {
                let mut ready = 0;
                for p in fds.iter_mut() {
                    p.revents = 0;
                    let has_data = st
                        .rings
                        .iter()
                        .find(|(fd, _)| *fd == p.fd)
                        .is_some_and(|(_, r)| r.map.load_head() != r.map.load_tail());
                    if has_data {
                        p.revents = libc::POLLIN;
                        ready += 1;
                    }
                }
                let now = std::time::Instant::now();
                if ready > 0 || now >= deadline {
                    return Ok(ready);
                }
                st = match self.shared.wake.wait_timeout(st, deadline - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        }

        fn clock_gettime(&self, _clock: libc::clockid_t) -> Result<u64, SysError> {
            Ok(self.lock().clock_ns)
        }

        fn page_size(&self) -> usize {
            FAKE_ALIGN
        }
    }

    /// Producer handle on one fake ring.
    #[derive(Clone)]
    pub struct FakeRing {
        map: Arc<RingMap>,
        sys: FakeSys,
    }

    impl FakeRing {
        /// Appends `bytes` at `data_head` and publishes them (Release) if
        /// they fit in the free space; returns false otherwise.
        pub fn write(&self, bytes: &[u8]) -> bool {
            let head = self.map.meta_u64(META_DATA_HEAD).load(Ordering::Relaxed);
            let tail = self.map.meta_u64(META_DATA_TAIL).load(Ordering::Acquire);
            let used = head.wrapping_sub(tail);
            if used.saturating_add(bytes.len() as u64) > self.map.data_size {
                return false;
            }
            self.map.write_in(head, bytes);
            self.map
                .meta_u64(META_DATA_HEAD)
                .store(head.wrapping_add(bytes.len() as u64), Ordering::Release);
            true
        }

        /// Sets `data_head` directly (to simulate a corrupt producer).
        pub fn set_head(&self, head: u64) {
            self.map
                .meta_u64(META_DATA_HEAD)
                .store(head, Ordering::Release);
        }

        /// Current `data_head`.
        pub fn head(&self) -> u64 {
            self.map.load_head()
        }

        /// Current `data_tail` (as stored by the reader).
        pub fn tail(&self) -> u64 {
            self.map.meta_u64(META_DATA_TAIL).load(Ordering::Acquire)
        }

        /// Free bytes.
        pub fn free(&self) -> u64 {
            self.map.data_size - self.head().wrapping_sub(self.tail())
        }

        /// Size of the data area.
        pub fn data_size(&self) -> u64 {
            self.map.data_size
        }

        /// Wakes the reader.
        pub fn notify(&self) {
            self.sys.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_parsing() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let mask = parse_cap_eff(status).expect("CapEff present");
        assert!(has_capability(mask, CAP_SYS_ADMIN));
        assert!(has_capability(mask, CAP_PERFMON));
        assert!(!has_capability(mask, 41));
        assert!(!has_capability(mask, 64));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn fake_ring_wraps_and_tracks_tail() {
        let sys = fake::FakeSys::new();
        let cfg = PerfEventConfig {
            tracepoint_id: 1,
            sample_type: 0,
            clockid: None,
            wakeup: Wakeup::Events(1),
        };
        let fd = sys.perf_event_open(&cfg, 0).expect("open");
        let map = sys.mmap_ring(&fd, 1).expect("mmap");
        let prod = sys.ring(0).expect("ring");
        assert_eq!(map.data_size(), 4096);
        let filler = vec![7u8; 4000];
        assert!(prod.write(&filler));
        assert!(!prod.write(&[1u8; 200]), "no space before the tail moves");
        map.store_tail(4000);
        let rec: Vec<u8> = (0..200u8).collect();
        assert!(prod.write(&rec));
        assert_eq!(map.load_head(), 4200);
        assert!(map.contiguous(4000, 200).is_none(), "record wraps");
        let mut out = vec![0u8; 200];
        assert!(map.copy_out(4000, &mut out));
        assert_eq!(out, rec);
        assert!(!map.copy_out(0, &mut vec![0u8; 5000]));
    }
}

// ---------------------------------------------------------------------------
// AF_PACKET sockets (DNS capture). Kept in its own module so it stays
// independent of the rest of this file.
// ---------------------------------------------------------------------------

/// AF_PACKET capture sockets: creation, classic BPF filter, bind, receive
/// and kernel drop statistics.
pub mod packet {
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
}
