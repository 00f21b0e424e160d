//! Command line: `serve`, `watch`, `status`, `check`.
//!
//! Global options: `-c/--config FILE` (YAML), `-E key=value` (repeatable,
//! highest precedence), `--log-level`, `--log-format text|json`. Environment
//! variables `SOCKSCOPE_<SECTION>__<KEY>` sit between the file and `-E`
//! (e.g. `SOCKSCOPE_SOCKET__FLOW_INACTIVE_TIMEOUT=10s`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;

mod pods;
mod relay;
mod status_text;
mod watch;

pub use watch::{loss_line, table_line, watch_request};

pub use status_text::status_text;

use crate::config::{self, Config};
use crate::exit::ExitCode;
use crate::export::client::{self, ServerAddr};
use crate::export::convert;
use crate::export::proto;

/// Per-CPU/per-source flow monitor.
#[derive(Debug, Parser)]
#[command(
    name = "sockscope",
    version,
    about = "TCP/UDP flow monitor streaming over gRPC"
)]
pub struct Cli {
    /// YAML configuration file.
    #[arg(short = 'c', long = "config", global = true)]
    pub config: Option<PathBuf>,
    /// Override a configuration key (repeatable), e.g. -E server.history_size=100.
    #[arg(short = 'E', value_name = "KEY=VALUE", global = true)]
    pub overrides: Vec<String>,
    /// Log filter (tracing EnvFilter syntax); overrides log.level.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log format; overrides log.format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Allow plaintext gRPC on a non-loopback address.
        #[arg(long)]
        insecure_listen: bool,
    },
    /// Stream flows from a running daemon.
    Watch(Box<WatchArgs>),
    /// Show the daemon's status.
    Status(StatusArgs),
    /// Check that the daemon could start on this machine.
    Check,
    /// Run a recording (`socket.record_path`) through the decoder, the flow
    /// engine and the export encoding at full speed, and print what came
    /// out (for profiling the pipeline on any machine).
    Replay(ReplayArgs),
    /// Ask the node's container runtime (CRI) which pods and containers it
    /// runs, or which pod a process is in, as the daemon resolves them;
    /// prints JSON lines.
    Pods(pods::PodsArgs),
    /// Serve `sockscope.v1.FlowService` from the cluster's JetStream stream
    /// (every node's flows), for grpcurl, clients and `watch --server`.
    Relay(relay::RelayArgs),
}

/// `replay` options.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The recording.
    pub file: PathBuf,
    /// Replay it this many times, each through a fresh engine (1 to 1000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::daemon::replay::MAX_REPEAT)))]
    pub repeat: u32,
    /// Write one ECS document per final flow to standard output (the
    /// summary then goes to standard error).
    #[arg(long, conflicts_with = "sinks")]
    pub ecs: bool,
    /// Hand the flows to the fan-out hub and the sinks the configuration
    /// enables (`export.*`), as `serve` does, and print what each sink
    /// delivered; waits for the sinks to deliver.
    #[arg(long)]
    pub sinks: bool,
}

/// Output format of `watch`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum WatchFormat {
    /// One ECS document per line.
    Ecs,
    /// proto3 JSON of each response, one per line.
    Json,
    /// Human-readable table.
    Table,
}

