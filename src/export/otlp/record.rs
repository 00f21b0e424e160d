//! Flow records and loss notices as OTLP log records: the ECS document of
//! a flow flattened to attributes named as ECS names its fields
//! (`source.ip`, `process.pid`, `kubernetes.pod.name`, …), and the node's
//! facts as the resource's attributes.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{Map, Value};

use crate::export::ecs::{self, HostInfo};
use crate::export::encoded::EncodedFlow;
use crate::export::proto;

/// `event_name` of a final flow record.
pub const EVENT_FLOW: &str = "sockscope.flow";
/// `event_name` of an interim record of a long flow.
pub const EVENT_FLOW_UPDATE: &str = "sockscope.flow.update";
/// `event_name` of a loss notice.
pub const EVENT_LOSS: &str = "sockscope.loss";
/// Name of the instrumentation scope of every record.
pub const SCOPE_NAME: &str = "sockscope";
/// Top-level ECS objects that describe the node, not the flow
/// ([`ecs::node_fields`]): they go to the resource, once per request,
/// instead of on every record.
const RESOURCE_OBJECTS: [&str; 2] = ["host", "agent"];

/// Nanoseconds since the epoch (0 before it).
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn string(s: impl Into<String>) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    }
}

fn key_value(key: impl Into<String>, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(value),
        ..KeyValue::default()
    }
}

/// A JSON value as an attribute value; `None` for null. Integers beyond
/// `i64` (OTLP's integer) are kept exact as strings.
fn any_value(v: &Value) -> Option<AnyValue> {
    let value = match v {
        Value::Null => return None,
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => any_value::Value::IntValue(i),
            (None, _) if n.is_u64() => any_value::Value::StringValue(n.to_string()),
            (None, Some(f)) => any_value::Value::DoubleValue(f),
            (None, None) => any_value::Value::StringValue(n.to_string()),
        },
        Value::String(s) => any_value::Value::StringValue(s.clone()),
        Value::Array(a) => any_value::Value::ArrayValue(ArrayValue {
            values: a.iter().filter_map(any_value).collect(),
        }),
        Value::Object(m) => any_value::Value::KvlistValue(KeyValueList {
            values: m
                .iter()
                .filter_map(|(k, v)| any_value(v).map(|v| key_value(k.clone(), v)))
                .collect(),
        }),
    };
    Some(AnyValue { value: Some(value) })
}

/// Appends the leaves of `obj` as attributes named by their dotted path
/// under `prefix`; arrays stay one attribute (an array value).
fn flatten(prefix: &str, obj: &Map<String, Value>, out: &mut Vec<KeyValue>) {
    for (k, v) in obj {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(m) => flatten(&key, m, out),
            other => {
                if let Some(a) = any_value(other) {
                    out.push(key_value(key, a));
                }
            }
        }
    }
}

/// A short human-readable body: `tcp 10.0.0.1:40000 -> 10.0.0.2:80`.
fn body(doc: &Map<String, Value>) -> AnyValue {
    let ep = |side: &str| {
        let e = &doc[side];
        match (&e["ip"], &e["port"]) {
            (Value::String(ip), Value::Number(p)) if ip.contains(':') => format!("[{ip}]:{p}"),
            (Value::String(ip), Value::Number(p)) => format!("{ip}:{p}"),
            _ => "?".to_string(),
        }
    };
    let transport = doc["network"]["transport"].as_str().unwrap_or("?");
    string(format!(
        "{transport} {} -> {}",
        ep("source"),
        ep("destination")
    ))
}

