//! `sockscope watch --nats`: the cluster's stream read back from a real
//! `nats-server -js`, filled by the NATS sinks of replays of the recorded
//! churn sessions of two kernels as two nodes, and checked against what
//! nats-py (`tests/nats/read_stream.py`), an independent client, reads from
//! the same stream. No mocks.
//!
//! `#[ignore]`d for a plain `cargo test` (it needs nats-server and nats-py
//! from `tests/setup`); `tests/run-all` runs it with `--include-ignored`.

#[path = "nats/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{read_stream, sockscope, write_config, NatsServer, STREAM};
use prost::Message as _;
use sockscope::export::{nats, proto};

/// The HTTP server port of the churn workload.
const SERVER_PORT: u32 = 8081;
/// The two nodes: (node name, recorded kernel).
const NODES: [(&str, &str); 2] = [("node-a", "6.1"), ("node-b", "7.2")];
/// Seconds between the first nodes' messages and the third node's.
const SINCE_GAP_S: u64 = 4;
/// How long the follower may take to see the third node's flows.
const FOLLOW_WAIT: Duration = Duration::from_secs(30);

fn config(dir: &Path, node: &str, url: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!("{node}.yaml"),
        &format!(
            "server:\n  node_name: {node}\nexport:\n  nats:\n    url: {url}\n    stream:\n      \
             create: true\n      name: {STREAM}\n"
        ),
    )
}

