//! In-process tests of the gRPC server: a real server on an ephemeral TCP
//! port and a Unix socket in a temporary directory, fed through the
//! pipeline channel, queried with tonic clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use sockscope::config::Config;
use sockscope::export::client::{self, ServerAddr};
use sockscope::export::hub::{Hub, HubOptions, SubscribeRequest};
use sockscope::export::proto;
use sockscope::export::proto::stream_flows_response::Event;
use sockscope::export::status::EmptyStatus;
use sockscope::export::{self as export, HealthHandle, PipelineSender, ServerOptions};
use sockscope::model::{
    Creds, Endpoint, FlowDirection, FlowRecord, Loss, LossSource, Output, ProcessInfo, Transport,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);

struct TestServer {
    tcp: SocketAddr,
    unix: std::path::PathBuf,
    tx: PipelineSender,
    health: HealthHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_with(f: impl FnOnce(&mut ServerOptions)) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.unix_socket = dir.path().join("sub/sockscope.sock").display().to_string();
    cfg.server.history_size = 100;
    cfg.server.subscriber_queue_size = 1000;
    cfg.server.node_name = Some("test-node".into());
    let mut opts = ServerOptions::from_config(&cfg).expect("options");
    f(&mut opts);
    let listeners = export::bind(&opts).await.expect("bind");
    let tcp = listeners.tcp_addr().expect("tcp addr");
    let unix = listeners.unix_path().expect("unix path").to_path_buf();
    let (tx, rx) = export::pipeline_channel(10_000);
    let health = HealthHandle::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = health.clone();
    tokio::spawn(async move {
        let r = export::serve(
            listeners,
            opts,
            rx,
            Arc::new(EmptyStatus::default()),
            h,
            async move {
                let _ = stop_rx.await;
            },
        )
        .await;
        r.expect("serve");
    });
    TestServer {
        tcp,
        unix,
        tx,
        health,
        _stop: stop_tx,
        _dir: dir,
    }
}

async fn start() -> TestServer {
    start_with(|_| {}).await
}

async fn channel(s: &TestServer) -> Channel {
    client::connect(&ServerAddr::Tcp(s.tcp.to_string()))
        .await
        .expect("connect")
}

struct Rec {
    id: u64,
    local: &'static str,
    remote: &'static str,
    transport: Transport,
    direction: FlowDirection,
    pid: u32,
    name: &'static str,
    uid: u32,
    is_final: bool,
    end_ago: Duration,
    domain: Option<&'static str>,
    container: Option<&'static str>,
}

impl Default for Rec {
    fn default() -> Self {
        Rec {
            id: 1,
            local: "10.0.0.1:40000",
            remote: "93.184.216.34:443",
            transport: Transport::Tcp,
            direction: FlowDirection::Egress,
            pid: 100,
            name: "curl",
            uid: 1000,
            is_final: true,
            end_ago: Duration::ZERO,
            domain: None,
            container: None,
        }
    }
}

fn record(r: Rec) -> Output {
    let local: SocketAddr = r.local.parse().expect("local");
    let remote: SocketAddr = r.remote.parse().expect("remote");
    let end = SystemTime::now() - r.end_ago;
    let ep = |a: SocketAddr, n: u64, d: Option<&str>| Endpoint {
        ip: a.ip(),
        port: a.port(),
        packets: n,
        bytes: n * 100,
        domain: d.map(str::to_string),
        sequence: None,
    };
    Output::Flow(Arc::new(FlowRecord {
        id: r.id,
        is_final: r.is_final,
        complete: true,
        transport: r.transport,
        direction: r.direction,
        local: ep(local, 3, None),
        remote: ep(remote, 5, r.domain),
        start: end - Duration::from_millis(30),
        end,
        community_id: "1:test".into(),
        sock: 0xffff_8de2_9d33_7000,
        process: Some(ProcessInfo {
            pid: r.pid,
            ppid: 1,
            name: r.name.into(),
            args: vec![r.name.into(), "arg".into()],
            executable: format!("/usr/bin/{}", r.name),
            created: Some(end - Duration::from_secs(1)),
            creds: Some(Creds {
                uid: r.uid,
                gid: r.uid,
                euid: r.uid,
                egid: r.uid,
            }),
            user_name: Some(format!("user{}", r.uid)),
            group_name: Some(format!("group{}", r.uid)),
            container_id: r.container.map(str::to_string),
            pod_uid: None,
        }),
        accounting: Default::default(),
        pod: None,
        remote_pod: None,
    }))
}

fn send(s: &TestServer, out: Output) {
    assert!(s.tx.send(out), "pipeline channel refused an output");
}

/// Sends one default flow per id.
fn send_ids(s: &TestServer, ids: std::ops::RangeInclusive<u64>) {
    for id in ids {
        send(
            s,
            record(Rec {
                id,
                ..Rec::default()
            }),
        );
    }
}

/// Collects flows ids (and loss notices) until `n` flows arrived.
async fn collect_ids(
    stream: &mut tonic::Streaming<proto::StreamFlowsResponse>,
    n: usize,
) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let item = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("timed out waiting for flows")
            .expect("stream ended early")
            .expect("stream error");
        if let Some(Event::Flow(f)) = item.event {
            ids.push(f.id);
        }
    }
    ids
}

