//! Tests of the exposition: values, label bounds, the text format.
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
        pods: Some(crate::model::PodResolverStatus {
            connected: true,
            pods: 61,
            containers: 67,
            lookups: 71,
            lookup_failures: 73,
            resyncs: 79,
            resync_failures: 83,
            requests_dropped: 89,
            ..Default::default()
        }),
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
                    dropped: 7,
                    rejected: 11,
                }),
            })
            .collect(),
        flows_received: 41,
        pod_flows: vec![("shop".into(), 53), ("other".into(), 59)],
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
    assert_eq!(get("sockscope_pod_flows_total{namespace=\"shop\"}"), 53.0);
    assert_eq!(get("sockscope_pod_flows_total{namespace=\"other\"}"), 59.0);
    assert_eq!(get("sockscope_cri_connected"), 1.0);
    assert_eq!(get("sockscope_cri_pods"), 61.0);
    assert_eq!(get("sockscope_cri_containers"), 67.0);
    assert_eq!(get("sockscope_cri_lookups_total"), 71.0);
    assert_eq!(get("sockscope_cri_lookup_failures_total"), 73.0);
    assert_eq!(get("sockscope_cri_resyncs_total"), 79.0);
    assert_eq!(get("sockscope_cri_resync_failures_total"), 83.0);
    assert_eq!(get("sockscope_cri_requests_dropped_total"), 89.0);
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
    assert_eq!(get(&format!("sockscope_sink_dropped_total{sink}")), 7.0);
    assert_eq!(get(&format!("sockscope_sink_rejected_total{sink}")), 11.0);
    // Only sinks have sink series.
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with("sockscope_sink_"))
            .count(),
        7
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
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (i > 0 && c.is_ascii_digit())
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
const FAMILIES: [(&str, &str); 45] = [
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
    ("sockscope_sink_dropped_total", "counter"),
    ("sockscope_sink_rejected_total", "counter"),
    ("sockscope_pod_flows_total", "counter"),
    ("sockscope_cri_connected", "gauge"),
    ("sockscope_cri_pods", "gauge"),
    ("sockscope_cri_containers", "gauge"),
    ("sockscope_cri_lookups_total", "counter"),
    ("sockscope_cri_lookup_failures_total", "counter"),
    ("sockscope_cri_resyncs_total", "counter"),
    ("sockscope_cri_resync_failures_total", "counter"),
    ("sockscope_cri_requests_dropped_total", "counter"),
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
