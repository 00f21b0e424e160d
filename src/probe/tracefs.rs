//! Finding (or mounting) tracefs and checking the kernel's kprobe support.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::SocketConfig;

use super::error::ProbeError;

/// Standard tracefs mount point.
pub const TRACEFS_DEFAULT: &str = "/sys/kernel/tracing";
/// Tracing directory inside debugfs (kernels before 4.1, or tracefs not mounted).
pub const TRACEFS_IN_DEBUGFS: &str = "/sys/kernel/debug/tracing";
/// debugfs mount point.
pub const DEBUGFS_DEFAULT: &str = "/sys/kernel/debug";
/// Global kprobes switch in debugfs.
pub const KPROBES_ENABLED: &str = "/sys/kernel/debug/kprobes/enabled";
/// Where IPv6 on loopback is switched off.
pub const LO_DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";
/// Kernel symbol table, fallback list of probe-able functions.
pub const KALLSYMS: &str = "/proc/kallsyms";
/// Capability number of CAP_SYS_ADMIN.
pub const CAP_SYS_ADMIN: u32 = 21;
/// Capability number of CAP_NET_ADMIN.
pub const CAP_NET_ADMIN: u32 = 12;

/// Unmounts a file system we mounted when dropped.
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.target.display(), error = %e, "cannot unmount");
        }
    }
}

/// A usable tracefs directory; unmounts it on drop when we mounted it.
#[derive(Debug)]
pub struct Tracefs {
    root: PathBuf,
    mounted: Option<MountGuard>,
}

fn is_tracefs(dir: &Path) -> bool {
    dir.join("available_events").exists()
}

impl Tracefs {
    /// Uses `socket.tracefs_path` when set; otherwise the first of
    /// [`TRACEFS_DEFAULT`], [`TRACEFS_IN_DEBUGFS`] that is mounted; otherwise
    /// mounts tracefs (or, failing that, debugfs) and unmounts it on drop.
    pub fn open(cfg: &SocketConfig) -> Result<Tracefs, ProbeError> {
        if let Some(path) = &cfg.tracefs_path {
            if is_tracefs(path) {
                return Ok(Tracefs::at(path.clone()));
            }
            return Err(ProbeError::TracefsPathInvalid { path: path.clone() });
        }
        let tried = vec![
            PathBuf::from(TRACEFS_DEFAULT),
            PathBuf::from(TRACEFS_IN_DEBUGFS),
        ];
        if let Some(p) = tried.iter().find(|p| is_tracefs(p)) {
            return Ok(Tracefs::at(p.clone()));
        }
        let flags = nix::mount::MsFlags::empty();
        let first = nix::mount::mount(
            Some("nodev"),
            TRACEFS_DEFAULT,
            Some("tracefs"),
            flags,
            None::<&str>,
        );
        match first {
            Ok(()) if is_tracefs(Path::new(TRACEFS_DEFAULT)) => {
                return Ok(Tracefs {
                    root: PathBuf::from(TRACEFS_DEFAULT),
                    mounted: Some(MountGuard {
                        target: PathBuf::from(TRACEFS_DEFAULT),
                    }),
                })
            }
            Ok(()) => drop(MountGuard {
                target: PathBuf::from(TRACEFS_DEFAULT),
            }),
            Err(_) => {}
        }
        match nix::mount::mount(
            Some("nodev"),
            DEBUGFS_DEFAULT,
            Some("debugfs"),
            flags,
            None::<&str>,
        ) {
            Ok(()) => {
                let guard = MountGuard {
                    target: PathBuf::from(DEBUGFS_DEFAULT),
                };
                if is_tracefs(Path::new(TRACEFS_IN_DEBUGFS)) {
                    Ok(Tracefs {
                        root: PathBuf::from(TRACEFS_IN_DEBUGFS),
                        mounted: Some(guard),
                    })
                } else {
                    Err(ProbeError::TracefsNotFound {
                        tried,
                        mount_point: PathBuf::from(TRACEFS_DEFAULT),
                        source: first.err().unwrap_or(nix::Error::ENOENT),
                    })
                }
            }
            Err(e) => Err(ProbeError::TracefsNotFound {
                tried,
                mount_point: PathBuf::from(TRACEFS_DEFAULT),
                source: first.err().unwrap_or(e),
            }),
        }
    }

    /// A tracefs at a known path, not mounted by us.
    pub fn at(root: PathBuf) -> Tracefs {
        Tracefs {
            root,
            mounted: None,
        }
    }

    /// The tracefs directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when this instance mounted the file system (and will unmount it).
    pub fn mounted_by_us(&self) -> bool {
        self.mounted.is_some()
    }

    /// `<root>/kprobe_events`.
    pub fn kprobe_events(&self) -> PathBuf {
        self.root.join("kprobe_events")
    }

