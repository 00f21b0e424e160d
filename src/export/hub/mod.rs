//! The fan-out hub: one owner task receives [`Output`]s from the pipeline,
//! keeps the history ring, applies each subscriber's filters and pushes into
//! bounded per-subscriber queues. Records are converted and encoded once
//! ([`EncodedFlow`]) and shared by reference.
//!
//! Losses are data: pipeline losses, the pipeline→hub queue overflow and
//! each subscriber's own queue drops are coalesced per (source, cpu) and
//! delivered in-band, at most one notice per key per
//! [`LOSS_NOTICE_INTERVAL`] per stream. A subscriber that keeps dropping for
//! [`HubOptions::slow_seconds`] with a drop ratio of at least
//! [`HubOptions::slow_drop_ratio`] is closed with `RESOURCE_EXHAUSTED`,
//! unless it asked to be kept ([`SubscribeRequest::keep_when_slow`]: a sink
//! that resumes when its destination returns).
//!
//! Every record offered to a stream is either delivered or counted in a
//! notice the stream delivers before it ends. A notice never waits for room
//! in the subscriber's queue: when the queue is full it goes to the stream's
//! [`LossMailbox`], which the stream reads as soon as its queue is empty, once
//! the notice is [`LOSS_NOTICE_INTERVAL`] old, and always before it ends.
//! When a stream ends (pipeline closed, `until` passed, closed as too slow)
//! its pending notices are handed over regardless of the rate limit, and a
//! stream closed as too slow reports the records still queued for it as
//! `SUBSCRIBER_QUEUE` loss before its status.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Status;

use crate::export::convert;
use crate::export::encoded::{EncodedFlow, Payload};
use crate::export::filter::FilterSet;
use crate::export::proto;
use crate::export::status::{HubStatus, SinkStats, SubscriberInfo};
use crate::model::Output;

mod losses;
mod subscription;

use losses::*;
pub use subscription::Subscription;

/// Minimum spacing of two loss notices with the same (source, cpu) key in
/// one stream.
pub const LOSS_NOTICE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the owner task flushes pending loss notices and checks
/// subscribers.
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Length of one slow-subscriber accounting period.
pub const SLOW_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// Default number of consecutive periods with drops before a subscriber is
/// closed.
pub const DEFAULT_SLOW_SECONDS: u32 = 10;
/// Default drop ratio (dropped / offered during the dropping streak) at or
/// above which a continuously dropping subscriber is closed.
pub const DEFAULT_SLOW_DROP_RATIO: f64 = 0.5;
/// Default capacity of the pipeline→hub channel.
pub const DEFAULT_PIPELINE_QUEUE_SIZE: usize = 8192;
/// Outputs handled per wake-up of the owner task before it looks at
/// commands and ticks again.
const PIPELINE_BATCH: usize = 256;
/// Capacity of the hub's command channel (subscribe, status).
const COMMAND_QUEUE_SIZE: usize = 256;
/// Most flows packed into one response, whatever a client asks for.
pub const MAX_FLOWS_PER_RESPONSE: usize = 64;
/// Most bytes of encoded flows packed into one response (a single larger
/// flow still goes out, alone).
pub const MAX_PACKED_FLOW_BYTES: usize = 64 * 1024;

/// Options of the fan-out hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Finished flows kept for replay.
    pub history_size: usize,
    /// Per-subscriber queue capacity.
    pub queue_size: usize,
    /// Node name put in every envelope.
    pub node_name: String,
    /// Host name put in every flow.
    pub host_name: String,
    /// Consecutive dropping periods before a slow subscriber is closed.
    pub slow_seconds: u32,
    /// Drop ratio over the streak at or above which it is closed.
    pub slow_drop_ratio: f64,
}

