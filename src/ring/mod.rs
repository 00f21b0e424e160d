//! Pipeline stage: ring.
