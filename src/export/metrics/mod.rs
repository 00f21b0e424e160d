//! Prometheus metrics: a hand-written text exposition (format 0.0.4) of the
//! same [`StatusSnapshot`] and [`HubStatus`] that `GetStatus` returns, served
//! by a minimal HTTP/1.1 responder (`GET /metrics`, one request per
//! connection) on its own TCP listener (`metrics.listen`).
//!
//! Label cardinality is bounded: `cpu` has one value per CPU with a ring
//! (the online CPUs), at most [`MAX_CPU_SERIES`]; subscribers are labelled
//! by id for the first [`MAX_SUBSCRIBER_SERIES`] (lowest ids) and the rest
//! are summed under `subscriber="other"`.

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::export::hub::Hub;
use crate::export::server::HealthHandle;
use crate::export::status::{HubStatus, StatusSnapshot, StatusSource, SubscriberInfo};

/// Path of the exposition.
pub const METRICS_PATH: &str = "/metrics";
/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Most CPUs given their own `cpu` label value; the rest are summed as
/// `cpu="other"`.
pub const MAX_CPU_SERIES: usize = 1024;
/// Most subscribers given their own `subscriber` label value.
pub const MAX_SUBSCRIBER_SERIES: usize = 16;
/// Largest accepted request head (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for writing a response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics.listen` is not an address.
    #[error("metrics.listen: invalid address {addr:?}: {source}")]
    Addr {
        /// The configured value.
        addr: String,
        /// Parse error.
        source: std::net::AddrParseError,
    },
    /// Binding the listener failed.
    #[error("metrics: binding TCP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
}

/// Where the numbers come from: the pipeline's status source, the fan-out
/// hub and the health flag, exactly as `GetStatus` reads them.
#[derive(Clone)]
pub struct MetricsSource {
    /// Pipeline counters.
    pub status: Arc<dyn StatusSource>,
    /// The fan-out (subscribers, history, flows received).
    pub hub: Hub,
    /// The serving flag reported by health.
    pub health: HealthHandle,
}