/// Reads the whole (finite) stream and returns the flow ids.
async fn drain_ids(stream: &mut tonic::Streaming<proto::StreamFlowsResponse>) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        let item = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("timed out waiting for end of stream");
        match item {
            None => return ids,
            Some(r) => {
                if let Some(Event::Flow(f)) = r.expect("stream error").event {
                    ids.push(f.id);
                }
            }
        }
    }
}

/// Waits until the history holds `n` flows (outputs are asynchronous).
async fn wait_history(ch: &Channel, n: u64) {
    let mut c = client::flow_client(ch.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = c
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if st.history_occupancy >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_subscribers(ch: &Channel, n: usize) {
    let mut c = client::flow_client(ch.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = c
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if st.subscribers.len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriber count stayed {} (want {n})",
            st.subscribers.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn replay(number: u64) -> proto::StreamFlowsRequest {
    proto::StreamFlowsRequest {
        number,
        ..Default::default()
    }
}

fn seed_mixed(s: &TestServer) {
    send(
        s,
        record(Rec {
            id: 1,
            ..Rec::default()
        }),
    );
    send(
        s,
        record(Rec {
            id: 2,
            transport: Transport::Udp,
            remote: "10.1.2.3:53",
            name: "dig",
            pid: 200,
            ..Rec::default()
        }),
    );
    send(
        s,
        record(Rec {
            id: 3,
            local: "[fd00::1]:22",
            remote: "[fd00::2]:51000",
            direction: FlowDirection::Ingress,
            name: "sshd",
            pid: 300,
            uid: 0,
            ..Rec::default()
        }),
    );
    send(
        s,
        record(Rec {
            id: 4,
            remote: "10.9.9.9:8080",
            domain: Some("api.example.com"),
            container: Some("0123456789abcdef0123"),
            ..Rec::default()
        }),
    );
    send(
        s,
        record(Rec {
            id: 5,
            local: "10.0.0.1:5353",
            remote: "10.0.0.7:40001",
            direction: FlowDirection::Unknown,
            transport: Transport::Udp,
            name: "avahi",
            pid: 500,
            ..Rec::default()
        }),
    );
}

async fn ids_for(
    ch: &Channel,
    allow: Vec<proto::FlowFilter>,
    deny: Vec<proto::FlowFilter>,
) -> Vec<u64> {
    let mut c = client::flow_client(ch.clone());
    let mut s = c
        .stream_flows(proto::StreamFlowsRequest {
            number: 100,
            allow,
            deny,
            ..Default::default()
        })
        .await
        .expect("stream_flows")
        .into_inner();
    drain_ids(&mut s).await
}

#[tokio::test]
async fn filters_allow_deny_combinations() {
    let s = start().await;
    seed_mixed(&s);
    let ch = channel(&s).await;
    wait_history(&ch, 5).await;
    let f = proto::FlowFilter::default;
    assert_eq!(ids_for(&ch, vec![], vec![]).await, vec![1, 2, 3, 4, 5]);
    // transport
    let udp = proto::FlowFilter {
        transport: vec![proto::Transport::Udp as i32],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![udp.clone()], vec![]).await, vec![2, 5]);
    assert_eq!(ids_for(&ch, vec![], vec![udp.clone()]).await, vec![1, 3, 4]);
    // OR between filters
    let ssh = proto::FlowFilter {
        process_name: vec!["sshd".into()],
        ..f()
    };
    assert_eq!(
        ids_for(&ch, vec![udp.clone(), ssh.clone()], vec![]).await,
        vec![2, 3, 5]
    );
    // AND inside one filter: udp and port 53
    let udp53 = proto::FlowFilter {
        transport: vec![proto::Transport::Udp as i32],
        port: vec![53],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![udp53], vec![]).await, vec![2]);
    // CIDR any side, source and destination (ingress: source is remote)
    let net = proto::FlowFilter {
        ip: vec!["fd00::/64".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![net], vec![]).await, vec![3]);
    let src = proto::FlowFilter {
        source_ip: vec!["fd00::2".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![src], vec![]).await, vec![3]);
    let dst_port = proto::FlowFilter {
        destination_port: vec![22, 5353],
        ..f()
    };
    // id 5: unknown direction, lower port 5353 is the server side.
    assert_eq!(ids_for(&ch, vec![dst_port], vec![]).await, vec![3, 5]);
    let dst = proto::FlowFilter {
        destination_ip: vec!["10.0.0.0/8".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![dst.clone()], vec![]).await, vec![2, 4, 5]);
    // allow + deny
    assert_eq!(ids_for(&ch, vec![dst], vec![udp]).await, vec![4]);
    // ip version, direction, pid, uid, user, executable, domain, container
    let v6 = proto::FlowFilter {
        ip_version: vec![proto::IpVersion::Ipv6 as i32],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![v6], vec![]).await, vec![3]);
    let ingress = proto::FlowFilter {
        direction: vec![
            proto::Direction::Ingress as i32,
            proto::Direction::Unknown as i32,
        ],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![ingress], vec![]).await, vec![3, 5]);
    let pid = proto::FlowFilter {
        pid: vec![200, 500],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![pid], vec![]).await, vec![2, 5]);
    let root = proto::FlowFilter {
        uid: vec![0],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![root], vec![]).await, vec![3]);
    let user = proto::FlowFilter {
        user_name: vec!["user0".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![], vec![user]).await, vec![1, 2, 4, 5]);
    let exe = proto::FlowFilter {
        executable: vec!["/usr/bin/dig".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![exe], vec![]).await, vec![2]);
    let dom = proto::FlowFilter {
        domain: vec!["*.example.com".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![dom], vec![]).await, vec![4]);
    let dom_exact = proto::FlowFilter {
        domain: vec!["example.com".into()],
        ..f()
    };
    assert_eq!(
        ids_for(&ch, vec![dom_exact], vec![]).await,
        Vec::<u64>::new()
    );
    let ctr = proto::FlowFilter {
        container_id: vec!["0123456789ab".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![ctr], vec![]).await, vec![4]);
    let short = proto::FlowFilter {
        container_id: vec!["0123".into()],
        ..f()
    };
    assert_eq!(ids_for(&ch, vec![short], vec![]).await, Vec::<u64>::new());
}

