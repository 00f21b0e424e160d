//! Wiring of the pipeline stages into the running daemon.
//!
//! Threads and ownership:
//!
//! * the **main thread** runs preflight ([`probe::setup`]), installs the
//!   probes (a [`ProbeGuard`] it owns), then runs the tokio runtime with the
//!   gRPC server until SIGINT/SIGTERM;
//! * the **reader thread** owns the per-CPU [`Rings`], decodes samples
//!   in timestamp order and hands batches of [`Event`]s to the engine over a
//!   bounded queue (`socket.perf_queue_size` samples), never blocking on it;
//! * the **engine thread** owns the flow [`Engine`] and pushes records and
//!   loss notices into the fan-out hub with `try_send`;
//! * the **DNS capture thread** (when `socket.dns.enabled`, the default)
//!   reads DNS responses from an AF_PACKET socket and hands them to the
//!   engine over a bounded channel, which the engine drains before each
//!   batch of events (see [`crate::flow`] for how names reach flows).
//!
//! DNS enrichment is required when enabled: if the capture socket cannot be
//! opened (no CAP_NET_RAW, unknown interface) the daemon exits at start,
//! before any probe is installed, with [`exit::NO_PERMISSION`] or
//! [`exit::USAGE`] and a message naming `socket.dns.enabled`; a capture
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
//! Fault injection for tests: `FAULT_SOCKSCOPE_PANIC_AFTER=<duration>` (e.g.
//! `3s`) makes the daemon panic that long after the gRPC server started
//! listening, in the engine thread or, with
//! `FAULT_SOCKSCOPE_PANIC_THREAD=main`, in the main thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cli::exit;
use crate::config::Config;
use crate::decode::{Decoder, EventDesc};
use crate::enrich;
use crate::enrich::dns::{
    self as dns, CaptureCounters, DnsCapture, DnsError, DnsResponse, DnsTable, DropReason,
    TableLimits, TableStats,
};
use crate::export::ecs::HostInfo;
use crate::export::hub::{pipeline_channel, Hub, PipelineSender};
use crate::export::server::{self, HealthHandle, ServerOptions};
use crate::export::status::DnsCounters;
use crate::export::status::{CpuCounters, StatusSnapshot, StatusSource};
use crate::export::{jsonl, metrics};
use crate::flow::{Clock, Engine, EngineConfig, EngineStats};
use crate::model::{Event, KernelTime, Loss, LossSource, Output};
use crate::probe::{self, check::CheckStatus, ProbeError, ProbeGuard};
use crate::ring::clock::{PerfClock, SysClockSource, WallClock};
use crate::ring::record::{RecordHeader, RecordedEvent, Recorder};
use crate::ring::{self, RingItem, RingOptions, RingStats, Rings};
use crate::sys;
use crate::sys::packet::PacketError;