impl HubOptions {
    /// Options with the default slow-subscriber policy.
    pub fn new(history_size: usize, queue_size: usize, node_name: &str) -> HubOptions {
        HubOptions {
            history_size,
            queue_size,
            node_name: node_name.to_string(),
            host_name: node_name.to_string(),
            slow_seconds: DEFAULT_SLOW_SECONDS,
            slow_drop_ratio: DEFAULT_SLOW_DROP_RATIO,
        }
    }
}

/// The pipeline's end of the channel into the hub. Never blocks: when the
/// channel is full the output is counted and reported to subscribers as an
/// `EXPORT_QUEUE` loss.
#[derive(Debug, Clone)]
pub struct PipelineSender {
    tx: mpsc::Sender<Output>,
    dropped: Arc<AtomicU64>,
}

impl PipelineSender {
    /// Hands one output to the hub; returns false when it had to be dropped
    /// (channel full or hub gone).
    pub fn send(&self, out: Output) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Hands one output to the hub, waiting for room in the channel; for
    /// producers that may wait (a replay), never the live pipeline. Returns
    /// false when the hub is gone. Must not be called from async code.
    pub fn send_wait(&self, out: Output) -> bool {
        self.tx.blocking_send(out).is_ok()
    }

    /// Outputs dropped so far because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The hub's end of the pipeline channel; hand it to [`Hub::spawn`].
#[derive(Debug)]
pub struct PipelineReceiver {
    rx: mpsc::Receiver<Output>,
    dropped: Arc<AtomicU64>,
}

/// Creates the bounded pipeline→hub channel.
pub fn pipeline_channel(capacity: usize) -> (PipelineSender, PipelineReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    (
        PipelineSender {
            tx,
            dropped: dropped.clone(),
        },
        PipelineReceiver { rx, dropped },
    )
}

/// What a subscriber asked for, validated.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest {
    /// Replay at most this many recent finished flows.
    pub number: u64,
    /// Only flows that ended at or after this time.
    pub since: Option<SystemTime>,
    /// Only flows that ended at or before this time; the stream ends when
    /// wall time passes it.
    pub until: Option<SystemTime>,
    /// Keep streaming after the replay.
    pub follow: bool,
    /// Deliver interim records too.
    pub include_updates: bool,
    /// Compiled allow/deny filters.
    pub filters: FilterSet,
    /// Peer description for the status.
    pub peer: String,
    /// Most flows per response; 0 or 1: one flow per response in the
    /// `flow` field (the original shape), more: flows packed into `flows`,
    /// bounded by [`MAX_FLOWS_PER_RESPONSE`] and [`MAX_PACKED_FLOW_BYTES`].
    pub max_flows_per_response: usize,
    /// Capacity of this subscriber's queue; `None`: the hub's
    /// [`HubOptions::queue_size`].
    pub queue_size: Option<usize>,
    /// Never close this subscriber as too slow: it keeps dropping (and
    /// counting) while it cannot keep up. For exporters, which resume when
    /// their destination returns; gRPC streams are closed.
    pub keep_when_slow: bool,
    /// A sink's own counters, reported with its subscriber entry.
    pub stats: Option<Arc<dyn SinkStats>>,
}

enum Command {
    Subscribe(Box<SubscribeRequest>, oneshot::Sender<Subscription>),
    Status(oneshot::Sender<HubStatus>),
}

/// Handle to the running hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    cmd: mpsc::Sender<Command>,
    node_name: Arc<str>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Subscribe(..) => f.write_str("Subscribe"),
            Command::Status(_) => f.write_str("Status"),
        }
    }
}

