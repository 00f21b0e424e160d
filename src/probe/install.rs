//! Installing and removing the probe set.
//!
//! Probes live in the group `sockscope_<pid>` so that instances never touch
//! each other's probes; groups of processes that no longer run are removed
//! at start ([`remove_stale_groups`]). A [`ProbeGuard`] removes its probes on
//! drop and, through [`install_panic_hook`], on panic.
//!
//! Order at shutdown: the kernel refuses (EBUSY) to remove a probe while a
//! perf event is open on it, so the perf rings must be closed before the
//! guard is dropped (declare the guard before the rings so it drops after
//! them).

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use crate::decode::EventDesc;
use crate::schema::DecoderKind;

use super::error::ProbeError;
use super::group::{
    append_line, group_name, parse_kprobe_events, remove_group, GROUP_PREFIX, MAX_NAME_LEN,
};
use super::spec::{Attach, ResolvedProbe};
use super::tracefs::Tracefs;

/// Lines of tracefs `error_log` quoted in install errors.
const ERROR_LOG_LINES: usize = 4;
/// errno of a probe that still has perf users.
const EBUSY: i32 = 16;

/// One installed (or, for tracepoints, selected) event, as the ring reader
/// and the decoder need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledEvent {
    /// Event system: our group for kprobes, `sched` for tracepoints.
    pub system: String,
    /// Event name.
    pub name: String,
    /// Tracefs event id (`events/<system>/<name>/id`), the perf config.
    pub id: u32,
    /// The event's `format` file text.
    pub format: String,
    /// How its samples are decoded.
    pub decoder: DecoderKind,
    /// Whether the sample pid/tid is meaningful.
    pub task_context: bool,
    /// Filter to set on each perf fd with PERF_EVENT_IOC_SET_FILTER.
    pub filter: Option<&'static str>,
    /// Kernel function probed (None for tracepoints).
    pub function: Option<&'static str>,
}

impl InstalledEvent {
    /// What the decoder needs of this event.
    pub fn decoder_desc(&self) -> EventDesc<'_> {
        EventDesc {
            kind: self.decoder,
            task_context: self.task_context,
            format: &self.format,
        }
    }
}

/// Per group: the `kprobe_events` path and the `GROUP/NAME`s installed.
type Registry = HashMap<String, (PathBuf, Vec<String>)>;

/// Probes to remove, per group, for the panic hook.
fn registry() -> &'static Mutex<Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock_registry() -> std::sync::MutexGuard<'static, Registry> {
    registry().lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs a panic hook (once) that removes every installed group before
/// running the previous hook. Removal fails with EBUSY for probes whose perf
/// events are still open; those are removed by the next start's
/// [`remove_stale_groups`].
pub fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let groups: Vec<_> = lock_registry().drain().collect();
            for (_, (path, names)) in groups {
                for n in names {
                    let _ = append_line(&path, &format!("-:{n}"));
                }
            }
            prev(info);
        }));
    });
}

