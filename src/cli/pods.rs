//! `sockscope pods`: what the daemon's pod resolver learns from the node's
//! container runtime, on demand. One JSON line per container the runtime
//! runs, or per `--pid` (its container id read from its cgroup, then looked
//! up as the daemon does on first sight); with `--follow`, again every
//! interval, each round closed by the resolver's counters.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::config::Config;
use crate::daemon::pods::{resolver_config, runtime_socket};
use crate::enrich::container::parse_cgroup;
use crate::enrich::pods::endpoint_socket;
use crate::enrich::pods::resolver::Resolver;
use crate::enrich::process::{ProcFs, ProcSource};
use crate::exit::ExitCode;
use crate::model::{PodIdentity, PodResolverStatus};

/// Shortest accepted `--interval`.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `pods` options.
#[derive(Debug, Args)]
pub struct PodsArgs {
    /// The runtime's CRI socket (`unix:///path` or `/path`); default:
    /// `kubernetes.runtime_endpoint`, else the first default socket found.
    #[arg(long)]
    pub runtime_endpoint: Option<String>,
    /// Where the processes of `--pid` are read (default: `socket.proc_root`).
    #[arg(long)]
    pub proc_root: Option<PathBuf>,
    /// Resolve this process's pod (repeatable).
    #[arg(long)]
    pub pid: Vec<u32>,
    /// Keep going: list again every `--interval`, with the counters.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Interval of `--follow` rounds.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Stop after this many `--follow` rounds (0: never).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

/// The JSON of a pod identity.
pub fn pod_json(p: &PodIdentity) -> Value {
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "labels": p.labels,
        "annotations": p.annotations,
        "workload": { "kind": p.workload.kind.as_str(), "name": p.workload.name },
        "container_name": p.container_name,
        "image": p.image,
        "ips": p.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
    })
}

fn status_json(s: &PodResolverStatus) -> Value {
    json!({ "status": {
        "endpoint": s.endpoint,
        "connected": s.connected,
        "runtime": s.runtime,
        "pods": s.pods,
        "containers": s.containers,
        "lookups": s.lookups,
        "lookup_failures": s.lookup_failures,
        "resyncs": s.resyncs,
        "resync_failures": s.resync_failures,
        "left_out": s.left_out,
        "last_error": s.last_error,
    }})
}

/// Runs `sockscope pods`.
pub fn run(cfg: &Config, a: &PodsArgs) -> ExitCode {
    let socket = match &a.runtime_endpoint {
        Some(ep) => match endpoint_socket(ep) {
            Some(s) => s,
            None => {
                eprintln!("sockscope: --runtime-endpoint {ep:?}: expected unix:///path/to/socket or an absolute path");
                return ExitCode::Usage;
            }
        },
        None => match runtime_socket(cfg) {
            Some(s) => s,
            None => {
                eprintln!("sockscope: no container runtime socket configured (kubernetes.runtime_endpoint) or found; give --runtime-endpoint");
                return ExitCode::Unavailable;
            }
        },
    };
    if a.follow && a.interval < MIN_INTERVAL {
        eprintln!("sockscope: --interval: at least {MIN_INTERVAL:?}");
        return ExitCode::Usage;
    }
    let proc_root = a
        .proc_root
        .clone()
        .unwrap_or_else(|| cfg.socket.proc_root.clone());
    let procs = match ProcFs::new(&proc_root) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::Failure;
        }
    };
    let shown = socket.display().to_string();
    let rcfg = resolver_config(cfg, socket);
    super::client_runtime(|| async move {
        let (mut r, _view, _rx) = Resolver::new(rcfg);
        let mut round = 0u64;
        loop {
            round += 1;
            let listed = r.resync().await;
            if let Err(e) = &listed {
                if !a.follow {
                    eprintln!("sockscope: container runtime at {shown}: {e}");
                    return ExitCode::Unavailable;
                }
            }
            let mut out = Vec::new();
            if a.pid.is_empty() {
                for (id, p) in r.containers() {
                    out.push(json!({ "container_id": id, "pod": pod_json(&p) }));
                }
            } else {
                for &pid in &a.pid {
                    out.push(pid_line(&mut r, &procs, pid).await);
                }
            }
            if a.follow {
                out.push(status_json(&r.status()));
            }
            let mut stdout = std::io::stdout().lock();
            for v in out {
                // A closed standard output (`| head`) ends the command.
                if writeln!(stdout, "{v}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return ExitCode::Ok;
                }
            }
            drop(stdout);
            if !a.follow || (a.count > 0 && round >= a.count) {
                return ExitCode::Ok;
            }
            tokio::time::sleep(a.interval).await;
        }
    })
}

async fn pid_line(r: &mut Resolver, procs: &ProcFs, pid: u32) -> Value {
    let cgroup = match procs.read(pid) {
        Ok(s) => s.cgroup,
        Err(e) => {
            return json!({ "pid": pid, "container_id": null, "pod": null, "error": e.to_string() })
        }
    };
    let Some(id) = cgroup
        .as_deref()
        .map(parse_cgroup)
        .and_then(|c| c.container_id)
    else {
        return json!({ "pid": pid, "container_id": null, "pod": null });
    };
    match r.lookup(&id).await {
        Ok(Some(p)) => json!({ "pid": pid, "container_id": id, "pod": pod_json(&p) }),
        Ok(None) => json!({ "pid": pid, "container_id": id, "pod": null }),
        Err(e) => {
            json!({ "pid": pid, "container_id": id, "pod": null, "error": e.to_string() })
        }
    }
}