    /// Directory of one event: `<root>/events/<group>/<name>`.
    pub fn event_dir(&self, group: &str, name: &str) -> PathBuf {
        self.root.join("events").join(group).join(name)
    }

    /// Checks that kprobe events exist, are enabled and writable.
    pub fn check_kprobes(&self) -> Result<(), ProbeError> {
        let path = self.kprobe_events();
        if !path.exists() {
            return Err(ProbeError::KprobesUnsupported { path });
        }
        let enabled = Path::new(KPROBES_ENABLED);
        if enabled.exists() {
            let v = fs::read_to_string(enabled).map_err(|e| ProbeError::io("read", enabled, e))?;
            if v.trim() != "1" {
                return Err(ProbeError::KprobesDisabled {
                    path: enabled.to_path_buf(),
                });
            }
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| ProbeError::KprobeEventsNotWritable { path, source })?;
        Ok(())
    }

    /// The set of functions kprobes can attach to: `available_filter_functions`
    /// (module suffixes stripped), or, when that file cannot be read (some
    /// kernels restrict it), the text symbols of [`KALLSYMS`].
    pub fn available_functions(&self) -> Result<HashSet<String>, ProbeError> {
        let path = self.root.join("available_filter_functions");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(parse_available_functions(&text)),
            Err(first) => match fs::read_to_string(KALLSYMS) {
                Ok(text) => Ok(parse_kallsyms_text(&text)),
                Err(_) => Err(ProbeError::io("read", &path, first)),
            },
        }
    }

    /// Id of an event (`events/<group>/<name>/id`).
    pub fn event_id(&self, group: &str, name: &str) -> Result<u32, ProbeError> {
        let path = self.event_dir(group, name).join("id");
        let text = fs::read_to_string(&path).map_err(|e| ProbeError::io("read", &path, e))?;
        text.trim().parse().map_err(|_| ProbeError::Parse {
            path,
            what: format!("event id {:?} is not a number", text.trim()),
        })
    }

    /// Format text of an event (`events/<group>/<name>/format`).
    pub fn event_format(&self, group: &str, name: &str) -> Result<String, ProbeError> {
        let path = self.event_dir(group, name).join("format");
        fs::read_to_string(&path).map_err(|e| ProbeError::io("read", &path, e))
    }
}

/// Parses `available_filter_functions` text: one function per line,
/// optionally followed by ` [module]`.
pub fn parse_available_functions(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Text (code) symbols of `/proc/kallsyms` text: lines `ADDR TYPE NAME [module]`
/// with type `T` or `t`.
pub fn parse_kallsyms_text(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let _addr = it.next()?;
            let ty = it.next()?;
            let name = it.next()?;
            matches!(ty, "T" | "t").then(|| name.to_string())
        })
        .collect()
}

/// True when `cap` is in the effective capability set of this process.
pub fn has_capability(cap: u32) -> Result<bool, ProbeError> {
    let path = Path::new("/proc/self/status");
    let text = fs::read_to_string(path).map_err(|e| ProbeError::io("read", path, e))?;
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| ProbeError::Parse {
            path: path.to_path_buf(),
            what: "no CapEff line".into(),
        })?;
    let bits = u64::from_str_radix(hex.trim(), 16).map_err(|_| ProbeError::Parse {
        path: path.to_path_buf(),
        what: format!("CapEff {:?} is not hex", hex.trim()),
    })?;
    Ok(cap < u64::BITS && bits & (1u64 << cap) != 0)
}

/// Fails with [`ProbeError::MissingCapability`] unless CAP_SYS_ADMIN is
/// effective.
pub fn check_sys_admin() -> Result<(), ProbeError> {
    if has_capability(CAP_SYS_ADMIN)? {
        Ok(())
    } else {
        Err(ProbeError::MissingCapability {
            cap: "CAP_SYS_ADMIN",
            why: "to install kprobes and open tracepoint perf events",
        })
    }
}

/// Whether IPv6 is usable on the loopback device: `None` when the kernel
/// has no IPv6 at all.
pub fn ipv6_on_loopback() -> Option<bool> {
    fs::read_to_string(LO_DISABLE_IPV6)
        .ok()
        .map(|v| v.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_functions_strip_modules() {
        let set = parse_available_functions("ip_output\nfoo [ipv6]\n\nbar.isra.0\n");
        assert!(set.contains("ip_output"));
        assert!(set.contains("foo"));
        assert!(set.contains("bar.isra.0"));
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn kallsyms_keeps_only_text_symbols() {
        let set = parse_kallsyms_text(
            "ffffffff8205c240 T ip_output\nffffffff8205c000 t ip_finish_output2\nffffffff83000000 D some_data\nffffffffc0000000 t ipv6_rcv\t[ipv6]\n",
        );
        assert!(set.contains("ip_output"));
        assert!(set.contains("ip_finish_output2"));
        assert!(set.contains("ipv6_rcv"));
        assert!(!set.contains("some_data"));
    }
}
