//! Fault injection for tests: `FAULT_SOCKSCOPE_PANIC_AFTER=<duration>` (e.g.
//! `3s`) makes the daemon panic that long after the gRPC server started
//! listening, in the engine thread or, with
//! `FAULT_SOCKSCOPE_PANIC_THREAD=main`, in the main thread.

use std::time::Duration;

use super::DaemonError;

/// Environment variable for fault injection in tests: the daemon panics
/// this long (humantime, e.g. `3s`) after the gRPC server started
/// listening. Not `SOCKSCOPE_…`: that
/// prefix belongs to configuration keys.
pub const FAULT_PANIC_AFTER_VAR: &str = "FAULT_SOCKSCOPE_PANIC_AFTER";
/// Environment variable choosing the thread that panics: `engine`
/// (default) or `main`.
pub const FAULT_PANIC_THREAD_VAR: &str = "FAULT_SOCKSCOPE_PANIC_THREAD";

/// The thread a fault-injection panic happens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultThread {
    /// The flow engine thread (the pipeline notices and shuts down).
    Engine,
    /// The main thread (unwinds through the server and the probe guard).
    Main,
}

/// Faults to inject, read from the environment (tests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Panic in this thread this long after the server started listening.
    pub panic: Option<(FaultThread, Duration)>,
}

impl FaultPlan {
    /// Parses the values of [`FAULT_PANIC_AFTER_VAR`] and
    /// [`FAULT_PANIC_THREAD_VAR`].
    pub fn parse(after: Option<&str>, thread: Option<&str>) -> Result<FaultPlan, DaemonError> {
        let Some(after) = after else {
            return Ok(FaultPlan::default());
        };
        let delay = humantime::parse_duration(after.trim()).map_err(|e| DaemonError::Fault {
            var: FAULT_PANIC_AFTER_VAR,
            what: format!("bad duration {after:?}: {e}"),
        })?;
        let thread = match thread.map(str::trim) {
            None | Some("") | Some("engine") => FaultThread::Engine,
            Some("main") => FaultThread::Main,
            Some(other) => {
                return Err(DaemonError::Fault {
                    var: FAULT_PANIC_THREAD_VAR,
                    what: format!("expected engine or main, got {other:?}"),
                })
            }
        };
        Ok(FaultPlan {
            panic: Some((thread, delay)),
        })
    }

    /// Reads the plan from the environment.
    pub fn from_env() -> Result<FaultPlan, DaemonError> {
        let after = std::env::var(FAULT_PANIC_AFTER_VAR).ok();
        let thread = std::env::var(FAULT_PANIC_THREAD_VAR).ok();
        FaultPlan::parse(after.as_deref(), thread.as_deref())
    }

    /// How long after the server started listening `thread` has to panic.
    pub(super) fn delay(&self, thread: FaultThread) -> Option<Duration> {
        match self.panic {
            Some((t, d)) if t == thread => Some(d),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCode;

    #[test]
    fn fault_plan_absent_means_no_fault() {
        assert_eq!(
            FaultPlan::parse(None, Some("main")).unwrap(),
            FaultPlan::default()
        );
    }

    #[test]
    fn fault_plan_parses_duration_and_thread() {
        let p = FaultPlan::parse(Some("3s"), None).unwrap();
        assert_eq!(p.panic, Some((FaultThread::Engine, Duration::from_secs(3))));
        let p = FaultPlan::parse(Some("250ms"), Some("main")).unwrap();
        assert_eq!(
            p.panic,
            Some((FaultThread::Main, Duration::from_millis(250)))
        );
        assert_eq!(p.delay(FaultThread::Engine), None);
        assert_eq!(p.delay(FaultThread::Main), Some(Duration::from_millis(250)));
    }

    #[test]
    fn fault_plan_rejects_garbage() {
        let e = FaultPlan::parse(Some("soon"), None).unwrap_err();
        assert_eq!(ExitCode::from(&e), ExitCode::Usage);
        assert!(e.to_string().contains(FAULT_PANIC_AFTER_VAR), "{e}");
        let e = FaultPlan::parse(Some("1s"), Some("reader")).unwrap_err();
        assert!(e.to_string().contains(FAULT_PANIC_THREAD_VAR), "{e}");
    }
}
