//! Per-CPU perf rings: opening the events, reading the rings, and merging
//! the per-CPU streams into one timestamp-ordered stream of
//! [`RawSample`]s.
//!
//! # Layout
//! [`Rings::open`] opens one perf event per (tracefs event id, CPU):
//! `PERF_TYPE_TRACEPOINT`, `config` = the id, `sample_period` 1, sample_type
//! [`perf_record::SAMPLE_TYPE`] (`IDENTIFIER|TID|TIME|CPU|RAW`), opened disabled.
//! The first event of each CPU owns a ring of `2^ring_size_exponent` data
//! pages plus the metadata page; the CPU's other events are redirected into
//! it with `PERF_EVENT_IOC_SET_OUTPUT`. `PERF_EVENT_IOC_ID` maps the id in
//! each sample back to the index of its event. Everything is enabled last
//! and disabled, unmapped and closed on drop.
//!
//! Timestamps use `use_clockid` with `CLOCK_MONOTONIC`, falling back to
//! `CLOCK_BOOTTIME` and then to the default perf clock when the kernel
//! answers EINVAL ([`Rings::clock`] says which).
//!
//! The kernel wakes the reader once a quarter of a ring is filled
//! (`watermark`), not per sample; [`Rings::read`] also returns after its
//! timeout so latency stays bounded when traffic is low. A read always
//! waits for one of the two, even when the rings already hold samples:
//! at a trickle of samples, draining as soon as anything is there would
//! wake the reader (and the engine it hands batches to) once per sample or
//! two, which is most of what a monitor of short connections would spend.
//! The timeout is therefore the batching period: samples wait at most that
//! long (plus [`REORDER_SLACK`]), and a ring filling faster wakes the
//! reader at its watermark, so nothing is lost to the wait.
//!
//! # Ordering across CPUs
//! A sample can be released once no sample with an earlier timestamp can
//! still show up in any ring. With a clock user space can read, a read pass
//! first takes `now` on the perf clock and only then loads each ring's
//! `data_head`. A sample is stamped and committed in one non-preemptible
//! stretch of the kernel, so any sample stamped before `now −`
//! [`REORDER_SLACK`] was committed before `now` and is visible to that pass.
//! After draining every ring, everything queued up to `now − REORDER_SLACK`
//! is released in timestamp order ([`merge`]). Idle CPUs need no special
//! case: the clock, not their last sample, bounds them. The slack covers
//! interrupts nesting inside a sample's commit and a vCPU being descheduled
//! in between; it is the added latency.
//!
//! Without a readable clock (kernels without `use_clockid`), the frontier
//! is the minimum over CPUs of the newest timestamp read from them, where a
//! CPU that produced nothing for [`IDLE_HOLDBACK`] stops holding others
//! back. A sample that arrives behind the frontier anyway is delivered at
//! once and counted as late.

pub mod clock;
pub mod merge;
pub mod perf_record;
pub mod recording;

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use nix::errno::Errno;

use crate::config::MAX_RING_SIZE_EXPONENT;
use crate::model::RawSample;
use crate::sys::{PerfEventConfig, RealSys, RingMap, Sys, SysError, Wakeup};

use clock::PerfClock;
use merge::Merger;

/// Where the kernel lists online CPUs.
pub const ONLINE_CPUS_PATH: &str = "/sys/devices/system/cpu/online";
/// Default wait of one [`Rings::read`]: bounds latency at low traffic.
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How far behind "now" the merge frontier trails (see module docs).
pub const REORDER_SLACK: Duration = Duration::from_millis(20);
/// Without a readable clock: how long an idle CPU may hold others back.
pub const IDLE_HOLDBACK: Duration = Duration::from_millis(200);
/// Queued samples beyond which the oldest are released regardless.
pub const MAX_PENDING_SAMPLES: usize = 1 << 20;
/// The default wakeup is when 1/this of a ring is filled.
pub const WAKEUP_FRACTION: u64 = 4;
/// Largest CPU number accepted from the online list.
pub const MAX_CPU_ID: u32 = 1 << 16;