impl Hub {
    /// Starts the owner task on the current tokio runtime.
    pub fn spawn(opts: HubOptions, pipeline: PipelineReceiver) -> (Hub, JoinHandle<()>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE_SIZE);
        let node_name: Arc<str> = Arc::from(opts.node_name.as_str());
        let owner = Owner {
            history: VecDeque::with_capacity(opts.history_size.min(1 << 16)),
            subs: Vec::new(),
            next_id: 1,
            flows_received: 0,
            pod_flows: std::collections::BTreeMap::new(),
            export_drops_total: 0,
            last_export_check: SystemTime::now(),
            last_slow_check: Instant::now(),
            node_name: node_name.clone(),
            opts,
        };
        let handle = tokio::spawn(owner.run(pipeline, cmd_rx));
        (
            Hub {
                cmd: cmd_tx,
                node_name,
            },
            handle,
        )
    }

    /// Registers a subscriber (when `follow`) and returns its stream, which
    /// first yields the replay and then live records.
    pub async fn subscribe(&self, req: SubscribeRequest) -> Result<Subscription, Status> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Subscribe(Box::new(req), tx))
            .await
            .map_err(|_| Status::unavailable("flow fan-out is not running"))?;
        rx.await
            .map_err(|_| Status::unavailable("flow fan-out is not running"))
    }

    /// The hub's part of the status.
    pub async fn status(&self) -> Result<HubStatus, Status> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Status(tx))
            .await
            .map_err(|_| Status::unavailable("flow fan-out is not running"))?;
        rx.await
            .map_err(|_| Status::unavailable("flow fan-out is not running"))
    }

    /// Node name used in envelopes.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

struct Sub {
    id: u64,
    peer: String,
    filters: FilterSet,
    include_updates: bool,
    until: Option<SystemTime>,
    keep_when_slow: bool,
    stats: Option<Arc<dyn SinkStats>>,
    tx: mpsc::Sender<Payload>,
    close: Option<oneshot::Sender<Status>>,
    mailbox: Arc<LossMailbox>,
    /// Queue drops since the last flush, kept apart from `pending` so a
    /// drop costs no map look-up.
    queue_loss: Option<CoalescedLoss>,
    drops: u64,
    delivered: u64,
    /// Responses its stream produced (counted by the stream).
    responses: Arc<AtomicU64>,
    pending: HashMap<LossKey, CoalescedLoss>,
    last_sent: HashMap<LossKey, Instant>,
    period_offered: u64,
    period_dropped: u64,
    streak_periods: u32,
    streak_offered: u64,
    streak_dropped: u64,
}

impl Sub {
    /// Whether this subscriber takes `rec` (updates, end bound, filters).
    fn takes(&self, rec: &crate::model::FlowRecord) -> bool {
        (rec.is_final || self.include_updates)
            && self.until.is_none_or(|u| rec.end <= u)
            && self.filters.matches(rec)
    }

    fn add_loss(&mut self, key: LossKey, count: u64, first: SystemTime, last: SystemTime) {
        merge_loss(&mut self.pending, key, CoalescedLoss { count, first, last });
    }

    /// Moves the queue drops counted since the last call into `pending`.
    fn take_queue_loss(&mut self) {
        if let Some(l) = self.queue_loss.take() {
            merge_loss(&mut self.pending, SUBSCRIBER_QUEUE_KEY, l);
        }
    }

