//! Conversion of kernel sample timestamps to wall-clock time.
//!
//! Samples are stamped on the perf clock chosen when the rings were opened
//! ([`PerfClock`]: `CLOCK_MONOTONIC` when the kernel accepts `use_clockid`
//! with it, else `CLOCK_BOOTTIME`, else the kernel's default perf clock,
//! which user space cannot read and which is approximated by
//! `CLOCK_MONOTONIC`). MONOTONIC comes first because the kernel implements
//! it NMI-safe (`ktime_get_mono_fast_ns`) and so accepts it for every PMU
//! since 4.1; BOOTTIME is refused (EINVAL) for PMUs that may sample from
//! NMI context, which includes tracepoint events on the 6.x kernels tested.
//! The offset to wall time jumps across a suspend with MONOTONIC; the
//! periodic re-sync below corrects it.
//!
//! The offset `realtime − perf` is measured with paired reads
//! `realtime, perf, realtime`; the pair with the smallest latency wins and
//! its midpoint is used ([`estimate_offset`]). [`WallClock`] re-measures
//! every `clock_sync_period` and only moves the offset when the new
//! measurement differs by more than `clock_max_drift` (wall-clock steps,
//! NTP slews accumulated), counting the corrections; smaller differences
//! are measurement noise or slew and are ignored so timestamps stay stable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::KernelTime;
use crate::sys::{self, SysError};

/// Number of paired reads per offset measurement.
pub const SYNC_PAIRS: usize = 8;

/// The clock perf samples are stamped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerfClock {
    /// `use_clockid` with `CLOCK_BOOTTIME`.
    Boottime,
    /// `use_clockid` with `CLOCK_MONOTONIC`.
    Monotonic,
    /// No `use_clockid`: the kernel's perf clock (`local_clock`).
    KernelDefault,
}

impl PerfClock {
    /// Clocks tried in order when opening rings.
    pub const PREFERENCE: [PerfClock; 3] = [
        PerfClock::Monotonic,
        PerfClock::Boottime,
        PerfClock::KernelDefault,
    ];

    /// The clock id passed to `perf_event_open`, if any.
    pub fn clockid(self) -> Option<libc::clockid_t> {
        match self {
            PerfClock::Boottime => Some(libc::CLOCK_BOOTTIME),
            PerfClock::Monotonic => Some(libc::CLOCK_MONOTONIC),
            PerfClock::KernelDefault => None,
        }
    }

    /// The user-space clock that reads the same time (or, for
    /// [`PerfClock::KernelDefault`], the closest approximation).
    pub fn read_clockid(self) -> libc::clockid_t {
        self.clockid().unwrap_or(libc::CLOCK_MONOTONIC)
    }

    /// Whether user space can read exactly this clock.
    pub fn is_readable(self) -> bool {
        self.clockid().is_some()
    }

    /// Stable lower-case name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            PerfClock::Boottime => "boottime",
            PerfClock::Monotonic => "monotonic",
            PerfClock::KernelDefault => "perf_default",
        }
    }
}

/// One paired read: realtime before, perf clock, realtime after (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockPair {
    /// `CLOCK_REALTIME` before.
    pub real_before: u64,
    /// The perf clock.
    pub perf: u64,
    /// `CLOCK_REALTIME` after.
    pub real_after: u64,
}

/// A measured offset `realtime − perf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// Nanoseconds to add to a perf time to get Unix time.
    pub offset_ns: i128,
    /// Read latency of the pair used (half of it bounds the error).
    pub latency_ns: u64,
    /// The perf time of the measurement.
    pub at_perf: u64,
}

/// The offset from the lowest-latency valid pair; `None` without one.
pub fn estimate_offset(pairs: &[ClockPair]) -> Option<Offset> {
    pairs
        .iter()
        .filter(|p| p.real_after >= p.real_before)
        .min_by_key(|p| p.real_after - p.real_before)
        .map(|p| {
            let latency = p.real_after - p.real_before;
            let mid = p.real_before as i128 + (latency / 2) as i128;
            Offset {
                offset_ns: mid - p.perf as i128,
                latency_ns: latency,
                at_perf: p.perf,
            }
        })
}

/// Source of paired clock reads.
pub trait ClockSource {
    /// Takes one paired read.
    fn read_pair(&mut self) -> Result<ClockPair, SysError>;
}

