//! In-memory stand-in for the kernel side of perf rings, for tests and
//! benchmarks: rings are heap pages laid out like the kernel's, written by a
//! test producer with [`FakeRing::write`].
//!
//! Built only for the crate's own tests and with the `test-util` feature
//! (which the crate's tests and benchmarks enable), never into the release
//! binary.

use std::alloc::Layout;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;

use super::ring_map::{Backing, META_DATA_HEAD, META_DATA_OFFSET, META_DATA_SIZE, META_DATA_TAIL};
use super::{PerfEventConfig, RingMap, Sys, SysError};

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
        if used.saturating_add(bytes.len() as u64) > self.map.data_size() {
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
        self.map.data_size() - self.head().wrapping_sub(self.tail())
    }

    /// Size of the data area.
    pub fn data_size(&self) -> u64 {
        self.map.data_size()
    }

    /// Wakes the reader.
    pub fn notify(&self) {
        self.sys.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Wakeup;

    #[test]
    fn fake_ring_wraps_and_tracks_tail() {
        let sys = FakeSys::new();
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
