//! Splitting a volume byte range into per-extent pieces (pure).

/// The sector size every offset and length is a multiple of.
pub const SECTOR_BYTES: u64 = 512;

/// One piece of a volume range: a range inside one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Extent index.
    pub index: u64,
    /// Byte offset inside the extent.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where the piece starts relative to the start of the whole range.
    pub pos: u64,
}

#[cfg(test)]
impl Piece {
    /// The piece's byte offset in the volume.
    pub fn volume_offset(&self, extent_bytes: u64) -> u64 {
        self.index * extent_bytes + self.offset
    }
}

/// Checks that `offset..offset+len` is whole sectors inside a volume of
/// `size` bytes; returns why not.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), String> {
    if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
        return Err(format!(
            "offset and length must be multiples of {SECTOR_BYTES} bytes"
        ));
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "the range ends beyond the volume size of {size} bytes"
        ));
    }
    Ok(())
}

/// Splits `offset..offset+len` at extent boundaries (extent `i` covers
/// `[i*extent_bytes, (i+1)*extent_bytes)`) and into pieces of at most
/// `piece_max` bytes. `extent_bytes` and `piece_max` must be positive.
pub fn split(offset: u64, len: u64, extent_bytes: u64, piece_max: u64) -> Split {
    assert!(extent_bytes > 0 && piece_max > 0);
    Split {
        next: offset,
        end: offset + len,
        start: offset,
        extent_bytes,
        piece_max,
    }
}

/// The pieces of a range, in order (see [`split`]).
#[derive(Clone, Debug)]
pub struct Split {
    next: u64,
    end: u64,
    start: u64,
    extent_bytes: u64,
    piece_max: u64,
}

impl Iterator for Split {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.next >= self.end {
            return None;
        }
        let index = self.next / self.extent_bytes;
        let offset = self.next % self.extent_bytes;
        let len = (self.extent_bytes - offset)
            .min(self.end - self.next)
            .min(self.piece_max);
        let piece = Piece {
            index,
            offset,
            len,
            pos: self.next - self.start,
        };
        self.next += len;
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // At least one piece per started extent and per `piece_max` bytes.
        let left = self.end.saturating_sub(self.next);
        let lower = left.div_ceil(self.piece_max.max(1));
        (lower.min(usize::MAX as u64) as usize, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pieces(offset: u64, len: u64, ext: u64, max: u64) -> Vec<(u64, u64, u64, u64)> {
        split(offset, len, ext, max)
            .map(|p| (p.index, p.offset, p.len, p.pos))
            .collect()
    }

    #[test]
    fn unaligned_and_out_of_range_are_rejected() {
        let size = 16 * MIB;
        assert!(check_range(size, 0, 512).is_ok());
        assert!(check_range(size, 0, 0).is_ok());
        assert!(check_range(size, 100, 512).is_err());
        assert!(check_range(size, 512, 100).is_err());
        assert!(check_range(size, size - 512, 512).is_ok());
        assert!(check_range(size, size - 512, 1024).is_err());
        assert!(check_range(size, size, 512).is_err());
        assert!(check_range(size, u64::MAX - 511, 512).is_err());
        assert!(check_range(size, 512, u64::MAX - 511).is_err());
    }

    #[test]
    fn one_piece_inside_an_extent() {
        assert_eq!(pieces(4096, 8192, 4 * MIB, 8 * MIB), [(0, 4096, 8192, 0)]);
        assert_eq!(pieces(5 * MIB, 512, 4 * MIB, 8 * MIB), [(1, MIB, 512, 0)]);
        assert!(pieces(4096, 0, 4 * MIB, 8 * MIB).is_empty());
    }

    #[test]
    fn extent_crossing_splits_at_the_boundary() {
        let e = 4 * MIB;
        assert_eq!(
            pieces(e - 1024, 3072, e, 8 * MIB),
            [(0, e - 1024, 1024, 0), (1, 0, 2048, 1024)]
        );
        // Whole extents and a tail.
        assert_eq!(
            pieces(0, 2 * e + 512, e, 8 * MIB),
            [(0, 0, e, 0), (1, 0, e, e), (2, 0, 512, 2 * e)]
        );
    }

    #[test]
    fn large_extents_split_at_the_frame_limit() {
        let e = 64 * MIB;
        let max = 8 * MIB;
        let got = pieces(MIB, 20 * MIB, e, max);
        assert_eq!(
            got,
            [
                (0, MIB, max, 0),
                (0, 9 * MIB, max, max),
                (0, 17 * MIB, 4 * MIB, 2 * max)
            ]
        );
        // Both limits at once: the frame limit inside an extent, then the
        // extent boundary.
        let got = pieces(60 * MIB, 16 * MIB, e, max);
        assert_eq!(
            got,
            [
                (0, 60 * MIB, 4 * MIB, 0),
                (1, 0, 8 * MIB, 4 * MIB),
                (1, 8 * MIB, 4 * MIB, 12 * MIB)
            ]
        );
    }

    #[test]
    fn range_up_to_the_volume_end() {
        let e = 4 * MIB;
        let size = 10 * MIB; // last extent is partial
        let (off, len) = (7 * MIB, 3 * MIB);
        assert!(check_range(size, off, len).is_ok());
        let got = pieces(off, len, e, 8 * MIB);
        assert_eq!(got, [(1, 3 * MIB, MIB, 0), (2, 0, 2 * MIB, MIB)]);
        // Pieces tile the range exactly.
        let total: u64 = got.iter().map(|p| p.2).sum();
        assert_eq!(total, len);
        let p = split(off, len, e, 8 * MIB).last().unwrap();
        assert_eq!(p.volume_offset(e) + p.len, size);
    }
}
