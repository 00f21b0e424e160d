//! Daemon configuration: the seed's `socket.*` options under their names and
//! defaults, plus sockscope's own `server.*`, `limits.*` and `log.*`.
//!
//! Loading (YAML file, `SOCKSCOPE_…` environment, `-E key=value`) lives in
//! [`load`]; this part is the typed schema with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod kubernetes;
mod nats;
mod otlp;
pub use kubernetes::*;
pub use nats::*;
pub use otlp::*;

/// Default `socket.flow_inactive_timeout`.
pub const DEFAULT_FLOW_INACTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `socket.flow_termination_timeout`.
pub const DEFAULT_FLOW_TERMINATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `socket.socket_inactive_timeout`.
pub const DEFAULT_SOCKET_INACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `socket.perf_queue_size`.
pub const DEFAULT_PERF_QUEUE_SIZE: usize = 4096;
/// Default `socket.lost_queue_size`.
pub const DEFAULT_LOST_QUEUE_SIZE: usize = 128;
/// Default `socket.ring_size_exponent` (2^7 pages = 512 KiB per CPU).
pub const DEFAULT_RING_SIZE_EXPONENT: u32 = 7;
/// Largest accepted `socket.ring_size_exponent`.
pub const MAX_RING_SIZE_EXPONENT: u32 = 16;
/// Default `socket.clock_max_drift`.
pub const DEFAULT_CLOCK_MAX_DRIFT: Duration = Duration::from_millis(100);
/// Default `socket.clock_sync_period`.
pub const DEFAULT_CLOCK_SYNC_PERIOD: Duration = Duration::from_secs(10);
/// Default `socket.guess_timeout`.
pub const DEFAULT_GUESS_TIMEOUT: Duration = Duration::from_secs(15);
/// Default `socket.flow_update_interval` (interim records of long flows).
pub const DEFAULT_FLOW_UPDATE_INTERVAL: Duration = Duration::from_secs(10);
/// Default `socket.dns.af_packet.snaplen`.
pub const DEFAULT_DNS_SNAPLEN: u32 = 1024;
/// Default `limits.max_sockets`.
pub const DEFAULT_MAX_SOCKETS: usize = 262_144;
/// Default `limits.max_flows`.
pub const DEFAULT_MAX_FLOWS: usize = 262_144;
/// Default `limits.max_processes`.
pub const DEFAULT_MAX_PROCESSES: usize = 65_536;
/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default `server.unix_socket`.
pub const DEFAULT_UNIX_SOCKET: &str = "/run/sockscope/sockscope.sock";
/// Default `server.unix_socket_mode`.
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o660;
/// Default `server.history_size` (finished flows kept for replay).
pub const DEFAULT_HISTORY_SIZE: usize = 16_384;
/// Default `server.subscriber_queue_size`.
pub const DEFAULT_SUBSCRIBER_QUEUE_SIZE: usize = 4096;
/// Default `export.jsonl.max_size` in bytes (0 disables rotation).
pub const DEFAULT_JSONL_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// Default `export.jsonl.max_files` (the active file plus rotated ones).
pub const DEFAULT_JSONL_MAX_FILES: usize = 7;
/// Largest accepted `export.jsonl.max_files`.
pub const MAX_JSONL_MAX_FILES: usize = 1024;

/// Where struct offsets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OffsetsMode {
    /// BTF when `/sys/kernel/btf/vmlinux` is readable, guessing otherwise.
    #[default]
    Auto,
    /// BTF only; fail without it.
    Btf,
    /// Always guess.
    Guess,
}

/// How TCP flows are counted (`socket.accounting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccountingMode {
    /// Every packet at the IP layer: IP bytes and packets, exact against a
    /// capture.
    #[default]
    Packets,
    /// TCP from the kernel's own socket counters, read when the connection
    /// ends: payload bytes and segments, a handful of samples per
    /// connection. Needs BTF.
    SocketCounters,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kernel-side options (the seed's `socket.*`).
    pub socket: SocketConfig,
    /// gRPC server options.
    pub server: ServerConfig,
    /// Table bounds.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// Additional flow outputs.
    pub export: ExportConfig,
    /// Pod identity from the container runtime.
    pub kubernetes: KubernetesConfig,
}

