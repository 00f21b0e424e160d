//! Clock reads (`clock_gettime`).

use super::SysError;

/// `clock_gettime(clock)` in nanoseconds.
pub fn clock_gettime_ns(clock: libc::clockid_t) -> Result<u64, SysError> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::from_raw(clock))
        .map_err(|errno| SysError::ClockGettime { clock, errno })?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}
