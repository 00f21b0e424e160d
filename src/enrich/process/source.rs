//! Where process information comes from ([`ProcSource`]): the proc
//! filesystem ([`ProcFs`]), nothing at all for a replayed recording
//! ([`NoProcesses`]), or in-memory data for tests ([`FakeProcSource`], only
//! with `cfg(test)` or the `test-util` feature).

#[cfg(any(test, feature = "test-util"))]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "test-util"))]
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ProcError, MAX_CGROUP_BYTES};
use crate::model::Creds;

/// What a read of `/proc/<pid>` yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcSnapshot {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// comm.
    pub name: String,
    /// Command line.
    pub args: Vec<String>,
    /// Executable path.
    pub exe: String,
    /// Start time.
    pub start: Option<SystemTime>,
    /// Credentials from `status`.
    pub creds: Option<Creds>,
    /// Text of the `cgroup` file.
    pub cgroup: Option<String>,
}

/// Source of process information (the proc filesystem, or fake data).
pub trait ProcSource: Send {
    /// Pids of all processes.
    fn pids(&self) -> Result<Vec<u32>, ProcError>;
    /// Reads one process.
    fn read(&self, pid: u32) -> Result<ProcSnapshot, ProcError>;
    /// The absolute path `path` (an exec's file name) names once its
    /// symbolic links are followed, in the root directory of the first of
    /// `pids` that still has one; None when no such process is left or a
    /// part of the path is missing.
    fn resolve(&self, _pids: &[u32], _path: &str) -> Option<String> {
        None
    }
}

/// Most symbolic links followed resolving one path (as the kernel's
/// `MAXSYMLINKS`).
const MAX_LINK_HOPS: usize = 40;

/// Resolves absolute `path` inside the directory `root` (a process's
/// `/proc/<pid>/root`): each component is looked up under `root`, and a
/// symbolic link's target is followed there too, an absolute one from
/// `root` rather than from the daemon's own root.
pub fn resolve_in(root: &Path, path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                cur.pop();
            }
            name => {
                let rel: PathBuf = cur
                    .iter()
                    .chain(std::iter::once(&name.to_string()))
                    .collect();
                let full = root.join(&rel);
                let meta = std::fs::symlink_metadata(&full).ok()?;
                if !meta.file_type().is_symlink() {
                    cur.push(name.to_string());
                    continue;
                }
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return None;
                }
                let target = std::fs::read_link(&full).ok()?;
                let target = target.to_str()?;
                if target.starts_with('/') {
                    cur.clear();
                }
                todo.extend(target.split('/').rev().map(str::to_string));
            }
        }
    }
    Some(format!("/{}", cur.join("/")))
}

/// [`ProcSource`] over a mounted proc filesystem at a configurable root.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
    boot: SystemTime,
    ticks_per_second: u64,
}

impl ProcFs {
    /// Opens the proc filesystem at `root` (usually `/proc`), reading the
    /// boot time from `<root>/stat`.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, ProcError> {
        let root = root.as_ref().to_path_buf();
        let path = root.join("stat");
        let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Io {
            path: path.clone(),
            source,
        })?;
        let btime = text
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(ProcError::NoBootTime { path })?;
        Ok(ProcFs {
            root,
            boot: UNIX_EPOCH + Duration::from_secs(btime),
            ticks_per_second: procfs::ticks_per_second().max(1),
        })
    }
}

/// [`ProcSource`] of a machine whose processes cannot be read: a replayed
/// recording comes from another machine (or an earlier boot), so this one's
/// `/proc` says nothing about its pids. Processes are known only from the
/// recorded exec/fork/exit/creds events.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProcesses;

impl ProcSource for NoProcesses {
    fn pids(&self) -> Result<Vec<u32>, ProcError> {
        Ok(Vec::new())
    }

    fn read(&self, pid: u32) -> Result<ProcSnapshot, ProcError> {
        Err(ProcError::Io {
            path: PathBuf::from(format!("recorded pid {pid}")),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not on this machine (replayed recording)",
            ),
        })
    }
}

