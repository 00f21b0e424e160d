//! The NATS sink against a three-server JetStream cluster on loopback with
//! a stream replicated three times (real `nats-server -js` processes, read
//! back with nats-py): a server killed while 10,000 flows are published
//! loses and duplicates none of them; all servers stopped, the sink's drops
//! are counted and told in the stream, and publishing resumes when they
//! return.
//!
//! `#[ignore]`d for a plain `cargo test`; `tests/run-all` runs it.

#[path = "nats/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::{flow, free_port, read_stream, NatsServer, STREAM};
use prost::Message as _;
use sockscope::config::{NatsConfig, NatsStreamConfig};
use sockscope::export::ecs::HostInfo;
use sockscope::export::hub::{Hub, HubOptions};
use sockscope::export::status::StatusSnapshot;
use sockscope::export::{self as export, nats, proto};

/// Flows published while one server is killed.
const FLOWS: u64 = 10_000;
/// Published in chunks of this many, each acknowledged before the next.
const CHUNK: u64 = 500;
/// The chunk after which a server is killed.
const KILL_AFTER_CHUNK: u64 = 6;
/// The sink's queue in the fan-out, and its window of unacknowledged ones.
const QUEUE: usize = 1_000;
const IN_FLIGHT: usize = 64;
/// Flows sent while every server is down.
const WHILE_DOWN: u64 = 3_000;
/// How long a cluster may take to elect leaders, and records to arrive.
const WAIT: Duration = Duration::from_secs(90);

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three servers of one cluster, each with its own store.
fn cluster(dir: &Path) -> Vec<NatsServer> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    (0..3)
        .map(|i| {
            let d = dir.join(format!("s{i}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            NatsServer::start(
                &d,
                &[
                    "-n",
                    &format!("s{i}"),
                    "--cluster_name",
                    "flows",
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes",
                    &all,
                ],
            )
        })
        .collect()
}

/// Waits until the cluster's JetStream answers (a meta leader is elected).
async fn jetstream_ready(url: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(c) = async_nats::connect(url).await {
            if async_nats::jetstream::new(c).query_account().await.is_ok() {
                return;
            }
        }
        assert!(
            t0.elapsed() < WAIT,
            "JetStream of the cluster never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn drops(hub: &Hub, peer: &str) -> u64 {
    let s = hub.status().await.expect("hub status");
    export::status::to_proto(&StatusSnapshot::default(), &s, "n1", true)
        .subscribers
        .into_iter()
        .find(|s| s.peer == peer)
        .expect("the sink is a subscriber")
        .drops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
async fn a_replicated_stream_survives_a_killed_server_and_a_full_outage_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = cluster(dir.path());
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    jetstream_ready(&urls[0]).await;
    let (tx, rx) = export::pipeline_channel(20_000);
    let mut opts = HubOptions::new(0, 100, "n1");
    opts.slow_seconds = 1;
    let (hub, hub_task) = Hub::spawn(opts, rx);
    let cfg = NatsConfig {
        url: urls.join(","),
        queue_size: QUEUE,
        max_in_flight: IN_FLIGHT,
        ack_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        stream: NatsStreamConfig {
            create: true,
            name: STREAM.into(),
            replicas: 3,
            ..NatsStreamConfig::default()
        },
        ..NatsConfig::default()
    };
    let peer = format!("nats:{}", cfg.url);
    let (running, counters) = nats::spawn(&hub, &cfg, "n1", HostInfo::default(), None)
        .await
        .expect("sink");

    // 10,000 flows in acknowledged chunks; one server killed on the way.
    for chunk in 0..FLOWS / CHUNK {
        for id in chunk * CHUNK + 1..=(chunk + 1) * CHUNK {
            assert!(tx.send(flow(id)));
        }
        let want = (chunk + 1) * CHUNK;
        let c = counters.clone();
        wait_for("a chunk acknowledged", || {
            c.published.load(Ordering::Relaxed) == want
        })
        .await;
        if chunk == KILL_AFTER_CHUNK {
            servers[0].stop();
        }
    }
    assert_eq!(
        drops(&hub, &peer).await,
        0,
        "nothing dropped with two servers up"
    );

    // Every server stopped: what the queue cannot hold is dropped, counted.
    for s in servers.iter_mut() {
        s.stop();
    }
    let c = counters.clone();
    wait_for("disconnection", || !c.connected.load(Ordering::Relaxed)).await;
    for id in FLOWS + 1..=FLOWS + WHILE_DOWN {
        assert!(tx.send(flow(id)));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dropped = drops(&hub, &peer).await;
    assert!(
        dropped >= WHILE_DOWN - (QUEUE + IN_FLIGHT) as u64,
        "{dropped} of {WHILE_DOWN} dropped with no server"
    );
    // The hub, and so the gRPC service built on it, still answers.
    assert!(hub.status().await.is_ok());

    // Back, with their stores: the kept records and the loss notice land.
    for s in servers.iter_mut() {
        s.run();
    }
    jetstream_ready(&urls[1]).await;
    let kept = FLOWS + WHILE_DOWN - dropped;
    let c = counters.clone();
    wait_for("the kept records and the loss notice", || {
        c.published.load(Ordering::Relaxed) == kept && c.loss_notices.load(Ordering::Relaxed) > 0
    })
    .await;
    drop(tx);
    let report = running.finish(WAIT).await.expect("sink finished");
    assert_eq!((report.delivered, report.lost), (kept, dropped));
    hub_task.abort();

    let notices = counters.loss_notices.load(Ordering::Relaxed);
    let url = urls[2].clone();
    let got = tokio::task::spawn_blocking(move || {
        read_stream(&url, (kept + notices) as usize, &["--timeout", "60"])
    })
    .await
    .expect("read");
    let mut ids = Vec::new();
    let mut lost = 0;
    for m in &got.messages {
        if m.subject.ends_with(".loss") {
            lost += proto::LossNotice::decode(m.payload.as_slice())
                .expect("LossNotice")
                .count;
        } else {
            ids.push(proto::Flow::decode(m.payload.as_slice()).expect("Flow").id);
        }
    }
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a flow stored twice");
    assert_eq!(ids.len() as u64, kept);
    assert!(
        (1..=FLOWS).all(|id| unique.contains(&id)),
        "a flow lost with two servers up"
    );
    assert_eq!(lost, dropped, "the stream tells what it misses");
}
