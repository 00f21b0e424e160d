//! The node's pods and containers as the runtime last listed them: a
//! container id → pod identity map and a pod address → pod map, built from
//! CRI answers. Pure: answers in, lookups out.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::cri_api as cri;
use super::workload;
use crate::model::PodIdentity;

/// Label key prefixes a runtime or the kubelet adds to a pod's own labels;
/// they are not reported as the pod's labels.
const RUNTIME_LABEL_PREFIXES: &[&str] = &["io.kubernetes.", "io.cri-containerd."];
/// Label the kubelet gives a container: its name in the pod.
const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// Prefix of an image reference that is an id, not a name.
const IMAGE_ID_PREFIX: &str = "sha256:";

/// Bounds and selections of the index.
#[derive(Debug, Clone)]
pub struct IndexLimits {
    /// Most pods kept.
    pub max_pods: usize,
    /// Most containers kept.
    pub max_containers: usize,
    /// Annotations reported: a key, or a prefix ending in `*`.
    pub annotations: Vec<String>,
}

/// A sandbox, as the index needs it.
#[derive(Debug, Clone)]
pub struct SandboxEntry {
    /// The pod, without container fields.
    pub pod: Arc<PodIdentity>,
}

/// What one listing of the runtime gives.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// `ListPodSandbox`.
    pub sandboxes: Vec<cri::PodSandbox>,
    /// `PodSandboxStatus` of each sandbox that answered, by sandbox id.
    pub statuses: HashMap<String, cri::PodSandboxStatus>,
    /// `ListContainers`.
    pub containers: Vec<cri::Container>,
    /// Image names of containers whose listing gave only an image id, by
    /// container id (from `ContainerStatus`).
    pub image_names: HashMap<String, String>,
}

/// The index.
#[derive(Debug, Clone, Default)]
pub struct PodIndex {
    sandboxes: HashMap<String, SandboxEntry>,
    containers: HashMap<String, Arc<PodIdentity>>,
    by_ip: HashMap<IpAddr, Arc<PodIdentity>>,
    /// Pods or containers the bounds left out of the last build.
    pub left_out: u64,
}

