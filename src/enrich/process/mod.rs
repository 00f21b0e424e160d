//! Process table: what is known about each process that may own a socket.
//!
//! Entries are keyed by `(pid, start time)` ([`ProcKey`]) so a reused pid
//! never inherits an older process's identity; a second index maps a pid to
//! its current entry. The table is filled by an initial scan of the proc
//! filesystem and kept current from kernel events:
//!
//! * `Fork`: the child starts as a copy of its parent (name, arguments,
//!   executable, credentials, container), with its own pid, parent pid and
//!   start time, until it calls exec. Thread creation also arrives as a fork
//!   (the event cannot tell them apart); those entries are removed as soon as
//!   the thread exits.
//! * `Exec`: the event carries the file run and (from the exec probe, just
//!   before it) the first arguments; the entry is re-read from
//!   `/proc/<pid>` for the rest. When that fails (the process is already
//!   gone), or `/proc` shows other arguments (a later exec), the event's
//!   file name and arguments stand. A re-exec through `/proc/<pid|self>/exe`
//!   keeps the executable the process had and is named by `argv[0]`.
//! * `Creds`: the credentials and the user and group names are replaced.
//! * `Exit` of a group leader: the entry stays resolvable for a grace period
//!   (events such as the final close of its sockets arrive after the exit
//!   event) and is then removed. A fork of the same pid during the grace
//!   period replaces the pid's current entry at once.
//!
//! A pid that is not in the table when a socket event names it is read from
//! `/proc` on demand; if that fails an entry carrying only the pid is kept,
//! so a vanished process is not looked up again for every event.
//!
//! Snapshots are handed out as `Arc<ProcessInfo>`: a flow keeps the snapshot
//! of the process it was attributed to, whatever happens to the table later.
//! All reads of `/proc` go through [`ProcSource`] so tests can use fake data.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;

use crate::enrich::container::parse_cgroup;
use crate::enrich::users::UserDb;
use crate::model::{Creds, KernelTime, ProcessInfo};

/// Largest `/proc/<pid>/cgroup` read.
pub const MAX_CGROUP_BYTES: u64 = 64 << 10;
/// Slack of the eviction order queue before it is compacted, as a multiple
/// of the table bound.
const ORDER_COMPACT_FACTOR: usize = 2;
/// Most exec argument samples kept while their exec event is awaited (one
/// per process between the two samples of an exec).
pub const MAX_PENDING_EXEC_ARGS: usize = 4096;

/// Errors reading process information.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// procfs could not read a file of a process.
    #[error("reading {path}: {source}")]
    Procfs {
        /// The process directory or file.
        path: PathBuf,
        /// The cause.
        source: procfs::ProcError,
    },
    /// A plain file read failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `<root>/stat` has no usable `btime` line.
    #[error("{path}: no btime line")]
    NoBootTime {
        /// The file.
        path: PathBuf,
    },
}

mod source;

#[cfg(any(test, feature = "test-util"))]
pub use source::FakeProcSource;
pub use source::{NoProcesses, ProcFs, ProcSnapshot, ProcSource};

/// Identity of a process: pid plus start time (ns since the epoch, 0 when
/// unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    /// Process id.
    pub pid: u32,
    /// Start time in ns since the Unix epoch.
    pub start_ns: u64,
}