/// `metrics.*`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` of the plaintext HTTP endpoint serving `/metrics`;
    /// empty disables it.
    pub listen: String,
}

/// `export.*`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// JSON lines output of ECS flow documents.
    pub jsonl: JsonlConfig,
    /// NATS JetStream sink.
    pub nats: NatsConfig,
    /// OTLP logs sink.
    pub otlp: OtlpConfig,
}

/// `export.jsonl.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonlConfig {
    /// File to append to, or `-` for standard output; empty disables it.
    pub path: String,
    /// Rotate when the file would grow beyond this many bytes; 0 never
    /// rotates. Ignored for standard output.
    pub max_size: u64,
    /// Files kept: the active one plus `max_files - 1` rotated ones
    /// (`path.1` is the newest).
    pub max_files: usize,
    /// Write interim records of long flows too.
    pub include_updates: bool,
    /// Allow filters, as `sockscope.v1.FlowFilter` objects (field names as
    /// in the proto, e.g. `{destination_port: [53], transport: [TRANSPORT_UDP]}`);
    /// a flow is written when it matches any of them (or the list is empty).
    pub filters: Vec<serde_json::Value>,
    /// Deny filters: a flow matching any of them is not written.
    pub deny: Vec<serde_json::Value>,
}

impl Default for JsonlConfig {
    fn default() -> Self {
        JsonlConfig {
            path: String::new(),
            max_size: DEFAULT_JSONL_MAX_SIZE,
            max_files: DEFAULT_JSONL_MAX_FILES,
            include_updates: false,
            filters: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// `socket.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Mount point of tracefs (or `tracing` inside debugfs).
    pub tracefs_path: Option<PathBuf>,
    /// Monitor IPv6; unset means detect.
    pub enable_ipv6: Option<bool>,
    /// Inactivity after which a flow is final.
    #[serde(deserialize_with = "duration")]
    pub flow_inactive_timeout: Duration,
    /// Wait after close for late packets.
    #[serde(deserialize_with = "duration")]
    pub flow_termination_timeout: Duration,
    /// Inactivity after which a socket is forgotten.
    #[serde(deserialize_with = "duration")]
    pub socket_inactive_timeout: Duration,
    /// Interval of interim records for long flows.
    #[serde(deserialize_with = "duration")]
    pub flow_update_interval: Duration,
    /// Samples queued between the ring reader and the flow engine.
    pub perf_queue_size: usize,
    /// Loss notifications queued between the ring reader and the flow engine.
    pub lost_queue_size: usize,
    /// Per-CPU ring size is 2^this pages.
    pub ring_size_exponent: u32,
    /// Largest tolerated drift between kernel and wall clock.
    #[serde(deserialize_with = "duration")]
    pub clock_max_drift: Duration,
    /// How often the clock offset is re-measured.
    #[serde(deserialize_with = "duration")]
    pub clock_sync_period: Duration,
    /// Upper bound of one offset guess.
    #[serde(deserialize_with = "duration")]
    pub guess_timeout: Duration,
    /// Where struct offsets come from.
    pub offsets: OffsetsMode,
    /// Report the daemon's own traffic too.
    pub include_self: bool,
    /// How TCP flows are counted.
    pub accounting: AccountingMode,
    /// Root of the proc filesystem to read processes from.
    pub proc_root: PathBuf,
    /// Root of the host filesystem whose `etc/passwd` and `etc/group` name
    /// users and groups; unset: the parent of `proc_root` when that is named
    /// `proc` (`/proc` → `/`, `/host/proc` → `/host`), else `/`.
    pub host_root: Option<PathBuf>,
    /// Debug: record raw samples with their formats to this file.
    pub record_path: Option<PathBuf>,
    /// DNS enrichment.
    pub dns: DnsConfig,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            tracefs_path: None,
            enable_ipv6: None,
            flow_inactive_timeout: DEFAULT_FLOW_INACTIVE_TIMEOUT,
            flow_termination_timeout: DEFAULT_FLOW_TERMINATION_TIMEOUT,
            socket_inactive_timeout: DEFAULT_SOCKET_INACTIVE_TIMEOUT,
            flow_update_interval: DEFAULT_FLOW_UPDATE_INTERVAL,
            perf_queue_size: DEFAULT_PERF_QUEUE_SIZE,
            lost_queue_size: DEFAULT_LOST_QUEUE_SIZE,
            ring_size_exponent: DEFAULT_RING_SIZE_EXPONENT,
            clock_max_drift: DEFAULT_CLOCK_MAX_DRIFT,
            clock_sync_period: DEFAULT_CLOCK_SYNC_PERIOD,
            guess_timeout: DEFAULT_GUESS_TIMEOUT,
            offsets: OffsetsMode::Auto,
            include_self: false,
            accounting: AccountingMode::Packets,
            proc_root: PathBuf::from("/proc"),
            host_root: None,
            record_path: None,
            dns: DnsConfig::default(),
        }
    }
}