fn error_log(tfs: &Tracefs) -> String {
    let text = fs::read_to_string(tfs.root().join("error_log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(ERROR_LOG_LINES)..].join(" | ")
}

/// Installed probes of one group; removes them on drop.
#[derive(Debug)]
pub struct ProbeGuard {
    kprobe_events: PathBuf,
    group: String,
    /// `GROUP/NAME` of every kprobe still installed.
    kprobes: Vec<String>,
    events: Vec<InstalledEvent>,
}

impl ProbeGuard {
    /// Installs `probes` in the group `sockscope_<pid>`.
    pub fn install(tfs: &Tracefs, probes: &[ResolvedProbe]) -> Result<ProbeGuard, ProbeError> {
        ProbeGuard::install_in_group(tfs, probes, &group_name())
    }

    /// Installs `probes` in `group` (which must start with
    /// [`GROUP_PREFIX`] followed by our pid). Kprobe definitions are
    /// appended to `kprobe_events`; tracepoints are only looked up. On error,
    /// whatever was installed is removed again.
    pub fn install_in_group(
        tfs: &Tracefs,
        probes: &[ResolvedProbe],
        group: &str,
    ) -> Result<ProbeGuard, ProbeError> {
        if group.len() > MAX_NAME_LEN || !group.starts_with(GROUP_PREFIX) {
            return Err(ProbeError::Parse {
                path: tfs.kprobe_events(),
                what: format!("bad group name {group:?}"),
            });
        }
        let mut guard = ProbeGuard {
            kprobe_events: tfs.kprobe_events(),
            group: group.to_string(),
            kprobes: Vec::new(),
            events: Vec::new(),
        };
        // A leftover group with our pid belongs to a dead process whose pid
        // we reuse.
        remove_group(tfs, group)?;
        for p in probes {
            let (system, name) = match (&p.spec.attach, p.definition(group)) {
                (Attach::Tracepoint { system, event }, _) => {
                    (system.to_string(), event.to_string())
                }
                (_, Some(line)) => {
                    append_line(&guard.kprobe_events, &line).map_err(|source| {
                        ProbeError::Install {
                            line: line.clone(),
                            path: guard.kprobe_events.clone(),
                            source,
                            log: error_log(tfs),
                        }
                    })?;
                    let full = format!("{group}/{}", p.spec.name);
                    guard.kprobes.push(full.clone());
                    lock_registry()
                        .entry(group.to_string())
                        .or_insert_with(|| (guard.kprobe_events.clone(), Vec::new()))
                        .1
                        .push(full);
                    (group.to_string(), p.spec.name.to_string())
                }
                (_, None) => continue,
            };
            let id = tfs.event_id(&system, &name)?;
            let format = tfs.event_format(&system, &name)?;
            guard.events.push(InstalledEvent {
                system,
                name,
                id,
                format,
                decoder: p.spec.decoder,
                task_context: p.spec.task_context,
                filter: p.spec.filter,
                function: p.function,
            });
        }
        Ok(guard)
    }

    /// The installed events, in install order (the ring opens them in this
    /// order; `RawSample::event` indexes this slice).
    pub fn events(&self) -> &[InstalledEvent] {
        &self.events
    }

    /// Our group name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Removes every kprobe still installed. Idempotent; on EBUSY (perf
    /// events still open) the remaining probes stay registered and a later
    /// call may retry.
    pub fn remove(&mut self) -> Result<(), ProbeError> {
        let mut first_err = None;
        let mut left = Vec::new();
        for name in self.kprobes.drain(..) {
            if let Err(source) = append_line(&self.kprobe_events, &format!("-:{name}")) {
                let busy = source.raw_os_error() == Some(EBUSY);
                if source.kind() != std::io::ErrorKind::NotFound {
                    left.push(name.clone());
                }
                first_err.get_or_insert(ProbeError::Remove {
                    name,
                    path: self.kprobe_events.clone(),
                    source,
                    hint: if busy {
                        "; perf events on it are still open: close the rings before dropping the probes"
                    } else {
                        ""
                    },
                });
            }
        }
        self.kprobes = left;
        let mut reg = lock_registry();
        if self.kprobes.is_empty() {
            reg.remove(&self.group);
        } else if let Some(e) = reg.get_mut(&self.group) {
            e.1.clone_from(&self.kprobes);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sum of missed hits of our probes (`kprobe_profile` third column:
    /// hits while another kprobe ran on the CPU, e.g. a softirq nested in a
    /// probe handler, and exhausted return-probe instances).
    pub fn missed(&self, tfs: &Tracefs) -> Result<u64, ProbeError> {
        let read = |name: &str| {
            let path = tfs.root().join(name);
            fs::read_to_string(&path).map_err(|e| ProbeError::io("read", &path, e))
        };
        for _ in 0..PROFILE_READ_ATTEMPTS {
            let events = read("kprobe_events")?;
            let profile = read("kprobe_profile")?;
            if let Some(m) = parse_profile_misses(&events, &profile, &self.group) {
                return Ok(m);
            }
        }
        Ok(0)
    }
}

/// Reads of `kprobe_events` and `kprobe_profile` tried before giving up
/// on a consistent pair.
pub const PROFILE_READ_ATTEMPTS: usize = 3;

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "probes left installed");
        }
    }
}

/// Sums the `nmissed` column of `kprobe_profile` for the probes of
/// `group`. The kernel lists probes there by event name only, in the order
/// of `kprobe_events`, so the two texts (read one after the other) are
/// paired line by line; `None` when they do not pair up (a probe was
/// added or removed between the reads: read again later).
pub fn parse_profile_misses(events: &str, profile: &str, group: &str) -> Option<u64> {
    let probes = parse_kprobe_events(events);
    let rows: Vec<(&str, u64)> = profile
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let missed = it.nth(1)?.parse::<u64>().ok()?;
            Some((name, missed))
        })
        .collect();
    if rows.len() != probes.len() {
        return None;
    }
    let mut sum = 0u64;
    for ((g, n), (name, missed)) in probes.iter().zip(&rows) {
        // Older kernels print the bare event name, some "group/name".
        let bare = name.rsplit('/').next().unwrap_or(name);
        if bare != n {
            return None;
        }
        if g == group {
            sum += missed;
        }
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_misses_only_count_our_group() {
        // As 5.10 and 7.2 print them: bare event names, kprobe_events order.
        // Two groups with the same event names and different figures in
        // every column: summing another group's misses, the hits column, or
        // pairing rows by name instead of by position gives another total.
        let events = "r256:sockscope_5/tcp_accept inet_csk_accept sk=$retval:x64\n\
                      r256:sockscope_6/tcp_accept inet_csk_accept sk=$retval:x64\n\
                      p:sockscope_5/ip_out ip_output sk=$arg2:x64\n\
                      p:kprobes/ip_out ip_output\n\
                      p:sockscope_6/ip_out ip_output sk=$arg2:x64\n";
        let profile = "  tcp_accept    100     7\n  tcp_accept   3   40\n  ip_out  10  2\n\
                       \x20 ip_out 20000 60000\n  ip_out 5 500\n";
        assert_eq!(
            parse_profile_misses(events, profile, "sockscope_5"),
            Some(9)
        );
        assert_eq!(
            parse_profile_misses(events, profile, "sockscope_6"),
            Some(540)
        );
        assert_eq!(
            parse_profile_misses(events, profile, "sockscope_7"),
            Some(0)
        );
        // Kernels that print "group/name" pair the same way.
        let qualified = "  sockscope_5/tcp_accept 100 7\n  sockscope_6/tcp_accept 3 40\n\
                         \x20 sockscope_5/ip_out 10 2\n  kprobes/ip_out 20000 60000\n\
                         \x20 sockscope_6/ip_out 5 500\n";
        assert_eq!(
            parse_profile_misses(events, qualified, "sockscope_6"),
            Some(540)
        );
        // A probe added between the two reads: no answer rather than a wrong one.
        assert_eq!(
            parse_profile_misses(events, "  tcp_accept 1 1\n", "sockscope_5"),
            None
        );
        let swapped = "  ip_out 10 2\n  tcp_accept 100 7\n  tcp_accept 3 40\n\
                       \x20 ip_out 20000 60000\n  ip_out 5 500\n";
        assert_eq!(parse_profile_misses(events, swapped, "sockscope_5"), None);
    }
}