/// The log record of one flow record: its time is the flow's end, its
/// attributes the ECS fields of the flow (all but `host.*` and `agent.*`,
/// which are the resource's; `@timestamp` is the record's time).
pub fn flow_record(f: &EncodedFlow, host: &HostInfo, observed: SystemTime) -> LogRecord {
    let rec = &f.record;
    let Value::Object(mut doc) = ecs::flow_document(rec, host) else {
        unreachable!("an ECS document is an object")
    };
    doc.remove("@timestamp");
    for k in RESOURCE_OBJECTS {
        doc.remove(k);
    }
    let mut attributes = Vec::with_capacity(64);
    flatten("", &doc, &mut attributes);
    LogRecord {
        time_unix_nano: unix_nanos(rec.end),
        observed_time_unix_nano: unix_nanos(observed),
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".to_string(),
        body: Some(body(&doc)),
        attributes,
        event_name: if rec.is_final {
            EVENT_FLOW
        } else {
            EVENT_FLOW_UPDATE
        }
        .to_string(),
        ..LogRecord::default()
    }
}

/// Attribute name of a loss notice's count.
pub const LOSS_COUNT: &str = "sockscope.loss.count";
/// Attribute name of a loss notice's source (`LOSS_SOURCE_…` name).
pub const LOSS_SOURCE: &str = "sockscope.loss.source";
/// Attribute name of a loss notice's CPU, for per-CPU sources.
pub const LOSS_CPU: &str = "sockscope.loss.cpu";
/// Attribute names of the first and last loss's time (nanoseconds since
/// the epoch).
pub const LOSS_FIRST: &str = "sockscope.loss.first_unix_nano";
/// See [`LOSS_FIRST`].
pub const LOSS_LAST: &str = "sockscope.loss.last_unix_nano";

fn timestamp_nanos(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| {
        t.seconds
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(t.nanos))
    })
}

/// The log record of a loss notice: severity WARN, its count and source as
/// attributes.
pub fn loss_record(n: &proto::LossNotice, observed: SystemTime) -> LogRecord {
    let source = n.source().as_str_name();
    let mut attributes = vec![
        key_value(
            LOSS_COUNT,
            AnyValue {
                value: Some(any_value::Value::IntValue(
                    i64::try_from(n.count).unwrap_or(i64::MAX),
                )),
            },
        ),
        key_value(LOSS_SOURCE, string(source)),
        key_value(LOSS_FIRST, int(timestamp_nanos(&n.first))),
        key_value(LOSS_LAST, int(timestamp_nanos(&n.last))),
    ];
    if let Some(cpu) = n.cpu {
        attributes.push(key_value(LOSS_CPU, int(i64::from(cpu))));
    }
    let last = timestamp_nanos(&n.last);
    LogRecord {
        time_unix_nano: u64::try_from(last).unwrap_or(0),
        observed_time_unix_nano: unix_nanos(observed),
        severity_number: SeverityNumber::Warn as i32,
        severity_text: "WARN".to_string(),
        body: Some(string(format!("{} records lost: {source}", n.count))),
        attributes,
        event_name: EVENT_LOSS.to_string(),
        ..LogRecord::default()
    }
}

