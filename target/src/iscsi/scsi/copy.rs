//! EXTENDED COPY (LID1, SPC-4 6.4) and RECEIVE COPY RESULTS (SPC-4 6.18):
//! the copy offload VMware calls XCOPY (full copy, cloning).
//!
//! The copy manager is the logical unit itself, and the only copy target
//! it reaches is itself: identification descriptor target descriptors
//! (E4h) naming its NAA designator from VPD 83h. Any other is not
//! reachable, which a segment using it is aborted for. Segments are block
//! to block (02h); each is read and then written through the backend (at
//! most 65535 blocks, under 32 MiB: one call each way), so overlapping
//! source and destination copy as if through a buffer.
//!
//! The whole parameter list is checked before anything is copied.
//! Results of a list with LIST ID USAGE 00b are held for RECEIVE COPY
//! RESULTS (COPY STATUS), per I_T nexus and list identifier.

use std::collections::VecDeque;

use bytes::Bytes;

use super::cdb::{self, Cdb};
use super::pr::PrStore;
use super::sense;
use super::{key_of, Fail, Lun, Nexus, Reply, Request, Res, BLOCK};
use crate::backend::Backend;

/// MAXIMUM TARGET DESCRIPTOR COUNT.
pub const MAX_TARGET_DESCRIPTORS: usize = 4;
/// MAXIMUM SEGMENT DESCRIPTOR COUNT.
pub const MAX_SEGMENT_DESCRIPTORS: usize = 16;
/// MAXIMUM DESCRIPTOR LIST LENGTH (target and segment descriptors).
pub const MAX_DESCRIPTOR_LIST_LEN: usize = 1024;
/// MAXIMUM SEGMENT LENGTH in bytes: a block to block segment's count is
/// 16 bits of blocks, so this bounds none of them.
pub const MAX_SEGMENT_BYTES: u32 = 32 << 20;
/// Copy results held at most (the oldest are dropped).
const MAX_HELD: usize = 64;

const HEADER: usize = 16;
const TARGET_DESCRIPTOR_LEN: usize = 32;
/// Identification descriptor target descriptor.
const IDENTIFICATION_DESCRIPTOR: u8 = 0xe4;
/// Block device to block device segment descriptor.
const BLOCK_TO_BLOCK: u8 = 0x02;
const BLOCK_TO_BLOCK_LEN: usize = 28;

/// COPY MANAGER STATUS values.
const IN_PROGRESS: u8 = 0x00;
const COMPLETED: u8 = 0x01;
const COMPLETED_WITH_ERROR: u8 = 0x02;

/// The results of one held copy.
#[derive(Debug, Clone, Copy)]
struct Status {
    state: u8,
    segments: u16,
    bytes: u64,
}

/// Copy results held for RECEIVE COPY RESULTS, by I_T nexus and list
/// identifier.
#[derive(Default)]
pub struct Held(VecDeque<((String, String), u8, Status)>);

impl Held {
    fn find(&mut self, nexus: &(String, String), id: u8) -> Option<&mut Status> {
        self.0
            .iter_mut()
            .find(|(n, i, _)| n == nexus && *i == id)
            .map(|(_, _, s)| s)
    }

    fn put(&mut self, nexus: (String, String), id: u8, s: Status) {
        if let Some(held) = self.find(&nexus, id) {
            *held = s;
            return;
        }
        if self.0.len() >= MAX_HELD {
            self.0.pop_front();
        }
        self.0.push_back((nexus, id, s));
    }

    fn take(&mut self, nexus: &(String, String), id: u8) -> Option<Status> {
        let at = self.0.iter().position(|(n, i, _)| n == nexus && *i == id)?;
        let s = self.0[at].2;
        if s.state != IN_PROGRESS {
            self.0.remove(at);
        }
        Some(s)
    }
}

/// A target descriptor: this logical unit, or one it cannot reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Here,
    Unreachable,
}

/// A block to block segment.
#[derive(Debug, Clone, Copy)]
struct Segment {
    source: usize,
    destination: usize,
    blocks: u64,
    source_lba: u64,
    destination_lba: u64,
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |v, &x| (v << 8) | x as u64)
}

