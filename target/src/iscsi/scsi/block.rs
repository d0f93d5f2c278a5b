//! The block commands (SBC-3): READ, WRITE, WRITE AND VERIFY, VERIFY,
//! PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, UNMAP, COMPARE AND WRITE,
//! ORWRITE and GET LBA STATUS, over the backend in calls of at most 32 MiB.

use bytes::{Bytes, BytesMut};

use super::cdb::{self, lba_and_len, Cdb};
use super::info::{MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS};
use super::pr::PrStore;
use super::sense::{self, Sense};
use super::{Fail, Lun, Reply, Request, Res, BLOCK, CHUNK, MAX_TRANSFER_BLOCKS};
use crate::backend::{Backend, IoError};
use crate::nbd::wire::STATE_HOLE;

/// How much GET LBA STATUS asks the backend about per call...
const STATUS_WINDOW: u64 = 1 << 30;
/// ... and in how many calls at most per command.
const STATUS_WINDOWS: u64 = 64;
/// GET LBA STATUS descriptors returned at most.
const MAX_STATUS_DESCRIPTORS: usize = 64;
/// The pattern buffer WRITE SAME writes from.
const PATTERN_BYTES: u64 = 1 << 20;

/// The protection field (RDPROTECT, WRPROTECT, VRPROTECT) of byte 1:
/// there is no protection information, so it must be zero.
fn no_protection(c: &Cdb<'_>) -> Res<()> {
    if c.opcode() != cdb::READ_6 && c.opcode() != cdb::WRITE_6 && c.u8(1) >> 5 != 0 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    Ok(())
}

/// The first offset where `a` and `b` differ.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `(offset, len)` pieces of at most [`CHUNK`] bytes covering `len` bytes
/// from `offset`.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    (0..len).step_by(CHUNK as usize).map(move |at| {
        let n = (len - at).min(CHUNK);
        (offset + at, n as u32)
    })
}