fn replay(dir: &Path, node: &str, kernel: &str, url: &str) {
    let rec = format!(
        "{}/tests/fixtures/recorded/{kernel}/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = sockscope(&config(dir, node, url), &["replay", "--sinks", &rec]);
    assert!(
        out.status.success(),
        "replay {node}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (node, flow id, local port, remote port) of a flow.
type Key = (String, u64, u32, u32);

fn key(node: &str, f: &proto::Flow) -> Key {
    let port = |e: &Option<proto::FlowEndpoint>| e.as_ref().map_or(0, |e| e.port);
    (node.to_string(), f.id, port(&f.local), port(&f.remote))
}

/// What nats-py read: every flow message's key, in stream order.
fn independent(url: &str, expect: usize) -> Vec<Key> {
    read_stream(url, expect, &[])
        .messages
        .iter()
        .map(|m| {
            let node = m.headers.get(nats::HEADER_NODE).expect("node header");
            key(
                node,
                &proto::Flow::decode(m.payload.as_slice()).expect("Flow"),
            )
        })
        .collect()
}

/// What `watch --nats --format json` printed: keys and stream sequences.
fn watched(lines: &str) -> (Vec<Key>, Vec<u64>) {
    let mut keys = Vec::new();
    let mut seqs = Vec::new();
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let f = &v["flow"];
        let port = |e: &serde_json::Value| e["port"].as_u64().unwrap_or(0) as u32;
        keys.push((
            v["nodeName"].as_str().expect("nodeName").to_string(),
            f["id"].as_str().expect("id").parse().expect("id"),
            port(&f["local"]),
            port(&f["remote"]),
        ));
        seqs.push(
            v["sequence"]
                .as_str()
                .expect("sequence")
                .parse()
                .expect("seq"),
        );
    }
    (keys, seqs)
}

fn watch(dir: &Path, url: &str, args: &[&str]) -> String {
    let out = sockscope(
        &config(dir, "reader", url),
        &[&["watch", "--nats", url, "--format", "json"], args].concat(),
    );
    assert!(
        out.status.success(),
        "watch --nats {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// A server whose stream holds the replays of both [`NODES`]; its URL, and
/// what nats-py reads from it.
fn two_nodes(dir: &Path) -> (NatsServer, String, Vec<Key>) {
    let server = NatsServer::start(dir, &[]);
    let url = server.url();
    for (node, kernel) in NODES {
        replay(dir, node, kernel, &url);
    }
    let want = independent(&url, 1);
    (server, url, want)
}

#[test]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
fn watch_reads_the_cluster_stream_as_an_independent_client_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url, want) = two_nodes(dir.path());
    assert!(want.len() > 100, "only {} flows in the stream", want.len());
    let per_node = |keys: &[Key]| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for k in keys {
            *m.entry(k.0.clone()).or_default() += 1;
        }
        m
    };
    assert_eq!(per_node(&want).len(), 2, "both nodes published");

    // Everything, in stream order, once each, with the stream's sequences.
    let (got, seqs) = watched(&watch(dir.path(), &url, &["--number", "1000000"]));
    assert_eq!(got, want, "watch --nats vs nats-py, in stream order");
    assert_eq!(seqs, (1..=want.len() as u64).collect::<Vec<_>>());

    // The last N messages.
    let (last, _) = watched(&watch(dir.path(), &url, &["--number", "7"]));
    assert_eq!(last, want[want.len() - 7..].to_vec());

    // Filters as on a daemon: the workload's server port, one node's.
    let (port, _) = watched(&watch(
        dir.path(),
        &url,
        &["--number", "1000000", "--port", &SERVER_PORT.to_string()],
    ));
    let want_port: Vec<Key> = want
        .iter()
        .filter(|k| k.2 == SERVER_PORT || k.3 == SERVER_PORT)
        .cloned()
        .collect();
    assert!(!want_port.is_empty() && want_port.len() < want.len());
    assert_eq!(port, want_port);

    // A bad filter is a usage error naming the field.
    let out = sockscope(
        &config(dir.path(), "reader", &url),
        &[
            "watch",
            "--nats",
            &url,
            "--number",
            "1",
            "--ip",
            "10.0.0.0/33",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ip[0]"),
        "{out:?}"
    );

    // Following: a third node's flows, published after the read started.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .arg("-c")
        .arg(config(dir.path(), "reader", &url))
        .args(["watch", "--nats", &url, "--format", "json", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the follower");
    // The follower reads new messages only: give it time to make its
    // consumer before the third node publishes. The pause also parts the
    // third node's messages from the others in time, for --since below.
    std::thread::sleep(Duration::from_secs(SINCE_GAP_S));
    let mark = Instant::now();
    replay(dir.path(), "node-c", "6.12", &url);
    let all = independent(&url, want.len() + 1);
    let third: Vec<Key> = all[want.len()..].to_vec();
    assert!(!third.is_empty() && third.iter().all(|k| k.0 == "node-c"));
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = String::new();
    let t0 = Instant::now();
    let mut n = 0;
    while n < third.len() && t0.elapsed() < FOLLOW_WAIT {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push_str(&l);
            lines.push('\n');
            n += 1;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(
        watched(&lines).0,
        third,
        "the follower saw the new node's flows"
    );

    // Replay by time: what was stored since half the pause before the
    // third node published, the third node's.
    let since = mark.elapsed() + Duration::from_secs(SINCE_GAP_S / 2);
    let (recent, _) = watched(&watch(
        dir.path(),
        &url,
        &["--since", &format!("{}ms", since.as_millis())],
    ));
    assert_eq!(recent, third, "--since {since:?}");

    // No stream: a clear error, exit code 3.
    let out = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .args([
            "-E",
            "export.nats.stream.name=NOPE",
            "watch",
            "--nats",
            &url,
            "--number",
            "1",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"NOPE\""),
        "{out:?}"
    );
    drop(server);
}

/// A `sockscope relay` child on a free port, killed when dropped.
struct RelayChild(std::process::Child, u16);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_relay(dir: &Path, url: &str) -> RelayChild {
    let port = harness::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .arg("-c")
        .arg(config(dir, "relay", url))
        .args(["relay", "--nats", url, "--name", "relay-1"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "relay did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    RelayChild(child, port)
}

#[test]
#[ignore = "needs nats-server, nats-py and grpcurl (tests/setup): tests/run-all runs it"]
fn relay_serves_every_nodes_flows_to_unchanged_clients() {
    use sockscope::export::proto::flow_service_client::FlowServiceClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url, want) = two_nodes(dir.path());
    let relay = start_relay(dir.path(), &url);
    let addr = format!("127.0.0.1:{}", relay.1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = FlowServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to the relay");
        // Everything, and the responses numbered as a daemon numbers them.
        let mut s = c
            .stream_flows(proto::StreamFlowsRequest {
                number: 1_000_000,
                ..Default::default()
            })
            .await
            .expect("StreamFlows")
            .into_inner();
        let (mut got, mut seqs) = (Vec::new(), Vec::new());
        while let Some(r) = s.message().await.expect("a response") {
            seqs.push(r.sequence);
            if let Some(proto::stream_flows_response::Event::Flow(f)) = &r.event {
                got.push(key(&r.node_name, f));
            }
        }
        assert_eq!(got, want, "relay vs nats-py");
        assert_eq!(seqs, (1..=want.len() as u64).collect::<Vec<_>>());
        // A filter, with packed responses.
        let mut s = c
            .stream_flows(proto::StreamFlowsRequest {
                number: 1_000_000,
                max_flows_per_response: 64,
                allow: vec![proto::FlowFilter {
                    port: vec![SERVER_PORT],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("StreamFlows")
            .into_inner();
        let mut filtered = Vec::new();
        while let Some(r) = s.message().await.expect("a response") {
            assert!(r.event.is_none(), "packed: flows only in `flows`");
            filtered.extend(r.flows.iter().map(|f| key(&r.node_name, f)));
        }
        let want_port: Vec<Key> = want
            .iter()
            .filter(|k| k.2 == SERVER_PORT || k.3 == SERVER_PORT)
            .cloned()
            .collect();
        assert_eq!(filtered, want_port);
        // A bad filter: INVALID_ARGUMENT naming the field.
        let e = c
            .stream_flows(proto::StreamFlowsRequest {
                allow: vec![proto::FlowFilter {
                    ip: vec!["nope".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect_err("a bad filter");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("allow[0].ip[0]"), "{e}");
        // The nodes in the stream, counted as nats-py counts them.
        let st = c
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("GetStatus")
            .into_inner();
        assert!(st.serving && st.node_name == "relay-1", "{st:?}");
        let mut counted: HashMap<String, u64> = HashMap::new();
        for k in &want {
            *counted.entry(k.0.clone()).or_default() += 1;
        }
        let seen: HashMap<String, u64> = st
            .nodes_seen
            .iter()
            .map(|n| (n.node_name.clone(), n.flow_messages))
            .collect();
        assert_eq!(seen, counted, "{:?}", st.nodes_seen);
        assert!(st.nodes_seen.iter().all(|n| n.last_message.is_some()));
    });
    // The bundled client, unchanged, against the relay.
    let out = sockscope(
        &config(dir.path(), "reader", &url),
        &[
            "watch", "--server", &addr, "--number", "5", "--format", "json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(lines.len(), 5);
    // watch prints each packed flow as a one-flow response.
    let (tail, _) = watched(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(tail, want[want.len() - 5..].to_vec());
    // grpcurl, through server reflection.
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-d", r#"{"number": 3}"#, &addr])
        .arg("sockscope.v1.FlowService/StreamFlows")
        .output()
        .expect("grpcurl (tests/setup installs it)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"nodeName\"").count(), 3, "{text}");
    drop(relay);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
async fn relay_lists_each_nodes_last_published_status() {
    use sockscope::export::ecs::HostInfo;
    use sockscope::export::hub::{Hub, HubOptions};
    use sockscope::export::proto::flow_service_client::FlowServiceClient;
    use sockscope::export::status::{EmptyStatus, StatusFeed};
    use std::sync::Arc;
    const NODE: &str = "node-s";
    const FLOWS: u64 = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path(), &[]);
    let url = server.url();
    let (tx, rx) = sockscope::export::pipeline_channel(100);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(0, 100, NODE), rx);
    let cfg = sockscope::config::NatsConfig {
        url: url.clone(),
        status_interval: Duration::from_millis(200),
        stream: sockscope::config::NatsStreamConfig {
            create: true,
            name: STREAM.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let feed = StatusFeed::new(Arc::new(EmptyStatus::default()), hub.clone(), NODE);
    let (running, counters) = nats::spawn(&hub, &cfg, NODE, HostInfo::default(), Some(feed))
        .await
        .expect("sink");
    for id in 1..=FLOWS {
        assert!(tx.send(harness::flow(id)));
    }
    let t0 = Instant::now();
    while counters
        .published
        .load(std::sync::atomic::Ordering::Relaxed)
        < FLOWS
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "flows not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few status periods.
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(tx);
    running
        .finish(Duration::from_secs(10))
        .await
        .expect("sink finished");
    hub_task.abort();

    // What nats-py reads: the flows, and status messages on their own
    // subject, each a GetStatusResponse of the node.
    let url2 = url.clone();
    let msgs = tokio::task::spawn_blocking(move || read_stream(&url2, FLOWS as usize + 2, &[]))
        .await
        .expect("read");
    let statuses: Vec<proto::GetStatusResponse> = msgs
        .messages
        .iter()
        .filter(|m| m.subject == format!("sockscope.flows.{NODE}.status"))
        .map(|m| {
            assert_eq!(
                m.headers.get(nats::HEADER_CONTENT_TYPE).map(String::as_str),
                Some(nats::CONTENT_STATUS_PROTOBUF)
            );
            proto::GetStatusResponse::decode(m.payload.as_slice()).expect("a status")
        })
        .collect();
    assert!(statuses.len() >= 2, "{} status messages", statuses.len());
    assert!(statuses.iter().all(|s| s.node_name == NODE));
    let last_flows = statuses.last().expect("a status").flows_received;

    let relay = start_relay(dir.path(), &url);
    let mut c = FlowServiceClient::connect(format!("http://127.0.0.1:{}", relay.1))
        .await
        .expect("connect to the relay");
    let st = c
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    let n = st
        .nodes_seen
        .iter()
        .find(|n| n.node_name == NODE)
        .unwrap_or_else(|| panic!("{NODE} not seen: {:?}", st.nodes_seen));
    assert_eq!(n.flow_messages, FLOWS, "status messages counted as flows");
    let s = n.status.as_ref().expect("the node's last status");
    assert_eq!((s.node_name.as_str(), s.flows_received), (NODE, last_flows));
    assert!(n.status_time.is_some());

    // `watch --nats` reads the flows only, and says nothing of the status
    // messages.
    let d = dir.path().to_path_buf();
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sockscope"))
            .arg("-c")
            .arg(config(&d, "reader", &u))
            .args([
                "watch", "--nats", &u, "--number", "1000", "--format", "json",
            ])
            .output()
            .expect("watch")
    })
    .await
    .expect("watch");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\"flow\"")).count() as u64,
        FLOWS
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("skipped"), "{stderr}");
    drop(relay);
    drop(server);
}