/// `watch` options.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Server: TCP host:port, or a Unix socket path (default: the configured
    /// socket if it exists, else the configured TCP address).
    #[arg(long, conflicts_with = "nats")]
    pub server: Option<String>,
    /// Read the cluster's flow stream from these NATS servers instead of a
    /// daemon (comma-separated URLs): the JetStream stream, subject prefix,
    /// credentials and TLS of `export.nats.*` in the configuration apply.
    #[arg(long)]
    pub nats: Option<String>,
    /// IP or CIDR of either endpoint (repeatable).
    #[arg(long)]
    pub ip: Vec<String>,
    /// IP or CIDR of the source.
    #[arg(long)]
    pub src_ip: Vec<String>,
    /// IP or CIDR of the destination.
    #[arg(long)]
    pub dst_ip: Vec<String>,
    /// Port of either endpoint.
    #[arg(long)]
    pub port: Vec<u32>,
    /// Port of the source.
    #[arg(long)]
    pub src_port: Vec<u32>,
    /// Port of the destination.
    #[arg(long)]
    pub dst_port: Vec<u32>,
    /// tcp or udp.
    #[arg(long, value_enum)]
    pub transport: Vec<TransportArg>,
    /// Process id.
    #[arg(long)]
    pub pid: Vec<u32>,
    /// Process name.
    #[arg(long)]
    pub process: Vec<String>,
    /// Executable path.
    #[arg(long)]
    pub executable: Vec<String>,
    /// User id.
    #[arg(long)]
    pub uid: Vec<u32>,
    /// User name.
    #[arg(long)]
    pub user: Vec<String>,
    /// DNS name of either endpoint (`*.example.com` for sub-domains).
    #[arg(long)]
    pub domain: Vec<String>,
    /// Container id (or a prefix of at least 12 characters).
    #[arg(long)]
    pub container: Vec<String>,
    /// Kubernetes namespace of either end's pod.
    #[arg(long)]
    pub namespace: Vec<String>,
    /// Pod name of either end; `web-*` matches by prefix.
    #[arg(long)]
    pub pod: Vec<String>,
    /// Workload of either end's pod: `Kind/name`, `Kind/*` or `name`.
    #[arg(long)]
    pub workload: Vec<String>,
    /// Label selector on either end's pod, e.g. `app=web,tier!=db`.
    #[arg(long = "selector", short = 'l')]
    pub label_selector: Vec<String>,
    /// egress, ingress or unknown.
    #[arg(long, value_enum)]
    pub direction: Vec<DirectionArg>,
    /// 4 or 6.
    #[arg(long, value_parser = clap::value_parser!(u8).range(4..=6))]
    pub ipv: Vec<u8>,
    /// Replay this many recent flows.
    #[arg(long, short = 'n', default_value_t = 0)]
    pub number: u64,
    /// Only flows that ended within this long ago (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Keep streaming new flows (default when neither --number nor --since).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Include interim records of long flows.
    #[arg(long)]
    pub updates: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = WatchFormat::Table)]
    pub format: WatchFormat,
}

/// `--transport` values.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TransportArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `--direction` values.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DirectionArg {
    /// Locally initiated.
    Egress,
    /// Remotely initiated.
    Ingress,
    /// Start not observed.
    Unknown,
}

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Server address (as for watch).
    #[arg(long)]
    pub server: Option<String>,
    /// Keep printing every INTERVAL (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
    /// Print proto3 JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Entry point; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                ExitCode::Usage
            } else {
                ExitCode::Ok
            };
            let _ = e.print();
            return code;
        }
    };
    run(cli)
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let mut overrides = cli.overrides.clone();
    if let Command::Serve {
        insecure_listen: true,
    } = cli.command
    {
        overrides.push("server.insecure_listen=true".to_string());
    }
    if let Some(l) = &cli.log_level {
        overrides.push(format!("log.level={l}"));
    }
    if let Some(f) = cli.log_format {
        overrides.push(format!(
            "log.format={}",
            if f == LogFormat::Json { "json" } else { "text" }
        ));
    }
    let cfg = match config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::Usage;
        }
    };
    init_logging(&cfg);
    match cli.command {
        Command::Serve { .. } => crate::daemon::serve(cfg),
        Command::Check => crate::daemon::check(&cfg),
        Command::Watch(args) => client_runtime(|| watch::run(&cfg, *args)),
        Command::Status(args) => client_runtime(|| status(&cfg, args)),
        Command::Replay(args) => replay(&cfg, &args),
        Command::Pods(args) => pods::run(&cfg, &args),
        Command::Relay(args) => client_runtime(|| relay::run(&cfg, args)),
    }
}

