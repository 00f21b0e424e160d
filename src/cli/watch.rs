//! `sockscope watch`: flows from a daemon (or a relay) over gRPC, or from
//! the cluster's JetStream stream (`--nats`), printed as a table, proto3
//! JSON or ECS documents.

use std::io::Write;
use std::time::SystemTime;

use tokio_stream::StreamExt;

use super::{connect_flow_client, status_exit, DirectionArg, TransportArg, WatchArgs, WatchFormat};
use crate::config::Config;
use crate::exit::ExitCode;
use crate::export::client;
use crate::export::convert;
use crate::export::ecs::{self, HostInfo};
use crate::export::proto;
use crate::export::status;
use crate::export::watch_json;
use crate::model::NodeInfo;

/// Builds the StreamFlows request of `watch` flags.
pub fn watch_request(a: &WatchArgs) -> proto::StreamFlowsRequest {
    let filter = proto::FlowFilter {
        ip: a.ip.clone(),
        source_ip: a.src_ip.clone(),
        destination_ip: a.dst_ip.clone(),
        port: a.port.clone(),
        source_port: a.src_port.clone(),
        destination_port: a.dst_port.clone(),
        transport: a
            .transport
            .iter()
            .map(|t| match t {
                TransportArg::Tcp => proto::Transport::Tcp as i32,
                TransportArg::Udp => proto::Transport::Udp as i32,
            })
            .collect(),
        ip_version: a
            .ipv
            .iter()
            .map(|v| match v {
                4 => proto::IpVersion::Ipv4 as i32,
                6 => proto::IpVersion::Ipv6 as i32,
                _ => proto::IpVersion::Unspecified as i32,
            })
            .collect(),
        direction: a
            .direction
            .iter()
            .map(|d| match d {
                DirectionArg::Egress => proto::Direction::Egress as i32,
                DirectionArg::Ingress => proto::Direction::Ingress as i32,
                DirectionArg::Unknown => proto::Direction::Unknown as i32,
            })
            .collect(),
        pid: a.pid.clone(),
        process_name: a.process.clone(),
        executable: a.executable.clone(),
        uid: a.uid.clone(),
        user_name: a.user.clone(),
        domain: a.domain.clone(),
        container_id: a.container.clone(),
        namespace: a.namespace.clone(),
        pod: a.pod.clone(),
        workload: a.workload.clone(),
        label_selector: a.label_selector.clone(),
    };
    let empty = filter == proto::FlowFilter::default();
    proto::StreamFlowsRequest {
        number: a.number,
        since: a
            .since
            .and_then(|d| SystemTime::now().checked_sub(d))
            .map(convert::timestamp),
        until: None,
        follow: a.follow || (a.number == 0 && a.since.is_none()),
        include_updates: a.updates,
        allow: if empty { vec![] } else { vec![filter] },
        deny: vec![],
        max_flows_per_response: client::FLOWS_PER_RESPONSE,
    }
}

