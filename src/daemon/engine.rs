//! The engine thread: owns the flow [`Engine`] and pushes records and loss
//! notices into the fan-out hub with `try_send`. It drains the DNS
//! responses of the capture thread before each batch of events (see
//! [`crate::flow`] for how names reach flows), turns the reader's drop
//! counters into loss notices, and runs expiry on the time the reader has
//! fully delivered. When the reader stops and drops its queue, the engine
//! flushes every flow as a final record.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::fault::FAULT_PANIC_AFTER_VAR;
use super::reader::EVENT_BATCH;
use super::status::PipelineState;
use super::Pipeline;
use crate::config::{AccountingMode, Config};
use crate::enrich::dns::{DnsResponse, DnsTable, TableLimits};
use crate::enrich::pods::resolver::PodView;
use crate::enrich::process::ProcessTable;
use crate::enrich::sockets::SocketSnapshot;
use crate::export::hub::PipelineSender;
use crate::flow::{Clock, Engine, EngineConfig};
use crate::model::{Accounting, Event, KernelTime, Loss, LossSource, Output};
use crate::ring::clock::{PerfClock, SysClockSource, WallClock};
use crate::sys;

/// How often the engine runs expiry and interim updates; between ticks it
/// sleeps until a batch comes or the next tick is due.
const TICK_PERIOD: Duration = Duration::from_millis(200);

/// Everything the engine thread owns.
pub(super) struct EngineStage {
    /// The flow engine's configuration.
    pub(super) config: EngineConfig,
    /// The process table the engine attributes sockets with.
    pub(super) procs: ProcessTable,
    /// Pod identity, when the resolver runs.
    pub(super) pods: Option<PodView>,
    /// The machine's TCP sockets when the probes were in place.
    pub(super) sockets: SocketSnapshot,
    /// Kernel-to-wall clock offset, re-synchronised by the engine.
    pub(super) wall: WallClock,
    /// The clock the perf samples are stamped with.
    pub(super) perf_clock: PerfClock,
    /// Batches of decoded events, from the reader.
    pub(super) event_rx: Receiver<Vec<Event>>,
    /// Ring loss notices (CPU, samples lost), from the reader.
    pub(super) lost_rx: Receiver<(u32, u64)>,
    /// DNS responses from the capture thread, when DNS enrichment is on.
    pub(super) dns_rx: Option<Receiver<DnsResponse>>,
    /// Records and loss notices, to the fan-out hub.
    pub(super) pipe: PipelineSender,
    /// Fault injection: panic this long after the server started listening.
    pub(super) panic_after: Option<Duration>,
}

impl EngineStage {
    /// Runs the flow engine until the reader is gone.
    pub(super) fn run(self, pipeline: &Pipeline) {
        let EngineStage {
            config,
            mut procs,
            pods,
            sockets,
            mut wall,
            perf_clock,
            event_rx,
            lost_rx,
            mut dns_rx,
            pipe,
            panic_after,
        } = self;
        let state: &PipelineState = &pipeline.state;
        let offset = Arc::new(AtomicI64::new(clamp_offset(wall.stats().offset_ns)));
        let clock = EngineClock {
            offset_ns: offset.clone(),
        };
        // A container seen for the first time is looked up at once, so its
        // pod is usually known by the time its first flow ends.
        if let Some(v) = &pods {
            let v = v.clone();
            procs.set_container_hook(Box::new(move |id| {
                let _ = v.container(id);
            }));
        }
        let mut engine = Engine::new(config, clock.clone(), procs);
        engine.seed_sockets(&sockets);
        drop(sockets);
        if dns_rx.is_some() {
            engine = engine.with_dns(DnsTable::new(TableLimits::default()));
        }
        let mut source = SysClockSource::new(perf_clock);
        let mut out: Vec<Output> = Vec::with_capacity(EVENT_BATCH);
        let mut last_tick = Instant::now();
        let mut losses = LossDeltas::default();
        let now_kernel = || sys::clock_gettime_ns(perf_clock.read_clockid()).unwrap_or(0);
        let publish = |out: &mut Vec<Output>| {
            for mut o in out.drain(..) {
                if let (Some(v), Output::Flow(rec)) = (&pods, &mut o) {
                    v.attach(Arc::make_mut(rec));
                }
                pipe.send(o);
            }
        };
        // Responses are fed in before the events that follow them: they
        // usually reach the engine before the (batched) probe events of the
        // same query.
        let drain_dns = |engine: &mut Engine<EngineClock>,
                         rx: &mut Option<Receiver<DnsResponse>>| {
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
                        state.fail("DNS capture", "the capture thread stopped");
                        return;
                    }
                }
            }
        };
        loop {
            let panic_due = panic_after
                .and_then(|after| pipeline.serving_since.get().map(|t| t.elapsed() >= after));
            if panic_due == Some(true) {
                panic!("fault injection: engine thread panic ({FAULT_PANIC_AFTER_VAR})");
            }
            let received = event_rx.recv_timeout(TICK_PERIOD.saturating_sub(last_tick.elapsed()));
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
                // Expiry runs on the time the reader has fully delivered,
                // not the wall clock: a reader delayed (descheduled, or
                // behind under load) must not make flows final before their
                // last packets are counted. Batches sent before `released`
                // was published are handled first.
                let released = state.released.load(Ordering::Acquire);
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
                losses.report(state, clock.wall(now), &mut out);
                engine.tick(now.min(released), &mut out);
                if let Ok(mut g) = state.engine.lock() {
                    *g = engine.stats();
                }
                if let Ok(mut g) = state.dns_table.lock() {
                    *g = engine.dns_stats();
                }
            }
            publish(&mut out);
        }
        // The reader has stopped and dropped its sender: everything left is
        // final.
        engine.flush(&mut out);
        publish(&mut out);
        if let Ok(mut g) = state.engine.lock() {
            *g = engine.stats();
        }
    }
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

