//! Wiring of the pipeline stages into the running daemon.
