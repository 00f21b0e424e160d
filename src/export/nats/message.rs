//! What the NATS sink publishes: subjects, headers, message ids and
//! payloads.
//!
//! * a flow record goes to `<prefix>.<node>.<transport>` (`tcp`, `udp`),
//!   a loss notice to `<prefix>.<node>.loss`; the node is made a single
//!   subject token ([`subject_token`]);
//! * headers: [`HEADER_NODE`] (the node name as configured),
//!   [`HEADER_KIND`] (`flow`, `update` or `loss`), `Content-Type`, and
//!   `Nats-Msg-Id` = `<node token>.<instance>.<sequence>`: the instance is
//!   drawn at random when the sink starts, the sequence counts the sink's
//!   messages, so the id is unique per record and the same for every retry
//!   of it (JetStream's duplicate window drops the retries).

use bytes::Bytes;
use prost::Message as _;

use crate::config::NatsFormat;
use crate::export::client::proto_json;
use crate::export::ecs::{self, HostInfo};
use crate::export::encoded::EncodedFlow;
use crate::export::proto;
use crate::model::Transport;

/// Header carrying the node name.
pub const HEADER_NODE: &str = "Sockscope-Node";
/// Header carrying the kind of message: [`KIND_FLOW`], [`KIND_UPDATE`],
/// [`KIND_LOSS`] or [`KIND_STATUS`].
pub const HEADER_KIND: &str = "Sockscope-Kind";
/// Header of the payload's media type.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// JetStream's de-duplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Kind of a final flow record.
pub const KIND_FLOW: &str = "flow";
/// Kind of an interim flow record.
pub const KIND_UPDATE: &str = "update";
/// Kind of a loss notice.
pub const KIND_LOSS: &str = "loss";
/// Last subject token of loss notices.
pub const LOSS_TOKEN: &str = "loss";
/// Kind of a status message (the daemon's `GetStatus` answer).
pub const KIND_STATUS: &str = "status";
/// Last subject token of status messages.
pub const STATUS_TOKEN: &str = "status";
/// Content type of a protobuf status (always protobuf, whatever the
/// sink's `format`).
pub const CONTENT_STATUS_PROTOBUF: &str =
    "application/x-protobuf; messageType=sockscope.v1.GetStatusResponse";
/// Content type of a protobuf flow.
pub const CONTENT_FLOW_PROTOBUF: &str = "application/x-protobuf; messageType=sockscope.v1.Flow";
/// Content type of a protobuf loss notice.
pub const CONTENT_LOSS_PROTOBUF: &str =
    "application/x-protobuf; messageType=sockscope.v1.LossNotice";
/// Content type of JSON payloads.
pub const CONTENT_JSON: &str = "application/json";
/// Protobuf name of the loss notice, for its JSON form.
const LOSS_NOTICE: &str = "sockscope.v1.LossNotice";

/// `s` as one subject token: ASCII letters, digits, `-` and `_` are kept,
/// anything else (`.`, `*`, `>`, white space, non-ASCII) becomes `_`; an
/// empty name is `_`.
pub fn subject_token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "_".to_string()
    } else {
        t
    }
}

/// One message ready to publish (and to publish again on a retry).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Subject.
    pub subject: String,
    /// Headers, the message id among them.
    pub headers: async_nats::HeaderMap,
    /// Payload.
    pub payload: Bytes,
    /// Whether it is a flow record (else a loss notice).
    pub is_flow: bool,
}

/// Builds the messages of one sink.
#[derive(Debug, Clone)]
pub struct Encoder {
    format: NatsFormat,
    /// `<prefix>.<node token>`.
    base: String,
    node: String,
    node_token: String,
    instance: u64,
    host: HostInfo,
}

impl Encoder {
    /// An encoder for `node` under `prefix`, with a fresh random instance
    /// id.
    pub fn new(prefix: &str, node: &str, format: NatsFormat, host: HostInfo) -> Encoder {
        let node_token = subject_token(node);
        Encoder {
            format,
            base: format!("{}.{node_token}", prefix.trim()),
            node: node.to_string(),
            node_token,
            instance: fastrand::u64(..),
            host,
        }
    }

    /// The subject of records of `transport`.
    pub fn flow_subject(&self, transport: Transport) -> String {
        let t = match transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        format!("{}.{t}", self.base)
    }

    /// The subject of loss notices.
    pub fn loss_subject(&self) -> String {
        format!("{}.{LOSS_TOKEN}", self.base)
    }

    /// The message id of the sink's `sequence`th message.
    pub fn msg_id(&self, sequence: u64) -> String {
        format!("{}.{:016x}.{sequence}", self.node_token, self.instance)
    }

