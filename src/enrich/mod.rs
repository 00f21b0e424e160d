//! Pipeline stage: enrich.
//!
//! Everything a flow record carries beyond its counters: the owning
//! process ([`process`]), user and group names ([`users`]), the container
//! and pod a process runs in ([`container`]) and the flow's Community ID
//! ([`community_id`]).

pub mod community_id;
pub mod container;
pub mod process;
pub mod users;
