//! sockscope: per-process TCP/UDP flow monitoring from kprobes installed
//! through tracefs, read from per-CPU perf rings, streamed over gRPC.
//!
//! The pipeline, one module per stage:
//! [`probe`] (tracefs, kprobe specs, offsets) → [`ring`] (perf mmap rings,
//! per-CPU merge, clock) → [`decode`] (tracefs formats, typed events) →
//! [`flow`] (socket/flow state machine, expiry) → [`enrich`] (process, user,
//! DNS, container) → [`export`] (gRPC service, ECS/JSON).
//! All syscalls, ioctls and mmaps go through [`sys`]. [`daemon`] wires the
//! stages together, [`cli`] is the command line, and every process exit code
//! is an [`exit::ExitCode`].

pub mod cli;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod enrich;
pub mod exit;
pub mod export;
pub mod flow;
pub mod headers;
pub mod model;
pub mod probe;
pub mod ring;
pub mod schema;
pub mod sys;
