//! Kubernetes identity of a flow's ends, as the node's container runtime
//! reports it (see `enrich::pods`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Kind of the workload a pod belongs to, derived from its labels and name
/// (the CRI carries no owner references).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum WorkloadKind {
    /// A pod no controller is known to own.
    #[default]
    Pod,
    /// A Deployment, through its ReplicaSet (label `pod-template-hash`).
    Deployment,
    /// A DaemonSet (labels `controller-revision-hash` and
    /// `pod-template-generation`).
    DaemonSet,
    /// A StatefulSet (labels `controller-revision-hash` and
    /// `statefulset.kubernetes.io/pod-name`).
    StatefulSet,
    /// A Job (label `batch.kubernetes.io/job-name` or `job-name`).
    Job,
    /// A CronJob, through a Job named `<cronjob>-<scheduled minute>`.
    CronJob,
}

impl WorkloadKind {
    /// Every kind.
    pub const ALL: [WorkloadKind; 6] = [
        WorkloadKind::Pod,
        WorkloadKind::Deployment,
        WorkloadKind::DaemonSet,
        WorkloadKind::StatefulSet,
        WorkloadKind::Job,
        WorkloadKind::CronJob,
    ];

    /// The Kubernetes kind name, e.g. `Deployment`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "Pod",
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
        }
    }

    /// The kind named `s`, case-insensitively.
    pub fn parse(s: &str) -> Option<WorkloadKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workload a pod belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Its name (the pod's own name for a bare pod).
    pub name: String,
}

/// A pod, and for the end of a flow a process of which owns the socket, the
/// container that process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentity {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// The pod's labels (without the runtime's own `io.kubernetes.*` ones).
    pub labels: BTreeMap<String, String>,
    /// The pod's annotations that `kubernetes.annotations` selects.
    pub annotations: BTreeMap<String, String>,
    /// Derived workload.
    pub workload: Workload,
    /// The container's name in the pod; empty when the end is known only by
    /// the pod's address.
    pub container_name: String,
    /// The container's image as the pod asked for it; empty likewise.
    pub image: String,
    /// The pod's addresses (none for a pod on the node's network).
    pub ips: Vec<IpAddr>,
}

/// Counters of the pod resolver, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodResolverStatus {
    /// The runtime's CRI socket.
    pub endpoint: String,
    /// Whether the last call to the runtime succeeded.
    pub connected: bool,
    /// Runtime name and version, e.g. `containerd 1.6.20`.
    pub runtime: String,
    /// Pods known.
    pub pods: u64,
    /// Containers known.
    pub containers: u64,
    /// Containers looked up one by one on first sight.
    pub lookups: u64,
    /// Of those, lookups that failed (runtime gone, slow or in error).
    pub lookup_failures: u64,
    /// Full listings that succeeded.
    pub resyncs: u64,
    /// Full listings that failed.
    pub resync_failures: u64,
    /// Lookups not asked because the lookup queue was full.
    pub requests_dropped: u64,
    /// Pods or containers the bounds left out of the index.
    pub left_out: u64,
    /// Last error the runtime gave, empty when none.
    pub last_error: String,
}
