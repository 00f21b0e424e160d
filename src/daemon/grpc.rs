//! gRPC serving on the main thread: a tokio runtime runs the server, the
//! fan-out hub fed by the engine, the metrics endpoint, the sinks
//! (`export.*`) and a watchdog (kretprobe misses, pipeline liveness) until
//! SIGINT/SIGTERM or a pipeline failure. Before the server stops, the
//! pipeline is stopped and drained so the flushed final records still reach
//! subscribers.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fault::FAULT_PANIC_AFTER_VAR;
use super::sinks::Sinks;
use super::status::{DaemonStatus, PipelineState};
use super::{DaemonError, Pipeline};
use crate::config::Config;
use crate::export::ecs::HostInfo;
use crate::export::hub::{Hub, PipelineReceiver};
use crate::export::metrics;
use crate::export::server::{self, HealthHandle, ServerOptions};
use crate::export::status::StatusFeed;
use crate::probe;

/// How often the watchdog reads kretprobe misses from tracefs.
const MISSES_PERIOD: Duration = Duration::from_secs(2);
/// Worker threads of the gRPC runtime. One: the server's work per record
/// is small next to a thread wake-up, and with a second worker every task
/// woken from the engine thread also woke an idle worker to steal it
/// (context switches were most of the runtime's CPU on a churn workload);
/// encoding is shared by all subscribers, so one core serves many.
const RUNTIME_WORKERS: usize = 1;
/// How long each sink may take to deliver the flushed records after the
/// server stopped.
const SINK_DRAIN: Duration = Duration::from_secs(5);
/// Grace period between stopping the pipeline and stopping the server.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// What the gRPC side of the daemon serves.
pub(super) struct Grpc<'a> {
    /// The daemon's configuration (server, metrics and export sections).
    pub(super) cfg: &'a Config,
    /// The status every API and the metrics read.
    pub(super) status: Arc<DaemonStatus>,
    /// Records and loss notices from the engine, for the fan-out hub.
    pub(super) pipe_rx: PipelineReceiver,
    /// The tracefs the probes are installed in.
    pub(super) tracefs: &'a probe::Tracefs,
    /// The installed probes' group.
    pub(super) group: String,
    /// Fault injection: panic the main thread this long after listening.
    pub(super) panic_after: Option<Duration>,
}

impl Grpc<'_> {
    /// Runs the gRPC server until a signal or a pipeline failure.
    pub(super) fn serve(self, pipeline: &Pipeline) -> Result<(), DaemonError> {
        let Grpc {
            cfg,
            status,
            pipe_rx,
            tracefs,
            group,
            panic_after,
        } = self;
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
        let watchdog = Watchdog {
            state: pipeline.state.clone(),
            health: health.clone(),
            profile_path: tracefs.root().join("kprobe_profile"),
            events_path: tracefs.root().join("kprobe_events"),
            group,
        };
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
            let host = HostInfo::of_node(&opts.hub.host_name, status.node());
            let feed = StatusFeed::new(status.clone(), hub.clone(), &opts.hub.node_name);
            let sinks = Sinks::start(cfg, &hub, &opts.hub.node_name, host, Some(feed)).await?;
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
            let listening = *pipeline.serving_since.get_or_init(Instant::now);

            let (failed_tx, mut failed_rx) = tokio::sync::watch::channel(false);
            let watchdog = tokio::spawn(watchdog.run(failed_tx));
            let stop_pipeline = pipeline.stop.clone();
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
            // The sinks' streams end when the engine has flushed its last
            // records and closed the pipeline.
            for o in sinks.finish(SINK_DRAIN).await {
                if let Some(r) = o.report {
                    tracing::info!(sink = o.kind, peer = %o.peer, "{r}");
                }
            }
            hub_task.abort();
            r.map_err(DaemonError::from)
        })
    }
}

/// Watchdog: kretprobe misses and pipeline liveness.
struct Watchdog {
    state: Arc<PipelineState>,
    health: HealthHandle,
    profile_path: PathBuf,
    events_path: PathBuf,
    group: String,
}

impl Watchdog {
    /// Publishes the probe group's kretprobe misses every
    /// [`MISSES_PERIOD`]; once a pipeline thread failed, stops serving
    /// health and sends `true` on `failed_tx`.
    async fn run(self, failed_tx: tokio::sync::watch::Sender<bool>) {
        let mut tick = tokio::time::interval(MISSES_PERIOD);
        loop {
            tick.tick().await;
            let events = std::fs::read_to_string(&self.events_path);
            let profile = std::fs::read_to_string(&self.profile_path);
            if let (Ok(events), Ok(profile)) = (events, profile) {
                // An inconsistent pair is read again at the next tick.
                if let Some(m) =
                    probe::install::parse_profile_misses(&events, &profile, &self.group)
                {
                    self.state.kretprobe_misses.fetch_max(m, Ordering::Relaxed);
                }
            }
            if self.state.failed.load(Ordering::SeqCst) {
                self.health.set_serving(false);
                let _ = failed_tx.send(true);
                return;
            }
        }
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