fn replay(cfg: &Config, a: &ReplayArgs) -> ExitCode {
    use crate::daemon::replay::{self, ReplayOutput};
    if a.sinks {
        return match replay::replay_through_sinks(cfg, &a.file, a.repeat) {
            Ok((report, lines)) => {
                println!("{report}");
                for l in &lines {
                    println!("{l}");
                }
                if lines.iter().all(|l| l.report.is_some()) {
                    ExitCode::Ok
                } else {
                    ExitCode::Failure
                }
            }
            Err(e) => {
                eprintln!("sockscope: replay: {e}");
                ExitCode::from(&e)
            }
        };
    }
    let output = if a.ecs {
        ReplayOutput::Ecs
    } else {
        ReplayOutput::Summary
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = replay::replay(cfg, &a.file, a.repeat, output, &mut out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(report), Ok(())) => {
            if a.ecs {
                eprintln!("{report}");
            } else {
                println!("{report}");
            }
            ExitCode::Ok
        }
        (Err(e), _) => {
            eprintln!("sockscope: replay: {e}");
            ExitCode::from(&e)
        }
        (Ok(_), Err(e)) => {
            eprintln!("sockscope: replay: writing flows: {e}");
            ExitCode::Failure
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.log.format == "json" {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

fn client_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("sockscope: starting runtime: {e}");
            ExitCode::Failure
        }
    }
}

fn server_addr(cfg: &Config, explicit: Option<&str>) -> ServerAddr {
    match explicit {
        Some(s) => ServerAddr::parse(s),
        None => ServerAddr::default_for(Path::new(&cfg.server.unix_socket), &cfg.server.listen),
    }
}

/// A flow service client of the daemon (or relay) at `explicit`, else the
/// configured one; an unreachable server is printed and exit code 3.
async fn connect_flow_client(
    cfg: &Config,
    explicit: Option<&str>,
) -> Result<proto::flow_service_client::FlowServiceClient<tonic::transport::Channel>, ExitCode> {
    match client::connect(&server_addr(cfg, explicit)).await {
        Ok(ch) => Ok(client::flow_client(ch)),
        Err(e) => {
            eprintln!("sockscope: {e}");
            Err(ExitCode::Unavailable)
        }
    }
}

fn status_exit(s: &tonic::Status) -> ExitCode {
    match s.code() {
        tonic::Code::InvalidArgument => ExitCode::Usage,
        tonic::Code::Unavailable => ExitCode::Unavailable,
        _ => ExitCode::Failure,
    }
}

async fn status(cfg: &Config, a: StatusArgs) -> ExitCode {
    let mut c = match connect_flow_client(cfg, a.server.as_deref()).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let print = |s: &proto::GetStatusResponse| -> bool {
        let text = if a.json {
            match client::proto_json(s, "sockscope.v1.GetStatusResponse") {
                Ok(v) => v.to_string(),
                Err(e) => {
                    eprintln!("sockscope: {e}");
                    return false;
                }
            }
        } else {
            status_text(s)
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").is_ok()
    };
    match a.watch {
        None => match c.get_status(proto::GetStatusRequest {}).await {
            Ok(r) => {
                if print(r.get_ref()) {
                    ExitCode::Ok
                } else {
                    ExitCode::Failure
                }
            }
            Err(s) => {
                eprintln!("sockscope: {}: {}", s.code(), s.message());
                status_exit(&s)
            }
        },
        Some(interval) => {
            let req = proto::WatchStatusRequest {
                interval: Some(convert::duration(interval)),
            };
            let mut stream = match c.watch_status(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    eprintln!("sockscope: {}: {}", s.code(), s.message());
                    return status_exit(&s);
                }
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(s) => {
                        if !print(&s) {
                            return ExitCode::Ok;
                        }
                    }
                    Err(s) => {
                        eprintln!("sockscope: {}: {}", s.code(), s.message());
                        return status_exit(&s);
                    }
                }
            }
            ExitCode::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_map_to_client_exit_codes() {
        let code = |c: tonic::Code| status_exit(&tonic::Status::new(c, "x"));
        assert_eq!(code(tonic::Code::InvalidArgument), ExitCode::Usage);
        assert_eq!(code(tonic::Code::Unavailable), ExitCode::Unavailable);
        assert_eq!(code(tonic::Code::ResourceExhausted), ExitCode::Failure);
    }
}
