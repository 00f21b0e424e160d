//! ECS rendering of flow records, shaped like Auditbeat's `system/socket`
//! documents. Pure functions, shared by `sockscope watch --format ecs` and
//! file exporters.

use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use crate::export::convert::source_destination;
use crate::model::NodeInfo;
use crate::model::{Accounting, Endpoint, FlowDirection, FlowRecord};

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
    /// The rest of the node's facts (operating system, machine id,
    /// containerized, addresses), when known.
    pub node: Option<NodeInfo>,
}

impl HostInfo {
    /// The host facts of a node named `name`.
    pub fn of_node(name: &str, node: &NodeInfo) -> HostInfo {
        let known = |s: &str| (!s.is_empty()).then(|| s.to_string());
        HostInfo {
            name: name.to_string(),
            architecture: known(&node.architecture),
            kernel: known(&node.kernel_release),
            node: Some(node.clone()),
        }
    }
}

/// ECS `agent.type` of the documents.
pub const AGENT_TYPE: &str = "sockscope";

/// ECS `host.*`: what Auditbeat's documents carry, from the node's facts.
fn host_fields(host: &HostInfo) -> Value {
    let mut h = Map::new();
    h.insert("name".into(), json!(host.name));
    h.insert("hostname".into(), json!(host.name));
    if let Some(a) = &host.architecture {
        h.insert("architecture".into(), json!(a));
    }
    let mut os = Map::new();
    if let Some(k) = &host.kernel {
        os.insert("kernel".into(), json!(k));
    }
    if let Some(n) = &host.node {
        if let Some(r) = &n.os {
            for (k, v) in [
                ("name", &r.name),
                ("version", &r.version),
                ("codename", &r.codename),
                ("platform", &r.platform),
                ("family", &r.family),
            ] {
                if !v.is_empty() {
                    os.insert(k.into(), json!(v));
                }
            }
        }
        if let Some(id) = &n.machine_id {
            h.insert("id".into(), json!(id));
        }
        h.insert("containerized".into(), json!(n.containerized));
        if !n.ip_addresses.is_empty() {
            let ips: Vec<String> = n.ip_addresses.iter().map(|a| a.to_string()).collect();
            h.insert("ip".into(), json!(ips));
        }
    }
    if !os.is_empty() {
        h.insert("os".into(), Value::Object(os));
    }
    Value::Object(h)
}

