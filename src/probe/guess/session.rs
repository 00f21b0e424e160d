//! Temporary probes and a private ftrace instance to read their records.
//!
//! Guess probes live in the kprobe group `sockscope_<pid>_guess` (so the
//! stale-group cleanup removes them when the process died) and are enabled
//! only inside the ftrace instance `instances/sockscope_<pid>_guess`, whose
//! per-CPU `trace_pipe_raw` pages are split with
//! [`crate::decode::ftrace::page_records`]. Nothing is written to the
//! global trace buffer. [`Probes`] disables its events and removes its
//! kprobes on drop; [`Instance`] removes the instance directory on drop.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::decode::format::Format;
use crate::decode::ftrace::page_records;
use crate::probe::group::guess_group_name;
use crate::probe::install::ProbeGuard;
use crate::probe::spec::{Attach, ProbeSpec, ResolvedProbe};
use crate::probe::tracefs::Tracefs;
use crate::schema::DecoderKind;

use super::GuessError;

/// Suffix of the guess group and instance names.
/// Bytes of the common event header (type, flags, preempt count, pid).
const COMMON_HEADER_LEN: usize = 8;
/// Offset of `common_pid` in a record.
const COMMON_PID_AT: usize = 4;
/// Per-CPU buffer of the private instance, in KiB.
const INSTANCE_BUFFER_KB: u32 = 1024;
/// Most pages read from one CPU per drain (bounds a drain on a busy host).
const MAX_PAGES_PER_DRAIN: usize = 4096;

fn io(op: &'static str, path: &Path, e: std::io::Error) -> GuessError {
    GuessError::Io {
        op,
        path: path.to_path_buf(),
        source: e,
    }
}

fn write_file(path: &Path, v: &str) -> Result<(), GuessError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io("open", path, e))?;
    f.write_all(v.as_bytes()).map_err(|e| io("write", path, e))
}

/// A private ftrace instance; removed on drop.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
}

impl Instance {
    /// Creates `instances/<name>` (replacing a leftover of a dead process
    /// with our pid).
    pub fn create(tfs: &Tracefs, name: &str) -> Result<Instance, GuessError> {
        let dir = tfs.root().join("instances").join(name);
        if dir.exists() {
            fs::remove_dir(&dir).map_err(|e| io("rmdir", &dir, e))?;
        }
        fs::create_dir(&dir).map_err(|e| io("mkdir", &dir, e))?;
        let inst = Instance { dir };
        // Best effort: a smaller buffer is cheaper; the default works too.
        let _ = write_file(
            &inst.dir.join("buffer_size_kb"),
            &INSTANCE_BUFFER_KB.to_string(),
        );
        Ok(inst)
    }

    fn event_file(&self, system: &str, name: &str, file: &str) -> PathBuf {
        self.dir.join("events").join(system).join(name).join(file)
    }

    /// Enables or disables one event in this instance.
    pub fn enable(&self, system: &str, name: &str, on: bool) -> Result<(), GuessError> {
        write_file(
            &self.event_file(system, name, "enable"),
            if on { "1" } else { "0" },
        )
    }

    /// Reads and consumes every record in the instance's buffers.
    pub fn drain(&self) -> Result<Vec<Vec<u8>>, GuessError> {
        let per_cpu = self.dir.join("per_cpu");
        let rd = fs::read_dir(&per_cpu).map_err(|e| io("read_dir", &per_cpu, e))?;
        let page = crate::sys::page_size();
        let mut out = Vec::new();
        for e in rd.flatten() {
            let path = e.path().join("trace_pipe_raw");
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| io("open", &path, e))?;
            let mut buf = vec![0u8; page];
            for _ in 0..MAX_PAGES_PER_DRAIN {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend(
                        page_records(buf.get(..n).unwrap_or_default())
                            .into_iter()
                            .map(<[u8]>::to_vec),
                    ),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io("read", &path, e)),
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "cannot remove ftrace instance");
        }
    }
}

