//! Command line: `serve`, `watch`, `status`, `check`.
//!
//! Global options: `-c/--config FILE` (YAML), `-E key=value` (repeatable,
//! highest precedence), `--log-level`, `--log-format text|json`. Environment
//! variables `SOCKSCOPE_<SECTION>__<KEY>` sit between the file and `-E`
//! (e.g. `SOCKSCOPE_SOCKET__FLOW_INACTIVE_TIMEOUT=10s`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;

mod pods;
mod status_text;

pub use status_text::status_text;

use crate::config::{self, Config};
use crate::exit::ExitCode;
use crate::export::client::{self, ServerAddr};
use crate::export::convert;
use crate::export::ecs::{self, HostInfo};
use crate::export::proto;
use crate::export::status;
use crate::export::watch_json;
use crate::model::NodeInfo;

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
    Relay(RelayArgs),
}

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
        Command::Watch(args) => client_runtime(|| watch(&cfg, *args)),
        Command::Status(args) => client_runtime(|| status(&cfg, args)),
        Command::Replay(args) => replay(&cfg, &args),
        Command::Pods(args) => pods::run(&cfg, &args),
        Command::Relay(args) => client_runtime(|| relay(&cfg, args)),
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

fn status_exit(s: &tonic::Status) -> ExitCode {
    match s.code() {
        tonic::Code::InvalidArgument => ExitCode::Usage,
        tonic::Code::Unavailable => ExitCode::Unavailable,
        _ => ExitCode::Failure,
    }
}

/// Builds the StreamFlows request of `watch` flags.
pub fn watch_request(a: &WatchArgs) -> proto::StreamFlowsRequest {
    let filter = proto::FlowFilter {
        ip: a.ip.clone(),
        source_ip: a.src_ip.clone(),
        destination_ip: a.dst_ip.clone(),
        port: a.port.clone(),
        source_port: a.src_port.clone(),
        destination_port: a.dst_port.clone(),
        transport: a
            .transport
            .iter()
            .map(|t| match t {
                TransportArg::Tcp => proto::Transport::Tcp as i32,
                TransportArg::Udp => proto::Transport::Udp as i32,
            })
            .collect(),
        ip_version: a
            .ipv
            .iter()
            .map(|v| match v {
                4 => proto::IpVersion::Ipv4 as i32,
                6 => proto::IpVersion::Ipv6 as i32,
                _ => proto::IpVersion::Unspecified as i32,
            })
            .collect(),
        direction: a
            .direction
            .iter()
            .map(|d| match d {
                DirectionArg::Egress => proto::Direction::Egress as i32,
                DirectionArg::Ingress => proto::Direction::Ingress as i32,
                DirectionArg::Unknown => proto::Direction::Unknown as i32,
            })
            .collect(),
        pid: a.pid.clone(),
        process_name: a.process.clone(),
        executable: a.executable.clone(),
        uid: a.uid.clone(),
        user_name: a.user.clone(),
        domain: a.domain.clone(),
        container_id: a.container.clone(),
        namespace: a.namespace.clone(),
        pod: a.pod.clone(),
        workload: a.workload.clone(),
        label_selector: a.label_selector.clone(),
    };
    let empty = filter == proto::FlowFilter::default();
    proto::StreamFlowsRequest {
        number: a.number,
        since: a
            .since
            .and_then(|d| SystemTime::now().checked_sub(d))
            .map(convert::timestamp),
        until: None,
        follow: a.follow || (a.number == 0 && a.since.is_none()),
        include_updates: a.updates,
        allow: if empty { vec![] } else { vec![filter] },
        deny: vec![],
        max_flows_per_response: client::FLOWS_PER_RESPONSE,
    }
}