/// The node's part of every document: `host.*` and `agent.*`.
pub fn node_fields(host: &HostInfo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("host".into(), host_fields(host));
    m.insert(
        "agent".into(),
        json!({ "type": AGENT_TYPE, "version": env!("CARGO_PKG_VERSION"), "name": host.name }),
    );
    m
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
    // Not ECS: what the endpoint's TCP sequence numbers show, absent when
    // unknown or not applicable.
    if let Some(q) = &e.sequence {
        m.insert(
            "sequence_space".into(),
            json!({
                "payload_bytes": q.payload_bytes,
                "uncounted_bytes": q.uncounted_bytes,
                "from_syn": q.from_syn,
            }),
        );
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
    let mut flow =
        json!({ "final": rec.is_final, "complete": rec.complete, "id": rec.id.to_string() });
    if let Some(a) = accounting_name(rec.accounting) {
        flow["accounting"] = json!(a);
    }
    doc.insert("flow".into(), flow);
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
    super::ecs_k8s::insert_pods(
        &mut doc,
        rec.pod.as_deref(),
        rec.remote_pod.as_deref(),
        &host.name,
    );
    doc.extend(node_fields(host));
    doc.insert(
        "system".into(),
        json!({ "audit": { "socket": Value::Object(audit) } }),
    );
    doc.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    doc.insert("service".into(), json!({ "type": "system" }));
    Value::Object(doc)
}

/// `flow.accounting` when the counters are not per-packet (the default,
/// left out so per-packet documents are as they always were).
fn accounting_name(a: Accounting) -> Option<&'static str> {
    match a {
        Accounting::Packets => None,
        Accounting::SocketCounters => Some("socket_counters"),
        Accounting::Uncounted => Some("uncounted"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::export::convert;
    use crate::model::{Creds, Endpoint, ProcessInfo, Transport};
    use std::time::UNIX_EPOCH;

    pub(crate) fn record(direction: FlowDirection) -> FlowRecord {
        let start = UNIX_EPOCH + Duration::from_millis(1_566_506_795_001);
        FlowRecord {
            id: 7,
            is_final: true,
            complete: true,
            transport: Transport::Tcp,
            direction,
            local: Endpoint {
                ip: "10.0.2.15".parse().expect("ip"),
                port: 40192,
                packets: 5,
                bytes: 294,
                domain: None,
                sequence: None,
            },
            remote: Endpoint {
                ip: "151.101.66.217".parse().expect("ip"),
                port: 80,
                packets: 5,
                bytes: 437,
                domain: Some("elastic.co".into()),
                sequence: Some(crate::model::SeqSpace {
                    payload_bytes: 1200,
                    uncounted_bytes: 100,
                    from_syn: true,
                }),
            },
            start,
            end: start + Duration::from_nanos(30_728_600),
            community_id: "1:jdjL1TkdpF1v1GM0+JxRRp+V7KI=".into(),
            sock: 0xffff_8de2_9d33_7000,
            process: Some(ProcessInfo {
                pid: 4970,
                ppid: 1,
                name: "curl".into(),
                args: vec!["curl".into(), "http://elastic.co/".into()],
                executable: "/usr/bin/curl".into(),
                created: Some(start),
                creds: Some(Creds {
                    uid: 1000,
                    gid: 1000,
                    euid: 1000,
                    egid: 1000,
                }),
                user_name: Some("vagrant".into()),
                group_name: Some("vagrant".into()),
                container_id: None,
                pod_uid: None,
            }),
            accounting: Default::default(),
            pod: None,
            remote_pod: None,
        }
    }

    #[test]
    fn document_has_the_seed_shape() {
        let host = HostInfo {
            name: "stretch".into(),
            ..HostInfo::default()
        };
        let d = flow_document(&record(FlowDirection::Egress), &host);
        assert_eq!(d["source"]["ip"], "10.0.2.15");
        assert_eq!(d["source"]["port"], 40192);
        assert_eq!(d["client"], d["source"]);
        assert_eq!(d["destination"]["ip"], "151.101.66.217");
        assert_eq!(d["destination"]["domain"], "elastic.co");
        assert_eq!(
            d["destination"]["sequence_space"],
            serde_json::json!({"payload_bytes": 1200, "uncounted_bytes": 100, "from_syn": true})
        );
        assert!(
            d["source"].get("sequence_space").is_none(),
            "absent when unknown"
        );
        assert_eq!(d["server"], d["destination"]);
        assert_eq!(d["network"]["packets"], 10);
        assert_eq!(d["network"]["bytes"], 731);
        assert_eq!(d["network"]["direction"], "outbound");
        assert_eq!(d["network"]["type"], "ipv4");
        assert_eq!(d["network"]["transport"], "tcp");
        assert_eq!(d["event"]["duration"], 30_728_600);
        assert_eq!(d["event"]["start"], "2019-08-22T20:46:35.001Z");
        assert_eq!(d["event"]["action"], "network_flow");
        assert_eq!(d["user"]["id"], "1000");
        assert_eq!(d["group"]["name"], "vagrant");
        assert_eq!(d["process"]["executable"], "/usr/bin/curl");
        assert_eq!(
            d["system"]["audit"]["socket"]["kernel_sock_address"],
            "0xffff8de29d337000"
        );
        assert_eq!(d["system"]["audit"]["socket"]["egid"], 1000);
        assert_eq!(d["flow"]["final"], true);
        assert_eq!(d["host"]["name"], "stretch");
        // Ingress: the remote end is the source.
        let d = flow_document(&record(FlowDirection::Ingress), &host);
        assert_eq!(d["source"]["ip"], "151.101.66.217");
        assert_eq!(d["network"]["direction"], "inbound");
    }

    #[test]
    fn host_and_agent_come_from_the_node_facts() {
        use crate::model::OsRelease;
        let node = NodeInfo {
            hostname: "node-1".into(),
            architecture: "x86_64".into(),
            kernel_release: "6.1.0-50-cloud-amd64".into(),
            kernel_version: "#1 SMP".into(),
            os: Some(OsRelease {
                name: "Debian GNU/Linux".into(),
                version: "12 (bookworm)".into(),
                codename: "bookworm".into(),
                platform: "debian".into(),
                family: "debian".into(),
            }),
            machine_id: Some("5d3c1f2a8b9e4c7da6f50e1d2c3b4a59".into()),
            containerized: false,
            ip_addresses: vec!["10.0.2.15".parse().unwrap(), "fd00::15".parse().unwrap()],
        };
        let d = flow_document(
            &record(FlowDirection::Egress),
            &HostInfo::of_node("node-1", &node),
        );
        assert_eq!(
            d["host"],
            serde_json::json!({
                "name": "node-1", "hostname": "node-1", "architecture": "x86_64",
                "id": "5d3c1f2a8b9e4c7da6f50e1d2c3b4a59", "containerized": false,
                "ip": ["10.0.2.15", "fd00::15"],
                "os": {"kernel": "6.1.0-50-cloud-amd64", "name": "Debian GNU/Linux",
                       "version": "12 (bookworm)", "codename": "bookworm",
                       "platform": "debian", "family": "debian"},
            })
        );
        assert_eq!(d["agent"]["type"], AGENT_TYPE);
        assert_eq!(d["agent"]["name"], "node-1");
        assert_eq!(d["agent"]["version"], env!("CARGO_PKG_VERSION"));
        // Without the facts: the name only.
        let d = flow_document(
            &record(FlowDirection::Egress),
            &HostInfo {
                name: "n".into(),
                ..HostInfo::default()
            },
        );
        assert_eq!(d["host"], serde_json::json!({"name": "n", "hostname": "n"}));
        // What a client was told over the API renders the same.
        let told =
            crate::export::status::node_from_proto(&crate::export::status::node_to_proto(&node));
        assert_eq!(told, node);
    }

    #[test]
    fn proto_round_trip_renders_the_same_document() {
        let rec = record(FlowDirection::Unknown);
        let host = HostInfo {
            name: "h".into(),
            ..HostInfo::default()
        };
        let (back, host_name) =
            convert::flow_from_proto(&convert::flow(&rec, "h")).expect("round trip");
        assert_eq!(host_name, "h");
        assert_eq!(back, rec);
        assert_eq!(flow_document(&back, &host), flow_document(&rec, &host));
        // Unknown direction: the lower port (80) is the server.
        assert_eq!(flow_document(&rec, &host)["server"]["port"], 80);
    }
}
