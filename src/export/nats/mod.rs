//! The NATS JetStream sink (`export.nats.*`): every flow record the hub
//! gives it is published to the JetStream stream that takes its subject
//! (see [`message`] for subjects, headers and ids), and acknowledged.
//!
//! Delivery: at most `max_in_flight` publications wait for their
//! acknowledgement; one that fails or is not acknowledged within
//! `ack_timeout` is published again, with the same message id, once the
//! connection is up (JetStream drops the copies within its duplicate
//! window). While the window is full the sink reads nothing more, so records
//! wait in its hub queue (`queue_size`); beyond that the hub drops them,
//! counts them against the sink (its subscriber `nats:<servers>` in
//! `GetStatus` and the metrics) and tells it, and the sink publishes that
//! loss notice to `<prefix>.<node>.loss` when the server is back: a reader
//! of the stream knows what it misses.
//!
//! Start: a server that refuses the credentials, a TLS set-up that fails
//! or an unreadable credentials file stop the daemon with a message naming
//! the key ([`NatsError::exit_is_config`]); a server that cannot be reached
//! does not: the sink starts anyway, keeps connecting in the background,
//! and counts what it cannot keep. Secrets are only handed to the client;
//! they are in no message of ours.

mod message;
mod publish;
pub mod read;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};

pub use message::*;

use crate::config::NatsConfig;
use crate::export::ecs::HostInfo;
use crate::export::hub::{Hub, Subscription};
use crate::export::jsonl::{compile_filters, JsonlError};
use crate::export::sink::{self, RunningSink, SinkFuture, SinkSubscription};
use crate::export::status::{SinkInfo, SinkStats, StatusFeed};

/// Longest wait between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// Wait before the second connection attempt; doubled per attempt.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Errors of the NATS sink at start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A configured filter is invalid.
    #[error("export.nats.{0}")]
    Filter(#[source] JsonlError),
    /// The server refused the credentials.
    #[error("{key}: the NATS server refused the credentials ({reason})")]
    Auth {
        /// The keys of the credentials used.
        key: &'static str,
        /// The client's error (no secret in it).
        reason: String,
    },
    /// TLS could not be set up.
    #[error("export.nats.tls: {0}")]
    Tls(String),
    /// The credentials file could not be read.
    #[error("export.nats.credentials_file: {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A server URL does not parse.
    #[error("export.nats.url: {0}")]
    Url(String),
    /// Connecting failed in a way that is not the configuration's fault.
    #[error("export.nats.url: connecting: {0}")]
    Connect(String),
    /// The hub refused the subscription.
    #[error("export.nats: subscribing to flows: {0}")]
    Subscribe(String),
}

impl NatsError {
    /// Whether the daemon should exit with the configuration exit code.
    pub fn exit_is_config(&self) -> bool {
        !matches!(self, NatsError::Connect(_) | NatsError::Subscribe(_))
    }
}

/// Counters of one NATS sink, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct NatsCounters {
    /// Flow records acknowledged by the stream.
    pub published: AtomicU64,
    /// Acknowledgements that said "duplicate" (a retry of a stored record).
    pub duplicates: AtomicU64,
    /// Loss notices acknowledged by the stream.
    pub loss_notices: AtomicU64,
    /// Publications sent again after a failure or a missing ack.
    pub retries: AtomicU64,
    /// Whether the client is connected now.
    pub connected: AtomicBool,
}

impl NatsCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl SinkStats for NatsCounters {
    fn info(&self) -> SinkInfo {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkInfo {
            kind: "nats".to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            published: get(&self.published),
            duplicates: get(&self.duplicates),
            retries: get(&self.retries),
            loss_notices: get(&self.loss_notices),
            ..SinkInfo::default()
        }
    }
}

/// A started NATS sink, to be subscribed with [`spawn`] or
/// [`sink::start`].
pub struct NatsSink {
    client: async_nats::Client,
    cfg: NatsConfig,
    encoder: Encoder,
    counters: Arc<NatsCounters>,
    feed: Option<StatusFeed>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("servers", &self.cfg.url)
            .finish_non_exhaustive()
    }
}