/// One line of the `table` format for a flow.
pub fn table_line(f: &proto::Flow) -> String {
    let ep = |e: &Option<proto::FlowEndpoint>| {
        e.as_ref().map_or_else(String::new, |e| {
            let host = if e.domain.is_empty() {
                e.ip.clone()
            } else {
                e.domain.clone()
            };
            if e.ip.contains(':') && e.domain.is_empty() {
                format!("[{host}]:{}", e.port)
            } else {
                format!("{host}:{}", e.port)
            }
        })
    };
    let net = f.network.clone().unwrap_or_default();
    let transport = match proto::Transport::try_from(net.transport) {
        Ok(proto::Transport::Tcp) => "tcp",
        Ok(proto::Transport::Udp) => "udp",
        _ => "?",
    };
    let dir = match proto::Direction::try_from(net.direction) {
        Ok(proto::Direction::Egress) => "out",
        Ok(proto::Direction::Ingress) => "in",
        _ => "?",
    };
    let end = f
        .end
        .as_ref()
        .and_then(convert::system_time)
        .map_or_else(String::new, ecs::rfc3339);
    let proc = f
        .process
        .as_ref()
        .map_or_else(|| "-".to_string(), |p| format!("{}/{}", p.pid, p.name));
    let user = f.user.as_ref().map_or_else(
        || "-".to_string(),
        |u| {
            if u.name.is_empty() {
                u.id.to_string()
            } else {
                u.name.clone()
            }
        },
    );
    // The pods of both ends, local first: "ns/pod" or "-".
    let pod = |p: &Option<proto::Pod>| {
        p.as_ref().map_or_else(
            || "-".to_string(),
            |p| format!("{}/{}", p.namespace, p.name),
        )
    };
    let pods = if f.pod.is_some() || f.remote_pod.is_some() {
        format!(" pod {} peer {}", pod(&f.pod), pod(&f.remote_pod))
    } else {
        String::new()
    };
    format!(
        "{end:<24} {transport:<3} {dir:<3} {:>45} -> {:<45} {:>7} {:>10} {:<20} {user}{pods}{}",
        ep(&f.source),
        ep(&f.destination),
        net.packets,
        net.bytes,
        proc,
        if f.r#final { "" } else { " (update)" }
    )
}

/// Human description of a loss notice.
pub fn loss_line(l: &proto::LossNotice) -> String {
    let source = proto::LossSource::try_from(l.source)
        .map_or_else(|_| l.source.to_string(), |s| s.as_str_name().to_string());
    let cpu = l.cpu.map_or_else(String::new, |c| format!(" cpu {c}"));
    let t = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref()
            .and_then(convert::system_time)
            .map_or_else(|| "?".to_string(), ecs::rfc3339)
    };
    format!(
        "lost {} records ({source}{cpu}) between {} and {}",
        l.count,
        t(&l.first),
        t(&l.last)
    )
}

/// A stream of responses from a daemon or from NATS, ending with an error
/// and its exit code when it fails.
type ResponseStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<proto::StreamFlowsResponse, (String, ExitCode)>>
            + Send,
    >,
>;

/// A NATS client for reading the stream at `url` with the credentials, TLS
/// and stream of `export.nats.*`, and that configuration; on failure the
/// message is printed and the exit code returned (2 for the
/// configuration's fault, 3 for an unreachable server).
async fn nats_reader(
    cfg: &Config,
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, crate::config::NatsConfig), ExitCode> {
    let mut ncfg = cfg.export.nats.clone();
    ncfg.url = url.to_string();
    match crate::export::nats::connect_reader(&ncfg, name).await {
        Ok(c) => Ok((c, ncfg)),
        Err(e) => {
            eprintln!("sockscope: {e}");
            Err(if e.exit_is_config() {
                ExitCode::Usage
            } else {
                ExitCode::Unavailable
            })
        }
    }
}

/// `watch --nats`: the cluster's stream read back from JetStream.
async fn watch_nats(cfg: &Config, a: WatchArgs, url: String) -> ExitCode {
    use crate::export::nats::read::{self, READ_QUEUE};
    let (client, ncfg) = match nats_reader(cfg, &url, "watch").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let req = watch_request(&a);
    let (tx, rx) = tokio::sync::mpsc::channel(READ_QUEUE);
    let reader = tokio::spawn(async move { read::read(client, &ncfg, &req, tx).await });
    let stream: ResponseStream =
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| {
            r.map_err(|e| {
                let code = match e {
                    read::ReadError::Filter(_) => ExitCode::Usage,
                    read::ReadError::Stream { .. } => ExitCode::Unavailable,
                    read::ReadError::Consume { .. } => ExitCode::Failure,
                };
                (e.to_string(), code)
            })
        }));
    let code = print_stream(&a, stream, None).await;
    if let Ok(summary) = reader.await {
        if summary.undecoded > 0 {
            eprintln!(
                "sockscope: {} of {} messages skipped: not protobuf payloads (a sink with format ecs_json?) or undecodable",
                summary.undecoded, summary.messages
            );
        }
    }
    code
}

