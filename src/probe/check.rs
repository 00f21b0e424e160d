//! Start-up preparation and `sockscope check`.

use std::fmt;
use std::path::Path;

use crate::config::{OffsetsMode, SocketConfig};

use super::btf::{Offsets, VMLINUX_BTF};
use super::error::ProbeError;
use super::guess::{self, GuessReport};
use super::spec::{probe_set, probe_set_for, resolve, ResolvedProbe};
use super::tracefs::{self, Tracefs};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Requirement met.
    Ok,
    /// Not required, but a feature is off.
    Warn,
    /// Requirement not met.
    Fail,
}

/// One line of `sockscope check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// Outcome.
    pub status: CheckStatus,
    /// Detail: the resolved value or the error message.
    pub detail: String,
    /// Exit code of the error, 0 when fine.
    pub exit_code: i32,
}

impl CheckItem {
    fn from_result<T>(
        name: impl Into<String>,
        r: &Result<T, ProbeError>,
        ok: impl Fn(&T) -> String,
    ) -> Self {
        match r {
            Ok(v) => CheckItem {
                name: name.into(),
                status: CheckStatus::Ok,
                detail: ok(v),
                exit_code: 0,
            },
            Err(e) => CheckItem {
                name: name.into(),
                status: CheckStatus::Fail,
                detail: e.to_string(),
                exit_code: e.exit_code(),
            },
        }
    }
}

impl fmt::Display for CheckItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.status {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "FAIL",
        };
        write!(f, "[{s:>4}] {:<28} {}", self.name, self.detail)
    }
}

/// Everything needed to install the probes.
#[derive(Debug)]
pub struct Setup {
    /// The tracefs in use.
    pub tracefs: Tracefs,
    /// Struct offsets.
    pub offsets: Offsets,
    /// Probes with their functions resolved.
    pub probes: Vec<ResolvedProbe>,
    /// Whether IPv6 is monitored.
    pub ipv6: bool,
    /// Reports of the offset guesses (empty when offsets came from BTF).
    pub guesses: Vec<GuessReport>,
}

/// Decides whether IPv6 is monitored: `socket.enable_ipv6`, else whether
/// IPv6 is up on loopback.
pub fn ipv6_wanted(cfg: &SocketConfig) -> Result<bool, ProbeError> {
    let lo = tracefs::ipv6_on_loopback();
    match cfg.enable_ipv6 {
        Some(true) if lo != Some(true) => Err(ProbeError::Ipv6Disabled {
            path: tracefs::LO_DISABLE_IPV6.into(),
        }),
        Some(v) => Ok(v),
        None => Ok(lo == Some(true)),
    }
}

/// Offsets and, when they were guessed, the report of every guess.
#[derive(Debug)]
pub struct LoadedOffsets {
    /// The offsets, or why none could be obtained.
    pub offsets: Result<Offsets, ProbeError>,
    /// One report per guess (empty when BTF was used).
    pub guesses: Vec<GuessReport>,
}

/// Loads offsets as `socket.offsets` says: `btf` reads [`VMLINUX_BTF`],
/// `guess` always guesses, `auto` uses BTF when it can be read and parsed
/// and guesses otherwise (the reason is kept in the provenance).
pub fn load_offsets(cfg: &SocketConfig, tfs: &Tracefs) -> LoadedOffsets {
    load_offsets_from(cfg, tfs, Path::new(VMLINUX_BTF))
}

/// [`load_offsets`] with another BTF file.
pub fn load_offsets_from(cfg: &SocketConfig, tfs: &Tracefs, btf: &Path) -> LoadedOffsets {
    let guess = |why: &str| {
        let lo_v6 = tracefs::ipv6_on_loopback() == Some(true);
        let g = guess::guess_offsets(tfs, cfg, lo_v6, why);
        LoadedOffsets {
            offsets: g.offsets,
            guesses: g.reports,
        }
    };
    match cfg.offsets {
        OffsetsMode::Btf => LoadedOffsets {
            offsets: Offsets::from_btf(btf),
            guesses: Vec::new(),
        },
        OffsetsMode::Guess => guess("socket.offsets=guess"),
        OffsetsMode::Auto => match Offsets::from_btf(btf) {
            Ok(o) => LoadedOffsets {
                offsets: Ok(o),
                guesses: Vec::new(),
            },
            Err(e) => {
                tracing::info!(error = %e, "no usable BTF, guessing struct offsets");
                guess(&format!("socket.offsets=auto and BTF unusable: {e}"))
            }
        },
    }
}

