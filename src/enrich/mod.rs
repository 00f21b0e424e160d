//! Pipeline stage: enrich.
//!
//! Everything a flow record carries beyond its counters: the owning
//! process ([`process`]), user and group names ([`users`]), the container
//! and pod a process runs in ([`container`]) and the flow's Community ID
//! ([`community_id`]).

pub mod community_id;
pub mod container;
pub mod dns;
pub mod process;
pub mod users;

use std::path::{Path, PathBuf};

use crate::config::Config;
use process::{ProcError, ProcFs, ProcessTable, ProcessTableConfig};
use users::UserDb;

/// Root of the host filesystem that goes with a proc mount: the parent of
/// `<root>/proc` (`/proc` → `/`, `/host/proc` → `/host`), or `/` when the
/// proc root is not named `proc`.
pub fn host_root_for(proc_root: &Path) -> PathBuf {
    match (proc_root.file_name(), proc_root.parent()) {
        (Some(name), Some(parent)) if name == "proc" => parent.to_path_buf(),
        _ => PathBuf::from("/"),
    }
}

/// The process table for a configuration: procfs at `socket.proc_root`,
/// users and groups from the matching host root, bounded by
/// `limits.max_processes`, exited processes kept resolvable for
/// `socket.flow_termination_timeout`, and filled by an initial scan.
/// A missing or unreadable passwd/group file is logged and leaves names
/// empty; a missing proc filesystem is an error.
pub fn open_process_table(cfg: &Config) -> Result<ProcessTable, ProcError> {
    let proc_root = &cfg.socket.proc_root;
    let source = ProcFs::new(proc_root)?;
    let users = UserDb::load(host_root_for(proc_root)).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "user and group names unavailable");
        UserDb::empty()
    });
    let mut table = ProcessTable::new(
        Box::new(source),
        users,
        ProcessTableConfig {
            max_processes: cfg.limits.max_processes,
            exit_grace: cfg.socket.flow_termination_timeout,
        },
    );
    table.scan()?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_root_follows_proc_root() {
        assert_eq!(host_root_for(Path::new("/proc")), PathBuf::from("/"));
        assert_eq!(
            host_root_for(Path::new("/host/proc")),
            PathBuf::from("/host")
        );
        assert_eq!(host_root_for(Path::new("/srv/procfs")), PathBuf::from("/"));
    }

    #[test]
    fn opens_this_hosts_process_table() {
        let cfg = Config::default();
        let mut t = open_process_table(&cfg).expect("/proc must be readable");
        assert!(t.len() > 1);
        let me = t.lookup(std::process::id());
        assert!(!me.name.is_empty());
        assert_eq!(me.user_name.as_deref(), Some("root"), "tests run as root");
    }
}