impl ProcKey {
    fn of(info: &ProcessInfo) -> Self {
        ProcKey {
            pid: info.pid,
            start_ns: info
                .created
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: Arc<ProcessInfo>,
    /// Set when the group leader exited: the time after which it goes.
    remove_at: Option<KernelTime>,
    /// Created by a fork event (possibly a thread).
    from_fork: bool,
}

/// Bounds and timing of the process table.
#[derive(Debug, Clone, Copy)]
pub struct ProcessTableConfig {
    /// Most entries kept (`limits.max_processes`).
    pub max_processes: usize,
    /// How long an exited process stays resolvable.
    pub exit_grace: Duration,
}

/// Counters of the process table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Live entries.
    pub entries: usize,
    /// Entries evicted because the table was full.
    pub evictions: u64,
    /// Reads of the proc source that failed.
    pub read_failures: u64,
}

/// The process table. See the module documentation.
pub struct ProcessTable {
    source: Box<dyn ProcSource>,
    users: UserDb,
    cfg: ProcessTableConfig,
    entries: HashMap<ProcKey, Entry>,
    current: HashMap<u32, ProcKey>,
    /// Insertion order, for eviction; may hold keys already removed.
    order: VecDeque<ProcKey>,
    /// Exited entries by removal time (times are non-decreasing).
    exited: VecDeque<(KernelTime, ProcKey)>,
    evictions: u64,
    pending_evictions: u64,
    read_failures: u64,
    /// Arguments of execs whose exec event has not arrived yet, by pid.
    pending_args: HashMap<u32, Vec<String>>,
    /// Called with the container id of each process read from the source.
    container_hook: Option<ContainerHook>,
}

/// What [`ProcessTable::set_container_hook`] calls.
pub type ContainerHook = Box<dyn Fn(&str) + Send>;

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable")
            .field("entries", &self.entries.len())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether an exec'd file name is a re-exec of a process's own executable
/// through `/proc/<pid|self>/exe` (busybox's shell starts its applets so),
/// which gives the process the name `exe`.
fn is_proc_exe(filename: &str) -> bool {
    filename
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/exe"))
        .is_some_and(|mid| !mid.is_empty() && !mid.contains('/'))
}

/// The name a person would give a process: its command name, unless that
/// is `exe` from a `/proc/*/exe` re-exec while the executable is named
/// otherwise, then the base name of `argv[0]` (`httpd` for busybox's
/// applet), when there is one.
fn person_name(comm: String, exe: &str, args: &[String]) -> String {
    let reexec = comm == "exe" && basename(exe) != "exe";
    match args.first().map(|a| basename(a)) {
        Some(a) if reexec && !a.is_empty() => a.to_string(),
        _ => comm,
    }
}

impl ProcessTable {
    /// An empty table reading from `source`, naming users from `users`.
    pub fn new(source: Box<dyn ProcSource>, users: UserDb, cfg: ProcessTableConfig) -> Self {
        ProcessTable {
            source,
            users,
            cfg,
            entries: HashMap::new(),
            current: HashMap::new(),
            order: VecDeque::new(),
            exited: VecDeque::new(),
            evictions: 0,
            pending_evictions: 0,
            read_failures: 0,
            pending_args: HashMap::new(),
            container_hook: None,
        }
    }

    /// Calls `hook` with the container id of every process read from the
    /// source from now on (not of forked copies, which share their
    /// parent's).
    pub fn set_container_hook(&mut self, hook: ContainerHook) {
        self.container_hook = Some(hook);
    }

    /// Reads every process of the source; returns how many were added.
    pub fn scan(&mut self) -> Result<usize, ProcError> {
        let pids = self.source.pids()?;
        let mut added = 0;
        for pid in pids {
            match self.source.read(pid) {
                Ok(snap) => {
                    let info = self.info_from_snapshot(snap);
                    self.insert(info, false);
                    added += 1;
                }
                // Processes vanish during a scan; that is not an error.
                Err(_) => self.read_failures += 1,
            }
        }
        Ok(added)
    }

    fn info_from_snapshot(&self, s: ProcSnapshot) -> ProcessInfo {
        let container = s.cgroup.as_deref().map(parse_cgroup).unwrap_or_default();
        let name = if s.name.is_empty() {
            basename(&s.exe).to_string()
        } else {
            person_name(s.name, &s.exe, &s.args)
        };
        let mut info = ProcessInfo {
            pid: s.pid,
            ppid: s.ppid,
            name,
            args: s.args,
            executable: s.exe,
            created: s.start,
            creds: s.creds,
            user_name: None,
            group_name: None,
            container_id: container.container_id,
            pod_uid: container.pod_uid,
        };
        self.name_creds(&mut info);
        info
    }

