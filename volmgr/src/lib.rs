//! cairn-volmgr: the raft-replicated cluster map and volume catalogue.
//!
//! Not built yet: see issue 4 and ARCHITECTURE.md. This crate exists so the
//! workspace has the layout the design brief describes.