/// Runs every start-up requirement in order and returns what is needed to
/// install the probes; the first failure is returned.
pub fn setup(cfg: &SocketConfig) -> Result<Setup, ProbeError> {
    let tracefs = Tracefs::open(cfg)?;
    tracefs::check_sys_admin()?;
    tracefs.check_kprobes()?;
    let ipv6 = ipv6_wanted(cfg)?;
    let loaded = load_offsets(cfg, &tracefs);
    let guesses = loaded.guesses;
    let offsets = loaded.offsets?;
    let available = tracefs.available_functions()?;
    let probes = resolve(
        probe_set_for(&offsets, cfg.accounting)?,
        &available,
        ipv6,
        &tracefs.root().join("available_filter_functions"),
    )?;
    Ok(Setup {
        tracefs,
        offsets,
        probes,
        ipv6,
        guesses,
    })
}

/// One item per requirement, for `sockscope check`. Never stops early.
pub fn check(cfg: &SocketConfig) -> Vec<CheckItem> {
    let mut items = Vec::new();
    let tfs = Tracefs::open(cfg);
    items.push(CheckItem::from_result("tracefs", &tfs, |t| {
        format!(
            "{}{}",
            t.root().display(),
            if t.mounted_by_us() {
                " (mounted for this check)"
            } else {
                ""
            }
        )
    }));
    if let Ok(t) = &tfs {
        items.push(CheckItem::from_result(
            "kprobe events",
            &t.check_kprobes(),
            |_| format!("{} writable, kprobes enabled", t.kprobe_events().display()),
        ));
    }
    items.push(CheckItem::from_result(
        "CAP_SYS_ADMIN",
        &tracefs::check_sys_admin(),
        |_| "effective".into(),
    ));
    items.push(match tracefs::has_capability(tracefs::CAP_NET_ADMIN) {
        Ok(true) => CheckItem {
            name: "CAP_NET_ADMIN".into(),
            status: CheckStatus::Ok,
            detail: "effective".into(),
            exit_code: 0,
        },
        other => CheckItem {
            name: "CAP_NET_ADMIN".into(),
            status: CheckStatus::Warn,
            detail: format!("not effective ({other:?}): DNS enrichment needs it"),
            exit_code: 0,
        },
    });
    let ipv6 = ipv6_wanted(cfg);
    items.push(CheckItem::from_result("IPv6 on lo", &ipv6, |v| {
        if *v {
            "monitored".into()
        } else {
            "not monitored".into()
        }
    }));
    let offsets = match &tfs {
        Ok(t) => {
            let loaded = load_offsets(cfg, t);
            for g in &loaded.guesses {
                items.push(CheckItem {
                    name: format!("guess {}", g.name),
                    status: if g.result.is_ok() {
                        CheckStatus::Ok
                    } else {
                        CheckStatus::Fail
                    },
                    detail: g.to_string(),
                    exit_code: 0,
                });
            }
            loaded.offsets
        }
        Err(_) if cfg.offsets != OffsetsMode::Guess => Offsets::from_btf(Path::new(VMLINUX_BTF)),
        Err(_) => Err(ProbeError::Guess {
            guess: "setup".into(),
            reason: "guessing needs tracefs".into(),
        }),
    };
    items.push(CheckItem::from_result("offsets", &offsets, |o| {
        o.to_string()
    }));
    if let (Ok(t), Ok(o)) = (&tfs, &offsets) {
        let path = t.root().join("available_filter_functions");
        match t.available_functions() {
            Ok(avail) => {
                let set = match probe_set_for(o, cfg.accounting) {
                    Ok(set) => set,
                    Err(e) => {
                        items.push(CheckItem::from_result::<()>(
                            "socket.accounting",
                            &Err(e),
                            |_| String::new(),
                        ));
                        probe_set(o)
                    }
                };
                for spec in set {
                    if spec.ipv6_only && !matches!(ipv6, Ok(true)) {
                        continue;
                    }
                    let name = format!("probe {}", spec.name);
                    let r = resolve(vec![spec], &avail, true, &path);
                    items.push(CheckItem::from_result(name, &r, |v| {
                        v.first()
                            .and_then(|p| p.function)
                            .map_or_else(|| "tracepoint".to_string(), str::to_string)
                    }));
                }
            }
            Err(e) => items.push(CheckItem::from_result::<()>(
                "kernel functions",
                &Err(e),
                |_| String::new(),
            )),
        }
    }
    items
}
