//! The publishing loop of the NATS sink: a bounded window of publications
//! waiting for their JetStream acknowledgement, retried with the same
//! message id until acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError, publish::PublishAck};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::message::{Encoder, Outgoing};
use super::NatsCounters;
use crate::config::NatsConfig;
use crate::export::encoded::Payload;
use crate::export::hub::Subscription;
use crate::export::sink::SinkReport;
use crate::export::status::StatusFeed;

/// First wait before publishing failed messages again; doubled per failed
/// round.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two rounds of retries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// One message of the window.
struct Pending {
    msg: Outgoing,
    /// Publications of it so far minus one; an outcome of an older one is
    /// stale.
    attempt: u32,
}

/// The outcome of one publication: (sequence, attempt, ack).
type Outcome = (u64, u32, Result<PublishAck, PublishError>);

/// Publishes `msg` and hands its acknowledgement (or failure) to `acks`.
async fn send(
    js: &jetstream::Context,
    seq: u64,
    attempt: u32,
    msg: &Outgoing,
    acks: &mpsc::UnboundedSender<Outcome>,
) {
    match js
        .publish_with_headers(
            msg.subject.clone(),
            msg.headers.clone(),
            msg.payload.clone(),
        )
        .await
    {
        Ok(ack) => {
            let acks = acks.clone();
            tokio::spawn(async move {
                let _ = acks.send((seq, attempt, ack.await));
            });
        }
        Err(e) => {
            let _ = acks.send((seq, attempt, Err(e)));
        }
    }
}

