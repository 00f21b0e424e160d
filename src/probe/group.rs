//! Our kprobe groups and ftrace instances: their names, which process owns
//! one, and the removal of those left behind by processes that died.
//!
//! Every group (and the offset guesser's private ftrace instance) is named
//! `sockscope_<pid>[_suffix]`: the daemon's probes are in
//! [`group_name`], the guesser's temporary probes and instance in
//! [`guess_group_name`]. A name whose pid no longer runs belongs to a dead
//! instance and is removed at start ([`remove_stale_groups`]); two live
//! instances never touch each other's groups.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::error::ProbeError;
use super::tracefs::Tracefs;

/// Prefix of every group we create.
pub const GROUP_PREFIX: &str = "sockscope_";
/// Suffix of the offset guesser's group and instance.
pub const GUESS_SUFFIX: &str = "_guess";
/// Longest group or event name tracefs accepts (MAX_EVENT_NAME_LEN - 1).
pub const MAX_NAME_LEN: usize = 63;

/// The daemon's group name for this process.
pub fn group_name() -> String {
    format!("{GROUP_PREFIX}{}", std::process::id())
}

/// The offset guesser's group and instance name for this process.
pub fn guess_group_name() -> String {
    format!("{GROUP_PREFIX}{}{GUESS_SUFFIX}", std::process::id())
}

/// The pid encoded in one of our names (`sockscope_<pid>[_suffix]`).
pub fn group_pid(group: &str) -> Option<u32> {
    let rest = group.strip_prefix(GROUP_PREFIX)?;
    rest.split('_').next()?.parse().ok()
}

/// Whether `name` is one of ours whose owning process no longer runs
/// (`/proc/<pid>` missing).
pub fn owner_is_gone(name: &str) -> bool {
    group_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Appends one line to a tracefs control file (`kprobe_events`).
pub(super) fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// (group, name) of every kprobe in `kprobe_events` text.
pub fn parse_kprobe_events(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let head = l.split_whitespace().next()?;
            let (_, gn) = head.split_once(':')?;
            let (g, n) = gn.split_once('/')?;
            Some((g.to_string(), n.to_string()))
        })
        .collect()
}

pub(super) fn remove_group(tfs: &Tracefs, group: &str) -> Result<Vec<String>, ProbeError> {
    let path = tfs.kprobe_events();
    let text = fs::read_to_string(&path).map_err(|e| ProbeError::io("read", &path, e))?;
    let mut removed = Vec::new();
    for (g, n) in parse_kprobe_events(&text) {
        if g == group {
            let full = format!("{g}/{n}");
            append_line(&path, &format!("-:{full}")).map_err(|source| ProbeError::Remove {
                name: full.clone(),
                path: path.clone(),
                source,
                hint: "",
            })?;
            removed.push(full);
        }
    }
    Ok(removed)
}

/// Removes `instances/sockscope_<pid>…` directories of processes that no
/// longer run. Must run before the stale kprobe groups are removed: a
/// kprobe enabled in an instance cannot be deleted. Returns the removed
/// instance names.
pub fn remove_stale_instances(tfs: &Tracefs) -> Vec<String> {
    let dir = tfs.root().join("instances");
    let Ok(rd) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if owner_is_gone(&name) && fs::remove_dir(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Removes the ftrace instances and the probes of groups whose process is
/// no longer running. Returns the removed `GROUP/NAME`s.
pub fn remove_stale_groups(tfs: &Tracefs) -> Result<Vec<String>, ProbeError> {
    // A probe still enabled in a dead process's guess instance cannot be
    // removed: drop those instances first.
    remove_stale_instances(tfs);
    let path = tfs.kprobe_events();
    let text = fs::read_to_string(&path).map_err(|e| ProbeError::io("read", &path, e))?;
    let mut groups: Vec<String> = parse_kprobe_events(&text)
        .into_iter()
        .map(|(g, _)| g)
        .filter(|g| owner_is_gone(g))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let mut removed = Vec::new();
    for g in groups {
        removed.extend(remove_group(tfs, &g)?);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kprobe_events_lines() {
        let text = "p:sockscope_12/tcp_connect tcp_connect+0 sk=%di:x64\n\
                    r256:sockscope_12/tcp_accept inet_csk_accept ret=$retval\n\
                    p:kprobes/other do_sys_open\n";
        let v = parse_kprobe_events(text);
        assert_eq!(v.len(), 3);
        assert_eq!(v[1], ("sockscope_12".into(), "tcp_accept".into()));
        assert_eq!(group_pid(&v[0].0), Some(12));
        assert_eq!(group_pid("sockscope_77_t3"), Some(77));
        assert_eq!(group_pid(&v[2].0), None);
    }

    #[test]
    fn only_our_names_of_dead_processes_are_stale() {
        assert!(!owner_is_gone(&group_name()));
        assert!(!owner_is_gone(&guess_group_name()));
        assert!(!owner_is_gone("kprobes"));
        // Beyond pid_max (2^22): never a running process.
        assert!(owner_is_gone("sockscope_4194305"));
        assert!(owner_is_gone("sockscope_4194305_guess"));
    }
}
