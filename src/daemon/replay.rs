//! `sockscope replay FILE`: a recording made with `socket.record_path`
//! run through the daemon's own decoder, flow engine and export encoding,
//! at full speed, on any machine (no kprobes, no privileges).
//!
//! It is the way to profile the user-space pipeline natively: record in a
//! VM (or on a production host), replay here under `perf record`. The
//! stages are the production ones: the decoder is built from the recorded
//! format files with each event's declared kind ([`ProbeDecl::of_event`]),
//! the engine gets the daemon's [`engine_config`], runs its timers every
//! [`TICK_PERIOD`] of recorded time, and every flow record is converted
//! and protobuf-encoded once ([`EncodedFlow`]), as the fan-out does.
//!
//! What differs from a live daemon: processes come only from the recorded
//! exec/fork/exit/creds events (this machine's `/proc` knows nothing of
//! the recorded pids, see [`NoProcesses`]), there is no DNS capture, and
//! wall times are kernel times (since the recorded machine's boot) from the
//! Unix epoch.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::engine::engine_config;
use super::error::DaemonError;
use super::sinks::Sinks;
use crate::config::Config;
use crate::decode::{Decoder, DecoderKind, EventDesc};
use crate::enrich::process::{NoProcesses, ProcessTable, ProcessTableConfig};
use crate::enrich::users::UserDb;
use crate::export::ecs::{self, HostInfo};
use crate::export::encoded::EncodedFlow;
use crate::export::hub::{pipeline_channel, Hub, PipelineSender};
use crate::export::server::ServerOptions;
use crate::export::sink::SinkReport;
use crate::flow::{Engine, OffsetClock};
use crate::model::{Accounting, Event, KernelTime, Output};
use crate::probe::group::group_pid;
use crate::probe::spec::ProbeDecl;
use crate::ring::recording::Replay;
use crate::ring::RingItem;
use crate::sys;

/// Events handed to the engine at once (as the reader batches them).
const REPLAY_BATCH: usize = 256;
/// Recorded time between two runs of the engine's timers (the daemon's
/// engine tick).
const TICK_PERIOD: Duration = Duration::from_millis(200);
/// Host name given to replayed flows.
const REPLAY_HOST: &str = "replay";
/// Own pid of a recording without a probe group: no process has it (pids
/// stay below 2^22).
const NO_PID: u32 = u32::MAX;
/// Most repetitions of one replay.
pub const MAX_REPEAT: u32 = 1_000;

/// What to do with the flows of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutput {
    /// Count them only.
    Summary,
    /// Also write one ECS document per final flow.
    Ecs,
}

/// Counters of a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Samples read from the file (all repetitions).
    pub samples: u64,
    /// Samples the recording says the kernel lost.
    pub lost: u64,
    /// Samples that failed to decode.
    pub decode_errors: u64,
    /// Events handed to the flow engine.
    pub events: u64,
    /// Final flow records.
    pub final_flows: u64,
    /// Interim flow records.
    pub interim_flows: u64,
    /// Loss notices the engine emitted.
    pub loss_notices: u64,
    /// Bytes of encoded flow records.
    pub encoded_bytes: u64,
    /// Wall time of the replay.
    pub wall: Duration,
    /// CPU time of this process during the replay.
    pub cpu: Duration,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_cpu_s = if self.cpu.is_zero() {
            0.0
        } else {
            self.samples as f64 / self.cpu.as_secs_f64()
        };
        write!(
            f,
            "samples {} (lost in the kernel {}, decode errors {}), events {}, \
             flows {} final + {} interim ({} encoded bytes), loss notices {}; \
             wall {:.3} s, cpu {:.3} s: {:.2} M samples per CPU-second",
            self.samples,
            self.lost,
            self.decode_errors,
            self.events,
            self.final_flows,
            self.interim_flows,
            self.encoded_bytes,
            self.loss_notices,
            self.wall.as_secs_f64(),
            self.cpu.as_secs_f64(),
            per_cpu_s / 1e6
        )
    }
}

fn cpu_now() -> Result<Duration, DaemonError> {
    Ok(Duration::from_nanos(sys::clock_gettime_ns(
        libc::CLOCK_PROCESS_CPUTIME_ID,
    )?))
}

