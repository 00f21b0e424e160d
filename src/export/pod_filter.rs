//! The pod conditions of a `FlowFilter`: namespace, pod name, workload and
//! label selectors. They hold for a flow when one end's pod (the local
//! process's, or the remote address's) satisfies all of them together.

use crate::export::proto;
use crate::model::{FlowRecord, PodIdentity, WorkloadKind};

use super::filter::FilterError;

/// Most requirements in one label selector.
pub const MAX_SELECTOR_REQUIREMENTS: usize = 64;
/// Longest selector text accepted.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// A pattern on a name: exact, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    Exact(String),
    Prefix(String),
}

impl NamePattern {
    fn parse(s: &str) -> NamePattern {
        match s.strip_suffix('*') {
            Some(p) => NamePattern::Prefix(p.to_string()),
            None => NamePattern::Exact(s.to_string()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// `k=v`, `k==v`.
    Equals(String, String),
    /// `k!=v`: the label is absent or has another value.
    NotEquals(String, String),
    /// `k`.
    Exists(String),
    /// `!k`.
    Absent(String),
    /// `k in (a,b)`.
    In(String, Vec<String>),
    /// `k notin (a,b)`: absent or none of the values.
    NotIn(String, Vec<String>),
}

impl Requirement {
    fn matches(&self, p: &PodIdentity) -> bool {
        let get = |k: &String| p.labels.get(k);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(x)),
        }
    }
}

/// A label selector: every requirement holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn valid_value(v: &str) -> bool {
    v.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let (mut depth, mut start, mut parts) = (0usize, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_set(key: &str, rest: &str) -> Result<(String, Vec<String>), String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("{key}: expected a parenthesised list of values"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if let Some(v) = values.iter().find(|v| !valid_value(v)) {
        return Err(format!("invalid label value {v:?}"));
    }
    Ok((key.to_string(), values))
}

impl Selector {
    /// Parses Kubernetes selector syntax: requirements separated by commas,
    /// each `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)` or
    /// `k notin (a,b)`.
    pub fn parse(text: &str) -> Result<Selector, String> {
        if text.len() > MAX_SELECTOR_LEN {
            return Err(format!("longer than {MAX_SELECTOR_LEN} bytes"));
        }
        let mut reqs = Vec::new();
        for part in split_top(text)? {
            let part = part.trim();
            if part.is_empty() {
                return Err("empty requirement".into());
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(k.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                let (k, vs) = parse_set(k.trim(), rest)?;
                Requirement::NotIn(k, vs)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                let (k, vs) = parse_set(k.trim(), rest)?;
                Requirement::In(k, vs)
            } else {
                Requirement::Exists(part.into())
            };
            let (key, value) = match &req {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, Some(v)),
                Requirement::Exists(k)
                | Requirement::Absent(k)
                | Requirement::In(k, _)
                | Requirement::NotIn(k, _) => (k, None),
            };
            if !valid_key(key) {
                return Err(format!("invalid label key {key:?}"));
            }
            if let Some(v) = value.filter(|v| !valid_value(v)) {
                return Err(format!("invalid label value {v:?}"));
            }
            reqs.push(req);
            if reqs.len() > MAX_SELECTOR_REQUIREMENTS {
                return Err(format!(
                    "more than {MAX_SELECTOR_REQUIREMENTS} requirements"
                ));
            }
        }
        Ok(Selector(reqs))
    }

    /// Whether the pod satisfies every requirement.
    pub fn matches(&self, p: &PodIdentity) -> bool {
        self.0.iter().all(|r| r.matches(p))
    }
}

/// A workload condition: `Kind/name`, `Kind/*` or `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WorkloadPattern {
    kind: Option<WorkloadKind>,
    name: Option<NamePattern>,
}

impl WorkloadPattern {
    fn parse(s: &str) -> Result<WorkloadPattern, String> {
        let (kind, name) = match s.split_once('/') {
            Some((k, n)) => {
                let kind = WorkloadKind::parse(k).ok_or_else(|| {
                    format!(
                        "unknown workload kind {k:?} (one of {})",
                        WorkloadKind::ALL.map(|k| k.as_str()).join(", ")
                    )
                })?;
                (Some(kind), n)
            }
            None => (None, s),
        };
        if name.is_empty() {
            return Err("empty workload name".into());
        }
        let name = (name != "*").then(|| NamePattern::parse(name));
        Ok(WorkloadPattern { kind, name })
    }

