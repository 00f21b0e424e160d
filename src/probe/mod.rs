//! Pipeline stage: probe.
