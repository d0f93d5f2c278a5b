//! Block checksum slots (being written).
