//! Pipeline stage: export.
