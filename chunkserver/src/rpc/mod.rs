//! Chunk RPC server and client (being written).