/// Errors of opening or reading the rings.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A syscall failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The online CPU list could not be read or parsed.
    #[error("CPU list {path}: {what}")]
    CpuList {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// No event ids were given.
    #[error("no events to open")]
    NoEvents,
    /// No CPUs were given.
    #[error("no CPUs to open events on")]
    NoCpus,
    /// The ring size exponent is out of range.
    #[error("ring_size_exponent {exp} is above the maximum {max}")]
    RingSize {
        /// Requested.
        exp: u32,
        /// Largest accepted.
        max: u32,
    },
    /// Two events reported the same stream id.
    #[error("events {first} and {second} share stream id {id}")]
    DuplicateId {
        /// The id.
        id: u64,
        /// First event index.
        first: u32,
        /// Second event index.
        second: u32,
    },
    /// A filter could not be passed to the kernel.
    #[error("filter for event {event}: {what}")]
    Filter {
        /// Event index.
        event: usize,
        /// What is wrong.
        what: String,
    },
}

/// Parses a kernel CPU list such as `0-3,5,7-8`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        let num = |s: &str| -> Result<u32, String> {
            let n: u32 = s
                .trim()
                .parse()
                .map_err(|_| format!("bad CPU number {s:?}"))?;
            if n > MAX_CPU_ID {
                return Err(format!("CPU number {n} above {MAX_CPU_ID}"));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("descending range {part:?}"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Reads the online CPUs from `path` (normally [`ONLINE_CPUS_PATH`]).
pub fn online_cpus_from(path: &Path) -> Result<Vec<u32>, RingError> {
    let err = |what: String| RingError::CpuList {
        path: path.to_path_buf(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let cpus = parse_cpu_list(&text).map_err(err)?;
    if cpus.is_empty() {
        return Err(err("empty".to_string()));
    }
    Ok(cpus)
}

/// The online CPUs of this machine.
pub fn online_cpus() -> Result<Vec<u32>, RingError> {
    online_cpus_from(Path::new(ONLINE_CPUS_PATH))
}

/// Options of [`Rings::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOptions {
    /// Each CPU's ring has 2^this data pages.
    pub ring_size_exponent: u32,
    /// Wakeup policy; `None` wakes when a quarter of the ring is filled.
    pub wakeup: Option<Wakeup>,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            ring_size_exponent: crate::config::DEFAULT_RING_SIZE_EXPONENT,
            wakeup: None,
        }
    }
}

/// What the reader hands to its consumer.
#[derive(Debug, Clone, Copy)]
pub enum RingItem<'a> {
    /// A sample, in timestamp order across CPUs.
    Sample(RawSample<'a>),
    /// The kernel dropped `count` samples on `cpu` because its ring was full.
    Lost {
        /// The CPU.
        cpu: u32,
        /// Samples lost.
        count: u64,
    },
}

/// Counters of one CPU's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuStats {
    /// The CPU.
    pub cpu: u32,
    /// Samples read.
    pub samples: u64,
    /// Samples the kernel reported lost.
    pub lost: u64,
    /// Malformed records (bad size, truncated fields); each also skipped.
    pub malformed: u64,
    /// Times the reader gave up on the rest of the ring after a record it
    /// could not size, and jumped to `data_head`.
    pub resyncs: u64,
    /// Samples with an id that is none of the opened events.
    pub unknown_id: u64,
    /// Records of other types (ignored).
    pub other: u64,
    /// Bytes consumed from the ring.
    pub bytes: u64,
}

/// Snapshot of the reader's counters, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingStats {
    /// Clock of the sample timestamps.
    pub clock: PerfClock,
    /// Per-CPU counters.
    pub cpus: Vec<CpuStats>,
    /// Samples delivered after a later-stamped sample.
    pub late: u64,
    /// Samples queued for ordering.
    pub pending: usize,
}

impl RingStats {
    /// Sum of samples lost over all CPUs.
    pub fn total_lost(&self) -> u64 {
        self.cpus.iter().map(|c| c.lost).sum()
    }