#[tokio::test]
async fn replay_number_since_until() {
    let s = start().await;
    for id in 1..=10u64 {
        send(
            &s,
            record(Rec {
                id,
                end_ago: Duration::from_secs(100 - id * 10),
                ..Rec::default()
            }),
        );
    }
    // Interim records are never kept in history.
    send(
        &s,
        record(Rec {
            id: 99,
            is_final: false,
            ..Rec::default()
        }),
    );
    let ch = channel(&s).await;
    wait_history(&ch, 10).await;
    let mut c = client::flow_client(ch.clone());
    let mut st = c
        .stream_flows(replay(3))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(drain_ids(&mut st).await, vec![8, 9, 10]);
    let mut st = c
        .stream_flows(replay(0))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(drain_ids(&mut st).await, Vec::<u64>::new());
    // ends were 90s ago (id 1) .. 0s ago (id 10); since 45 s ago → ids 6..=10,
    // until 15 s ago → ids ..=8.
    let now = SystemTime::now();
    let ts = |ago: u64| {
        Some(sockscope::export::convert::timestamp(
            now - Duration::from_secs(ago),
        ))
    };
    let req = proto::StreamFlowsRequest {
        since: ts(45),
        until: ts(15),
        ..Default::default()
    };
    let mut st = c.stream_flows(req).await.expect("since").into_inner();
    assert_eq!(drain_ids(&mut st).await, vec![6, 7, 8]);
    // until in the past ends the stream even with follow
    let req = proto::StreamFlowsRequest {
        number: 2,
        until: ts(15),
        follow: true,
        ..Default::default()
    };
    let mut st = c.stream_flows(req).await.expect("until").into_inner();
    assert_eq!(drain_ids(&mut st).await, vec![7, 8]);
}

