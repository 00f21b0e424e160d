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
//!   loss notices into the fan-out hub with `try_send`.
//!
//! Teardown runs in the reverse order of setup: the reader stops and drops
//! the rings (closing every perf fd), the engine flushes its flows as final
//! records, the server stops, then the probes are removed and a tracefs we
//! mounted is unmounted. A panic anywhere removes the probes through the
//! panic hook installed before they are created.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cli::exit;
use crate::config::Config;
use crate::decode::{Decoder, EventDesc};
use crate::enrich;
use crate::export::hub::{pipeline_channel, PipelineSender};
use crate::export::server::{self, HealthHandle, ServerOptions};
use crate::export::status::{CpuCounters, StatusSnapshot, StatusSource};
use crate::flow::{Clock, Engine, EngineConfig, EngineStats};
use crate::model::{Event, KernelTime, Loss, LossSource, Output};
use crate::probe::{self, check::CheckStatus, ProbeError, ProbeGuard};
use crate::ring::clock::{PerfClock, SysClockSource, WallClock};
use crate::ring::record::{RecordHeader, RecordedEvent, Recorder};
use crate::ring::{self, RingItem, RingOptions, RingStats, Rings};
use crate::sys;

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
            DaemonError::Server(_) => exit::LISTEN,
            DaemonError::Process(_) | DaemonError::Record(_) | DaemonError::Runtime { .. } => {
                exit::FAILURE
            }
        }
    }
}

/// Runs the daemon until a termination signal; returns the exit code.
pub fn serve(cfg: Config) -> i32 {
    match run(cfg) {
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
            last_error: self.shared.last_error.lock().ok().and_then(|g| g.clone()),
            ..StatusSnapshot::default()
        }
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

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn run(cfg: Config) -> Result<(), DaemonError> {
    probe::install::install_panic_hook();
    let setup = probe::setup(&cfg.socket)?;
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
    let result = run_with_probes(&cfg, &setup, &guard);
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

    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let batch_slots = (cfg.socket.perf_queue_size / EVENT_BATCH).max(1);
    let (event_tx, event_rx) = mpsc::sync_channel::<Vec<Event>>(batch_slots);
    let (lost_tx, lost_rx) = mpsc::sync_channel::<(u32, u64)>(cfg.socket.lost_queue_size.max(1));
    let (pipe_tx, pipe_rx) = pipeline_channel(PIPELINE_CAPACITY);

    let reader = {
        let shared = shared.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sockscope-reader".into())
            .spawn(move || {
                let r = reader_loop(rings, decoder, recorder, event_tx, lost_tx, &shared, &stop);
                if let Err(e) = r {
                    shared.fail("ring reader", e);
                }
            })
            .map_err(|source| DaemonError::Runtime {
                what: "starting the reader thread",
                source,
            })?
    };
    let engine = {
        let shared = shared.clone();
        let engine_cfg = EngineConfig::from_config(cfg, std::process::id());
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sockscope-engine".into())
            .spawn(move || {
                engine_loop(
                    engine_cfg, procs, wall, perf_clock, event_rx, lost_rx, pipe_tx, &shared, &stop,
                )
            })
            .map_err(|source| DaemonError::Runtime {
                what: "starting the engine thread",
                source,
            })?
    };

    let status = Arc::new(DaemonStatus {
        started: Instant::now(),
        kernel_release: kernel_release(),
        offsets_source: match &setup.offsets.provenance {
            probe::btf::Provenance::Btf(p) => format!("btf ({})", p.display()),
        },
        probes: events
            .iter()
            .map(|e| match e.function {
                Some(f) => format!("{}/{} ({f})", e.system, e.name),
                None => format!("{}/{}", e.system, e.name),
            })
            .collect(),
        shared: shared.clone(),
    });
    let served = serve_grpc(cfg, status, pipe_rx, &shared, &setup.tracefs, guard, &stop);
    stop.store(true, Ordering::SeqCst);
    join(reader, "reader");
    join(engine, "engine");
    served
}

fn join(h: JoinHandle<()>, name: &str) {
    if h.join().is_err() {
        tracing::error!("{name} thread panicked");
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
    let group = guard.group().to_string();
    runtime.block_on(async {
        let listeners = server::bind(&opts).await?;
        if let Some(a) = listeners.tcp_addr() {
            tracing::info!(addr = %a, "gRPC listening on TCP");
        }
        if let Some(p) = listeners.unix_path() {
            tracing::info!(path = %p.display(), "gRPC listening on Unix socket");
        }
        health.set_serving(true);

        // Watchdog: kretprobe misses and pipeline liveness.
        let watch_shared = shared.clone();
        let watch_health = health.clone();
        let (failed_tx, mut failed_rx) = tokio::sync::watch::channel(false);
        let watchdog = tokio::spawn(async move {
            let mut tick = tokio::time::interval(MISSES_PERIOD);
            loop {
                tick.tick().await;
                let text = std::fs::read_to_string(&profile_path);
                if let Ok(text) = text {
                    let m = probe::install::parse_profile_misses(&text, &group);
                    watch_shared.kretprobe_misses.store(m, Ordering::Relaxed);
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
        let r = server::serve(listeners, opts, pipe_rx, status, health, shutdown).await;
        watchdog.abort();
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
    pipe: PipelineSender,
    shared: &Shared,
    stop: &AtomicBool,
) {
    let offset = Arc::new(AtomicI64::new(clamp_offset(wall.stats().offset_ns)));
    let clock = EngineClock {
        offset_ns: offset.clone(),
    };
    let mut engine = Engine::new(cfg, clock.clone(), procs);
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
    loop {
        match event_rx.recv_timeout(ENGINE_WAIT) {
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