impl MetricsSource {
    /// Renders the current exposition; `None` when the hub has stopped.
    pub async fn render(&self) -> Option<String> {
        // Same order as GetStatus: hub first, then the pipeline snapshot.
        let hub = self.hub.status().await.ok()?;
        let snap = self.status.snapshot();
        Some(render(&snap, &hub, self.health.is_serving()))
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Builder of a text exposition.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Per-CPU values, bounded to [`MAX_CPU_SERIES`] label values.
fn cpu_series(snap: &StatusSnapshot, value: impl Fn(usize) -> u64) -> Vec<(String, u64)> {
    let mut series: Vec<(String, u64)> = Vec::new();
    let mut other: Option<u64> = None;
    for (i, c) in snap.cpus.iter().enumerate() {
        if i < MAX_CPU_SERIES {
            series.push((c.cpu.to_string(), value(i)));
        } else {
            *other.get_or_insert(0) += value(i);
        }
    }
    if let Some(v) = other {
        series.push(("other".to_string(), v));
    }
    series
}

/// Reads one number of a subscriber.
type SubscriberField = fn(&SubscriberInfo) -> u64;

/// Renders the text exposition of one status reading.
pub fn render(snap: &StatusSnapshot, hub: &HubStatus, serving: bool) -> String {
    let mut e = Exposition { out: String::new() };
    e.family(
        "sockscope_build_info",
        "gauge",
        "Daemon version, kernel release and offsets source (value 1).",
    );
    e.sample(
        "sockscope_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("kernel_release", &snap.kernel_release),
            ("offsets_source", &snap.offsets_source),
        ],
        1,
    );
    e.single(
        "sockscope_serving",
        "gauge",
        "1 while the pipeline delivers flows (gRPC health SERVING).",
        u8::from(serving),
    );
    e.single(
        "sockscope_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        snap.uptime.as_secs_f64(),
    );
    e.single(
        "sockscope_pipeline_error",
        "gauge",
        "1 when the pipeline reported an error (see GetStatus last_error).",
        u8::from(snap.last_error.is_some()),
    );
    e.single(
        "sockscope_probes_installed",
        "gauge",
        "Kernel probes installed.",
        snap.probes.len(),
    );
    e.family(
        "sockscope_probe_installed",
        "gauge",
        "One series per installed probe (value 1).",
    );
    for p in &snap.probes {
        e.sample("sockscope_probe_installed", &[("probe", p)], 1);
    }

    e.family(
        "sockscope_ring_samples_total",
        "counter",
        "Samples read from each CPU's perf ring.",
    );
    for (cpu, v) in cpu_series(snap, |i| snap.cpus[i].samples) {
        e.sample("sockscope_ring_samples_total", &[("cpu", &cpu)], v);
    }
    e.family(
        "sockscope_ring_lost_samples_total",
        "counter",
        "Samples the kernel dropped on each CPU's perf ring.",
    );
    for (cpu, v) in cpu_series(snap, |i| snap.cpus[i].lost) {
        e.sample("sockscope_ring_lost_samples_total", &[("cpu", &cpu)], v);
    }
    let ring_lost: u64 = snap.cpus.iter().map(|c| c.lost).sum();
    e.family(
        "sockscope_lost_total",
        "counter",
        "Samples or records lost, by where they were lost.",
    );
    for (source, v) in [
        ("kernel_ring", ring_lost),
        ("decode_error", snap.decode_errors),
        ("kretprobe_miss", snap.kretprobe_misses),
        ("export_queue", hub.export_queue_drops),
    ] {
        e.sample("sockscope_lost_total", &[("source", source)], v);
    }
    e.single(
        "sockscope_decode_errors_total",
        "counter",
        "Samples that could not be decoded.",
        snap.decode_errors,
    );
    e.single(
        "sockscope_kretprobe_misses_total",
        "counter",
        "Missed kretprobe instances.",
        snap.kretprobe_misses,
    );

    e.single(
        "sockscope_tracked_sockets",
        "gauge",
        "Sockets tracked by the flow engine.",
        snap.tracked_sockets,
    );
    e.single(
        "sockscope_tracked_flows",
        "gauge",
        "Flows tracked by the flow engine.",
        snap.tracked_flows,
    );
    e.single(
        "sockscope_tracked_processes",
        "gauge",
        "Processes tracked by the process table.",
        snap.tracked_processes,
    );

    e.single(
        "sockscope_flows_emitted_total",
        "counter",
        "Flow records (interim and final) the fan-out received from the pipeline.",
        hub.flows_received,
    );
    e.single(
        "sockscope_export_queue_drops_total",
        "counter",
        "Outputs dropped because the pipeline-to-fan-out queue was full.",
        hub.export_queue_drops,
    );
    e.single(
        "sockscope_history_flows",
        "gauge",
        "Finished flows held for replay.",
        hub.history_occupancy,
    );
    e.single(
        "sockscope_history_capacity",
        "gauge",
        "Capacity of the replay history.",
        hub.history_capacity,
    );

    e.single(
        "sockscope_subscribers",
        "gauge",
        "Connected flow subscribers (gRPC streams and the JSON lines output).",
        hub.subscribers.len(),
    );
    let mut subs: Vec<_> = hub.subscribers.iter().collect();
    subs.sort_by_key(|s| s.id);
    let (named, rest) = subs.split_at(subs.len().min(MAX_SUBSCRIBER_SERIES));
    let per_sub: [(&str, &str, SubscriberField); 4] = [
        (
            "sockscope_subscriber_delivered",
            "Records delivered to a connected subscriber's queue.",
            |s| s.delivered,
        ),
        (
            "sockscope_subscriber_dropped",
            "Records dropped because a connected subscriber's queue was full.",
            |s| s.drops,
        ),
        (
            "sockscope_subscriber_queue_depth",
            "Items waiting in a subscriber's queue.",
            |s| s.queue_depth,
        ),
        (
            "sockscope_subscriber_queue_capacity",
            "Capacity of a subscriber's queue.",
            |s| s.queue_capacity,
        ),
    ];
    for (name, help, get) in per_sub {
        e.family(name, "gauge", help);
        for s in named {
            let id = s.id.to_string();
            e.sample(name, &[("subscriber", &id), ("peer", &s.peer)], get(s));
        }
        if !rest.is_empty() {
            let sum: u64 = rest.iter().map(|s| get(s)).sum();
            e.sample(name, &[("subscriber", "other"), ("peer", "")], sum);
        }
    }
    let all_drops: u64 = hub.subscribers.iter().map(|s| s.drops).sum();
    e.single(
        "sockscope_subscriber_dropped_sum",
        "gauge",
        "Records dropped by all connected subscribers together.",
        all_drops,
    );

    e.single(
        "sockscope_dns_packets_total",
        "counter",
        "DNS response packets captured.",
        snap.dns.packets,
    );
    e.single(
        "sockscope_dns_answers_total",
        "counter",
        "DNS A/AAAA answers recorded.",
        snap.dns.answers,
    );
    e.single(
        "sockscope_dns_parse_errors_total",
        "counter",
        "DNS packets that could not be parsed.",
        snap.dns.parse_errors,
    );
    e.single(
        "sockscope_dns_entries",
        "gauge",
        "Address-to-name entries kept.",
        snap.dns.entries,
    );
    e.out
}

/// Parses `metrics.listen`.
pub fn parse_listen(addr: &str) -> Result<Option<SocketAddr>, MetricsError> {
    let a = addr.trim();
    if a.is_empty() {
        return Ok(None);
    }
    a.parse().map(Some).map_err(|source| MetricsError::Addr {
        addr: addr.to_string(),
        source,
    })
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    /// Method, e.g. `GET`.
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
}

/// Parses the request line of an HTTP/1.x request head.
pub fn parse_request_line(head: &str) -> Option<RequestLine<'_>> {
    let line = head.split("\r\n").next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(RequestLine { method, path })
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

/// Reads a request head (up to the blank line), bounded in size.
async fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return None;
        }
    }
}

