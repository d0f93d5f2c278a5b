//! Helpers shared by the process-level tests (being written).
