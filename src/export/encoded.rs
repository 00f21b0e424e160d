//! Server-side encoding of `StreamFlowsResponse` that embeds a flow encoded
//! once in the fan-out, so a record delivered to many subscribers is not
//! re-encoded per subscriber. The wire bytes are identical to encoding the
//! generated `proto::StreamFlowsResponse` (an embedded message is a
//! length-delimited field, like `bytes`).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::export::convert;
use crate::export::proto;
use crate::model::FlowRecord;

/// Field number of `StreamFlowsResponse.flow`.
const TAG_FLOW: u32 = 1;
/// Field number of `StreamFlowsResponse.loss`.
const TAG_LOSS: u32 = 2;
/// Field number of `StreamFlowsResponse.flows`.
const TAG_FLOWS: u32 = 3;
/// Field number of `StreamFlowsResponse.node_name`.
const TAG_NODE_NAME: u32 = 1000;
/// Field number of `StreamFlowsResponse.time`.
const TAG_TIME: u32 = 1001;
/// Field number of `StreamFlowsResponse.sequence`.
const TAG_SEQUENCE: u32 = 1002;

/// A flow record together with its protobuf encoding, made once and shared
/// between the history ring and every subscriber.
#[derive(Debug)]
pub struct EncodedFlow {
    /// The record (used for filtering).
    pub record: Arc<FlowRecord>,
    /// The encoded `proto::Flow`.
    pub bytes: Bytes,
}

impl EncodedFlow {
    /// Converts and encodes a record.
    pub fn new(record: Arc<FlowRecord>, host_name: &str) -> EncodedFlow {
        let bytes = Bytes::from(convert::flow(&record, host_name).encode_to_vec());
        EncodedFlow { record, bytes }
    }
}

/// The payload of one envelope.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A pre-encoded flow.
    Flow(Arc<EncodedFlow>),
    /// A loss notice.
    Loss(proto::LossNotice),
}

/// Encodes one pre-encoded flow as the length-delimited field `tag`.
fn encode_flow(tag: u32, f: &EncodedFlow, buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(f.bytes.len() as u64, buf);
    buf.put_slice(&f.bytes);
}

/// Length of [`encode_flow`]'s output.
fn flow_len(tag: u32, f: &EncodedFlow) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(f.bytes.len() as u64) + f.bytes.len()
}

/// A `StreamFlowsResponse` as the server sends it. Encode-only: decoding it
/// skips every field (clients decode `proto::StreamFlowsResponse`).
#[derive(Debug, Clone, Default)]
pub struct WireResponse {
    /// The payload (`flow` or `loss`).
    pub payload: Option<Payload>,
    /// Packed flows (`flows`), for streams that asked for them; empty
    /// otherwise.
    pub flows: Vec<Arc<EncodedFlow>>,
    /// Node name.
    pub node_name: Arc<str>,
    /// Send time.
    pub time: Option<prost_types::Timestamp>,
    /// Position in the stream, from 1.
    pub sequence: u64,
}

