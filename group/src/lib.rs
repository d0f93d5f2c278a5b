//! Cairn's replication group protocol, as a state machine without I/O.
//!
//! Inputs are messages, map updates, disk completions and clock ticks;
//! outputs are messages to send, disk operations to start, journal records to
//! append and claims to propose to the volume manager ([`node::Output`]).
//! The chunk server drives it with tokio and io_uring; the `cairn-sim` crate
//! drives the same code over a fake network and fake disks that drop, delay,
//! duplicate, reorder, crash and tear, and checks the invariants below after
//! every schedule (BRIEF.md, "Protocol cores without I/O").
//!
//! # The protocol
//!
//! **Groups and acting sets.** An extent belongs to a redundancy group
//! ([`map::GroupKey`]). The map gives every group a placement (where it
//! belongs) and an *acting set*: the replicas that hold every acknowledged
//! write, in placement order. The first acting replica, when up, is the
//! primary. The acting set changes only as [`authority`] allows, and every
//! change gives the group a new *interval* (the map epoch of the change).
//!
//! **Writes (Write-All-Read-One).** A client sends a write to the primary,
//! tagged with its map epoch; an epoch older than the group's interval is
//! refused with the current epoch. The primary gives the write the group's
//! next sequence number, takes a range lock on it (overlapping writes are
//! applied in sequence order everywhere), records it in its journal, writes
//! locally and forwards it to every other member at once, and acknowledges
//! only when all have written. Reads are served by the primary alone, under
//! the same range locks and only while it holds a lease from the volume
//! manager, so it never serves data a newer primary has overwritten.
//!
//! **Fencing.** Every message from a primary carries the group's interval;
//! a replica refuses an interval older than the newest it has seen for the
//! group. A new primary queries every acting replica before it accepts a
//! write (peering), and an acting set always keeps at least one replica of
//! the previous one, so once the new interval exists, no write of the old
//! one can complete: it would need that replica's ack.
//!
//! **The recent-write log.** Every replica journals, for each extent, the
//! sequence number of the last write it applied to it (`log`), and a
//! *committed watermark*: every write up to it was acknowledged by all, and
//! is applied here. An extent whose log entry is above the watermark is
//! *uncertain*: it may hold a write the others lack (the primary failed
//! before the write completed) or lack one they hold.
//!
//! **Peering and rejoin are one procedure.** To bring replica R up to date,
//! the primary takes R's report (committed watermark `W`, uncertain extents)
//! and pushes its own copy of every extent whose log entry is above `W` or
//! that R calls uncertain, deleting what it does not hold. Writes go on
//! meanwhile and are forwarded to R too; a push and a write to the same
//! extent are ordered by the range locks. At a new interval the primary does
//! this for every acting replica before serving (a short list: only writes
//! in flight at the change); a replica that comes back does it while the
//! group serves (the extents written while it was away), and the primary then
//! *claims* it into the acting set, which the volume manager grants only if
//! nothing changed meanwhile. A replica with an empty log gets a full copy
//! the same way. Because the log has one entry per extent, it always reaches
//! back; pruning it would add a full-copy fallback.
//!
//! **Pushing ranges, not extents.** Besides the log, each replica journals
//! its latest changes (`recent`, at most `RECENT_MAX` per group) with the
//! byte ranges they touched. Where both the primary's list and R's reach
//! back to `W`, a push carries only the ranges changed after `W` on either
//! side, widened to 4 KiB blocks; elsewhere the whole extent. Outside those
//! ranges the two copies are equal: both hold every write up to `W`, and
//! nothing after `W` touched them on either side. So a failover under load
//! pushes a few blocks per group, not a few whole extents.
//!
//! **Bad blocks: read repair, mends and scrubs.** A primary that cannot read
//! its own copy of a range (a checksum mismatch) fetches it from an acting
//! replica under the range lock, stores it and reads again. A replica that
//! cannot apply a write into a bad block gets the write again as the
//! primary's whole blocks around it. A scrub reads a range on the primary
//! and has every synced replica answer a digest of its own copy, under the
//! same lock; a copy that fails or differs gets the primary's pushed over it.
//!
//! **Restarts.** A chunk server that starts registers as a new incarnation,
//! which takes it out of every acting set where others remain; messages to
//! its old incarnation are refused. It then rejoins by the procedure above.
//!
//! # Invariants the simulator checks
//!
//! Every acknowledged write reads back; after healing, every replica of a
//! group holds the same bytes; at most one node acknowledges writes for a
//! group in one interval; a read returns what the last acknowledged write
//! (or one still in flight) left there; after a scrub of every extent, no
//! acting replica holds a bad block.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod authority;
pub mod locks;
pub mod map;
pub mod msg;
pub mod node;

pub use map::{Epoch, ExtentId, GroupKey, GroupMap, GroupView, NodeId, NodeView, Seq};
