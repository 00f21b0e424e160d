//! Struct offsets without BTF: discovering them at run time.
//!
//! Each guess installs temporary kprobes (group `sockscope_<pid>_guess`,
//! enabled only in the private ftrace instance of the same name) whose
//! fetch arguments dump raw kernel memory — the first words of a `struct
//! sock`, an `sk_buff` and the memory its pointers point at, a `cred`, a
//! `msghdr` — then triggers known operations on loopback with random
//! addresses, ports, lengths and ids, finds the known values in the dumps
//! and intersects the candidate offsets over repetitions with fresh random
//! values until one offset per field remains. Guesses run in dependency
//! order (later ones use earlier results); each is bounded by
//! `socket.guess_timeout` and reported as a [`GuessReport`].
//!
//! All guessing happens before the flow pipeline starts, only on `lo`
//! (127.0.0.0/8 and random ULA addresses added to `lo` and removed again),
//! so it neither disturbs real traffic nor shows up as flows. The probes
//! are removed after each guess, also on failure or panic.

mod defs;
pub mod net;
pub mod search;
pub mod session;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::SocketConfig;

use super::btf::{Field, Offsets, Provenance};
use super::error::ProbeError;
use super::tracefs::Tracefs;

use search::{Intersection, Resolution};
use session::{GuessRecord, Instance, Probes};

/// Repetitions every guess runs at least (fresh random values each).
pub const MIN_REPETITIONS: u32 = 3;
/// Repetitions after which a still ambiguous guess fails.
pub const MAX_REPETITIONS: u32 = 12;
/// How long one trigger may take to produce its records.
const RECORD_WAIT: Duration = Duration::from_millis(1500);
/// Pause between drains while waiting for records.
const RECORD_POLL: Duration = Duration::from_millis(2);

/// Why a guess failed.
#[derive(Debug, thiserror::Error)]
pub enum GuessError {
    /// Installing or removing the probes failed.
    #[error(transparent)]
    Probe(Box<ProbeError>),
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] crate::sys::SysError),
    /// A tracefs file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A guess probe's `format` file could not be parsed.
    #[error("format of guess probe {event}: {reason}")]
    Format {
        /// Event name.
        event: String,
        /// Parser message.
        reason: String,
    },
    /// None of a guess probe's functions exists in this kernel.
    #[error("guess probe {probe}: none of the kernel functions {alternatives:?} is available")]
    NoFunction {
        /// The probe.
        probe: &'static str,
        /// Names tried.
        alternatives: Vec<&'static str>,
    },
    /// A trigger produced no matching record in time.
    #[error("guess {guess}: no record for {what} within {waited:?}")]
    NoRecord {
        /// The guess.
        guess: &'static str,
        /// What was triggered.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// A guess needs the result of an earlier one that failed.
    #[error("guess {guess} needs {field}, which was not guessed")]
    Dependency {
        /// The guess.
        guess: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// Intersection left no candidate: the value is not where it is looked for.
    #[error(
        "guess {guess}: no offset of {field} is consistent with all {repetitions} repetitions"
    )]
    NoCandidate {
        /// The guess.
        guess: &'static str,
        /// The field.
        field: &'static str,
        /// Repetitions run.
        repetitions: u32,
    },
    /// Several offsets stayed consistent.
    #[error(
        "guess {guess}: {field} still ambiguous after {repetitions} repetitions: {candidates:?}"
    )]
    Ambiguous {
        /// The guess.
        guess: &'static str,
        /// The field.
        field: &'static str,
        /// Offsets left.
        candidates: Vec<u32>,
        /// Repetitions run.
        repetitions: u32,
    },
    /// The guess did not finish within `socket.guess_timeout`.
    #[error(
        "guess {guess} exceeded socket.guess_timeout ({timeout:?}) after {repetitions} repetitions"
    )]
    Timeout {
        /// The guess.
        guess: &'static str,
        /// The configured timeout.
        timeout: Duration,
        /// Repetitions completed.
        repetitions: u32,
    },
}

impl From<ProbeError> for GuessError {
    fn from(e: ProbeError) -> Self {
        GuessError::Probe(Box::new(e))
    }
}

/// Result of one guess, for `sockscope check` and the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuessReport {
    /// Guess name (`sock_addresses`, `sk_buff`, …).
    pub name: &'static str,
    /// The offsets found (empty on failure).
    pub fields: Vec<(&'static str, Field)>,
    /// `Err(message)` when the guess failed.
    pub result: Result<(), String>,
    /// Wall time taken.
    pub duration: Duration,
    /// Repetitions run.
    pub repetitions: u32,
    /// Remarks: triggers skipped, ties broken by layout knowledge.
    pub notes: Vec<String>,
}