/// One line of the `table` format for a flow.
pub fn table_line(f: &proto::Flow) -> String {
    let ep = |e: &Option<proto::FlowEndpoint>| {
        e.as_ref().map_or_else(String::new, |e| {
            let host = if e.domain.is_empty() {
                e.ip.clone()
            } else {
                e.domain.clone()
            };
            if e.ip.contains(':') && e.domain.is_empty() {
                format!("[{host}]:{}", e.port)
            } else {
                format!("{host}:{}", e.port)
            }
        })
    };
    let net = f.network.clone().unwrap_or_default();
    let transport = match proto::Transport::try_from(net.transport) {
        Ok(proto::Transport::Tcp) => "tcp",
        Ok(proto::Transport::Udp) => "udp",
        _ => "?",
    };
    let dir = match proto::Direction::try_from(net.direction) {
        Ok(proto::Direction::Egress) => "out",
        Ok(proto::Direction::Ingress) => "in",
        _ => "?",
    };
    let end = f
        .end
        .as_ref()
        .and_then(convert::system_time)
        .map_or_else(String::new, ecs::rfc3339);
    let proc = f
        .process
        .as_ref()
        .map_or_else(|| "-".to_string(), |p| format!("{}/{}", p.pid, p.name));
    let user = f.user.as_ref().map_or_else(
        || "-".to_string(),
        |u| {
            if u.name.is_empty() {
                u.id.to_string()
            } else {
                u.name.clone()
            }
        },
    );
    // The pods of both ends, local first: "ns/pod" or "-".
    let pod = |p: &Option<proto::Pod>| {
        p.as_ref().map_or_else(
            || "-".to_string(),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    };
    let pods = if f.pod.is_some() || f.remote_pod.is_some() {
        format!(" pod {} peer {}", pod(&f.pod), pod(&f.remote_pod))
    } else {
        String::new()
    };
    format!(
        "{end:<24} {transport:<3} {dir:<3} {:>45} -> {:<45} {:>7} {:>10} {:<20} {user}{pods}{}",
        ep(&f.source),
        ep(&f.destination),
        net.packets,
        net.bytes,
        proc,
        if f.r#final { "" } else { " (update)" }
    )
}

/// Human description of a loss notice.
pub fn loss_line(l: &proto::LossNotice) -> String {
    let source = proto::LossSource::try_from(l.source)
        .map_or_else(|_| l.source.to_string(), |s| s.as_str_name().to_string());
    let cpu = l.cpu.map_or_else(String::new, |c| format!(" cpu {c}"));
    let t = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref()
            .and_then(convert::system_time)
            .map_or_else(|| "?".to_string(), ecs::rfc3339)
    };
    format!(
        "lost {} records ({source}{cpu}) between {} and {}",
        l.count,
        t(&l.first),
        t(&l.last)
    )
}

/// A stream of responses from a daemon or from NATS, ending with an error
/// and its exit code when it fails.
type ResponseStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<proto::StreamFlowsResponse, (String, ExitCode)>>
            + Send,
    >,
>;

/// A NATS client for reading the stream at `url` with the credentials, TLS
/// and stream of `export.nats.*`, and that configuration; on failure the
/// message is printed and the exit code returned (2 for the
/// configuration's fault, 3 for an unreachable server).
pub(super) async fn nats_reader(
    cfg: &Config,
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, crate::config::NatsConfig), ExitCode> {
    let mut ncfg = cfg.export.nats.clone();
    ncfg.url = url.to_string();
    match crate::export::nats::connect_reader(&ncfg, name).await {
        Ok(c) => Ok((c, ncfg)),
        Err(e) => {
            eprintln!("sockscope: {e}");
            Err(if e.exit_is_config() {
                ExitCode::Usage
            } else {
                ExitCode::Unavailable
            })
        }
    }
}

/// `watch --nats`: the cluster's stream read back from JetStream.
async fn watch_nats(cfg: &Config, a: WatchArgs, url: String) -> ExitCode {
    use crate::export::nats::read::{self, READ_QUEUE};
    let (client, ncfg) = match nats_reader(cfg, &url, "watch").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let req = watch_request(&a);
    let (tx, rx) = tokio::sync::mpsc::channel(READ_QUEUE);
    let reader = tokio::spawn(async move { read::read(client, &ncfg, &req, tx).await });
    let stream: ResponseStream =
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| {
            r.map_err(|e| {
                let code = match e {
                    read::ReadError::Filter(_) => ExitCode::Usage,
                    read::ReadError::Stream { .. } => ExitCode::Unavailable,
                    read::ReadError::Consume { .. } => ExitCode::Failure,
                };
                (e.to_string(), code)
            })
        }));
    let code = print_stream(&a, stream, None).await;
    if let Ok(summary) = reader.await {
        if summary.undecoded > 0 {
            eprintln!(
                "sockscope: {} of {} messages skipped: not protobuf payloads (a sink with format ecs_json?) or undecodable",
                summary.undecoded, summary.messages
            );
        }
    }
    code
}

