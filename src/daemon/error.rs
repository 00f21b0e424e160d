//! Why the daemon stopped or could not start, and the exit code of each
//! cause.

use crate::decode::SetupError;
use crate::enrich::dns::DnsError;
use crate::enrich::process::ProcError;
use crate::exit::ExitCode;
use crate::export::{jsonl, metrics, nats, server};
use crate::probe::ProbeError;
use crate::ring::{self, recording::RecordError};
use crate::sys::{self, packet::PacketError};

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Preflight or probe installation failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The perf rings could not be opened or read.
    #[error("perf rings: {0}")]
    Ring(#[from] ring::RingError),
    /// An installed event's format did not match what the decoder expects.
    #[error("decoder setup: {0}")]
    Decoder(#[from] SetupError),
    /// The clocks could not be read.
    #[error("clock: {0}")]
    Clock(#[from] sys::SysError),
    /// The process table could not be built from the proc filesystem.
    #[error("process table: {0}")]
    Process(#[from] ProcError),
    /// The sample recording could not be created.
    #[error("recording: {0}")]
    Record(#[from] RecordError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] server::ServerError),
    /// The metrics endpoint could not be set up.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The JSON lines output could not be set up.
    #[error("export.jsonl: {0}")]
    Jsonl(#[from] jsonl::JsonlError),
    /// The NATS sink could not be set up (its message names the key).
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    /// The OTLP sink could not start.
    #[error(transparent)]
    Otlp(#[from] crate::export::otlp::OtlpError),
    /// The DNS capture could not be opened or started.
    #[error("DNS enrichment (socket.dns.enabled=true): {0}; run with CAP_NET_RAW or set socket.dns.enabled=false")]
    Dns(#[from] DnsError),
    /// A pipeline thread stopped on its own (failed or panicked).
    #[error("pipeline stopped: {0}")]
    Pipeline(String),
    /// A fault-injection variable is malformed.
    #[error("{var}: {what}")]
    Fault {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// A replayed recording has an event that is not one of our probes.
    #[error("{path}: event {event} is not one of the daemon's probes")]
    ReplayEvent {
        /// The recording.
        path: std::path::PathBuf,
        /// The recorded event name.
        event: String,
    },
    /// `kubernetes.enabled=required` but no runtime socket is configured
    /// or found.
    #[error("kubernetes.enabled=required, but no container runtime socket is configured (kubernetes.runtime_endpoint) or found at {searched}")]
    NoRuntime {
        /// The default sockets looked for.
        searched: String,
    },
    /// A thread or the runtime could not be started.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being started.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl From<&DaemonError> for ExitCode {
    fn from(e: &DaemonError) -> ExitCode {
        match e {
            DaemonError::Probe(e) => ExitCode::from(e),
            DaemonError::Ring(_) | DaemonError::Decoder(_) | DaemonError::Clock(_) => {
                ExitCode::KernelUnsupported
            }
            DaemonError::Server(_) | DaemonError::Metrics(_) => ExitCode::Listen,
            DaemonError::Dns(e) => ExitCode::from(e),
            DaemonError::Fault { .. } => ExitCode::Usage,
            DaemonError::NoRuntime { .. } => ExitCode::Unavailable,
            DaemonError::Nats(e) if e.exit_is_config() => ExitCode::Usage,
            DaemonError::Nats(_) => ExitCode::Failure,
            DaemonError::Otlp(e) if e.exit_is_config() => ExitCode::Usage,
            DaemonError::Otlp(_) => ExitCode::Failure,
            DaemonError::Jsonl(
                jsonl::JsonlError::FilterSyntax { .. } | jsonl::JsonlError::Filter(_),
            ) => ExitCode::Usage,
            DaemonError::Jsonl(_)
            | DaemonError::Process(_)
            | DaemonError::Record(_)
            | DaemonError::ReplayEvent { .. }
            | DaemonError::Pipeline(_)
            | DaemonError::Runtime { .. } => ExitCode::Failure,
        }
    }
}

/// Exit code of a DNS capture failure: missing privileges, bad
/// configuration, or anything else.
impl From<&DnsError> for ExitCode {
    fn from(e: &DnsError) -> ExitCode {
        match e {
            DnsError::UnsupportedType { .. } | DnsError::Snaplen { .. } => ExitCode::Usage,
            DnsError::Socket { source, .. } => match source {
                PacketError::Interface { .. } | PacketError::InterfaceName { .. } => {
                    ExitCode::Usage
                }
                PacketError::Syscall { source, .. }
                    if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
                {
                    ExitCode::NoPermission
                }
                _ => ExitCode::Failure,
            },
            DnsError::Thread(_) => ExitCode::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn code(e: &DaemonError) -> ExitCode {
        ExitCode::from(e)
    }

    fn socket_error(source: PacketError) -> DaemonError {
        DaemonError::Dns(DnsError::Socket {
            interface: "any".into(),
            source,
        })
    }

    #[test]
    fn dns_capture_failures_map_to_documented_exit_codes() {
        let eperm = socket_error(PacketError::Syscall {
            call: "socket",
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(code(&eperm), ExitCode::NoPermission);
        let msg = eperm.to_string();
        assert!(
            msg.contains("socket.dns.enabled=false") && msg.contains("socket"),
            "{msg}"
        );
        let unknown_if = socket_error(PacketError::Interface {
            name: "nope0".into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        });
        assert_eq!(code(&unknown_if), ExitCode::Usage);
        let other = socket_error(PacketError::Syscall {
            call: "bind",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        });
        assert_eq!(code(&other), ExitCode::Failure);
        let kind = DaemonError::Dns(DnsError::UnsupportedType {
            kind: "pcap".into(),
        });
        assert_eq!(code(&kind), ExitCode::Usage);
    }

    #[test]
    fn pipeline_failure_classes_map_to_their_codes() {
        assert_eq!(
            code(&DaemonError::Ring(ring::RingError::NoEvents)),
            ExitCode::KernelUnsupported
        );
        assert_eq!(
            code(&DaemonError::Server(server::ServerError::TlsConfig(
                "key without certificate"
            ))),
            ExitCode::Listen
        );
        assert_eq!(
            code(&DaemonError::Pipeline("engine panicked".into())),
            ExitCode::Failure
        );
        let runtime = DaemonError::Runtime {
            what: "starting the reader thread",
            source: std::io::Error::other("no threads"),
        };
        assert_eq!(code(&runtime), ExitCode::Failure);
    }

    /// One error of each probe variant, with the number the README's
    /// Troubleshooting table gives it.
    fn probe_errors() -> Vec<(ProbeError, i32)> {
        let path = || PathBuf::from("/sys/kernel/tracing/kprobe_events");
        let io = || std::io::Error::from_raw_os_error(libc::EINVAL);
        vec![
            (
                ProbeError::TracefsNotFound {
                    tried: vec![path()],
                    mount_point: path(),
                    source: nix::Error::EPERM,
                },
                10,
            ),
            (ProbeError::TracefsPathInvalid { path: path() }, 11),
            (ProbeError::KprobesUnsupported { path: path() }, 12),
            (ProbeError::KprobesDisabled { path: path() }, 13),
            (
                ProbeError::KprobeEventsNotWritable {
                    path: path(),
                    source: io(),
                },
                14,
            ),
            (
                ProbeError::MissingCapability {
                    cap: "CAP_SYS_ADMIN",
                    why: "for tracefs",
                },
                15,
            ),
            (
                ProbeError::Btf {
                    path: path(),
                    reason: "truncated".into(),
                },
                16,
            ),
            (
                ProbeError::BtfMember {
                    path: path(),
                    strukt: "sock".into(),
                    member: "sk_num".into(),
                },
                17,
            ),
            (
                ProbeError::NoFunction {
                    probe: "ip_out",
                    alternatives: vec!["ip_output"],
                    path: path(),
                },
                18,
            ),
            (ProbeError::Ipv6Disabled { path: path() }, 19),
            (
                ProbeError::Install {
                    line: "p:x y".into(),
                    path: path(),
                    source: io(),
                    log: String::new(),
                },
                20,
            ),
            (
                ProbeError::Remove {
                    name: "sockscope_1/x".into(),
                    path: path(),
                    source: io(),
                    hint: "",
                },
                21,
            ),
            (ProbeError::io("reading", path(), io()), 22),
            (
                ProbeError::Parse {
                    path: path(),
                    what: "no id".into(),
                },
                23,
            ),
            (
                ProbeError::Guess {
                    guess: "sk_num".into(),
                    reason: "timeout".into(),
                },
                24,
            ),
        ]
    }

    #[test]
    fn probe_failures_keep_their_preflight_numbers() {
        let errors = probe_errors();
        assert_eq!(errors.len(), 15);
        for (e, number) in errors {
            assert_eq!(e.exit_code(), number, "{e}");
            assert_eq!(code(&DaemonError::Probe(e)).code(), number);
        }
    }
}