impl Message for WireResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.payload {
            Some(Payload::Flow(f)) => encode_flow(TAG_FLOW, f, buf),
            Some(Payload::Loss(l)) => encoding::message::encode(TAG_LOSS, l, buf),
            None => {}
        }
        for f in &self.flows {
            encode_flow(TAG_FLOWS, f, buf);
        }
        if !self.node_name.is_empty() {
            encoding::encode_key(TAG_NODE_NAME, WireType::LengthDelimited, buf);
            encoding::encode_varint(self.node_name.len() as u64, buf);
            buf.put_slice(self.node_name.as_bytes());
        }
        if let Some(t) = &self.time {
            encoding::message::encode(TAG_TIME, t, buf);
        }
        if self.sequence != 0 {
            encoding::uint64::encode(TAG_SEQUENCE, &self.sequence, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let payload = match &self.payload {
            Some(Payload::Flow(f)) => flow_len(TAG_FLOW, f),
            Some(Payload::Loss(l)) => encoding::message::encoded_len(TAG_LOSS, l),
            None => 0,
        };
        let flows: usize = self.flows.iter().map(|f| flow_len(TAG_FLOWS, f)).sum();
        let node = if self.node_name.is_empty() {
            0
        } else {
            encoding::key_len(TAG_NODE_NAME)
                + encoding::encoded_len_varint(self.node_name.len() as u64)
                + self.node_name.len()
        };
        let time = self
            .time
            .as_ref()
            .map_or(0, |t| encoding::message::encoded_len(TAG_TIME, t));
        let seq = if self.sequence == 0 {
            0
        } else {
            encoding::uint64::encoded_len(TAG_SEQUENCE, &self.sequence)
        };
        payload + flows + node + time + seq
    }

    fn clear(&mut self) {
        *self = WireResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, FlowDirection, Transport};
    use std::time::{Duration, UNIX_EPOCH};

    fn record() -> Arc<FlowRecord> {
        let t = UNIX_EPOCH + Duration::from_secs(1_566_506_795);
        Arc::new(FlowRecord {
            id: 42,
            is_final: true,
            complete: true,
            transport: Transport::Tcp,
            direction: FlowDirection::Egress,
            local: Endpoint {
                ip: "10.0.2.15".parse().expect("ip"),
                port: 40192,
                packets: 5,
                bytes: 294,
                domain: None,
                sequence: None,
            },
            remote: Endpoint {
                ip: "151.101.66.217".parse().expect("ip"),
                port: 80,
                packets: 5,
                bytes: 437,
                domain: Some("elastic.co".into()),
                sequence: None,
            },
            start: t,
            end: t + Duration::from_millis(31),
            community_id: "1:jdjL1TkdpF1v1GM0+JxRRp+V7KI=".into(),
            sock: 0xffff_8de2_9d33_7000,
            process: None,
            accounting: Default::default(),
            pod: None,
            remote_pod: None,
        })
    }

    #[test]
    fn pre_encoded_envelope_matches_generated_encoding() {
        let rec = record();
        let enc = Arc::new(EncodedFlow::new(rec.clone(), "host"));
        let time = Some(prost_types::Timestamp {
            seconds: 5,
            nanos: 7,
        });
        let wire = WireResponse {
            payload: Some(Payload::Flow(enc.clone())),
            flows: Vec::new(),
            node_name: Arc::from("node-a"),
            time,
            sequence: 300,
        };
        let generated = proto::StreamFlowsResponse {
            event: Some(proto::stream_flows_response::Event::Flow(convert::flow(
                &rec, "host",
            ))),
            flows: Vec::new(),
            node_name: "node-a".into(),
            time,
            sequence: 300,
        };
        assert_eq!(wire.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(wire.encoded_len(), generated.encoded_len());
        let back = proto::StreamFlowsResponse::decode(wire.encode_to_vec().as_slice())
            .expect("decodes as the generated type");
        assert_eq!(back, generated);

        let loss = proto::LossNotice {
            source: proto::LossSource::KernelRing as i32,
            cpu: Some(0),
            count: 9,
            first: time,
            last: time,
        };
        let wire = WireResponse {
            payload: Some(Payload::Loss(loss)),
            flows: Vec::new(),
            node_name: Arc::from(""),
            time: None,
            sequence: 0,
        };
        let generated = proto::StreamFlowsResponse {
            event: Some(proto::stream_flows_response::Event::Loss(loss)),
            ..Default::default()
        };
        assert_eq!(wire.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(wire.encoded_len(), generated.encoded_len());

        // Packed: the same bytes in the repeated field, once per flow.
        let wire = WireResponse {
            payload: None,
            flows: vec![enc.clone(), enc],
            node_name: Arc::from("node-a"),
            time,
            sequence: 301,
        };
        let one = convert::flow(&rec, "host");
        let generated = proto::StreamFlowsResponse {
            event: None,
            flows: vec![one.clone(), one],
            node_name: "node-a".into(),
            time,
            sequence: 301,
        };
        assert_eq!(wire.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(wire.encoded_len(), generated.encoded_len());
    }
}