impl fmt::Display for GuessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(()) => {
                let list: Vec<String> = self
                    .fields
                    .iter()
                    .map(|(n, fl)| match fl.bits {
                        Some((b, w)) => format!("{n}={}:{b}+{w}", fl.offset),
                        None => format!("{n}={}", fl.offset),
                    })
                    .collect();
                write!(
                    f,
                    "{} in {:.1} ms, {} repetitions",
                    list.join(" "),
                    self.duration.as_secs_f64() * 1e3,
                    self.repetitions
                )?;
                for n in &self.notes {
                    write!(f, "; {n}")?;
                }
                Ok(())
            }
            Err(e) => write!(
                f,
                "FAILED after {:.1} ms, {} repetitions: {e}",
                self.duration.as_secs_f64() * 1e3,
                self.repetitions
            ),
        }
    }
}

/// Outcome of [`guess_offsets`]: the reports of every guess that ran and
/// the offsets, or the first failure.
#[derive(Debug)]
pub struct Guessed {
    /// One report per guess, in run order.
    pub reports: Vec<GuessReport>,
    /// All offsets, or why not.
    pub offsets: Result<Offsets, ProbeError>,
}

/// Results known so far, by field name.
pub(crate) type Known = BTreeMap<&'static str, Field>;

pub(crate) fn need(
    known: &Known,
    guess: &'static str,
    field: &'static str,
) -> Result<Field, GuessError> {
    known
        .get(field)
        .copied()
        .ok_or(GuessError::Dependency { guess, field })
}

/// What one repetition of a guess sees and does.
pub(crate) struct Ctx<'a, 'i> {
    pub guess: &'static str,
    pub probes: &'a Probes<'i>,
    pub pool: &'a mut net::V6Pool,
    pub known: &'a Known,
    /// Thread id of the guessing thread (process-context probes fire in it).
    pub tid: u32,
    pub deadline: Instant,
    pub timeout: Duration,
    pub rep: u32,
    pub notes: &'a mut Vec<String>,
}

impl Ctx<'_, '_> {
    /// Adds a remark to the guess's report (once).
    pub fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    /// Drains records until one satisfies `want` (or the wait/guess time is
    /// up) and returns every drained record that satisfies it.
    pub fn collect(
        &self,
        what: &'static str,
        want: impl Fn(&GuessRecord) -> bool,
    ) -> Result<Vec<GuessRecord>, GuessError> {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            got.extend(self.probes.records()?.into_iter().filter(|r| want(r)));
            if !got.is_empty() {
                // Pick up records of the same trigger still on other CPUs.
                got.extend(self.probes.records()?.into_iter().filter(|r| want(r)));
                return Ok(got);
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(GuessError::Timeout {
                    guess: self.guess,
                    timeout: self.timeout,
                    repetitions: self.rep,
                });
            }
            if now.duration_since(start) >= RECORD_WAIT {
                return Err(GuessError::NoRecord {
                    guess: self.guess,
                    what,
                    waited: RECORD_WAIT,
                });
            }
            std::thread::sleep(RECORD_POLL);
        }
    }

    /// Bytes of field `name` of `rec` (empty when absent).
    pub fn field<'r>(&self, rec: &'r GuessRecord, name: &str) -> &'r [u8] {
        self.probes.field(rec, name).unwrap_or_default()
    }
}

/// Runs every guess in dependency order. `ipv6_on_lo` selects random ULA
/// addresses on `lo` (true) or IPv4-mapped addresses (false) for the IPv6
/// guesses; `why` says why guessing was chosen (kept in the provenance).
pub fn guess_offsets(tfs: &Tracefs, cfg: &SocketConfig, ipv6_on_lo: bool, why: &str) -> Guessed {
    let mut reports = Vec::new();
    let offsets = run_all(tfs, cfg, ipv6_on_lo, why, &mut reports);
    Guessed { reports, offsets }
}