/// Runs `sockscope watch`.
pub(super) async fn run(cfg: &Config, a: WatchArgs) -> ExitCode {
    if let Some(url) = a.nats.clone() {
        return watch_nats(cfg, a, url).await;
    }
    let mut c = match connect_flow_client(cfg, a.server.as_deref()).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // ECS documents carry the node's facts (`host.*`): asked once.
    let node = if a.format == WatchFormat::Ecs {
        match c.get_status(proto::GetStatusRequest {}).await {
            Ok(r) => r.into_inner().node.map(|n| status::node_from_proto(&n)),
            Err(s) => {
                eprintln!(
                    "sockscope: node facts unavailable ({}: {}); host.* has the node name only",
                    s.code(),
                    s.message()
                );
                None
            }
        }
    } else {
        None
    };
    let stream = match c.stream_flows(watch_request(&a)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            eprintln!("sockscope: {}: {}", s.code(), s.message());
            return status_exit(&s);
        }
    };
    let stream: ResponseStream = Box::pin(stream.map(|r| {
        r.map_err(|s| {
            (
                format!("stream ended: {}: {}", s.code(), s.message()),
                status_exit(&s),
            )
        })
    }));
    print_stream(&a, stream, node.as_ref()).await
}

/// Prints a response stream in `a.format` until it ends.
async fn print_stream(
    a: &WatchArgs,
    mut stream: ResponseStream,
    node: Option<&NodeInfo>,
) -> ExitCode {
    // Flushed after each response received (up to a packed response's
    // flows), so a follower sees records as they come in a write each.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if a.format == WatchFormat::Table {
        let _ = writeln!(
            out,
            "{:<24} {:<3} {:<3} {:>45}    {:<45} {:>7} {:>10} {:<20} USER",
            "END", "NET", "DIR", "SOURCE", "DESTINATION", "PKTS", "BYTES", "PROCESS"
        );
        let _ = out.flush();
    }
    let mut json = Vec::new();
    while let Some(item) = stream.next().await {
        let resp = match item {
            Ok(r) => r,
            Err((msg, code)) => {
                eprintln!("sockscope: {msg}");
                return code;
            }
        };
        for resp in client::unpack(resp) {
            if a.format == WatchFormat::Json {
                // Written from a reused buffer: the common case of a
                // subscriber that only forwards the stream.
                watch_json::response_line(&resp, &mut json);
                json.push(b'\n');
                if out.write_all(&json).is_err() {
                    return ExitCode::Ok;
                }
                continue;
            }
            let Some(line) = watch_line(a.format, &resp, node) else {
                continue;
            };
            if writeln!(out, "{line}").is_err() {
                return ExitCode::Ok;
            }
        }
        if out.flush().is_err() {
            return ExitCode::Ok;
        }
    }
    ExitCode::Ok
}

/// The output line of one (unpacked) response in `format`; loss notices go
/// to standard error instead.
fn watch_line(
    format: WatchFormat,
    resp: &proto::StreamFlowsResponse,
    node: Option<&NodeInfo>,
) -> Option<String> {
    let line = match (format, &resp.event) {
        (WatchFormat::Json, _) => {
            let mut line = Vec::new();
            watch_json::response_line(resp, &mut line);
            // The writer only writes UTF-8 (strings come from `String`s).
            String::from_utf8(line).unwrap_or_default()
        }
        (_, Some(proto::stream_flows_response::Event::Loss(l))) => {
            eprintln!("sockscope: {}", loss_line(l));
            return None;
        }
        (WatchFormat::Ecs, Some(proto::stream_flows_response::Event::Flow(f))) => {
            match convert::flow_from_proto(f) {
                Ok((rec, host)) => {
                    let name = if host.is_empty() {
                        resp.node_name.clone()
                    } else {
                        host
                    };
                    let host = match node {
                        Some(n) => HostInfo::of_node(&name, n),
                        None => HostInfo {
                            name,
                            ..HostInfo::default()
                        },
                    };
                    ecs::flow_document(&rec, &host).to_string()
                }
                Err(e) => {
                    eprintln!("sockscope: skipping record: {e}");
                    return None;
                }
            }
        }
        (WatchFormat::Table, Some(proto::stream_flows_response::Event::Flow(f))) => table_line(f),
        (_, None) => return None,
    };
    Some(line)
}
