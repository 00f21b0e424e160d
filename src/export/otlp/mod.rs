//! The OTLP logs sink (`export.otlp.*`): every flow record the hub gives
//! it becomes one OTLP `LogRecord` (see [`record`] for the attributes),
//! sent in batches to an OpenTelemetry receiver's `LogsService/Export`
//! over gRPC, so any Collector pipeline takes the flows onward.
//!
//! Delivery: one request at a time, of at most `max_batch_size` records,
//! sent when full or `batch_timeout` after its first record. A request the
//! receiver could not take (unavailable, deadline exceeded, throttled:
//! the codes OTLP calls retryable) is sent again with a backoff from
//! 100 ms doubling to 5 s, for at most `max_retry_time`; then, or at once
//! for a refusal (a code that is not retryable, e.g. unauthenticated), the
//! batch is dropped and counted (`dropped`), and the next request carries
//! a loss record (`LOSS_SOURCE_SINK`) with what was lost, so the receiver
//! is told. While a request is retried the sink reads nothing more: records
//! wait in its hub queue (`queue_size`), beyond it the hub drops them,
//! counts them against the sink (its subscriber `otlp:<endpoint>`) and
//! tells it, and the sink sends that loss notice on as a log record. A
//! receiver that is away therefore never slows the pipeline.
//!
//! Start: an endpoint, TLS file or header that is not usable stops the
//! daemon with a message naming the key; a receiver that cannot be reached
//! does not (the connection is made on first use and again after each
//! failure). Header values are secrets: sent, never logged.

pub mod record;
mod send;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{OtlpCompression, OtlpConfig};
use crate::export::ecs::HostInfo;
use crate::export::hub::{Hub, Subscription};
use crate::export::jsonl::{compile_filters, JsonlError};
use crate::export::sink::{self, RunningSink, SinkFuture, SinkSubscription};
use crate::export::status::{SinkInfo, SinkStats};

/// Errors of the OTLP sink at start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// A configured filter is invalid.
    #[error("export.otlp.{0}")]
    Filter(#[source] JsonlError),
    /// The endpoint is not usable.
    #[error("export.otlp.endpoint: {0}")]
    Endpoint(String),
    /// A TLS file could not be read or TLS not set up.
    #[error("{key}: {reason}")]
    Tls {
        /// The key at fault.
        key: &'static str,
        /// Why (no secret in it).
        reason: String,
    },
    /// A header cannot be sent as gRPC metadata.
    #[error("export.otlp.headers.{0}: not a valid gRPC metadata name or value")]
    Header(String),
    /// The hub refused the subscription.
    #[error("export.otlp: subscribing to flows: {0}")]
    Subscribe(String),
}

impl OtlpError {
    /// Whether the daemon should exit with the configuration exit code.
    pub fn exit_is_config(&self) -> bool {
        !matches!(self, OtlpError::Subscribe(_))
    }
}

/// Counters of one OTLP sink, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct OtlpCounters {
    /// Flow records the receiver accepted.
    pub published: AtomicU64,
    /// Loss records the receiver accepted.
    pub loss_notices: AtomicU64,
    /// Requests sent again after a retryable failure.
    pub retries: AtomicU64,
    /// Flow records given up (their batch refused, or not taken within
    /// `max_retry_time`).
    pub dropped: AtomicU64,
    /// Flow records the receiver said it rejected (partial success).
    pub rejected: AtomicU64,
    /// Whether the last request reached the receiver.
    pub connected: AtomicBool,
}

impl OtlpCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl SinkStats for OtlpCounters {
    fn info(&self) -> SinkInfo {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkInfo {
            kind: "otlp".to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            published: get(&self.published),
            duplicates: 0,
            retries: get(&self.retries),
            loss_notices: get(&self.loss_notices),
            dropped: get(&self.dropped),
            rejected: get(&self.rejected),
        }
    }
}

/// A configured OTLP sink, to be subscribed with [`spawn`] or
/// [`sink::start`].
pub struct OtlpSink {
    client: LogsServiceClient<Channel>,
    metadata: MetadataMap,
    cfg: OtlpConfig,
    node: String,
    host: HostInfo,
    k8s_node: Option<String>,
    counters: Arc<OtlpCounters>,
}

impl std::fmt::Debug for OtlpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSink")
            .field("endpoint", &self.cfg.endpoint)
            .finish_non_exhaustive()
    }
}

fn read(key: &'static str, path: &std::path::Path) -> Result<Vec<u8>, OtlpError> {
    std::fs::read(path).map_err(|e| OtlpError::Tls {
        key,
        reason: format!("{}: {e}", path.display()),
    })
}

