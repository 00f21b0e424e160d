//! Metrics of the pod identity: the resolver's counters, and final flows by
//! their pod's namespace (a bounded label).

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::exposition::{family, single};
use crate::export::status::{HubStatus, StatusSnapshot};

/// Writes the pod families; nothing of the resolver when it is off.
pub(super) fn encode(
    snap: &StatusSnapshot,
    hub: &HubStatus,
    enc: &mut DescriptorEncoder,
) -> fmt::Result {
    family(
        enc,
        "sockscope_pod_flows",
        "Final flow records whose process runs in a pod, by the pod's namespace (at most 64 namespaces; later ones are summed as \"other\").",
        hub.pod_flows
            .iter()
            .map(|(ns, n)| ([("namespace", ns.clone())], ConstCounter::new(*n))),
    )?;
    let Some(p) = &snap.pods else { return Ok(()) };
    single(
        enc,
        "sockscope_cri_connected",
        "Whether the last call to the container runtime succeeded.",
        ConstGauge::new(u64::from(p.connected)),
    )?;
    single(
        enc,
        "sockscope_cri_pods",
        "Pods the container runtime reported.",
        ConstGauge::new(p.pods),
    )?;
    single(
        enc,
        "sockscope_cri_containers",
        "Containers the container runtime reported.",
        ConstGauge::new(p.containers),
    )?;
    for (name, help, v) in [
        (
            "sockscope_cri_lookups",
            "Containers looked up one by one on first sight.",
            p.lookups,
        ),
        (
            "sockscope_cri_lookup_failures",
            "Container lookups that failed (runtime gone, slow or in error); their flows went out without pod fields.",
            p.lookup_failures,
        ),
        (
            "sockscope_cri_resyncs",
            "Full listings of the runtime's pods and containers that succeeded.",
            p.resyncs,
        ),
        (
            "sockscope_cri_resync_failures",
            "Full listings that failed.",
            p.resync_failures,
        ),
        (
            "sockscope_cri_requests_dropped",
            "Container lookups not asked because the lookup queue was full.",
            p.requests_dropped,
        ),
    ] {
        single(enc, name, help, ConstCounter::new(v))?;
    }
    Ok(())
}
