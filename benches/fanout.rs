//! Fan-out cost: 100k flows/s pushed through the pipeline channel to 10
//! subscribers, (a) consumed in-process from the hub and (b) streamed over
//! loopback gRPC. Reports CPU time per 1,000 flows delivered, per thread
//! group (from /proc/self/task/*/stat), plus criterion micro-benchmarks of
//! the per-record work (convert+encode, filter evaluation).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{black_box, Criterion};
use sockscope::config::Config;
use sockscope::export::client::{self, ServerAddr};
use sockscope::export::encoded::EncodedFlow;
use sockscope::export::filter::FilterSet;
use sockscope::export::hub::{Hub, HubOptions, SubscribeRequest};
use sockscope::export::proto;
use sockscope::export::status::EmptyStatus;
use sockscope::export::{self as export, HealthHandle, PipelineSender, ServerOptions};
use sockscope::model::{
    Creds, Endpoint, FlowDirection, FlowRecord, Output, ProcessInfo, Transport,
};
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
        },
        remote: Endpoint {
            ip: "93.184.216.34".parse().expect("ip"),
            port: 443,
            packets: 10,
            bytes: 9120,
            domain: Some("example.com".into()),
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

fn report(name: &str, rate: u64, sent: u64, delivered: u64, groups: &[(&str, f64)]) {
    let per_k = |cpu: f64| cpu * 1e6 / (delivered as f64 / 1000.0);
    println!(
        "{name}: offered {sent} flows in {:?} ({} /s) to {SUBSCRIBERS} subscribers, delivered {delivered} ({:.1}%)",
        RUN,
        rate,
        100.0 * delivered as f64 / (sent as f64 * SUBSCRIBERS as f64)
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
    let delivered = Arc::new(AtomicU64::new(0));
    let (tx, rx) = export::pipeline_channel(PIPELINE);
    rt.block_on(async {
        let (hub, _t) = Hub::spawn(HubOptions::new(16_384, QUEUE, "bench"), rx);
        for _ in 0..SUBSCRIBERS {
            let mut s = hub
                .subscribe(SubscribeRequest {
                    follow: true,
                    ..Default::default()
                })
                .await
                .expect("subscribe");
            let d = delivered.clone();
            tokio::spawn(async move {
                while let Some(Ok(_)) = s.next().await {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let before = cpu_secs("hubrt");
    let sent = produce(tx, records, rate).join().expect("producer");
    std::thread::sleep(Duration::from_millis(300));
    let cpu = cpu_secs("hubrt") - before;
    report(
        "hub (in-process consumers)",
        rate,
        sent,
        delivered.load(Ordering::Relaxed),
        &[("hub+cons", cpu)],
    );
}

fn grpc(records: Arc<Vec<Arc<FlowRecord>>>, rate: u64) {
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
    let delivered = Arc::new(AtomicU64::new(0));
    let losses = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    client_rt.block_on(async {
        for _ in 0..SUBSCRIBERS {
            let ch = client::connect(&ServerAddr::Tcp(addr.to_string()))
                .await
                .expect("connect");
            let mut c = client::flow_client(ch);
            let mut s = c
                .stream_flows(proto::StreamFlowsRequest {
                    follow: true,
                    ..Default::default()
                })
                .await
                .expect("stream")
                .into_inner();
            let (d, l, stop) = (delivered.clone(), losses.clone(), stop.clone());
            tokio::spawn(async move {
                while let Some(Ok(r)) = s.next().await {
                    match r.event {
                        Some(proto::stream_flows_response::Event::Flow(_)) => {
                            d.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(proto::stream_flows_response::Event::Loss(n)) => {
                            l.fetch_add(n.count, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let (s0, c0) = (cpu_secs("server"), cpu_secs("client"));
    let sent = produce(tx, records, rate).join().expect("producer");
    std::thread::sleep(Duration::from_millis(500));
    let (s1, c1) = (cpu_secs("server"), cpu_secs("client"));
    stop.store(true, Ordering::Relaxed);
    report(
        "gRPC over loopback TCP",
        rate,
        sent,
        delivered.load(Ordering::Relaxed),
        &[("server", s1 - s0), ("clients", c1 - c0)],
    );
    println!(
        "  in-band loss notices reported {} records",
        losses.load(Ordering::Relaxed)
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
        grpc(records.clone(), rate);
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(2));
    micro(&mut c);
    c.final_summary();
}