/// Replays `path` `repeat` times (each through a fresh engine), writing ECS
/// documents of the final flows to `out` when asked.
pub fn replay(
    cfg: &Config,
    path: &Path,
    repeat: u32,
    output: ReplayOutput,
    out: &mut dyn Write,
) -> Result<ReplayReport, DaemonError> {
    replay_to(cfg, path, repeat, output, out, None)
}

/// [`replay`], also handing every output of the engine to `pipe` (the
/// fan-out hub of a replay through the sinks), waiting for room rather
/// than dropping.
pub(super) fn replay_to(
    cfg: &Config,
    path: &Path,
    repeat: u32,
    output: ReplayOutput,
    out: &mut dyn Write,
    pipe: Option<&PipelineSender>,
) -> Result<ReplayReport, DaemonError> {
    let mut report = ReplayReport::default();
    let host = HostInfo {
        name: REPLAY_HOST.to_string(),
        ..HostInfo::default()
    };
    let (wall0, cpu0) = (Instant::now(), cpu_now()?);
    for _ in 0..repeat.clamp(1, MAX_REPEAT) {
        let mut file = Replay::open(path)?;
        let header = file.header().clone();
        let mut descs = Vec::with_capacity(header.events.len());
        let mut counted_by_socket = false;
        for e in &header.events {
            let decl = ProbeDecl::of_event(&e.name).ok_or_else(|| DaemonError::ReplayEvent {
                path: path.to_path_buf(),
                event: e.name.clone(),
            })?;
            counted_by_socket |= decl.decoder == DecoderKind::TcpClose;
            descs.push(EventDesc {
                kind: decl.decoder,
                task_context: decl.task_context,
                format: &e.format,
            });
        }
        let decoder = Decoder::new(&descs)?;
        let procs = ProcessTable::new(
            Box::new(NoProcesses),
            UserDb::empty(),
            ProcessTableConfig {
                max_processes: cfg.limits.max_processes,
                exit_grace: cfg.socket.flow_termination_timeout,
            },
        );
        // The recorded daemon's own flows are left out as they were live:
        // its pid is in its probe group's name, never this process's pid
        // (a recorded process may well have had it).
        let mut engine_cfg = engine_config(cfg);
        engine_cfg.own_pid = header
            .events
            .iter()
            .find_map(|e| e.name.split_once('/').and_then(|(g, _)| group_pid(g)))
            .unwrap_or(NO_PID);
        // A recording of socket-counter accounting replays as it ran.
        if counted_by_socket {
            engine_cfg.accounting = Accounting::SocketCounters;
        }
        let mut engine = Engine::new(engine_cfg, OffsetClock { base: UNIX_EPOCH }, procs);
        let mut batch: Vec<Event> = Vec::with_capacity(REPLAY_BATCH);
        let mut outputs: Vec<Output> = Vec::new();
        let mut next_tick: Option<KernelTime> = None;
        let mut write_err: Option<std::io::Error> = None;
        let mut drain = |outputs: &mut Vec<Output>, report: &mut ReplayReport| {
            for o in outputs.drain(..) {
                if let Some(p) = pipe {
                    // Only fails when the hub is gone: its sinks then
                    // report fewer flows than the replay made.
                    let _ = p.send_wait(o.clone());
                }
                match o {
                    Output::Flow(rec) => {
                        if rec.is_final {
                            report.final_flows += 1;
                        } else {
                            report.interim_flows += 1;
                        }
                        if output == ReplayOutput::Ecs && rec.is_final && write_err.is_none() {
                            let doc = ecs::flow_document(&rec, &host);
                            if let Err(e) = writeln!(out, "{doc}") {
                                write_err = Some(e);
                            }
                        }
                        let encoded = EncodedFlow::new(Arc::clone(&rec), REPLAY_HOST);
                        report.encoded_bytes += encoded.bytes.len() as u64;
                    }
                    Output::Loss(_) => report.loss_notices += 1,
                }
            }
        };
        let result = file.for_each(|item| match item {
            RingItem::Sample(s) => {
                report.samples += 1;
                match decoder.decode(&s) {
                    Ok(Some(ev)) => batch.push(ev),
                    Ok(None) => {}
                    Err(_) => report.decode_errors += 1,
                }
                if batch.len() >= REPLAY_BATCH {
                    report.events += batch.len() as u64;
                    engine.handle_batch(&batch, &mut outputs);
                    batch.clear();
                }
                let due = *next_tick.get_or_insert(s.time + TICK_PERIOD.as_nanos() as u64);
                if s.time >= due {
                    report.events += batch.len() as u64;
                    engine.handle_batch(&batch, &mut outputs);
                    batch.clear();
                    engine.tick(s.time, &mut outputs);
                    next_tick = Some(s.time + TICK_PERIOD.as_nanos() as u64);
                }
                drain(&mut outputs, &mut report);
            }
            RingItem::Lost { count, .. } => report.lost += count,
        });
        report.events += batch.len() as u64;
        engine.handle_batch(&batch, &mut outputs);
        engine.flush(&mut outputs);
        drain(&mut outputs, &mut report);
        if let Some(e) = write_err {
            return Err(DaemonError::Runtime {
                what: "writing replayed flows",
                source: e,
            });
        }
        // A cut recording still replays what it holds; the cut is an error.
        result?;
    }
    report.wall = wall0.elapsed();
    report.cpu = cpu_now()?.saturating_sub(cpu0);
    Ok(report)
}