/// Events handed from the reader to the engine in one queue slot.
const EVENT_BATCH: usize = 256;
/// How long the engine waits for a batch before running its timers.
const ENGINE_WAIT: Duration = Duration::from_millis(100);
/// How often the engine runs expiry and interim updates.
const TICK_PERIOD: Duration = Duration::from_millis(200);
/// How often the reader publishes its counters for status.
const STATS_PERIOD: Duration = Duration::from_secs(1);
/// How often the main loop reads kretprobe misses from tracefs.
const MISSES_PERIOD: Duration = Duration::from_secs(2);
/// Capacity of the engine → hub channel, in outputs.
const PIPELINE_CAPACITY: usize = 16_384;
/// Worker threads of the gRPC runtime.
const RUNTIME_WORKERS: usize = 2;
/// How long the JSON lines output may take to write the flushed records
/// after the server stopped.
const JSONL_DRAIN: Duration = Duration::from_secs(5);

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Preflight or probe installation failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The perf rings could not be opened or read.
    #[error("perf rings: {0}")]
    Ring(#[from] ring::RingError),
    /// An installed event's format did not match what the decoder expects.
    #[error("decoder setup: {0}")]
    Decoder(#[from] crate::decode::SetupError),
    /// The clocks could not be read.
    #[error("clock: {0}")]
    Clock(#[from] sys::SysError),
    /// The process table could not be built from the proc filesystem.
    #[error("process table: {0}")]
    Process(#[from] enrich::process::ProcError),
    /// The sample recording could not be created.
    #[error("recording: {0}")]
    Record(#[from] ring::record::RecordError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] server::ServerError),
    /// The metrics endpoint could not be set up.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The JSON lines output could not be set up.
    #[error("export.jsonl: {0}")]
    Jsonl(#[from] jsonl::JsonlError),
    /// The DNS capture could not be opened or started.
    #[error("DNS enrichment (socket.dns.enabled=true): {0}; run with CAP_NET_RAW or set socket.dns.enabled=false")]
    Dns(#[from] DnsError),
    /// A pipeline thread stopped on its own (failed or panicked).
    #[error("pipeline stopped: {0}")]
    Pipeline(String),
    /// A fault-injection variable is malformed.
    #[error("{var}: {what}")]
    Fault {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// A thread or the runtime could not be started.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being started.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Probe(e) => e.exit_code(),
            DaemonError::Ring(_) | DaemonError::Decoder(_) | DaemonError::Clock(_) => {
                exit::KERNEL_UNSUPPORTED
            }
            DaemonError::Server(_) | DaemonError::Metrics(_) => exit::LISTEN,
            DaemonError::Dns(e) => dns_exit_code(e),
            DaemonError::Fault { .. } => exit::USAGE,
            DaemonError::Jsonl(_)
            | DaemonError::Process(_)
            | DaemonError::Record(_)
            | DaemonError::Pipeline(_)
            | DaemonError::Runtime { .. } => exit::FAILURE,
        }
    }
}

/// Environment variable for fault injection in tests: the daemon panics
/// this long (humantime, e.g. `3s`) after the gRPC server started
/// listening. Not `SOCKSCOPE_…`: that
/// prefix belongs to configuration keys.
pub const FAULT_PANIC_AFTER_VAR: &str = "FAULT_SOCKSCOPE_PANIC_AFTER";
/// Environment variable choosing the thread that panics: `engine`
/// (default) or `main`.
pub const FAULT_PANIC_THREAD_VAR: &str = "FAULT_SOCKSCOPE_PANIC_THREAD";

/// The thread a fault-injection panic happens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultThread {
    /// The flow engine thread (the pipeline notices and shuts down).
    Engine,
    /// The main thread (unwinds through the server and the probe guard).
    Main,
}

/// Faults to inject, read from the environment (tests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Panic in this thread this long after the server started listening.
    pub panic: Option<(FaultThread, Duration)>,
}

impl FaultPlan {
    /// Parses the values of [`FAULT_PANIC_AFTER_VAR`] and
    /// [`FAULT_PANIC_THREAD_VAR`].
    pub fn parse(after: Option<&str>, thread: Option<&str>) -> Result<FaultPlan, DaemonError> {
        let Some(after) = after else {
            return Ok(FaultPlan::default());
        };
        let delay = humantime::parse_duration(after.trim()).map_err(|e| DaemonError::Fault {
            var: FAULT_PANIC_AFTER_VAR,
            what: format!("bad duration {after:?}: {e}"),
        })?;
        let thread = match thread.map(str::trim) {
            None | Some("") | Some("engine") => FaultThread::Engine,
            Some("main") => FaultThread::Main,
            Some(other) => {
                return Err(DaemonError::Fault {
                    var: FAULT_PANIC_THREAD_VAR,
                    what: format!("expected engine or main, got {other:?}"),
                })
            }
        };
        Ok(FaultPlan {
            panic: Some((thread, delay)),
        })
    }

    /// Reads the plan from the environment.
    pub fn from_env() -> Result<FaultPlan, DaemonError> {
        let after = std::env::var(FAULT_PANIC_AFTER_VAR).ok();
        let thread = std::env::var(FAULT_PANIC_THREAD_VAR).ok();
        FaultPlan::parse(after.as_deref(), thread.as_deref())
    }

    /// How long after the server started listening `thread` has to panic.
    fn delay(&self, thread: FaultThread) -> Option<Duration> {
        match self.panic {
            Some((t, d)) if t == thread => Some(d),
            _ => None,
        }
    }
}

/// Exit code of a DNS capture failure: missing privileges, bad
/// configuration, or anything else.
fn dns_exit_code(e: &DnsError) -> i32 {
    match e {
        DnsError::UnsupportedType { .. } | DnsError::Snaplen { .. } => exit::USAGE,
        DnsError::Socket { source, .. } => match source {
            PacketError::Interface { .. } | PacketError::InterfaceName { .. } => exit::USAGE,
            PacketError::Syscall { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                exit::NO_PERMISSION
            }
            _ => exit::FAILURE,
        },
        DnsError::Thread(_) => exit::FAILURE,
    }
}

/// Runs the daemon until a termination signal; returns the exit code.
pub fn serve(cfg: Config) -> i32 {
    let faults = match FaultPlan::from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return e.exit_code();
        }
    };
    if let Some((thread, after)) = faults.panic {
        tracing::warn!(?thread, ?after, "fault injection: the daemon will panic");
    }
    match run(cfg, faults) {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sockscope: {e}");
            e.exit_code()
        }
    }
}

