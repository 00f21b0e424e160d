//! Wiring of the pipeline stages into the running daemon.
//!
//! Threads and ownership:
//!
//! * the **main thread** runs preflight ([`probe::setup`]), installs the
//!   probes (a [`ProbeGuard`] it owns), then runs the tokio runtime with the
//!   gRPC server until SIGINT/SIGTERM (module `grpc`);
//! * the **reader thread** owns the per-CPU [`Rings`], decodes samples
//!   in timestamp order and hands batches of [`Event`]s to the engine over a
//!   bounded queue (`socket.perf_queue_size` samples), never blocking on it
//!   (module `reader`);
//! * the **engine thread** owns the flow [`Engine`] and pushes records and
//!   loss notices into the fan-out hub with `try_send` (module `engine`);
//! * the **DNS capture thread** (when `socket.dns.enabled`, the default)
//!   reads DNS responses from an AF_PACKET socket and hands them to the
//!   engine over a bounded channel, which the engine drains before each
//!   batch of events (see [`crate::flow`] for how names reach flows).
//!
//! What the threads share is one `Pipeline` value: the counters and failure
//! state the status service reads (`PipelineState`, module `status`), the
//! stop flag, and the moment the server started listening. Each stage owns
//! its ends of the queues between them.
//!
//! DNS enrichment is required when enabled: if the capture socket cannot be
//! opened (no CAP_NET_RAW, unknown interface) the daemon exits at start,
//! before any probe is installed, with [`ExitCode::NoPermission`] or
//! [`ExitCode::Usage`] and a message naming `socket.dns.enabled`; a capture
//! thread that stops later stops the daemon like any pipeline failure.
//!
//! Teardown runs in the reverse order of setup: the reader stops and drops
//! the rings (closing every perf fd), the engine flushes its flows as final
//! records, the server stops, then the probes are removed and a tracefs we
//! mounted is unmounted. A panic anywhere removes the probes: the panic hook
//! installed before they are created tries first (the kernel refuses while
//! perf events are open), then unwinding stops and joins the pipeline
//! threads (closing the rings) before the [`ProbeGuard`] is dropped; a
//! panicked pipeline thread shuts the daemon down with a non-zero exit.
//!
//! Fault injection for tests: see [`fault`].
//!
//! [`Rings`]: crate::ring::Rings
//! [`Event`]: crate::model::Event
//! [`Engine`]: crate::flow::Engine

mod engine;
mod error;
pub mod fault;
mod grpc;
pub mod pods;
mod reader;
pub mod replay;
mod sinks;
mod status;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

pub use error::DaemonError;
pub use fault::{FaultPlan, FaultThread, FAULT_PANIC_AFTER_VAR, FAULT_PANIC_THREAD_VAR};

use crate::config::Config;
use crate::decode::{Decoder, EventDesc};
use crate::enrich::host::read_node;
use crate::enrich::{self, dns, dns::DnsCapture};
use crate::exit::ExitCode;
use crate::export::hub::pipeline_channel;
use crate::model::Event;
use crate::probe::{self, check::CheckStatus, InstalledEvent, ProbeGuard};
use crate::ring::clock::{SysClockSource, WallClock};
use crate::ring::recording::{RecordHeader, RecordedEvent, Recorder};
use crate::ring::{self, RingOptions, Rings};
use engine::EngineStage;
use grpc::Grpc;
use reader::{Reader, EVENT_BATCH};
use status::{DaemonStatus, PipelineState};

/// Capacity of the engine → hub channel, in outputs.
const PIPELINE_CAPACITY: usize = 16_384;

/// Runs the daemon until a termination signal; returns the exit code.
pub fn serve(cfg: Config) -> ExitCode {
    let faults = match FaultPlan::from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::from(&e);
        }
    };
    if let Some((thread, after)) = faults.panic {
        tracing::warn!(?thread, ?after, "fault injection: the daemon will panic");
    }
    if !crate::sys::tune_allocator() {
        tracing::warn!("the C library refused the allocator settings; keeping its defaults");
    }
    match run(cfg, faults) {
        Ok(()) => ExitCode::Ok,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sockscope: {e}");
            ExitCode::from(&e)
        }
    }
}

/// Checks every start-up requirement, one line each; returns the exit code
/// of the first failure, or [`ExitCode::Ok`].
pub fn check(cfg: &Config) -> ExitCode {
    let items = probe::check(&cfg.socket);
    let mut code = ExitCode::Ok;
    for item in &items {
        println!("{item}");
        if item.status == CheckStatus::Fail && code == ExitCode::Ok {
            code = match ExitCode::from_code(item.exit_code) {
                None | Some(ExitCode::Ok) => ExitCode::Failure,
                Some(c) => c,
            };
        }
    }
    code
}

