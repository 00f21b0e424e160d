//! Conversions between the pipeline's model types and the `sockscope.v1`
//! protobuf messages.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::export::proto;
use crate::model::{
    Accounting, Creds, Endpoint, FlowDirection, FlowRecord, Loss, LossSource, PodIdentity,
    ProcessInfo, SeqSpace, Transport, Workload, WorkloadKind,
};

/// Which endpoint of a flow initiated it: `true` when the local end is the
/// source (client). For an unknown direction the endpoint with the lower
/// port is taken as the server; on a tie the local end is the source.
pub fn local_is_source(rec: &FlowRecord) -> bool {
    match rec.direction {
        FlowDirection::Egress => true,
        FlowDirection::Ingress => false,
        FlowDirection::Unknown => rec.local.port >= rec.remote.port,
    }
}

/// The (source, destination) endpoints of a flow.
pub fn source_destination(rec: &FlowRecord) -> (&Endpoint, &Endpoint) {
    if local_is_source(rec) {
        (&rec.local, &rec.remote)
    } else {
        (&rec.remote, &rec.local)
    }
}

/// Converts a wall-clock time to a protobuf timestamp (times before the
/// epoch are clamped to it).
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf timestamp to wall-clock time; `None` when it is
/// before the epoch or its nanos are out of range.
pub fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Converts a duration to a protobuf duration (saturating).
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf duration to a `Duration`; `None` when negative.
pub fn std_duration(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

/// Protobuf transport of a model transport.
pub fn transport(t: Transport) -> proto::Transport {
    match t {
        Transport::Tcp => proto::Transport::Tcp,
        Transport::Udp => proto::Transport::Udp,
    }
}

/// Protobuf direction of a model direction.
pub fn direction(d: FlowDirection) -> proto::Direction {
    match d {
        FlowDirection::Egress => proto::Direction::Egress,
        FlowDirection::Ingress => proto::Direction::Ingress,
        FlowDirection::Unknown => proto::Direction::Unknown,
    }
}

/// Protobuf IP version of an address.
pub fn ip_version(ip: IpAddr) -> proto::IpVersion {
    match ip {
        IpAddr::V4(_) => proto::IpVersion::Ipv4,
        IpAddr::V6(_) => proto::IpVersion::Ipv6,
    }
}

/// Protobuf loss source of a model loss source.
pub fn loss_source(s: LossSource) -> proto::LossSource {
    match s {
        LossSource::KernelRing => proto::LossSource::KernelRing,
        LossSource::KretprobeMiss => proto::LossSource::KretprobeMiss,
        LossSource::DecodeError => proto::LossSource::DecodeError,
        LossSource::ReaderQueue => proto::LossSource::ReaderQueue,
        LossSource::SocketTableEviction => proto::LossSource::SocketTableEviction,
        LossSource::FlowTableEviction => proto::LossSource::FlowTableEviction,
        LossSource::ProcessTableEviction => proto::LossSource::ProcessTableEviction,
        LossSource::SubscriberQueue => proto::LossSource::SubscriberQueue,
        LossSource::HistoryLapped => proto::LossSource::HistoryLapped,
    }
}

/// Protobuf loss notice of a model loss.
pub fn loss_notice(l: &Loss) -> proto::LossNotice {
    proto::LossNotice {
        source: loss_source(l.source) as i32,
        cpu: l.cpu,
        count: l.count,
        first: Some(timestamp(l.first)),
        last: Some(timestamp(l.last)),
    }
}

/// Decimal digits of a `u8` appended to `s`.
fn push_octet(s: &mut String, v: u8) {
    if v >= 100 {
        s.push(char::from(b'0' + v / 100));
    }
    if v >= 10 {
        s.push(char::from(b'0' + (v / 10) % 10));
    }
    s.push(char::from(b'0' + v % 10));
}

/// An address in its text form, as `IpAddr`'s `Display` writes it. IPv4
/// (most flows) is written directly: going through the formatting machinery
/// was half of the cost of converting a flow.
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let mut s = String::with_capacity(15);
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_octet(&mut s, o);
            }
            s
        }
        IpAddr::V6(a) => a.to_string(),
    }
}

fn endpoint(e: &Endpoint) -> proto::FlowEndpoint {
    proto::FlowEndpoint {
        ip: ip_text(e.ip),
        port: u32::from(e.port),
        packets: e.packets,
        bytes: e.bytes,
        domain: e.domain.clone().unwrap_or_default(),
        sequence_space: e.sequence.map(|q| proto::SequenceSpace {
            payload_bytes: q.payload_bytes,
            uncounted_bytes: q.uncounted_bytes,
            from_syn: q.from_syn,
        }),
    }
}