/// The channel to the receiver of `cfg`, connected lazily.
fn channel(cfg: &OtlpConfig) -> Result<Channel, OtlpError> {
    let url = cfg.endpoint.trim().to_string();
    let mut ep = Endpoint::from_shared(url.clone())
        .map_err(|e| OtlpError::Endpoint(format!("{url:?}: {e}")))?
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.timeout)
        .tcp_nodelay(true);
    if cfg.is_tls() {
        let t = &cfg.tls;
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &t.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("export.otlp.tls.ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("export.otlp.tls.cert_file", cert)?,
                read("export.otlp.tls.key_file", key)?,
            ));
        }
        if !t.server_name.is_empty() {
            tls = tls.domain_name(t.server_name.clone());
        }
        // The system's CA certificates too, when it has any (a minimal
        // image may have none: then the configured CA alone).
        ep = match ep.clone().tls_config(tls.clone().with_native_roots()) {
            Ok(e) => e,
            Err(native) if t.ca_file.is_some() => {
                tracing::debug!(
                    "no system CA certificates ({native}); export.otlp.tls.ca_file only"
                );
                ep.tls_config(tls).map_err(|e| OtlpError::Tls {
                    key: "export.otlp.tls",
                    reason: e.to_string(),
                })?
            }
            Err(e) => {
                return Err(OtlpError::Tls {
                    key: "export.otlp.tls.ca_file",
                    reason: format!(
                        "no usable system CA certificates ({e}): set the receiver's CA here"
                    ),
                })
            }
        };
    }
    Ok(ep.connect_lazy())
}

/// The metadata of every request: the configured headers, marked
/// sensitive.
fn metadata(cfg: &OtlpConfig) -> Result<MetadataMap, OtlpError> {
    let mut m = MetadataMap::new();
    for (name, value) in cfg.header_names() {
        let key = AsciiMetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| OtlpError::Header(name.clone()))?;
        let mut v = AsciiMetadataValue::try_from(value.expose())
            .map_err(|_| OtlpError::Header(name.clone()))?;
        v.set_sensitive(true);
        m.insert(key, v);
    }
    Ok(m)
}

impl OtlpSink {
    /// Sets up the sink of `cfg` (which must be enabled) for the node
    /// `node` on `host`; `k8s_node` is the `k8s.node.name` resource
    /// attribute, when the daemon runs in Kubernetes. Nothing is connected
    /// yet.
    pub fn new(
        cfg: &OtlpConfig,
        node: &str,
        host: HostInfo,
        k8s_node: Option<String>,
    ) -> Result<Self, OtlpError> {
        let mut client = LogsServiceClient::new(channel(cfg)?);
        if cfg.compression == OtlpCompression::Gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        Ok(OtlpSink {
            client,
            metadata: metadata(cfg)?,
            cfg: cfg.clone(),
            node: node.to_string(),
            host,
            k8s_node,
            counters: Arc::new(OtlpCounters::default()),
        })
    }

    /// The sink's counters.
    pub fn counters(&self) -> Arc<OtlpCounters> {
        self.counters.clone()
    }
}

impl sink::Sink for OtlpSink {
    fn kind(&self) -> &'static str {
        "otlp"
    }

    fn peer(&self) -> String {
        format!("otlp:{}", self.cfg.endpoint.trim())
    }

    fn run(self: Box<Self>, flows: Subscription) -> SinkFuture {
        Box::pin(send::run(*self, flows))
    }
}

/// How `export.otlp` subscribes: its filters, `include_updates` and
/// `queue_size`; never closed as slow (it resumes when the receiver
/// returns).
pub fn subscription(cfg: &OtlpConfig) -> Result<SinkSubscription, OtlpError> {
    Ok(SinkSubscription {
        include_updates: cfg.include_updates,
        filters: compile_filters(&cfg.filters, &cfg.deny).map_err(OtlpError::Filter)?,
        queue_size: Some(cfg.queue_size),
        keep_when_slow: true,
        stats: None,
    })
}

/// Sets up the sink of `cfg` for node `node` and subscribes it to `hub`;
/// returns it running, with its counters.
pub async fn spawn(
    hub: &Hub,
    cfg: &OtlpConfig,
    node: &str,
    host: HostInfo,
    k8s_node: Option<String>,
) -> Result<(RunningSink, Arc<OtlpCounters>), OtlpError> {
    let mut sub = subscription(cfg)?;
    let sink = OtlpSink::new(cfg, node, host, k8s_node)?;
    let counters = sink.counters();
    sub.stats = Some(counters.clone());
    let running = sink::start(hub, Box::new(sink), sub)
        .await
        .map_err(|s| OtlpError::Subscribe(s.message().to_string()))?;
    Ok((running, counters))
}
