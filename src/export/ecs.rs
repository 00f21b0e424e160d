//! ECS rendering of flow records, shaped like Auditbeat's `system/socket`
//! documents. Pure functions, shared by `sockscope watch --format ecs` and
//! file exporters.

use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use crate::export::convert::source_destination;
use crate::model::{Endpoint, FlowDirection, FlowRecord};

/// ECS version the documents follow.
pub const ECS_VERSION: &str = "1.0.1";

/// Host facts added to every document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// Host name.
    pub name: String,
    /// CPU architecture (e.g. `x86_64`), when known.
    pub architecture: Option<String>,
    /// Kernel release, when known.
    pub kernel: Option<String>,
}

/// RFC 3339 UTC time with millisecond precision, as Auditbeat prints it.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn endpoint(e: &Endpoint) -> Value {
    let mut m = Map::new();
    m.insert("ip".into(), json!(e.ip.to_string()));
    m.insert("port".into(), json!(e.port));
    m.insert("packets".into(), json!(e.packets));
    m.insert("bytes".into(), json!(e.bytes));
    if let Some(d) = &e.domain {
        m.insert("domain".into(), json!(d));
    }
    Value::Object(m)
}

/// ECS `network.direction` of a flow (Auditbeat's host-centric values).
pub fn ecs_direction(d: FlowDirection) -> &'static str {
    match d {
        FlowDirection::Egress => "outbound",
        FlowDirection::Ingress => "inbound",
        FlowDirection::Unknown => "unknown",
    }
}

/// Renders one flow record as an ECS document.
pub fn flow_document(rec: &FlowRecord, host: &HostInfo) -> Value {
    let (src, dst) = source_destination(rec);
    let duration = rec.end.duration_since(rec.start).unwrap_or(Duration::ZERO);
    let mut doc = Map::new();
    doc.insert("@timestamp".into(), json!(rfc3339(rec.end)));
    doc.insert("source".into(), endpoint(src));
    doc.insert("destination".into(), endpoint(dst));
    doc.insert("client".into(), endpoint(src));
    doc.insert("server".into(), endpoint(dst));
    doc.insert(
        "network".into(),
        json!({
            "transport": rec.transport.as_str(),
            "type": rec.network_type(),
            "direction": ecs_direction(rec.direction),
            "community_id": rec.community_id,
            "packets": rec.local.packets.saturating_add(rec.remote.packets),
            "bytes": rec.local.bytes.saturating_add(rec.remote.bytes),
        }),
    );
    doc.insert(
        "event".into(),
        json!({
            "kind": "event",
            "category": "network",
            "action": "network_flow",
            "module": "system",
            "dataset": "socket",
            "start": rfc3339(rec.start),
            "end": rfc3339(rec.end),
            "duration": u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
        }),
    );
    doc.insert(
        "flow".into(),
        json!({ "final": rec.is_final, "complete": rec.complete, "id": rec.id.to_string() }),
    );
    let mut audit = Map::new();
    audit.insert(
        "kernel_sock_address".into(),
        json!(format!("{:#x}", rec.sock)),
    );
    if let Some(p) = &rec.process {
        let mut proc = Map::new();
        proc.insert("pid".into(), json!(p.pid));
        if p.ppid != 0 {
            proc.insert("ppid".into(), json!(p.ppid));
        }
        if !p.name.is_empty() {
            proc.insert("name".into(), json!(p.name));
        }
        if !p.args.is_empty() {
            proc.insert("args".into(), json!(p.args));
        }
        if !p.executable.is_empty() {
            proc.insert("executable".into(), json!(p.executable));
        }
        if let Some(c) = p.created {
            proc.insert("created".into(), json!(rfc3339(c)));
        }
        doc.insert("process".into(), Value::Object(proc));
        if let Some(c) = p.creds {
            let mut user = json!({ "id": c.uid.to_string() });
            if let Some(n) = &p.user_name {
                user["name"] = json!(n);
            }
            let mut group = json!({ "id": c.gid.to_string() });
            if let Some(n) = &p.group_name {
                group["name"] = json!(n);
            }
            doc.insert("user".into(), user);
            doc.insert("group".into(), group);
            audit.insert("uid".into(), json!(c.uid));
            audit.insert("gid".into(), json!(c.gid));
            audit.insert("euid".into(), json!(c.euid));
            audit.insert("egid".into(), json!(c.egid));
        }
        if let Some(id) = &p.container_id {
            doc.insert("container".into(), json!({ "id": id }));
        }
        if let Some(uid) = &p.pod_uid {
            doc.insert(
                "orchestrator".into(),
                json!({ "resource": { "type": "pod", "id": uid } }),
            );
        }
    }
    let mut h = Map::new();
    h.insert("name".into(), json!(host.name));
    h.insert("hostname".into(), json!(host.name));
    if let Some(a) = &host.architecture {
        h.insert("architecture".into(), json!(a));
    }
    if let Some(k) = &host.kernel {
        h.insert("os".into(), json!({ "kernel": k }));
    }
    doc.insert("host".into(), Value::Object(h));
    doc.insert(
        "system".into(),
        json!({ "audit": { "socket": Value::Object(audit) } }),
    );
    doc.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    doc.insert("service".into(), json!({ "type": "system" }));
    Value::Object(doc)
}
