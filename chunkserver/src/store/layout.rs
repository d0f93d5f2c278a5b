//! The on-disk format of one extent version.
//!
//! Each stored extent version `(volume, extent index, epoch)` is one sparse file:
//!
//! ```text
//! offset 0                 header, 4 KiB (magic, format, sizes, key, CRC32)
//! offset 4096              slot table: 24 bytes per 4 KiB block, three checksum
//!                          slots of (crc32 u32 LE, generation u32 LE) each
//!                          (see slots.rs), rounded up to 4 KiB
//! offset data_offset       data: extent_bytes, block i at data_offset + i*4096
//! ```
//!
//! The file is created at full length with `ftruncate`, so it takes no space
//! until written, and unwritten ranges read as zeros. The path is
//! `<volume:016x>/<extent_index / 1024:06x>/<extent_index:016x>.<epoch:016x>.ext`
//! under the store's `extents/` folder: at most 1024 files per folder per epoch.

use std::path::{Path, PathBuf};

use super::ExtentKey;

/// Checksum granularity: every block of this size has its own CRC32.
pub const BLOCK_BYTES: u32 = 4096;
/// Write and offset granularity accepted from clients.
pub const SECTOR_BYTES: u32 = 512;
pub const EXTENT_BYTES_MIN: u32 = 64 << 10;
pub const EXTENT_BYTES_MAX: u32 = 64 << 20;
pub const HEADER_BYTES: u64 = 4096;
/// Three slots of (crc32, generation) per block.
pub const SLOT_ENTRY_BYTES: u64 = super::slots::ENTRY_BYTES as u64;
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CAIRNEXT";
/// Header bytes covered by the header's own CRC32 (stored right after them).
const HEADER_CHECKED_BYTES: usize = 56;
pub const FILE_SUFFIX: &str = "ext";
/// Extents per index folder, to keep folders small on large volumes.
pub const EXTENTS_PER_FOLDER: u64 = 1024;

pub fn extent_bytes_valid(extent_bytes: u32) -> bool {
    extent_bytes.is_power_of_two() && (EXTENT_BYTES_MIN..=EXTENT_BYTES_MAX).contains(&extent_bytes)
}

pub fn blocks_per_extent(extent_bytes: u32) -> u32 {
    extent_bytes / BLOCK_BYTES
}

pub fn table_bytes(extent_bytes: u32) -> u64 {
    (blocks_per_extent(extent_bytes) as u64 * SLOT_ENTRY_BYTES).div_ceil(4096) * 4096
}

pub fn data_offset(extent_bytes: u32) -> u64 {
    HEADER_BYTES + table_bytes(extent_bytes)
}

pub fn file_bytes(extent_bytes: u32) -> u64 {
    data_offset(extent_bytes) + extent_bytes as u64
}

/// The extent size whose layout has exactly this file length, if any.
pub fn extent_bytes_for_file_len(file_len: u64) -> Option<u32> {
    (EXTENT_BYTES_MIN.trailing_zeros()..=EXTENT_BYTES_MAX.trailing_zeros())
        .map(|shift| 1u32 << shift)
        .find(|&eb| file_bytes(eb) == file_len)
}

pub fn volume_folder_name(volume_id: u64) -> String {
    format!("{volume_id:016x}")
}

pub fn relative_path(key: &ExtentKey) -> PathBuf {
    let mut p = PathBuf::from(volume_folder_name(key.volume_id));
    p.push(format!("{:06x}", key.extent_index / EXTENTS_PER_FOLDER));
    p.push(format!(
        "{:016x}.{:016x}.{FILE_SUFFIX}",
        key.extent_index, key.epoch
    ));
    p
}

