//! The configured exporters (`export.<sink>.*`) started as subscribers of
//! the hub, for `serve` and for a replay through the sinks.

use std::sync::Arc;
use std::time::Duration;

use super::DaemonError;
use crate::config::Config;
use crate::export::ecs::HostInfo;
use crate::export::hub::Hub;
use crate::export::nats::{self, NatsCounters};
use crate::export::otlp;
use crate::export::sink::{self, RunningSink, SinkReport};
use crate::export::status::StatusFeed;
use crate::export::{jsonl, jsonl::JsonlError};

/// Checks every sink's filters before anything is set up.
pub(super) fn check_filters(cfg: &Config) -> Result<(), DaemonError> {
    let j = &cfg.export.jsonl;
    jsonl::compile_filters(&j.filters, &j.deny)?;
    if cfg.export.nats.enabled() {
        nats::subscription(&cfg.export.nats)?;
    }
    if cfg.export.otlp.enabled() {
        otlp::subscription(&cfg.export.otlp)?;
    }
    Ok(())
}

/// Whether the daemon runs in a Kubernetes pod (the kubelet sets this
/// variable in every container): then the node name is also the OTLP
/// resource's `k8s.node.name`.
fn in_kubernetes() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// The running sinks.
#[derive(Debug, Default)]
pub(super) struct Sinks {
    running: Vec<RunningSink>,
    /// The NATS sink's counters, when it runs.
    pub(super) nats: Option<Arc<NatsCounters>>,
}

/// How one sink ended.
#[derive(Debug)]
pub(super) struct SinkOutcome {
    /// `jsonl`, `nats`.
    pub(super) kind: &'static str,
    /// Its subscriber name.
    pub(super) peer: String,
    /// Its report; `None` when it did not finish in time.
    pub(super) report: Option<SinkReport>,
}

impl Sinks {
    /// Starts the sinks `cfg` enables, subscribed to `hub`, as node
    /// `node`; the NATS sink publishes the status of `feed`, when given.
    pub(super) async fn start(
        cfg: &Config,
        hub: &Hub,
        node: &str,
        host: HostInfo,
        feed: Option<StatusFeed>,
    ) -> Result<Sinks, DaemonError> {
        let mut sinks = Sinks::default();
        let j = &cfg.export.jsonl;
        if !j.path.trim().is_empty() {
            let sub = jsonl::subscription(j)?;
            let out = jsonl::JsonlSink::open(j, host.clone())?;
            let running = sink::start(hub, Box::new(out), sub)
                .await
                .map_err(|s| JsonlError::Subscribe(s.message().to_string()))?;
            tracing::info!(path = %j.path, "writing flows as JSON lines");
            sinks.running.push(running);
        }
        let n = &cfg.export.nats;
        if n.enabled() {
            let (running, counters) = nats::spawn(hub, n, node, host.clone(), feed).await?;
            tracing::info!(
                servers = %n.url,
                subjects = %format!("{}.{}.*", n.subject_prefix.trim(), nats::subject_token(node)),
                "publishing flows to NATS JetStream"
            );
            sinks.running.push(running);
            sinks.nats = Some(counters);
        }
        let o = &cfg.export.otlp;
        if o.enabled() {
            let k8s_node = in_kubernetes().then(|| node.to_string());
            let (running, _) = otlp::spawn(hub, o, node, host, k8s_node).await?;
            tracing::info!(endpoint = %o.endpoint.trim(), "exporting flows as OTLP log records");
            sinks.running.push(running);
        }
        Ok(sinks)
    }

    /// Waits for every sink to finish (their streams end when the pipeline
    /// closed), each at most `within`.
    pub(super) async fn finish(self, within: Duration) -> Vec<SinkOutcome> {
        let mut out = Vec::with_capacity(self.running.len());
        for r in self.running {
            let (kind, peer) = (r.kind, r.peer.clone());
            let report = r.finish(within).await;
            out.push(SinkOutcome { kind, peer, report });
        }
        out
    }
}