/// Creates the configured stream when it is missing, or checks that the
/// existing one takes the sink's subjects; retries until the server
/// answers.
async fn ensure_stream(js: jetstream::Context, cfg: NatsConfig) {
    let s = &cfg.stream;
    let subjects = cfg.stream_subjects();
    let config = jetstream::stream::Config {
        name: s.name.trim().to_string(),
        subjects: subjects.clone(),
        num_replicas: s.replicas,
        max_age: s.max_age,
        max_bytes: if s.max_bytes == 0 {
            -1
        } else {
            i64::try_from(s.max_bytes).unwrap_or(i64::MAX)
        },
        ..jetstream::stream::Config::default()
    };
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => {
                let have = &stream.cached_info().config.subjects;
                if subjects.iter().all(|x| have.contains(x)) {
                    tracing::info!(stream = %config.name, subjects = ?have, "NATS stream ready");
                } else {
                    tracing::warn!(
                        stream = %config.name,
                        subjects = ?have,
                        wanted = ?subjects,
                        "NATS stream exists with other subjects (left as it is); records \
                         outside them are refused and retried"
                    );
                }
                return;
            }
            Err(e) => {
                // Once, then at each doubling of the wait: not every retry.
                if delay == FIRST_RETRY_DELAY || delay < MAX_RETRY_DELAY {
                    tracing::warn!(
                        stream = %config.name,
                        "creating or checking the NATS stream: {e}; records wait until it is ready"
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Publishes the status of `feed` to the node's status subject, without
/// waiting: its acknowledgement is awaited on a task of its own, and a
/// status that is not stored is replaced by the next.
async fn publish_status(js: &jetstream::Context, encoder: &Encoder, feed: &StatusFeed) {
    let Some(status) = feed.get().await else {
        return;
    };
    let msg = encoder.status(&status);
    match js
        .publish_with_headers(msg.subject, msg.headers, msg.payload)
        .await
    {
        Ok(ack) => {
            tokio::spawn(async move {
                if let Err(e) = ack.await {
                    tracing::debug!("NATS status not stored: {e}");
                }
            });
        }
        Err(e) => tracing::debug!("NATS status not published: {e}"),
    }
}

/// Publishes every record and loss notice of `flows` until it ends and
/// every publication is acknowledged; and the status of `feed` at start,
/// every `status_interval` and at the end.
pub(super) async fn run(
    client: async_nats::Client,
    cfg: NatsConfig,
    encoder: Encoder,
    counters: Arc<NatsCounters>,
    feed: Option<StatusFeed>,
    mut flows: Subscription,
) -> SinkReport {
    let feed = feed.filter(|_| !cfg.status_interval.is_zero());
    let mut status_tick = tokio::time::interval(cfg.status_interval.max(Duration::from_millis(1)));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let js = jetstream::ContextBuilder::new()
        .timeout(cfg.ack_timeout)
        .max_ack_inflight(cfg.max_in_flight)
        .backpressure_on_inflight(true)
        .build(client.clone());
    // Records wait in the hub queue until the stream is ready, rather than
    // failing against a missing stream.
    let mut stream_task = cfg
        .stream
        .create
        .then(|| tokio::spawn(ensure_stream(js.clone(), cfg.clone())));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Outcome>();
    let mut window: HashMap<u64, Pending> = HashMap::new();
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut retry_at: Option<Instant> = None;
    let mut retry_delay = FIRST_RETRY_DELAY;
    let mut failing = false;
    let mut seq: u64 = 0;
    let mut ended = false;
    let mut report = SinkReport::default();
    while !(ended && window.is_empty()) {
        tokio::select! {
            _ = async { stream_task.as_mut().expect("guarded").await }, if stream_task.is_some() => {
                stream_task = None;
            },
            Some((s, attempt, outcome)) = ack_rx.recv() => match outcome {
                Ok(ack) => {
                    let Some(p) = window.remove(&s) else { continue };
                    if p.msg.is_flow {
                        report.delivered += 1;
                        NatsCounters::add(&counters.published, 1);
                    } else {
                        NatsCounters::add(&counters.loss_notices, 1);
                    }
                    if ack.duplicate {
                        NatsCounters::add(&counters.duplicates, 1);
                    }
                    if failing {
                        failing = false;
                        retry_delay = FIRST_RETRY_DELAY;
                        tracing::info!("NATS publishing acknowledged again");
                    }
                }
                Err(e) => {
                    if window.get(&s).is_none_or(|p| p.attempt != attempt) {
                        continue;
                    }
                    if !failing {
                        failing = true;
                        tracing::warn!("NATS publication failed ({e}); retrying");
                    }
                    retry.push_back(s);
                    retry_at.get_or_insert_with(|| Instant::now() + retry_delay);
                }
            },
            item = flows.next(), if stream_task.is_none() && !ended && window.len() < cfg.max_in_flight => {
                let resp = match item {
                    None => {
                        ended = true;
                        continue;
                    }
                    Some(Err(status)) => {
                        tracing::warn!("NATS sink stopped by the fan-out: {}", status.message());
                        report.error = Some(status.message().to_string());
                        ended = true;
                        continue;
                    }
                    Some(Ok(resp)) => resp,
                };
                let mut msgs: Vec<Outgoing> = Vec::with_capacity(1 + resp.flows.len());
                match &resp.payload {
                    Some(Payload::Flow(f)) => msgs.push(encoder.flow(f, seq + 1)),
                    Some(Payload::Loss(l)) => {
                        report.loss_notices += 1;
                        report.lost += l.count;
                        msgs.push(encoder.loss(l, seq + 1));
                    }
                    None => {}
                }
                for f in &resp.flows {
                    msgs.push(encoder.flow(f, seq + 1 + msgs.len() as u64));
                }
                for msg in msgs {
                    seq += 1;
                    send(&js, seq, 0, &msg, &ack_tx).await;
                    window.insert(seq, Pending { msg, attempt: 0 });
                }
            },
            _ = status_tick.tick(), if feed.is_some() && stream_task.is_none() && !ended => {
                if let Some(f) = &feed {
                    publish_status(&js, &encoder, f).await;
                }
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                if client.connection_state() != async_nats::connection::State::Connected {
                    retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                    retry_at = Some(Instant::now() + retry_delay);
                    continue;
                }
                retry_at = None;
                retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                let mut due: Vec<u64> = retry.drain(..).collect();
                due.sort_unstable();
                due.dedup();
                for s in due {
                    let Some(p) = window.get_mut(&s) else { continue };
                    p.attempt += 1;
                    NatsCounters::add(&counters.retries, 1);
                    send(&js, s, p.attempt, &p.msg, &ack_tx).await;
                }
            },
        }
    }
    if let Some(t) = stream_task {
        t.abort();
    }
    if let Some(f) = &feed {
        // The last word: what the node counted when its stream ended.
        publish_status(&js, &encoder, f).await;
    }
    if let Err(e) = client.flush().await {
        tracing::debug!("NATS flush at the end: {e}");
    }
    counters.connected.store(
        client.connection_state() == async_nats::connection::State::Connected,
        Ordering::Relaxed,
    );
    tracing::info!(
        published = report.delivered,
        loss_notices = report.loss_notices,
        "NATS sink finished"
    );
    report
}
