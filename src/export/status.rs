//! Daemon status: what the pipeline reports through [`StatusSource`], and
//! its protobuf form (with the fan-out's own subscriber and history parts).

use std::time::Duration;

use crate::export::convert;
use crate::export::proto;
use crate::model::{NodeInfo, OsRelease, PodResolverStatus};

/// Per-CPU perf ring counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuCounters {
    /// CPU number.
    pub cpu: u32,
    /// Samples read from this CPU's ring.
    pub samples: u64,
    /// Samples the kernel dropped on this CPU's ring.
    pub lost: u64,
}

/// DNS enrichment counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// DNS response packets captured.
    pub packets: u64,
    /// A/AAAA answers recorded.
    pub answers: u64,
    /// Packets that could not be parsed.
    pub parse_errors: u64,
    /// Address-to-name entries kept.
    pub entries: u64,
}

/// The pipeline's part of the status, filled by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// Time since the daemon started.
    pub uptime: Duration,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Where struct offsets came from (`btf`, `guess`).
    pub offsets_source: String,
    /// Names of the installed probes.
    pub probes: Vec<String>,
    /// Per-CPU ring counters.
    pub cpus: Vec<CpuCounters>,
    /// Samples that could not be decoded.
    pub decode_errors: u64,
    /// Missed kretprobe instances.
    pub kretprobe_misses: u64,
    /// Sockets tracked.
    pub tracked_sockets: u64,
    /// Flows tracked.
    pub tracked_flows: u64,
    /// Processes tracked.
    pub tracked_processes: u64,
    /// DNS counters.
    pub dns: DnsCounters,
    /// Last error the pipeline hit, if any.
    pub last_error: Option<String>,
    /// The node the daemon runs on.
    pub node: NodeInfo,
    /// The pod resolver's counters; `None` when it is off.
    pub pods: Option<PodResolverStatus>,
}

/// Provides the pipeline's status on demand. Called from the gRPC tasks:
/// must be cheap and must not block (read atomics or a mutex-guarded copy).
pub trait StatusSource: Send + Sync {
    /// A consistent-enough snapshot of the pipeline's counters.
    fn snapshot(&self) -> StatusSnapshot;
}

/// A status source with nothing to report (uptime counted from creation);
/// useful before the pipeline is up and in tests.
#[derive(Debug)]
pub struct EmptyStatus {
    started: std::time::Instant,
}

impl Default for EmptyStatus {
    fn default() -> Self {
        EmptyStatus {
            started: std::time::Instant::now(),
        }
    }
}

impl StatusSource for EmptyStatus {
    fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            uptime: self.started.elapsed(),
            ..StatusSnapshot::default()
        }
    }
}

/// One subscriber as the fan-out sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberInfo {
    /// Server-assigned id.
    pub id: u64,
    /// Peer address or `unix`.
    pub peer: String,
    /// Items waiting in its queue.
    pub queue_depth: u64,
    /// Its queue capacity.
    pub queue_capacity: u64,
    /// Records dropped because its queue was full.
    pub drops: u64,
    /// Records delivered to its queue.
    pub delivered: u64,
    /// Responses its stream produced.
    pub responses: u64,
    /// A sink's own counters; `None` for gRPC streams.
    pub sink: Option<SinkInfo>,
}

/// A sink's own counters (what its destination took).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkInfo {
    /// `jsonl`, `nats`, `otlp`.
    pub kind: String,
    /// Connected to its destination.
    pub connected: bool,
    /// Flow records the destination took.
    pub published: u64,
    /// Acknowledgements of duplicates (retries of stored records).
    pub duplicates: u64,
    /// Publications sent again.
    pub retries: u64,
    /// Loss notices the destination took.
    pub loss_notices: u64,
    /// Flow records the sink gave up (told in-band as `LOSS_SOURCE_SINK`).
    pub dropped: u64,
    /// Flow records the destination said it rejected.
    pub rejected: u64,
}

/// Where a sink's counters are read from when the status is asked for.
pub trait SinkStats: Send + Sync + std::fmt::Debug {
    /// The counters now.
    fn info(&self) -> SinkInfo;
}

/// The fan-out's part of the status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStatus {
    /// Finished flows held for replay.
    pub history_occupancy: u64,
    /// History capacity.
    pub history_capacity: u64,
    /// Connected subscribers.
    pub subscribers: Vec<SubscriberInfo>,
    /// Flow records received from the pipeline.
    pub flows_received: u64,
    /// Final flow records whose local process runs in a pod, by the pod's
    /// namespace, at most `MAX_NAMESPACE_SERIES` namespaces (the rest under
    /// `other`), in namespace order.
    pub pod_flows: Vec<(String, u64)>,
    /// Outputs the pipeline could not enqueue.
    pub export_queue_drops: u64,
}

/// The daemon's `GetStatus` answer on demand, for a sink that publishes
/// it (the NATS sink, for the relay's `nodes_seen`).
#[derive(Clone)]
pub struct StatusFeed {
    status: std::sync::Arc<dyn StatusSource>,
    hub: crate::export::hub::Hub,
    node: String,
}

