//! Errors of the probe stage, each with its own process exit code.

use std::path::PathBuf;

use crate::exit::ExitCode;

/// Everything that can go wrong while finding tracefs, checking the kernel,
/// reading offsets or installing probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No tracefs found and mounting one failed.
    #[error("tracefs not found at {tried:?} and mounting it at {mount_point} failed: {source}; mount it (mount -t tracefs nodev /sys/kernel/tracing) or set socket.tracefs_path")]
    TracefsNotFound {
        /// The directories that were tried.
        tried: Vec<PathBuf>,
        /// Where mounting was attempted.
        mount_point: PathBuf,
        /// The mount error.
        source: nix::Error,
    },
    /// `socket.tracefs_path` does not point at a tracefs.
    #[error("socket.tracefs_path {path} is not a tracefs mount (no available_events in it)")]
    TracefsPathInvalid {
        /// The configured path.
        path: PathBuf,
    },
    /// The kernel has no kprobe events.
    #[error("kernel built without CONFIG_KPROBES/CONFIG_KPROBE_EVENTS: {path} missing; use a kernel with kprobe events enabled")]
    KprobesUnsupported {
        /// The missing `kprobe_events` file.
        path: PathBuf,
    },
    /// kprobes are globally disabled.
    #[error("kprobes are disabled: {path} is not 1; run `echo 1 > {path}`")]
    KprobesDisabled {
        /// The `kprobes/enabled` file.
        path: PathBuf,
    },
    /// `kprobe_events` cannot be opened for writing.
    #[error(
        "{path} is not writable: {source}; run as root with CAP_SYS_ADMIN and a read-write tracefs"
    )]
    KprobeEventsNotWritable {
        /// The `kprobe_events` file.
        path: PathBuf,
        /// The open error.
        source: std::io::Error,
    },
    /// A required capability is missing from the effective set.
    #[error("missing capability {cap} (needed {why}); run as root or grant it (setcap/ambient capabilities)")]
    MissingCapability {
        /// Capability name.
        cap: &'static str,
        /// What it is needed for.
        why: &'static str,
    },
    /// BTF could not be read or parsed.
    #[error("cannot read BTF from {path}: {reason}; a kernel with CONFIG_DEBUG_INFO_BTF=y is required for socket.offsets=btf")]
    Btf {
        /// The BTF file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Socket-counter accounting needs the TCP socket's counters, which
    /// only BTF gives.
    #[error("socket.accounting=socket_counters needs the offsets of struct tcp_sock's counters, which only BTF gives, but {why} (probe {probe}); use socket.accounting=packets or a kernel with CONFIG_DEBUG_INFO_BTF=y")]
    CountersUnavailable {
        /// The probe that needs them.
        probe: &'static str,
        /// Where the offsets came from instead.
        why: String,
    },
    /// A struct member is not in BTF.
    #[error("BTF of {path} has no member {member} in struct {strukt}")]
    BtfMember {
        /// The BTF file.
        path: PathBuf,
        /// Struct name.
        strukt: String,
        /// Member path.
        member: String,
    },
    /// None of a probe's alternative kernel functions can be probed.
    #[error("none of the kernel functions {alternatives:?} is in {path}; this kernel is not supported for probe {probe}")]
    NoFunction {
        /// The probe.
        probe: &'static str,
        /// The names tried, in order.
        alternatives: Vec<&'static str>,
        /// `available_filter_functions`.
        path: PathBuf,
    },
    /// IPv6 monitoring was requested but IPv6 is off on the loopback device.
    #[error("socket.enable_ipv6 is true but IPv6 is disabled on lo ({path}); enable it (sysctl net.ipv6.conf.lo.disable_ipv6=0) or set socket.enable_ipv6: false")]
    Ipv6Disabled {
        /// The sysctl file.
        path: PathBuf,
    },
    /// The kernel rejected a probe definition.
    #[error("kernel rejected probe definition {line:?} written to {path}: {source}; tracefs error_log says: {log}")]
    Install {
        /// The definition line.
        line: String,
        /// `kprobe_events`.
        path: PathBuf,
        /// The write error.
        source: std::io::Error,
        /// Last lines of `error_log`, when available.
        log: String,
    },
    /// A probe could not be removed.
    #[error("cannot remove probe {name} via {path}: {source}{hint}")]
    Remove {
        /// `GROUP/NAME`.
        name: String,
        /// `kprobe_events`.
        path: PathBuf,
        /// The write error.
        source: std::io::Error,
        /// Extra advice (EBUSY: perf events still open).
        hint: &'static str,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Struct offsets could not be guessed.
    #[error("offset guess {guess} failed: {reason}; run `sockscope check` for every guess, or use a kernel with BTF (socket.offsets=btf)")]
    Guess {
        /// The guess that failed.
        guess: String,
        /// Why.
        reason: String,
    },
    /// A file had unexpected content.
    #[error("unexpected content in {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

impl ProbeError {
    /// Process exit code for this error, distinct per variant (the number
    /// of its [`ExitCode`]).
    pub fn exit_code(&self) -> i32 {
        ExitCode::from(self).code()
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProbeError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<&ProbeError> for ExitCode {
    fn from(e: &ProbeError) -> ExitCode {
        match e {
            ProbeError::TracefsNotFound { .. } => ExitCode::TracefsNotFound,
            ProbeError::TracefsPathInvalid { .. } => ExitCode::TracefsPathInvalid,
            ProbeError::KprobesUnsupported { .. } => ExitCode::KprobesUnsupported,
            ProbeError::KprobesDisabled { .. } => ExitCode::KprobesDisabled,
            ProbeError::KprobeEventsNotWritable { .. } => ExitCode::KprobeEventsNotWritable,
            ProbeError::MissingCapability { .. } => ExitCode::MissingCapability,
            ProbeError::Btf { .. } | ProbeError::CountersUnavailable { .. } => ExitCode::Btf,
            ProbeError::BtfMember { .. } => ExitCode::BtfMember,
            ProbeError::NoFunction { .. } => ExitCode::NoFunction,
            ProbeError::Ipv6Disabled { .. } => ExitCode::Ipv6Disabled,
            ProbeError::Install { .. } => ExitCode::ProbeRejected,
            ProbeError::Remove { .. } => ExitCode::ProbeRemove,
            ProbeError::Io { .. } => ExitCode::TracefsIo,
            ProbeError::Parse { .. } => ExitCode::TracefsParse,
            ProbeError::Guess { .. } => ExitCode::Guess,
        }
    }
}