/// Checks every start-up requirement, one line each; returns the exit code
/// of the first failure, or 0.
pub fn check(cfg: &Config) -> i32 {
    let items = probe::check(&cfg.socket);
    let mut code = exit::OK;
    for item in &items {
        println!("{item}");
        if item.status == CheckStatus::Fail && code == exit::OK {
            code = if item.exit_code != 0 {
                item.exit_code
            } else {
                exit::FAILURE
            };
        }
    }
    code
}

/// Counters shared between the pipeline threads and the status service.
#[derive(Debug, Default)]
struct Shared {
    /// Latest ring counters from the reader.
    ring: Mutex<Option<RingStats>>,
    /// Latest engine counters.
    engine: Mutex<EngineStats>,
    /// Samples that failed to decode.
    decode_errors: AtomicU64,
    /// Event batches dropped because the engine queue was full, in events.
    reader_queue_drops: AtomicU64,
    /// Loss notifications dropped because their queue was full, in samples.
    lost_queue_overflow: AtomicU64,
    /// kretprobe misses read from `kprobe_profile`.
    kretprobe_misses: AtomicU64,
    /// Latest DNS table counters from the engine.
    dns_table: Mutex<Option<TableStats>>,
    /// Kernel time up to which the reader has handed every sample to the
    /// engine queue; the engine's clock must not run ahead of it.
    released: AtomicU64,
    /// Set when the reader or engine thread stopped on its own.
    failed: AtomicBool,
    /// Last error of the pipeline.
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::error!("{msg}");
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(msg);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}

/// The daemon's [`StatusSource`].
struct DaemonStatus {
    started: Instant,
    kernel_release: String,
    offsets_source: String,
    probes: Vec<String>,
    shared: Arc<Shared>,
    /// The DNS capture's counters, when DNS enrichment is enabled.
    dns_capture: Option<Arc<CaptureCounters>>,
}