/// Converts a flow record to its protobuf form. `host_name` is the node's
/// host name, carried in every flow.
pub fn flow(rec: &FlowRecord, host_name: &str) -> proto::Flow {
    // Each side is converted once; source/destination (and client/server)
    // are the same two endpoints in the initiator's order.
    let (local, remote) = (endpoint(&rec.local), endpoint(&rec.remote));
    let (src, dst) = if local_is_source(rec) {
        (local.clone(), remote.clone())
    } else {
        (remote.clone(), local.clone())
    };
    let process = rec.process.as_ref();
    let creds = process.and_then(|p| p.creds);
    proto::Flow {
        id: rec.id,
        r#final: rec.is_final,
        complete: rec.complete,
        client: Some(src.clone()),
        server: Some(dst.clone()),
        source: Some(src),
        destination: Some(dst),
        local: Some(local),
        remote: Some(remote),
        network: Some(proto::Network {
            transport: transport(rec.transport) as i32,
            r#type: ip_version(rec.local.ip) as i32,
            direction: direction(rec.direction) as i32,
            community_id: rec.community_id.clone(),
            packets: rec.local.packets.saturating_add(rec.remote.packets),
            bytes: rec.local.bytes.saturating_add(rec.remote.bytes),
        }),
        process: process.map(|p| proto::Process {
            pid: p.pid,
            ppid: p.ppid,
            name: p.name.clone(),
            args: p.args.clone(),
            executable: p.executable.clone(),
            created: p.created.map(timestamp),
        }),
        user: creds.map(|c| proto::Principal {
            id: c.uid,
            name: process
                .and_then(|p| p.user_name.clone())
                .unwrap_or_default(),
        }),
        group: creds.map(|c| proto::Principal {
            id: c.gid,
            name: process
                .and_then(|p| p.group_name.clone())
                .unwrap_or_default(),
        }),
        credentials: creds.map(|c| proto::Credentials {
            uid: c.uid,
            gid: c.gid,
            euid: c.euid,
            egid: c.egid,
        }),
        start: Some(timestamp(rec.start)),
        end: Some(timestamp(rec.end)),
        duration: Some(duration(
            rec.end.duration_since(rec.start).unwrap_or(Duration::ZERO),
        )),
        kernel_sock_address: format!("{:#x}", rec.sock),
        host_name: host_name.to_string(),
        container_id: process
            .and_then(|p| p.container_id.clone())
            .unwrap_or_default(),
        pod_uid: process.and_then(|p| p.pod_uid.clone()).unwrap_or_default(),
        accounting: accounting(rec.accounting) as i32,
        pod: rec.pod.as_deref().map(pod_to_proto),
        remote_pod: rec.remote_pod.as_deref().map(pod_to_proto),
    }
}

/// A pod identity as `sockscope.v1.Pod`.
pub fn pod_to_proto(p: &PodIdentity) -> proto::Pod {
    proto::Pod {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        uid: p.uid.clone(),
        labels: p.labels.clone().into_iter().collect(),
        annotations: p.annotations.clone().into_iter().collect(),
        workload: Some(proto::Workload {
            kind: p.workload.kind.as_str().to_string(),
            name: p.workload.name.clone(),
        }),
        container_name: p.container_name.clone(),
        image: p.image.clone(),
        ips: p.ips.iter().map(|ip| ip.to_string()).collect(),
    }
}

/// A `sockscope.v1.Pod` as a pod identity; an unknown workload kind, or
/// an address that does not parse, is left out.
pub fn pod_from_proto(p: &proto::Pod) -> PodIdentity {
    let workload = p.workload.as_ref();
    PodIdentity {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        uid: p.uid.clone(),
        labels: p.labels.clone().into_iter().collect(),
        annotations: p.annotations.clone().into_iter().collect(),
        workload: Workload {
            kind: workload
                .and_then(|w| WorkloadKind::parse(&w.kind))
                .unwrap_or_default(),
            name: workload.map(|w| w.name.clone()).unwrap_or_default(),
        },
        container_name: p.container_name.clone(),
        image: p.image.clone(),
        ips: p.ips.iter().filter_map(|t| t.parse().ok()).collect(),
    }
}

fn accounting(a: Accounting) -> proto::Accounting {
    match a {
        Accounting::Packets => proto::Accounting::Packets,
        Accounting::SocketCounters => proto::Accounting::SocketCounters,
        Accounting::Uncounted => proto::Accounting::Uncounted,
    }
}

/// Why a protobuf flow could not be turned back into a record.
#[derive(Debug, thiserror::Error)]
pub enum FromProtoError {
    /// A required field is missing.
    #[error("flow {id}: missing field {field}")]
    Missing {
        /// Flow id.
        id: u64,
        /// Field name.
        field: &'static str,
    },
    /// A field has an invalid value.
    #[error("flow {id}: invalid {field}: {value:?}")]
    Invalid {
        /// Flow id.
        id: u64,
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: String,
    },
}

