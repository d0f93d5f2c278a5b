//! cairn-target: the NBD and iSCSI front end over the volume client.
//!
//! Not built yet: see issues 6 and 9 and ARCHITECTURE.md. This crate exists so
//! the workspace has the layout the design brief describes.