/// What every pipeline thread and the server share; cheap to clone.
#[derive(Debug, Clone, Default)]
struct Pipeline {
    /// Counters and failure state, read by the status service.
    state: Arc<PipelineState>,
    /// Set to stop the reader; the engine stops when the reader is gone.
    stop: Arc<AtomicBool>,
    /// Set once the gRPC server listens; fault-injection delays count from
    /// it.
    serving_since: Arc<OnceLock<Instant>>,
}

/// Preflight, the DNS capture socket and the probes, then the pipeline;
/// the probes are removed whatever the pipeline's outcome.
fn run(cfg: Config, faults: FaultPlan) -> Result<(), DaemonError> {
    // The configuration checked the filters' shape; their fields are
    // checked here, before anything is set up.
    sinks::check_filters(&cfg)?;
    probe::install::install_panic_hook();
    let setup = probe::setup(&cfg.socket)?;
    if let probe::btf::Provenance::Guess { why } = &setup.offsets.provenance {
        // One line, the fields as `sockscope check` prints them.
        let fields: Vec<String> = setup
            .offsets
            .to_string()
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        tracing::info!(why = %why, offsets = %fields.join("; "), "struct offsets guessed");
    }
    // Opened before any probe is installed: a missing privilege fails the
    // start with nothing to undo.
    let dns_capture = DnsCapture::open_if_enabled(&cfg.socket.dns)?;
    if dns_capture.is_some() {
        tracing::info!(
            interface = %cfg.socket.dns.af_packet.interface,
            "DNS capture open"
        );
    }
    match probe::group::remove_stale_groups(&setup.tracefs) {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(groups = ?removed, "removed probes of dead instances")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("could not remove stale probe groups: {e}"),
    }
    let mut guard = ProbeGuard::install(&setup.tracefs, &setup.probes)?;
    tracing::info!(
        group = guard.group(),
        events = guard.events().len(),
        ipv6 = setup.ipv6,
        "probes installed"
    );
    let result = run_with_probes(&cfg, &setup, &guard, dns_capture, faults);
    // The rings are closed by now (the reader thread has been joined), so
    // the kernel lets the probes go.
    if let Err(e) = guard.remove() {
        tracing::error!("removing probes: {e}");
    }
    result
}