fn endpoint_back(
    id: u64,
    e: Option<&proto::FlowEndpoint>,
    field: &'static str,
) -> Result<Endpoint, FromProtoError> {
    let e = e.ok_or(FromProtoError::Missing { id, field })?;
    let ip = e.ip.parse().map_err(|_| FromProtoError::Invalid {
        id,
        field,
        value: e.ip.clone(),
    })?;
    let port = u16::try_from(e.port).map_err(|_| FromProtoError::Invalid {
        id,
        field,
        value: e.port.to_string(),
    })?;
    Ok(Endpoint {
        ip,
        port,
        packets: e.packets,
        bytes: e.bytes,
        domain: (!e.domain.is_empty()).then(|| e.domain.clone()),
        sequence: e.sequence_space.as_ref().map(|q| SeqSpace {
            payload_bytes: q.payload_bytes,
            uncounted_bytes: q.uncounted_bytes,
            from_syn: q.from_syn,
        }),
    })
}

/// Turns a received protobuf flow back into a model record (for client-side
/// ECS rendering). Returns the record and the host name it carried.
pub fn flow_from_proto(f: &proto::Flow) -> Result<(FlowRecord, String), FromProtoError> {
    let id = f.id;
    let network = f.network.as_ref().ok_or(FromProtoError::Missing {
        id,
        field: "network",
    })?;
    let transport = match proto::Transport::try_from(network.transport) {
        Ok(proto::Transport::Tcp) => Transport::Tcp,
        Ok(proto::Transport::Udp) => Transport::Udp,
        _ => {
            return Err(FromProtoError::Invalid {
                id,
                field: "network.transport",
                value: network.transport.to_string(),
            })
        }
    };
    let direction = match proto::Direction::try_from(network.direction) {
        Ok(proto::Direction::Egress) => FlowDirection::Egress,
        Ok(proto::Direction::Ingress) => FlowDirection::Ingress,
        _ => FlowDirection::Unknown,
    };
    let local = endpoint_back(id, f.local.as_ref(), "local")?;
    let remote = endpoint_back(id, f.remote.as_ref(), "remote")?;
    let time = |t: Option<&prost_types::Timestamp>, field| {
        t.and_then(system_time)
            .ok_or(FromProtoError::Missing { id, field })
    };
    let sock = u64::from_str_radix(f.kernel_sock_address.trim_start_matches("0x"), 16).unwrap_or(0);
    let process = f.process.as_ref().map(|p| ProcessInfo {
        pid: p.pid,
        ppid: p.ppid,
        name: p.name.clone(),
        args: p.args.clone(),
        executable: p.executable.clone(),
        created: p.created.as_ref().and_then(system_time),
        creds: f.credentials.as_ref().map(|c| Creds {
            uid: c.uid,
            gid: c.gid,
            euid: c.euid,
            egid: c.egid,
        }),
        user_name: f
            .user
            .as_ref()
            .filter(|u| !u.name.is_empty())
            .map(|u| u.name.clone()),
        group_name: f
            .group
            .as_ref()
            .filter(|g| !g.name.is_empty())
            .map(|g| g.name.clone()),
        container_id: (!f.container_id.is_empty()).then(|| f.container_id.clone()),
        pod_uid: (!f.pod_uid.is_empty()).then(|| f.pod_uid.clone()),
    });
    let rec = FlowRecord {
        id,
        is_final: f.r#final,
        complete: f.complete,
        transport,
        direction,
        local,
        remote,
        start: time(f.start.as_ref(), "start")?,
        end: time(f.end.as_ref(), "end")?,
        community_id: network.community_id.clone(),
        sock,
        process,
        accounting: match proto::Accounting::try_from(f.accounting) {
            Ok(proto::Accounting::SocketCounters) => Accounting::SocketCounters,
            Ok(proto::Accounting::Uncounted) => Accounting::Uncounted,
            Ok(proto::Accounting::Packets) => Accounting::Packets,
            Err(_) => {
                return Err(FromProtoError::Invalid {
                    id,
                    field: "accounting",
                    value: f.accounting.to_string(),
                })
            }
        },
        pod: f.pod.as_ref().map(|p| Arc::new(pod_from_proto(p))),
        remote_pod: f.remote_pod.as_ref().map(|p| Arc::new(pod_from_proto(p))),
    };
    Ok((rec, f.host_name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_text_writes_what_display_writes() {
        for o in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(o, 0, 9, 255),
                Ipv4Addr::new(10, o, 100, o),
                Ipv4Addr::new(255, 99, o, 1),
            ] {
                assert_eq!(ip_text(IpAddr::V4(ip)), ip.to_string());
            }
        }
        for ip in [Ipv6Addr::LOCALHOST, "fd00:5c0::15".parse().unwrap()] {
            assert_eq!(ip_text(IpAddr::V6(ip)), ip.to_string());
        }
    }
}