/// Parses `<volume>/<folder>/<index>.<epoch>.ext` back into a key, checking
/// that the file sits in the folder its index belongs to.
pub fn parse_relative_path(
    volume_folder: &str,
    index_folder: &str,
    file_name: &str,
) -> Option<ExtentKey> {
    let hex16 = |s: &str| {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    let volume_id = hex16(volume_folder)?;
    let mut parts = file_name.split('.');
    let extent_index = hex16(parts.next()?)?;
    let epoch = hex16(parts.next()?)?;
    if parts.next()? != FILE_SUFFIX || parts.next().is_some() {
        return None;
    }
    let folder = u64::from_str_radix(index_folder, 16).ok()?;
    if index_folder.len() != 6 || folder != extent_index / EXTENTS_PER_FOLDER {
        return None;
    }
    Some(ExtentKey {
        volume_id,
        extent_index,
        epoch,
    })
}

pub fn path_for(root: &Path, key: &ExtentKey) -> PathBuf {
    root.join(relative_path(key))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key: ExtentKey,
    pub extent_bytes: u32,
    pub created_unix_s: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut out = [0u8; HEADER_BYTES as usize];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&BLOCK_BYTES.to_le_bytes());
        out[16..20].copy_from_slice(&self.extent_bytes.to_le_bytes());
        // 20..24 reserved, zero.
        out[24..32].copy_from_slice(&self.key.volume_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.key.extent_index.to_le_bytes());
        out[40..48].copy_from_slice(&self.key.epoch.to_le_bytes());
        out[48..56].copy_from_slice(&self.created_unix_s.to_le_bytes());
        let crc = crc32fast::hash(&out[..HEADER_CHECKED_BYTES]);
        out[HEADER_CHECKED_BYTES..HEADER_CHECKED_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `Ok(None)`: the header was never written (all zero): a file created but
    /// never flushed. `Err`: anything else that is not a valid header.
    pub fn decode(raw: &[u8]) -> Result<Option<Header>, String> {
        if raw.len() < HEADER_BYTES as usize {
            return Err(format!(
                "header is {} bytes, expected {HEADER_BYTES}",
                raw.len()
            ));
        }
        let raw = &raw[..HEADER_BYTES as usize];
        if raw.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if &raw[0..8] != MAGIC {
            return Err("bad magic: not a Cairn extent file".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
        let stored_crc = u32_at(HEADER_CHECKED_BYTES);
        let crc = crc32fast::hash(&raw[..HEADER_CHECKED_BYTES]);
        if stored_crc != crc {
            return Err(format!(
                "header checksum {stored_crc:#010x} does not match contents ({crc:#010x})"
            ));
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        if u32_at(12) != BLOCK_BYTES {
            return Err(format!(
                "block size {} bytes, expected {BLOCK_BYTES}",
                u32_at(12)
            ));
        }
        let extent_bytes = u32_at(16);
        if !extent_bytes_valid(extent_bytes) {
            return Err(format!("invalid extent size {extent_bytes}"));
        }
        Ok(Some(Header {
            key: ExtentKey {
                volume_id: u64_at(24),
                extent_index: u64_at(32),
                epoch: u64_at(40),
            },
            extent_bytes,
            created_unix_s: u64_at(48),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(table_bytes(4 << 20), 24 << 10);
        assert_eq!(data_offset(4 << 20), 28 << 10);
        assert_eq!(table_bytes(64 << 10), 4096);
        for shift in 16..=26 {
            let eb = 1u32 << shift;
            assert_eq!(extent_bytes_for_file_len(file_bytes(eb)), Some(eb));
        }
        assert_eq!(extent_bytes_for_file_len(12345), None);
        assert!(!extent_bytes_valid(3 << 20));
        assert!(!extent_bytes_valid(32 << 10));
        assert!(!extent_bytes_valid(128 << 20));
    }

    #[test]
    fn path_round_trip() {
        let key = ExtentKey {
            volume_id: 0xabc,
            extent_index: 5000,
            epoch: 3,
        };
        let p = relative_path(&key);
        let parts: Vec<_> = p.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(parse_relative_path(parts[0], parts[1], parts[2]), Some(key));
        assert_eq!(
            parse_relative_path(parts[0], "000000", parts[2]),
            None,
            "wrong folder"
        );
        assert_eq!(parse_relative_path(parts[0], parts[1], "x.ext"), None);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = Header {
            key: ExtentKey {
                volume_id: 1,
                extent_index: 2,
                epoch: 3,
            },
            extent_bytes: 4 << 20,
            created_unix_s: 99,
        };
        let mut raw = h.encode();
        assert_eq!(Header::decode(&raw), Ok(Some(h)));
        assert_eq!(Header::decode(&[0u8; 4096]), Ok(None));
        raw[30] ^= 0x10;
        assert!(Header::decode(&raw).unwrap_err().contains("checksum"));
    }
}
