//! Fan-out cost: 100k flows/s pushed through the pipeline channel to 10
//! subscribers, (a) consumed in-process from the hub and (b) streamed over
//! loopback gRPC, one flow per response (clients that do not ask for more)
//! and packed (as `sockscope watch` asks). The producer's end of the
//! pipeline is dropped after the run, so every stream ends by itself after
//! its last loss notices; the counts are taken then. Reports what was
//! delivered and what was told in loss notices (their sum must be what was
//! offered), and CPU time per 1,000 flows delivered, per thread group (from
//! /proc/self/task/*/stat), plus criterion micro-benchmarks of the
//! per-record work (convert+encode, filter evaluation).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{black_box, Criterion};
use sockscope::config::Config;
use sockscope::export::client::{self, ServerAddr};
use sockscope::export::encoded::{EncodedFlow, Payload};
use sockscope::export::filter::FilterSet;
use sockscope::export::hub::{Hub, HubOptions, SubscribeRequest};
use sockscope::export::proto;
use sockscope::export::proto::stream_flows_response::Event;
use sockscope::export::status::EmptyStatus;
use sockscope::export::{self as export, HealthHandle, PipelineSender, ServerOptions};
use sockscope::model::{
    Creds, Endpoint, FlowDirection, FlowRecord, Output, ProcessInfo, Transport,
};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

/// Offered rates: the target and a lower one for comparison.
const RATES: [u64; 2] = [100_000, 20_000];
/// Subscribers.
const SUBSCRIBERS: usize = 10;
/// Length of one measured run.
const RUN: Duration = Duration::from_secs(3);
/// Producer batch period.
const BATCH_PERIOD: Duration = Duration::from_millis(1);
/// Distinct records cycled by the producer.
const DISTINCT: usize = 1024;
/// Per-subscriber queue.
const QUEUE: usize = 4096;
/// Pipeline channel capacity.
const PIPELINE: usize = 16_384;
/// Longest wait for the streams to end after the run.
const DRAIN: Duration = Duration::from_secs(30);
/// `max_flows_per_response` of the packed gRPC variant.
const PACKED: u32 = client::FLOWS_PER_RESPONSE;

fn record(i: usize) -> Arc<FlowRecord> {
    let now = SystemTime::now();
    Arc::new(FlowRecord {
        id: i as u64,
        is_final: true,
        complete: true,
        transport: Transport::Tcp,
        direction: FlowDirection::Egress,
        local: Endpoint {
            ip: "10.0.0.1".parse().expect("ip"),
            port: 40_000 + (i % 20_000) as u16,
            packets: 12,
            bytes: 1834,
            domain: None,
            sequence: None,
        },
        remote: Endpoint {
            ip: "93.184.216.34".parse().expect("ip"),
            port: 443,
            packets: 10,
            bytes: 9120,
            domain: Some("example.com".into()),
            sequence: None,
        },
        start: now - Duration::from_millis(40),
        end: now,
        community_id: "1:LQU9qZlK+B5F3KDmev6m5PMibrg=".into(),
        sock: 0xffff_8de2_9d33_7000 + i as u64,
        process: Some(ProcessInfo {
            pid: 4970,
            ppid: 1,
            name: "curl".into(),
            args: vec!["curl".into(), "https://example.com/".into()],
            executable: "/usr/bin/curl".into(),
            created: Some(now),
            creds: Some(Creds {
                uid: 1000,
                gid: 1000,
                euid: 1000,
                egid: 1000,
            }),
            user_name: Some("user".into()),
            group_name: Some("user".into()),
            container_id: None,
            pod_uid: None,
        }),
        accounting: Default::default(),
        pod: None,
        remote_pod: None,
    })
}