impl<B: Backend, S: PrStore> Lun<B, S> {
    /// LBA OUT OF RANGE unless `len` blocks from `lba` are within the
    /// capacity and `lba` names a block (even when `len` is 0).
    pub(super) fn check_range(&self, lba: u64, len: u64) -> Res<()> {
        let blocks = self.blocks();
        match lba.checked_add(len) {
            Some(end) if lba < blocks && end <= blocks => Ok(()),
            _ => Err(sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    pub(super) fn check_writable(&self) -> Res<()> {
        if self.backend.info().read_only {
            return Err(sense::WRITE_PROTECTED.into());
        }
        if self.local().swp {
            return Err(sense::SOFTWARE_WRITE_PROTECTED.into());
        }
        Ok(())
    }

    pub(super) fn io_failed(&self, what: &str, offset: u64, e: &IoError, s: Sense) -> Fail {
        tracing::warn!(
            lun = self.lun_id,
            export = %self.backend.info().name,
            offset,
            errno = e.errno,
            "{what} failed: {}",
            e.message
        );
        s.into()
    }

    /// Reads `len` bytes from `offset`.
    pub(super) async fn read_bytes(&self, offset: u64, len: u64) -> Res<Bytes> {
        if len <= CHUNK {
            return self
                .backend
                .read(offset, len as u32)
                .await
                .map_err(|e| self.io_failed("read", offset, &e, Sense::for_read(&e)));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (at, n) in chunks(offset, len) {
            let b = self
                .backend
                .read(at, n)
                .await
                .map_err(|e| self.io_failed("read", at, &e, Sense::for_read(&e)))?;
            out.extend_from_slice(&b);
        }
        Ok(out.freeze())
    }

    /// The LBA and length of a read or write CDB, checked against the
    /// capacity (LBA OUT OF RANGE) and the transfer limit (INVALID FIELD).
    fn transfer(&self, c: &Cdb<'_>) -> Res<(u64, u64)> {
        let (lba, len) = lba_and_len(c);
        self.check_range(lba, len)?;
        if len > MAX_TRANSFER_BLOCKS {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok((lba, len))
    }

    pub(super) async fn write_bytes(&self, offset: u64, data: &Bytes, fua: bool) -> Res<()> {
        for (at, n) in chunks(offset, data.len() as u64) {
            let from = (at - offset) as usize;
            let piece = data.slice(from..from + n as usize);
            self.backend
                .write(at, piece, fua)
                .await
                .map_err(|e| self.io_failed("write", at, &e, Sense::for_write(&e)))?;
        }
        Ok(())
    }

    /// Makes `len` bytes from `offset` read as zeros; `no_hole` keeps
    /// them allocated (WRITE SAME without UNMAP), otherwise they may be
    /// deallocated (UNMAP: LBPRZ promises zeros, which `trim` does not).
    async fn zero_bytes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> Res<()> {
        for (at, n) in chunks(offset, len) {
            self.backend
                .write_zeroes(at, n, fua, no_hole)
                .await
                .map_err(|e| self.io_failed("zeroing", at, &e, Sense::for_write(&e)))?;
        }
        Ok(())
    }

    /// READ (6), (10), (12), (16). DPO and FUA are accepted: every read
    /// comes from the replicas.
    pub(super) async fn read(&self, c: &Cdb<'_>) -> Res {
        no_protection(c)?;
        let (lba, len) = self.transfer(c)?;
        if len == 0 {
            return Ok(Reply::good());
        }
        let data = self.read_bytes(lba * BLOCK, len * BLOCK).await?;
        Ok(Reply::data(data))
    }

    /// WRITE (6), (10), (12), (16) and WRITE AND VERIFY (10), (12), (16).
    /// WRITE AND VERIFY writes with FUA: its data is on the medium when it
    /// completes, and the bytes compared are the ones just written.
    ///
    /// An Expected Data Transfer Length short of the transfer length
    /// (FCP-4 9.4.2 a, what libiscsi's residual tests want): the whole
    /// blocks that came are written and the command succeeds, the session
    /// reporting the overflow; a partial block is refused.
    pub(super) async fn write(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        let data = &req.data_out;
        no_protection(c)?;
        let verify = matches!(
            c.opcode(),
            cdb::WRITE_AND_VERIFY_10 | cdb::WRITE_AND_VERIFY_12 | cdb::WRITE_AND_VERIFY_16
        );
        if verify && (c.u8(1) >> 1) & 0x03 > 1 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        let fua = verify || (c.opcode() != cdb::WRITE_6 && c.u8(1) & 0x08 != 0);
        let (lba, len) = self.transfer(c)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(Reply::good());
        }
        let mut need = (len * BLOCK) as usize;
        let expected = req.expected_len as usize;
        if expected < need && data.len() == expected {
            if !expected.is_multiple_of(BLOCK as usize) {
                return Err(sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
            }
            need = expected;
        }
        if data.len() < need {
            return Err(sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
        }
        let _shared = self.io.read().await;
        self.write_bytes(lba * BLOCK, &data.slice(..need), fua)
            .await?;
        Ok(Reply::good())
    }

    /// VERIFY (10), (12), (16): BYTCHK 00b reads the range, 01b compares
    /// it with the Data-Out, 11b compares every block with one block.
    /// MISCOMPARE carries the Data-Out offset of the first difference.
    pub(super) async fn verify(&self, c: &Cdb<'_>, data: &Bytes) -> Res {
        no_protection(c)?;
        let bytchk = (c.u8(1) >> 1) & 0x03;
        if bytchk == 0b10 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        let (lba, len) = self.transfer(c)?;
        if len == 0 {
            return Ok(Reply::good());
        }
        let need = match bytchk {
            0b01 => (len * BLOCK) as usize,
            0b11 => BLOCK as usize,
            _ => 0,
        };
        if data.len() < need {
            return Err(sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
        }
        for (at, n) in chunks(lba * BLOCK, len * BLOCK) {
            let medium = self.read_bytes(at, n as u64).await?;
            let from = (at - lba * BLOCK) as usize;
            let diff = match bytchk {
                0b01 => first_difference(&medium, &data[from..from + n as usize]).map(|d| from + d),
                0b11 => medium
                    .chunks(BLOCK as usize)
                    .enumerate()
                    .find_map(|(i, b)| first_difference(b, &data[..BLOCK as usize]).map(|d| (i, d)))
                    .map(|(i, d)| from + i * BLOCK as usize + d),
                _ => None,
            };
            if let Some(offset) = diff {
                return Err(Fail::Check(
                    sense::MISCOMPARE_DURING_VERIFY,
                    Some(offset as u64),
                ));
            }
        }
        Ok(Reply::good())
    }

    /// PRE-FETCH (10), (16): there is no cache to load, so GOOD (SBC-3
    /// 5.9: CONDITION MET only when the blocks fit in the cache).
    pub(super) fn prefetch(&self, c: &Cdb<'_>) -> Res {
        let (lba, len) = lba_and_len(c);
        self.check_range(lba, len)?;
        Ok(Reply::good())
    }

    /// SYNCHRONIZE CACHE (10), (16): the whole volume is flushed whatever
    /// the range (IMMED is honoured by completing after the flush).
    pub(super) async fn sync_cache(&self, c: &Cdb<'_>) -> Res {
        let (lba, len) = lba_and_len(c);
        self.check_range(lba, len)?;
        self.backend
            .flush()
            .await
            .map_err(|e| self.io_failed("flush", 0, &e, Sense::for_write(&e)))?;
        Ok(Reply::good())
    }

    /// WRITE SAME (10), (16). With UNMAP the range is deallocated (reads
    /// zeros); zeros (or NDOB) without it are written allocated.
    /// Length 0 means "to the end of the volume", within MAXIMUM WRITE
    /// SAME LENGTH. ANCHOR is refused (ANC_SUP = 0).
    pub(super) async fn write_same(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        no_protection(c)?;
        let flags = c.u8(1);
        let unmap = flags & 0x08 != 0;
        let ndob = c.opcode() == cdb::WRITE_SAME_16 && flags & 0x01 != 0;
        if flags & 0x10 != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        let (lba, mut len) = lba_and_len(c);
        if len == 0 {
            self.check_range(lba, 0)?;
            len = self.blocks() - lba;
        }
        if len > MAX_WRITE_SAME_BLOCKS {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, len)?;
        // The Data-Out is exactly one block (none with NDOB): an initiator
        // sending more or less has the CDB wrong.
        let want = if ndob { 0 } else { BLOCK as u32 };
        if req.expected_len != want {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        let block = if ndob {
            Bytes::from_static(&[0u8; BLOCK as usize])
        } else {
            req.data_out
                .get(..BLOCK as usize)
                .map(|b| req.data_out.slice(..b.len()))
                .ok_or(sense::INVALID_FIELD_IN_INFORMATION_UNIT)?
        };
        self.check_writable()?;
        let _shared = self.io.read().await;
        let (offset, bytes) = (lba * BLOCK, len * BLOCK);
        // UNMAP deallocates whatever the block holds (LBPRZ: the range
        // then reads zeros), as initiators and libiscsi expect.
        if unmap || block.iter().all(|&b| b == 0) {
            self.zero_bytes(offset, bytes, false, !unmap).await?;
            return Ok(Reply::good());
        }
        let pattern_len = bytes.min(PATTERN_BYTES);
        let mut pattern = BytesMut::with_capacity(pattern_len as usize);
        while (pattern.len() as u64) < pattern_len {
            pattern.extend_from_slice(&block);
        }
        let pattern = pattern.freeze();
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(pattern_len) as usize;
            self.write_bytes(offset + at, &pattern.slice(..n), false)
                .await?;
            at += n as u64;
        }
        Ok(Reply::good())
    }

    /// UNMAP: the parameter list is checked whole before anything is
    /// unmapped.
    pub(super) async fn unmap(&self, c: &Cdb<'_>, data: &Bytes) -> Res {
        // ANCHOR: anchored blocks are not supported.
        if c.u8(1) & 0x01 != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_writable()?;
        let len = c.u16(7) as usize;
        if len == 0 {
            return Ok(Reply::good());
        }
        if len < 8 {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let list = data.get(..len).ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let descriptors_len = u16::from_be_bytes([list[2], list[3]]) as usize;
        let descriptors = list
            .get(8..8 + descriptors_len)
            .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        if descriptors.len() / 16 > MAX_UNMAP_DESCRIPTORS {
            return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let mut ranges = Vec::with_capacity(descriptors.len() / 16);
        let mut total = 0u64;
        for d in descriptors.chunks_exact(16) {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
            let n = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()) as u64;
            let end = lba.checked_add(n).ok_or(sense::LBA_OUT_OF_RANGE)?;
            if end > self.blocks() {
                return Err(sense::LBA_OUT_OF_RANGE.into());
            }
            total += n;
            if total > MAX_UNMAP_BLOCKS {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            if n > 0 {
                ranges.push((lba, n));
            }
        }
        let _shared = self.io.read().await;
        for (lba, n) in ranges {
            self.zero_bytes(lba * BLOCK, n * BLOCK, false, false)
                .await?;
        }
        Ok(Reply::good())
    }

    /// COMPARE AND WRITE: the backend compares and writes; a Cairn volume
    /// does both at the extent's primary under one range lock, atomic
    /// against writes through any target (VMware's ATS locks hold across
    /// hosts attached through different targets), and other I/O goes on
    /// meanwhile. Where the backend is not atomic by itself (its default
    /// reads, compares and writes; a range across two extents), the
    /// logical unit's I/O lock, held exclusively, makes it atomic against
    /// this target's own writes. MISCOMPARE carries the offset of the
    /// first difference.
    pub(super) async fn compare_and_write(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        no_protection(c)?;
        let fua = c.u8(1) & 0x08 != 0;
        let lba = c.u64(2);
        let blocks = c.u8(13) as u64;
        self.check_range(lba, blocks)?;
        // Data-Out for another block count (e.g. 256 blocks, which the
        // one-byte field wraps to 0) means the CDB is wrong.
        let half = (blocks * BLOCK) as usize;
        if req.expected_len as usize != 2 * half {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        if blocks == 0 {
            return Ok(Reply::good());
        }
        if req.data_out.len() < 2 * half {
            return Err(sense::INVALID_FIELD_IN_INFORMATION_UNIT.into());
        }
        self.check_writable()?;
        let offset = lba * BLOCK;
        let atomic = self
            .backend
            .compare_and_write_is_atomic(offset, half as u64);
        let _shared = if atomic {
            Some(self.io.read().await)
        } else {
            None
        };
        let _exclusive = if atomic {
            None
        } else {
            Some(self.io.write().await)
        };
        let compare = req.data_out.slice(..half);
        let new = req.data_out.slice(half..2 * half);
        let found = self
            .backend
            .compare_and_write(offset, compare, new, fua)
            .await
            .map_err(|e| self.io_failed("compare and write", offset, &e, Sense::for_write(&e)))?;
        if let Some(at) = found {
            return Err(Fail::Check(sense::MISCOMPARE_DURING_VERIFY, Some(at)));
        }
        Ok(Reply::good())
    }

    /// ORWRITE (16): each block becomes the OR of itself and the Data-Out,
    /// read and written under the logical unit's I/O lock held
    /// exclusively (atomic against writes through it, like COMPARE AND
    /// WRITE). FUA is honoured; ORPROTECT must be zero.
    pub(super) async fn orwrite(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        no_protection(c)?;
        let fua = c.u8(1) & 0x08 != 0;
        let (lba, len) = self.transfer(c)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(Reply::good());
        }
        let need = (len * BLOCK) as usize;
        let data = req
            .data_out
            .get(..need)
            .ok_or(sense::INVALID_FIELD_IN_INFORMATION_UNIT)?;
        let _exclusive = self.io.write().await;
        let medium = self.read_bytes(lba * BLOCK, need as u64).await?;
        let ored: Vec<u8> = medium.iter().zip(data).map(|(a, b)| a | b).collect();
        self.write_bytes(lba * BLOCK, &Bytes::from(ored), fua)
            .await?;
        Ok(Reply::good())
    }

    /// GET LBA STATUS: mapped and deallocated extents from the backend's
    /// block status, from the starting LBA on.
    pub(super) async fn get_lba_status(&self, c: &Cdb<'_>) -> Res {
        let lba = c.u64(2);
        let alloc = c.u32(10) as usize;
        let blocks = self.blocks();
        if lba >= blocks {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        let start = lba * BLOCK;
        let room = (alloc.saturating_sub(8) / 16).clamp(1, MAX_STATUS_DESCRIPTORS);
        // (first block, blocks, deallocated)
        let mut descriptors: Vec<(u64, u64, bool)> = Vec::new();
        // Window after window while the descriptors have room (a large
        // deallocated volume is then one descriptor).
        let last_byte = (blocks * BLOCK).min(start.saturating_add(STATUS_WINDOW * STATUS_WINDOWS));
        let mut window = start;
        'windows: while window < last_byte {
            let end = last_byte.min(window + STATUS_WINDOW);
            let runs = self
                .backend
                .block_status(window, (end - window) as u32)
                .await
                .map_err(|e| self.io_failed("block status", window, &e, Sense::for_read(&e)))?;
            let mut at = window;
            for (len, flags) in runs {
                if at >= end {
                    break;
                }
                let stop = at.saturating_add(len).min(end);
                let hole = flags & STATE_HOLE != 0;
                let (first, last) = (at / BLOCK, stop.div_ceil(BLOCK));
                at = stop;
                let from = descriptors.last().map_or(first, |d| d.0 + d.1);
                if last <= from {
                    continue;
                }
                let full = descriptors.len() == room;
                match descriptors.last_mut() {
                    Some(d) if d.2 == hole => d.1 = last - d.0,
                    _ if full => break 'windows,
                    _ => descriptors.push((from, last - from, hole)),
                }
            }
            // Runs may stop short of the window: go on from where they did.
            if at <= window {
                break;
            }
            window = at;
        }
        if descriptors.is_empty() {
            descriptors.push((lba, 1, false));
        }
        let mut d = Vec::with_capacity(8 + 16 * descriptors.len());
        d.extend_from_slice(&((4 + 16 * descriptors.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for (first, n, hole) in descriptors {
            d.extend_from_slice(&first.to_be_bytes());
            d.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
            d.push(u8::from(hole));
            d.extend_from_slice(&[0; 3]);
        }
        Ok(Reply::allocated(d, alloc))
    }
}
