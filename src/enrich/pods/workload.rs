//! The workload a pod belongs to, derived from its labels and name.
//!
//! The CRI hands the runtime a pod's labels, not its owner references, so
//! the owner is inferred from what each controller stamps on its pods:
//!
//! | labels | kind | name |
//! |---|---|---|
//! | `pod-template-hash=H`, pod named `<rs>-<x>` with `<rs>` ending in `-H` | Deployment | `<rs>` without `-H` |
//! | `controller-revision-hash` and `statefulset.kubernetes.io/pod-name` | StatefulSet | pod name without `-<ordinal>` |
//! | `controller-revision-hash` and `pod-template-generation` | DaemonSet | pod name without its last `-<suffix>` |
//! | `batch.kubernetes.io/job-name=J` (or `job-name=J`), `J` = `<c>-<8+ digits>` | CronJob | `c` |
//! | the same, otherwise | Job | `J` |
//! | none of these | Pod | the pod name |
//!
//! A ReplicaSet made by hand carries `pod-template-hash` only when copied
//! from a Deployment, so such pods are named after the Deployment its name
//! implies. A pod whose name does not fit the pattern its labels promise is
//! reported as a bare pod rather than guessed further.

use std::collections::BTreeMap;

use crate::model::{Workload, WorkloadKind};

/// Label a Deployment's ReplicaSet puts on its pods.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Label of StatefulSet and DaemonSet pods.
const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
/// Label of StatefulSet pods.
const STATEFULSET_POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
/// Label of DaemonSet pods.
const POD_TEMPLATE_GENERATION: &str = "pod-template-generation";
/// Labels of Job pods, current and legacy.
const JOB_NAME_LABELS: [&str; 2] = ["batch.kubernetes.io/job-name", "job-name"];
/// Fewest digits of the scheduled-minute suffix a CronJob gives its Jobs.
const CRONJOB_SUFFIX_MIN_DIGITS: usize = 8;

/// `name` without its last `-<part>`, when there is one and both sides are
/// non-empty.
fn strip_last_part(name: &str) -> Option<&str> {
    let (head, tail) = name.rsplit_once('-')?;
    (!head.is_empty() && !tail.is_empty()).then_some(head)
}