impl<F: FnMut() -> ClockPair> ClockSource for F {
    fn read_pair(&mut self) -> Result<ClockPair, SysError> {
        Ok(self())
    }
}

/// Paired reads of `CLOCK_REALTIME` and the perf clock through [`sys`].
#[derive(Debug, Clone, Copy)]
pub struct SysClockSource {
    perf_clock: libc::clockid_t,
}

impl SysClockSource {
    /// Reads for `clock`.
    pub fn new(clock: PerfClock) -> SysClockSource {
        SysClockSource {
            perf_clock: clock.read_clockid(),
        }
    }
}

impl ClockSource for SysClockSource {
    fn read_pair(&mut self) -> Result<ClockPair, SysError> {
        let real_before = sys::clock_gettime_ns(libc::CLOCK_REALTIME)?;
        let perf = sys::clock_gettime_ns(self.perf_clock)?;
        let real_after = sys::clock_gettime_ns(libc::CLOCK_REALTIME)?;
        Ok(ClockPair {
            real_before,
            perf,
            real_after,
        })
    }
}

/// Takes [`SYNC_PAIRS`] paired reads and estimates the offset.
pub fn measure(source: &mut impl ClockSource) -> Result<Option<Offset>, SysError> {
    let mut pairs = [ClockPair {
        real_before: 0,
        perf: 0,
        real_after: 0,
    }; SYNC_PAIRS];
    for p in pairs.iter_mut() {
        *p = source.read_pair()?;
    }
    Ok(estimate_offset(&pairs))
}

/// What a re-sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The drift was within `clock_max_drift`; the offset was kept.
    Within {
        /// Measured minus current offset.
        drift_ns: i128,
    },
    /// The drift exceeded `clock_max_drift`; the offset was replaced.
    Corrected {
        /// Measured minus previous offset.
        drift_ns: i128,
    },
}

/// Counters of a [`WallClock`], for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockStats {
    /// Current offset realtime − perf, ns.
    pub offset_ns: i128,
    /// Re-measurements done.
    pub syncs: u64,
    /// Re-measurements that moved the offset.
    pub corrections: u64,
    /// Drift seen at the last re-measurement, ns.
    pub last_drift_ns: i128,
}

/// Kernel time to wall time, re-synchronised periodically.
#[derive(Debug, Clone)]
pub struct WallClock {
    offset_ns: i128,
    last_sync_perf: u64,
    sync_period: Duration,
    max_drift: Duration,
    stats: ClockStats,
}

impl WallClock {
    /// Starts from a measured offset.
    pub fn new(initial: Offset, sync_period: Duration, max_drift: Duration) -> WallClock {
        WallClock {
            offset_ns: initial.offset_ns,
            last_sync_perf: initial.at_perf,
            sync_period,
            max_drift,
            stats: ClockStats {
                offset_ns: initial.offset_ns,
                ..ClockStats::default()
            },
        }
    }

    /// Measures through `source` and starts from that.
    pub fn from_source(
        source: &mut impl ClockSource,
        sync_period: Duration,
        max_drift: Duration,
    ) -> Result<Option<WallClock>, SysError> {
        Ok(measure(source)?.map(|o| WallClock::new(o, sync_period, max_drift)))
    }

    /// Wall time of kernel time `t` (saturating at the epoch and at the
    /// largest representable time).
    pub fn to_system_time(&self, t: KernelTime) -> SystemTime {
        let unix_ns = t as i128 + self.offset_ns;
        if unix_ns <= 0 {
            return UNIX_EPOCH;
        }
        let ns = u64::try_from(unix_ns).unwrap_or(u64::MAX);
        UNIX_EPOCH + Duration::from_nanos(ns)
    }

    /// Whether a re-sync is due at perf time `now`.
    pub fn due(&self, now: KernelTime) -> bool {
        now.saturating_sub(self.last_sync_perf) as u128 >= self.sync_period.as_nanos()
    }