/// The pipeline's drop counters already reported as loss notices.
#[derive(Debug, Default)]
struct LossDeltas {
    decode_errors: Delta,
    queue_drops: Delta,
    lost_overflow: Delta,
    misses: Delta,
}

impl LossDeltas {
    /// Pushes one loss notice, stamped `t`, for each counter that grew.
    fn report(&mut self, state: &PipelineState, t: SystemTime, out: &mut Vec<Output>) {
        for (source, n) in [
            (
                LossSource::DecodeError,
                self.decode_errors
                    .take(state.decode_errors.load(Ordering::Relaxed)),
            ),
            (
                LossSource::ReaderQueue,
                self.queue_drops
                    .take(state.reader_queue_drops.load(Ordering::Relaxed))
                    + self
                        .lost_overflow
                        .take(state.lost_queue_overflow.load(Ordering::Relaxed)),
            ),
            (
                LossSource::KretprobeMiss,
                self.misses
                    .take(state.kretprobe_misses.load(Ordering::Relaxed)),
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

fn clamp_offset(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

/// The flow engine's settings from the daemon configuration: its timeouts
/// and table bounds (the embryonic and parked UDP tables at their defaults,
/// never above `limits.max_flows`), this process's pid, and the ports of
/// the daemon's TCP listeners (unparsable or empty listen addresses,
/// already refused by validation, are skipped).
pub(super) fn engine_config(cfg: &Config) -> EngineConfig {
    let mut own_tcp_ports: Vec<u16> = [
        &cfg.server.listen,
        &cfg.server.health_listen,
        &cfg.metrics.listen,
    ]
    .iter()
    .filter_map(|a| a.trim().parse::<std::net::SocketAddr>().ok())
    .map(|a| a.port())
    .filter(|&p| p != 0)
    .collect();
    own_tcp_ports.sort_unstable();
    own_tcp_ports.dedup();
    let s = &cfg.socket;
    EngineConfig {
        flow_inactive_timeout: s.flow_inactive_timeout,
        flow_termination_timeout: s.flow_termination_timeout,
        socket_inactive_timeout: s.socket_inactive_timeout,
        flow_update_interval: s.flow_update_interval,
        max_sockets: cfg.limits.max_sockets,
        max_flows: cfg.limits.max_flows,
        max_embryonic: crate::flow::DEFAULT_MAX_EMBRYONIC.min(cfg.limits.max_flows.max(1)),
        max_parked_udp: crate::flow::DEFAULT_MAX_PARKED_UDP.min(cfg.limits.max_flows.max(1)),
        include_self: s.include_self,
        own_pid: std::process::id(),
        own_tcp_ports,
        accounting: match s.accounting {
            AccountingMode::Packets => Accounting::Packets,
            AccountingMode::SocketCounters => Accounting::SocketCounters,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tcp_ports_come_from_the_listen_addresses() {
        let mut c = Config::default();
        c.server.listen = "0.0.0.0:50051".into();
        c.server.health_listen = "127.0.0.1:8081".into();
        c.metrics.listen = String::new();
        let e = engine_config(&c);
        assert_eq!(e.own_tcp_ports, vec![8081, 50051]);
    }
}