impl StatusSource for DaemonStatus {
    fn snapshot(&self) -> StatusSnapshot {
        let ring = self.shared.ring.lock().ok().and_then(|g| g.clone());
        let engine = self.shared.engine.lock().map(|g| *g).unwrap_or_default();
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
            decode_errors: self.shared.decode_errors.load(Ordering::Relaxed),
            kretprobe_misses: self.shared.kretprobe_misses.load(Ordering::Relaxed),
            tracked_sockets: engine.sockets as u64,
            tracked_flows: engine.flows as u64,
            tracked_processes: engine.processes as u64,
            dns: dns_counters(
                self.dns_capture.as_deref(),
                self.shared.dns_table.lock().ok().and_then(|g| g.clone()),
            ),
            last_error: self.shared.last_error.lock().ok().and_then(|g| g.clone()),
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

/// Wall-clock conversion for the engine: the offset lives in an atomic the
/// engine thread updates after each re-sync.
#[derive(Debug, Clone)]
struct EngineClock {
    offset_ns: Arc<AtomicI64>,
}

impl Clock for EngineClock {
    fn wall(&self, t: KernelTime) -> SystemTime {
        let ns = i128::from(t) + i128::from(self.offset_ns.load(Ordering::Relaxed));
        match u64::try_from(ns) {
            Ok(ns) => UNIX_EPOCH + Duration::from_nanos(ns),
            Err(_) if ns < 0 => UNIX_EPOCH,
            Err(_) => UNIX_EPOCH + Duration::from_nanos(u64::MAX),
        }
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

fn machine() -> Option<String> {
    nix::sys::utsname::uname()
        .ok()
        .map(|u| u.machine().to_string_lossy().into_owned())
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn run(cfg: Config, faults: FaultPlan) -> Result<(), DaemonError> {
    probe::install::install_panic_hook();
    let setup = probe::setup(&cfg.socket)?;
    // Opened before any probe is installed: a missing privilege fails the
    // start with nothing to undo.
    let dns_capture = DnsCapture::open_if_enabled(&cfg.socket.dns)?;
    if dns_capture.is_some() {
        tracing::info!(
            interface = %cfg.socket.dns.af_packet.interface,
            "DNS capture open"
        );
    }
    match probe::install::remove_stale_groups(&setup.tracefs) {
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

fn run_with_probes(
    cfg: &Config,
    setup: &probe::Setup,
    guard: &ProbeGuard,
    dns_capture: Option<DnsCapture>,
    faults: FaultPlan,
) -> Result<(), DaemonError> {
    let events = guard.events();
    let descs: Vec<EventDesc<'_>> = events.iter().map(EventDesc::from).collect();
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
    // Stopped and joined when dropped, after the engine (declared first,
    // dropped last).
    let (dns_thread, dns_rx) = match dns_capture {
        Some(c) => {
            let (thread, rx) = c.spawn(dns::capture::DEFAULT_QUEUE_LEN)?;
            (Some(thread), Some(rx))
        }
        None => (None, None),
    };

    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Set once the gRPC server listens; fault-injection delays count from it.
    let serving_since: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let batch_slots = (cfg.socket.perf_queue_size / EVENT_BATCH).max(1);
    let (event_tx, event_rx) = mpsc::sync_channel::<Vec<Event>>(batch_slots);
    let (lost_tx, lost_rx) = mpsc::sync_channel::<(u32, u64)>(cfg.socket.lost_queue_size.max(1));
    let (pipe_tx, pipe_rx) = pipeline_channel(PIPELINE_CAPACITY);

    // Dropped on every exit path, unwinding included: stops and joins the
    // threads so the rings are closed before the probes are removed.
    let mut threads = PipelineThreads {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    let reader = {
        let shared = shared.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sockscope-reader".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    reader_loop(rings, decoder, recorder, event_tx, lost_tx, &shared, &stop)
                }));
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => shared.fail("ring reader", e),
                    Err(p) => shared.fail("ring reader panicked", panic_message(p.as_ref())),
                }
            })
            .map_err(|source| DaemonError::Runtime {
                what: "starting the reader thread",
                source,
            })?
    };
    threads.threads.push(("reader", reader));
    let engine = {
        let shared = shared.clone();
        let engine_cfg = EngineConfig::from_config(cfg, std::process::id());
        let stop = stop.clone();
        let fault = faults
            .delay(FaultThread::Engine)
            .map(|d| (d, serving_since.clone()));
        std::thread::Builder::new()
            .name("sockscope-engine".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    engine_loop(
                        engine_cfg, procs, wall, perf_clock, event_rx, lost_rx, dns_rx, pipe_tx,
                        &shared, &stop, fault,
                    )
                }));
                if let Err(p) = r {
                    shared.fail("engine panicked", panic_message(p.as_ref()));
                }
            })
            .map_err(|source| DaemonError::Runtime {
                what: "starting the engine thread",
                source,
            })?
    };
    threads.threads.push(("engine", engine));

    let status = Arc::new(DaemonStatus {
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
        shared: shared.clone(),
        dns_capture: dns_thread.as_ref().map(|t| Arc::clone(t.counters())),
    });
    let served = serve_grpc(
        cfg,
        status,
        pipe_rx,
        &shared,
        &setup.tracefs,
        guard,
        &stop,
        faults.delay(FaultThread::Main),
        &serving_since,
    );
    threads.stop_and_join();
    if let Some(t) = dns_thread {
        if let Err(e) = t.stop() {
            tracing::error!("DNS capture: {e}");
        }
    }
    served?;
    if shared.failed.load(Ordering::SeqCst) {
        let msg = shared
            .last_error
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "unknown error".to_string());
        return Err(DaemonError::Pipeline(msg));
    }
    Ok(())
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

