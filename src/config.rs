//! Daemon configuration: the seed's `socket.*` options under their names and
//! defaults, plus sockscope's own `server.*`, `limits.*` and `log.*`.
//!
//! Loading (YAML file, `SOCKSCOPE_…` environment, `-E key=value`) lives in
//! [`load`]; this part is the typed schema with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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
    /// Root of the proc filesystem to read processes from.
    pub proc_root: PathBuf,
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
            proc_root: PathBuf::from("/proc"),
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
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {t:?}: {e} (use e.g. 30s, 1m, 100ms)"
            ))
        }),
    }
}
