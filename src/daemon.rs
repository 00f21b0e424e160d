//! Wiring of the pipeline stages into the running daemon.
//!
//! Placeholder until the pipeline is wired: both entry points report that
//! the daemon is not available yet.

use crate::cli::exit;
use crate::config::Config;

/// Runs the daemon until a termination signal; returns the exit code.
pub fn serve(cfg: Config) -> i32 {
    let _ = cfg;
    eprintln!("sockscope: serve: pipeline not wired yet");
    exit::UNAVAILABLE
}

/// Checks that the daemon could start (tracefs, probes, offsets); returns
/// the exit code.
pub fn check(cfg: &Config) -> i32 {
    let _ = cfg;
    eprintln!("sockscope: check: pipeline not wired yet");
    exit::UNAVAILABLE
}
