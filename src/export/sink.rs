//! Exporters as subscribers of the fan-out [`Hub`]: one small interface
//! ([`Sink`]) for every output that takes flows out of the daemon (the JSON
//! lines writer, NATS JetStream).
//!
//! A sink is subscribed like a gRPC stream: its allow/deny filters and
//! `include_updates` are applied by the hub, it has its own bounded queue,
//! and what it cannot keep up with is dropped by the hub and counted against
//! it (its `peer` in `GetStatus` and the metrics, e.g. `nats:<servers>`),
//! then told to it in-band as `SUBSCRIBER_QUEUE` loss notices. The hub never
//! waits for a sink, so a slow or dead sink slows neither the pipeline nor
//! any other subscriber. A sink whose destination comes and goes (a
//! network server) asks to be kept when slow: it drops and counts while it
//! cannot deliver, and resumes when it can.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::export::filter::FilterSet;
use crate::export::hub::{Hub, SubscribeRequest, Subscription};
use crate::export::status::SinkStats;

/// What a sink's task resolves to.
pub type SinkFuture = Pin<Box<dyn Future<Output = SinkReport> + Send + 'static>>;

/// An exporter: something that consumes the flow stream of its
/// subscription until the stream ends.
pub trait Sink: Send + 'static {
    /// Short name of the kind of sink (`jsonl`, `nats`), the key under
    /// `export.*`.
    fn kind(&self) -> &'static str;
    /// How the sink appears among the subscribers (`GetStatus`, metrics).
    fn peer(&self) -> String;
    /// Consumes `flows` until it ends (the pipeline stopped); runs on the
    /// current runtime.
    fn run(self: Box<Self>, flows: Subscription) -> SinkFuture;
}

/// How a sink subscribes to the hub.
#[derive(Debug, Clone, Default)]
pub struct SinkSubscription {
    /// Interim records too.
    pub include_updates: bool,
    /// Compiled allow/deny filters.
    pub filters: FilterSet,
    /// Capacity of the sink's queue in the hub; `None`: the hub's default
    /// (`server.subscriber_queue_size`).
    pub queue_size: Option<usize>,
    /// Never closed as a slow subscriber (see [`SubscribeRequest`]).
    pub keep_when_slow: bool,
    /// The sink's own counters, shown with its subscriber entry in
    /// `GetStatus` and the metrics.
    pub stats: Option<Arc<dyn SinkStats>>,
}

/// What a sink did, when its stream ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Flow records the destination took (written, or acknowledged).
    pub delivered: u64,
    /// Loss notices the sink received in its stream.
    pub loss_notices: u64,
    /// Records those notices count as lost, by any source (the pipeline,
    /// the hub's queue to this sink, the sink's own drops).
    pub lost: u64,
    /// Why the sink stopped before its stream ended, if it did.
    pub error: Option<String>,
}

impl std::fmt::Display for SinkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivered {} flows, {} loss notices counting {} lost records",
            self.delivered, self.loss_notices, self.lost
        )?;
        if let Some(e) = &self.error {
            write!(f, "; stopped: {e}")?;
        }
        Ok(())
    }
}

/// A sink's running task.
#[derive(Debug)]
pub struct RunningSink {
    /// The kind of sink.
    pub kind: &'static str,
    /// Its peer name in the status.
    pub peer: String,
    /// Its task; resolves when its stream ended and it delivered what it
    /// could.
    pub task: JoinHandle<SinkReport>,
}

impl RunningSink {
    /// Waits at most `within` for the sink to finish (after the pipeline
    /// stopped); `None` if it did not (it is then aborted) or panicked.
    pub async fn finish(self, within: Duration) -> Option<SinkReport> {
        let abort = self.task.abort_handle();
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(report)) => Some(report),
            Ok(Err(e)) => {
                tracing::error!(sink = self.kind, peer = %self.peer, "sink task failed: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(
                    sink = self.kind,
                    peer = %self.peer,
                    "sink did not finish within {within:?}; stopped"
                );
                abort.abort();
                None
            }
        }
    }
}

/// Subscribes `sink` to `hub` and starts it on the current runtime.
pub async fn start(
    hub: &Hub,
    sink: Box<dyn Sink>,
    sub: SinkSubscription,
) -> Result<RunningSink, tonic::Status> {
    let peer = sink.peer();
    let kind = sink.kind();
    let flows = hub
        .subscribe(SubscribeRequest {
            follow: true,
            include_updates: sub.include_updates,
            filters: sub.filters,
            peer: peer.clone(),
            queue_size: sub.queue_size,
            keep_when_slow: sub.keep_when_slow,
            stats: sub.stats,
            ..SubscribeRequest::default()
        })
        .await?;
    let task = tokio::spawn(sink.run(flows));
    Ok(RunningSink { kind, peer, task })
}