/// How long each sink may take, after a replay through the sinks, to
/// deliver what it still holds.
const REPLAY_SINK_DRAIN: Duration = Duration::from_secs(30);
/// Worker threads of the runtime of a replay through the sinks.
const REPLAY_RUNTIME_WORKERS: usize = 2;
/// Capacity of the replay → hub channel (the replay waits for room).
const REPLAY_PIPELINE_CAPACITY: usize = 1024;

/// What one sink did in a replay through the sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkLine {
    /// Its subscriber name (`nats:<servers>`, `jsonl:<path>`).
    pub peer: String,
    /// Its report; `None` if it did not finish within the drain time.
    pub report: Option<SinkReport>,
}

impl std::fmt::Display for SinkLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.report {
            Some(r) => write!(f, "sink {}: {r}", self.peer),
            None => write!(
                f,
                "sink {}: did not finish within {REPLAY_SINK_DRAIN:?}",
                self.peer
            ),
        }
    }
}

/// Replays `path` like [`replay`] (summary only) and hands every record and
/// loss notice to the fan-out hub, to which the sinks of `cfg.export` are
/// subscribed as in `serve` (node name, filters, queues); returns when the
/// sinks delivered everything or the drain time passed.
pub fn replay_through_sinks(
    cfg: &Config,
    path: &Path,
    repeat: u32,
) -> Result<(ReplayReport, Vec<SinkLine>), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(REPLAY_RUNTIME_WORKERS)
        .thread_name("sockscope-replay")
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Runtime {
            what: "starting the async runtime",
            source,
        })?;
    let opts = ServerOptions::from_config(cfg)?;
    runtime.block_on(async {
        let (tx, rx) = pipeline_channel(REPLAY_PIPELINE_CAPACITY);
        let mut hub_opts = opts.hub.clone();
        hub_opts.host_name = REPLAY_HOST.to_string();
        let node = hub_opts.node_name.clone();
        let (hub, hub_task) = Hub::spawn(hub_opts, rx);
        let host = HostInfo {
            name: REPLAY_HOST.to_string(),
            ..HostInfo::default()
        };
        let sinks = Sinks::start(cfg, &hub, &node, host, None).await?;
        drop(hub);
        let (cfg, path) = (cfg.clone(), path.to_path_buf());
        // The sender is dropped when the replay ends: the hub then ends
        // every sink's stream after what it queued.
        let replayed = tokio::task::spawn_blocking(move || {
            replay_to(
                &cfg,
                &path,
                repeat,
                ReplayOutput::Summary,
                &mut std::io::sink(),
                Some(&tx),
            )
        })
        .await
        .map_err(|e| DaemonError::Runtime {
            what: "running the replay",
            source: std::io::Error::other(e.to_string()),
        })?;
        let lines = sinks
            .finish(REPLAY_SINK_DRAIN)
            .await
            .into_iter()
            .map(|o| SinkLine {
                peer: o.peer,
                report: o.report,
            })
            .collect();
        hub_task.abort();
        Ok((replayed?, lines))
    })
}
