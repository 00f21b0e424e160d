//! Process exit codes: the one vocabulary `main`, the command line and the
//! daemon share.
//!
//! Every code is a fixed number that scripts, the systemd unit and the tests
//! rely on; a variant's discriminant never changes. 0–9 are the general
//! failure classes, 10–24 name one preflight or probe-installation cause
//! each (the README's Troubleshooting table lists them with their fixes).
//!
//! This module sits below every stage and imports nothing of the crate: the
//! conversions from each stage's error type live beside that type.

/// Exit code of the `sockscope` process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Unclassified runtime failure (also: a stream closed by the server with
    /// an error, e.g. RESOURCE_EXHAUSTED).
    Failure = 1,
    /// Usage or configuration error (unknown key, bad value, bad flag).
    Usage = 2,
    /// Server unreachable, or a feature not available in this build.
    Unavailable = 3,
    /// Insufficient privileges outside preflight (the DNS capture socket
    /// needs CAP_NET_RAW).
    NoPermission = 4,
    /// The kernel lacks a facility needed after preflight (perf events, a
    /// usable event format, the clocks).
    KernelUnsupported = 6,
    /// The gRPC server or the metrics endpoint could not listen (bind, TLS,
    /// socket path).
    Listen = 9,
    /// No tracefs found and mounting one failed.
    TracefsNotFound = 10,
    /// `socket.tracefs_path` does not point at a tracefs.
    TracefsPathInvalid = 11,
    /// The kernel has no kprobe events (`kprobe_events` missing).
    KprobesUnsupported = 12,
    /// kprobes are globally disabled.
    KprobesDisabled = 13,
    /// `kprobe_events` cannot be opened for writing.
    KprobeEventsNotWritable = 14,
    /// A required capability is missing from the effective set.
    MissingCapability = 15,
    /// BTF could not be read or parsed.
    Btf = 16,
    /// A probed struct member is not in BTF.
    BtfMember = 17,
    /// None of a probe's alternative kernel functions can be probed.
    NoFunction = 18,
    /// IPv6 monitoring was requested but IPv6 is off on the loopback device.
    Ipv6Disabled = 19,
    /// The kernel rejected a probe definition.
    ProbeRejected = 20,
    /// A probe could not be removed.
    ProbeRemove = 21,
    /// A tracefs file operation failed unexpectedly.
    TracefsIo = 22,
    /// A tracefs file had unexpected content.
    TracefsParse = 23,
    /// Struct offsets could not be guessed.
    Guess = 24,
}

impl ExitCode {
    /// Every exit code, in ascending order of number.
    pub const ALL: [ExitCode; 22] = [
        ExitCode::Ok,
        ExitCode::Failure,
        ExitCode::Usage,
        ExitCode::Unavailable,
        ExitCode::NoPermission,
        ExitCode::KernelUnsupported,
        ExitCode::Listen,
        ExitCode::TracefsNotFound,
        ExitCode::TracefsPathInvalid,
        ExitCode::KprobesUnsupported,
        ExitCode::KprobesDisabled,
        ExitCode::KprobeEventsNotWritable,
        ExitCode::MissingCapability,
        ExitCode::Btf,
        ExitCode::BtfMember,
        ExitCode::NoFunction,
        ExitCode::Ipv6Disabled,
        ExitCode::ProbeRejected,
        ExitCode::ProbeRemove,
        ExitCode::TracefsIo,
        ExitCode::TracefsParse,
        ExitCode::Guess,
    ];

    /// The number the process exits with.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The exit code numbered `code`, if there is one.
    pub fn from_code(code: i32) -> Option<ExitCode> {
        ExitCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl From<ExitCode> for i32 {
    fn from(c: ExitCode) -> i32 {
        c.code()
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> std::process::ExitCode {
        std::process::ExitCode::from(c as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_fixed() {
        let numbers: Vec<i32> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        let mut expected = vec![0, 1, 2, 3, 4, 6, 9];
        expected.extend(10..=24);
        assert_eq!(numbers, expected);
    }

    #[test]
    fn from_code_inverts_code() {
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_code(c.code()), Some(c));
        }
        for unused in [-1, 5, 7, 8, 25, 255] {
            assert_eq!(ExitCode::from_code(unused), None);
        }
    }
}
