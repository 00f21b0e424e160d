//! The pod resolver's thread: a single-threaded async runtime that talks
//! to the container runtime while the engine only reads its index.

use std::path::PathBuf;

use super::error::DaemonError;
use crate::config::{Config, KubernetesMode};
use crate::enrich;
use crate::enrich::pods::index::IndexLimits;
use crate::enrich::pods::resolver::{PodView, Resolver, ResolverConfig};
use crate::enrich::pods::{self, DEFAULT_RUNTIME_SOCKETS};

/// Name of the resolver's thread.
const PODS_THREAD: &str = "sockscope-pods";

/// The runtime socket the configuration names or, when it names none, the
/// first default socket found under the host root.
pub fn runtime_socket(cfg: &Config) -> Option<PathBuf> {
    let k = &cfg.kubernetes;
    if k.runtime_endpoint.is_empty() {
        pods::detect_socket(&enrich::host_root(cfg))
    } else {
        pods::endpoint_socket(&k.runtime_endpoint)
    }
}

/// The resolver's settings from the configuration, for `socket`.
pub fn resolver_config(cfg: &Config, socket: PathBuf) -> ResolverConfig {
    let k = &cfg.kubernetes;
    ResolverConfig {
        socket,
        resync_interval: k.resync_interval,
        request_timeout: k.request_timeout,
        limits: IndexLimits {
            max_pods: k.max_pods,
            max_containers: k.max_containers,
            annotations: k.annotations.clone(),
        },
    }
}

/// Starts the resolver when `kubernetes.enabled` asks for it and a runtime
/// socket is configured or found; returns the engine's view of it. The
/// thread ends once every view is dropped.
pub(super) fn start(cfg: &Config) -> Result<Option<PodView>, DaemonError> {
    if cfg.kubernetes.enabled == KubernetesMode::Off {
        return Ok(None);
    }
    let Some(socket) = runtime_socket(cfg) else {
        let searched = DEFAULT_RUNTIME_SOCKETS
            .iter()
            .map(|s| enrich::host_root(cfg).join(s).display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if cfg.kubernetes.enabled == KubernetesMode::Required {
            return Err(DaemonError::NoRuntime { searched });
        }
        tracing::info!(%searched, "no container runtime socket found; pod identity is off");
        return Ok(None);
    };
    let (resolver, view, rx) = Resolver::new(resolver_config(cfg, socket.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Runtime {
            what: "starting the pod resolver's runtime",
            source,
        })?;
    std::thread::Builder::new()
        .name(PODS_THREAD.into())
        .spawn(move || rt.block_on(resolver.run(rx)))
        .map_err(|source| DaemonError::Runtime {
            what: "starting the pod resolver's thread",
            source,
        })?;
    tracing::info!(socket = %socket.display(), "pod identity from the container runtime");
    Ok(Some(view))
}
