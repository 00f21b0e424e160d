//! Kubernetes pod identity from the node's container runtime, over its CRI
//! socket (containerd, CRI-O): which pod, namespace, workload and container
//! a flow's process runs in, and which local pod its remote address is.
//!
//! [`index`] is the pure part (CRI answers in, lookups out), [`workload`]
//! derives a pod's owner from its labels, and [`resolver`] keeps the index
//! current without ever making the flow pipeline wait. No Kubernetes API
//! access is needed: the kubelet has already told the runtime everything.

pub mod index;
pub mod resolver;
pub mod workload;

use std::path::{Path, PathBuf};

/// Generated types and client of the CRI subset (`proto/cri/runtime.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod cri_api {
    tonic::include_proto!("runtime.v1");
}

/// CRI sockets tried, in order, under the host root when
/// `kubernetes.runtime_endpoint` is not set.
pub const DEFAULT_RUNTIME_SOCKETS: &[&str] = &[
    "run/containerd/containerd.sock",
    "var/run/crio/crio.sock",
    "run/crio/crio.sock",
];

/// URL scheme of a runtime endpoint.
const UNIX_SCHEME: &str = "unix://";

/// The socket path of a runtime endpoint: `unix:///path` or a plain path.
pub fn endpoint_socket(endpoint: &str) -> Option<PathBuf> {
    let path = endpoint.strip_prefix(UNIX_SCHEME).unwrap_or(endpoint);
    (path.starts_with('/') && !path.contains("://")).then(|| PathBuf::from(path))
}

/// The first of [`DEFAULT_RUNTIME_SOCKETS`] that exists under `host_root`.
pub fn detect_socket(host_root: &Path) -> Option<PathBuf> {
    DEFAULT_RUNTIME_SOCKETS
        .iter()
        .map(|rel| host_root.join(rel))
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_socket("unix:///run/containerd/containerd.sock"),
            Some(PathBuf::from("/run/containerd/containerd.sock"))
        );
        assert_eq!(
            endpoint_socket("/var/run/crio/crio.sock"),
            Some(PathBuf::from("/var/run/crio/crio.sock"))
        );
        assert_eq!(endpoint_socket("tcp://1.2.3.4:5"), None);
        assert_eq!(endpoint_socket("relative.sock"), None);
    }

    #[test]
    fn detection_under_a_host_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(detect_socket(dir.path()), None);
        let crio = dir.path().join("var/run/crio");
        std::fs::create_dir_all(&crio).expect("mkdir");
        std::fs::write(crio.join("crio.sock"), b"").expect("touch");
        assert_eq!(detect_socket(dir.path()), Some(crio.join("crio.sock")));
    }
}