impl ProcSource for ProcFs {
    fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let iter = procfs::process::all_processes_with_root(&self.root).map_err(|source| {
            ProcError::Procfs {
                path: self.root.clone(),
                source,
            }
        })?;
        Ok(iter
            .filter_map(Result::ok)
            .filter_map(|p| u32::try_from(p.pid).ok())
            .collect())
    }

    fn read(&self, pid: u32) -> Result<ProcSnapshot, ProcError> {
        let dir = self.root.join(pid.to_string());
        let wrap = |source| ProcError::Procfs {
            path: dir.clone(),
            source,
        };
        let proc = procfs::process::Process::new_with_root(dir.clone()).map_err(wrap)?;
        let stat = proc.stat().map_err(wrap)?;
        let start = self.boot
            + Duration::from_nanos(
                (u128::from(stat.starttime) * 1_000_000_000 / u128::from(self.ticks_per_second))
                    .try_into()
                    .unwrap_or(u64::MAX),
            );
        let creds = proc.status().ok().map(|s| Creds {
            uid: s.ruid,
            gid: s.rgid,
            euid: s.euid,
            egid: s.egid,
        });
        let cgroup_path = dir.join("cgroup");
        let cgroup = std::fs::metadata(&cgroup_path)
            .ok()
            .filter(|m| m.len() <= MAX_CGROUP_BYTES)
            .and_then(|_| std::fs::read_to_string(&cgroup_path).ok());
        Ok(ProcSnapshot {
            pid,
            ppid: u32::try_from(stat.ppid).unwrap_or(0),
            name: stat.comm,
            args: proc.cmdline().unwrap_or_default(),
            exe: proc
                .exe()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            start: Some(start),
            creds,
            cgroup,
        })
    }

    fn resolve(&self, pids: &[u32], path: &str) -> Option<String> {
        pids.iter()
            .map(|pid| self.root.join(pid.to_string()).join("root"))
            .filter(|root| root.exists())
            .find_map(|root| resolve_in(&root, path))
    }
}

/// A [`ProcSource`] over in-memory data, for tests and benchmarks. Clones
/// share the data, so a test can change it after handing a clone to a table.
/// Built only for tests and with the `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Default)]
pub struct FakeProcSource {
    procs: Arc<Mutex<BTreeMap<u32, ProcSnapshot>>>,
    /// (pid, path) -> what the path resolves to in that process's root.
    links: Arc<Mutex<BTreeMap<(u32, String), String>>>,
}

#[cfg(any(test, feature = "test-util"))]
impl FakeProcSource {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, ProcSnapshot>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a process.
    pub fn set(&self, snap: ProcSnapshot) {
        self.map().insert(snap.pid, snap);
    }

    /// Removes a process.
    pub fn remove(&self, pid: u32) {
        self.map().remove(&pid);
    }

    /// Says what `path` resolves to in the root of process `pid` (while
    /// that process is present).
    pub fn set_resolved(&self, pid: u32, path: &str, resolved: &str) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((pid, path.to_string()), resolved.to_string());
    }
}

#[cfg(any(test, feature = "test-util"))]
impl ProcSource for FakeProcSource {
    fn pids(&self) -> Result<Vec<u32>, ProcError> {
        Ok(self.map().keys().copied().collect())
    }

    fn read(&self, pid: u32) -> Result<ProcSnapshot, ProcError> {
        self.map().get(&pid).cloned().ok_or_else(|| ProcError::Io {
            path: PathBuf::from(format!("fake/{pid}")),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }

    fn resolve(&self, pids: &[u32], path: &str) -> Option<String> {
        let present = self.map();
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        pids.iter()
            .filter(|p| present.contains_key(p))
            .find_map(|&p| links.get(&(p, path.to_string())).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_process_root() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("7/root");
        for dir in ["bin", "usr/bin", "opt"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("bin/busybox"), "").unwrap();
        let link =
            |target: &str, at: &str| std::os::unix::fs::symlink(target, root.join(at)).unwrap();
        link("busybox", "bin/sh");
        // Absolute targets are taken from the process's root, not the daemon's.
        link("/bin/sh", "usr/bin/sh");
        link("../bin", "opt/bin");
        link("loop2", "opt/loop1");
        link("loop1", "opt/loop2");
        assert_eq!(
            resolve_in(&root, "/bin/sh").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(
            resolve_in(&root, "/usr/bin/sh").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(
            resolve_in(&root, "/opt/bin/./sh").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(
            resolve_in(&root, "/bin/busybox").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(resolve_in(&root, "/opt/loop1"), None, "a loop ends");
        assert_eq!(resolve_in(&root, "/bin/missing"), None);
        assert_eq!(resolve_in(&root, "bin/sh"), None, "relative: not resolved");
        // Through a proc root: the first listed process that still has a root.
        std::fs::write(d.path().join("stat"), "btime 1700000000\n").unwrap();
        let fs = ProcFs::new(d.path()).expect("proc root");
        assert_eq!(
            fs.resolve(&[9, 7], "/usr/bin/sh").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(fs.resolve(&[9], "/usr/bin/sh"), None);
    }
}