/// The keys naming the credentials of `cfg`, for error messages.
fn credential_keys(cfg: &NatsConfig) -> &'static str {
    if !cfg.user.is_empty() {
        "export.nats.user/export.nats.password"
    } else if !cfg.token.is_empty() {
        "export.nats.token"
    } else if cfg.credentials_file.is_some() {
        "export.nats.credentials_file"
    } else {
        "export.nats.url (the server wants credentials: set export.nats.user and \
         export.nats.password, export.nats.token or export.nats.credentials_file)"
    }
}

/// Client options of `cfg`: credentials, TLS, timeouts, reconnection.
async fn options(cfg: &NatsConfig, node: &str) -> Result<ConnectOptions, NatsError> {
    let mut o = match &cfg.credentials_file {
        Some(p) => ConnectOptions::with_credentials_file(p)
            .await
            .map_err(|source| NatsError::Credentials {
                path: p.display().to_string(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if !cfg.user.is_empty() {
        o = o.user_and_password(cfg.user.clone(), cfg.password.expose().to_string());
    }
    if !cfg.token.is_empty() {
        o = o.token(cfg.token.expose().to_string());
    }
    let t = &cfg.tls;
    if let Some(ca) = &t.ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if t.required {
        o = o.require_tls(true);
    }
    Ok(o.name(format!("sockscope {node}"))
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay))
}

/// Wait before connection attempt `attempt` (1 for the first after a
/// start or a disconnection): none, then [`FIRST_RECONNECT_DELAY`] doubled
/// per attempt up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let shift = u32::try_from((attempt - 2).min(16)).unwrap_or(16);
    FIRST_RECONNECT_DELAY
        .saturating_mul(1u32 << shift)
        .min(MAX_RECONNECT_DELAY)
}

/// Whether a connection failure is TLS refusing the peer (a certificate
/// that does not verify, a handshake alert): the client reports those as
/// I/O errors, but they are the configuration's, not the network's.
fn is_tls_failure(e: &async_nats::ConnectError) -> bool {
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        if err.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Connects with an event callback that logs and tracks the connection.
async fn connect_with(
    opts: ConnectOptions,
    servers: Vec<ServerAddr>,
    counters: Arc<NatsCounters>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let opts = opts.event_callback(move |ev| {
        let counters = counters.clone();
        async move {
            match ev {
                async_nats::Event::Connected => {
                    counters.connected.store(true, Ordering::Relaxed);
                    tracing::info!("NATS connected");
                }
                async_nats::Event::Disconnected => {
                    counters.connected.store(false, Ordering::Relaxed);
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                other => tracing::warn!("NATS: {other}"),
            }
        }
    });
    opts.connect(servers).await
}

/// Maps a failed first connection to the error naming the key at fault;
/// `None` when it is the network's (an unreachable server).
fn config_error(cfg: &NatsConfig, e: &async_nats::ConnectError) -> Option<NatsError> {
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            Some(NatsError::Auth {
                key: credential_keys(cfg),
                reason: e.to_string(),
            })
        }
        ConnectErrorKind::Tls => Some(NatsError::Tls(e.to_string())),
        _ if is_tls_failure(e) => Some(NatsError::Tls(e.to_string())),
        ConnectErrorKind::ServerParse => Some(NatsError::Url(e.to_string())),
        _ => None,
    }
}

/// The server addresses of `cfg`.
fn server_addrs(cfg: &NatsConfig) -> Result<Vec<ServerAddr>, NatsError> {
    cfg.servers()
        .into_iter()
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| NatsError::Url(format!("{s:?}: {e}")))
        })
        .collect()
}

/// A client for reading the stream (`watch --nats`), with the credentials
/// and TLS of `cfg`; an unreachable server is an error here.
pub async fn connect_reader(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    let servers = server_addrs(cfg)?;
    let counters = Arc::new(NatsCounters::default());
    connect_with(options(cfg, name).await?, servers, counters)
        .await
        .map_err(|e| config_error(cfg, &e).unwrap_or_else(|| NatsError::Connect(e.to_string())))
}