async fn relay(cfg: &Config, a: RelayArgs) -> ExitCode {
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

async fn watch(cfg: &Config, a: WatchArgs) -> ExitCode {
    if let Some(url) = a.nats.clone() {
        return watch_nats(cfg, a, url).await;
    }
    let addr = server_addr(cfg, a.server.as_deref());
    let ch = match client::connect(&addr).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::Unavailable;
        }
    };
    let mut c = client::flow_client(ch);
    // ECS documents carry the node's facts (`host.*`): asked once.
    let node = if a.format == WatchFormat::Ecs {
        match c.get_status(proto::GetStatusRequest {}).await {
            Ok(r) => r.into_inner().node.map(|n| status::node_from_proto(&n)),
            Err(s) => {
                eprintln!(
                    "sockscope: node facts unavailable ({}: {}); host.* has the node name only",
                    s.code(),
                    s.message()
                );
                None
            }
        }
    } else {
        None
    };
    let stream = match c.stream_flows(watch_request(&a)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            eprintln!("sockscope: {}: {}", s.code(), s.message());
            return status_exit(&s);
        }
    };
    let stream: ResponseStream = Box::pin(stream.map(|r| {
        r.map_err(|s| {
            (
                format!("stream ended: {}: {}", s.code(), s.message()),
                status_exit(&s),
            )
        })
    }));
    print_stream(&a, stream, node.as_ref()).await
}

/// Prints a response stream in `a.format` until it ends.
async fn print_stream(
    a: &WatchArgs,
    mut stream: ResponseStream,
    node: Option<&NodeInfo>,
) -> ExitCode {
    // Flushed after each response received (up to a packed response's
    // flows), so a follower sees records as they come in a write each.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if a.format == WatchFormat::Table {
        let _ = writeln!(
            out,
            "{:<24} {:<3} {:<3} {:>45}    {:<45} {:>7} {:>10} {:<20} USER",
            "END", "NET", "DIR", "SOURCE", "DESTINATION", "PKTS", "BYTES", "PROCESS"
        );
        let _ = out.flush();
    }
    let mut json = Vec::new();
    while let Some(item) = stream.next().await {
        let resp = match item {
            Ok(r) => r,
            Err((msg, code)) => {
                eprintln!("sockscope: {msg}");
                return code;
            }
        };
        for resp in client::unpack(resp) {
            if a.format == WatchFormat::Json {
                // Written from a reused buffer: the common case of a
                // subscriber that only forwards the stream.
                watch_json::response_line(&resp, &mut json);
                json.push(b'\n');
                if out.write_all(&json).is_err() {
                    return ExitCode::Ok;
                }
                continue;
            }
            let Some(line) = watch_line(a.format, &resp, node) else {
                continue;
            };
            if writeln!(out, "{line}").is_err() {
                return ExitCode::Ok;
            }
        }
        if out.flush().is_err() {
            return ExitCode::Ok;
        }
    }
    ExitCode::Ok
}

/// The output line of one (unpacked) response in `format`; loss notices go
/// to standard error instead.
fn watch_line(
    format: WatchFormat,
    resp: &proto::StreamFlowsResponse,
    node: Option<&NodeInfo>,
) -> Option<String> {
    let line = match (format, &resp.event) {
        (WatchFormat::Json, _) => {
            let mut line = Vec::new();
            watch_json::response_line(resp, &mut line);
            // The writer only writes UTF-8 (strings come from `String`s).
            String::from_utf8(line).unwrap_or_default()
        }
        (_, Some(proto::stream_flows_response::Event::Loss(l))) => {
            eprintln!("sockscope: {}", loss_line(l));
            return None;
        }
        (WatchFormat::Ecs, Some(proto::stream_flows_response::Event::Flow(f))) => {
            match convert::flow_from_proto(f) {
                Ok((rec, host)) => {
                    let name = if host.is_empty() {
                        resp.node_name.clone()
                    } else {
                        host
                    };
                    let host = match node {
                        Some(n) => HostInfo::of_node(&name, n),
                        None => HostInfo {
                            name,
                            ..HostInfo::default()
                        },
                    };
                    ecs::flow_document(&rec, &host).to_string()
                }
                Err(e) => {
                    eprintln!("sockscope: skipping record: {e}");
                    return None;
                }
            }
        }
        (WatchFormat::Table, Some(proto::stream_flows_response::Event::Flow(f))) => table_line(f),
        (_, None) => return None,
    };
    Some(line)
}

async fn status(cfg: &Config, a: StatusArgs) -> ExitCode {
    let addr = server_addr(cfg, a.server.as_deref());
    let ch = match client::connect(&addr).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::Unavailable;
        }
    };
    let mut c = client::flow_client(ch);
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
