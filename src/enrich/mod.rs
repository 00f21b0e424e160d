//! Pipeline stage: enrich.
//!
//! Everything a flow record carries beyond its counters: the owning
//! process ([`process`]), user and group names ([`users`]), the container
//! and pod a process runs in ([`container`]), the flow's Community ID
//! ([`community_id`]), the machine's TCP sockets and their owners when
//! the daemon starts ([`sockets`]), and the node's own facts ([`host`]).

pub mod community_id;
pub mod container;
pub mod dns;
pub mod host;
pub mod pods;
pub mod process;
pub mod sockets;
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

/// Root whose `etc/passwd` and `etc/group` name users: `socket.host_root`
/// when set, else [`host_root_for`] the proc root.
pub fn host_root(cfg: &Config) -> PathBuf {
    cfg.socket
        .host_root
        .clone()
        .unwrap_or_else(|| host_root_for(&cfg.socket.proc_root))
}

/// The process table for a configuration: procfs at `socket.proc_root`,
/// users and groups from [`host_root`], bounded by
/// `limits.max_processes`, exited processes kept resolvable for
/// `socket.flow_termination_timeout`, and filled by an initial scan.
/// A missing or unreadable passwd/group file is logged and leaves names
/// empty; a missing proc filesystem is an error.
pub fn open_process_table(cfg: &Config) -> Result<ProcessTable, ProcError> {
    let proc_root = &cfg.socket.proc_root;
    let source = ProcFs::new(proc_root)?;
    let users = UserDb::load(host_root(cfg)).unwrap_or_else(|e| {
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
    fn host_root_option_overrides_the_derived_root() {
        let mut cfg = Config::default();
        assert_eq!(host_root(&cfg), PathBuf::from("/"));
        cfg.socket.proc_root = PathBuf::from("/host/proc");
        assert_eq!(host_root(&cfg), PathBuf::from("/host"));
        cfg.socket.host_root = Some(PathBuf::from("/srv/root"));
        assert_eq!(host_root(&cfg), PathBuf::from("/srv/root"));
    }

    #[test]
    fn users_are_read_under_the_configured_host_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        // Whoever runs the tests: the entries carry this process's ids.
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        std::fs::write(
            dir.path().join("etc/passwd"),
            format!("someone:x:{uid}:{gid}::/:/bin/sh\n"),
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("etc/group"),
            format!("somegroup:x:{gid}:\n"),
        )
        .expect("group");
        let mut cfg = Config::default();
        cfg.socket.host_root = Some(dir.path().to_path_buf());
        let mut t = open_process_table(&cfg).expect("/proc must be readable");
        let me = t.lookup(std::process::id());
        assert_eq!(me.user_name.as_deref(), Some("someone"));
        assert_eq!(me.group_name.as_deref(), Some("somegroup"));
    }

    #[test]
    fn opens_this_hosts_process_table() {
        let cfg = Config::default();
        let mut t = open_process_table(&cfg).expect("/proc must be readable");
        assert!(t.len() > 1);
        let me = t.lookup(std::process::id());
        assert!(!me.name.is_empty());
        // The name this host's /etc/passwd gives the user running the tests.
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .expect("passwd lookup")
            .map(|u| u.name);
        assert_eq!(me.user_name, user);
    }
}
