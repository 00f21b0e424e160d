//! `kubernetes.*`: pod identity from the node's container runtime (CRI).

use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError, MAX_QUEUE_SIZE};

/// Default `kubernetes.resync_interval`.
pub const DEFAULT_CRI_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Default `kubernetes.request_timeout`.
pub const DEFAULT_CRI_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `kubernetes.max_pods`.
pub const DEFAULT_CRI_MAX_PODS: usize = 4096;
/// Default `kubernetes.max_containers`.
pub const DEFAULT_CRI_MAX_CONTAINERS: usize = 16_384;
/// Shortest accepted `kubernetes.resync_interval`.
pub const MIN_CRI_RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Whether pod identity is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesMode {
    /// When a runtime socket is configured or found.
    #[default]
    Auto,
    /// Always: the daemon does not start without a configured or found
    /// runtime socket.
    Required,
    /// Never.
    Off,
}

/// `kubernetes.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `auto`, `required` or `off`.
    pub enabled: KubernetesMode,
    /// The runtime's CRI socket, `unix:///path` or `/path`; empty: the
    /// first of containerd's and CRI-O's default sockets that exists under
    /// the host root.
    pub runtime_endpoint: String,
    /// Interval of full listings of the runtime's pods and containers.
    #[serde(deserialize_with = "duration")]
    pub resync_interval: Duration,
    /// Deadline of each call to the runtime.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Most pods kept.
    pub max_pods: usize,
    /// Most containers kept.
    pub max_containers: usize,
    /// Pod annotations reported with a flow: keys, or prefixes ending in
    /// `*`. None by default (annotations can be large or sensitive).
    pub annotations: Vec<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: KubernetesMode::Auto,
            runtime_endpoint: String::new(),
            resync_interval: DEFAULT_CRI_RESYNC_INTERVAL,
            request_timeout: DEFAULT_CRI_REQUEST_TIMEOUT,
            max_pods: DEFAULT_CRI_MAX_PODS,
            max_containers: DEFAULT_CRI_MAX_CONTAINERS,
            annotations: Vec::new(),
        }
    }
}

impl KubernetesConfig {
    /// Checks ranges and the endpoint's form.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.resync_interval < MIN_CRI_RESYNC_INTERVAL {
            return Err(invalid(
                "kubernetes.resync_interval",
                format!("must be at least {MIN_CRI_RESYNC_INTERVAL:?}"),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(invalid(
                "kubernetes.request_timeout",
                "must be greater than zero",
            ));
        }
        for (key, n) in [
            ("kubernetes.max_pods", self.max_pods),
            ("kubernetes.max_containers", self.max_containers),
        ] {
            if n == 0 || n > MAX_QUEUE_SIZE {
                return Err(invalid(
                    key,
                    format!("must be between 1 and {MAX_QUEUE_SIZE}"),
                ));
            }
        }
        let ep = &self.runtime_endpoint;
        if !ep.is_empty() {
            let path = ep.strip_prefix("unix://").unwrap_or(ep);
            if !path.starts_with('/') || path.contains("://") {
                return Err(invalid(
                    "kubernetes.runtime_endpoint",
                    format!("{ep:?}: expected unix:///path/to/socket or an absolute path"),
                ));
            }
        }
        if let Some(a) = self.annotations.iter().find(|a| a.is_empty() || a == &"*") {
            return Err(invalid(
                "kubernetes.annotations",
                format!("{a:?}: name a key or a prefix ending in '*' (not all annotations)"),
            ));
        }
        Ok(())
    }
}
