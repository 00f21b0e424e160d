//! Compiled `FlowFilter` allow/deny lists, validated once per request and
//! evaluated in the fan-out owner task against model records.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::export::convert::source_destination;
use crate::export::pod_filter::PodFilter;
use crate::export::proto;
use crate::model::{FlowDirection, FlowRecord, Transport};

/// Most filters accepted in one allow or deny list.
pub const MAX_FILTERS: usize = 64;
/// Most values accepted in one repeated filter field.
pub const MAX_FILTER_VALUES: usize = 1024;
/// Shortest container id prefix that matches by prefix.
pub const MIN_CONTAINER_ID_PREFIX: usize = 12;

/// A request field that failed validation; the message names the field,
/// e.g. `allow[0].source_ip[1]: invalid CIDR "10.0.0/33"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FilterError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One compiled filter: every non-empty condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    ip: Vec<IpNet>,
    source_ip: Vec<IpNet>,
    destination_ip: Vec<IpNet>,
    port: Vec<u16>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    transport: Vec<Transport>,
    ipv6: Vec<bool>,
    direction: Vec<FlowDirection>,
    pid: Vec<u32>,
    process_name: Vec<String>,
    executable: Vec<String>,
    uid: Vec<u32>,
    user_name: Vec<String>,
    domain: Vec<String>,
    container_id: Vec<String>,
    pods: Option<PodFilter>,
}

/// Compiled allow and deny lists of one request.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    allow: Vec<Filter>,
    deny: Vec<Filter>,
}

fn err(field: String, reason: impl Into<String>) -> FilterError {
    FilterError {
        field,
        reason: reason.into(),
    }
}

pub(crate) fn check_len<T>(path: &str, name: &str, v: &[T]) -> Result<(), FilterError> {
    if v.len() > MAX_FILTER_VALUES {
        return Err(err(
            format!("{path}.{name}"),
            format!("{} values, at most {MAX_FILTER_VALUES} allowed", v.len()),
        ));
    }
    Ok(())
}

fn parse_nets(path: &str, name: &str, v: &[String]) -> Result<Vec<IpNet>, FilterError> {
    check_len(path, name, v)?;
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            if let Ok(ip) = s.parse::<IpAddr>() {
                return Ok(IpNet::from(ip));
            }
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| err(format!("{path}.{name}[{i}]"), format!("invalid CIDR {s:?}")))
        })
        .collect()
}

fn parse_ports(path: &str, name: &str, v: &[u32]) -> Result<Vec<u16>, FilterError> {
    check_len(path, name, v)?;
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p).map_err(|_| {
                err(
                    format!("{path}.{name}[{i}]"),
                    format!("port {p} out of range 0-65535"),
                )
            })
        })
        .collect()
}

fn parse_enum<E, T>(
    path: &str,
    name: &str,
    v: &[i32],
    map: impl Fn(E) -> Option<T>,
) -> Result<Vec<T>, FilterError>
where
    E: TryFrom<i32>,
{
    check_len(path, name, v)?;
    v.iter()
        .enumerate()
        .map(|(i, raw)| {
            E::try_from(*raw).ok().and_then(&map).ok_or_else(|| {
                err(
                    format!("{path}.{name}[{i}]"),
                    format!("invalid value {raw}"),
                )
            })
        })
        .collect()
}

fn strings(path: &str, name: &str, v: &[String]) -> Result<Vec<String>, FilterError> {
    check_len(path, name, v)?;
    for (i, s) in v.iter().enumerate() {
        if s.is_empty() {
            return Err(err(format!("{path}.{name}[{i}]"), "empty value"));
        }
    }
    Ok(v.to_vec())
}