    fn name_creds(&self, info: &mut ProcessInfo) {
        info.user_name = info
            .creds
            .and_then(|c| self.users.user(c.uid))
            .map(str::to_string);
        info.group_name = info
            .creds
            .and_then(|c| self.users.group(c.gid))
            .map(str::to_string);
    }

    fn insert(&mut self, info: ProcessInfo, from_fork: bool) -> Arc<ProcessInfo> {
        if let (false, Some(hook), Some(id)) = (
            from_fork,
            &self.container_hook,
            info.container_id.as_deref(),
        ) {
            hook(id);
        }
        let key = ProcKey::of(&info);
        let info = Arc::new(info);
        let old = self.entries.insert(
            key,
            Entry {
                info: Arc::clone(&info),
                remove_at: None,
                from_fork,
            },
        );
        if old.is_none() {
            self.order.push_back(key);
            self.enforce_bound(key);
        }
        self.current.insert(key.pid, key);
        info
    }

    fn remove(&mut self, key: ProcKey) {
        if self.entries.remove(&key).is_some() && self.current.get(&key.pid) == Some(&key) {
            self.current.remove(&key.pid);
        }
    }

    fn enforce_bound(&mut self, keep: ProcKey) {
        while self.entries.len() > self.cfg.max_processes.max(1) {
            // Exited processes go first, then the oldest inserted.
            let victim = self
                .exited
                .pop_front()
                .map(|(_, k)| k)
                .filter(|k| self.entries.contains_key(k) && *k != keep)
                .or_else(|| {
                    while let Some(k) = self.order.pop_front() {
                        if k != keep && self.entries.contains_key(&k) {
                            return Some(k);
                        }
                    }
                    None
                });
            let Some(victim) = victim else { break };
            self.remove(victim);
            self.evictions += 1;
            self.pending_evictions += 1;
        }
        if self.order.len() > ORDER_COMPACT_FACTOR * self.cfg.max_processes.max(1) + 16 {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }

    /// Whether `info` is the current process with this pid (neither reads
    /// the source nor clones).
    pub fn is_current(&self, pid: u32, info: &Arc<ProcessInfo>) -> bool {
        self.current
            .get(&pid)
            .and_then(|k| self.entries.get(k))
            .is_some_and(|e| Arc::ptr_eq(&e.info, info))
    }

    /// The current process with this pid, reading it from the source when
    /// unknown.
    pub fn lookup(&mut self, pid: u32) -> Arc<ProcessInfo> {
        if let Some(e) = self.current.get(&pid).and_then(|k| self.entries.get(k)) {
            return Arc::clone(&e.info);
        }
        let info = match self.source.read(pid) {
            Ok(s) => self.info_from_snapshot(s),
            Err(_) => {
                self.read_failures += 1;
                ProcessInfo {
                    pid,
                    ..ProcessInfo::default()
                }
            }
        };
        self.insert(info, false)
    }

    /// The current entry of a pid without reading the source.
    pub fn get(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.current
            .get(&pid)
            .and_then(|k| self.entries.get(k))
            .map(|e| Arc::clone(&e.info))
    }

    /// A process or thread was created.
    pub fn on_fork(&mut self, parent: u32, child: u32, created: SystemTime) {
        let p = self.lookup(parent);
        let mut info = (*p).clone();
        info.pid = child;
        info.ppid = parent;
        info.created = Some(created);
        self.insert(info, true);
    }

    /// The leading arguments of the image process `pid` is about to run
    /// (the exec probe's sample, right before the exec event itself).
    pub fn on_exec_args(&mut self, pid: u32, args: Vec<String>) {
        if self.pending_args.len() >= MAX_PENDING_EXEC_ARGS && !self.pending_args.contains_key(&pid)
        {
            // Only exec events that never arrived (lost samples, counted as
            // such) leave arguments behind: forget them.
            self.pending_args.clear();
        }
        self.pending_args.insert(pid, args);
    }

    /// A process called exec.
    ///
    /// The event names the file run and, through [`Self::on_exec_args`],
    /// the leading arguments; `/proc/<pid>` adds what they lack (the full
    /// command line, credentials, container). Where `/proc` shows other
    /// leading arguments (a later exec, a rewritten command line), or
    /// cannot be read (the process is gone), the event's arguments stand.
    pub fn on_exec(&mut self, pid: u32, filename: &str) {
        let old = self.get(pid);
        let event_args = self.pending_args.remove(&pid);
        // The file the exec ran: a re-exec through /proc/*/exe runs the
        // executable the process had before.
        let had = old
            .as_deref()
            .map(|o| o.executable.as_str())
            .filter(|e| !e.is_empty() && !is_proc_exe(e));
        let ran = match had {
            Some(e) if is_proc_exe(filename) => e.to_string(),
            _ => filename.to_string(),
        };
        let (mut info, comm) = match self.source.read(pid) {
            Ok(s) => {
                let comm = s.name.clone();
                (self.info_from_snapshot(s), comm)
            }
            Err(_) => {
                self.read_failures += 1;
                let mut info = old.as_deref().cloned().unwrap_or(ProcessInfo {
                    pid,
                    ..ProcessInfo::default()
                });
                info.executable = String::new();
                info.args = Vec::new();
                // The kernel names the new image after the file it ran.
                (info, basename(filename).to_string())
            }
        };
        if let Some(args) = event_args {
            if !info.args.starts_with(&args) {
                info.args = args;
            }
        }
        // A process read while it exits may have lost its executable link.
        if info.executable.is_empty() || is_proc_exe(&info.executable) {
            // The file name as the exec was given it may be a link (busybox's
            // `sh` run as /bin/sh): resolved in the process's root, or its
            // parent's when it is already gone.
            let pids = [pid, info.ppid];
            info.executable = if is_proc_exe(&ran) {
                ran
            } else {
                self.source.resolve(&pids, &ran).unwrap_or(ran)
            };
        }
        info.name = if comm.is_empty() {
            basename(&info.executable).to_string()
        } else {
            person_name(comm, &info.executable, &info.args)
        };
        if info.name == "exe" && basename(&info.executable) != "exe" {
            info.name = basename(&info.executable).to_string();
        }
        // Exec keeps the process identity (and the start time we keyed it by).
        if let Some(old) = old {
            info.created = old.created;
        }
        self.insert(info, false);
    }

    /// A task installed new credentials.
    pub fn on_creds(&mut self, pid: u32, creds: Creds) {
        let mut info = (*self.lookup(pid)).clone();
        info.creds = Some(creds);
        self.name_creds(&mut info);
        self.insert(info, false);
    }

    /// A task exited at kernel time `now`.
    pub fn on_exit(&mut self, pid: u32, tid: u32, now: KernelTime) {
        self.pending_args.remove(&tid);
        if tid != pid {
            // A thread: drop an entry its creation made, if any.
            if let Some(&k) = self.current.get(&tid) {
                if self.entries.get(&k).is_some_and(|e| e.from_fork) {
                    self.remove(k);
                }
            }
            return;
        }
        let Some(&key) = self.current.get(&pid) else {
            return;
        };
        let grace = u64::try_from(self.cfg.exit_grace.as_nanos()).unwrap_or(u64::MAX);
        let at = now.saturating_add(grace);
        if let Some(e) = self.entries.get_mut(&key) {
            if e.remove_at.is_none() {
                e.remove_at = Some(at);
                self.exited.push_back((at, key));
            }
        }
    }

    /// Removes exited processes whose grace period ended by `now`.
    pub fn expire(&mut self, now: KernelTime) {
        while let Some(&(at, key)) = self.exited.front() {
            if at > now {
                break;
            }
            self.exited.pop_front();
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.remove_at == Some(at))
            {
                self.remove(key);
            }
        }
    }

    /// Evictions since the last call.
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.pending_evictions)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> ProcessStats {
        ProcessStats {
            entries: self.entries.len(),
            evictions: self.evictions,
            read_failures: self.read_failures,
        }
    }

    /// The user database (for reloads).
    pub fn users_mut(&mut self) -> &mut UserDb {
        &mut self.users
    }
}

#[cfg(test)]
mod tests;