    /// Sum of samples read over all CPUs.
    pub fn total_samples(&self) -> u64 {
        self.cpus.iter().map(|c| c.samples).sum()
    }

    /// Sum of malformed records over all CPUs.
    pub fn total_malformed(&self) -> u64 {
        self.cpus.iter().map(|c| c.malformed).sum()
    }
}

struct CpuRing {
    map: RingMap,
    tail: u64,
    last_time: u64,
    last_activity: Instant,
    stats: CpuStats,
}

struct EventFd<F> {
    event: usize,
    fd: F,
}

/// The open perf events and their per-CPU rings. See the module docs.
pub struct Rings<S: Sys = RealSys> {
    // Field order matters for drop: rings are unmapped before fds close.
    rings: Vec<CpuRing>,
    fds: Vec<EventFd<S::Fd>>,
    pollfds: Vec<libc::pollfd>,
    ids: HashMap<u64, u32>,
    clock: PerfClock,
    merger: Merger,
    scratch: Vec<u8>,
    sys: S,
}

impl<S: Sys> std::fmt::Debug for Rings<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("cpus", &self.rings.len())
            .field("fds", &self.fds.len())
            .field("clock", &self.clock)
            .finish()
    }
}

impl Rings<RealSys> {
    /// [`Rings::open`] on the real kernel.
    pub fn open_real(
        event_ids: &[u64],
        cpus: &[u32],
        opts: &RingOptions,
    ) -> Result<Rings<RealSys>, RingError> {
        Rings::open(RealSys, event_ids, cpus, opts)
    }
}

fn is_einval(e: &SysError) -> bool {
    matches!(
        e,
        SysError::PerfEventOpen {
            errno: Errno::EINVAL,
            ..
        }
    )
}

