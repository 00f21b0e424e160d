//! Helpers shared by the integration tests that need the host kernel's
//! tracefs and root (they are `#[ignore]`d for a plain `cargo test`;
//! `tests/run-all` runs them with `--include-ignored`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sockscope::sys;

/// Where tracefs is expected (and mounted when it is not there).
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Fails, with the fix, unless this process may use tracefs and perf
/// events (CAP_SYS_ADMIN, or CAP_PERFMON when `perfmon_is_enough`).
pub fn require_privileges(perfmon_is_enough: bool) {
    let caps = sys::effective_capabilities().expect("reading capabilities");
    assert!(
        sys::has_capability(caps, sys::CAP_SYS_ADMIN)
            || (perfmon_is_enough && sys::has_capability(caps, sys::CAP_PERFMON)),
        "this test needs CAP_SYS_ADMIN{} (run as root)",
        if perfmon_is_enough {
            " or CAP_PERFMON"
        } else {
            ""
        }
    );
}

/// The tracefs root, mounted first when it is not mounted.
pub fn tracefs() -> PathBuf {
    let root = Path::new(TRACEFS);
    if !root.join("events").is_dir() {
        sys::mount_fs("tracefs", root).expect("tracefs is not mounted and mounting it failed");
    }
    root.to_path_buf()
}