    fn matches(&self, p: &PodIdentity) -> bool {
        self.kind.is_none_or(|k| k == p.workload.kind)
            && self
                .name
                .as_ref()
                .is_none_or(|n| n.matches(&p.workload.name))
    }
}

/// The compiled pod conditions of one filter.
#[derive(Debug, Clone, Default)]
pub struct PodFilter {
    namespace: Vec<String>,
    pod: Vec<NamePattern>,
    workload: Vec<WorkloadPattern>,
    selectors: Vec<Selector>,
}

impl PodFilter {
    /// The pod conditions of `f`, `None` when it has none.
    pub fn compile(path: &str, f: &proto::FlowFilter) -> Result<Option<PodFilter>, FilterError> {
        let e = |name: &str, i: usize, reason: String| FilterError {
            field: format!("{path}.{name}[{i}]"),
            reason,
        };
        let nonempty = |name: &str, v: &[String]| -> Result<(), FilterError> {
            match v.iter().position(|s| s.is_empty()) {
                Some(i) => Err(e(name, i, "empty value".into())),
                None => super::filter::check_len(path, name, v),
            }
        };
        nonempty("namespace", &f.namespace)?;
        nonempty("pod", &f.pod)?;
        nonempty("workload", &f.workload)?;
        nonempty("label_selector", &f.label_selector)?;
        if f.namespace.is_empty()
            && f.pod.is_empty()
            && f.workload.is_empty()
            && f.label_selector.is_empty()
        {
            return Ok(None);
        }
        let workload = f
            .workload
            .iter()
            .enumerate()
            .map(|(i, w)| WorkloadPattern::parse(w).map_err(|r| e("workload", i, r)))
            .collect::<Result<_, _>>()?;
        let selectors = f
            .label_selector
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Selector::parse(s).map_err(|r| e("label_selector", i, format!("{s:?}: {r}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(PodFilter {
            namespace: f.namespace.clone(),
            pod: f.pod.iter().map(|p| NamePattern::parse(p)).collect(),
            workload,
            selectors,
        }))
    }

    fn matches_pod(&self, p: &PodIdentity) -> bool {
        (self.namespace.is_empty() || self.namespace.contains(&p.namespace))
            && (self.pod.is_empty() || self.pod.iter().any(|n| n.matches(&p.name)))
            && (self.workload.is_empty() || self.workload.iter().any(|w| w.matches(p)))
            && (self.selectors.is_empty() || self.selectors.iter().any(|s| s.matches(p)))
    }

    /// Whether one end's pod satisfies every condition.
    pub fn matches(&self, rec: &FlowRecord) -> bool {
        [&rec.pod, &rec.remote_pod]
            .into_iter()
            .flatten()
            .any(|p| self.matches_pod(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Workload;

    fn pod(
        name: &str,
        ns: &str,
        labels: &[(&str, &str)],
        kind: WorkloadKind,
        w: &str,
    ) -> PodIdentity {
        PodIdentity {
            name: name.into(),
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workload: Workload {
                kind,
                name: w.into(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn selectors() {
        let p = pod(
            "web-1",
            "shop",
            &[("app", "web"), ("tier", "front")],
            WorkloadKind::Pod,
            "web-1",
        );
        let yes = |s: &str| Selector::parse(s).unwrap().matches(&p);
        assert!(yes("app=web,tier!=db"));
        assert!(yes("app==web"));
        assert!(yes("app"));
        assert!(yes("!db"));
        assert!(yes("tier in (front, back)"));
        assert!(yes("tier notin (db),missing notin (x)"));
        assert!(!yes("app=web,tier=db"));
        assert!(!yes("!app"));
        assert!(!yes("tier in (db)"));
        for bad in ["", "app=,", "a b=c", "x in (a", "x in a", "=v", "app=we b"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
        }
        // An empty value is a value.
        assert!(!yes("app="));
    }

    #[test]
    fn workload_patterns() {
        let p = pod("web-5-x", "shop", &[], WorkloadKind::Deployment, "web");
        let yes = |s: &str| WorkloadPattern::parse(s).unwrap().matches(&p);
        assert!(yes("Deployment/web"));
        assert!(yes("deployment/*"));
        assert!(yes("web"));
        assert!(yes("Deployment/we*"));
        assert!(!yes("StatefulSet/web"));
        assert!(!yes("api"));
        assert!(WorkloadPattern::parse("Operator/x").is_err());
        assert!(WorkloadPattern::parse("Deployment/").is_err());
    }

    fn filter(f: proto::FlowFilter) -> PodFilter {
        PodFilter::compile("allow[0]", &f).unwrap().unwrap()
    }

    #[test]
    fn conditions_hold_together_on_one_end() {
        use std::sync::Arc;
        let mut rec = crate::export::ecs::tests::record(crate::model::FlowDirection::Egress);
        rec.pod = Some(Arc::new(pod(
            "web-1",
            "shop",
            &[("app", "web")],
            WorkloadKind::Pod,
            "web-1",
        )));
        rec.remote_pod = Some(Arc::new(pod(
            "db-0",
            "data",
            &[("app", "db")],
            WorkloadKind::StatefulSet,
            "db",
        )));
        let f = filter(proto::FlowFilter {
            namespace: vec!["data".into()],
            ..Default::default()
        });
        assert!(f.matches(&rec), "the remote end's namespace");
        let f = filter(proto::FlowFilter {
            namespace: vec!["shop".into()],
            pod: vec!["db-*".into()],
            ..Default::default()
        });
        assert!(!f.matches(&rec), "namespace of one end, name of the other");
        let f = filter(proto::FlowFilter {
            pod: vec!["web-*".into()],
            label_selector: vec!["app=web".into()],
            ..Default::default()
        });
        assert!(f.matches(&rec));
        rec.pod = None;
        rec.remote_pod = None;
        assert!(!f.matches(&rec), "no pod: a pod condition does not hold");
        assert!(
            PodFilter::compile("allow[0]", &proto::FlowFilter::default())
                .unwrap()
                .is_none()
        );
        let bad = proto::FlowFilter {
            label_selector: vec!["app=web".into(), "x in (".into()],
            ..Default::default()
        };
        let e = PodFilter::compile("deny[2]", &bad).unwrap_err();
        assert_eq!(e.field, "deny[2].label_selector[1]");
    }
}