    fn headers(&self, kind: &str, content_type: &str, sequence: u64) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(HEADER_NODE, self.node.as_str());
        h.insert(HEADER_KIND, kind);
        h.insert(HEADER_CONTENT_TYPE, content_type);
        h.insert(HEADER_MSG_ID, self.msg_id(sequence).as_str());
        h
    }

    /// The message of a flow record.
    pub fn flow(&self, f: &EncodedFlow, sequence: u64) -> Outgoing {
        let kind = if f.record.is_final {
            KIND_FLOW
        } else {
            KIND_UPDATE
        };
        let (content_type, payload) = match self.format {
            NatsFormat::Protobuf => (CONTENT_FLOW_PROTOBUF, f.bytes.clone()),
            NatsFormat::EcsJson => (
                CONTENT_JSON,
                Bytes::from(ecs::flow_document(&f.record, &self.host).to_string()),
            ),
        };
        Outgoing {
            subject: self.flow_subject(f.record.transport),
            headers: self.headers(kind, content_type, sequence),
            payload,
            is_flow: true,
        }
    }

    /// The subject of status messages.
    pub fn status_subject(&self) -> String {
        format!("{}.{STATUS_TOKEN}", self.base)
    }

    /// The message of a status: no message id (each is new, and a lost
    /// one is replaced by the next).
    pub fn status(&self, status: &proto::GetStatusResponse) -> Outgoing {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_NODE, self.node.as_str());
        headers.insert(HEADER_KIND, KIND_STATUS);
        headers.insert(HEADER_CONTENT_TYPE, CONTENT_STATUS_PROTOBUF);
        Outgoing {
            subject: self.status_subject(),
            headers,
            payload: Bytes::from(status.encode_to_vec()),
            is_flow: false,
        }
    }

    /// The message of a loss notice.
    pub fn loss(&self, notice: &proto::LossNotice, sequence: u64) -> Outgoing {
        let (content_type, payload) = match self.format {
            NatsFormat::Protobuf => (CONTENT_LOSS_PROTOBUF, Bytes::from(notice.encode_to_vec())),
            NatsFormat::EcsJson => (
                CONTENT_JSON,
                // The notice is one of our own messages: its JSON form
                // cannot fail; an empty object would say so.
                Bytes::from(
                    proto_json(notice, LOSS_NOTICE)
                        .unwrap_or_default()
                        .to_string(),
                ),
            ),
        };
        Outgoing {
            subject: self.loss_subject(),
            headers: self.headers(KIND_LOSS, content_type, sequence),
            payload,
            is_flow: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_become_one_token() {
        assert_eq!(subject_token("node-1_a"), "node-1_a");
        assert_eq!(
            subject_token("ip-10-0-0-1.ec2.internal"),
            "ip-10-0-0-1_ec2_internal"
        );
        assert_eq!(subject_token("a b*c>d"), "a_b_c_d");
        assert_eq!(subject_token("nœud"), "n_ud");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn subjects_and_ids_carry_the_node() {
        let e = Encoder::new(
            "sockscope.flows",
            "web.1",
            NatsFormat::Protobuf,
            HostInfo::default(),
        );
        assert_eq!(e.flow_subject(Transport::Tcp), "sockscope.flows.web_1.tcp");
        assert_eq!(e.flow_subject(Transport::Udp), "sockscope.flows.web_1.udp");
        assert_eq!(e.loss_subject(), "sockscope.flows.web_1.loss");
        let id = e.msg_id(7);
        assert!(id.starts_with("web_1.") && id.ends_with(".7"), "{id}");
        assert_ne!(e.msg_id(7), e.msg_id(8));
        let other = Encoder::new("p", "web.1", NatsFormat::Protobuf, HostInfo::default());
        // Another instance of the sink (a restart) never repeats an id.
        assert_ne!(other.msg_id(7), id);
    }

    #[test]
    fn loss_notices_encode_in_both_formats() {
        let notice = proto::LossNotice {
            source: proto::LossSource::SubscriberQueue as i32,
            count: 12,
            ..proto::LossNotice::default()
        };
        for (format, ct) in [
            (NatsFormat::Protobuf, CONTENT_LOSS_PROTOBUF),
            (NatsFormat::EcsJson, CONTENT_JSON),
        ] {
            let e = Encoder::new("p", "n", format, HostInfo::default());
            let m = e.loss(&notice, 3);
            assert_eq!(m.subject, "p.n.loss");
            assert_eq!(
                m.headers.get(HEADER_CONTENT_TYPE).map(|v| v.as_str()),
                Some(ct)
            );
            assert_eq!(
                m.headers.get(HEADER_KIND).map(|v| v.as_str()),
                Some(KIND_LOSS)
            );
            let back = match format {
                NatsFormat::Protobuf => {
                    proto::LossNotice::decode(m.payload.as_ref()).expect("decode")
                }
                NatsFormat::EcsJson => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
                    assert_eq!(v["count"], "12", "{v}");
                    continue;
                }
            };
            assert_eq!(back, notice);
        }
    }
}