/// `socket.dns.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Enrich flows with DNS names.
    pub enabled: bool,
    /// Capture method; only `af_packet`.
    #[serde(rename = "type")]
    pub kind: String,
    /// AF_PACKET options.
    pub af_packet: AfPacketConfig,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            kind: "af_packet".to_string(),
            af_packet: AfPacketConfig::default(),
        }
    }
}

/// `socket.dns.af_packet.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AfPacketConfig {
    /// Interface to capture on, or `any`.
    pub interface: String,
    /// Bytes captured per packet.
    pub snaplen: u32,
}

impl Default for AfPacketConfig {
    fn default() -> Self {
        AfPacketConfig {
            interface: "any".to_string(),
            snaplen: DEFAULT_DNS_SNAPLEN,
        }
    }
}

/// `server.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TCP listen address; empty disables TCP.
    pub listen: String,
    /// Unix socket path; empty disables it.
    pub unix_socket: String,
    /// Mode of the Unix socket file.
    pub unix_socket_mode: u32,
    /// Allow plaintext on a non-loopback address.
    pub insecure_listen: bool,
    /// TLS server certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS server key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates (enables mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Finished flows kept for replay.
    pub history_size: usize,
    /// Per-subscriber queue bound.
    pub subscriber_queue_size: usize,
    /// Node name reported in every response; defaults to the host name.
    pub node_name: Option<String>,
    /// Plaintext TCP address serving only `grpc.health.v1` (for probes that
    /// cannot do TLS); empty disables it.
    pub health_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.to_string(),
            unix_socket: DEFAULT_UNIX_SOCKET.to_string(),
            unix_socket_mode: DEFAULT_UNIX_SOCKET_MODE,
            insecure_listen: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            history_size: DEFAULT_HISTORY_SIZE,
            subscriber_queue_size: DEFAULT_SUBSCRIBER_QUEUE_SIZE,
            node_name: None,
            health_listen: String::new(),
        }
    }
}

/// `limits.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Tracked sockets.
    pub max_sockets: usize,
    /// Tracked flows.
    pub max_flows: usize,
    /// Tracked processes.
    pub max_processes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_flows: DEFAULT_MAX_FLOWS,
            max_processes: DEFAULT_MAX_PROCESSES,
        }
    }
}

/// `log.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in `tracing_subscriber::EnvFilter` syntax.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: "text".to_string(),
        }
    }
}

