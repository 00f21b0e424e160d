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
pub(super) const OTHER: &str = "other";

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
pub(super) fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: impl EncodeMetric,
) -> fmt::Result {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

/// Writes a family of labelled samples, one per item of `series`.
pub(super) fn family<L, M>(
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
const PER_SINK: [(&str, &str, SinkField); 6] = [
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
    (
        "sockscope_sink_dropped",
        "Flow records a sink gave up (a batch its destination refused or did not take in time), told in-band.",
        |k| k.dropped,
    ),
    (
        "sockscope_sink_rejected",
        "Flow records a sink's destination said it rejected.",
        |k| k.rejected,
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
        super::pods::encode(&self.snap, &self.hub, &mut enc)?;
        self.encode_dns(&mut enc)
    }
}

#[cfg(test)]
mod tests;
