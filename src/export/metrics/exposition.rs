//! The exposition of one status reading: a prometheus-client [`Collector`]
//! that turns a [`StatusSnapshot`] and a [`HubStatus`] into constant
//! counters and gauges, encoded in the Prometheus text format (0.0.4).
//!
//! Counter families are named without `_total`: the encoder appends it to
//! the HELP, TYPE and sample lines, so `sockscope_lost` is exposed as
//! `sockscope_lost_total`. The info family `sockscope_build` is exposed as
//! `sockscope_build_info` (type gauge, value 1) the same way.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::{MAX_CPU_SERIES, MAX_SUBSCRIBER_SERIES};
use crate::export::status::{HubStatus, SinkInfo, StatusSnapshot, SubscriberInfo};

/// Label value of the series that sums what exceeds a label bound.
const OTHER: &str = "other";

/// One status reading, encoded when the registry is.
#[derive(Debug)]
struct Reading {
    snap: StatusSnapshot,
    hub: HubStatus,
    serving: bool,
}

/// Renders the text exposition of one status reading.
pub fn render(snap: &StatusSnapshot, hub: &HubStatus, serving: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Reading {
        snap: snap.clone(),
        hub: hub.clone(),
        serving,
    }));
    let mut out = String::new();
    // Writing into a String cannot fail, and the collector itself never
    // returns an error of its own.
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        tracing::warn!("metrics: encoding the exposition failed: {e}");
    }
    out
}