/// Parses `30s`, `1m`, `100ms` (humantime syntax) or a bare number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        // Environment variables and -E overrides arrive as text.
        Raw::Text(t) if t.trim().parse::<u64>().is_ok() => {
            Ok(Duration::from_secs(t.trim().parse().unwrap_or_default()))
        }
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {t:?}: {e} (use e.g. 30s, 1m, 100ms)"
            ))
        }),
    }
}

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "SOCKSCOPE";
/// Separator of nesting levels in environment variable names:
/// `SOCKSCOPE_SOCKET__FLOW_INACTIVE_TIMEOUT=10s` sets
/// `socket.flow_inactive_timeout`.
pub const ENV_SEPARATOR: &str = "__";
/// Smallest accepted `socket.dns.af_packet.snaplen` (room for the headers
/// and a DNS header).
pub const MIN_DNS_SNAPLEN: u32 = 64;
/// Largest accepted `socket.dns.af_packet.snaplen`.
pub const MAX_DNS_SNAPLEN: u32 = 65_535;
/// Largest accepted queue, history and table sizes.
pub const MAX_QUEUE_SIZE: usize = 1 << 24;
/// Largest accepted Unix socket mode.
pub const MAX_UNIX_SOCKET_MODE: u32 = 0o777;

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading or parsing a source failed.
    #[error("configuration: {0}")]
    Source(#[from] ::config::ConfigError),
    /// A `-E` argument is not `key=value`.
    #[error("-E {0:?}: expected key=value")]
    Override(String),
    /// A key is unknown or has a bad value.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key path (e.g. `socket.ring_size_exponent`).
        key: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Whether an environment variable is a configuration key: the prefix,
/// then `<SECTION>__<KEY>`. Other `SOCKSCOPE_…` variables without the
/// nesting separator (e.g. `SOCKSCOPE_KERNELS` of the test bed) are not
/// configuration and are left alone.
fn is_config_var(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
}

/// Loads the configuration: defaults < YAML file < `SOCKSCOPE_…`
/// environment < `-E key=value` overrides, then validates it.
pub fn load(path: Option<&std::path::Path>, overrides: &[String]) -> Result<Config, ConfigError> {
    load_from(path, std::env::vars(), overrides)
}

/// Like [`load`] with an explicit environment (for tests and embedding).
pub fn load_from(
    path: Option<&std::path::Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[String],
) -> Result<Config, ConfigError> {
    let mut b = ::config::Config::builder();
    if let Some(p) = path {
        b = b.add_source(
            ::config::File::from(p.to_path_buf())
                .format(::config::FileFormat::Yaml)
                .required(true),
        );
    }
    let prefix = format!("{ENV_PREFIX}_");
    let env: ::config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| is_config_var(k, &prefix))
        .collect();
    b = b.add_source(
        ::config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .source(Some(env)),
    );
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError::Override(o.clone()))?;
        b = b.set_override(k.trim(), v.to_string())?;
    }
    let merged = b.build()?;
    let cfg: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." || key.is_empty() {
            "(root)".to_string()
        } else {
            key
        };
        invalid(&key, e.inner().to_string())
    })?;
    cfg.validate()?;
    Ok(cfg)
}