async fn handle(mut conn: TcpStream, source: MetricsSource) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut conn)).await {
        Ok(Some(h)) => h,
        _ => {
            let r = response("400 Bad Request", "text/plain", "bad request\n", false);
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, conn.write_all(&r)).await;
            return;
        }
    };
    let reply = match parse_request_line(&head) {
        None => response("400 Bad Request", "text/plain", "bad request\n", false),
        Some(r) if r.path != METRICS_PATH => {
            response("404 Not Found", "text/plain", "see /metrics\n", false)
        }
        Some(r) if r.method == "GET" || r.method == "HEAD" => match source.render().await {
            Some(body) => response("200 OK", CONTENT_TYPE, &body, r.method == "HEAD"),
            None => response(
                "503 Service Unavailable",
                "text/plain",
                "flow fan-out is not running\n",
                false,
            ),
        },
        Some(_) => response("405 Method Not Allowed", "text/plain", "use GET\n", false),
    };
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        conn.write_all(&reply).await?;
        conn.shutdown().await
    })
    .await;
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    source: MetricsSource,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((conn, _peer)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    handle(conn, source).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::status::{CpuCounters, DnsCounters};
    use std::collections::HashMap;

    /// Parses an exposition back: `name{labels}` → value, checking that
    /// every sample belongs to a family announced by HELP and TYPE.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut typed: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    ["counter", "gauge"].contains(&kind),
                    "unexpected type {kind}"
                );
                assert!(typed.insert(name.into(), kind.into()).is_none(), "{name}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let name = series.split('{').next().expect("name");
            assert!(typed.contains_key(name), "sample {name} without TYPE");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name {name}"
            );
            if typed[name] == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            }
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{series}");
                }
            }
            let v: f64 = value.parse().expect("numeric value");
            assert!(
                samples.insert(series.to_string(), v).is_none(),
                "duplicate series {series}"
            );
        }
        samples
    }

    fn snapshot() -> StatusSnapshot {
        StatusSnapshot {
            uptime: Duration::from_millis(12_500),
            kernel_release: "6.1.0-\"odd\"\\x".into(),
            offsets_source: "btf".into(),
            probes: vec!["sockscope/tcp_connect (tcp_v4_connect)".into()],
            cpus: vec![
                CpuCounters {
                    cpu: 0,
                    samples: 100,
                    lost: 2,
                },
                CpuCounters {
                    cpu: 3,
                    samples: 40,
                    lost: 5,
                },
            ],
            decode_errors: 7,
            kretprobe_misses: 9,
            tracked_sockets: 11,
            tracked_flows: 13,
            tracked_processes: 17,
            dns: DnsCounters {
                packets: 19,
                answers: 23,
                parse_errors: 29,
                entries: 31,
            },
            last_error: None,
        }
    }

    fn hub(n_subs: u64) -> HubStatus {
        HubStatus {
            history_occupancy: 37,
            history_capacity: 100,
            subscribers: (1..=n_subs)
                .map(|id| SubscriberInfo {
                    id,
                    peer: format!("10.0.0.{id}:5000"),
                    queue_depth: id,
                    queue_capacity: 64,
                    drops: 10 * id,
                    delivered: 100 * id,
                })
                .collect(),
            flows_received: 41,
            export_queue_drops: 43,
        }
    }

    #[test]
    fn exposition_parses_back_to_the_status_values() {
        let m = parse(&render(&snapshot(), &hub(2), true));
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(get("sockscope_serving"), 1.0);
        assert_eq!(get("sockscope_uptime_seconds"), 12.5);
        assert_eq!(get("sockscope_ring_samples_total{cpu=\"0\"}"), 100.0);
        assert_eq!(get("sockscope_ring_samples_total{cpu=\"3\"}"), 40.0);
        assert_eq!(get("sockscope_ring_lost_samples_total{cpu=\"3\"}"), 5.0);
        assert_eq!(get("sockscope_lost_total{source=\"kernel_ring\"}"), 7.0);
        assert_eq!(get("sockscope_lost_total{source=\"export_queue\"}"), 43.0);
        assert_eq!(get("sockscope_decode_errors_total"), 7.0);
        assert_eq!(get("sockscope_kretprobe_misses_total"), 9.0);
        assert_eq!(get("sockscope_tracked_sockets"), 11.0);
        assert_eq!(get("sockscope_tracked_flows"), 13.0);
        assert_eq!(get("sockscope_tracked_processes"), 17.0);
        assert_eq!(get("sockscope_flows_emitted_total"), 41.0);
        assert_eq!(get("sockscope_history_flows"), 37.0);
        assert_eq!(get("sockscope_subscribers"), 2.0);
        assert_eq!(
            get("sockscope_subscriber_dropped{subscriber=\"2\",peer=\"10.0.0.2:5000\"}"),
            20.0
        );
        assert_eq!(get("sockscope_subscriber_dropped_sum"), 30.0);
        assert_eq!(get("sockscope_dns_answers_total"), 23.0);
        assert_eq!(get("sockscope_dns_entries"), 31.0);
        assert_eq!(get("sockscope_probes_installed"), 1.0);
        assert_eq!(get("sockscope_pipeline_error"), 0.0);
        assert_eq!(
            get("sockscope_probe_installed{probe=\"sockscope/tcp_connect (tcp_v4_connect)\"}"),
            1.0
        );
        // Label values are escaped.
        assert!(m.keys().any(|k| k.starts_with("sockscope_build_info")
            && k.contains(r#"kernel_release="6.1.0-\"odd\"\\x""#)));
    }

    #[test]
    fn subscriber_labels_are_capped_and_the_rest_aggregated() {
        let n = MAX_SUBSCRIBER_SERIES as u64 + 5;
        let m = parse(&render(&snapshot(), &hub(n), false));
        let delivered: Vec<_> = m
            .keys()
            .filter(|k| k.starts_with("sockscope_subscriber_delivered{"))
            .collect();
        assert_eq!(delivered.len(), MAX_SUBSCRIBER_SERIES + 1);
        let other: u64 = (MAX_SUBSCRIBER_SERIES as u64 + 1..=n)
            .map(|id| 100 * id)
            .sum();
        assert_eq!(
            m["sockscope_subscriber_delivered{subscriber=\"other\",peer=\"\"}"],
            other as f64
        );
        let total: f64 = delivered.iter().map(|k| m[*k]).sum();
        assert_eq!(total, (1..=n).map(|id| 100 * id).sum::<u64>() as f64);
        assert_eq!(m["sockscope_serving"], 0.0);
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(RequestLine {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(parse_request_line("GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request_line("GET /metrics HTTP/2 x\r\n\r\n"), None);
        assert_eq!(parse_request_line("\u{0}\r\n\r\n"), None);
    }
}