fn int(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

/// Resource attribute naming the daemon's node (`server.node_name`, else
/// the host name), as the API and the NATS subjects name it.
pub const NODE_NAME: &str = "sockscope.node.name";

/// The resource of every request: `service.*`, [`NODE_NAME`], the node's
/// ECS `host.*` (`host.name` among them) and `agent.*` fields,
/// `k8s.node.name` when given, and the configured extra attributes (which
/// win over the others).
pub fn resource(
    node: &str,
    host: &HostInfo,
    k8s_node: Option<&str>,
    extra: &std::collections::BTreeMap<String, String>,
) -> Resource {
    let mut attributes = vec![
        key_value("service.name", string("sockscope")),
        key_value("service.version", string(env!("CARGO_PKG_VERSION"))),
        key_value(NODE_NAME, string(node)),
    ];
    // The node's part of an ECS document: its host.* (host.name among
    // them) and agent.* fields.
    flatten("", &ecs::node_fields(host), &mut attributes);
    if let Some(n) = k8s_node {
        attributes.push(key_value("k8s.node.name", string(n)));
    }
    for (k, v) in extra {
        let k = k.trim();
        attributes.retain(|a| a.key != k);
        attributes.push(key_value(k, string(v.clone())));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

/// The instrumentation scope of every record.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..InstrumentationScope::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ecs::tests::record;
    use crate::model::FlowDirection;
    use std::sync::Arc;

    fn attr<'a>(r: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        r.iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn a_flow_becomes_one_record_with_ecs_attributes() {
        let rec = record(FlowDirection::Egress);
        let host = HostInfo {
            name: "node-a".into(),
            ..HostInfo::default()
        };
        let f = EncodedFlow::new(Arc::new(rec.clone()), "node-a");
        let lr = flow_record(&f, &host, UNIX_EPOCH);
        assert_eq!(lr.event_name, EVENT_FLOW);
        assert_eq!(lr.time_unix_nano, unix_nanos(rec.end));
        let doc = ecs::flow_document(&rec, &host);
        let want = |path: &str| {
            let mut v = &doc;
            for p in path.split('.') {
                v = &v[p];
            }
            any_value(v).and_then(|a| a.value)
        };
        for key in [
            "source.ip",
            "source.port",
            "destination.ip",
            "destination.bytes",
            "network.transport",
            "network.direction",
            "network.community_id",
            "process.pid",
            "process.args",
            "event.action",
            "flow.final",
            "user.id",
        ] {
            assert_eq!(attr(&lr.attributes, key), want(key).as_ref(), "{key}");
            assert!(attr(&lr.attributes, key).is_some(), "{key} missing");
        }
        for gone in ["host.name", "agent.type", "@timestamp"] {
            assert!(attr(&lr.attributes, gone).is_none(), "{gone} on the record");
        }
        let keys: std::collections::HashSet<&str> =
            lr.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys.len(), lr.attributes.len(), "a key twice");
        let body = match lr.body.and_then(|b| b.value) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("body {other:?}"),
        };
        assert!(body.starts_with("tcp "), "{body}");
    }

    #[test]
    fn numbers_beyond_i64_stay_exact() {
        let v = any_value(&serde_json::json!(u64::MAX)).and_then(|a| a.value);
        assert_eq!(v, Some(any_value::Value::StringValue(u64::MAX.to_string())));
        assert_eq!(any_value(&Value::Null), None);
    }

    #[test]
    fn loss_notices_carry_count_and_source() {
        let n = proto::LossNotice {
            source: proto::LossSource::SubscriberQueue as i32,
            cpu: None,
            count: 17,
            first: None,
            last: None,
        };
        let lr = loss_record(&n, UNIX_EPOCH);
        assert_eq!(lr.event_name, EVENT_LOSS);
        assert_eq!(lr.severity_number, SeverityNumber::Warn as i32);
        assert_eq!(
            attr(&lr.attributes, LOSS_COUNT),
            Some(&any_value::Value::IntValue(17))
        );
        assert_eq!(
            attr(&lr.attributes, LOSS_SOURCE),
            Some(&any_value::Value::StringValue(
                "LOSS_SOURCE_SUBSCRIBER_QUEUE".into()
            ))
        );
    }

    #[test]
    fn resource_names_the_node_and_extra_attributes_win() {
        let host = HostInfo {
            name: "node-a".into(),
            ..HostInfo::default()
        };
        let extra = [
            ("k8s.cluster.name".to_string(), "c1".to_string()),
            ("service.name".to_string(), "flows".to_string()),
        ]
        .into();
        let r = resource("node-a", &host, Some("node-a"), &extra);
        assert_eq!(
            attr(&r.attributes, "host.name"),
            Some(&any_value::Value::StringValue("node-a".into()))
        );
        assert_eq!(
            attr(&r.attributes, "k8s.node.name"),
            Some(&any_value::Value::StringValue("node-a".into()))
        );
        assert_eq!(
            attr(&r.attributes, "k8s.cluster.name"),
            Some(&any_value::Value::StringValue("c1".into()))
        );
        assert_eq!(
            attr(&r.attributes, "service.name"),
            Some(&any_value::Value::StringValue("flows".into()))
        );
        assert_eq!(
            r.attributes
                .iter()
                .filter(|a| a.key == "service.name")
                .count(),
            1
        );
    }
}