/// Opens the rings, starts the reader and engine threads and serves gRPC
/// until the daemon stops; the threads are joined before it returns.
fn run_with_probes(
    cfg: &Config,
    setup: &probe::Setup,
    guard: &ProbeGuard,
    dns_capture: Option<DnsCapture>,
    faults: FaultPlan,
) -> Result<(), DaemonError> {
    let events = guard.events();
    let descs: Vec<EventDesc<'_>> = events.iter().map(InstalledEvent::decoder_desc).collect();
    let decoder = Decoder::new(&descs)?;
    let cpus = ring::online_cpus()?;
    let ids: Vec<u64> = events.iter().map(|e| u64::from(e.id)).collect();
    let rings = Rings::open_real(
        &ids,
        &cpus,
        &RingOptions {
            ring_size_exponent: cfg.socket.ring_size_exponent,
            wakeup: None,
        },
    )?;
    for (i, e) in events.iter().enumerate() {
        if let Some(f) = e.filter {
            rings.set_filter(i, f)?;
        }
    }
    let perf_clock = rings.clock();
    let wall = WallClock::from_source(
        &mut SysClockSource::new(perf_clock),
        cfg.socket.clock_sync_period,
        cfg.socket.clock_max_drift,
    )?
    .ok_or_else(|| DaemonError::Runtime {
        what: "measuring the kernel clock offset",
        source: std::io::Error::other("no consistent clock reading"),
    })?;
    let recorder = match &cfg.socket.record_path {
        Some(path) => {
            let header = RecordHeader {
                clock: perf_clock.as_str().to_string(),
                events: events
                    .iter()
                    .map(|e| RecordedEvent {
                        name: format!("{}/{}", e.system, e.name),
                        format: e.format.clone(),
                    })
                    .collect(),
            };
            tracing::info!(path = %path.display(), "recording raw samples");
            Some(Recorder::create(path, &header)?)
        }
        None => None,
    };
    let procs = enrich::open_process_table(cfg)?;
    // After the probes: a connection opened from now on is seen by them.
    let sockets = enrich::sockets::take(&cfg.socket.proc_root);
    let st = sockets.stats;
    tracing::info!(
        sockets = st.sockets,
        owned = st.owned,
        descriptors = st.fds,
        took_ms = st.took.as_millis() as u64,
        "TCP sockets that existed at start"
    );
    if st.sockets_cut > 0 || st.fd_scan_cut || st.bad_lines > 0 {
        tracing::warn!(
            left_out = st.sockets_cut,
            descriptor_scan_cut = st.fd_scan_cut,
            bad_lines = st.bad_lines,
            "the start-up socket snapshot is partial"
        );
    }
    // Stopped and joined when dropped, after the engine (declared first,
    // dropped last).
    let (dns_thread, dns_rx) = match dns_capture {
        Some(c) => {
            let (thread, rx) = c.spawn(dns::capture::DEFAULT_QUEUE_LEN)?;
            (Some(thread), Some(rx))
        }
        None => (None, None),
    };

    let pipeline = Pipeline::default();
    let batch_slots = (cfg.socket.perf_queue_size / EVENT_BATCH).max(1);
    let (event_tx, event_rx) = mpsc::sync_channel::<Vec<Event>>(batch_slots);
    let (lost_tx, lost_rx) = mpsc::sync_channel::<(u32, u64)>(cfg.socket.lost_queue_size.max(1));
    let (pipe_tx, pipe_rx) = pipeline_channel(PIPELINE_CAPACITY);

    // Dropped on every exit path, unwinding included: stops and joins the
    // threads so the rings are closed before the probes are removed.
    let mut threads = PipelineThreads {
        stop: pipeline.stop.clone(),
        threads: Vec::new(),
    };
    let reader = Reader {
        rings,
        decoder,
        recorder,
        event_tx,
        lost_tx,
    };
    let handle = spawn_stage(&pipeline, READER_THREAD, move |p| reader.run(p))?;
    threads.threads.push(("reader", handle));
    let pods = pods::start(cfg)?;
    let pod_status = pods.as_ref().map(|v| v.status_handle());
    let engine = EngineStage {
        config: engine::engine_config(cfg),
        pods,
        procs,
        sockets,
        wall,
        perf_clock,
        event_rx,
        lost_rx,
        dns_rx,
        pipe: pipe_tx,
        panic_after: faults.delay(FaultThread::Engine),
    };
    let handle = spawn_stage(&pipeline, ENGINE_THREAD, move |p| {
        engine.run(p);
        Ok::<(), std::convert::Infallible>(())
    })?;
    threads.threads.push(("engine", handle));

    let node = read_node(&enrich::host_root(cfg), &cfg.socket.proc_root);
    let status = Arc::new(DaemonStatus::new(
        setup,
        events,
        pipeline.state.clone(),
        dns_thread.as_ref().map(|t| Arc::clone(t.counters())),
        node,
        pod_status,
    ));
    let served = Grpc {
        cfg,
        status,
        pipe_rx,
        tracefs: &setup.tracefs,
        group: guard.group().to_string(),
        panic_after: faults.delay(FaultThread::Main),
    }
    .serve(&pipeline);
    threads.stop_and_join();
    if let Some(t) = dns_thread {
        if let Err(e) = t.stop() {
            tracing::error!("DNS capture: {e}");
        }
    }
    served?;
    match pipeline.state.failure() {
        Some(msg) => Err(DaemonError::Pipeline(msg)),
        None => Ok(()),
    }
}

/// How a pipeline thread is named and reported.
struct StageThread {
    /// The thread's name.
    name: &'static str,
    /// The stage, in failure messages.
    label: &'static str,
    /// The start, in the error when the thread cannot be started.
    starting: &'static str,
}

/// The reader thread.
const READER_THREAD: StageThread = StageThread {
    name: "sockscope-reader",
    label: "ring reader",
    starting: "starting the reader thread",
};

/// The engine thread.
const ENGINE_THREAD: StageThread = StageThread {
    name: "sockscope-engine",
    label: "engine",
    starting: "starting the engine thread",
};

/// Starts a pipeline thread running `body`; an error it returns or a panic
/// is recorded as the pipeline's failure.
fn spawn_stage<E: std::fmt::Display>(
    pipeline: &Pipeline,
    stage: StageThread,
    body: impl FnOnce(&Pipeline) -> Result<(), E> + Send + 'static,
) -> Result<JoinHandle<()>, DaemonError> {
    let pipeline = pipeline.clone();
    std::thread::Builder::new()
        .name(stage.name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| body(&pipeline)));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => pipeline.state.fail(stage.label, e),
                Err(p) => pipeline.state.fail(
                    &format!("{} panicked", stage.label),
                    panic_message(p.as_ref()),
                ),
            }
        })
        .map_err(|source| DaemonError::Runtime {
            what: stage.starting,
            source,
        })
}

/// The reader and engine threads; stops and joins them when dropped.
struct PipelineThreads {
    stop: Arc<AtomicBool>,
    /// In join order: the reader first (its exit disconnects the engine).
    threads: Vec<(&'static str, JoinHandle<()>)>,
}

impl PipelineThreads {
    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (name, h) in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::error!("{name} thread panicked");
            }
        }
    }
}

impl Drop for PipelineThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The message of a caught panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_reads_str_and_string_payloads() {
        let p = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "plain");
        let n = 7;
        let p = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "formatted 7");
    }
}