    /// Sends pending notices whose key is not rate-limited: in the queue
    /// when it has room (in order with the flows), else in the mailbox.
    fn flush_losses(&mut self, now: Instant) {
        self.take_queue_loss();
        if self.pending.is_empty() {
            return;
        }
        let ready: Vec<LossKey> = self
            .pending
            .keys()
            .filter(|k| {
                self.last_sent
                    .get(*k)
                    .is_none_or(|t| now.duration_since(*t) >= LOSS_NOTICE_INTERVAL)
            })
            .copied()
            .collect();
        for key in ready {
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(_)) =
                self.tx.try_send(Payload::Loss(p.notice(key)))
            {
                self.mailbox.put(key, p);
            }
            self.last_sent.insert(key, now);
        }
    }

    /// Hands every pending notice to the stream, rate limit or not; called
    /// when the hub lets go of the subscriber.
    fn finish(&mut self) {
        self.take_queue_loss();
        for (key, p) in self.pending.drain() {
            self.mailbox.put(key, p);
        }
    }

    fn offer(&mut self, flow: Arc<EncodedFlow>) {
        self.period_offered += 1;
        match self.tx.try_send(Payload::Flow(flow)) {
            Ok(()) => self.delivered += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.drops += 1;
                self.period_dropped += 1;
                let now = SystemTime::now();
                match &mut self.queue_loss {
                    Some(l) => {
                        l.count += 1;
                        l.last = now;
                    }
                    None => self.queue_loss = Some(CoalescedLoss::at(1, now)),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Key of the namespaces beyond the bound.
const OTHER_NAMESPACES: &str = "other";

/// Counts one final flow of a pod in `namespace`: its own entry while
/// fewer than [`crate::export::metrics::MAX_NAMESPACE_SERIES`] namespaces
/// are counted, else `other`.
fn count_pod_flow(counts: &mut std::collections::BTreeMap<String, u64>, namespace: &str) {
    if let Some(n) = counts.get_mut(namespace) {
        *n += 1;
    } else if counts.len() < crate::export::metrics::MAX_NAMESPACE_SERIES {
        counts.insert(namespace.to_string(), 1);
    } else {
        *counts.entry(OTHER_NAMESPACES.to_string()).or_default() += 1;
    }
}

struct Owner {
    opts: HubOptions,
    history: VecDeque<Arc<EncodedFlow>>,
    subs: Vec<Sub>,
    next_id: u64,
    flows_received: u64,
    /// Final flows by their pod's namespace (bounded, see
    /// [`count_pod_flow`]).
    pod_flows: std::collections::BTreeMap<String, u64>,
    export_drops_total: u64,
    last_export_check: SystemTime,
    last_slow_check: Instant,
    node_name: Arc<str>,
}

impl Owner {
    async fn run(mut self, mut pipeline: PipelineReceiver, mut cmd: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pipeline_open = true;
        let mut commands_open = true;
        let mut burst: Vec<Output> = Vec::with_capacity(PIPELINE_BATCH + 1);
        let mut encoded: Vec<Option<Arc<EncodedFlow>>> = Vec::with_capacity(PIPELINE_BATCH + 1);
        // Runs while the pipeline feeds subscribers or handles can still
        // subscribe.
        while pipeline_open || commands_open {
            tokio::select! {
                out = pipeline.rx.recv(), if pipeline_open => match out {
                    Some(out) => {
                        // Take what is already queued too, without re-entering select.
                        burst.push(out);
                        while burst.len() <= PIPELINE_BATCH {
                            match pipeline.rx.try_recv() {
                                Ok(out) => burst.push(out),
                                Err(_) => break,
                            }
                        }
                        self.handle_burst(&mut burst, &mut encoded);
                    }
                    None => {
                        pipeline_open = false;
                        self.check_export_drops(&pipeline);
                        for s in &mut self.subs {
                            s.finish();
                        }
                        self.subs.clear();
                    }
                },
                c = cmd.recv(), if commands_open => match c {
                    Some(Command::Subscribe(req, reply)) => {
                        let sub = self.subscribe(*req, pipeline_open);
                        let _ = reply.send(sub);
                    }
                    Some(Command::Status(reply)) => {
                        self.export_drops_total = pipeline.dropped.load(Ordering::Relaxed);
                        let _ = reply.send(self.status());
                    }
                    None => commands_open = false,
                },
                _ = tick.tick() => self.on_tick(&pipeline),
            }
        }
    }

    /// Handles what the pipeline had queued at once. Every flow of the
    /// burst is encoded first and offered after, so the offers to one
    /// subscriber's queue follow each other closely: its stream, woken by
    /// the first, finds the others queued and packs them into one response,
    /// instead of sending a response per flow while the hub encodes the
    /// next one.
    fn handle_burst(
        &mut self,
        burst: &mut Vec<Output>,
        encoded: &mut Vec<Option<Arc<EncodedFlow>>>,
    ) {
        encoded.clear();
        let host = &self.opts.host_name;
        encoded.extend(burst.iter().map(|out| match out {
            Output::Flow(rec) if self.wanted(rec) => {
                Some(Arc::new(EncodedFlow::new(rec.clone(), host)))
            }
            _ => None,
        }));
        for (out, enc) in burst.drain(..).zip(encoded.drain(..)) {
            self.handle_output(out, enc);
        }
    }

    /// Whether a subscriber or the history takes `rec`.
    fn wanted(&self, rec: &crate::model::FlowRecord) -> bool {
        (rec.is_final && self.opts.history_size > 0) || self.subs.iter().any(|s| s.takes(rec))
    }

    /// Offers one output; `encoded` is the flow's encoding when the burst
    /// made it already.
    fn handle_output(&mut self, out: Output, encoded: Option<Arc<EncodedFlow>>) {
        match out {
            Output::Flow(rec) => {
                self.flows_received += 1;
                if rec.is_final {
                    if let Some(p) = &rec.pod {
                        count_pod_flow(&mut self.pod_flows, &p.namespace);
                    }
                }
                let mut encoded = encoded;
                let host = &self.opts.host_name;
                let mut get = |rec: &Arc<crate::model::FlowRecord>| {
                    encoded
                        .get_or_insert_with(|| Arc::new(EncodedFlow::new(rec.clone(), host)))
                        .clone()
                };
                for s in &mut self.subs {
                    if s.takes(&rec) {
                        s.offer(get(&rec));
                    }
                }
                if rec.is_final && self.opts.history_size > 0 {
                    if self.history.len() >= self.opts.history_size {
                        self.history.pop_front();
                    }
                    self.history.push_back(get(&rec));
                }
            }
            Output::Loss(loss) => {
                let key = (convert::loss_source(loss.source) as i32, loss.cpu);
                let now = Instant::now();
                for s in &mut self.subs {
                    s.add_loss(key, loss.count, loss.first, loss.last);
                    s.flush_losses(now);
                }
            }
        }
    }

    fn check_export_drops(&mut self, pipeline: &PipelineReceiver) {
        let total = pipeline.dropped.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if total > self.export_drops_total {
            let n = total - self.export_drops_total;
            let key = (proto::LossSource::ExportQueue as i32, None);
            for s in &mut self.subs {
                s.add_loss(key, n, self.last_export_check, now);
            }
        }
        self.export_drops_total = total;
        self.last_export_check = now;
    }

    fn on_tick(&mut self, pipeline: &PipelineReceiver) {
        self.check_export_drops(pipeline);
        let now = Instant::now();
        let wall = SystemTime::now();
        let slow_period = now.duration_since(self.last_slow_check) >= SLOW_CHECK_PERIOD;
        if slow_period {
            self.last_slow_check = now;
        }
        let (slow_seconds, slow_ratio) = (self.opts.slow_seconds, self.opts.slow_drop_ratio);
        self.subs.retain_mut(|s| {
            if s.tx.is_closed() {
                tracing::debug!(id = s.id, peer = %s.peer, "subscriber disconnected");
                return false;
            }
            if s.until.is_some_and(|u| wall > u) {
                s.finish();
                return false;
            }
            s.flush_losses(now);
            if slow_period {
                if s.period_dropped > 0 {
                    s.streak_periods += 1;
                    s.streak_offered += s.period_offered;
                    s.streak_dropped += s.period_dropped;
                } else {
                    s.streak_periods = 0;
                    s.streak_offered = 0;
                    s.streak_dropped = 0;
                }
                s.period_offered = 0;
                s.period_dropped = 0;
                let ratio = s.streak_dropped as f64 / s.streak_offered.max(1) as f64;
                if !s.keep_when_slow
                    && slow_seconds > 0
                    && s.streak_periods >= slow_seconds
                    && ratio >= slow_ratio
                {
                    let msg = format!(
                        "subscriber too slow: dropped {} of {} records during the last {} s \
                         (queue of {}); read faster or narrow the filters",
                        s.streak_dropped,
                        s.streak_offered,
                        s.streak_periods,
                        s.tx.max_capacity()
                    );
                    tracing::warn!(id = s.id, peer = %s.peer, "{msg}");
                    s.finish();
                    if let Some(close) = s.close.take() {
                        let _ = close.send(Status::resource_exhausted(msg));
                    }
                    return false;
                }
            }
            true
        });
    }

    fn subscribe(&mut self, req: SubscribeRequest, live: bool) -> Subscription {
        let matches = |f: &Arc<EncodedFlow>| {
            req.since.is_none_or(|s| f.record.end >= s)
                && req.until.is_none_or(|u| f.record.end <= u)
                && req.filters.matches(&f.record)
        };
        let mut replay: VecDeque<Payload> = VecDeque::new();
        if req.number > 0 || req.since.is_some() {
            let limit = if req.number > 0 {
                usize::try_from(req.number).unwrap_or(usize::MAX)
            } else {
                usize::MAX
            };
            let mut picked: Vec<Arc<EncodedFlow>> = self
                .history
                .iter()
                .rev()
                .filter(|f| matches(f))
                .take(limit)
                .cloned()
                .collect();
            picked.reverse();
            replay.extend(picked.into_iter().map(Payload::Flow));
        }
        let expired = req.until.is_some_and(|u| SystemTime::now() > u);
        let mailbox = Arc::new(LossMailbox::default());
        let responses = Arc::new(AtomicU64::new(0));
        let (rx, close) = if req.follow && live && !expired {
            let capacity = req.queue_size.unwrap_or(self.opts.queue_size);
            let (tx, rx) = mpsc::channel(capacity.max(1));
            let (close_tx, close_rx) = oneshot::channel();
            let id = self.next_id;
            self.next_id += 1;
            tracing::debug!(id, peer = %req.peer, "subscriber connected");
            self.subs.push(Sub {
                id,
                peer: req.peer,
                filters: req.filters,
                include_updates: req.include_updates,
                until: req.until,
                keep_when_slow: req.keep_when_slow,
                stats: req.stats,
                tx,
                close: Some(close_tx),
                mailbox: mailbox.clone(),
                queue_loss: None,
                drops: 0,
                delivered: 0,
                responses: responses.clone(),
                pending: HashMap::new(),
                last_sent: HashMap::new(),
                period_offered: 0,
                period_dropped: 0,
                streak_periods: 0,
                streak_offered: 0,
                streak_dropped: 0,
            });
            (Some(rx), Some(close_rx))
        } else {
            (None, None)
        };
        Subscription {
            replay,
            rx,
            close,
            mailbox,
            stash: None,
            closing: None,
            max_flows: req.max_flows_per_response.clamp(1, MAX_FLOWS_PER_RESPONSE),
            // A copy of its own: every envelope clones it, and a count
            // shared by all streams would bounce between threads.
            node_name: Arc::from(&*self.node_name),
            sequence: 0,
            responses,
            done: false,
        }
    }

    fn status(&self) -> HubStatus {
        HubStatus {
            history_occupancy: self.history.len() as u64,
            history_capacity: self.opts.history_size as u64,
            subscribers: self
                .subs
                .iter()
                .map(|s| SubscriberInfo {
                    id: s.id,
                    peer: s.peer.clone(),
                    queue_depth: (s.tx.max_capacity() - s.tx.capacity()) as u64,
                    queue_capacity: s.tx.max_capacity() as u64,
                    drops: s.drops,
                    delivered: s.delivered,
                    responses: s.responses.load(Ordering::Relaxed),
                    sink: s.stats.as_ref().map(|k| k.info()),
                })
                .collect(),
            flows_received: self.flows_received,
            pod_flows: self
                .pod_flows
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            export_queue_drops: self.export_drops_total,
        }
    }
}