/// Writes a family with a single unlabelled sample.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: impl EncodeMetric,
) -> fmt::Result {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

/// Writes a family of labelled samples, one per item of `series`.
fn family<L, M>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut family = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, m) in series {
        m.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Per-CPU values, bounded to [`MAX_CPU_SERIES`] label values; the rest are
/// summed under `cpu="other"`.
fn cpu_series(
    snap: &StatusSnapshot,
    value: impl Fn(usize) -> u64,
) -> Vec<([(&'static str, String); 1], ConstCounter)> {
    let mut series = Vec::new();
    let mut other: Option<u64> = None;
    for (i, c) in snap.cpus.iter().enumerate() {
        if i < MAX_CPU_SERIES {
            series.push(([("cpu", c.cpu.to_string())], ConstCounter::new(value(i))));
        } else {
            *other.get_or_insert(0) += value(i);
        }
    }
    if let Some(v) = other {
        series.push(([("cpu", OTHER.to_string())], ConstCounter::new(v)));
    }
    series
}

/// Reads one number of a subscriber.
type SubscriberField = fn(&SubscriberInfo) -> u64;

/// The per-subscriber gauge families: name, help and the number they show.
const PER_SUBSCRIBER: [(&str, &str, SubscriberField); 5] = [
    (
        "sockscope_subscriber_delivered",
        "Records delivered to a connected subscriber's queue.",
        |s| s.delivered,
    ),
    (
        "sockscope_subscriber_responses",
        "StreamFlows responses a connected subscriber's stream produced.",
        |s| s.responses,
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

/// Reads one counter of a sink.
type SinkField = fn(&SinkInfo) -> u64;

/// The per-sink counter families (sinks are subscribers too: their drops
/// are in the subscriber families).
const PER_SINK: [(&str, &str, SinkField); 4] = [
    (
        "sockscope_sink_published",
        "Flow records a sink's destination took (written, or acknowledged by the stream).",
        |k| k.published,
    ),
    (
        "sockscope_sink_duplicates",
        "Acknowledgements of records already stored (retries the stream dropped as duplicates).",
        |k| k.duplicates,
    ),
    (
        "sockscope_sink_retries",
        "Publications a sink sent again after a failure or a missing acknowledgement.",
        |k| k.retries,
    ),
    (
        "sockscope_sink_loss_notices",
        "Loss notices a sink's destination took.",
        |k| k.loss_notices,
    ),
];

impl Reading {
    /// The sinks among the subscribers (few: one per `export.<sink>`),
    /// labelled by kind and peer.
    fn encode_sinks(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let sinks: Vec<(&SubscriberInfo, &SinkInfo)> = self
            .hub
            .subscribers
            .iter()
            .filter_map(|s| s.sink.as_ref().map(|k| (s, k)))
            .collect();
        let labels =
            |s: &SubscriberInfo, k: &SinkInfo| [("sink", k.kind.clone()), ("peer", s.peer.clone())];
        family(
            enc,
            "sockscope_sink_connected",
            "Whether a sink is connected to its destination.",
            sinks
                .iter()
                .map(|(s, k)| (labels(s, k), ConstGauge::new(u64::from(k.connected)))),
        )?;
        for (name, help, get) in PER_SINK {
            family(
                enc,
                name,
                help,
                sinks
                    .iter()
                    .map(|(s, k)| (labels(s, k), ConstCounter::new(get(k)))),
            )?;
        }
        Ok(())
    }

    fn encode_process(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let snap = &self.snap;
        let mut build = enc.encode_descriptor(
            "sockscope_build",
            "Daemon version, kernel release and offsets source (value 1).",
            None,
            MetricType::Info,
        )?;
        build.encode_info(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("kernel_release", snap.kernel_release.as_str()),
            ("offsets_source", snap.offsets_source.as_str()),
        ])?;
        single(
            enc,
            "sockscope_serving",
            "1 while the pipeline delivers flows (gRPC health SERVING).",
            ConstGauge::new(u32::from(self.serving)),
        )?;
        single(
            enc,
            "sockscope_uptime_seconds",
            "Seconds since the daemon started.",
            ConstGauge::new(snap.uptime.as_secs_f64()),
        )?;
        single(
            enc,
            "sockscope_pipeline_error",
            "1 when the pipeline reported an error (see GetStatus last_error).",
            ConstGauge::new(u32::from(snap.last_error.is_some())),
        )?;
        single(
            enc,
            "sockscope_probes_installed",
            "Kernel probes installed.",
            ConstGauge::new(snap.probes.len()),
        )?;
        family(
            enc,
            "sockscope_probe_installed",
            "One series per installed probe (value 1).",
            snap.probes
                .iter()
                .map(|p| ([("probe", p.as_str())], ConstGauge::new(1u32))),
        )
    }

    fn encode_pipeline(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let (snap, hub) = (&self.snap, &self.hub);
        family(
            enc,
            "sockscope_ring_samples",
            "Samples read from each CPU's perf ring.",
            cpu_series(snap, |i| snap.cpus[i].samples),
        )?;
        family(
            enc,
            "sockscope_ring_lost_samples",
            "Samples the kernel dropped on each CPU's perf ring.",
            cpu_series(snap, |i| snap.cpus[i].lost),
        )?;
        let ring_lost: u64 = snap.cpus.iter().map(|c| c.lost).sum();
        family(
            enc,
            "sockscope_lost",
            "Samples or records lost, by where they were lost.",
            [
                ("kernel_ring", ring_lost),
                ("decode_error", snap.decode_errors),
                ("kretprobe_miss", snap.kretprobe_misses),
                ("export_queue", hub.export_queue_drops),
            ]
            .map(|(source, v)| ([("source", source)], ConstCounter::new(v))),
        )?;
        single(
            enc,
            "sockscope_decode_errors",
            "Samples that could not be decoded.",
            ConstCounter::new(snap.decode_errors),
        )?;
        single(
            enc,
            "sockscope_kretprobe_misses",
            "Missed kretprobe instances.",
            ConstCounter::new(snap.kretprobe_misses),
        )?;
        single(
            enc,
            "sockscope_tracked_sockets",
            "Sockets tracked by the flow engine.",
            ConstGauge::new(snap.tracked_sockets),
        )?;
        single(
            enc,
            "sockscope_tracked_flows",
            "Flows tracked by the flow engine.",
            ConstGauge::new(snap.tracked_flows),
        )?;
        single(
            enc,
            "sockscope_tracked_processes",
            "Processes tracked by the process table.",
            ConstGauge::new(snap.tracked_processes),
        )
    }

    fn encode_fan_out(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let hub = &self.hub;
        single(
            enc,
            "sockscope_flows_emitted",
            "Flow records (interim and final) the fan-out received from the pipeline.",
            ConstCounter::new(hub.flows_received),
        )?;
        single(
            enc,
            "sockscope_export_queue_drops",
            "Outputs dropped because the pipeline-to-fan-out queue was full.",
            ConstCounter::new(hub.export_queue_drops),
        )?;
        single(
            enc,
            "sockscope_history_flows",
            "Finished flows held for replay.",
            ConstGauge::new(hub.history_occupancy),
        )?;
        single(
            enc,
            "sockscope_history_capacity",
            "Capacity of the replay history.",
            ConstGauge::new(hub.history_capacity),
        )?;
        single(
            enc,
            "sockscope_subscribers",
            "Connected flow subscribers (gRPC streams and the JSON lines output).",
            ConstGauge::new(hub.subscribers.len()),
        )?;
        let mut subs: Vec<_> = hub.subscribers.iter().collect();
        subs.sort_by_key(|s| s.id);
        let (named, rest) = subs.split_at(subs.len().min(MAX_SUBSCRIBER_SERIES));
        for (name, help, get) in PER_SUBSCRIBER {
            let mut series: Vec<_> = named
                .iter()
                .map(|s| {
                    let labels = [("subscriber", s.id.to_string()), ("peer", s.peer.clone())];
                    (labels, ConstGauge::new(get(s)))
                })
                .collect();
            if !rest.is_empty() {
                let sum: u64 = rest.iter().map(|s| get(s)).sum();
                let labels = [("subscriber", OTHER.to_string()), ("peer", String::new())];
                series.push((labels, ConstGauge::new(sum)));
            }
            family(enc, name, help, series)?;
        }
        single(
            enc,
            "sockscope_subscriber_dropped_sum",
            "Records dropped by all connected subscribers together.",
            ConstGauge::new(hub.subscribers.iter().map(|s| s.drops).sum::<u64>()),
        )
    }

    fn encode_dns(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let dns = &self.snap.dns;
        single(
            enc,
            "sockscope_dns_packets",
            "DNS response packets captured.",
            ConstCounter::new(dns.packets),
        )?;
        single(
            enc,
            "sockscope_dns_answers",
            "DNS A/AAAA answers recorded.",
            ConstCounter::new(dns.answers),
        )?;
        single(
            enc,
            "sockscope_dns_parse_errors",
            "DNS packets that could not be parsed.",
            ConstCounter::new(dns.parse_errors),
        )?;
        single(
            enc,
            "sockscope_dns_entries",
            "Address-to-name entries kept.",
            ConstGauge::new(dns.entries),
        )
    }
}

impl Collector for Reading {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_process(&mut enc)?;
        self.encode_pipeline(&mut enc)?;
        self.encode_fan_out(&mut enc)?;
        self.encode_sinks(&mut enc)?;
        self.encode_dns(&mut enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::status::{CpuCounters, DnsCounters};
    use std::collections::HashMap;
    use std::time::Duration;

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
            node: Default::default(),
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
                    responses: 20 * id,
                    sink: (id == 2).then(|| SinkInfo {
                        kind: "nats".into(),
                        connected: true,
                        published: 47,
                        duplicates: 3,
                        retries: 5,
                        loss_notices: 2,
                    }),
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
        let sink = "{sink=\"nats\",peer=\"10.0.0.2:5000\"}";
        assert_eq!(get(&format!("sockscope_sink_connected{sink}")), 1.0);
        assert_eq!(get(&format!("sockscope_sink_published_total{sink}")), 47.0);
        assert_eq!(get(&format!("sockscope_sink_duplicates_total{sink}")), 3.0);
        assert_eq!(get(&format!("sockscope_sink_retries_total{sink}")), 5.0);
        assert_eq!(
            get(&format!("sockscope_sink_loss_notices_total{sink}")),
            2.0
        );
        // Only sinks have sink series.
        assert_eq!(
            m.keys()
                .filter(|k| k.starts_with("sockscope_sink_"))
                .count(),
            5
        );
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

    /// Reads a metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (no `:` in
    /// label names); returns it and the rest of the line.
    fn name(s: &str, colon: bool) -> Result<(&str, &str), String> {
        let ok = |i: usize, c: char| {
            c.is_ascii_alphabetic()
                || c == '_'
                || (colon && c == ':')
                || (i > 0 && c.is_ascii_digit())
        };
        let end = s
            .char_indices()
            .find(|&(i, c)| !ok(i, c))
            .map_or(s.len(), |(i, _)| i);
        if end == 0 {
            return Err(format!("no name at {s:?}"));
        }
        Ok(s.split_at(end))
    }

    /// Label pairs of one sample, unescaped.
    type Labels = Vec<(String, String)>;

    /// Reads `{name="value",...}`; returns the labels and the rest.
    fn labels(mut s: &str) -> Result<(Labels, &str), String> {
        let mut out = Vec::new();
        let Some(r) = s.strip_prefix('{') else {
            return Ok((out, s));
        };
        s = r;
        loop {
            let (key, r) = name(s, false)?;
            let r = r.strip_prefix("=\"").ok_or(format!("no =\" after {key}"))?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err(format!("unterminated value of {key}")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in {key}")),
                    },
                    Some((_, '\n')) => return Err(format!("raw newline in {key}")),
                    Some((_, c)) => value.push(c),
                }
            };
            out.push((key.to_string(), value));
            s = &r[end + 1..];
            if let Some(r) = s.strip_prefix(',') {
                s = r;
            } else {
                return s
                    .strip_prefix('}')
                    .map(|r| (out, r))
                    .ok_or(format!("no closing brace at {s:?}"));
            }
        }
    }

    /// Checks the whole exposition against the text format: every line is
    /// `# HELP name text`, `# TYPE name counter|gauge` or
    /// `name{labels} value`; a family's TYPE comes before its samples, which
    /// are contiguous, and no series repeats.
    fn check_text_format(text: &str) -> Result<usize, String> {
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        let mut typed: Vec<String> = Vec::new();
        let mut series = std::collections::HashSet::new();
        let mut samples = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                name(rest, true)?;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (family, kind) = name(rest, true)?;
                if ![" counter", " gauge"].contains(&kind) {
                    return Err(format!("type {kind:?} of {family}"));
                }
                if typed.iter().any(|t| t == family) {
                    return Err(format!("second TYPE of {family}"));
                }
                typed.push(family.to_string());
                continue;
            }
            let (metric, rest) = name(line, true)?;
            if typed.last().map(String::as_str) != Some(metric) {
                return Err(format!("sample {metric} outside its family"));
            }
            let (labels, rest) = labels(rest)?;
            let value = rest
                .strip_prefix(' ')
                .ok_or(format!("no value separator in {line:?}"))?;
            value
                .parse::<f64>()
                .map_err(|e| format!("value {value:?} of {metric}: {e}"))?;
            if !series.insert((metric.to_string(), labels)) {
                return Err(format!("duplicate series in {line:?}"));
            }
            samples += 1;
        }
        Ok(samples)
    }

    #[test]
    fn every_line_follows_the_text_format() {
        let mut snap = snapshot();
        snap.kernel_release = "6.1 \"q\" \\ back\nslash ,}{=".into();
        snap.last_error = Some("boom".into());
        snap.cpus = (0..MAX_CPU_SERIES as u32 + 3)
            .map(|cpu| CpuCounters {
                cpu,
                samples: u64::from(cpu),
                lost: 1,
            })
            .collect();
        let mut many = hub(MAX_SUBSCRIBER_SERIES as u64 + 4);
        many.subscribers[0].peer = "[::1]:80 \"x\"".into();
        for (snap, status) in [
            (snap, many),
            (StatusSnapshot::default(), HubStatus::default()),
        ] {
            let text = render(&snap, &status, true);
            let samples = check_text_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert!(samples > 0);
        }
        // The escaped kernel release reads back as it was.
        let text = render(&snapshot(), &hub(0), false);
        let line = text
            .lines()
            .find(|l| l.starts_with("sockscope_build_info{"))
            .expect("build info");
        let (parsed, _) = labels(&line["sockscope_build_info".len()..]).expect("labels");
        assert!(parsed.contains(&("kernel_release".into(), snapshot().kernel_release)));
    }

    #[test]
    fn the_text_format_check_rejects_malformed_lines() {
        for bad in [
            "# TYPE a counter\na{x=\"1} 1\n",
            "# TYPE a counter\na{x=\"\\q\"} 1\n",
            "# TYPE a counter\na 1 2\n",
            "# TYPE a counter\nb 1\n",
            "# TYPE a summary\na 1\n",
            "# TYPE a gauge\na 1\na 2\n",
            "# TYPE a gauge\na{1x=\"\"} 1\n",
            "# TYPE a gauge\na 1",
        ] {
            assert!(check_text_format(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_text_format("# HELP a x\n# TYPE a gauge\na{b=\"\\\"\"} 1\n"),
            Ok(1)
        );
    }

    /// Every family the endpoint has exposed since it exists, with its
    /// type, in order: dashboards and alerts depend on these names.
    const FAMILIES: [(&str, &str); 34] = [
        ("sockscope_build_info", "gauge"),
        ("sockscope_serving", "gauge"),
        ("sockscope_uptime_seconds", "gauge"),
        ("sockscope_pipeline_error", "gauge"),
        ("sockscope_probes_installed", "gauge"),
        ("sockscope_probe_installed", "gauge"),
        ("sockscope_ring_samples_total", "counter"),
        ("sockscope_ring_lost_samples_total", "counter"),
        ("sockscope_lost_total", "counter"),
        ("sockscope_decode_errors_total", "counter"),
        ("sockscope_kretprobe_misses_total", "counter"),
        ("sockscope_tracked_sockets", "gauge"),
        ("sockscope_tracked_flows", "gauge"),
        ("sockscope_tracked_processes", "gauge"),
        ("sockscope_flows_emitted_total", "counter"),
        ("sockscope_export_queue_drops_total", "counter"),
        ("sockscope_history_flows", "gauge"),
        ("sockscope_history_capacity", "gauge"),
        ("sockscope_subscribers", "gauge"),
        ("sockscope_subscriber_delivered", "gauge"),
        ("sockscope_subscriber_responses", "gauge"),
        ("sockscope_subscriber_dropped", "gauge"),
        ("sockscope_subscriber_queue_depth", "gauge"),
        ("sockscope_subscriber_queue_capacity", "gauge"),
        ("sockscope_subscriber_dropped_sum", "gauge"),
        ("sockscope_sink_connected", "gauge"),
        ("sockscope_sink_published_total", "counter"),
        ("sockscope_sink_duplicates_total", "counter"),
        ("sockscope_sink_retries_total", "counter"),
        ("sockscope_sink_loss_notices_total", "counter"),
        ("sockscope_dns_packets_total", "counter"),
        ("sockscope_dns_answers_total", "counter"),
        ("sockscope_dns_parse_errors_total", "counter"),
        ("sockscope_dns_entries", "gauge"),
    ];

    #[test]
    fn family_names_and_types_are_stable() {
        let text = render(&snapshot(), &hub(MAX_SUBSCRIBER_SERIES as u64 + 1), true);
        let typed: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        assert_eq!(typed, FAMILIES);
        let helped = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(helped, FAMILIES.len());
    }
}
