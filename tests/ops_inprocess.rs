//! In-process tests of the operations features: the JSON lines output as a
//! hub subscriber with filters, the Prometheus endpoint over real HTTP
//! against the status it mirrors, the health-only listener, and the new
//! configuration keys.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use sockscope::config::{self, Config, JsonlConfig};
use sockscope::export::ecs::HostInfo;
use sockscope::export::encoded::Payload;
use sockscope::export::hub::{Hub, HubOptions, SubscribeRequest};
use sockscope::export::metrics::{self, MetricsSource};
use sockscope::export::proto;
use sockscope::export::status::{CpuCounters, StatusSnapshot, StatusSource};
use sockscope::export::{self as export, jsonl, HealthHandle, ServerOptions};
use sockscope::model::{Endpoint, FlowDirection, FlowRecord, Output, ProcessInfo, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);

fn flow(id: u64, remote_port: u16, name: &str, is_final: bool) -> Output {
    let end = SystemTime::now();
    let ep = |ip: &str, port: u16| Endpoint {
        ip: ip.parse().expect("ip"),
        port,
        packets: 2,
        bytes: 120,
        domain: None,
        sequence: None,
    };
    Output::Flow(Arc::new(FlowRecord {
        id,
        is_final,
        complete: true,
        transport: Transport::Tcp,
        direction: FlowDirection::Egress,
        local: ep("10.0.0.1", 40000 + id as u16),
        remote: ep("10.0.0.2", remote_port),
        start: end - Duration::from_millis(5),
        end,
        community_id: "1:x".into(),
        sock: 0x1000 + id,
        process: Some(ProcessInfo {
            pid: 100 + id as u32,
            name: name.into(),
            ..ProcessInfo::default()
        }),
        accounting: Default::default(),
        pod: None,
        remote_pod: None,
    }))
}

fn ids_in_jsonl(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("each line is JSON");
            assert_eq!(v["event"]["dataset"], "socket", "an ECS flow document");
            v["flow"]["id"]
                .as_str()
                .expect("flow.id")
                .parse()
                .expect("numeric id")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_writes_the_flows_a_subscriber_with_the_same_filter_gets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out/flows.jsonl");
    let cfg = JsonlConfig {
        path: path.display().to_string(),
        filters: vec![
            json!({"destination_port": [443]}),
            json!({"process_name": ["dig"]}),
        ],
        deny: vec![json!({"process_name": ["blocked"]})],
        ..JsonlConfig::default()
    };
    let (tx, rx) = export::pipeline_channel(1000);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(100, 1000, "node"), rx);
    let writer = jsonl::spawn(&hub, &cfg, HostInfo::default())
        .await
        .expect("jsonl output");
    // The same filters as a gRPC request would carry.
    let allow: Vec<proto::FlowFilter> = cfg
        .filters
        .iter()
        .map(|v| jsonl::filter_from_value("f", v).expect("filter"))
        .collect();
    let deny = vec![proto::FlowFilter {
        process_name: vec!["blocked".into()],
        ..proto::FlowFilter::default()
    }];
    let mut sub = hub
        .subscribe(
            export::server::subscribe_request(
                &proto::StreamFlowsRequest {
                    follow: true,
                    allow,
                    deny,
                    ..proto::StreamFlowsRequest::default()
                },
                "test".into(),
            )
            .expect("request"),
        )
        .await
        .expect("subscribe");
    for out in [
        flow(1, 443, "curl", true),    // allowed by port
        flow(2, 80, "curl", true),     // no allow filter matches
        flow(3, 443, "blocked", true), // denied
        flow(4, 53, "dig", true),      // allowed by name
        flow(5, 443, "curl", false),   // interim: not without include_updates
        flow(6, 8443, "wget", true),   // no allow filter matches
        flow(7, 443, "wget", true),    // allowed by port
    ] {
        assert!(tx.send(out), "pipeline refused an output");
    }
    drop(tx); // the pipeline ends: subscribers' streams end after delivery
    let mut from_sub = Vec::new();
    while let Some(item) = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("timeout")
    {
        if let Some(Payload::Flow(f)) = item.expect("stream item").payload {
            from_sub.push(f.record.id);
        }
    }
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer finishes when the pipeline ends")
        .expect("writer task");
    let text = std::fs::read_to_string(&path).expect("jsonl file");
    let written = ids_in_jsonl(&text);
    assert_eq!(written, vec![1, 4, 7]);
    assert_eq!(written, from_sub);
    hub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_include_updates_and_rotation_through_the_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flows.jsonl");
    let cfg = JsonlConfig {
        path: path.display().to_string(),
        include_updates: true,
        // A document is several hundred bytes: every file holds one line.
        max_size: 64,
        max_files: 3,
        ..JsonlConfig::default()
    };
    let (tx, rx) = export::pipeline_channel(1000);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(100, 1000, "node"), rx);
    let writer = jsonl::spawn(&hub, &cfg, HostInfo::default())
        .await
        .expect("jsonl output");
    for id in 1..=5 {
        assert!(tx.send(flow(id, 443, "curl", id % 2 == 0)));
    }
    drop(tx);
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer finishes")
        .expect("writer task");
    let read = |p: &std::path::Path| ids_in_jsonl(&std::fs::read_to_string(p).expect("file"));
    assert_eq!(read(&path), vec![5]);
    assert_eq!(read(&jsonl::RotatingFile::rotated_path(&path, 1)), vec![4]);
    assert_eq!(read(&jsonl::RotatingFile::rotated_path(&path, 2)), vec![3]);
    assert!(!jsonl::RotatingFile::rotated_path(&path, 3).exists());
    hub_task.abort();
}

