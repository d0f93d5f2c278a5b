//! Data directory identity and lock (being written).
