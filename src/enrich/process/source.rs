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
}

/// A [`ProcSource`] over in-memory data, for tests and benchmarks. Clones
/// share the data, so a test can change it after handing a clone to a table.
/// Built only for tests and with the `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Default)]
pub struct FakeProcSource {
    procs: Arc<Mutex<BTreeMap<u32, ProcSnapshot>>>,
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
}