/// Resolves on SIGINT or SIGTERM.
async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            tracing::error!(
                "cannot install signal handlers; stop with SIGKILL leaves probes behind"
            );
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received, stopping"),
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
    }
}

/// Runs the gRPC server until a signal or a pipeline failure. Before the
/// server stops, the pipeline is stopped and drained so the flushed final
/// records still reach subscribers.
#[allow(clippy::too_many_arguments)]
fn serve_grpc(
    cfg: &Config,
    status: Arc<DaemonStatus>,
    pipe_rx: crate::export::hub::PipelineReceiver,
    shared: &Arc<Shared>,
    tracefs: &probe::Tracefs,
    guard: &ProbeGuard,
    stop: &Arc<AtomicBool>,
    panic_after: Option<Duration>,
    serving_since: &OnceLock<Instant>,
) -> Result<(), DaemonError> {
    let opts = ServerOptions::from_config(cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("sockscope-grpc")
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Runtime {
            what: "starting the async runtime",
            source,
        })?;
    let health = HealthHandle::new();
    let profile_path = tracefs.root().join("kprobe_profile");
    let events_path = tracefs.root().join("kprobe_events");
    let group = guard.group().to_string();
    runtime.block_on(async {
        let listeners = server::bind(&opts).await?;
        if let Some(a) = listeners.tcp_addr() {
            tracing::info!(addr = %a, "gRPC listening on TCP");
        }
        if let Some(p) = listeners.unix_path() {
            tracing::info!(path = %p.display(), "gRPC listening on Unix socket");
        }
        if let Some(a) = listeners.health_addr() {
            tracing::info!(addr = %a, "gRPC health listening on TCP (plaintext, health only)");
        }
        let metrics_listener = match metrics::parse_listen(&cfg.metrics.listen)? {
            Some(addr) => {
                let l = metrics::bind(addr).await?;
                tracing::info!(addr = %l.local_addr().unwrap_or(addr), "metrics listening");
                Some(l)
            }
            None => None,
        };
        let (hub, hub_task) = Hub::spawn(opts.hub.clone(), pipe_rx);
        let jsonl_task = if cfg.export.jsonl.path.trim().is_empty() {
            None
        } else {
            let host = HostInfo {
                name: opts.hub.host_name.clone(),
                architecture: machine(),
                kernel: Some(status.kernel_release.clone()),
            };
            let t = jsonl::spawn(&hub, &cfg.export.jsonl, host).await?;
            tracing::info!(path = %cfg.export.jsonl.path, "writing flows as JSON lines");
            Some(t)
        };
        let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = metrics_listener.map(|l| {
            let source = metrics::MetricsSource {
                status: status.clone(),
                hub: hub.clone(),
                health: health.clone(),
            };
            tokio::spawn(metrics::serve(l, source, async move {
                let _ = metrics_stop_rx.await;
            }))
        });
        health.set_serving(true);
        let listening = *serving_since.get_or_init(Instant::now);

        // Watchdog: kretprobe misses and pipeline liveness.
        let watch_shared = shared.clone();
        let watch_health = health.clone();
        let (failed_tx, mut failed_rx) = tokio::sync::watch::channel(false);
        let watchdog = tokio::spawn(async move {
            let mut tick = tokio::time::interval(MISSES_PERIOD);
            loop {
                tick.tick().await;
                let events = std::fs::read_to_string(&events_path);
                let profile = std::fs::read_to_string(&profile_path);
                if let (Ok(events), Ok(profile)) = (events, profile) {
                    // An inconsistent pair is read again at the next tick.
                    if let Some(m) = probe::install::parse_profile_misses(&events, &profile, &group)
                    {
                        watch_shared
                            .kretprobe_misses
                            .fetch_max(m, Ordering::Relaxed);
                    }
                }
                if watch_shared.failed.load(Ordering::SeqCst) {
                    watch_health.set_serving(false);
                    let _ = failed_tx.send(true);
                    return;
                }
            }
        });
        let stop_pipeline = stop.clone();
        let shutdown = async move {
            tokio::select! {
                _ = termination_signal() => {}
                _ = failed_rx.wait_for(|f| *f) => {
                    tracing::error!("pipeline stopped; shutting down");
                }
            }
            // Stop the reader; the engine flushes its flows as final
            // records into the hub; give it a moment to deliver them.
            stop_pipeline.store(true, Ordering::SeqCst);
            tokio::time::sleep(SHUTDOWN_DRAIN).await;
        };
        let serving = server::serve_with_hub(listeners, opts, hub, status, health, shutdown);
        let r = match panic_after {
            None => serving.await,
            Some(after) => tokio::select! {
                r = serving => r,
                _ = tokio::time::sleep_until((listening + after).into()) => {
                    panic!("fault injection: main thread panic ({FAULT_PANIC_AFTER_VAR})")
                }
            },
        };
        watchdog.abort();
        let _ = metrics_stop_tx.send(());
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        // The JSON lines stream ends when the engine has flushed its last
        // records and closed the pipeline.
        if let Some(t) = jsonl_task {
            if tokio::time::timeout(JSONL_DRAIN, t).await.is_err() {
                tracing::warn!("JSON lines output did not finish within {JSONL_DRAIN:?}");
            }
        }
        hub_task.abort();
        r.map_err(DaemonError::from)
    })
}