/// CPU seconds used so far by the threads whose name starts with `prefix`
/// (all threads when empty).
fn cpu_secs(prefix: &str) -> f64 {
    // SC_CLK_TCK is 100 on Linux.
    const TICKS_PER_SEC: f64 = 100.0;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if !comm.starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after comm/state.
        let u: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let s: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks += u + s;
    }
    ticks as f64 / TICKS_PER_SEC
}

/// Pushes FLOWS_PER_SEC for RUN from a thread named `producer`; returns sent count.
fn produce(
    tx: PipelineSender,
    records: Arc<Vec<Arc<FlowRecord>>>,
    rate: u64,
) -> std::thread::JoinHandle<u64> {
    std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || {
            let per_batch = rate * BATCH_PERIOD.as_micros() as u64 / 1_000_000;
            let start = Instant::now();
            let mut sent = 0u64;
            let mut next = start;
            while start.elapsed() < RUN {
                for _ in 0..per_batch {
                    let r = records[sent as usize % records.len()].clone();
                    tx.send(Output::Flow(r));
                    sent += 1;
                }
                next += BATCH_PERIOD;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            sent
        })
        .expect("producer thread")
}

/// What one subscriber received by the end of its stream.
#[derive(Debug, Default, Clone, Copy)]
struct Received {
    /// Flows delivered.
    flows: u64,
    /// Flows counted in loss notices.
    told: u64,
    /// Responses.
    responses: u64,
}

impl Received {
    /// Counts one response with `flows` flows and a notice of `told`.
    fn add(&mut self, flows: u64, told: u64) {
        self.responses += 1;
        self.flows += flows;
        self.told += told;
    }
}

/// Waits (bounded) for every subscriber's stream to end.
async fn join_all(tasks: Vec<JoinHandle<Received>>) -> Vec<Received> {
    let mut got = Vec::new();
    for t in tasks {
        match tokio::time::timeout(DRAIN, t).await {
            Ok(Ok(r)) => got.push(r),
            Ok(Err(e)) => panic!("subscriber task: {e}"),
            Err(_) => panic!("a stream did not end within {DRAIN:?} of the run"),
        }
    }
    got
}

fn report(name: &str, rate: u64, sent: u64, subs: &[Received], groups: &[(&str, f64)]) {
    let delivered: u64 = subs.iter().map(|r| r.flows).sum();
    let told: u64 = subs.iter().map(|r| r.told).sum();
    let responses: u64 = subs.iter().map(|r| r.responses).sum();
    let offered = sent * subs.len() as u64;
    let per_k = |cpu: f64| cpu * 1e6 / (delivered as f64 / 1000.0);
    println!(
        "{name}: offered {sent} flows in {:?} ({} /s) to {} subscribers, delivered {delivered} ({:.1}%)",
        RUN,
        rate,
        subs.len(),
        100.0 * delivered as f64 / offered as f64
    );
    println!(
        "  told in loss notices {told}, neither {}; {responses} responses ({:.1} flows each)",
        offered as i64 - delivered as i64 - told as i64,
        delivered as f64 / responses.max(1) as f64
    );
    for (g, cpu) in groups {
        println!(
            "  {g:<10} cpu {cpu:.2} s = {:.1} us per 1k delivered",
            per_k(*cpu)
        );
    }
}

fn hub_only(records: Arc<Vec<Arc<FlowRecord>>>, rate: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hubrt")
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = export::pipeline_channel(PIPELINE);
    let tasks = rt.block_on(async {
        let (hub, _t) = Hub::spawn(HubOptions::new(16_384, QUEUE, "bench"), rx);
        let mut tasks = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let mut s = hub
                .subscribe(SubscribeRequest {
                    follow: true,
                    ..Default::default()
                })
                .await
                .expect("subscribe");
            tasks.push(tokio::spawn(async move {
                let mut got = Received::default();
                while let Some(Ok(w)) = s.next().await {
                    let (single, told) = match w.payload {
                        Some(Payload::Flow(_)) => (1, 0),
                        Some(Payload::Loss(l)) => (0, l.count),
                        None => (0, 0),
                    };
                    got.add(single + w.flows.len() as u64, told);
                }
                got
            }));
        }
        tasks
    });
    let before = cpu_secs("hubrt");
    let sent = produce(tx, records, rate).join().expect("producer");
    let subs = rt.block_on(join_all(tasks));
    let cpu = cpu_secs("hubrt") - before;
    report(
        "hub (in-process consumers)",
        rate,
        sent,
        &subs,
        &[("hub+cons", cpu)],
    );
}

