//! Pipeline stage: flow.