/// The workload of a pod named `name` with `labels`.
pub fn derive(name: &str, labels: &BTreeMap<String, String>) -> Workload {
    let bare = Workload {
        kind: WorkloadKind::Pod,
        name: name.to_string(),
    };
    if let Some(hash) = labels.get(POD_TEMPLATE_HASH).filter(|h| !h.is_empty()) {
        let deployment = strip_last_part(name)
            .and_then(|rs| rs.strip_suffix(hash.as_str()))
            .and_then(|d| d.strip_suffix('-'))
            .filter(|d| !d.is_empty());
        return match deployment {
            Some(d) => Workload {
                kind: WorkloadKind::Deployment,
                name: d.to_string(),
            },
            None => bare,
        };
    }
    if labels.contains_key(CONTROLLER_REVISION_HASH) {
        if labels.contains_key(STATEFULSET_POD_NAME) {
            let set = name
                .rsplit_once('-')
                .filter(|(h, ord)| {
                    !h.is_empty() && !ord.is_empty() && ord.bytes().all(|b| b.is_ascii_digit())
                })
                .map(|(h, _)| h);
            return match set {
                Some(s) => Workload {
                    kind: WorkloadKind::StatefulSet,
                    name: s.to_string(),
                },
                None => bare,
            };
        }
        if labels.contains_key(POD_TEMPLATE_GENERATION) {
            return match strip_last_part(name) {
                Some(d) => Workload {
                    kind: WorkloadKind::DaemonSet,
                    name: d.to_string(),
                },
                None => bare,
            };
        }
    }
    if let Some(job) = JOB_NAME_LABELS
        .iter()
        .find_map(|l| labels.get(*l))
        .filter(|j| !j.is_empty())
    {
        let cron = job.rsplit_once('-').filter(|(c, minute)| {
            !c.is_empty()
                && minute.len() >= CRONJOB_SUFFIX_MIN_DIGITS
                && minute.bytes().all(|b| b.is_ascii_digit())
        });
        return match cron {
            Some((c, _)) => Workload {
                kind: WorkloadKind::CronJob,
                name: c.to_string(),
            },
            None => Workload {
                kind: WorkloadKind::Job,
                name: job.clone(),
            },
        };
    }
    bare
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn w(kind: WorkloadKind, name: &str) -> Workload {
        Workload {
            kind,
            name: name.to_string(),
        }
    }

    #[test]
    fn deployment_through_its_replicaset() {
        let l = labels(&[("app", "web"), ("pod-template-hash", "5d8f9c7b6")]);
        assert_eq!(
            derive("web-5d8f9c7b6-x2x4q", &l),
            w(WorkloadKind::Deployment, "web")
        );
        // Dashes in the Deployment's own name stay.
        assert_eq!(
            derive("shop-front-5d8f9c7b6-x2x4q", &l),
            w(WorkloadKind::Deployment, "shop-front")
        );
        // A name that does not carry the hash is not guessed at.
        assert_eq!(
            derive("web-abc-x2x4q", &l),
            w(WorkloadKind::Pod, "web-abc-x2x4q")
        );
        assert_eq!(
            derive("5d8f9c7b6-x", &l),
            w(WorkloadKind::Pod, "5d8f9c7b6-x")
        );
    }

    #[test]
    fn statefulset_and_daemonset() {
        let sts = labels(&[
            ("controller-revision-hash", "db-6f7d9"),
            ("statefulset.kubernetes.io/pod-name", "db-0"),
        ]);
        assert_eq!(derive("db-0", &sts), w(WorkloadKind::StatefulSet, "db"));
        assert_eq!(
            derive("my-db-12", &sts),
            w(WorkloadKind::StatefulSet, "my-db")
        );
        assert_eq!(derive("db-x", &sts), w(WorkloadKind::Pod, "db-x"));
        let ds = labels(&[
            ("controller-revision-hash", "7b9c"),
            ("pod-template-generation", "3"),
        ]);
        assert_eq!(
            derive("node-agent-k7m2p", &ds),
            w(WorkloadKind::DaemonSet, "node-agent")
        );
        assert_eq!(derive("agent", &ds), w(WorkloadKind::Pod, "agent"));
    }

    #[test]
    fn jobs_and_cronjobs() {
        let job = labels(&[("batch.kubernetes.io/job-name", "migrate")]);
        assert_eq!(
            derive("migrate-7kq2p", &job),
            w(WorkloadKind::Job, "migrate")
        );
        let legacy = labels(&[("job-name", "migrate-2")]);
        assert_eq!(
            derive("migrate-2-abcde", &legacy),
            w(WorkloadKind::Job, "migrate-2")
        );
        let cron = labels(&[("batch.kubernetes.io/job-name", "backup-28891230")]);
        assert_eq!(
            derive("backup-28891230-7kq2p", &cron),
            w(WorkloadKind::CronJob, "backup")
        );
        // Seven digits is not a scheduled minute.
        let short = labels(&[("job-name", "backup-2889123")]);
        assert_eq!(derive("x", &short), w(WorkloadKind::Job, "backup-2889123"));
    }

    #[test]
    fn bare_pods() {
        assert_eq!(derive("debug", &labels(&[])), w(WorkloadKind::Pod, "debug"));
        assert_eq!(
            derive("x", &labels(&[("app", "x"), ("pod-template-hash", "")])),
            w(WorkloadKind::Pod, "x")
        );
        assert_eq!(
            derive(
                "-",
                &labels(&[
                    ("controller-revision-hash", "a"),
                    ("pod-template-generation", "1")
                ])
            ),
            w(WorkloadKind::Pod, "-")
        );
    }
}