impl std::fmt::Debug for StatusFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusFeed")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl StatusFeed {
    /// The status of `status` and `hub`, for node `node`.
    pub fn new(
        status: std::sync::Arc<dyn StatusSource>,
        hub: crate::export::hub::Hub,
        node: &str,
    ) -> StatusFeed {
        StatusFeed {
            status,
            hub,
            node: node.to_string(),
        }
    }

    /// The status now, as `GetStatus` answers it; `None` when the hub is
    /// gone.
    pub async fn get(&self) -> Option<proto::GetStatusResponse> {
        let hub = self.hub.status().await.ok()?;
        Some(to_proto(&self.status.snapshot(), &hub, &self.node, true))
    }
}

/// Builds the protobuf status from both parts.
pub fn to_proto(
    snap: &StatusSnapshot,
    hub: &HubStatus,
    node_name: &str,
    serving: bool,
) -> proto::GetStatusResponse {
    proto::GetStatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime: Some(convert::duration(snap.uptime)),
        kernel_release: snap.kernel_release.clone(),
        offsets_source: snap.offsets_source.clone(),
        probes: snap.probes.clone(),
        cpus: snap
            .cpus
            .iter()
            .map(|c| proto::CpuStatus {
                cpu: c.cpu,
                samples: c.samples,
                lost: c.lost,
            })
            .collect(),
        decode_errors: snap.decode_errors,
        kretprobe_misses: snap.kretprobe_misses,
        tracked_sockets: snap.tracked_sockets,
        tracked_flows: snap.tracked_flows,
        tracked_processes: snap.tracked_processes,
        history_occupancy: hub.history_occupancy,
        history_capacity: hub.history_capacity,
        subscribers: hub
            .subscribers
            .iter()
            .map(|s| proto::SubscriberStatus {
                id: s.id,
                peer: s.peer.clone(),
                queue_depth: s.queue_depth,
                queue_capacity: s.queue_capacity,
                drops: s.drops,
                delivered: s.delivered,
                responses: s.responses,
                sink: s.sink.as_ref().map(|k| proto::SinkStatus {
                    kind: k.kind.clone(),
                    connected: k.connected,
                    published: k.published,
                    duplicates: k.duplicates,
                    retries: k.retries,
                    loss_notices: k.loss_notices,
                    dropped: k.dropped,
                    rejected: k.rejected,
                }),
            })
            .collect(),
        dns: Some(proto::DnsStatus {
            packets: snap.dns.packets,
            answers: snap.dns.answers,
            parse_errors: snap.dns.parse_errors,
            entries: snap.dns.entries,
        }),
        last_error: snap.last_error.clone().unwrap_or_default(),
        node_name: node_name.to_string(),
        flows_received: hub.flows_received,
        export_queue_drops: hub.export_queue_drops,
        serving,
        node: Some(node_to_proto(&snap.node)),
        kubernetes: snap.pods.as_ref().map(pods_to_proto),
        nodes_seen: Vec::new(),
    }
}

/// The pod resolver's counters in their protobuf form.
pub fn pods_to_proto(p: &PodResolverStatus) -> proto::KubernetesStatus {
    proto::KubernetesStatus {
        endpoint: p.endpoint.clone(),
        connected: p.connected,
        runtime: p.runtime.clone(),
        pods: p.pods,
        containers: p.containers,
        lookups: p.lookups,
        lookup_failures: p.lookup_failures,
        resyncs: p.resyncs,
        resync_failures: p.resync_failures,
        requests_dropped: p.requests_dropped,
        left_out: p.left_out,
        last_error: p.last_error.clone(),
    }
}

/// The node's facts in their protobuf form.
pub fn node_to_proto(n: &NodeInfo) -> proto::NodeInfo {
    let os = n.os.clone().unwrap_or_default();
    proto::NodeInfo {
        hostname: n.hostname.clone(),
        architecture: n.architecture.clone(),
        kernel_release: n.kernel_release.clone(),
        kernel_version: n.kernel_version.clone(),
        os_name: os.name,
        os_version: os.version,
        os_codename: os.codename,
        os_platform: os.platform,
        os_family: os.family,
        machine_id: n.machine_id.clone().unwrap_or_default(),
        containerized: n.containerized,
        ip_addresses: n.ip_addresses.iter().map(|a| a.to_string()).collect(),
    }
}

/// The node's facts from their protobuf form (what a client was told);
/// unparsable addresses are left out.
pub fn node_from_proto(p: &proto::NodeInfo) -> NodeInfo {
    let os = (!p.os_name.is_empty() || !p.os_platform.is_empty()).then(|| OsRelease {
        name: p.os_name.clone(),
        version: p.os_version.clone(),
        codename: p.os_codename.clone(),
        platform: p.os_platform.clone(),
        family: p.os_family.clone(),
    });
    NodeInfo {
        hostname: p.hostname.clone(),
        architecture: p.architecture.clone(),
        kernel_release: p.kernel_release.clone(),
        kernel_version: p.kernel_version.clone(),
        os,
        machine_id: (!p.machine_id.is_empty()).then(|| p.machine_id.clone()),
        containerized: p.containerized,
        ip_addresses: p
            .ip_addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect(),
    }
}
