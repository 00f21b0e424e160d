//! Pipeline stage: probe.
//!
//! Finds tracefs, checks the kernel, reads struct offsets from BTF (or
//! guesses them at run time, [`guess`]), builds
//! the kprobe/tracepoint set for this kernel and installs it under a group
//! private to this process, removing it again on drop.

pub mod btf;
pub mod check;
pub mod error;
pub mod fetch;
pub mod group;
pub mod guess;
pub mod tracefs;

pub use btf::{Field, Offsets, Provenance};
pub use error::ProbeError;
pub use tracefs::Tracefs;
pub mod install;
pub mod spec;

pub use group::remove_stale_groups;
pub use install::{InstalledEvent, ProbeGuard};
pub use spec::{probe_set, resolve, Attach, ProbeSpec, ResolvedProbe};

pub use check::{check, setup, CheckItem, CheckStatus, Setup};
