//! Frame prefix and its limits.

use thiserror::Error;

/// "CRN1" little-endian: the first four bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"CRN1");
/// Bytes in the fixed prefix before the header.
pub const FRAME_PREFIX_BYTES: usize = 12;
/// Largest prost header accepted. Headers are small except list replies,
/// which are paginated to stay below this.
pub const FRAME_HEADER_BYTES_MAX: u32 = 1 << 20;
/// Largest data payload accepted in one frame: one whole extent of the largest
/// extent size a volume may have (64 MiB) would be too much to buffer per
/// request, so a request carries at most 8 MiB; clients split larger I/O.
pub const FRAME_DATA_BYTES_MAX: u32 = 8 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x} (expected {FRAME_MAGIC:#010x}): not a Cairn peer or stream out of sync")]
    BadMagic { found: u32 },
    #[error("frame header of {bytes} bytes is over the limit of {FRAME_HEADER_BYTES_MAX} bytes")]
    HeaderTooLarge { bytes: u32 },
    #[error("frame data of {bytes} bytes is over the limit of {limit} bytes")]
    DataTooLarge { bytes: u32, limit: u32 },
    #[error("frame header of zero bytes")]
    EmptyHeader,
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePrefix {
    pub header_bytes: u32,
    pub data_bytes: u32,
}

impl FramePrefix {
    pub fn encode(&self) -> [u8; FRAME_PREFIX_BYTES] {
        let mut out = [0u8; FRAME_PREFIX_BYTES];
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.header_bytes.to_le_bytes());
        out[8..12].copy_from_slice(&self.data_bytes.to_le_bytes());
        out
    }

    /// Parses and checks a prefix against the limits; `data_bytes_max` lets a
    /// receiver be stricter than [`FRAME_DATA_BYTES_MAX`].
    pub fn decode(raw: &[u8; FRAME_PREFIX_BYTES], data_bytes_max: u32) -> Result<Self, FrameError> {
        let magic = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let header_bytes = u32::from_le_bytes(raw[4..8].try_into().expect("4 bytes"));
        let data_bytes = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        if header_bytes == 0 {
            return Err(FrameError::EmptyHeader);
        }
        if header_bytes > FRAME_HEADER_BYTES_MAX {
            return Err(FrameError::HeaderTooLarge {
                bytes: header_bytes,
            });
        }
        if data_bytes > data_bytes_max {
            return Err(FrameError::DataTooLarge {
                bytes: data_bytes,
                limit: data_bytes_max,
            });
        }
        Ok(Self {
            header_bytes,
            data_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips() {
        let p = FramePrefix {
            header_bytes: 17,
            data_bytes: 4096,
        };
        assert_eq!(
            FramePrefix::decode(&p.encode(), FRAME_DATA_BYTES_MAX),
            Ok(p)
        );
    }

    #[test]
    fn prefix_rejects_bad_input() {
        let mut raw = FramePrefix {
            header_bytes: 1,
            data_bytes: 0,
        }
        .encode();
        raw[0] ^= 1;
        assert!(matches!(
            FramePrefix::decode(&raw, 10),
            Err(FrameError::BadMagic { .. })
        ));
        let raw = FramePrefix {
            header_bytes: 0,
            data_bytes: 0,
        }
        .encode();
        assert_eq!(FramePrefix::decode(&raw, 10), Err(FrameError::EmptyHeader));
        let raw = FramePrefix {
            header_bytes: FRAME_HEADER_BYTES_MAX + 1,
            data_bytes: 0,
        }
        .encode();
        assert!(matches!(
            FramePrefix::decode(&raw, 10),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        let raw = FramePrefix {
            header_bytes: 1,
            data_bytes: 11,
        }
        .encode();
        assert_eq!(
            FramePrefix::decode(&raw, 10),
            Err(FrameError::DataTooLarge {
                bytes: 11,
                limit: 10
            })
        );
    }
}