impl<B: Backend, S: PrStore> Lun<B, S> {
    /// Which target descriptor `d` (32 bytes, at `at` in the list) names.
    fn target(&self, d: &[u8], at: usize) -> Res<Target> {
        if d[0] != IDENTIFICATION_DESCRIPTOR {
            return Err(sense::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE.into());
        }
        // LU ID TYPE and NUL are ignored (SPC-4); a block device only.
        if d[1] & 0x1f != 0 {
            return Err(Fail::list_field(at + 1));
        }
        let (code_set, kind, len) = (d[4] & 0x0f, d[5] & 0x3f, d[7] as usize);
        let id = d.get(8..8 + len).ok_or(Fail::list_field(at + 7))?;
        if len > 20 {
            return Err(Fail::list_field(at + 7));
        }
        // NAA (binary, associated with the logical unit).
        if code_set != 0x01 || kind != 0x03 || id != self.ids.naa {
            return Ok(Target::Unreachable);
        }
        if be(&d[29..32]) != BLOCK {
            return Err(Fail::list_field(at + 29));
        }
        Ok(Target::Here)
    }

    /// EXTENDED COPY (LID1).
    pub(super) async fn extended_copy(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        let len = c.u32(10) as usize;
        if len == 0 {
            return Ok(Reply::good());
        }
        let list = req
            .data_out
            .get(..len)
            .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        if list.len() < HEADER {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let id = list[0];
        let usage = (list[1] >> 3) & 0x03;
        let targets_len = be(&list[2..4]) as usize;
        let segments_len = be(&list[8..12]) as usize;
        let inline_len = be(&list[12..16]) as usize;
        if HEADER + targets_len + segments_len + inline_len > list.len() {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if targets_len + segments_len > MAX_DESCRIPTOR_LIST_LEN {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if inline_len != 0 {
            return Err(sense::INLINE_DATA_LENGTH_EXCEEDED.into());
        }
        // 01b is reserved; 11b (no list identifier) wants it zero.
        if usage == 0b01 || (usage == 0b11 && id != 0) {
            return Err(Fail::list_field(1));
        }
        if !targets_len.is_multiple_of(TARGET_DESCRIPTOR_LEN) {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if targets_len / TARGET_DESCRIPTOR_LEN > MAX_TARGET_DESCRIPTORS {
            return Err(sense::TOO_MANY_TARGET_DESCRIPTORS.into());
        }
        let mut targets = Vec::new();
        for (i, d) in list[HEADER..HEADER + targets_len]
            .chunks_exact(TARGET_DESCRIPTOR_LEN)
            .enumerate()
        {
            targets.push(self.target(d, HEADER + i * TARGET_DESCRIPTOR_LEN)?);
        }
        let segments = self.segments(list, HEADER + targets_len, segments_len)?;
        self.check_writable()?;

        let nexus = key_of(req.nexus);
        let held = usage == 0b00;
        if held {
            let mut h = self.copies();
            if h.find(&nexus, id).is_some_and(|s| s.state == IN_PROGRESS) {
                return Err(sense::OPERATION_IN_PROGRESS.into());
            }
            let s = Status {
                state: IN_PROGRESS,
                segments: 0,
                bytes: 0,
            };
            h.put(nexus.clone(), id, s);
        }
        let mut done = Status {
            state: COMPLETED,
            segments: 0,
            bytes: 0,
        };
        let result = self.copy_segments(&targets, &segments, &mut done).await;
        if result.is_err() {
            done.state = COMPLETED_WITH_ERROR;
        }
        if held {
            self.copies().put(nexus, id, done);
        }
        result.map(|()| Reply::good())
    }

    /// The segment descriptors of `list` (`len` bytes from `at`), checked.
    fn segments(&self, list: &[u8], mut at: usize, len: usize) -> Res<Vec<Segment>> {
        let end = at + len;
        let mut found = Vec::new();
        while at < end {
            let d = list.get(at..at + 4).filter(|_| at + 4 <= end);
            let d = d.ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
            let n = 4 + be(&d[2..4]) as usize;
            if at + n > end {
                return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
            }
            found.push((at, &list[at..at + n]));
            at += n;
        }
        if found.len() > MAX_SEGMENT_DESCRIPTORS {
            return Err(sense::TOO_MANY_SEGMENT_DESCRIPTORS.into());
        }
        let mut segments = Vec::with_capacity(found.len());
        for (at, d) in found {
            if d[0] != BLOCK_TO_BLOCK {
                return Err(sense::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE.into());
            }
            if d.len() != BLOCK_TO_BLOCK_LEN {
                return Err(Fail::list_field(at + 2));
            }
            segments.push(Segment {
                source: be(&d[4..6]) as usize,
                destination: be(&d[6..8]) as usize,
                blocks: be(&d[10..12]),
                source_lba: be(&d[12..20]),
                destination_lba: be(&d[20..28]),
            });
        }
        Ok(segments)
    }

    /// Copies `segments` in order, counting what is done in `done`.
    /// Failures are COPY ABORTED.
    async fn copy_segments(
        &self,
        targets: &[Target],
        segments: &[Segment],
        done: &mut Status,
    ) -> Res<()> {
        let _shared = self.io.read().await;
        for s in segments {
            for index in [s.source, s.destination] {
                match targets.get(index) {
                    Some(Target::Here) => {}
                    Some(Target::Unreachable) => {
                        return Err(sense::COPY_TARGET_DEVICE_NOT_REACHABLE.into())
                    }
                    None => return Err(sense::UNREACHABLE_COPY_TARGET.into()),
                }
            }
            let in_range = |lba: u64| self.check_range(lba, s.blocks).is_ok();
            if !in_range(s.source_lba) || !in_range(s.destination_lba) {
                return Err(sense::COPY_ABORTED.into());
            }
            if s.blocks > 0 {
                let bytes = s.blocks * BLOCK;
                let data: Bytes = self
                    .read_bytes(s.source_lba * BLOCK, bytes)
                    .await
                    .map_err(|_| Fail::from(sense::COPY_ABORTED))?;
                self.write_bytes(s.destination_lba * BLOCK, &data, false)
                    .await
                    .map_err(|_| Fail::from(sense::COPY_ABORTED))?;
                done.bytes += bytes;
            }
            done.segments = done.segments.saturating_add(1);
        }
        Ok(())
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, Held> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// RECEIVE COPY RESULTS: COPY STATUS and OPERATING PARAMETERS.
    pub(super) fn receive_copy_results(&self, c: &Cdb<'_>, n: &Nexus) -> Res {
        let alloc = c.u32(10) as usize;
        let d = match c.service_action() {
            cdb::SA_COPY_STATUS => {
                let s = self
                    .copies()
                    .take(&key_of(n), c.u8(2))
                    .ok_or(Fail::cdb_field(2, None))?;
                // TRANSFER COUNT in bytes, or in KiB when that is too big.
                let (units, count) = match u32::try_from(s.bytes) {
                    Ok(b) => (0x00, b),
                    Err(_) => (0x01, u32::try_from(s.bytes >> 10).unwrap_or(u32::MAX)),
                };
                let mut d = vec![0, 0, 0, 8, s.state];
                d.extend_from_slice(&s.segments.to_be_bytes());
                d.push(units);
                d.extend_from_slice(&count.to_be_bytes());
                d
            }
            _ => operating_parameters(),
        };
        Ok(Reply::allocated(d, alloc))
    }
}

/// The OPERATING PARAMETERS data (SPC-4 6.18.4).
fn operating_parameters() -> Vec<u8> {
    let codes = [BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR];
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID: LIST ID USAGE 11b is taken
    d[8..10].copy_from_slice(&(MAX_TARGET_DESCRIPTORS as u16).to_be_bytes());
    d[10..12].copy_from_slice(&(MAX_SEGMENT_DESCRIPTORS as u16).to_be_bytes());
    d[12..16].copy_from_slice(&(MAX_DESCRIPTOR_LIST_LEN as u32).to_be_bytes());
    d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
    // No inline or held data, no stream devices.
    d[34..36].copy_from_slice(&1u16.to_be_bytes()); // TOTAL CONCURRENT COPIES
    d[36] = 1; // MAXIMUM CONCURRENT COPIES
    d[37] = 9; // DATA SEGMENT GRANULARITY: 2^9, one block
    d[43] = codes.len() as u8;
    d.extend_from_slice(&codes);
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d
}
