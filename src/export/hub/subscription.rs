//! The response stream of one `StreamFlows` call: replay first, then the
//! live queue, with loss notices from the mailbox and the closing status.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::export::convert;
use crate::export::encoded::{EncodedFlow, Payload, WireResponse};
use crate::export::proto;

use super::losses::*;
use super::*;

/// The response stream of one StreamFlows call.
#[derive(Debug)]
pub struct Subscription {
    pub(super) replay: VecDeque<Payload>,
    pub(super) rx: Option<mpsc::Receiver<Payload>>,
    pub(super) close: Option<oneshot::Receiver<Status>>,
    /// Notices that did not fit the queue.
    pub(super) mailbox: Arc<LossMailbox>,
    /// A payload taken while packing that did not fit the response.
    pub(super) stash: Option<Payload>,
    /// The status to end with once the last notices are out.
    pub(super) closing: Option<Status>,
    /// Most flows per response; 1: unpacked.
    pub(super) max_flows: usize,
    pub(super) node_name: Arc<str>,
    pub(super) sequence: u64,
    /// Responses produced, shared with the hub's status.
    pub(super) responses: Arc<AtomicU64>,
    pub(super) done: bool,
}

impl Subscription {
    pub(super) fn wrap(
        &mut self,
        payload: Option<Payload>,
        flows: Vec<Arc<EncodedFlow>>,
    ) -> WireResponse {
        self.sequence += 1;
        self.responses.fetch_add(1, Ordering::Relaxed);
        WireResponse {
            payload,
            flows,
            node_name: self.node_name.clone(),
            time: Some(convert::timestamp(SystemTime::now())),
            sequence: self.sequence,
        }
    }

    pub(super) fn loss(
        &mut self,
        notice: proto::LossNotice,
    ) -> Poll<Option<Result<WireResponse, Status>>> {
        Poll::Ready(Some(Ok(self.wrap(Some(Payload::Loss(notice)), Vec::new()))))
    }

    /// The next payload already at hand: stashed, replayed or queued.
    pub(super) fn try_next(&mut self) -> Option<Payload> {
        if let Some(p) = self.stash.take().or_else(|| self.replay.pop_front()) {
            return Some(p);
        }
        self.rx.as_mut()?.try_recv().ok()
    }

    /// The stream was closed by the hub: what is still queued for it will
    /// not be delivered, so it is counted as `SUBSCRIBER_QUEUE` loss.
    pub(super) fn abandon(&mut self, status: Status) {
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
        }
        let mut flows = 0u64;
        let mut notices = Vec::new();
        while let Some(p) = self.try_next() {
            match p {
                Payload::Flow(_) => flows += 1,
                Payload::Loss(l) => notices.push(l),
            }
        }
        self.rx = None;
        let now = SystemTime::now();
        if flows > 0 {
            self.mailbox
                .put(SUBSCRIBER_QUEUE_KEY, CoalescedLoss::at(flows, now));
        }
        for l in notices {
            let t = |ts: &Option<prost_types::Timestamp>| {
                ts.as_ref().and_then(convert::system_time).unwrap_or(now)
            };
            let loss = CoalescedLoss {
                count: l.count,
                first: t(&l.first),
                last: t(&l.last),
            };
            self.mailbox.put((l.source, l.cpu), loss);
        }
        self.closing = Some(status);
    }

    /// The envelope for `first` and, when packing, the flows that follow it
    /// up to the bounds.
    pub(super) fn envelope(&mut self, first: Payload) -> WireResponse {
        let first = match first {
            Payload::Flow(f) if self.max_flows > 1 => f,
            other => return self.wrap(Some(other), Vec::new()),
        };
        let mut bytes = first.bytes.len();
        let mut flows = Vec::with_capacity(self.max_flows.min(8));
        flows.push(first);
        while flows.len() < self.max_flows {
            match self.try_next() {
                Some(Payload::Flow(f)) if bytes + f.bytes.len() <= MAX_PACKED_FLOW_BYTES => {
                    bytes += f.bytes.len();
                    flows.push(f);
                }
                Some(other) => {
                    self.stash = Some(other);
                    break;
                }
                None => break,
            }
        }
        self.wrap(None, flows)
    }

    /// After the last record: waiting notices, then the closing status.
    pub(super) fn finish(&mut self) -> Poll<Option<Result<WireResponse, Status>>> {
        // The hub sends the status before it lets go of the queue, so a
        // status not seen yet is there now.
        if let Some(status) = self.close.take().and_then(|mut c| c.try_recv().ok()) {
            self.closing = Some(status);
        }
        if let Some(n) = self.mailbox.take() {
            return self.loss(n);
        }
        self.done = true;
        Poll::Ready(self.closing.take().map(Err))
    }
}

impl tokio_stream::Stream for Subscription {
    type Item = Result<WireResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(close) = this.close.as_mut() {
            match Pin::new(close).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    this.close = None;
                    this.abandon(status);
                }
                Poll::Ready(Err(_)) => this.close = None,
                Poll::Pending => {}
            }
        }
        if this.mailbox.is_waiting() && this.mailbox.is_due(Instant::now()) {
            if let Some(n) = this.mailbox.take() {
                return this.loss(n);
            }
        }
        if let Some(p) = this.try_next() {
            return Poll::Ready(Some(Ok(this.envelope(p))));
        }
        let Some(rx) = this.rx.as_mut() else {
            return this.finish();
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(p)) => Poll::Ready(Some(Ok(this.envelope(p)))),
            Poll::Ready(None) => {
                this.rx = None;
                this.finish()
            }
            Poll::Pending => match this.mailbox.take() {
                Some(n) => this.loss(n),
                None => Poll::Pending,
            },
        }
    }
}