/// Grace period between stopping the pipeline and stopping the server.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// Reads the rings until `stop`, decoding samples into event batches.
fn reader_loop(
    mut rings: Rings,
    decoder: Decoder,
    mut recorder: Option<Recorder<std::io::BufWriter<std::fs::File>>>,
    event_tx: SyncSender<Vec<Event>>,
    lost_tx: SyncSender<(u32, u64)>,
    shared: &Shared,
    stop: &AtomicBool,
) -> Result<(), ring::RingError> {
    let mut batch: Vec<Event> = Vec::with_capacity(EVENT_BATCH);
    let mut last_stats = Instant::now();
    let send_batch = |batch: &mut Vec<Event>| {
        if batch.is_empty() {
            return;
        }
        let full = std::mem::replace(batch, Vec::with_capacity(EVENT_BATCH));
        let n = full.len() as u64;
        match event_tx.try_send(full) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                shared.reader_queue_drops.fetch_add(n, Ordering::Relaxed);
            }
        }
    };
    let mut handle = |item: RingItem<'_>, batch: &mut Vec<Event>| {
        if let Some(rec) = recorder.as_mut() {
            if let Err(e) = rec.write(&item) {
                tracing::error!("recording stopped: {e}");
                recorder = None;
            }
        }
        match item {
            RingItem::Sample(s) => match decoder.decode(&s) {
                Ok(Some(ev)) => {
                    batch.push(ev);
                    if batch.len() >= EVENT_BATCH {
                        send_batch(batch);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("decode: {e}");
                }
            },
            RingItem::Lost { cpu, count } => {
                if lost_tx.try_send((cpu, count)).is_err() {
                    shared
                        .lost_queue_overflow
                        .fetch_add(count, Ordering::Relaxed);
                }
            }
        }
    };
    let clockid = rings.clock().clockid();
    while !stop.load(Ordering::SeqCst) {
        // Every sample stamped before this bound is released by the pass
        // below (the pass reads the clock again, later). Without a readable
        // clock the engine's own clock is not bounded.
        let bound = match clockid {
            Some(c) => sys::clock_gettime_ns(c).map_or(0, |t| {
                t.saturating_sub(ring::REORDER_SLACK.as_nanos() as u64)
            }),
            None => u64::MAX,
        };
        rings.read(ring::DEFAULT_POLL_TIMEOUT, &mut |item| {
            handle(item, &mut batch)
        })?;
        send_batch(&mut batch);
        shared.released.store(bound, Ordering::Release);
        if last_stats.elapsed() >= STATS_PERIOD {
            last_stats = Instant::now();
            if let Ok(mut g) = shared.ring.lock() {
                *g = Some(rings.stats());
            }
        }
    }
    rings.flush(&mut |item| handle(item, &mut batch));
    send_batch(&mut batch);
    if let Ok(mut g) = shared.ring.lock() {
        *g = Some(rings.stats());
    }
    if let Some(rec) = recorder.take() {
        if let Err(e) = rec.finish() {
            tracing::error!("finishing the recording: {e}");
        }
    }
    Ok(())
}

