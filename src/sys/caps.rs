//! Effective capabilities of this process, read from `/proc/self/status`.

use std::fs;
use std::path::PathBuf;

use super::SysError;

/// Capability number of CAP_NET_ADMIN.
pub const CAP_NET_ADMIN: u32 = 12;
/// Capability number of CAP_SYS_ADMIN.
pub const CAP_SYS_ADMIN: u32 = 21;
/// Capability number of CAP_PERFMON (Linux 5.8+).
pub const CAP_PERFMON: u32 = 38;
/// Largest capability number representable in the `CapEff` mask.
const MAX_CAP: u32 = 63;

/// Parses the `CapEff:` line of a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The effective capability mask of this process (from `/proc/self/status`).
pub fn effective_capabilities() -> Result<u64, SysError> {
    let path = PathBuf::from("/proc/self/status");
    let text = fs::read_to_string(&path).map_err(|e| SysError::ProcFile {
        path: path.clone(),
        what: e.to_string(),
    })?;
    parse_cap_eff(&text).ok_or(SysError::ProcFile {
        path,
        what: "no parsable CapEff line".to_string(),
    })
}

/// Whether capability number `cap` is in the effective mask `mask`.
pub fn has_capability(mask: u64, cap: u32) -> bool {
    cap <= MAX_CAP && mask & (1u64 << cap) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_parsing() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let mask = parse_cap_eff(status).expect("CapEff present");
        assert!(has_capability(mask, CAP_SYS_ADMIN));
        assert!(has_capability(mask, CAP_PERFMON));
        assert!(!has_capability(mask, 41));
        assert!(!has_capability(mask, 64));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
