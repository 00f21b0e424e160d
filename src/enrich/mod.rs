//! Pipeline stage: enrich.