/// A status source whose counters grow on every snapshot.
struct Growing {
    n: AtomicU64,
}

impl StatusSource for Growing {
    fn snapshot(&self) -> StatusSnapshot {
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        StatusSnapshot {
            uptime: Duration::from_secs(n),
            kernel_release: "6.1.0-test".into(),
            offsets_source: "btf".into(),
            probes: vec!["sockscope/a".into(), "sockscope/b".into()],
            cpus: vec![
                CpuCounters {
                    cpu: 0,
                    samples: 10 * n,
                    lost: n,
                },
                CpuCounters {
                    cpu: 1,
                    samples: 20 * n,
                    lost: 0,
                },
            ],
            decode_errors: n,
            tracked_flows: 3,
            ..StatusSnapshot::default()
        }
    }
}

async fn http_get(addr: SocketAddr, request: &str) -> (String, String) {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(request.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    (head.to_string(), body.to_string())
}

fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
        .parse()
        .expect("number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_status_over_http() {
    let (tx, rx) = export::pipeline_channel(1000);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(100, 1000, "node"), rx);
    let _sub = hub
        .subscribe(SubscribeRequest {
            follow: true,
            peer: "peer-1".into(),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe");
    for id in 1..=4 {
        assert!(tx.send(flow(id, 443, "curl", true)));
    }
    let health = HealthHandle::new();
    health.set_serving(true);
    let status = Arc::new(Growing {
        n: AtomicU64::new(0),
    });
    let (addr, stop_tx, server) = spawn_metrics(MetricsSource {
        status: status.clone(),
        hub: hub.clone(),
        health,
    })
    .await;
    // The hub handles outputs asynchronously: wait until all four arrived.
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.status().await.expect("hub").flows_received < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub did not see the flows"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (head, body) = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains(metrics::CONTENT_TYPE), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("length")
        .parse()
        .expect("number");
    assert_eq!(len, body.len());
    // The first snapshot is n = 1.
    assert_eq!(
        value(&body, "sockscope_ring_samples_total{cpu=\"1\"}"),
        20.0
    );
    assert_eq!(value(&body, "sockscope_decode_errors_total"), 1.0);
    assert_eq!(value(&body, "sockscope_flows_emitted_total"), 4.0);
    assert_eq!(value(&body, "sockscope_history_flows"), 4.0);
    assert_eq!(value(&body, "sockscope_subscribers"), 1.0);
    assert_eq!(
        value(
            &body,
            "sockscope_subscriber_delivered{subscriber=\"1\",peer=\"peer-1\"}"
        ),
        4.0
    );
    assert_eq!(value(&body, "sockscope_serving"), 1.0);
    assert_eq!(value(&body, "sockscope_probes_installed"), 2.0);
    // A second scrape reads a fresh snapshot.
    let (_, body2) = http_get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(value(&body2, "sockscope_decode_errors_total"), 2.0);

    let (head, _) = http_get(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http_get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let (head, body) = http_get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    let (head, _) = http_get(addr, "garbage\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    stop_metrics(stop_tx, server).await;
    hub_task.abort();
}

/// Sends `request` (raw bytes) and reads what comes back until the server
/// closes; a reset or a refused write counts as closed.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = c.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut buf))
        .await
        .expect("the server answers or closes in time");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_survives_malformed_and_oversized_requests() {
    let (_tx, rx) = export::pipeline_channel(10);
    let (hub, hub_task) = Hub::spawn(HubOptions::new(10, 10, "node"), rx);
    let source = MetricsSource {
        status: Arc::new(Growing {
            n: AtomicU64::new(0),
        }),
        hub,
        health: HealthHandle::new(),
    };
    let (addr, stop_tx, server) = spawn_metrics(source).await;
    // A client that never finishes its head holds a connection only until
    // the header read timeout; others are served meanwhile.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");

    let long_header = format!(
        "GET /metrics HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "a".repeat(metrics::MAX_REQUEST_HEAD + 1)
    );
    let many_headers = format!(
        "GET /metrics HTTP/1.1\r\n{}\r\n",
        (0..=metrics::MAX_REQUEST_HEADERS)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let long_target = format!(
        "GET /metrics?{} HTTP/1.1\r\n\r\n",
        "q".repeat(2 * metrics::MAX_REQUEST_HEAD)
    );
    let cases: [(&str, &[u8]); 7] = [
        ("long header", long_header.as_bytes()),
        ("too many headers", many_headers.as_bytes()),
        ("long target", long_target.as_bytes()),
        ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n"),
        ("bad version", b"GET /metrics HTTP/9.9\r\n\r\n"),
        ("no version", b"GET /metrics\r\n\r\n"),
        (
            "bad header",
            b"GET /metrics HTTP/1.1\r\nNo colon here\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let response = exchange(addr, request).await;
        let status = response.split(' ').nth(1).unwrap_or("");
        assert!(
            response.is_empty() || ["400", "414", "431"].contains(&status),
            "{what}: {response:?}"
        );
        assert!(!response.contains("sockscope_"), "{what}: {response:?}");
    }
    // The server still answers a proper scrape.
    let (head, body) = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(value(&body, "sockscope_serving"), 0.0);
    // The stalled client is disconnected after the header read timeout.
    let mut rest = Vec::new();
    tokio::time::timeout(
        metrics::REQUEST_TIMEOUT + WAIT,
        stalled.read_to_end(&mut rest),
    )
    .await
    .expect("stalled connection closed")
    .ok();
    assert!(!String::from_utf8_lossy(&rest).contains("sockscope_"));

    stop_metrics(stop_tx, server).await;
    hub_task.abort();
}

/// Binds a metrics listener on a free loopback port and serves `source`
/// until the returned sender fires.
async fn spawn_metrics(
    source: MetricsSource,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = metrics::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(metrics::serve(listener, source, async move {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server)
}

async fn stop_metrics(
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
) {
    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("metrics server stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_listener_serves_health_only_in_plaintext() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut cfg = Config::default();
    cfg.server.listen = String::new();
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.server.unix_socket = dir.path().join("s.sock").display().to_string();
    // Non-loopback and no TLS: allowed because it serves health only.
    cfg.server.health_listen = "0.0.0.0:0".into();
    let opts = ServerOptions::from_config(&cfg).expect("options");
    let listeners = export::bind(&opts).await.expect("bind");
    let port = listeners.health_addr().expect("health addr").port();
    let (_tx, rx) = export::pipeline_channel(10);
    let health = HealthHandle::new();
    health.set_serving(true);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(export::serve(
        listeners,
        opts,
        rx,
        Arc::new(sockscope::export::status::EmptyStatus::default()),
        health,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let resp = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(resp.status, ServingStatus::Serving as i32);
    let err = proto::flow_service_client::FlowServiceClient::new(ch)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect_err("flow service is not on the health port");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("server stops")
        .expect("task")
        .expect("serve");
}

fn yaml(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yml")
        .tempfile()
        .expect("tempfile");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[test]
fn new_configuration_keys_load_and_validate() {
    let f = yaml(
        "socket:\n  host_root: /host\nserver:\n  health_listen: 0.0.0.0:50052\n\
         metrics:\n  listen: 0.0.0.0:9464\nexport:\n  jsonl:\n    path: /var/log/f.jsonl\n\
         \x20   max_size: 1000\n    max_files: 2\n    include_updates: true\n\
         \x20   filters:\n      - destination_port: [53]\n        transport: [TRANSPORT_UDP]\n\
         \x20   deny:\n      - process_name: [nscd]\n",
    );
    let cfg = config::load_from(Some(f.path()), Vec::new(), &[]).expect("valid config");
    assert_eq!(
        cfg.socket.host_root.as_deref(),
        Some(std::path::Path::new("/host"))
    );
    assert_eq!(cfg.server.health_listen, "0.0.0.0:50052");
    assert_eq!(cfg.metrics.listen, "0.0.0.0:9464");
    let j = &cfg.export.jsonl;
    assert_eq!(
        (j.max_size, j.max_files, j.include_updates),
        (1000, 2, true)
    );
    let f0 = jsonl::filter_from_value("f", &j.filters[0]).expect("filter");
    assert_eq!(f0.destination_port, vec![53]);
    assert_eq!(f0.transport, vec![proto::Transport::Udp as i32]);

    let defaults = Config::default();
    assert!(defaults.metrics.listen.is_empty());
    assert!(defaults.server.health_listen.is_empty());
    assert!(defaults.export.jsonl.path.is_empty());
    assert!(defaults.socket.host_root.is_none());

    for (args, key) in [
        (vec!["server.health_listen=nope"], "server.health_listen"),
        (vec!["metrics.listen=1.2.3.4"], "metrics.listen"),
        (vec!["export.jsonl.max_files=0"], "export.jsonl.max_files"),
        (vec!["metrics.bogus=1"], "metrics"),
    ] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let e = config::load_from(None, Vec::new(), &args).expect_err("invalid");
        assert!(e.to_string().starts_with(key), "{args:?}: {e}");
    }
    // The configuration checks a filter's shape; its fields are checked
    // against `FlowFilter` by the JSON lines output (at daemon start).
    let bad = yaml("export:\n  jsonl:\n    path: x\n    filters:\n      - dport: [1]\n");
    let cfg = config::load_from(Some(bad.path()), Vec::new(), &[]).expect("an object");
    let j = &cfg.export.jsonl;
    let e = jsonl::compile_filters(&j.filters, &j.deny).expect_err("unknown field");
    assert!(e.to_string().contains("filters[0]"), "{e}");
    let not_object = yaml("export:\n  jsonl:\n    deny:\n      - 53\n");
    let e = config::load_from(Some(not_object.path()), Vec::new(), &[]).expect_err("not an object");
    assert!(e.to_string().starts_with("export.jsonl.deny[0]"), "{e}");
}

/// The daemon configuration embedded in the Kubernetes ConfigMap loads with
/// this schema (the manifests' key names match the code).
#[test]
fn kubernetes_configmap_config_loads() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("daemonset.yaml");
    let mut lines = text.lines().skip_while(|l| l.trim() != "sockscope.yml: |");
    let header = lines.next().expect("ConfigMap key sockscope.yml");
    let indent = header.len() - header.trim_start().len() + 2;
    let body: String = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect();
    let f = yaml(&body);
    let cfg = config::load_from(Some(f.path()), Vec::new(), &[]).expect("embedded config");
    assert_eq!(cfg.server.health_listen, "0.0.0.0:50052");
    assert_eq!(cfg.metrics.listen, "0.0.0.0:9464");
    assert_eq!(
        cfg.socket.host_root.as_deref(),
        Some(std::path::Path::new("/host"))
    );
}
