//! `sockscope relay`: `sockscope.v1.FlowService` served from the cluster's
//! JetStream stream.

use clap::Args;

use super::watch::nats_reader;
use crate::config::Config;
use crate::exit::ExitCode;

/// `relay` options.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// NATS servers (comma-separated URLs); the stream, subject prefix,
    /// credentials and TLS of `export.nats.*` apply.
    #[arg(long)]
    pub nats: String,
    /// TCP address to serve on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: String,
    /// Allow plaintext gRPC on a non-loopback address (the relay serves
    /// every node's flows: keep it on a trusted network).
    #[arg(long)]
    pub insecure_listen: bool,
    /// Name the relay answers with in `GetStatus` (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
}

/// Runs `sockscope relay` until SIGTERM or SIGINT.
pub(super) async fn run(cfg: &Config, a: RelayArgs) -> ExitCode {
    use crate::export::relay::{self, Relay};
    let addr: std::net::SocketAddr = match a.listen.parse() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sockscope: --listen {:?}: {e}", a.listen);
            return ExitCode::Usage;
        }
    };
    if !addr.ip().is_loopback() && !a.insecure_listen {
        eprintln!(
            "sockscope: --listen {addr}: refusing plaintext gRPC on a non-loopback address; \
             add --insecure-listen"
        );
        return ExitCode::Usage;
    }
    let name = a
        .name
        .clone()
        .unwrap_or_else(crate::export::server::host_name);
    let (client, ncfg) = match nats_reader(cfg, &a.nats, &name).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sockscope: --listen {addr}: {e}");
            return ExitCode::Listen;
        }
    };
    tracing::info!(%addr, servers = %a.nats, stream = %ncfg.stream.name, "relay serving");
    let shutdown = async {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut t) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    match relay::serve(Relay::new(client, ncfg, name), listener, shutdown).await {
        Ok(()) => ExitCode::Ok,
        Err(e) => {
            eprintln!("sockscope: relay: {e}");
            ExitCode::Failure
        }
    }
}