impl NatsSink {
    /// Connects to the servers of `cfg` (which must be enabled) as `node`.
    /// Refused credentials or TLS fail; an unreachable server does not (the
    /// client keeps trying).
    pub async fn connect(cfg: &NatsConfig, node: &str, host: HostInfo) -> Result<Self, NatsError> {
        let servers = server_addrs(cfg)?;
        let counters = Arc::new(NatsCounters::default());
        let first =
            connect_with(options(cfg, node).await?, servers.clone(), counters.clone()).await;
        let client = match first {
            Ok(c) => {
                counters.connected.store(true, Ordering::Relaxed);
                c
            }
            Err(e) => match config_error(cfg, &e) {
                Some(err) => return Err(err),
                None => {
                    tracing::warn!(
                        servers = %cfg.url,
                        "NATS unreachable at start ({e}); starting anyway: records wait in \
                         the sink's queue (export.nats.queue_size), beyond it they are \
                         dropped and counted"
                    );
                    connect_with(
                        options(cfg, node).await?.retry_on_initial_connect(),
                        servers,
                        counters.clone(),
                    )
                    .await
                    .map_err(|e| NatsError::Connect(e.to_string()))?
                }
            },
        };
        Ok(NatsSink {
            client,
            encoder: Encoder::new(&cfg.subject_prefix, node, cfg.format, host),
            cfg: cfg.clone(),
            counters,
            feed: None,
        })
    }

    /// Publishes the status of `feed` every `status_interval`.
    pub fn with_status(mut self, feed: Option<StatusFeed>) -> Self {
        self.feed = feed;
        self
    }

    /// The sink's counters.
    pub fn counters(&self) -> Arc<NatsCounters> {
        self.counters.clone()
    }
}

impl sink::Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn peer(&self) -> String {
        format!("nats:{}", self.cfg.servers().join(","))
    }

    fn run(self: Box<Self>, flows: Subscription) -> SinkFuture {
        let NatsSink {
            client,
            cfg,
            encoder,
            counters,
            feed,
        } = *self;
        Box::pin(publish::run(client, cfg, encoder, counters, feed, flows))
    }
}

/// How `export.nats` subscribes: its filters, `include_updates` and
/// `queue_size`; never closed as slow (it resumes when the server returns).
pub fn subscription(cfg: &NatsConfig) -> Result<SinkSubscription, NatsError> {
    Ok(SinkSubscription {
        include_updates: cfg.include_updates,
        filters: compile_filters(&cfg.filters, &cfg.deny).map_err(NatsError::Filter)?,
        queue_size: Some(cfg.queue_size),
        keep_when_slow: true,
        stats: None,
    })
}

/// Connects the sink of `cfg` as `node` and subscribes it to `hub`; it
/// publishes the status of `feed`, when given. Returns it running, with
/// its counters.
pub async fn spawn(
    hub: &Hub,
    cfg: &NatsConfig,
    node: &str,
    host: HostInfo,
    feed: Option<StatusFeed>,
) -> Result<(RunningSink, Arc<NatsCounters>), NatsError> {
    let mut sub = subscription(cfg)?;
    let sink = NatsSink::connect(cfg, node, host).await?.with_status(feed);
    let counters = sink.counters();
    sub.stats = Some(counters.clone());
    let running = sink::start(hub, Box::new(sink), sub)
        .await
        .map_err(|s| NatsError::Subscribe(s.message().to_string()))?;
    Ok((running, counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_to_the_bound() {
        let d: Vec<Duration> = (1..=8).map(reconnect_delay).collect();
        assert_eq!(d[0], Duration::ZERO);
        assert_eq!(d[1], FIRST_RECONNECT_DELAY);
        assert_eq!(d[2], FIRST_RECONNECT_DELAY * 2);
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(reconnect_delay(10_000), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn refused_credentials_and_tls_are_configuration_errors() {
        let auth = NatsError::Auth {
            key: "export.nats.token",
            reason: "authorization violation".into(),
        };
        assert!(auth.exit_is_config());
        assert!(
            auth.to_string().starts_with("export.nats.token: "),
            "{auth}"
        );
        assert!(NatsError::Tls("x".into()).exit_is_config());
        assert!(!NatsError::Connect("x".into()).exit_is_config());
        let cfg = NatsConfig {
            user: "u".into(),
            password: "p".into(),
            ..NatsConfig::default()
        };
        assert_eq!(
            credential_keys(&cfg),
            "export.nats.user/export.nats.password"
        );
    }
}