fn run_all(
    tfs: &Tracefs,
    cfg: &SocketConfig,
    ipv6_on_lo: bool,
    why: &str,
    reports: &mut Vec<GuessReport>,
) -> Result<Offsets, ProbeError> {
    let wrap = |e: GuessError| ProbeError::Guess {
        guess: "setup".into(),
        reason: e.to_string(),
    };
    super::group::remove_stale_instances(tfs);
    let available = tfs.available_functions()?;
    let inst = Instance::create(tfs, &super::group::guess_group_name()).map_err(wrap)?;
    let mode = if ipv6_on_lo {
        net::V6Mode::Ula
    } else {
        net::V6Mode::Mapped
    };
    let mut pool = net::V6Pool::new(mode).map_err(wrap)?;
    let setup = GuessSetup {
        tfs,
        inst: &inst,
        available: &available,
        tid: crate::sys::current_tid(),
        timeout: cfg.guess_timeout,
    };
    let mut known = Known::new();
    let mut first_err: Option<ProbeError> = None;
    for def in defs::DEFS {
        let start = Instant::now();
        let mut reps = 0;
        let mut notes = Vec::new();
        let r = run_one(def, &setup, &mut pool, &known, (&mut reps, &mut notes));
        let duration = start.elapsed();
        match r {
            Ok(fields) => {
                known.extend(fields.iter().copied());
                reports.push(GuessReport {
                    name: def.name,
                    fields,
                    result: Ok(()),
                    duration,
                    repetitions: reps,
                    notes,
                });
            }
            Err(e) => {
                tracing::warn!(guess = def.name, error = %e, "offset guess failed");
                reports.push(GuessReport {
                    name: def.name,
                    fields: Vec::new(),
                    result: Err(e.to_string()),
                    duration,
                    repetitions: reps,
                    notes,
                });
                first_err.get_or_insert(ProbeError::Guess {
                    guess: def.name.into(),
                    reason: e.to_string(),
                });
            }
        }
    }
    drop(pool);
    drop(inst);
    if let Some(e) = first_err {
        return Err(e);
    }
    defs::offsets_from(
        &known,
        Provenance::Guess {
            why: why.to_string(),
        },
    )
    .map_err(wrap)
}

/// What every guess of one run shares.
struct GuessSetup<'a> {
    /// The tracefs mount.
    tfs: &'a Tracefs,
    /// The private ftrace instance the guess probes are enabled in.
    inst: &'a Instance,
    /// The kernel functions that can be probed.
    available: &'a std::collections::HashSet<String>,
    /// The thread that triggers the operations.
    tid: u32,
    /// How long one guess may take.
    timeout: Duration,
}

fn run_one(
    def: &defs::Def,
    setup: &GuessSetup<'_>,
    pool: &mut net::V6Pool,
    known: &Known,
    (reps, notes): (&mut u32, &mut Vec<String>),
) -> Result<Vec<(&'static str, Field)>, GuessError> {
    let &GuessSetup {
        tfs,
        inst,
        available,
        tid,
        timeout,
    } = setup;
    let Some(probes_fn) = def.probes_fn else {
        return def.finish(&Intersection::default(), known);
    };
    let start = Instant::now();
    let deadline = start + timeout;
    let specs = probes_fn(known)?;
    let probes = Probes::install(tfs, inst, &specs, available)?;
    // Records of earlier guesses or of the install itself are discarded.
    let _ = probes.records()?;
    let mut x = Intersection::default();
    loop {
        if Instant::now() >= deadline {
            return Err(GuessError::Timeout {
                guess: def.name,
                timeout,
                repetitions: *reps,
            });
        }
        let mut ctx = Ctx {
            guess: def.name,
            probes: &probes,
            pool,
            known,
            tid,
            deadline,
            timeout,
            rep: *reps,
            notes,
        };
        (def.rep)(&mut ctx, &mut x)?;
        *reps += 1;
        let names: Vec<&'static str> = def.fields.iter().map(|f| f.0).collect();
        if let Some(field) = x.first_empty(&names) {
            return Err(GuessError::NoCandidate {
                guess: def.name,
                field,
                repetitions: *reps,
            });
        }
        if *reps >= def.min_reps.max(1) && x.all_unique(&names) {
            break;
        }
        if *reps >= MAX_REPETITIONS {
            let (field, candidates) = names
                .iter()
                .find_map(|f| match x.resolution(f) {
                    Resolution::Ambiguous(c) => Some((*f, c)),
                    Resolution::Unseen => Some((*f, Vec::new())),
                    _ => None,
                })
                .unwrap_or(("?", Vec::new()));
            return Err(GuessError::Ambiguous {
                guess: def.name,
                field,
                candidates,
                repetitions: *reps,
            });
        }
    }
    drop(probes);
    def.finish(&x, known)
}