/// Tracks the growth of a counter so each increase is reported once.
#[derive(Debug, Default)]
struct Delta {
    seen: u64,
}

impl Delta {
    fn take(&mut self, now: u64) -> u64 {
        let d = now.saturating_sub(self.seen);
        self.seen = now;
        d
    }
}

/// Runs the flow engine until the reader is gone and `stop` is set.
#[allow(clippy::too_many_arguments)]
fn engine_loop(
    cfg: EngineConfig,
    procs: enrich::process::ProcessTable,
    mut wall: WallClock,
    perf_clock: PerfClock,
    event_rx: Receiver<Vec<Event>>,
    lost_rx: Receiver<(u32, u64)>,
    mut dns_rx: Option<Receiver<DnsResponse>>,
    pipe: PipelineSender,
    shared: &Shared,
    stop: &AtomicBool,
    fault: Option<(Duration, Arc<OnceLock<Instant>>)>,
) {
    let offset = Arc::new(AtomicI64::new(clamp_offset(wall.stats().offset_ns)));
    let clock = EngineClock {
        offset_ns: offset.clone(),
    };
    let mut engine = Engine::new(cfg, clock.clone(), procs);
    if dns_rx.is_some() {
        engine = engine.with_dns(DnsTable::new(TableLimits::default()));
    }
    let mut source = SysClockSource::new(perf_clock);
    let mut out: Vec<Output> = Vec::with_capacity(EVENT_BATCH);
    let mut last_tick = Instant::now();
    let mut decode_errors = Delta::default();
    let mut queue_drops = Delta::default();
    let mut lost_overflow = Delta::default();
    let mut misses = Delta::default();
    let now_kernel = || sys::clock_gettime_ns(perf_clock.read_clockid()).unwrap_or(0);
    let publish = |out: &mut Vec<Output>| {
        for o in out.drain(..) {
            pipe.send(o);
        }
    };
    // Responses are fed in before the events that follow them: they usually
    // reach the engine before the (batched) probe events of the same query.
    let drain_dns = |engine: &mut Engine<EngineClock>, rx: &mut Option<Receiver<DnsResponse>>| {
        let Some(r) = rx.as_ref() else { return };
        let mut now = None;
        loop {
            match r.try_recv() {
                Ok(resp) => {
                    let t = *now.get_or_insert_with(now_kernel);
                    engine.observe_dns(t, &resp);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    *rx = None;
                    shared.fail("DNS capture", "the capture thread stopped");
                    return;
                }
            }
        }
    };
    loop {
        let panic_due = fault
            .as_ref()
            .and_then(|(after, since)| since.get().map(|t| t.elapsed() >= *after));
        if panic_due == Some(true) {
            panic!("fault injection: engine thread panic ({FAULT_PANIC_AFTER_VAR})");
        }
        let received = event_rx.recv_timeout(ENGINE_WAIT);
        drain_dns(&mut engine, &mut dns_rx);
        match received {
            Ok(batch) => engine.handle_batch(&batch, &mut out),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while let Ok((cpu, count)) = lost_rx.try_recv() {
            let t = clock.wall(now_kernel());
            out.push(Output::Loss(Loss {
                source: LossSource::KernelRing,
                cpu: Some(cpu),
                count,
                first: t,
                last: t,
            }));
        }
        if last_tick.elapsed() >= TICK_PERIOD {
            last_tick = Instant::now();
            // Expiry runs on the time the reader has fully delivered, not the
            // wall clock: a reader delayed (descheduled, or behind under
            // load) must not make flows final before their last packets are
            // counted. Batches sent before `released` was published are
            // handled first.
            let released = shared.released.load(Ordering::Acquire);
            while let Ok(batch) = event_rx.try_recv() {
                engine.handle_batch(&batch, &mut out);
            }
            let now = now_kernel();
            match wall.sync_if_due(now, &mut source) {
                Ok(Some(_)) => {
                    offset.store(clamp_offset(wall.stats().offset_ns), Ordering::Relaxed)
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("clock re-sync failed: {e}"),
            }
            let t = clock.wall(now);
            for (source, n) in [
                (
                    LossSource::DecodeError,
                    decode_errors.take(shared.decode_errors.load(Ordering::Relaxed)),
                ),
                (
                    LossSource::ReaderQueue,
                    queue_drops.take(shared.reader_queue_drops.load(Ordering::Relaxed))
                        + lost_overflow.take(shared.lost_queue_overflow.load(Ordering::Relaxed)),
                ),
                (
                    LossSource::KretprobeMiss,
                    misses.take(shared.kretprobe_misses.load(Ordering::Relaxed)),
                ),
            ] {
                if n > 0 {
                    out.push(Output::Loss(Loss {
                        source,
                        cpu: None,
                        count: n,
                        first: t,
                        last: t,
                    }));
                }
            }
            engine.tick(now.min(released), &mut out);
            if let Ok(mut g) = shared.engine.lock() {
                *g = engine.stats();
            }
            if let Ok(mut g) = shared.dns_table.lock() {
                *g = engine.dns_stats();
            }
        }
        publish(&mut out);
    }
    // The reader has stopped and dropped its sender: everything left is final.
    let _ = stop;
    engine.flush(&mut out);
    publish(&mut out);
    if let Ok(mut g) = shared.engine.lock() {
        *g = engine.stats();
    }
}

fn clamp_offset(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_error(source: PacketError) -> DaemonError {
        DaemonError::Dns(DnsError::Socket {
            interface: "any".into(),
            source,
        })
    }

    #[test]
    fn dns_capture_failures_map_to_documented_exit_codes() {
        let eperm = socket_error(PacketError::Syscall {
            call: "socket",
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(eperm.exit_code(), exit::NO_PERMISSION);
        let msg = eperm.to_string();
        assert!(
            msg.contains("socket.dns.enabled=false") && msg.contains("socket"),
            "{msg}"
        );
        let unknown_if = socket_error(PacketError::Interface {
            name: "nope0".into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        });
        assert_eq!(unknown_if.exit_code(), exit::USAGE);
        let other = socket_error(PacketError::Syscall {
            call: "bind",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        });
        assert_eq!(other.exit_code(), exit::FAILURE);
        let kind = DaemonError::Dns(DnsError::UnsupportedType {
            kind: "pcap".into(),
        });
        assert_eq!(kind.exit_code(), exit::USAGE);
    }

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
    fn fault_plan_absent_means_no_fault() {
        assert_eq!(
            FaultPlan::parse(None, Some("main")).unwrap(),
            FaultPlan::default()
        );
    }

    #[test]
    fn fault_plan_parses_duration_and_thread() {
        let p = FaultPlan::parse(Some("3s"), None).unwrap();
        assert_eq!(p.panic, Some((FaultThread::Engine, Duration::from_secs(3))));
        let p = FaultPlan::parse(Some("250ms"), Some("main")).unwrap();
        assert_eq!(
            p.panic,
            Some((FaultThread::Main, Duration::from_millis(250)))
        );
        assert_eq!(p.delay(FaultThread::Engine), None);
        assert_eq!(p.delay(FaultThread::Main), Some(Duration::from_millis(250)));
    }

    #[test]
    fn fault_plan_rejects_garbage() {
        let e = FaultPlan::parse(Some("soon"), None).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(e.to_string().contains(FAULT_PANIC_AFTER_VAR), "{e}");
        let e = FaultPlan::parse(Some("1s"), Some("reader")).unwrap_err();
        assert!(e.to_string().contains(FAULT_PANIC_THREAD_VAR), "{e}");
    }

    #[test]
    fn panic_message_reads_str_and_string_payloads() {
        let p = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "plain");
        let n = 7;
        let p = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "formatted 7");
    }
}
