//! Status assembly: the counters and failure state the pipeline threads
//! publish ([`PipelineState`]), and the daemon's [`StatusSource`] that turns
//! them, with the host and probe facts fixed at start, into the snapshot
//! behind `GetStatus`, `WatchStatus` and the metrics endpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::enrich::dns::{CaptureCounters, DropReason, TableStats};
use crate::enrich::pods::resolver::PodStatusHandle;
use crate::export::status::{CpuCounters, DnsCounters, StatusSnapshot, StatusSource};
use crate::flow::EngineStats;
use crate::model::NodeInfo;
use crate::probe::{self, InstalledEvent};
use crate::ring::RingStats;

/// Counters and failure state shared between the pipeline threads and the
/// status service.
#[derive(Debug, Default)]
pub(super) struct PipelineState {
    /// Latest ring counters from the reader.
    pub(super) ring: Mutex<Option<RingStats>>,
    /// Latest engine counters.
    pub(super) engine: Mutex<EngineStats>,
    /// Samples that failed to decode.
    pub(super) decode_errors: AtomicU64,
    /// Event batches dropped because the engine queue was full, in events.
    pub(super) reader_queue_drops: AtomicU64,
    /// Loss notifications dropped because their queue was full, in samples.
    pub(super) lost_queue_overflow: AtomicU64,
    /// kretprobe misses read from `kprobe_profile`.
    pub(super) kretprobe_misses: AtomicU64,
    /// Latest DNS table counters from the engine.
    pub(super) dns_table: Mutex<Option<TableStats>>,
    /// Kernel time up to which the reader has handed every sample to the
    /// engine queue; the engine's clock must not run ahead of it.
    pub(super) released: AtomicU64,
    /// Set when the reader or engine thread stopped on its own.
    pub(super) failed: AtomicBool,
    /// Last error of the pipeline.
    pub(super) last_error: Mutex<Option<String>>,
}

impl PipelineState {
    /// Records that a pipeline thread stopped on its own, and why.
    pub(super) fn fail(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::error!("{msg}");
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(msg);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The last error, once a pipeline thread has stopped on its own.
    pub(super) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "unknown error".to_string()),
        )
    }
}

/// The daemon's [`StatusSource`].
pub(super) struct DaemonStatus {
    started: Instant,
    /// The running kernel's release (`uname -r`).
    pub(super) kernel_release: String,
    offsets_source: String,
    probes: Vec<String>,
    state: Arc<PipelineState>,
    /// The DNS capture's counters, when DNS enrichment is enabled.
    dns_capture: Option<Arc<CaptureCounters>>,
    /// The node's facts, read at start.
    node: NodeInfo,
    /// The pod resolver's counters, when it runs.
    pods: Option<PodStatusHandle>,
}

impl DaemonStatus {
    /// The status of a daemon that starts now with `setup`'s offsets and
    /// the installed `events`.
    pub(super) fn new(
        setup: &probe::Setup,
        events: &[InstalledEvent],
        state: Arc<PipelineState>,
        dns_capture: Option<Arc<CaptureCounters>>,
        node: NodeInfo,
        pods: Option<PodStatusHandle>,
    ) -> DaemonStatus {
        DaemonStatus {
            started: Instant::now(),
            kernel_release: kernel_release(),
            offsets_source: offsets_source(setup),
            probes: events
                .iter()
                .map(|e| match e.function {
                    Some(f) => format!("{}/{} ({f})", e.system, e.name),
                    None => format!("{}/{}", e.system, e.name),
                })
                .collect(),
            state,
            dns_capture,
            node,
            pods,
        }
    }
}

impl DaemonStatus {
    /// The node's facts, read at start.
    pub(super) fn node(&self) -> &NodeInfo {
        &self.node
    }
}

impl StatusSource for DaemonStatus {
    fn snapshot(&self) -> StatusSnapshot {
        let ring = self.state.ring.lock().ok().and_then(|g| g.clone());
        let engine = self.state.engine.lock().map(|g| *g).unwrap_or_default();
        StatusSnapshot {
            uptime: self.started.elapsed(),
            kernel_release: self.kernel_release.clone(),
            offsets_source: self.offsets_source.clone(),
            probes: self.probes.clone(),
            cpus: ring
                .map(|r| {
                    r.cpus
                        .iter()
                        .map(|c| CpuCounters {
                            cpu: c.cpu,
                            samples: c.samples,
                            lost: c.lost,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            decode_errors: self.state.decode_errors.load(Ordering::Relaxed),
            kretprobe_misses: self.state.kretprobe_misses.load(Ordering::Relaxed),
            tracked_sockets: engine.sockets as u64,
            tracked_flows: engine.flows as u64,
            tracked_processes: engine.processes as u64,
            dns: dns_counters(
                self.dns_capture.as_deref(),
                self.state.dns_table.lock().ok().and_then(|g| g.clone()),
            ),
            last_error: self.state.last_error.lock().ok().and_then(|g| g.clone()),
            node: self.node.clone(),
            pods: self.pods.as_ref().map(PodStatusHandle::status),
        }
    }
}

/// The status API's DNS counters: packets captured, A/AAAA answers kept
/// for a process, packets not decoded (the outgoing copy of a loopback
/// packet, which AF_PACKET shows twice, is not an error), and the
/// address-to-name entries held (per-process and host-wide maps).
fn dns_counters(capture: Option<&CaptureCounters>, table: Option<TableStats>) -> DnsCounters {
    let capture = capture.map(CaptureCounters::snapshot).unwrap_or_default();
    let table = table.unwrap_or_default();
    DnsCounters {
        packets: capture.packets_seen,
        answers: table.answers_kept,
        parse_errors: capture
            .dropped_total()
            .saturating_sub(capture.dropped(DropReason::Outgoing)),
        entries: (table.process_entries + table.host_entries) as u64,
    }
}

/// Where the offsets came from, with each guess's result and duration when
/// they were guessed.
fn offsets_source(setup: &probe::Setup) -> String {
    match &setup.offsets.provenance {
        probe::btf::Provenance::Btf(p) => format!("btf ({})", p.display()),
        probe::btf::Provenance::Guess { why } => {
            let guesses: Vec<String> = setup.guesses.iter().map(|g| g.to_string()).collect();
            format!("guess ({why}): {}", guesses.join("; "))
        }
    }
}

fn kernel_release() -> String {
    crate::sys::node::uname()
        .map(|u| u.release)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_counters_sum_both_maps() {
        let table = TableStats {
            answers_kept: 3,
            process_entries: 2,
            host_entries: 5,
            ..TableStats::default()
        };
        let c = dns_counters(Some(&CaptureCounters::default()), Some(table));
        assert_eq!(
            (c.packets, c.answers, c.parse_errors, c.entries),
            (0, 3, 0, 7)
        );
        assert_eq!(dns_counters(None, None), DnsCounters::default());
    }

    #[test]
    fn failure_is_reported_once_a_thread_failed() {
        let state = PipelineState::default();
        assert_eq!(state.failure(), None);
        state.fail("ring reader", "poll: EINTR");
        assert_eq!(state.failure().as_deref(), Some("ring reader: poll: EINTR"));
    }
}
