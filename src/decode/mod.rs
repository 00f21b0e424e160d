//! Pipeline stage: decode.