impl<S: Sys> Rings<S> {
    /// Opens one event per (tracefs event id, CPU) and the per-CPU rings,
    /// then enables them. Sample `event` fields are indices into
    /// `event_ids`.
    pub fn open(
        sys: S,
        event_ids: &[u64],
        cpus: &[u32],
        opts: &RingOptions,
    ) -> Result<Rings<S>, RingError> {
        if event_ids.is_empty() {
            return Err(RingError::NoEvents);
        }
        if cpus.is_empty() {
            return Err(RingError::NoCpus);
        }
        if opts.ring_size_exponent > MAX_RING_SIZE_EXPONENT {
            return Err(RingError::RingSize {
                exp: opts.ring_size_exponent,
                max: MAX_RING_SIZE_EXPONENT,
            });
        }
        let data_pages = 1usize << opts.ring_size_exponent;
        let ring_bytes = (data_pages * sys.page_size()) as u64;
        let wakeup = opts.wakeup.unwrap_or(Wakeup::Bytes(
            u32::try_from((ring_bytes / WAKEUP_FRACTION).max(1)).unwrap_or(u32::MAX),
        ));
        let mut config = PerfEventConfig {
            tracepoint_id: event_ids[0],
            sample_type: perf_record::SAMPLE_TYPE,
            clockid: None,
            wakeup,
        };

        // Pick the clock with the first event, falling back on EINVAL.
        let mut first = None;
        let mut clock = PerfClock::KernelDefault;
        for candidate in PerfClock::PREFERENCE {
            config.clockid = candidate.clockid();
            match sys.perf_event_open(&config, cpus[0]) {
                Ok(fd) => {
                    first = Some(fd);
                    clock = candidate;
                    break;
                }
                Err(e) if is_einval(&e) && candidate != PerfClock::KernelDefault => {
                    tracing::info!(
                        clock = candidate.as_str(),
                        "perf clock not supported, trying the next"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut first = first;
        let mut rings = Vec::with_capacity(cpus.len());
        let mut fds: Vec<EventFd<S::Fd>> = Vec::with_capacity(cpus.len() * event_ids.len());
        let mut ids: HashMap<u64, u32> = HashMap::new();
        for &cpu in cpus {
            let leader = fds.len();
            for (event, &tp) in event_ids.iter().enumerate() {
                config.tracepoint_id = tp;
                let fd = match first.take() {
                    Some(fd) => fd,
                    None => sys.perf_event_open(&config, cpu)?,
                };
                if event == 0 {
                    let map = sys.mmap_ring(&fd, data_pages)?;
                    rings.push(CpuRing {
                        map,
                        tail: 0,
                        last_time: 0,
                        last_activity: Instant::now(),
                        stats: CpuStats {
                            cpu,
                            ..CpuStats::default()
                        },
                    });
                } else {
                    sys.perf_event_set_output(&fd, &fds[leader].fd)?;
                }
                let id = sys.perf_event_id(&fd)?;
                if let Some(prev) = ids.insert(id, event as u32) {
                    return Err(RingError::DuplicateId {
                        id,
                        first: prev,
                        second: event as u32,
                    });
                }
                fds.push(EventFd { event, fd });
            }
        }
        for r in &mut rings {
            r.tail = r.map.load_tail();
        }
        let pollfds = (0..cpus.len())
            .map(|i| libc::pollfd {
                fd: fds[i * event_ids.len()].fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let rings_obj = Rings {
            merger: Merger::new(rings.len()),
            rings,
            fds,
            pollfds,
            ids,
            clock,
            scratch: Vec::new(),
            sys,
        };
        for f in &rings_obj.fds {
            rings_obj.sys.perf_event_enable(&f.fd)?;
        }
        Ok(rings_obj)
    }

    /// The clock sample timestamps are on.
    pub fn clock(&self) -> PerfClock {
        self.clock
    }

    /// The CPUs, in ring order.
    pub fn cpus(&self) -> Vec<u32> {
        self.rings.iter().map(|r| r.stats.cpu).collect()
    }

    /// Sets a tracefs filter expression on every CPU's instance of event
    /// `event` (`PERF_EVENT_IOC_SET_FILTER`).
    pub fn set_filter(&self, event: usize, filter: &str) -> Result<(), RingError> {
        let c = CString::new(filter).map_err(|_| RingError::Filter {
            event,
            what: "contains a NUL byte".to_string(),
        })?;
        for f in self.fds.iter().filter(|f| f.event == event) {
            self.sys.perf_event_set_filter(&f.fd, &c)?;
        }
        Ok(())
    }

    /// Counters snapshot.
    pub fn stats(&self) -> RingStats {
        RingStats {
            clock: self.clock,
            cpus: self.rings.iter().map(|r| r.stats).collect(),
            late: self.merger.late(),
            pending: self.merger.pending(),
        }
    }

    /// Waits up to `timeout` for a ring to reach its wakeup watermark (the
    /// batching period, see the module docs), drains every ring and hands
    /// `emit` the losses and all samples that can be released in order.
    /// Returns the number of items emitted.
    pub fn read(
        &mut self,
        timeout: Duration,
        emit: &mut impl FnMut(RingItem<'_>),
    ) -> Result<u64, RingError> {
        self.sys.poll(&mut self.pollfds, timeout)?;
        self.drain(emit)
    }

    /// Drains every ring without waiting and releases what can be released.
    pub fn drain(&mut self, emit: &mut impl FnMut(RingItem<'_>)) -> Result<u64, RingError> {
        // The clock must be read before any data_head (see module docs).
        let now = match self.clock.clockid() {
            Some(c) => Some(self.sys.clock_gettime(c)?),
            None => None,
        };
        let mut n = 0;
        for (i, ring) in self.rings.iter_mut().enumerate() {
            n += drain_ring(
                i,
                ring,
                &self.ids,
                &mut self.merger,
                &mut self.scratch,
                emit,
            );
        }
        let frontier = match now {
            Some(t) => t.saturating_sub(REORDER_SLACK.as_nanos() as u64),
            None => self.fallback_frontier(),
        };
        let mut out = |s: RawSample<'_>| emit(RingItem::Sample(s));
        n += self.merger.release(frontier, &mut out);
        if self.merger.pending() > MAX_PENDING_SAMPLES {
            n += self.merger.shed(MAX_PENDING_SAMPLES, &mut out);
        }
        Ok(n)
    }

    fn fallback_frontier(&self) -> u64 {
        let now = Instant::now();
        self.rings
            .iter()
            .filter(|r| now.duration_since(r.last_activity) < IDLE_HOLDBACK && r.last_time > 0)
            .map(|r| r.last_time)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Emits every queued sample (at shutdown).
    pub fn flush(&mut self, emit: &mut impl FnMut(RingItem<'_>)) -> u64 {
        self.merger
            .flush(&mut |s: RawSample<'_>| emit(RingItem::Sample(s)))
    }
}

/// Reads one ring from its tail to its head. Samples go to the merger,
/// losses straight to `emit`. Returns the number of items emitted.
fn drain_ring(
    queue: usize,
    ring: &mut CpuRing,
    ids: &HashMap<u64, u32>,
    merger: &mut Merger,
    scratch: &mut Vec<u8>,
    emit: &mut impl FnMut(RingItem<'_>),
) -> u64 {
    let head = ring.map.load_head();
    let size = ring.map.data_size();
    let mut tail = ring.tail;
    let mut emitted = 0;
    if head.wrapping_sub(tail) > size {
        // The head is not within one ring of the tail: nothing between
        // them can be trusted.
        ring.stats.malformed += 1;
        ring.stats.resyncs += 1;
        tail = head;
    }
    while tail != head {
        let remaining = head.wrapping_sub(tail);
        let mut hb = [0u8; perf_record::HEADER_SIZE];
        let header_ok =
            remaining >= perf_record::HEADER_SIZE as u64 && ring.map.copy_out(tail, &mut hb);
        let h = perf_record::Header::parse(hb);
        let size_ok = header_ok
            && h.size as usize >= perf_record::HEADER_SIZE
            && h.size as u64 <= remaining
            && h.size as usize % perf_record::RECORD_ALIGN == 0;
        if !size_ok {
            // Records carry no sync marker: skip everything published.
            ring.stats.malformed += 1;
            ring.stats.resyncs += 1;
            ring.stats.bytes += remaining;
            tail = head;
            break;
        }
        let len = h.size as usize;
        let rec: &[u8] = match ring.map.contiguous(tail, len) {
            Some(r) => r,
            None => {
                scratch.resize(len, 0);
                ring.map.copy_out(tail, scratch);
                scratch
            }
        };
        let body = &rec[perf_record::HEADER_SIZE..];
        match h.kind {
            perf_record::RECORD_SAMPLE => match perf_record::parse_sample(body) {
                Ok(s) => match ids.get(&s.id) {
                    Some(&event) => {
                        ring.stats.samples += 1;
                        ring.last_time = ring.last_time.max(s.time);
                        merger.push(
                            queue,
                            &RawSample {
                                event,
                                time: s.time,
                                cpu: s.cpu,
                                pid: s.pid,
                                tid: s.tid,
                                data: s.raw,
                            },
                        );
                    }
                    None => ring.stats.unknown_id += 1,
                },
                Err(_) => ring.stats.malformed += 1,
            },
            perf_record::RECORD_LOST => match perf_record::parse_lost(body) {
                Ok((_, count)) => {
                    ring.stats.lost += count;
                    emit(RingItem::Lost {
                        cpu: ring.stats.cpu,
                        count,
                    });
                    emitted += 1;
                }
                Err(_) => ring.stats.malformed += 1,
            },
            _ => ring.stats.other += 1,
        }
        ring.stats.bytes += len as u64;
        tail = tail.wrapping_add(len as u64);
    }
    if tail != ring.tail {
        ring.last_activity = Instant::now();
    }
    ring.map.store_tail(tail);
    ring.tail = tail;
    emitted
}

impl<S: Sys> Drop for Rings<S> {
    fn drop(&mut self) {
        for f in &self.fds {
            if let Err(e) = self.sys.perf_event_disable(&f.fd) {
                tracing::warn!(error = %e, "disabling perf event");
            }
        }
        // Then `rings` (munmap) and `fds` (close) drop in field order.
    }
}

#[cfg(test)]
mod tests;
