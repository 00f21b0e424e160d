//! Client helpers: connecting over TCP or a Unix socket, and rendering
//! messages as proto3 JSON (as grpcurl prints them).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use prost_reflect::{DynamicMessage, SerializeOptions};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::export::proto::flow_service_client::FlowServiceClient;
use crate::export::proto::stream_flows_response::Event;
use crate::export::proto::StreamFlowsResponse;

/// Authority sent on Unix-socket connections.
pub const UNIX_AUTHORITY: &str = "localhost";

/// Errors of connecting or rendering.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not usable.
    #[error("invalid server address {addr:?}: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Connecting failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Transport error.
        source: tonic::transport::Error,
    },
    /// Rendering as JSON failed.
    #[error("rendering {message} as JSON: {reason}")]
    Json {
        /// Message type.
        message: String,
        /// Why.
        reason: String,
    },
}

/// Where to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port` (or `http(s)://…` URI).
    Tcp(String),
}

impl ServerAddr {
    /// Parses `unix:/path`, `/path`, `./path` as Unix sockets and anything
    /// else as TCP.
    pub fn parse(s: &str) -> ServerAddr {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            ServerAddr::Unix(PathBuf::from(p))
        } else if s.starts_with('/') || s.starts_with("./") {
            ServerAddr::Unix(PathBuf::from(s))
        } else {
            ServerAddr::Tcp(s.to_string())
        }
    }

    /// The default: the Unix socket when it exists, else the TCP address.
    pub fn default_for(unix_socket: &Path, tcp: &str) -> ServerAddr {
        if !unix_socket.as_os_str().is_empty() && unix_socket.exists() {
            ServerAddr::Unix(unix_socket.to_path_buf())
        } else {
            ServerAddr::Tcp(tcp.to_string())
        }
    }
}

/// Connects a channel to the server.
pub async fn connect(addr: &ServerAddr) -> Result<Channel, ClientError> {
    match addr {
        ServerAddr::Tcp(a) => {
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let ep = Endpoint::from_shared(uri).map_err(|e| ClientError::Address {
                addr: a.clone(),
                reason: e.to_string(),
            })?;
            ep.connect().await.map_err(|source| ClientError::Connect {
                addr: a.clone(),
                source,
            })
        }
        ServerAddr::Unix(p) => connect_unix(p, UNIX_AUTHORITY).await,
    }
}

/// Connects over a Unix socket, sending `authority` as `:authority`.
pub async fn connect_unix(path: &Path, authority: &str) -> Result<Channel, ClientError> {
    let shown = path.display().to_string();
    let ep =
        Endpoint::from_shared(format!("http://{authority}")).map_err(|e| ClientError::Address {
            addr: shown.clone(),
            reason: e.to_string(),
        })?;
    let path = path.to_path_buf();
    ep.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    }))
    .await
    .map_err(|source| ClientError::Connect {
        addr: shown,
        source,
    })
}

/// A flow service client on a connected channel.
pub fn flow_client(ch: Channel) -> FlowServiceClient<Channel> {
    FlowServiceClient::new(ch)
}

/// `max_flows_per_response` the bundled clients ask for (the server bounds
/// it to its own maximum).
pub const FLOWS_PER_RESPONSE: u32 = 64;

/// Splits a response into responses of the one-flow shape: one per flow of
/// `flows` (each with the envelope's node name, time and sequence), or the
/// response itself when it has no packed flows.
pub fn unpack(mut resp: StreamFlowsResponse) -> impl Iterator<Item = StreamFlowsResponse> {
    let flows = std::mem::take(&mut resp.flows);
    let (node_name, time, sequence) = (resp.node_name.clone(), resp.time, resp.sequence);
    let whole = (resp.event.is_some() || flows.is_empty()).then_some(resp);
    whole
        .into_iter()
        .chain(flows.into_iter().map(move |f| StreamFlowsResponse {
            event: Some(Event::Flow(f)),
            flows: Vec::new(),
            node_name: node_name.clone(),
            time,
            sequence,
        }))
}

/// Renders a message as proto3 JSON (lowerCamelCase names, 64-bit integers
/// as strings, default values omitted), `full_name` being its protobuf name
/// (e.g. `sockscope.v1.StreamFlowsResponse`).
pub fn proto_json<M: prost::Message>(
    msg: &M,
    full_name: &str,
) -> Result<serde_json::Value, ClientError> {
    let err = |reason: String| ClientError::Json {
        message: full_name.to_string(),
        reason,
    };
    let desc = crate::export::proto::descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| err("unknown message type".to_string()))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| err(e.to_string()))?;
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .map_err(|e| err(e.to_string()))
}

/// [`proto_json`] written as one line of text into `out` (cleared first),
/// without building a JSON value tree: what `sockscope watch --format
/// json` prints per response.
pub fn proto_json_line<M: prost::Message>(
    msg: &M,
    full_name: &str,
    out: &mut Vec<u8>,
) -> Result<(), ClientError> {
    let err = |reason: String| ClientError::Json {
        message: full_name.to_string(),
        reason,
    };
    let desc = crate::export::proto::descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| err("unknown message type".to_string()))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| err(e.to_string()))?;
    out.clear();
    let mut ser = serde_json::Serializer::new(&mut *out);
    dynamic
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::proto::{Flow, LossNotice};

    #[test]
    fn the_json_line_is_the_json_value() {
        let resp = StreamFlowsResponse {
            event: Some(Event::Flow(Flow {
                id: u64::MAX,
                r#final: true,
                host_name: "n\"1".into(),
                ..Flow::default()
            })),
            node_name: "node".into(),
            sequence: 7,
            ..StreamFlowsResponse::default()
        };
        let name = "sockscope.v1.StreamFlowsResponse";
        let mut line = Vec::new();
        proto_json_line(&resp, name, &mut line).expect("line");
        let parsed: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(parsed, proto_json(&resp, name).expect("value"));
        assert!(!line.contains(&b'\n'));
    }

    fn flow(id: u64) -> Flow {
        Flow {
            id,
            ..Flow::default()
        }
    }

    #[test]
    fn unpack_gives_the_one_flow_shape() {
        let time = Some(prost_types::Timestamp {
            seconds: 3,
            nanos: 0,
        });
        let packed = StreamFlowsResponse {
            event: None,
            flows: vec![flow(1), flow(2)],
            node_name: "n".into(),
            time,
            sequence: 9,
        };
        let got: Vec<_> = unpack(packed).collect();
        let want: Vec<_> = [1, 2]
            .map(|id| StreamFlowsResponse {
                event: Some(Event::Flow(flow(id))),
                flows: Vec::new(),
                node_name: "n".into(),
                time,
                sequence: 9,
            })
            .into();
        assert_eq!(got, want);
        for single in [
            want[0].clone(),
            StreamFlowsResponse {
                event: Some(Event::Loss(LossNotice::default())),
                ..StreamFlowsResponse::default()
            },
            StreamFlowsResponse::default(),
        ] {
            assert_eq!(unpack(single.clone()).collect::<Vec<_>>(), vec![single]);
        }
    }
}
