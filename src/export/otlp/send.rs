//! The batching and export loop of the OTLP sink: one request at a time,
//! retried with backoff while the receiver cannot take it, dropped and
//! counted (and told in the next request) when it will not.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;

use super::{record, OtlpCounters, OtlpSink};
use crate::export::encoded::Payload;
use crate::export::hub::Subscription;
use crate::export::proto;
use crate::export::sink::SinkReport;

/// First wait before a failed request is sent again; doubled per attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Whether OTLP calls a failure with `code` retryable (the receiver could
/// not take the request now, and may later).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Log records waiting for their request.
#[derive(Default)]
struct Batch {
    records: Vec<LogRecord>,
    /// Flow records among them.
    flows: u64,
    /// Loss records among them.
    losses: u64,
    /// What those loss records count.
    told: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The first `n` records as a batch of their own.
    fn take(&mut self, n: usize) -> Batch {
        if n >= self.records.len() {
            return std::mem::take(self);
        }
        let rest = self.records.split_off(n);
        let head = std::mem::replace(&mut self.records, rest);
        let flows = head
            .iter()
            .filter(|r| r.event_name != record::EVENT_LOSS)
            .count() as u64;
        let losses = head.len() as u64 - flows;
        let told: u64 = head
            .iter()
            .filter(|r| r.event_name == record::EVENT_LOSS)
            .map(loss_count)
            .sum();
        self.flows -= flows;
        self.losses -= losses;
        self.told -= told;
        Batch {
            records: head,
            flows,
            losses,
            told,
        }
    }
}

