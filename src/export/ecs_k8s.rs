//! ECS and Beats field names of a flow's pods: `container.*` and
//! `orchestrator.*` as ECS defines them, and `kubernetes.*` as Beats'
//! `add_kubernetes_metadata` writes them (label keys de-dotted, `.` → `_`,
//! so `app.kubernetes.io/name` is `app_kubernetes_io/name`). The remote
//! end's pod goes under `remote.kubernetes.*` in the same shape.

use serde_json::{json, Map, Value};

use crate::model::{PodIdentity, WorkloadKind};

/// ECS `orchestrator.type` of Kubernetes pods.
const ORCHESTRATOR_TYPE: &str = "kubernetes";

fn dedot(map: &std::collections::BTreeMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.replace('.', "_"), json!(v)))
            .collect(),
    )
}

/// `kubernetes.*` of a pod; `node` is the node's name, for a local pod.
pub fn kubernetes_fields(p: &PodIdentity, node: Option<&str>) -> Value {
    let mut k = Map::new();
    let mut pod = Map::new();
    pod.insert("name".into(), json!(p.name));
    pod.insert("uid".into(), json!(p.uid));
    if let Some(ip) = p.ips.first() {
        pod.insert("ip".into(), json!(ip.to_string()));
    }
    k.insert("pod".into(), Value::Object(pod));
    k.insert("namespace".into(), json!(p.namespace));
    if !p.labels.is_empty() {
        k.insert("labels".into(), dedot(&p.labels));
    }
    if !p.annotations.is_empty() {
        k.insert("annotations".into(), dedot(&p.annotations));
    }
    if !p.container_name.is_empty() {
        k.insert(
            "container".into(),
            json!({ "name": p.container_name, "image": p.image }),
        );
    }
    if let Some(n) = node {
        k.insert("node".into(), json!({ "name": n }));
    }
    let w = &p.workload;
    let owner = match w.kind {
        WorkloadKind::Pod => None,
        WorkloadKind::Deployment => Some("deployment"),
        WorkloadKind::DaemonSet => Some("daemonset"),
        WorkloadKind::StatefulSet => Some("statefulset"),
        WorkloadKind::Job => Some("job"),
        WorkloadKind::CronJob => Some("cronjob"),
    };
    if let Some(o) = owner {
        k.insert(o.into(), json!({ "name": w.name }));
    }
    if w.kind == WorkloadKind::Deployment {
        if let Some(hash) = p.labels.get("pod-template-hash") {
            k.insert(
                "replicaset".into(),
                json!({ "name": format!("{}-{hash}", w.name) }),
            );
        }
    }
    Value::Object(k)
}

/// Adds the local pod's `container.*`, `orchestrator.*` and `kubernetes.*`
/// and the remote pod's `remote.kubernetes.*` to a document.
pub fn insert_pods(
    doc: &mut Map<String, Value>,
    local: Option<&PodIdentity>,
    remote: Option<&PodIdentity>,
    node: &str,
) {
    if let Some(p) = local {
        let container = doc
            .entry("container")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(c) = container {
            if !p.container_name.is_empty() {
                c.insert("name".into(), json!(p.container_name));
            }
            if !p.image.is_empty() {
                c.insert("image".into(), json!({ "name": p.image }));
            }
        }
        doc.insert(
            "orchestrator".into(),
            json!({
                "type": ORCHESTRATOR_TYPE,
                "namespace": p.namespace,
                "resource": { "type": "pod", "name": p.name, "id": p.uid },
            }),
        );
        doc.insert("kubernetes".into(), kubernetes_fields(p, Some(node)));
    }
    if let Some(p) = remote {
        doc.insert(
            "remote".into(),
            json!({ "kubernetes": kubernetes_fields(p, None) }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Workload;

    #[test]
    fn beats_shape() {
        let p = PodIdentity {
            name: "web-5d8f9c7b6-x2x4q".into(),
            namespace: "shop".into(),
            uid: "u-1".into(),
            labels: [
                ("app.kubernetes.io/name", "web"),
                ("pod-template-hash", "5d8f9c7b6"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            workload: Workload {
                kind: WorkloadKind::Deployment,
                name: "web".into(),
            },
            container_name: "app".into(),
            image: "web:1.2".into(),
            ips: vec!["10.88.0.5".parse().unwrap()],
            ..Default::default()
        };
        let mut doc = Map::new();
        doc.insert("container".into(), json!({ "id": "abc" }));
        insert_pods(&mut doc, Some(&p), Some(&p), "node-1");
        let d = Value::Object(doc);
        assert_eq!(
            d["container"],
            json!({"id": "abc", "name": "app", "image": {"name": "web:1.2"}})
        );
        assert_eq!(d["orchestrator"]["resource"]["name"], "web-5d8f9c7b6-x2x4q");
        assert_eq!(d["orchestrator"]["namespace"], "shop");
        let k = &d["kubernetes"];
        assert_eq!(
            k["pod"],
            json!({"name": "web-5d8f9c7b6-x2x4q", "uid": "u-1", "ip": "10.88.0.5"})
        );
        assert_eq!(k["labels"]["app_kubernetes_io/name"], "web");
        assert_eq!(k["deployment"]["name"], "web");
        assert_eq!(k["replicaset"]["name"], "web-5d8f9c7b6");
        assert_eq!(k["container"]["name"], "app");
        assert_eq!(k["node"]["name"], "node-1");
        assert!(d["remote"]["kubernetes"].get("node").is_none());
    }
}
