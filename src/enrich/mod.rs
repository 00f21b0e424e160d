//! Pipeline stage: enrich.
pub mod dns;