fn grpc(records: Arc<Vec<Arc<FlowRecord>>>, rate: u64, max_flows_per_response: u32) {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("server")
        .enable_all()
        .build()
        .expect("runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.unix_socket = String::new();
    cfg.server.subscriber_queue_size = QUEUE;
    let opts = ServerOptions::from_config(&cfg).expect("options");
    let (tx, rx) = export::pipeline_channel(PIPELINE);
    let addr = server_rt.block_on(async {
        let l = export::bind(&opts).await.expect("bind");
        let addr = l.tcp_addr().expect("addr");
        tokio::spawn(export::serve(
            l,
            opts,
            rx,
            Arc::new(EmptyStatus::default()),
            HealthHandle::new(),
            std::future::pending(),
        ));
        addr
    });
    let tasks = client_rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let ch = client::connect(&ServerAddr::Tcp(addr.to_string()))
                .await
                .expect("connect");
            let mut c = client::flow_client(ch);
            let mut s = c
                .stream_flows(proto::StreamFlowsRequest {
                    follow: true,
                    max_flows_per_response,
                    ..Default::default()
                })
                .await
                .expect("stream")
                .into_inner();
            tasks.push(tokio::spawn(async move {
                let mut got = Received::default();
                loop {
                    match s.next().await {
                        Some(Ok(r)) => {
                            let (single, told) = match r.event {
                                Some(Event::Flow(_)) => (1, 0),
                                Some(Event::Loss(n)) => (0, n.count),
                                None => (0, 0),
                            };
                            got.add(single + r.flows.len() as u64, told);
                        }
                        Some(Err(e)) => panic!("stream ended with {e}"),
                        None => return got,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tasks
    });
    let (s0, c0) = (cpu_secs("server"), cpu_secs("client"));
    let sent = produce(tx, records, rate).join().expect("producer");
    let subs = client_rt.block_on(join_all(tasks));
    let (s1, c1) = (cpu_secs("server"), cpu_secs("client"));
    let name = if max_flows_per_response > 1 {
        format!("gRPC over loopback TCP, up to {max_flows_per_response} flows per response")
    } else {
        "gRPC over loopback TCP, one flow per response".to_string()
    };
    report(
        &name,
        rate,
        sent,
        &subs,
        &[("server", s1 - s0), ("clients", c1 - c0)],
    );
}

fn micro(c: &mut Criterion) {
    let rec = record(1);
    c.bench_function("convert_and_encode_flow", |b| {
        b.iter(|| black_box(EncodedFlow::new(black_box(rec.clone()), "host")))
    });
    let f = proto::FlowFilter {
        destination_ip: vec!["93.184.0.0/16".into()],
        transport: vec![proto::Transport::Tcp as i32],
        process_name: vec!["wget".into(), "curl".into()],
        ..Default::default()
    };
    let set = FilterSet::compile(&[f], &[]).expect("filter");
    c.bench_function("filter_match", |b| {
        b.iter(|| black_box(set.matches(black_box(&rec))))
    });
}

fn main() {
    let records: Arc<Vec<Arc<FlowRecord>>> = Arc::new((0..DISTINCT).map(record).collect());
    for rate in RATES {
        hub_only(records.clone(), rate);
        grpc(records.clone(), rate, 0);
        grpc(records.clone(), rate, PACKED);
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(2));
    micro(&mut c);
    c.final_summary();
}