/// The count of a loss record.
fn loss_count(r: &LogRecord) -> u64 {
    r.attributes
        .iter()
        .find(|a| a.key == record::LOSS_COUNT)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .and_then(|v| match v {
            opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i) => {
                u64::try_from(*i).ok()
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// What the sink lost itself and has not told the receiver yet.
#[derive(Default)]
struct Untold {
    count: u64,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

impl Untold {
    fn add(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        let now = SystemTime::now();
        self.count += n;
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn notice(&self) -> proto::LossNotice {
        proto::LossNotice {
            source: proto::LossSource::Sink as i32,
            cpu: None,
            count: self.count,
            first: self.first.map(prost_types::Timestamp::from),
            last: self.last.map(prost_types::Timestamp::from),
        }
    }
}

/// The loop's state.
struct Exporter {
    sink: OtlpSink,
    resource: opentelemetry_proto::tonic::resource::v1::Resource,
    scope: opentelemetry_proto::tonic::common::v1::InstrumentationScope,
    untold: Untold,
    /// The last request failed.
    failing: bool,
    report: SinkReport,
}

impl Exporter {
    fn counters(&self) -> &OtlpCounters {
        &self.sink.counters
    }

    fn request(&self, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(self.scope.clone()),
                    log_records: records,
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        }
    }

    /// Sends `batch`, preceded by a loss record of what the sink lost
    /// before, until the receiver takes it or it is given up.
    async fn export(&mut self, mut batch: Batch) {
        let carried = self.untold.count;
        if carried > 0 {
            batch.records.insert(
                0,
                record::loss_record(&self.untold.notice(), SystemTime::now()),
            );
        }
        let (n_records, flows, losses) = (
            batch.records.len(),
            batch.flows,
            batch.losses + u64::from(carried > 0),
        );
        let req = self.request(batch.records);
        let cfg = &self.sink.cfg;
        let started = Instant::now();
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let mut r = tonic::Request::new(req.clone());
            *r.metadata_mut() = self.sink.metadata.clone();
            match self.sink.client.export(r).await {
                Ok(resp) => {
                    let rejected = resp
                        .into_inner()
                        .partial_success
                        .filter(|p| p.rejected_log_records > 0 || !p.error_message.is_empty());
                    let mut refused = 0;
                    if let Some(p) = rejected {
                        refused = u64::try_from(p.rejected_log_records)
                            .unwrap_or(0)
                            .min(flows);
                        tracing::warn!(
                            rejected = p.rejected_log_records,
                            "the OTLP receiver rejected log records: {}",
                            p.error_message
                        );
                    }
                    let c = self.counters();
                    c.connected.store(true, Ordering::Relaxed);
                    OtlpCounters::add(&c.published, flows - refused);
                    OtlpCounters::add(&c.rejected, refused);
                    OtlpCounters::add(&c.loss_notices, losses);
                    self.report.delivered += flows - refused;
                    if carried > 0 {
                        self.untold = Untold::default();
                    }
                    if self.failing {
                        self.failing = false;
                        tracing::info!("the OTLP receiver takes requests again");
                    }
                    return;
                }
                Err(status) => {
                    let code = status.code();
                    self.counters().connected.store(
                        !matches!(code, Code::Unavailable | Code::DeadlineExceeded),
                        Ordering::Relaxed,
                    );
                    let next = started.elapsed() + delay;
                    if retryable(code) && next <= cfg.max_retry_time {
                        if !self.failing {
                            self.failing = true;
                            tracing::warn!(
                                code = ?code,
                                records = n_records,
                                "the OTLP receiver did not take a request ({}); retrying for \
                                 up to {:?}",
                                status.message(),
                                cfg.max_retry_time
                            );
                        }
                        OtlpCounters::add(&self.counters().retries, 1);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_RETRY_DELAY);
                        continue;
                    }
                    self.failing = true;
                    let hint = if matches!(code, Code::Unauthenticated | Code::PermissionDenied) {
                        " (check export.otlp.headers)"
                    } else {
                        ""
                    };
                    tracing::error!(
                        code = ?code,
                        flows,
                        "the OTLP receiver did not take {n_records} log records ({}){hint}; \
                         dropped, counted and told in the next request",
                        status.message()
                    );
                    OtlpCounters::add(&self.counters().dropped, flows);
                    self.report.lost += flows;
                    // What the batch's loss records told is untold again;
                    // the carried loss record's count is still in `untold`.
                    self.untold.add(flows + batch.told);
                    return;
                }
            }
        }
    }
}

/// Exports every record and loss notice of `flows` until it ends.
pub(super) async fn run(sink: OtlpSink, mut flows: Subscription) -> SinkReport {
    let max = sink.cfg.max_batch_size;
    let timeout = sink.cfg.batch_timeout;
    let mut ex = Exporter {
        resource: record::resource(
            &sink.node,
            &sink.host,
            sink.k8s_node.as_deref(),
            &sink.cfg.resource_attributes,
        ),
        scope: record::scope(),
        sink,
        untold: Untold::default(),
        failing: false,
        report: SinkReport::default(),
    };
    let mut batch = Batch::default();
    let mut deadline: Option<Instant> = None;
    let mut ended = false;
    while !ended {
        let mut due = false;
        tokio::select! {
            item = flows.next() => match item {
                None => ended = true,
                Some(Err(status)) => {
                    tracing::warn!("OTLP sink stopped by the fan-out: {}", status.message());
                    ex.report.error = Some(status.message().to_string());
                    ended = true;
                }
                Some(Ok(resp)) => {
                    let now = SystemTime::now();
                    match &resp.payload {
                        Some(Payload::Flow(f)) => {
                            batch.records.push(record::flow_record(f, &ex.sink.host, now));
                            batch.flows += 1;
                        }
                        Some(Payload::Loss(l)) => {
                            ex.report.loss_notices += 1;
                            ex.report.lost += l.count;
                            batch.records.push(record::loss_record(l, now));
                            batch.losses += 1;
                            batch.told += l.count;
                        }
                        None => {}
                    }
                    for f in &resp.flows {
                        batch.records.push(record::flow_record(f, &ex.sink.host, now));
                        batch.flows += 1;
                    }
                    if !batch.is_empty() {
                        deadline.get_or_insert_with(|| Instant::now() + timeout);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                due = true;
            },
        }
        while batch.records.len() >= max {
            let head = batch.take(max);
            ex.export(head).await;
        }
        if (due || ended) && !batch.is_empty() {
            let all = std::mem::take(&mut batch);
            ex.export(all).await;
        }
        if batch.is_empty() {
            deadline = None;
        }
    }
    if ex.untold.count > 0 {
        // Tell the receiver what was lost, if it takes one more request.
        ex.export(Batch::default()).await;
    }
    tracing::info!(
        exported = ex.report.delivered,
        loss_notices = ex.report.loss_notices,
        dropped = ex.sink.counters.dropped.load(Ordering::Relaxed),
        "OTLP sink finished"
    );
    ex.report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_codes_are_otlps() {
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(retryable(c), "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }

    #[test]
    fn a_batch_splits_with_its_counts() {
        let loss = record::loss_record(
            &proto::LossNotice {
                source: proto::LossSource::SubscriberQueue as i32,
                count: 5,
                ..proto::LossNotice::default()
            },
            SystemTime::UNIX_EPOCH,
        );
        let flow = LogRecord {
            event_name: record::EVENT_FLOW.into(),
            ..LogRecord::default()
        };
        let mut b = Batch {
            records: vec![flow.clone(), loss, flow.clone(), flow],
            flows: 3,
            losses: 1,
            told: 5,
        };
        let head = b.take(2);
        assert_eq!((head.flows, head.losses, head.told), (1, 1, 5));
        assert_eq!((b.flows, b.losses, b.told, b.records.len()), (2, 0, 0, 2));
        let rest = b.take(10);
        assert_eq!(rest.flows, 2);
        assert!(b.is_empty());
    }
}
