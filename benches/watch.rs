//! What `sockscope watch --format json` spends per record: a final TCP
//! record with its process, rendered as proto3 JSON by reflection (through
//! a JSON value tree, and serialized straight to bytes) and by the direct
//! writer `watch` uses (`export::watch_json`).

use std::time::{Duration, SystemTime};

use criterion::{black_box, Criterion};
use sockscope::export::client;
use sockscope::export::convert;
use sockscope::export::proto;
use sockscope::export::proto::stream_flows_response::Event;
use sockscope::model::{Creds, Endpoint, FlowDirection, FlowRecord, ProcessInfo, Transport};

const NAME: &str = "sockscope.v1.StreamFlowsResponse";

fn response() -> proto::StreamFlowsResponse {
    let now = SystemTime::now();
    let rec = FlowRecord {
        id: 123_456,
        is_final: true,
        complete: true,
        transport: Transport::Tcp,
        direction: FlowDirection::Egress,
        local: Endpoint {
            ip: "10.0.0.1".parse().expect("ip"),
            port: 40_000,
            packets: 6,
            bytes: 3312,
            domain: None,
            sequence: None,
        },
        remote: Endpoint {
            ip: "10.0.0.2".parse().expect("ip"),
            port: 80,
            packets: 4,
            bytes: 1420,
            domain: Some("example.org".into()),
            sequence: None,
        },
        start: now - Duration::from_millis(3),
        end: now,
        community_id: "1:LQU9qZlK+B5F3KDmev6m5PMibrg=".into(),
        sock: 0xffff_8880_0123_4000,
        process: Some(ProcessInfo {
            pid: 4242,
            ppid: 1,
            name: "curl".into(),
            args: vec!["curl".into(), "http://example.org/".into()],
            executable: "/usr/bin/curl".into(),
            created: Some(now - Duration::from_secs(1)),
            creds: Some(Creds {
                uid: 1000,
                gid: 1000,
                euid: 1000,
                egid: 1000,
            }),
            user_name: Some("alice".into()),
            group_name: Some("alice".into()),
            container_id: None,
            pod_uid: None,
        }),
        accounting: Default::default(),
        pod: None,
        remote_pod: None,
    };
    proto::StreamFlowsResponse {
        event: Some(Event::Flow(convert::flow(&rec, "node-1"))),
        node_name: "node-1".into(),
        time: Some(prost_types::Timestamp::from(now)),
        sequence: 99,
        ..Default::default()
    }
}

fn main() {
    let resp = response();
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("watch_json/value_tree", |b| {
        b.iter(|| {
            let v = client::proto_json(black_box(&resp), NAME).expect("json");
            black_box(v.to_string())
        })
    });
    let mut line = Vec::new();
    c.bench_function("watch_json/direct", |b| {
        b.iter(|| {
            client::proto_json_line(black_box(&resp), NAME, &mut line).expect("json");
            black_box(line.len())
        })
    });
    let mut direct = Vec::new();
    c.bench_function("watch_json/generated", |b| {
        b.iter(|| {
            sockscope::export::watch_json::response_line(black_box(&resp), &mut direct);
            black_box(direct.len())
        })
    });
    c.final_summary();
}