/// One temporary probe: a name, the functions to try and its fetch args.
#[derive(Debug, Clone)]
pub struct GuessProbe {
    /// Event name inside the guess group.
    pub name: &'static str,
    /// Candidate kernel functions (first available wins).
    pub functions: &'static [&'static str],
    /// kprobe fetch arguments.
    pub fetchargs: String,
}

/// A record of one of our probes.
#[derive(Debug, Clone)]
pub struct GuessRecord {
    /// Index of the probe in the list given to [`Probes::install`].
    pub probe: usize,
    /// `common_pid`: the task the probe fired in.
    pub pid: u32,
    /// The raw record (common header first).
    pub data: Vec<u8>,
}

/// Installed and enabled guess probes; disabled and removed on drop.
#[derive(Debug)]
pub struct Probes<'i> {
    inst: &'i Instance,
    guard: Option<ProbeGuard>,
    /// (event id, group, name, format) per probe.
    events: Vec<(u16, String, String, Format)>,
}

impl<'i> Probes<'i> {
    /// Installs `probes` in the guess group and enables them in `inst`.
    pub fn install(
        tfs: &Tracefs,
        inst: &'i Instance,
        probes: &[GuessProbe],
        available: &std::collections::HashSet<String>,
    ) -> Result<Probes<'i>, GuessError> {
        let mut resolved = Vec::with_capacity(probes.len());
        for p in probes {
            let function = p
                .functions
                .iter()
                .copied()
                .find(|f| available.contains(*f))
                .ok_or_else(|| GuessError::NoFunction {
                    probe: p.name,
                    alternatives: p.functions.to_vec(),
                })?;
            resolved.push(ResolvedProbe {
                spec: ProbeSpec {
                    name: p.name,
                    attach: Attach::Kprobe(p.functions),
                    fetchargs: p.fetchargs.clone(),
                    task_context: true,
                    // Guess records are read by the guesser, never by the
                    // decoder; the kind is only carried along.
                    decoder: DecoderKind::SockCreate,
                    filter: None,
                    ipv6_only: false,
                },
                function: Some(function),
            });
        }
        let guard = ProbeGuard::install_in_group(tfs, &resolved, &guess_group_name())?;
        let mut me = Probes {
            inst,
            guard: Some(guard),
            events: Vec::new(),
        };
        let evs: Vec<_> = me
            .guard
            .as_ref()
            .map(|g| g.events().to_vec())
            .unwrap_or_default();
        for e in evs {
            let fmt = Format::parse(&e.format).map_err(|err| GuessError::Format {
                event: e.name.clone(),
                reason: err.to_string(),
            })?;
            let id = u16::try_from(e.id).map_err(|_| GuessError::Format {
                event: e.name.clone(),
                reason: format!("event id {} does not fit the record type field", e.id),
            })?;
            me.events.push((id, e.system.clone(), e.name.clone(), fmt));
            inst.enable(&e.system, &e.name, true)?;
        }
        Ok(me)
    }

    /// Drains the instance and returns our records.
    pub fn records(&self) -> Result<Vec<GuessRecord>, GuessError> {
        let raw = self.inst.drain()?;
        Ok(raw
            .into_iter()
            .filter_map(|data| {
                let ty = super::search::u16_at(&data, 0)?;
                let pid = super::search::u32_at(&data, COMMON_PID_AT)?;
                let probe = self.events.iter().position(|e| e.0 == ty)?;
                (data.len() >= COMMON_HEADER_LEN).then_some(GuessRecord { probe, pid, data })
            })
            .collect())
    }

    /// The bytes of field `name` in a record of probe `rec.probe`.
    pub fn field<'r>(&self, rec: &'r GuessRecord, name: &str) -> Option<&'r [u8]> {
        let f = self.events.get(rec.probe)?.3.field(name)?;
        let start = f.offset as usize;
        rec.data.get(start..start.checked_add(f.size as usize)?)
    }
}

impl Drop for Probes<'_> {
    fn drop(&mut self) {
        for (_, system, name, _) in &self.events {
            if let Err(e) = self.inst.enable(system, name, false) {
                tracing::warn!(error = %e, "cannot disable guess probe");
            }
        }
        drop(self.guard.take());
    }
}