    /// Applies a new measurement.
    pub fn update(&mut self, measured: Offset) -> SyncOutcome {
        let drift = measured.offset_ns - self.offset_ns;
        self.last_sync_perf = measured.at_perf;
        self.stats.syncs += 1;
        self.stats.last_drift_ns = drift;
        if drift.unsigned_abs() > self.max_drift.as_nanos() {
            tracing::warn!(
                drift_ns = drift as i64,
                max_drift_ns = self.max_drift.as_nanos() as u64,
                "kernel clock drifted from wall clock; correcting the offset"
            );
            self.offset_ns = measured.offset_ns;
            self.stats.offset_ns = measured.offset_ns;
            self.stats.corrections += 1;
            SyncOutcome::Corrected { drift_ns: drift }
        } else {
            SyncOutcome::Within { drift_ns: drift }
        }
    }

    /// Re-measures through `source` if due at perf time `now`.
    pub fn sync_if_due(
        &mut self,
        now: KernelTime,
        source: &mut impl ClockSource,
    ) -> Result<Option<SyncOutcome>, SysError> {
        if !self.due(now) {
            return Ok(None);
        }
        Ok(measure(source)?.map(|o| self.update(o)))
    }

    /// Counters.
    pub fn stats(&self) -> ClockStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn lowest_latency_pair_wins() {
        let pairs = [
            ClockPair {
                real_before: 1000 * SEC,
                perf: 10 * SEC,
                real_after: 1000 * SEC + 5000,
            },
            ClockPair {
                real_before: 1000 * SEC + 10_000,
                perf: 10 * SEC + 10_100,
                real_after: 1000 * SEC + 10_200,
            },
            // Clock stepped backwards in the middle: ignored.
            ClockPair {
                real_before: 5,
                perf: 1,
                real_after: 4,
            },
        ];
        let o = estimate_offset(&pairs).expect("valid pair");
        assert_eq!(o.latency_ns, 200);
        assert_eq!(o.offset_ns, (990 * SEC) as i128);
        assert_eq!(estimate_offset(&pairs[2..]), None);
    }

    #[test]
    fn converts_and_corrects_only_beyond_max_drift() {
        let mut perf = 50 * SEC;
        let mut real = 1_700_000_000 * SEC;
        let mut src = || {
            perf += 1000;
            real += 1000;
            ClockPair {
                real_before: real - 10,
                perf,
                real_after: real + 10,
            }
        };
        let mut wc = WallClock::from_source(
            &mut src,
            Duration::from_secs(10),
            Duration::from_millis(100),
        )
        .expect("reads")
        .expect("offset");
        let t = 60 * SEC;
        let expect = UNIX_EPOCH + Duration::from_nanos(1_700_000_010 * SEC);
        assert_eq!(wc.to_system_time(t), expect);
        assert!(!wc.due(55 * SEC));
        assert!(wc.due(61 * SEC));

        // 50 ms of drift: kept.
        let small = Offset {
            offset_ns: wc.stats().offset_ns + 50_000_000,
            latency_ns: 10,
            at_perf: 61 * SEC,
        };
        assert_eq!(
            wc.update(small),
            SyncOutcome::Within {
                drift_ns: 50_000_000
            }
        );
        assert_eq!(wc.to_system_time(t), expect);
        // 2 s step of the wall clock: corrected.
        let big = Offset {
            offset_ns: wc.stats().offset_ns + 2_000_000_000,
            latency_ns: 10,
            at_perf: 72 * SEC,
        };
        assert!(matches!(wc.update(big), SyncOutcome::Corrected { .. }));
        assert_eq!(wc.to_system_time(t), expect + Duration::from_secs(2));
        let st = wc.stats();
        assert_eq!((st.syncs, st.corrections), (2, 1));
        assert!(!wc.due(80 * SEC));
    }

    #[test]
    fn conversion_saturates() {
        let wc = WallClock::new(
            Offset {
                offset_ns: -(100 * SEC as i128),
                latency_ns: 0,
                at_perf: 0,
            },
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert_eq!(wc.to_system_time(5), UNIX_EPOCH);
    }

    #[test]
    fn real_clock_source_gives_a_sane_offset() {
        let mut src = SysClockSource::new(PerfClock::Boottime);
        let o = measure(&mut src).expect("clock_gettime").expect("offset");
        let wc = WallClock::new(o, Duration::from_secs(10), Duration::from_millis(100));
        let now = sys::clock_gettime_ns(libc::CLOCK_BOOTTIME).expect("boottime");
        let wall = wc.to_system_time(now);
        let diff = match wall.duration_since(SystemTime::now()) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(diff < Duration::from_millis(50), "diff {diff:?}");
    }
}
