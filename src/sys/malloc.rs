//! Tuning of the C library's allocator for a daemon whose threads allocate
//! and free steadily (event batches, records, encoded responses).
//!
//! With glibc's defaults, memory freed at the top of a heap is given back
//! as soon as 128 KiB are free there, and each thread's heap grows page
//! range by page range; a daemon that allocates and frees at a steady rate
//! then maps, protects and zeroes the same pages again and again, which
//! shows as page faults and `mprotect` calls in its profile. Keeping a
//! bounded amount of free memory instead costs at most
//! [`TRIM_THRESHOLD_BYTES`] + [`TOP_PAD_BYTES`] per heap.

/// Free bytes at the top of a heap kept before they are given back.
pub const TRIM_THRESHOLD_BYTES: i32 = 8 << 20;
/// Extra bytes a heap grows by when it must grow.
pub const TOP_PAD_BYTES: i32 = 1 << 20;
/// Allocations at least this large get their own mapping (freed at once).
pub const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// Applies the settings above; returns false when the C library refused
/// one (it then keeps its defaults, which only costs time).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() -> bool {
    [
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (libc::M_TOP_PAD, TOP_PAD_BYTES),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    ]
    .into_iter()
    .map(|(param, value)| {
        // SAFETY: mallopt only changes allocator parameters; it takes two
        // integers, reads no memory of ours and is safe to call at any time.
        unsafe { libc::mallopt(param, value) == 1 }
    })
    // Every setting is applied, whether or not another was refused.
    .filter(|&ok| !ok)
    .count()
        == 0
}

/// Other C libraries have no such parameters.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() -> bool {
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        assert!(super::tune_allocator());
    }
}