impl Filter {
    /// Validates and compiles one protobuf filter; `path` prefixes error
    /// field names (e.g. `allow[0]`).
    pub fn compile(path: &str, f: &proto::FlowFilter) -> Result<Filter, FilterError> {
        let container_id = strings(path, "container_id", &f.container_id)?;
        let domain = strings(path, "domain", &f.domain)?
            .into_iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        Ok(Filter {
            ip: parse_nets(path, "ip", &f.ip)?,
            source_ip: parse_nets(path, "source_ip", &f.source_ip)?,
            destination_ip: parse_nets(path, "destination_ip", &f.destination_ip)?,
            port: parse_ports(path, "port", &f.port)?,
            source_port: parse_ports(path, "source_port", &f.source_port)?,
            destination_port: parse_ports(path, "destination_port", &f.destination_port)?,
            transport: parse_enum(path, "transport", &f.transport, |t| match t {
                proto::Transport::Tcp => Some(Transport::Tcp),
                proto::Transport::Udp => Some(Transport::Udp),
                proto::Transport::Unspecified => None,
            })?,
            ipv6: parse_enum(path, "ip_version", &f.ip_version, |t| match t {
                proto::IpVersion::Ipv4 => Some(false),
                proto::IpVersion::Ipv6 => Some(true),
                proto::IpVersion::Unspecified => None,
            })?,
            direction: parse_enum(path, "direction", &f.direction, |t| match t {
                proto::Direction::Egress => Some(FlowDirection::Egress),
                proto::Direction::Ingress => Some(FlowDirection::Ingress),
                proto::Direction::Unknown => Some(FlowDirection::Unknown),
                proto::Direction::Unspecified => None,
            })?,
            pid: {
                check_len(path, "pid", &f.pid)?;
                f.pid.clone()
            },
            process_name: strings(path, "process_name", &f.process_name)?,
            executable: strings(path, "executable", &f.executable)?,
            uid: {
                check_len(path, "uid", &f.uid)?;
                f.uid.clone()
            },
            user_name: strings(path, "user_name", &f.user_name)?,
            domain,
            container_id,
            pods: PodFilter::compile(path, f)?,
        })
    }

    /// Whether the record satisfies every condition of this filter.
    pub fn matches(&self, rec: &FlowRecord) -> bool {
        let (src, dst) = source_destination(rec);
        let any_net = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let proc = rec.process.as_ref();
        let creds = proc.and_then(|p| p.creds);
        (self.ip.is_empty() || any_net(&self.ip, src.ip) || any_net(&self.ip, dst.ip))
            && (self.source_ip.is_empty() || any_net(&self.source_ip, src.ip))
            && (self.destination_ip.is_empty() || any_net(&self.destination_ip, dst.ip))
            && (self.port.is_empty()
                || self.port.contains(&src.port)
                || self.port.contains(&dst.port))
            && (self.source_port.is_empty() || self.source_port.contains(&src.port))
            && (self.destination_port.is_empty() || self.destination_port.contains(&dst.port))
            && (self.transport.is_empty() || self.transport.contains(&rec.transport))
            && (self.ipv6.is_empty() || self.ipv6.contains(&rec.local.ip.is_ipv6()))
            && (self.direction.is_empty() || self.direction.contains(&rec.direction))
            && (self.pid.is_empty() || proc.is_some_and(|p| self.pid.contains(&p.pid)))
            && (self.process_name.is_empty()
                || proc.is_some_and(|p| self.process_name.contains(&p.name)))
            && (self.executable.is_empty()
                || proc.is_some_and(|p| self.executable.contains(&p.executable)))
            && (self.uid.is_empty() || creds.is_some_and(|c| self.uid.contains(&c.uid)))
            && (self.user_name.is_empty()
                || proc
                    .and_then(|p| p.user_name.as_ref())
                    .is_some_and(|u| self.user_name.contains(u)))
            && (self.domain.is_empty()
                || [&src.domain, &dst.domain]
                    .into_iter()
                    .flatten()
                    .any(|d| self.domain_matches(d)))
            && (self.container_id.is_empty()
                || proc
                    .and_then(|p| p.container_id.as_ref())
                    .is_some_and(|c| self.container_matches(c)))
            && self.pods.as_ref().is_none_or(|p| p.matches(rec))
    }

    fn domain_matches(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.domain.iter().any(|pat| match pat.strip_prefix("*.") {
            Some(suffix) => domain
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => *pat == domain,
        })
    }

    fn container_matches(&self, id: &str) -> bool {
        self.container_id.iter().any(|want| {
            want == id || (want.len() >= MIN_CONTAINER_ID_PREFIX && id.starts_with(want.as_str()))
        })
    }
}

impl FilterSet {
    /// Validates and compiles the allow and deny lists of a request.
    pub fn compile(
        allow: &[proto::FlowFilter],
        deny: &[proto::FlowFilter],
    ) -> Result<FilterSet, FilterError> {
        let list = |name: &str, v: &[proto::FlowFilter]| -> Result<Vec<Filter>, FilterError> {
            if v.len() > MAX_FILTERS {
                return Err(err(
                    name.to_string(),
                    format!("{} filters, at most {MAX_FILTERS} allowed", v.len()),
                ));
            }
            v.iter()
                .enumerate()
                .map(|(i, f)| Filter::compile(&format!("{name}[{i}]"), f))
                .collect()
        };
        Ok(FilterSet {
            allow: list("allow", allow)?,
            deny: list("deny", deny)?,
        })
    }

    /// Whether the record passes: it matches some allow filter (or there are
    /// none) and no deny filter.
    pub fn matches(&self, rec: &FlowRecord) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|f| f.matches(rec)))
            && !self.deny.iter().any(|f| f.matches(rec))
    }
}