impl Config {
    /// Checks ranges and combinations the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.socket;
        for (key, d) in [
            ("socket.flow_inactive_timeout", s.flow_inactive_timeout),
            (
                "socket.flow_termination_timeout",
                s.flow_termination_timeout,
            ),
            ("socket.socket_inactive_timeout", s.socket_inactive_timeout),
            ("socket.flow_update_interval", s.flow_update_interval),
            ("socket.clock_max_drift", s.clock_max_drift),
            ("socket.clock_sync_period", s.clock_sync_period),
            ("socket.guess_timeout", s.guess_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        let v = &self.server;
        for (key, n) in [
            ("socket.perf_queue_size", s.perf_queue_size),
            ("socket.lost_queue_size", s.lost_queue_size),
            ("server.history_size", v.history_size),
            ("server.subscriber_queue_size", v.subscriber_queue_size),
            ("limits.max_sockets", self.limits.max_sockets),
            ("limits.max_flows", self.limits.max_flows),
            ("limits.max_processes", self.limits.max_processes),
        ] {
            if n == 0 || n > MAX_QUEUE_SIZE {
                return Err(invalid(key, format!("{n} out of range 1-{MAX_QUEUE_SIZE}")));
            }
        }
        if s.ring_size_exponent > MAX_RING_SIZE_EXPONENT {
            return Err(invalid(
                "socket.ring_size_exponent",
                format!(
                    "{} exceeds the maximum {MAX_RING_SIZE_EXPONENT}",
                    s.ring_size_exponent
                ),
            ));
        }
        let snaplen = s.dns.af_packet.snaplen;
        if !(MIN_DNS_SNAPLEN..=MAX_DNS_SNAPLEN).contains(&snaplen) {
            return Err(invalid(
                "socket.dns.af_packet.snaplen",
                format!("{snaplen} out of range {MIN_DNS_SNAPLEN}-{MAX_DNS_SNAPLEN}"),
            ));
        }
        if s.dns.kind != "af_packet" {
            return Err(invalid(
                "socket.dns.type",
                format!("{:?} unsupported (only af_packet)", s.dns.kind),
            ));
        }
        if s.dns.af_packet.interface.trim().is_empty() {
            return Err(invalid("socket.dns.af_packet.interface", "empty (use any)"));
        }
        if v.unix_socket_mode > MAX_UNIX_SOCKET_MODE {
            return Err(invalid(
                "server.unix_socket_mode",
                format!("{:#o} is not a file mode", v.unix_socket_mode),
            ));
        }
        if v.listen.trim().is_empty() && v.unix_socket.trim().is_empty() {
            return Err(invalid(
                "server.listen",
                "neither server.listen nor server.unix_socket is set",
            ));
        }
        if !v.listen.trim().is_empty() {
            let addr: std::net::SocketAddr = v
                .listen
                .trim()
                .parse()
                .map_err(|e| invalid("server.listen", format!("{:?}: {e}", v.listen)))?;
            let tls = v.tls_cert.is_some() && v.tls_key.is_some();
            if !addr.ip().is_loopback() && !tls && !v.insecure_listen {
                return Err(invalid(
                    "server.listen",
                    format!(
                        "plaintext on non-loopback address {addr} refused; set server.tls_cert and \
                         server.tls_key, or server.insecure_listen (--insecure-listen)"
                    ),
                ));
            }
        }
        if v.tls_cert.is_some() != v.tls_key.is_some() {
            return Err(invalid(
                "server.tls_key",
                "server.tls_cert and server.tls_key go together",
            ));
        }
        if v.tls_client_ca.is_some() && v.tls_cert.is_none() {
            return Err(invalid(
                "server.tls_client_ca",
                "requires server.tls_cert and server.tls_key",
            ));
        }
        for (key, addr) in [
            ("server.health_listen", &v.health_listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if !addr.trim().is_empty() {
                addr.trim()
                    .parse::<std::net::SocketAddr>()
                    .map_err(|e| invalid(key, format!("{addr:?}: {e}")))?;
            }
        }
        let j = &self.export.jsonl;
        if j.max_files == 0 || j.max_files > MAX_JSONL_MAX_FILES {
            return Err(invalid(
                "export.jsonl.max_files",
                format!("{} out of range 1-{MAX_JSONL_MAX_FILES}", j.max_files),
            ));
        }
        // Only the shape is checked here: the fields of a filter object are
        // those of `sockscope.v1.FlowFilter`, converted (and refused) by the
        // JSON lines output at start.
        for (name, list) in [("filters", &j.filters), ("deny", &j.deny)] {
            if let Some(i) = list.iter().position(|v| !v.is_object()) {
                return Err(invalid(
                    &format!("export.jsonl.{name}[{i}]"),
                    "expected a FlowFilter object",
                ));
            }
        }
        self.export.nats.validate()?;
        self.export.otlp.validate()?;
        self.kubernetes.validate()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid(
                "log.format",
                format!("{:?}: expected text or json", self.log.format),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("{:?}: {e}", self.log.level)))?;
        Ok(())
    }
}
