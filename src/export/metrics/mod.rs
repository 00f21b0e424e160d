//! Prometheus metrics: the same [`StatusSnapshot`] and [`HubStatus`] that
//! `GetStatus` returns, encoded by prometheus-client in the Prometheus text
//! format (0.0.4) and served by hyper (`GET /metrics`, one request per
//! connection) on its own TCP listener (`metrics.listen`).
//!
//! Label cardinality is bounded: `cpu` has one value per CPU with a ring
//! (the online CPUs), at most [`MAX_CPU_SERIES`]; subscribers are labelled
//! by id for the first [`MAX_SUBSCRIBER_SERIES`] (lowest ids) and the rest
//! are summed under `subscriber="other"`.
//!
//! [`StatusSnapshot`]: crate::export::status::StatusSnapshot
//! [`HubStatus`]: crate::export::status::HubStatus

mod exposition;
mod http;
mod pods;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::export::hub::Hub;
use crate::export::server::HealthHandle;
use crate::export::status::StatusSource;

pub use exposition::render;
pub use http::{serve, CONNECTION_TIMEOUT, SHUTDOWN_GRACE};

/// Path of the exposition.
pub const METRICS_PATH: &str = "/metrics";
/// Content type of the text exposition format (0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Most CPUs given their own `cpu` label value; the rest are summed as
/// `cpu="other"`.
pub const MAX_CPU_SERIES: usize = 1024;
/// Most subscribers given their own `subscriber` label value.
pub const MAX_SUBSCRIBER_SERIES: usize = 16;
/// Most Kubernetes namespaces given their own `namespace` label value; the
/// flows of later ones are summed as `namespace="other"`.
pub const MAX_NAMESPACE_SERIES: usize = 64;
/// Largest accepted request head (request line and headers); larger ones
/// are answered 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Most request headers accepted; more are answered 431.
pub const MAX_REQUEST_HEADERS: usize = 64;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for writing a response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics.listen` is not an address.
    #[error("metrics.listen: invalid address {addr:?}: {source}")]
    Addr {
        /// The configured value.
        addr: String,
        /// Parse error.
        source: std::net::AddrParseError,
    },
    /// Binding the listener failed.
    #[error("metrics: binding TCP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
}

/// Where the numbers come from: the pipeline's status source, the fan-out
/// hub and the health flag, exactly as `GetStatus` reads them.
#[derive(Clone)]
pub struct MetricsSource {
    /// Pipeline counters.
    pub status: Arc<dyn StatusSource>,
    /// The fan-out (subscribers, history, flows received).
    pub hub: Hub,
    /// The serving flag reported by health.
    pub health: HealthHandle,
}

impl MetricsSource {
    /// Renders the current exposition; `None` when the hub has stopped.
    pub async fn render(&self) -> Option<String> {
        // Same order as GetStatus: hub first, then the pipeline snapshot.
        let hub = self.hub.status().await.ok()?;
        let snap = self.status.snapshot();
        Some(render(&snap, &hub, self.health.is_serving()))
    }
}

/// Parses `metrics.listen`.
pub fn parse_listen(addr: &str) -> Result<Option<SocketAddr>, MetricsError> {
    let a = addr.trim();
    if a.is_empty() {
        return Ok(None);
    }
    a.parse().map(Some).map_err(|source| MetricsError::Addr {
        addr: addr.to_string(),
        source,
    })
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}
