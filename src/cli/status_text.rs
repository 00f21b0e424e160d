//! The `sockscope status` text: one `GetStatus` answer, line by line.

use std::time::Duration;

use crate::export::convert;
use crate::export::proto;

/// Human-readable rendering of a status response.
pub fn status_text(s: &proto::GetStatusResponse) -> String {
    let mut t = String::new();
    let uptime = s
        .uptime
        .as_ref()
        .and_then(convert::std_duration)
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_default();
    let samples: u64 = s.cpus.iter().map(|c| c.samples).sum();
    let lost: u64 = s.cpus.iter().map(|c| c.lost).sum();
    t += &format!("node:            {}\n", s.node_name);
    t += &format!("version:         {}\n", s.version);
    t += &format!("serving:         {}\n", s.serving);
    t += &format!("uptime:          {uptime}\n");
    t += &format!("kernel:          {}\n", s.kernel_release);
    if let Some(n) = &s.node {
        let os = [&n.os_name, &n.os_version]
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        t += &format!(
            "host:            {} {} {}{}\n",
            n.hostname,
            n.architecture,
            if os.is_empty() { "(os unknown)" } else { &os },
            if n.containerized {
                ", containerized"
            } else {
                ""
            }
        );
        if !n.ip_addresses.is_empty() {
            t += &format!("addresses:       {}\n", n.ip_addresses.join(", "));
        }
    }
    t += &format!("offsets:         {}\n", s.offsets_source);
    t += &format!(
        "probes:          {} ({})\n",
        s.probes.len(),
        s.probes.join(", ")
    );
    t += &format!(
        "samples/lost:    {samples}/{lost} over {} cpus\n",
        s.cpus.len()
    );
    for c in &s.cpus {
        t += &format!(
            "  cpu {:>3}: samples {} lost {}\n",
            c.cpu, c.samples, c.lost
        );
    }
    t += &format!("decode errors:   {}\n", s.decode_errors);
    t += &format!("kretprobe miss:  {}\n", s.kretprobe_misses);
    t += &format!(
        "tracked:         {} sockets, {} flows, {} processes\n",
        s.tracked_sockets, s.tracked_flows, s.tracked_processes
    );
    t += &format!(
        "history:         {}/{}\n",
        s.history_occupancy, s.history_capacity
    );
    t += &format!(
        "fan-out:         {} flows received, {} export queue drops\n",
        s.flows_received, s.export_queue_drops
    );
    if let Some(d) = &s.dns {
        t += &format!(
            "dns:             {} packets, {} answers, {} parse errors, {} entries\n",
            d.packets, d.answers, d.parse_errors, d.entries
        );
    }
    if let Some(k) = &s.kubernetes {
        t += &format!(
            "kubernetes:      {} ({}), {} pods, {} containers, {} lookups ({} failed), {} listings ({} failed)\n",
            k.endpoint,
            match (k.connected, k.runtime.is_empty()) {
                (true, false) => k.runtime.clone(),
                (true, true) => "connected".to_string(),
                (false, _) => "not connected".to_string(),
            },
            k.pods,
            k.containers,
            k.lookups,
            k.lookup_failures,
            k.resyncs,
            k.resync_failures
        );
        if !k.last_error.is_empty() {
            t += &format!("                 last error: {}\n", k.last_error);
        }
    }
    if !s.nodes_seen.is_empty() {
        t += &format!("nodes in stream: {}\n", s.nodes_seen.len());
        for n in &s.nodes_seen {
            let last = n
                .last_message
                .as_ref()
                .and_then(crate::export::convert::system_time)
                .map_or_else(|| "?".to_string(), crate::export::ecs::rfc3339);
            t += &format!(
                "  {} ({}): {} flow records, {} loss notices, last stored {}\n",
                n.node_name, n.subject_token, n.flow_messages, n.loss_notices, last
            );
            if let Some(st) = &n.status {
                let at = n
                    .status_time
                    .as_ref()
                    .and_then(crate::export::convert::system_time)
                    .map_or_else(|| "?".to_string(), crate::export::ecs::rfc3339);
                let lost: u64 = st.cpus.iter().map(|c| c.lost).sum();
                t += &format!(
                    "    status at {at}: version {}, kernel {}, {} flows emitted, {} samples lost \
                     in the kernel, {} export queue drops, {} subscribers{}\n",
                    st.version,
                    st.kernel_release,
                    st.flows_received,
                    lost,
                    st.export_queue_drops,
                    st.subscribers.len(),
                    if st.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(", last error: {}", st.last_error)
                    }
                );
            }
        }
    }
    t += &format!("subscribers:     {}\n", s.subscribers.len());
    for sub in &s.subscribers {
        t += &format!(
            "  #{} {}: queue {}/{}, delivered {} in {} responses, drops {}\n",
            sub.id,
            sub.peer,
            sub.queue_depth,
            sub.queue_capacity,
            sub.delivered,
            sub.responses,
            sub.drops
        );
        if let Some(k) = &sub.sink {
            t += &format!(
                "     {} sink, {}: published {}, duplicates {}, retries {}, loss notices {}, \
                 dropped {}, rejected {}\n",
                k.kind,
                if k.connected {
                    "connected"
                } else {
                    "disconnected"
                },
                k.published,
                k.duplicates,
                k.retries,
                k.loss_notices,
                k.dropped,
                k.rejected
            );
        }
    }
    if !s.last_error.is_empty() {
        t += &format!("last error:      {}\n", s.last_error);
    }
    t
}
