//! The cluster path's throughput against a real `nats-server -js` on
//! loopback (from `tests/setup`): (a) flows per second one daemon's NATS
//! sink publishes with JetStream acknowledgements (the fan-out and the sink
//! as `serve` runs them, fed through the pipeline channel), and (b) flows
//! per second `sockscope relay` serves from that stream to 10 concurrent
//! `StreamFlows` readers, each reading all of it, with the relay process's
//! CPU time (utime + stime from /proc) per 1,000 flows delivered.
//!
//! `cargo bench --bench nats`; `NATS_BENCH_FLOWS` sets the flows published
//! (default 50,000). Absolute figures depend on the machine: compare runs
//! made side by side.

#[path = "../tests/nats/harness.rs"]
mod harness;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::{flow, free_port, NatsServer, STREAM};
use sockscope::config::{NatsConfig, NatsStreamConfig};
use sockscope::export::ecs::HostInfo;
use sockscope::export::hub::{Hub, HubOptions};
use sockscope::export::proto::flow_service_client::FlowServiceClient;
use sockscope::export::{self as export, nats, proto};

/// Flows published by default.
const DEFAULT_FLOWS: u64 = 50_000;
/// Concurrent relay readers.
const READERS: usize = 10;
/// Longest a phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat, counted after the command name.
    get(11) + get(12)
}

fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let flows: u64 = std::env::var("NATS_BENCH_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FLOWS);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path(), &[]);
    let url = server.url();

    // (a) Publishing with acknowledgements.
    let (tx, rx) = export::pipeline_channel(flows as usize + 16);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(0, 100, "bench"), rx);
    let cfg = NatsConfig {
        url: url.clone(),
        queue_size: flows as usize + 16,
        stream: NatsStreamConfig {
            create: true,
            name: STREAM.into(),
            ..NatsStreamConfig::default()
        },
        ..NatsConfig::default()
    };
    let (running, counters) = nats::spawn(&hub, &cfg, "bench", HostInfo::default(), None)
        .await
        .expect("sink");
    let t0 = Instant::now();
    for id in 1..=flows {
        assert!(tx.send(flow(id)), "pipeline channel full");
    }
    while counters.published.load(Ordering::Relaxed) < flows {
        assert!(t0.elapsed() < PHASE_LIMIT, "publishing did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let publish_s = t0.elapsed().as_secs_f64();
    drop(tx);
    let _ = running.finish(Duration::from_secs(10)).await;
    hub_task.abort();

    // (b) The relay to READERS concurrent readers.
    let port = free_port();
    let cfg_path = harness::write_config(
        dir.path(),
        "relay.yaml",
        &format!("export:\n  nats:\n    stream:\n      name: {STREAM}\n"),
    );
    let mut relay = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .arg("-c")
        .arg(&cfg_path)
        .args([
            "relay",
            "--nats",
            &url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "relay did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu0 = cpu_ticks(relay.id());
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..READERS {
        let addr = format!("http://127.0.0.1:{port}");
        tasks.push(tokio::spawn(async move {
            let mut c = FlowServiceClient::connect(addr).await.expect("connect");
            let mut s = c
                .stream_flows(proto::StreamFlowsRequest {
                    number: flows,
                    max_flows_per_response: 64,
                    ..Default::default()
                })
                .await
                .expect("StreamFlows")
                .into_inner();
            let mut n = 0u64;
            while let Some(r) = s.message().await.expect("a response") {
                n += r.flows.len() as u64;
            }
            n
        }));
    }
    let mut delivered = 0;
    for t in tasks {
        delivered += t.await.expect("reader");
    }
    let relay_s = t1.elapsed().as_secs_f64();
    let relay_cpu_s = (cpu_ticks(relay.id()) - cpu0) as f64 / ticks_per_second();
    let _ = relay.kill();
    let _ = relay.wait();
    drop(server);

    println!("| path | flows | seconds | flows/s | notes |");
    println!("|---|---|---|---|---|");
    println!(
        "| NATS sink, published and acknowledged | {flows} | {publish_s:.2} | {:.0} | one sink, max_in_flight {} |",
        flows as f64 / publish_s,
        cfg.max_in_flight
    );
    println!(
        "| relay → {READERS} readers | {delivered} of {} | {relay_s:.2} | {:.0} | relay CPU {:.1} ms per 1k delivered |",
        flows * READERS as u64,
        delivered as f64 / relay_s,
        relay_cpu_s * 1000.0 / (delivered as f64 / 1000.0)
    );
    assert_eq!(delivered, flows * READERS as u64, "a reader missed flows");
}