#[tokio::test]
async fn follow_with_and_without_updates() {
    let s = start().await;
    let ch = channel(&s).await;
    let mut c = client::flow_client(ch.clone());
    let follow = |updates| proto::StreamFlowsRequest {
        follow: true,
        include_updates: updates,
        ..Default::default()
    };
    let mut plain = c
        .stream_flows(follow(false))
        .await
        .expect("follow")
        .into_inner();
    let mut upd = c
        .stream_flows(follow(true))
        .await
        .expect("follow")
        .into_inner();
    wait_subscribers(&ch, 2).await;
    send(
        &s,
        record(Rec {
            id: 1,
            is_final: false,
            ..Rec::default()
        }),
    );
    send(
        &s,
        record(Rec {
            id: 1,
            ..Rec::default()
        }),
    );
    send(
        &s,
        record(Rec {
            id: 2,
            ..Rec::default()
        }),
    );
    assert_eq!(collect_ids(&mut plain, 2).await, vec![1, 2]);
    let mut finals = Vec::new();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let r = tokio::time::timeout(WAIT, upd.next())
            .await
            .expect("timeout")
            .expect("end")
            .expect("error");
        assert_eq!(r.node_name, "test-node");
        assert!(r.time.is_some());
        seqs.push(r.sequence);
        if let Some(Event::Flow(f)) = r.event {
            finals.push((f.id, f.r#final));
            assert_eq!(f.source.as_ref().map(|e| e.port), Some(40000));
            assert_eq!(f.server.as_ref().map(|e| e.port), Some(443));
            assert_eq!(f.kernel_sock_address, "0xffff8de29d337000");
        }
    }
    assert_eq!(finals, vec![(1, false), (1, true), (2, true)]);
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test]
async fn loss_notices_are_coalesced_per_source_and_cpu() {
    let s = start().await;
    let ch = channel(&s).await;
    let mut c = client::flow_client(ch.clone());
    let mut st = c
        .stream_flows(proto::StreamFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    wait_subscribers(&ch, 1).await;
    let loss = |cpu, count| {
        let now = SystemTime::now();
        Output::Loss(Loss {
            source: LossSource::KernelRing,
            cpu: Some(cpu),
            count,
            first: now,
            last: now,
        })
    };
    // Read concurrently; spacing is checked on the server's envelope time.
    let reader = tokio::spawn(async move {
        let mut totals = [0u64; 2];
        let mut sent: [Vec<SystemTime>; 2] = [vec![], vec![]];
        while totals != [20, 10] {
            let r = tokio::time::timeout(WAIT, st.next())
                .await
                .unwrap_or_else(|_| panic!("timed out; totals so far {totals:?}"))
                .expect("end")
                .expect("error");
            let Some(Event::Loss(l)) = r.event else {
                panic!("unexpected event {r:?}")
            };
            assert_eq!(l.source, proto::LossSource::KernelRing as i32);
            let cpu = l.cpu.expect("cpu") as usize;
            totals[cpu] += l.count;
            let t = |x: &Option<prost_types::Timestamp>| x.as_ref().map(|t| (t.seconds, t.nanos));
            assert!(t(&l.first) <= t(&l.last));
            sent[cpu].push(
                sockscope::export::convert::system_time(&r.time.expect("time")).expect("time"),
            );
        }
        sent
    });
    // 20 losses on cpu 0 and 10 on cpu 1 over ~1.5 s.
    for i in 0..20u64 {
        send(&s, loss(0, 1));
        if i % 2 == 0 {
            send(&s, loss(1, 1));
        }
        tokio::time::sleep(Duration::from_millis(75)).await;
    }
    let arrivals = reader.await.expect("reader");
    for a in &arrivals {
        // 1.5 s of losses: coalesced into a few notices, not one per loss.
        assert!(a.len() <= 4, "{} notices", a.len());
        assert!(a.len() >= 2, "losses over 1.5 s were not reported early");
        for w in a.windows(2) {
            let gap = w[1].duration_since(w[0]).unwrap_or_default();
            assert!(gap >= Duration::from_millis(990), "notices {gap:?} apart");
        }
    }
}

#[tokio::test]
async fn slow_subscriber_gets_drops_in_band_then_resource_exhausted() {
    let (tx, rx) = export::pipeline_channel(10_000);
    let mut opts = HubOptions::new(10, 4, "n");
    opts.slow_seconds = 2;
    opts.slow_drop_ratio = 0.5;
    let (hub, _task) = Hub::spawn(opts, rx);
    let sub = |follow| SubscribeRequest {
        follow,
        peer: "test".into(),
        ..Default::default()
    };
    let mut slow = hub.subscribe(sub(true)).await.expect("slow");
    let mut fast = hub.subscribe(sub(true)).await.expect("fast");
    // Phase 1: 20 flows; the slow one (not reading) keeps 4 and drops 16,
    // the fast one (reading concurrently) gets all.
    let (fast_tx, mut fast_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(w)) = fast.next().await {
            if let Some(sockscope::export::encoded::Payload::Flow(f)) = w.payload {
                if fast_tx.send(f.record.id).is_err() {
                    return;
                }
            }
        }
    });
    for id in 1..=20 {
        assert!(tx.send(record(Rec {
            id,
            ..Rec::default()
        })));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let id = tokio::time::timeout(WAIT, fast_rx.recv())
            .await
            .expect("fast timeout")
            .expect("fast ended");
        got.push(id);
    }
    assert_eq!(
        got,
        (1..=20).collect::<Vec<_>>(),
        "fast subscriber was affected"
    );
    // The slow one reads now: 4 flows, then an in-band SUBSCRIBER_QUEUE loss of 16.
    let mut flows = Vec::new();
    let mut lost = 0;
    while lost == 0 {
        let w = tokio::time::timeout(WAIT, slow.next())
            .await
            .expect("slow timeout")
            .expect("slow ended")
            .expect("slow error");
        match w.payload {
            Some(sockscope::export::encoded::Payload::Flow(f)) => flows.push(f.record.id),
            Some(sockscope::export::encoded::Payload::Loss(l)) => {
                assert_eq!(l.source, proto::LossSource::SubscriberQueue as i32);
                lost = l.count;
            }
            None => panic!("empty payload"),
        }
    }
    assert_eq!(flows, vec![1, 2, 3, 4]);
    assert_eq!(lost, 16);
    // Phase 2: it stops reading and keeps dropping → closed.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut id = 100;
    // Phase-2 flows offered while the hub still listed it.
    let mut offered_before_close = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow subscriber never closed"
        );
        // Paced so the reading subscriber keeps up while the other drops.
        for _ in 0..20 {
            id += 1;
            tx.send(record(Rec {
                id,
                ..Rec::default()
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while fast_rx.try_recv().is_ok() {}
        let st = hub.status().await.expect("status");
        if st.subscribers.len() == 1 {
            break;
        }
        offered_before_close = id - 100;
    }
    // Closed: what was dropped or still queued arrives as SUBSCRIBER_QUEUE
    // notices, then the error.
    let mut told = 0;
    let status = loop {
        let r = tokio::time::timeout(WAIT, slow.next())
            .await
            .expect("timeout")
            .expect("stream ended without a status");
        match r {
            Ok(w) => match w.payload {
                Some(sockscope::export::encoded::Payload::Loss(l)) => {
                    assert_eq!(l.source, proto::LossSource::SubscriberQueue as i32);
                    told += l.count;
                }
                other => panic!("after the close: {other:?}"),
            },
            Err(status) => break status,
        }
    };
    assert!(
        (offered_before_close..=id - 100).contains(&told),
        "told {told} of {offered_before_close}..={} offered",
        id - 100
    );
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("too slow"),
        "{}",
        status.message()
    );
    assert!(
        slow.next().await.is_none(),
        "stream continued after the error"
    );
}

#[tokio::test]
async fn slow_grpc_client_is_closed_with_resource_exhausted() {
    let s = start_with(|o| {
        o.hub.queue_size = 2;
        o.hub.slow_seconds = 1;
        o.hub.slow_drop_ratio = 0.1;
    })
    .await;
    let ch = channel(&s).await;
    let mut c = client::flow_client(ch.clone());
    let mut st = c
        .stream_flows(proto::StreamFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    wait_subscribers(&ch, 1).await;
    // Far more than the HTTP/2 windows hold, without reading.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut id = 0;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        for _ in 0..2000 {
            id += 1;
            s.tx.send(record(Rec {
                id,
                ..Rec::default()
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = client::flow_client(ch.clone())
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .subscribers
            .len();
        if n == 0 {
            break;
        }
    }
    let err = loop {
        match tokio::time::timeout(WAIT, st.next())
            .await
            .expect("timeout")
        {
            Some(Ok(_)) => {}
            Some(Err(e)) => break e,
            None => panic!("stream ended without status"),
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
}

/// What one stream received before it ended.
#[derive(Debug, Default)]
struct Received {
    flows: u64,
    told: u64,
    /// Flows per response, largest seen.
    most_packed: usize,
}

/// Reads a stream to its end, `pause` after each response, checking that
/// sequence numbers count envelopes.
async fn receive(
    mut st: tonic::Streaming<proto::StreamFlowsResponse>,
    pause: Duration,
) -> Received {
    let mut got = Received::default();
    let mut sequence = 0;
    loop {
        let r = tokio::time::timeout(WAIT, st.next())
            .await
            .unwrap_or_else(|_| panic!("timed out; so far {got:?}"));
        let Some(r) = r else { return got };
        let r = r.expect("stream error");
        sequence += 1;
        assert_eq!(r.sequence, sequence, "sequence counts envelopes");
        match r.event {
            Some(Event::Flow(_)) => got.flows += 1,
            Some(Event::Loss(l)) => got.told += l.count,
            None => {}
        }
        got.flows += r.flows.len() as u64;
        got.most_packed = got.most_packed.max(r.flows.len());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_the_responses_each_stream_produced() {
    const FLOWS: u64 = 600;
    const BURST: u64 = 100;
    let TestServer {
        tcp,
        tx,
        _stop,
        _dir,
        ..
    } = start_with(|_| {}).await;
    let ch = client::connect(&ServerAddr::Tcp(tcp.to_string()))
        .await
        .expect("connect");
    let mut c = client::flow_client(ch.clone());
    let mut st = c
        .stream_flows(proto::StreamFlowsRequest {
            follow: true,
            max_flows_per_response: client::FLOWS_PER_RESPONSE,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    wait_subscribers(&ch, 1).await;
    for id in 1..=FLOWS {
        assert!(tx.send(record(Rec {
            id,
            ..Rec::default()
        })));
        if id % BURST == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (mut flows, mut envelopes) = (0u64, 0u64);
    while flows < FLOWS {
        let r = tokio::time::timeout(WAIT, st.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("stream error");
        envelopes += 1;
        flows += r.flows.len() as u64 + u64::from(matches!(r.event, Some(Event::Flow(_))));
    }
    assert_eq!(flows, FLOWS);
    let status = c
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let sub = &status.subscribers[0];
    assert_eq!(sub.delivered, FLOWS, "{sub:?}");
    assert_eq!(
        sub.responses, envelopes,
        "the stream's responses as the client counted them: {sub:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offered_flow_is_delivered_or_told() {
    const FLOWS: u64 = 4000;
    const BURST: u64 = 100;
    const SMALL_WINDOW: u32 = 16 * 1024;
    let TestServer {
        tcp,
        tx,
        _stop,
        _dir,
        ..
    } = start_with(|o| {
        o.hub.queue_size = 1024;
        // Only the accounting is under test, not the closing policy.
        o.hub.slow_seconds = 0;
    })
    .await;
    let ch = client::connect(&ServerAddr::Tcp(tcp.to_string()))
        .await
        .expect("connect");
    // The slow reader's HTTP/2 window holds a few dozen flows, not
    // megabytes, so its own queue overflows.
    let small_window = tonic::transport::Endpoint::from_shared(format!("http://{tcp}"))
        .expect("endpoint")
        .initial_stream_window_size(SMALL_WINDOW)
        .initial_connection_window_size(SMALL_WINDOW)
        .connect()
        .await
        .expect("connect");
    let open = |ch: &Channel, max_flows_per_response| {
        let mut c = client::flow_client(ch.clone());
        async move {
            c.stream_flows(proto::StreamFlowsRequest {
                follow: true,
                max_flows_per_response,
                ..Default::default()
            })
            .await
            .expect("follow")
            .into_inner()
        }
    };
    // One flow per response (the original shape), reading far slower than
    // the flows come; and a packing reader that keeps up.
    let slow = tokio::spawn(receive(
        open(&small_window, 0).await,
        Duration::from_millis(2),
    ));
    let fast = tokio::spawn(receive(
        open(&ch, client::FLOWS_PER_RESPONSE).await,
        Duration::ZERO,
    ));
    wait_subscribers(&ch, 2).await;
    for id in 1..=FLOWS {
        assert!(
            tx.send(record(Rec {
                id,
                ..Rec::default()
            })),
            "pipeline channel refused flow {id}"
        );
        if id % BURST == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The pipeline ends: both streams end after their last notices.
    drop(tx);
    let slow = slow.await.expect("slow reader");
    let fast = fast.await.expect("fast reader");
    assert!(slow.told > 0, "the slow reader lost nothing: {slow:?}");
    assert_eq!(slow.flows + slow.told, FLOWS, "slow reader: {slow:?}");
    assert_eq!((fast.flows, fast.told), (FLOWS, 0), "fast reader: {fast:?}");
    assert_eq!(
        slow.most_packed, 0,
        "packed flows for a client that did not ask"
    );
    assert!(
        (1..=client::FLOWS_PER_RESPONSE as usize).contains(&fast.most_packed),
        "fast reader: {fast:?}"
    );
}

#[tokio::test]
async fn flows_are_packed_up_to_the_bound_and_notices_keep_their_place() {
    use sockscope::export::encoded::Payload;
    use sockscope::export::hub::MAX_FLOWS_PER_RESPONSE;
    let (tx, rx) = export::pipeline_channel(10_000);
    let (hub, _task) = Hub::spawn(HubOptions::new(10, 1000, "n"), rx);
    let mut sub = hub
        .subscribe(SubscribeRequest {
            follow: true,
            // More than the server packs.
            max_flows_per_response: 1000,
            ..Default::default()
        })
        .await
        .expect("subscribe");
    let flows = |from: u64| {
        for id in from..from + 100 {
            assert!(tx.send(record(Rec {
                id,
                ..Rec::default()
            })));
        }
    };
    flows(1);
    let now = SystemTime::now();
    assert!(tx.send(Output::Loss(Loss {
        source: LossSource::KernelRing,
        cpu: Some(1),
        count: 7,
        first: now,
        last: now,
    })));
    flows(101);
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.status().await.expect("status").subscribers[0].queue_depth < 201 {
        assert!(tokio::time::Instant::now() < deadline, "flows never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tx);
    let mut shapes = Vec::new();
    let mut ids = Vec::new();
    while let Some(w) = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("timeout")
    {
        let w = w.expect("status");
        assert_eq!(
            w.sequence,
            shapes.len() as u64 + 1,
            "sequence counts envelopes"
        );
        match w.payload {
            Some(Payload::Loss(l)) => shapes.push(format!("loss {}", l.count)),
            Some(Payload::Flow(_)) => panic!("a single flow for a packing stream"),
            None => shapes.push(w.flows.len().to_string()),
        }
        ids.extend(w.flows.iter().map(|f| f.record.id));
    }
    let m = MAX_FLOWS_PER_RESPONSE;
    let want = [m.to_string(), (100 - m).to_string(), "loss 7".into()];
    assert_eq!(shapes[..3], want, "{shapes:?}");
    assert_eq!(shapes[3..], want[..2], "{shapes:?}");
    assert_eq!(ids, (1..=200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_json_object_per_flow_of_packed_responses() {
    let s = start().await;
    let ch = channel(&s).await;
    send_ids(&s, 1..=150);
    wait_history(&ch, 100).await;
    let server = s.tcp.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sockscope"))
            .args([
                "watch", "--server", &server, "--number", "100", "--format", "json",
            ])
            .output()
            .expect("run sockscope watch")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{out:?}");
    let mut envelopes = std::collections::BTreeSet::new();
    let ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON object per line");
            assert!(v.get("flows").is_none(), "packed line {l}");
            envelopes.insert(v["sequence"].to_string());
            v["flow"]["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("no flow id in {l}"))
        })
        .collect();
    assert_eq!(ids, (51..=150).collect::<Vec<_>>());
    // It asked for packing: the flows came in a few envelopes.
    assert!(envelopes.len() < ids.len() / 10, "{envelopes:?}");
}

#[tokio::test]
async fn disconnected_subscriber_is_removed() {
    let s = start().await;
    let ch = channel(&s).await;
    let other = channel(&s).await;
    let mut c = client::flow_client(other);
    let st = c
        .stream_flows(proto::StreamFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    wait_subscribers(&ch, 1).await;
    drop(st);
    drop(c);
    wait_subscribers(&ch, 0).await;
}

#[tokio::test]
async fn fifty_concurrent_subscribers_each_get_everything() {
    let s = start().await;
    let ch = channel(&s).await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut c = client::flow_client(ch.clone());
        streams.push(
            c.stream_flows(proto::StreamFlowsRequest {
                follow: true,
                ..Default::default()
            })
            .await
            .expect("follow")
            .into_inner(),
        );
    }
    wait_subscribers(&ch, 50).await;
    send_ids(&s, 1..=100);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut st| tokio::spawn(async move { collect_ids(&mut st, 100).await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("join"), (1..=100).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let s = start().await;
    let ch = channel(&s).await;
    let mut c = client::flow_client(ch);
    let cases = [
        (
            proto::StreamFlowsRequest {
                allow: vec![proto::FlowFilter {
                    source_ip: vec!["10.0.0.1".into(), "10.0.0/33".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
            "allow[0].source_ip[1]: invalid CIDR \"10.0.0/33\"",
        ),
        (
            proto::StreamFlowsRequest {
                deny: vec![
                    proto::FlowFilter::default(),
                    proto::FlowFilter {
                        port: vec![70000],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            "deny[1].port[0]: port 70000 out of range 0-65535",
        ),
        (
            proto::StreamFlowsRequest {
                allow: vec![proto::FlowFilter {
                    transport: vec![9],
                    ..Default::default()
                }],
                ..Default::default()
            },
            "allow[0].transport[0]: invalid value 9",
        ),
        (
            proto::StreamFlowsRequest {
                allow: vec![proto::FlowFilter {
                    direction: vec![0],
                    ..Default::default()
                }],
                ..Default::default()
            },
            "allow[0].direction[0]: invalid value 0",
        ),
        (
            proto::StreamFlowsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -5,
                }),
                ..Default::default()
            },
            "since: invalid timestamp",
        ),
    ];
    for (req, want) in cases {
        let err = c
            .stream_flows(req)
            .await
            .expect_err("accepted an invalid request");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with(want),
            "{:?} vs {want:?}",
            err.message()
        );
    }
}

#[tokio::test]
async fn health_status_flips() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let s = start().await;
    let mut h = HealthClient::new(channel(&s).await);
    let check = |svc: &str| HealthCheckRequest {
        service: svc.into(),
    };
    let mut watch = h
        .watch(check("sockscope.v1.FlowService"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("watch item").expect("watch ok");
    assert_eq!(first.status, ServingStatus::NotServing as i32);
    assert_eq!(
        h.check(check("")).await.expect("check").into_inner().status,
        ServingStatus::NotServing as i32
    );
    s.health.set_serving(true);
    let next = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("timeout")
        .expect("item")
        .expect("ok");
    assert_eq!(next.status, ServingStatus::Serving as i32);
    assert_eq!(
        h.check(check("")).await.expect("check").into_inner().status,
        ServingStatus::Serving as i32
    );
    let st = client::flow_client(channel(&s).await)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(st.serving);
    s.health.set_serving(false);
    let next = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("timeout")
        .expect("item")
        .expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
}

async fn resp_next_file(
    c: &mut tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<Channel>,
    name: &str,
) -> prost_types::FileDescriptorProto {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileByFilename(name.to_string())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let r = resp.next().await.expect("item").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = r.message_response else {
        panic!("{name}: {r:?}")
    };
    prost_types::FileDescriptorProto::decode(fd.file_descriptor_proto[0].as_slice())
        .expect("descriptor")
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_services_and_describe() {
    let s = start().await;
    let ch = channel(&s).await;
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut c = ServerReflectionClient::new(ch.clone());
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "sockscope.v1.StreamFlowsResponse".into(),
                )),
            },
        ];
        let mut resp = c
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .expect("reflection v1")
            .into_inner();
        let r = resp.next().await.expect("item").expect("ok");
        let Some(MessageResponse::ListServicesResponse(l)) = r.message_response else {
            panic!("{r:?}")
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        for want in [
            "sockscope.v1.FlowService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        let r = resp.next().await.expect("item").expect("ok");
        let Some(MessageResponse::FileDescriptorResponse(fd)) = r.message_response else {
            panic!("{r:?}")
        };
        let file = prost_types::FileDescriptorProto::decode(fd.file_descriptor_proto[0].as_slice())
            .expect("descriptor");
        assert_eq!(file.package(), "sockscope.v1");
        assert!(file
            .dependency
            .iter()
            .any(|d| d == "google/protobuf/timestamp.proto"));
        // Imports are served too (needed by grpcurl describe).
        for dep in &file.dependency {
            let r = resp_next_file(&mut c, dep).await;
            assert_eq!(r.name(), dep.as_str());
        }
    }
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut c = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("reflection v1alpha")
            .into_inner();
        let r = resp.next().await.expect("item").expect("ok");
        let Some(MessageResponse::ListServicesResponse(l)) = r.message_response else {
            panic!("{r:?}")
        };
        assert!(l
            .service
            .iter()
            .any(|s| s.name == "sockscope.v1.FlowService"));
    }
}

#[tokio::test]
async fn unix_socket_with_odd_authorities() {
    let s = start().await;
    let mode = std::fs::metadata(&s.unix).expect("socket").permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o660);
    send(
        &s,
        record(Rec {
            id: 7,
            ..Rec::default()
        }),
    );
    for authority in [
        "localhost",
        "sockscope.sock",
        "unix",
        "sockscope.sock:0",
        "[::1]",
    ] {
        let ch = client::connect_unix(&s.unix, authority)
            .await
            .expect("connect unix");
        wait_history(&ch, 1).await;
        let mut c = client::flow_client(ch);
        let mut st = c
            .stream_flows(replay(1))
            .await
            .expect("stream over unix")
            .into_inner();
        assert_eq!(drain_ids(&mut st).await, vec![7], "authority {authority:?}");
    }
    let st = client::flow_client(
        client::connect(&ServerAddr::Unix(s.unix.clone()))
            .await
            .expect("connect"),
    )
    .get_status(proto::GetStatusRequest {})
    .await
    .expect("status")
    .into_inner();
    assert_eq!(st.node_name, "test-node");
}

#[tokio::test]
async fn stale_unix_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let mut cfg = Config::default();
    cfg.server.listen = String::new();
    cfg.server.unix_socket = path.display().to_string();
    let opts = ServerOptions::from_config(&cfg).expect("options");
    let l = export::bind(&opts)
        .await
        .expect("stale socket not replaced");
    let err = export::bind(&opts)
        .await
        .expect_err("bound over a live socket");
    assert!(err.to_string().contains("another server"), "{err}");
    drop(l);
}

#[test]
fn non_loopback_plaintext_is_refused() {
    let mut cfg = Config::default();
    cfg.server.listen = "0.0.0.0:50051".into();
    let err = ServerOptions::from_config(&cfg).expect_err("accepted plaintext");
    assert!(err.to_string().contains("insecure_listen"), "{err}");
    cfg.server.insecure_listen = true;
    ServerOptions::from_config(&cfg).expect("insecure_listen accepted");
    // Without insecure_listen: loopback addresses (the whole 127/8 and ::1)
    // take plaintext, every other address is refused naming the key.
    cfg.server.insecure_listen = false;
    for addr in ["127.0.0.1:50051", "127.3.4.5:1", "[::1]:50051"] {
        cfg.server.listen = addr.into();
        ServerOptions::from_config(&cfg).unwrap_or_else(|e| panic!("{addr} refused: {e}"));
    }
    for addr in ["[::]:50051", "192.0.2.7:50051", "10.0.2.15:50051"] {
        cfg.server.listen = addr.into();
        let err = ServerOptions::from_config(&cfg).expect_err(addr);
        assert!(err.to_string().contains("insecure_listen"), "{addr}: {err}");
    }
}

#[tokio::test]
async fn status_reports_subscribers_and_history() {
    let s = start().await;
    let ch = channel(&s).await;
    let mut c = client::flow_client(ch.clone());
    let _st = c
        .stream_flows(proto::StreamFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    send(
        &s,
        record(Rec {
            id: 1,
            ..Rec::default()
        }),
    );
    wait_history(&ch, 1).await;
    let st = c
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(st.history_capacity, 100);
    assert_eq!(st.history_occupancy, 1);
    assert_eq!(st.subscribers.len(), 1);
    assert_eq!(st.subscribers[0].queue_capacity, 1000);
    assert_eq!(st.flows_received, 1);
    let mut w = c
        .watch_status(proto::WatchStatusRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1000,
            }),
        })
        .await
        .expect("watch")
        .into_inner();
    let t0 = tokio::time::Instant::now();
    w.next().await.expect("first").expect("ok");
    w.next().await.expect("second").expect("ok");
    // The interval is raised to the minimum of 1 s.
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}

/// Runs the openssl CLI (required for the TLS test).
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl CLI is required for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates a CA and a `localhost` server certificate signed by it; returns
/// (ca cert, server cert, server key).
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(dir, &csr);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

#[tokio::test]
async fn tls_listener_on_non_loopback_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_cert, cert, key) = test_pki(dir.path());
    let mut cfg = Config::default();
    // Non-loopback (any address) is accepted because TLS is configured.
    cfg.server.listen = "0.0.0.0:0".into();
    cfg.server.unix_socket = String::new();
    cfg.server.tls_cert = Some(cert.clone());
    cfg.server.tls_key = Some(key);
    cfg.validate().expect("TLS config valid");
    let opts = ServerOptions::from_config(&cfg).expect("options");
    let l = export::bind(&opts).await.expect("bind");
    let port = l.tcp_addr().expect("addr").port();
    let (tx, rx) = export::pipeline_channel(16);
    tokio::spawn(export::serve(
        l,
        opts,
        rx,
        Arc::new(EmptyStatus::default()),
        HealthHandle::new(),
        std::future::pending(),
    ));
    assert!(tx.send(record(Rec {
        id: 11,
        ..Rec::default()
    })));
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&ca_cert).expect("ca"));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("TLS connect");
    wait_history(&ch, 1).await;
    let mut st = client::flow_client(ch)
        .stream_flows(replay(1))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(drain_ids(&mut st).await, vec![11]);
    // Plaintext to the TLS port fails.
    let plain = client::connect(&ServerAddr::Tcp(format!("127.0.0.1:{port}"))).await;
    if let Ok(ch) = plain {
        let r = client::flow_client(ch)
            .get_status(proto::GetStatusRequest {})
            .await;
        assert!(r.is_err(), "plaintext request to the TLS port succeeded");
    }
}

/// Appends an HTTP/2 frame.
fn h2_frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an HPACK literal (without indexing) with a static name index.
fn hpack_literal(out: &mut Vec<u8>, name_index: u8, value: &[u8]) {
    assert!(name_index < 15 && value.len() < 127);
    out.push(name_index);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

#[tokio::test]
async fn unix_socket_accepts_the_socket_path_as_authority() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start().await;
    let path = s.unix.display().to_string();
    let mut conn = tokio::net::UnixStream::connect(&s.unix)
        .await
        .expect("connect");
    let mut req = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut req, 0x4, 0, 0, &[]); // SETTINGS
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
                                      // :authority = the socket path, literal with incremental indexing (idx 1).
    block.push(0x41);
    block.push(path.len() as u8);
    block.extend_from_slice(path.as_bytes());
    hpack_literal(&mut block, 4, b"/sockscope.v1.FlowService/GetStatus");
    block.extend_from_slice(&[0x0f, 0x10]); // content-type (index 31), 4-bit prefix
    block.push(16);
    block.extend_from_slice(b"application/grpc");
    block.extend_from_slice(&[0x00, 2, b't', b'e', 8]);
    block.extend_from_slice(b"trailers");
    h2_frame(&mut req, 0x1, 0x4, 1, &block); // HEADERS, END_HEADERS
    h2_frame(&mut req, 0x0, 0x1, 1, &[0, 0, 0, 0, 0]); // DATA, END_STREAM: empty message
    conn.write_all(&req).await.expect("write");
    // Read frames until stream 1 answers: HEADERS + DATA (success) or RST_STREAM.
    let mut buf = Vec::new();
    let mut got_headers = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (ty, stream) = (buf[3], u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]));
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match (ty, stream) {
                (0x3, 1) => panic!("stream reset by the server: error code {payload:?}"),
                (0x7, _) => panic!("connection GOAWAY: {payload:?}"),
                (0x1, 1) => got_headers = true,
                (0x0, 1) if payload.len() > 5 => {
                    assert!(got_headers);
                    let msg = <proto::GetStatusResponse as Message>::decode(&payload[5..])
                        .expect("status");
                    assert_eq!(msg.node_name, "test-node");
                    return;
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("timed out waiting for the response")
            .expect("read");
        assert!(n > 0, "connection closed without a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}