fn own_labels(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !RUNTIME_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn selected_annotations(
    annotations: &HashMap<String, String>,
    wanted: &[String],
) -> BTreeMap<String, String> {
    if wanted.is_empty() {
        return BTreeMap::new();
    }
    annotations
        .iter()
        .filter(|(k, _)| {
            wanted.iter().any(|w| match w.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => *k == w,
            })
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether an image reference is an id rather than a name.
pub fn is_image_id(image: &str) -> bool {
    image.is_empty() || image.starts_with(IMAGE_ID_PREFIX)
}

/// The pod a sandbox stands for, with its addresses from `status` unless it
/// is on the node's network (whose addresses are the node's, not the pod's).
pub fn sandbox_pod(
    sb: &cri::PodSandbox,
    status: Option<&cri::PodSandboxStatus>,
    limits: &IndexLimits,
) -> PodIdentity {
    let meta = sb.metadata.clone().unwrap_or_default();
    let labels = own_labels(&sb.labels);
    let host_network = status
        .and_then(|s| s.linux.as_ref())
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == cri::NamespaceMode::Node as i32);
    let mut ips = Vec::new();
    if !host_network {
        if let Some(net) = status.and_then(|s| s.network.as_ref()) {
            let texts = std::iter::once(net.ip.as_str())
                .chain(net.additional_ips.iter().map(|p| p.ip.as_str()));
            for t in texts {
                if let Ok(ip) = t.parse::<IpAddr>() {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
    }
    PodIdentity {
        workload: workload::derive(&meta.name, &labels),
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        labels,
        annotations: selected_annotations(&sb.annotations, &limits.annotations),
        container_name: String::new(),
        image: String::new(),
        ips,
    }
}

/// The identity of container `c` in the pod `pod`; `image_name` replaces
/// an image id the listing gave.
pub fn container_identity(
    c: &cri::Container,
    pod: &PodIdentity,
    image_name: Option<&str>,
) -> PodIdentity {
    let listed = c.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
    let image = match image_name {
        Some(n) if is_image_id(listed) => n,
        _ => listed,
    };
    let name = c
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .filter(|n| !n.is_empty())
        .or_else(|| c.labels.get(CONTAINER_NAME_LABEL).map(String::as_str))
        .unwrap_or("");
    PodIdentity {
        container_name: name.to_string(),
        image: image.to_string(),
        ..pod.clone()
    }
}

impl PodIndex {
    /// An index of `listing`, within `limits`.
    pub fn build(listing: &Listing, limits: &IndexLimits) -> PodIndex {
        let mut idx = PodIndex::default();
        for sb in &listing.sandboxes {
            idx.add_sandbox(sb, listing.statuses.get(&sb.id), limits);
        }
        for c in &listing.containers {
            let name = listing.image_names.get(&c.id).map(String::as_str);
            idx.add_container(c, name, limits);
        }
        idx
    }

    /// Adds (or replaces) a sandbox; false when the bound left it out.
    pub fn add_sandbox(
        &mut self,
        sb: &cri::PodSandbox,
        status: Option<&cri::PodSandboxStatus>,
        limits: &IndexLimits,
    ) -> bool {
        if !self.sandboxes.contains_key(&sb.id) && self.sandboxes.len() >= limits.max_pods {
            self.left_out += 1;
            return false;
        }
        let pod = Arc::new(sandbox_pod(sb, status, limits));
        for ip in &pod.ips {
            self.by_ip.insert(*ip, pod.clone());
        }
        self.sandboxes.insert(sb.id.clone(), SandboxEntry { pod });
        true
    }

    /// Adds (or replaces) a container of a known sandbox; false when its
    /// sandbox is unknown or the bound left it out.
    pub fn add_container(
        &mut self,
        c: &cri::Container,
        image_name: Option<&str>,
        limits: &IndexLimits,
    ) -> bool {
        let Some(sb) = self.sandboxes.get(&c.pod_sandbox_id) else {
            return false;
        };
        if !self.containers.contains_key(&c.id) && self.containers.len() >= limits.max_containers {
            self.left_out += 1;
            return false;
        }
        let id = Arc::new(container_identity(c, &sb.pod, image_name));
        self.containers.insert(c.id.to_ascii_lowercase(), id);
        true
    }

    /// Whether the sandbox is known.
    pub fn has_sandbox(&self, id: &str) -> bool {
        self.sandboxes.contains_key(id)
    }

    /// The pod and container of container `id` (full, lower-case hex).
    pub fn container(&self, id: &str) -> Option<&Arc<PodIdentity>> {
        self.containers.get(id)
    }

    /// The pod whose address is `ip`.
    pub fn by_ip(&self, ip: &IpAddr) -> Option<&Arc<PodIdentity>> {
        self.by_ip.get(ip)
    }

    /// Pods known.
    pub fn pods(&self) -> usize {
        self.sandboxes.len()
    }

    /// Containers known.
    pub fn containers(&self) -> usize {
        self.containers.len()
    }

    /// Every container id and its identity, in id order.
    pub fn iter_containers(&self) -> Vec<(&str, &Arc<PodIdentity>)> {
        let mut v: Vec<_> = self
            .containers
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkloadKind;

    const CID: &str = "3f1b5c2e9a8d7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291807f6e";

    fn limits() -> IndexLimits {
        IndexLimits {
            max_pods: 4,
            max_containers: 4,
            annotations: vec!["team".into(), "example.com/*".into()],
        }
    }

    fn sandbox(id: &str, name: &str, labels: &[(&str, &str)]) -> cri::PodSandbox {
        cri::PodSandbox {
            id: id.into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{id}"),
                namespace: "shop".into(),
                attempt: 0,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([
                    ("io.kubernetes.pod.name".to_string(), name.to_string()),
                    ("io.cri-containerd.kind".to_string(), "sandbox".to_string()),
                ])
                .collect(),
            annotations: [
                ("team", "payments"),
                ("example.com/owner", "ann"),
                ("other", "x"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    fn status(id: &str, ip: &str, extra: &str, mode: cri::NamespaceMode) -> cri::PodSandboxStatus {
        cri::PodSandboxStatus {
            id: id.into(),
            network: Some(cri::PodSandboxNetworkStatus {
                ip: ip.into(),
                additional_ips: vec![cri::PodIp { ip: extra.into() }],
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: mode as i32,
                        ..Default::default()
                    }),
                }),
            }),
            ..Default::default()
        }
    }

    fn container(id: &str, sb: &str, name: &str, image: &str) -> cri::Container {
        cri::Container {
            id: id.into(),
            pod_sandbox_id: sb.into(),
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn containers_and_pod_addresses() {
        let mut listing = Listing::default();
        listing.sandboxes.push(sandbox(
            "s1",
            "web-5d8f9c7b6-x2x4q",
            &[("app", "web"), ("pod-template-hash", "5d8f9c7b6")],
        ));
        listing.sandboxes.push(sandbox("s2", "agent", &[]));
        listing.statuses.insert(
            "s1".into(),
            status("s1", "10.88.0.5", "fd00::5", cri::NamespaceMode::Pod),
        );
        listing.statuses.insert(
            "s2".into(),
            status("s2", "192.168.1.2", "", cri::NamespaceMode::Node),
        );
        listing
            .containers
            .push(container(CID, "s1", "app", "sha256:abc"));
        listing
            .containers
            .push(container("c2", "s2", "agent", "agent:1"));
        listing.containers.push(container("c3", "gone", "x", "x:1"));
        listing.image_names.insert(CID.into(), "web:1.2".into());
        let idx = PodIndex::build(&listing, &limits());
        assert_eq!((idx.pods(), idx.containers()), (2, 2));
        let web = idx.container(CID).expect("container");
        assert_eq!(web.name, "web-5d8f9c7b6-x2x4q");
        assert_eq!(web.namespace, "shop");
        assert_eq!(web.uid, "uid-s1");
        assert_eq!(web.container_name, "app");
        assert_eq!(web.image, "web:1.2");
        assert_eq!(web.workload.kind, WorkloadKind::Deployment);
        assert_eq!(web.workload.name, "web");
        // Runtime labels are not the pod's.
        assert_eq!(
            web.labels.keys().collect::<Vec<_>>(),
            vec!["app", "pod-template-hash"]
        );
        assert_eq!(
            web.annotations.keys().collect::<Vec<_>>(),
            vec!["example.com/owner", "team"]
        );
        let by_ip = idx.by_ip(&"fd00::5".parse().unwrap()).expect("pod by ip");
        assert_eq!(by_ip.name, web.name);
        assert!(by_ip.container_name.is_empty());
        // A pod on the node's network has no addresses of its own.
        assert!(idx.by_ip(&"192.168.1.2".parse().unwrap()).is_none());
        assert_eq!(idx.container("c2").unwrap().image, "agent:1");
        assert!(idx.container("c3").is_none());
    }

    #[test]
    fn bounds_are_counted() {
        let mut listing = Listing::default();
        for i in 0..6 {
            listing.sandboxes.push(sandbox(&format!("s{i}"), "p", &[]));
            listing
                .containers
                .push(container(&format!("c{i}"), &format!("s{i}"), "c", "i:1"));
        }
        listing.containers.push(container("c9", "s0", "c", "i:1"));
        let idx = PodIndex::build(&listing, &limits());
        assert_eq!((idx.pods(), idx.containers()), (4, 4));
        // Two sandboxes, and one container beyond the bound; containers of
        // left-out sandboxes are not counted twice.
        assert_eq!(idx.left_out, 3);
    }
}
