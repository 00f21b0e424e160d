//! The OTLP logs sink against a real OTLP/gRPC receiver built from the
//! OpenTelemetry protocol's own Python stubs (`tests/otlp/receiver.py`,
//! PyPI `opentelemetry-proto` and grpcio), independent of the daemon's
//! code. No mocks.
//!
//! The stubs come from `tests/setup`; without them these tests fail with
//! that fix. They are `#[ignore]`d for a plain `cargo test`; `tests/run-all`
//! runs them (`cargo test -- --include-ignored`).

#[path = "nats/harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::{
    captured_directions, flow, free_port, pki, python, replay_counts, sockscope, write_config,
    KERNELS, SERVER_PORT,
};
use serde_json::Value;
use sockscope::config::OtlpConfig;
use sockscope::export::ecs::HostInfo;
use sockscope::export::hub::{Hub, HubOptions, SubscribeRequest};
use sockscope::export::status::StatusSnapshot;
use sockscope::export::{self as export, otlp, proto};
use tokio_stream::StreamExt;

/// How long a condition may take to become true.
const WAIT: Duration = Duration::from_secs(20);
/// The header the receiver asks for in the tests that check it.
const AUTH_VALUE: &str = "Bearer otlp-s3cret-t0ken";

/// The receiver as a child process, killed when dropped.
struct Receiver {
    child: Option<Child>,
    port: u16,
    out: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, args: &[&str]) -> Receiver {
        let mut r = Receiver {
            child: None,
            port: free_port(),
            out: dir.join("received.jsonl"),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: dir.to_path_buf(),
        };
        r.run();
        r
    }

    /// Starts (again) on the same port, appending to the same output.
    fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port_file = self.dir.join("receiver.port");
        let _ = std::fs::remove_file(&port_file);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg("--out")
            .arg(&self.out)
            .arg("--port-file")
            .arg(&port_file)
            .args(["--port", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3 (tests/setup installs grpcio and opentelemetry-proto)");
        let t0 = Instant::now();
        while !port_file.exists() {
            if let Some(st) = child.try_wait().expect("wait") {
                panic!(
                    "the OTLP receiver exited ({st}): tests/setup installs grpcio and \
                     opentelemetry-proto"
                );
            }
            assert!(t0.elapsed() < WAIT, "the OTLP receiver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// What it received so far.
    fn got(&self) -> Received {
        Received::parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An attribute value of the proto3 JSON form as plain JSON.
fn plain(v: &Value) -> Value {
    if let Some(s) = v.get("stringValue") {
        return s.clone();
    }
    if let Some(i) = v.get("intValue") {
        // proto3 JSON writes 64-bit integers as strings.
        let n: i64 = i.as_str().expect("intValue").parse().expect("integer");
        return Value::from(n);
    }
    if let Some(b) = v.get("boolValue") {
        return b.clone();
    }
    if let Some(d) = v.get("doubleValue") {
        return d.clone();
    }
    if let Some(a) = v.get("arrayValue") {
        let vals = a
            .get("values")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        return Value::Array(vals.iter().map(plain).collect());
    }
    panic!("attribute value {v}");
}

fn attributes(v: &Value) -> HashMap<String, Value> {
    let list = v["attributes"].as_array().cloned().unwrap_or_default();
    let mut m = HashMap::new();
    for a in &list {
        let key = a["key"].as_str().expect("key").to_string();
        assert!(
            m.insert(key.clone(), plain(&a["value"])).is_none(),
            "attribute {key} twice"
        );
    }
    m
}

/// One log record as received.
#[derive(Debug)]
struct Rec {
    event: String,
    time_unix_nano: u64,
    body: String,
    attrs: HashMap<String, Value>,
    resource: HashMap<String, Value>,
}

/// Everything the receiver wrote.
#[derive(Debug, Default)]
struct Received {
    /// Records of the requests it answered "ok".
    records: Vec<Rec>,
    /// (answer, records, metadata) of every request.
    requests: Vec<(String, usize, HashMap<String, String>)>,
}

impl Received {
    fn parse(text: &str) -> Received {
        let mut got = Received::default();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("receiver's JSON line");
            let answer = v["answer"].as_str().expect("answer").to_string();
            let metadata = v["metadata"]
                .as_object()
                .expect("metadata")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let mut n = 0;
            for rl in v["request"]["resourceLogs"]
                .as_array()
                .expect("resourceLogs")
            {
                let resource = attributes(&rl["resource"]);
                for sl in rl["scopeLogs"].as_array().expect("scopeLogs") {
                    assert_eq!(sl["scope"]["name"], "sockscope");
                    for r in sl["logRecords"].as_array().expect("logRecords") {
                        n += 1;
                        if answer == "ok" {
                            got.records.push(Rec {
                                event: r["eventName"].as_str().unwrap_or_default().to_string(),
                                time_unix_nano: r["timeUnixNano"]
                                    .as_str()
                                    .unwrap_or("0")
                                    .parse()
                                    .expect("time"),
                                body: r["body"]["stringValue"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                                attrs: attributes(r),
                                resource: resource.clone(),
                            });
                        }
                    }
                }
            }
            got.requests.push((answer, n, metadata));
        }
        got
    }

    fn flows(&self) -> impl Iterator<Item = &Rec> {
        self.records
            .iter()
            .filter(|r| r.event.starts_with("sockscope.flow"))
    }

    /// (source, count) of every loss record.
    fn losses(&self) -> Vec<(String, u64)> {
        self.records
            .iter()
            .filter(|r| r.event == "sockscope.loss")
            .map(|r| {
                (
                    r.attrs["sockscope.loss.source"]
                        .as_str()
                        .expect("source")
                        .to_string(),
                    r.attrs["sockscope.loss.count"].as_u64().expect("count"),
                )
            })
            .collect()
    }

    /// The flows' ids (`flow.id`).
    fn ids(&self) -> Vec<u64> {
        self.flows()
            .map(|r| {
                r.attrs["flow.id"]
                    .as_str()
                    .expect("flow.id")
                    .parse()
                    .expect("id")
            })
            .collect()
    }
}

fn ep(attrs: &HashMap<String, Value>, side: &str) -> String {
    format!(
        "{}:{}",
        attrs[&format!("{side}.ip")].as_str().expect("ip"),
        attrs[&format!("{side}.port")]
    )
}

#[test]
#[ignore = "needs grpcio and opentelemetry-proto (tests/setup): tests/run-all runs it"]
fn replayed_flows_arrive_as_log_records_with_ecs_attributes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recv = Receiver::start(
        dir.path(),
        &["--require", &format!("authorization={AUTH_VALUE}")],
    );
    let url = recv.url("http");
    let mut produced: HashMap<String, u64> = HashMap::new();
    for kernel in KERNELS {
        let node = format!("node-{kernel}");
        let cfg = write_config(
            dir.path(),
            &format!("{kernel}.yaml"),
            &format!(
                "server:\n  node_name: {node}\nlog:\n  level: debug\nexport:\n  otlp:\n    \
                 endpoint: {url}\n    max_batch_size: 50\n    compression: gzip\n    \
                 headers:\n      Authorization: {AUTH_VALUE:?}\n    resource_attributes:\n      \
                 k8s.cluster.name: test-cluster\n"
            ),
        );
        let rec = format!(
            "{}/tests/fixtures/recorded/{kernel}/churn.rec",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{kernel}: {stdout}{stderr}");
        assert!(
            !stdout.contains("s3cret") && !stderr.contains("s3cret"),
            "the header's value in the output"
        );
        let (flows, sink) = replay_counts(&stdout, "otlp");
        assert_eq!(
            sink,
            format!(
                "sink otlp:{url}: delivered {flows} flows, 0 loss notices counting 0 lost records"
            )
        );
        produced.insert(node, flows);
    }
    let got = recv.got();
    for (answer, n, metadata) in &got.requests {
        assert_eq!(answer, "ok");
        assert!(*n <= 50, "a request of {n} records (max_batch_size 50)");
        assert_eq!(
            metadata.get("authorization").map(String::as_str),
            Some(AUTH_VALUE)
        );
    }
    assert!(got.losses().is_empty(), "{:?}", got.losses());
    let mut per_node: HashMap<String, u64> = HashMap::new();
    let mut seen: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    let mut ids = HashSet::new();
    for r in got.flows() {
        let node = r.resource["sockscope.node.name"]
            .as_str()
            .expect("sockscope.node.name")
            .to_string();
        assert!(r.resource.contains_key("host.name"));
        assert_eq!(r.resource["service.name"], "sockscope");
        assert_eq!(r.resource["agent.type"], "sockscope");
        assert_eq!(r.resource["k8s.cluster.name"], "test-cluster");
        assert_eq!(r.event, "sockscope.flow");
        assert!(r.time_unix_nano > 0);
        let a = &r.attrs;
        for key in [
            "network.transport",
            "network.direction",
            "network.community_id",
            "network.bytes",
            "network.packets",
            "source.bytes",
            "destination.packets",
            "event.start",
            "event.end",
            "event.duration",
        ] {
            assert!(a.contains_key(key), "{key} missing in {a:?}");
        }
        assert_eq!(a["event.action"], "network_flow");
        assert_eq!(a["flow.final"], true);
        assert!(!a.contains_key("host.name"), "node facts on the record");
        assert!(
            ids.insert((node.clone(), a["flow.id"].clone())),
            "a flow twice"
        );
        let transport = a["network.transport"].as_str().expect("transport");
        assert!(r.body.starts_with(transport), "{}", r.body);
        *per_node.entry(node.clone()).or_default() += 1;
        let (src, dst) = (ep(a, "source"), ep(a, "destination"));
        let (local, remote) = match a["network.direction"].as_str() {
            Some("outbound") => (src, dst),
            Some("inbound") => (dst, src),
            other => panic!("direction {other:?}"),
        };
        let on_port = |e: &str| e.ends_with(&format!(":{SERVER_PORT}"));
        if transport == "tcp" && (on_port(&local) || on_port(&remote)) {
            assert!(
                seen.entry(node)
                    .or_default()
                    .insert((local.clone(), remote.clone())),
                "flow {local} -> {remote} twice"
            );
            assert!(a.contains_key("process.pid"), "no process on {a:?}");
        }
    }
    assert_eq!(per_node, produced, "log records per node vs flows replayed");
    for kernel in KERNELS {
        // Every socket of the workload sent to its peer: its flow is one
        // direction of the capture, and every captured direction is a flow.
        assert_eq!(
            seen.remove(&format!("node-{kernel}")).unwrap_or_default(),
            captured_directions(kernel),
            "{kernel}: log records vs the tcpdump capture"
        );
    }
}

fn sink_config(url: &str) -> OtlpConfig {
    OtlpConfig {
        endpoint: url.to_string(),
        batch_timeout: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..OtlpConfig::default()
    }
}

/// The sink's subscriber entry as `GetStatus` reports it.
async fn sink_status(hub: &Hub, url: &str) -> proto::SubscriberStatus {
    let hub_status = hub.status().await.expect("status");
    let resp = export::status::to_proto(&StatusSnapshot::default(), &hub_status, "n1", true);
    resp.subscribers
        .into_iter()
        .find(|s| s.peer == format!("otlp:{url}"))
        .expect("the OTLP sink is a subscriber")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs grpcio and opentelemetry-proto (tests/setup): tests/run-all runs it"]
async fn receiver_down_drops_are_counted_and_told_and_nothing_stalls() {
    const QUEUE: usize = 20;
    const OFFERED: u64 = 250;
    let dir = tempfile::tempdir().expect("tempdir");
    // The port is reserved, the receiver not started yet.
    let mut recv = Receiver::start(dir.path(), &[]);
    recv.stop();
    let url = recv.url("http");
    let (tx, rx) = export::pipeline_channel(10_000);
    let mut opts = HubOptions::new(0, 100, "n1");
    opts.slow_seconds = 1;
    let (hub, hub_task) = Hub::spawn(opts, rx);
    // Another subscriber with room for everything: it must get every
    // record while the sink cannot deliver.
    let mut other = hub
        .subscribe(SubscribeRequest {
            follow: true,
            peer: "other".into(),
            queue_size: Some(1000),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe");
    let cfg = OtlpConfig {
        queue_size: QUEUE,
        max_batch_size: 10,
        max_retry_time: Duration::from_millis(800),
        ..sink_config(&url)
    };
    let (running, counters) = otlp::spawn(&hub, &cfg, "n1", HostInfo::default(), None)
        .await
        .expect("sink");
    for id in 1..=100 {
        assert!(tx.send(flow(id)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut other_got = 0u64;
    while other_got < 100 {
        match tokio::time::timeout(WAIT, other.next()).await {
            Ok(Some(Ok(r))) => other_got += r.flows.len() as u64 + u64::from(r.payload.is_some()),
            x => panic!("the other subscriber stalled: {x:?}"),
        }
    }
    let st = sink_status(&hub, &url).await;
    let sink = st.sink.clone().expect("sink counters");
    assert!(!sink.connected);
    assert_eq!((sink.kind.as_str(), sink.published), ("otlp", 0));
    assert!(sink.retries > 0, "no retry while the receiver was away");
    assert!(
        sink.dropped > 0 && st.drops > 0,
        "a dead receiver for 2 s: the sink gave up {} and the hub dropped {}",
        sink.dropped,
        st.drops
    );
    let labels = format!("{{sink=\"otlp\",peer=\"otlp:{url}\"}}");
    assert_eq!(
        metric(&hub, &format!("sockscope_sink_dropped_total{labels}")).await,
        sink.dropped as f64
    );

    recv.run();
    // Records trickle until the receiver takes one (the sink first gives up
    // or delivers what it held); from then on it keeps up.
    let mut next = 101;
    while counters.published.load(Ordering::Relaxed) == 0 {
        assert!(
            next <= OFFERED - 50,
            "the sink did not deliver within 10 s of the return"
        );
        assert!(tx.send(flow(next)));
        next += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = next;
    for id in resumed..=OFFERED {
        assert!(tx.send(flow(id)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tx);
    let report = running.finish(WAIT).await.expect("sink finished");
    hub_task.abort();
    let got = recv.got();
    let ids = got.ids();
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a record received twice");
    assert!(
        (resumed..=OFFERED).all(|id| unique.contains(&id)),
        "records after the return"
    );
    let told: u64 = got.losses().iter().map(|(_, n)| n).sum();
    let sources: HashSet<String> = got.losses().into_iter().map(|(s, _)| s).collect();
    assert!(sources.contains("LOSS_SOURCE_SINK"), "{sources:?}");
    assert!(
        sources.contains("LOSS_SOURCE_SUBSCRIBER_QUEUE"),
        "{sources:?}"
    );
    // Every record offered was received or told as lost, once.
    assert_eq!(
        ids.len() as u64 + told,
        OFFERED,
        "received {} + told {told}",
        ids.len()
    );
    assert_eq!(report.delivered, ids.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs grpcio and opentelemetry-proto (tests/setup): tests/run-all runs it"]
async fn unavailable_is_retried_refusals_dropped_and_rejections_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, recv_args: Vec<String>, cfg: fn(&str) -> OtlpConfig, n: u64| {
        let dir = dir.path().join(name);
        async move {
            std::fs::create_dir_all(&dir).expect("dir");
            let args: Vec<&str> = recv_args.iter().map(String::as_str).collect();
            let recv = Receiver::start(&dir, &args);
            let url = recv.url("http");
            let (tx, rx) = export::pipeline_channel(1000);
            let (hub, hub_task) = Hub::spawn(HubOptions::new(0, 100, "n1"), rx);
            let (running, counters) =
                otlp::spawn(&hub, &cfg(&url), "n1", HostInfo::default(), None)
                    .await
                    .expect("sink");
            for id in 1..=n {
                assert!(tx.send(flow(id)));
            }
            drop(tx);
            let report = running.finish(WAIT).await.expect("sink finished");
            hub_task.abort();
            (report, counters, recv.got())
        }
    };
    // Two UNAVAILABLE answers, then taken: all delivered once.
    let (report, c, got) = run(
        "unavailable",
        vec!["--fail-first".into(), "2".into()],
        |u| OtlpConfig {
            max_batch_size: 100,
            ..sink_config(u)
        },
        30,
    )
    .await;
    assert_eq!(report.delivered, 30);
    assert_eq!(c.retries.load(Ordering::Relaxed), 2);
    assert_eq!(c.dropped.load(Ordering::Relaxed), 0);
    let mut ids = got.ids();
    ids.sort_unstable();
    assert_eq!(ids, (1..=30).collect::<Vec<u64>>());
    assert_eq!(
        got.requests.iter().filter(|r| r.0 == "UNAVAILABLE").count(),
        2
    );

    // A refusal (no credentials): not retried, dropped and counted, and the
    // loss is in the next request, which is refused too.
    let (report, c, got) = run(
        "refused",
        vec!["--require".into(), format!("authorization={AUTH_VALUE}")],
        |u| OtlpConfig {
            max_batch_size: 10,
            ..sink_config(u)
        },
        25,
    )
    .await;
    assert_eq!(report.delivered, 0);
    assert_eq!(c.retries.load(Ordering::Relaxed), 0);
    assert_eq!(c.dropped.load(Ordering::Relaxed), 25);
    assert_eq!(report.lost, 25);
    assert!(got.requests.iter().all(|r| r.0 == "UNAUTHENTICATED"));
    assert!(got.records.is_empty());

    // Partial success: the rejected records are counted, the rest taken.
    let (report, c, got) = run(
        "partial",
        vec!["--reject-first".into(), "3".into()],
        |u| OtlpConfig {
            max_batch_size: 100,
            ..sink_config(u)
        },
        20,
    )
    .await;
    assert_eq!(c.rejected.load(Ordering::Relaxed), 3);
    assert_eq!(c.published.load(Ordering::Relaxed), 17);
    assert_eq!(report.delivered, 17);
    assert_eq!(got.ids().len(), 20, "the receiver saw all, rejected 3");
}

#[test]
#[ignore = "needs grpcio, opentelemetry-proto and openssl (tests/setup): tests/run-all runs it"]
fn tls_with_a_ca_file_and_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let s = |p: &PathBuf| p.display().to_string();
    let recv = Receiver::start(
        dir.path(),
        &[
            "--tls-cert",
            &s(&pki.server_cert),
            "--tls-key",
            &s(&pki.server_key),
            "--client-ca",
            &s(&pki.ca),
        ],
    );
    let url = recv.url("https");
    let kernel = "6.1";
    let rec = format!(
        "{}/tests/fixtures/recorded/{kernel}/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = write_config(
        dir.path(),
        "tls.yaml",
        &format!(
            "export:\n  otlp:\n    endpoint: {url}\n    tls:\n      ca_file: {}\n      \
             cert_file: {}\n      key_file: {}\n",
            s(&pki.ca),
            s(&pki.client_cert),
            s(&pki.client_key)
        ),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (flows, sink) = replay_counts(&stdout, "otlp");
    assert!(flows > 0);
    assert!(sink.contains(&format!("delivered {flows} flows")), "{sink}");
    assert_eq!(recv.got().flows().count() as u64, flows);

    // Without the client certificate the receiver refuses the handshake:
    // nothing is delivered, all of it counted.
    let cfg = write_config(
        dir.path(),
        "no-client-cert.yaml",
        &format!(
            "export:\n  otlp:\n    endpoint: {url}\n    max_retry_time: 1s\n    tls:\n      \
             ca_file: {}\n",
            s(&pki.ca)
        ),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (_, sink) = replay_counts(&stdout, "otlp");
    assert!(sink.contains("delivered 0 flows"), "{sink}");

    // A system without CA certificates (as a minimal image): the
    // configured CA alone; without it, an error naming the key.
    let no_system_cas = |cfg: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sockscope"))
            .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
            .env("SSL_CERT_DIR", "/nonexistent")
            .arg("-c")
            .arg(cfg)
            .args(["replay", "--sinks", &rec])
            .output()
            .expect("run sockscope")
    };
    let out = no_system_cas(&dir.path().join("tls.yaml"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (flows2, sink) = replay_counts(&stdout, "otlp");
    assert!(
        sink.contains(&format!("delivered {flows2} flows")),
        "{sink}"
    );
    let cfg = write_config(
        dir.path(),
        "no-ca.yaml",
        &format!("export:\n  otlp:\n    endpoint: {url}\n"),
    );
    let out = no_system_cas(&cfg);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export.otlp.tls.ca_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An unreadable CA file is a configuration error naming the key.
    let cfg = write_config(
        dir.path(),
        "bad.yaml",
        &format!(
            "export:\n  otlp:\n    endpoint: {url}\n    tls:\n      ca_file: /nonexistent.pem\n"
        ),
    );
    let out = sockscope(&cfg, &["replay", "--sinks", &rec]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export.otlp.tls.ca_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
