//! Mapped perf ring pages: [`RingMap`] gives the ring reader (and the fake
//! producer) safe access to one metadata page and the data area behind it,
//! following the perf head/tail protocol.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use perf_event_open_sys as perf;

use super::SysError;

/// Byte offset of `data_head` in `struct perf_event_mmap_page`.
pub(super) const META_DATA_HEAD: usize =
    std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_head);
/// Byte offset of `data_tail` in `struct perf_event_mmap_page`.
pub(super) const META_DATA_TAIL: usize =
    std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_tail);
/// Byte offset of `data_offset` in `struct perf_event_mmap_page`.
pub(super) const META_DATA_OFFSET: usize =
    std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_offset);
/// Byte offset of `data_size` in `struct perf_event_mmap_page`.
pub(super) const META_DATA_SIZE: usize =
    std::mem::offset_of!(perf::bindings::perf_event_mmap_page, data_size);

/// Page size assumed when `sysconf(_SC_PAGESIZE)` fails.
const FALLBACK_PAGE_SIZE: usize = 4096;

/// The system page size (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => FALLBACK_PAGE_SIZE,
    }
}

/// What keeps a [`RingMap`]'s memory alive.
pub(super) enum Backing {
    /// A kernel mapping, unmapped on drop.
    Mmap,
    /// Heap memory shared with a fake producer.
    #[cfg(any(test, feature = "test-util"))]
    Heap {
        _memory: std::sync::Arc<super::fake::FakeMemory>,
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
    pub(super) unsafe fn new(
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

    pub(super) fn meta_u64(&self, offset: usize) -> &AtomicU64 {
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
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn write_in(&self, pos: u64, src: &[u8]) {
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
            #[cfg(any(test, feature = "test-util"))]
            Backing::Heap { .. } => {}
        }
    }
}
