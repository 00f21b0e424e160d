//! Reading the flow stream back from JetStream (`sockscope watch --nats`):
//! the messages the sinks of every node published, as `StreamFlowsResponse`s
//! with the same request semantics as a daemon's `StreamFlows`.
//!
//! * Where the read starts: `since` → the first message stored at or after
//!   that time; else `number` > 0 → the last `number` messages of the
//!   stream (flows, interim records and loss notices of every node
//!   together, before filtering); else new messages only.
//! * `follow` keeps reading; without it (or with `until`) the read ends
//!   once the stream's messages up to the start of the read are delivered.
//! * Filters, `include_updates` and `until` apply to each record as on a
//!   daemon. Loss notices are always delivered: they tell what the stream
//!   misses.
//! * Each response carries the publishing node's name (`Sockscope-Node`),
//!   the time the stream stored the message, and the message's stream
//!   sequence, so a reader can tell gaps.
//! * The read uses an ordered consumer (ephemeral, no acknowledgements):
//!   reading changes nothing in the stream. A message whose payload is not
//!   protobuf (a sink with `format: ecs_json`) is skipped and counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::message::{
    CONTENT_FLOW_PROTOBUF, CONTENT_LOSS_PROTOBUF, CONTENT_STATUS_PROTOBUF, HEADER_CONTENT_TYPE,
    HEADER_KIND, HEADER_NODE, KIND_UPDATE, STATUS_TOKEN,
};
use crate::config::NatsConfig;
use crate::export::convert;
use crate::export::filter::FilterSet;
use crate::export::proto::{self, stream_flows_response::Event};

/// Responses buffered between the read and its consumer.
pub const READ_QUEUE: usize = 256;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The request's filters are invalid.
    #[error("{0}")]
    Filter(String),
    /// The stream is not there.
    #[error("JetStream stream {stream:?}: {reason}")]
    Stream {
        /// Its name.
        stream: String,
        /// Why.
        reason: String,
    },
    /// The consumer could not be made or its messages read.
    #[error("reading JetStream stream {stream:?}: {reason}")]
    Consume {
        /// The stream's name.
        stream: String,
        /// Why.
        reason: String,
    },
}

/// What a finished read saw besides what it delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadSummary {
    /// Messages read from the stream.
    pub messages: u64,
    /// Messages skipped because their payload is not protobuf, or does not
    /// decode.
    pub undecoded: u64,
}

fn system_time(t: time::OffsetDateTime) -> SystemTime {
    let ns = t.unix_timestamp_nanos();
    match u64::try_from(ns) {
        Ok(ns) => UNIX_EPOCH + Duration::from_nanos(ns),
        Err(_) => UNIX_EPOCH,
    }
}

fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    let ns = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Reads the stream of `cfg` (`stream.name`, subjects under
/// `subject_prefix`) as `req` asks, sending each response to `tx`; returns
/// when the read is done, the receiver is gone, or reading fails.
pub async fn read(
    client: async_nats::Client,
    cfg: &NatsConfig,
    req: &proto::StreamFlowsRequest,
    tx: mpsc::Sender<Result<proto::StreamFlowsResponse, ReadError>>,
) -> ReadSummary {
    let mut summary = ReadSummary::default();
    if let Err(e) = read_inner(client, cfg, req, &tx, &mut summary).await {
        let _ = tx.send(Err(e)).await;
    }
    summary
}

async fn read_inner(
    client: async_nats::Client,
    cfg: &NatsConfig,
    req: &proto::StreamFlowsRequest,
    tx: &mpsc::Sender<Result<proto::StreamFlowsResponse, ReadError>>,
    summary: &mut ReadSummary,
) -> Result<(), ReadError> {
    let filters =
        FilterSet::compile(&req.allow, &req.deny).map_err(|e| ReadError::Filter(e.to_string()))?;
    let name = cfg.stream.name.clone();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&name).await.map_err(|e| ReadError::Stream {
        stream: name.clone(),
        reason: e.to_string(),
    })?;
    let state = stream
        .info()
        .await
        .map_err(|e| ReadError::Stream {
            stream: name.clone(),
            reason: e.to_string(),
        })?
        .state
        .clone();
    let since = req.since.as_ref().and_then(convert::system_time);
    let until = req.until.as_ref().and_then(convert::system_time);
    let follow = req.follow && until.is_none();
    let deliver = match (since, req.number) {
        (Some(t), _) => DeliverPolicy::ByStartTime {
            start_time: offset_time(t),
        },
        (None, n) if n > 0 => DeliverPolicy::ByStartSequence {
            start_sequence: state
                .last_sequence
                .saturating_sub(n - 1)
                .max(state.first_sequence)
                .max(1),
        },
        (None, _) => DeliverPolicy::New,
    };
    let replays = !matches!(deliver, DeliverPolicy::New);
    // Nothing stored to replay, and nothing to wait for.
    if !follow && (!replays || state.messages == 0) {
        return Ok(());
    }
    let consume_err = |e: &dyn std::fmt::Display| ReadError::Consume {
        stream: name.clone(),
        reason: e.to_string(),
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}.>", cfg.subject_prefix),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| consume_err(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| consume_err(&e))?;
    let last_at_start = state.last_sequence;
    loop {
        let msg = if follow {
            messages.next().await
        } else {
            // Without follow, a read past what was stored at the start
            // must not wait for new messages.
            match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                Ok(m) => m,
                Err(_) => return Ok(()),
            }
        };
        let Some(msg) = msg else { return Ok(()) };
        let msg = msg.map_err(|e| consume_err(&e))?;
        summary.messages += 1;
        let (seq, pending, stored) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.pending, system_time(i.published)),
            Err(e) => return Err(consume_err(&e)),
        };
        let header = |k: &str| {
            msg.message
                .headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        let (kind, content) = (header(HEADER_KIND), header(HEADER_CONTENT_TYPE));
        let event = if content == CONTENT_FLOW_PROTOBUF {
            match proto::Flow::decode(msg.message.payload.as_ref()) {
                Ok(f) => {
                    let wanted = (req.include_updates || kind != KIND_UPDATE)
                        && match convert::flow_from_proto(&f) {
                            Ok((rec, _)) => {
                                filters.matches(&rec) && until.is_none_or(|u| rec.end <= u)
                            }
                            Err(_) => false,
                        };
                    wanted.then_some(Event::Flow(f))
                }
                Err(_) => {
                    summary.undecoded += 1;
                    None
                }
            }
        } else if content == CONTENT_LOSS_PROTOBUF {
            match proto::LossNotice::decode(msg.message.payload.as_ref()) {
                Ok(l) => Some(Event::Loss(l)),
                Err(_) => {
                    summary.undecoded += 1;
                    None
                }
            }
        } else if content == CONTENT_STATUS_PROTOBUF {
            // A node's status, for the relay's nodes_seen: not a record.
            None
        } else {
            summary.undecoded += 1;
            None
        };
        if let Some(event) = event {
            let resp = proto::StreamFlowsResponse {
                event: Some(event),
                flows: Vec::new(),
                node_name: header(HEADER_NODE),
                time: Some(convert::timestamp(stored)),
                sequence: seq,
            };
            if tx.send(Ok(resp)).await.is_err() {
                return Ok(());
            }
        }
        if !follow && (pending == 0 || seq >= last_at_start) {
            return Ok(());
        }
    }
}

/// The nodes whose records are in the stream of `cfg`: per node subject
/// token, its flow records and loss notices stored, the name its last
/// message carries and when that was stored. In token order.
pub async fn nodes_seen(
    client: async_nats::Client,
    cfg: &NatsConfig,
) -> Result<Vec<proto::NodeSeen>, ReadError> {
    use std::collections::BTreeMap;
    let name = cfg.stream.name.clone();
    let err = |e: &dyn std::fmt::Display| ReadError::Stream {
        stream: name.clone(),
        reason: e.to_string(),
    };
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&name).await.map_err(|e| err(&e))?;
    let prefix = format!("{}.", cfg.subject_prefix);
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| err(&e))?;
    // token -> (flows, losses, subjects of the token)
    let mut per: BTreeMap<String, (u64, u64, Vec<String>)> = BTreeMap::new();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.map_err(|e| err(&e))?;
        let Some(rest) = subject.strip_prefix(&prefix) else {
            continue;
        };
        let Some((token, class)) = rest.split_once('.') else {
            continue;
        };
        let e = per.entry(token.to_string()).or_default();
        if class == super::message::LOSS_TOKEN {
            e.1 += count as u64;
        } else if class != STATUS_TOKEN {
            e.0 += count as u64;
        }
        e.2.push(subject.clone());
    }
    let mut out = Vec::new();
    for (token, (flows, losses, subjects)) in per {
        let status_subject = format!("{prefix}{token}.{STATUS_TOKEN}");
        let mut status = None;
        let mut status_time = None;
        if subjects.contains(&status_subject) {
            if let Ok(m) = stream
                .get_last_raw_message_by_subject(&status_subject)
                .await
            {
                // A status that does not decode is left out, not an error.
                status = proto::GetStatusResponse::decode(m.payload.as_ref()).ok();
                status_time = status
                    .is_some()
                    .then(|| convert::timestamp(system_time(m.time)));
            }
        }
        let mut last: Option<async_nats::jetstream::message::StreamMessage> = None;
        for s in &subjects {
            if let Ok(m) = stream.get_last_raw_message_by_subject(s).await {
                if last.as_ref().is_none_or(|l| m.sequence > l.sequence) {
                    last = Some(m);
                }
            }
        }
        out.push(proto::NodeSeen {
            node_name: last
                .as_ref()
                .and_then(|m| m.headers.get(HEADER_NODE))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
            subject_token: token,
            flow_messages: flows,
            loss_notices: losses,
            last_message: last.map(|m| convert::timestamp(system_time(m.time))),
            status,
            status_time,
        });
    }
    Ok(out)
}
