//! Opening a store: the startup scan of extent files and the clean-shutdown marker.
//!
//! The marker (`extents/.clean`) is written, fsynced, last thing on a clean
//! shutdown and removed, durably, first thing on open. Its presence means every
//! extent's newer checksum slot is its durable one, except for the extents it
//! lists (blocks never settled since an earlier crash). Without it, every
//! extent is verified block by block on first use (see `slots`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracing::warn;

use super::layout::{self, extent_bytes_for_file_len};
use super::{ExtentKey, Result, StoreError};

pub const CLEAN_MARKER: &str = ".clean";
const MARKER_MAGIC: &str = "cairn-clean-v1";

#[derive(Debug, Clone, Copy)]
pub struct IndexEntry {
    pub extent_bytes: u32,
    pub allocated_bytes: u64,
    /// The newer slot of every block is the durable one (see `slots::SlotTable::trustworthy`).
    pub trusted: bool,
}

/// Lists every extent file under `root`. Zero-length files (created, then a
/// crash before they were sized, so never flushed) are removed; a file whose
/// size fits no extent layout is corrupt and stops the open.
pub fn scan(root: &Path) -> Result<BTreeMap<ExtentKey, IndexEntry>> {
    let mut index = BTreeMap::new();
    let read_dir = |p: &Path| {
        fs::read_dir(p).map_err(|e| StoreError::io(format!("listing {}", p.display()), e))
    };
    for vol in read_dir(root)? {
        let vol = vol.map_err(|e| StoreError::io(format!("listing {}", root.display()), e))?;
        let vol_name = vol.file_name().to_string_lossy().into_owned();
        if vol_name.starts_with('.') {
            continue;
        }
        if !vol.path().is_dir() || vol_name.len() != 16 {
            warn!(path = %vol.path().display(), "ignoring unexpected entry in the extent store");
            continue;
        }
        for folder in read_dir(&vol.path())? {
            let folder = folder
                .map_err(|e| StoreError::io(format!("listing {}", vol.path().display()), e))?;
            let folder_name = folder.file_name().to_string_lossy().into_owned();
            for file in read_dir(&folder.path())? {
                let file = file.map_err(|e| {
                    StoreError::io(format!("listing {}", folder.path().display()), e)
                })?;
                let name = file.file_name().to_string_lossy().into_owned();
                let path = file.path();
                let Some(key) = layout::parse_relative_path(&vol_name, &folder_name, &name) else {
                    warn!(path = %path.display(), "ignoring a file that is not a Cairn extent");
                    continue;
                };
                let meta = fs::metadata(&path)
                    .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
                if meta.len() == 0 {
                    warn!(path = %path.display(), "removing an extent file whose creation never completed");
                    fs::remove_file(&path)
                        .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
                    continue;
                }
                let Some(extent_bytes) = extent_bytes_for_file_len(meta.len()) else {
                    return Err(StoreError::CorruptExtent {
                        path,
                        reason: format!(
                            "file is {} bytes, which fits no extent size; move it out of the data directory \
                             (the volume's other replicas hold the data) and start again",
                            meta.len()
                        ),
                    });
                };
                index.insert(
                    key,
                    IndexEntry {
                        extent_bytes,
                        allocated_bytes: meta.blocks() * 512,
                        trusted: true,
                    },
                );
            }
        }
    }
    Ok(index)
}

/// Reads and removes the clean marker. Returns the extents to distrust, or
/// `None` if the store was not shut down cleanly.
pub fn take_clean_marker(root: &Path) -> Result<Option<BTreeSet<ExtentKey>>> {
    let path = root.join(CLEAN_MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let parsed = parse_marker(&text);
    fs::remove_file(&path)
        .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
    sync_dir(root)?;
    match parsed {
        Some(set) => Ok(Some(set)),
        None => {
            warn!(path = %path.display(), "clean-shutdown marker is damaged; verifying every extent on first use");
            Ok(None)
        }
    }
}

fn parse_marker(text: &str) -> Option<BTreeSet<ExtentKey>> {
    let (body, crc_line) = text.trim_end().rsplit_once('\n')?;
    let crc = u32::from_str_radix(crc_line.strip_prefix("crc ")?, 16).ok()?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != MARKER_MAGIC {
        return None;
    }
    let mut set = BTreeSet::new();
    for line in lines {
        let mut f = line.split(' ').map(|x| u64::from_str_radix(x, 16));
        let key = ExtentKey {
            volume_id: f.next()?.ok()?,
            extent_index: f.next()?.ok()?,
            epoch: f.next()?.ok()?,
        };
        set.insert(key);
    }
    Some(set)
}

/// Writes the marker durably: temporary file, fsync, rename, fsync of `root`.
pub fn write_clean_marker(root: &Path, untrusted: &[ExtentKey]) -> Result<()> {
    let mut body = String::from(MARKER_MAGIC);
    for k in untrusted {
        body.push_str(&format!(
            "\n{:x} {:x} {:x}",
            k.volume_id, k.extent_index, k.epoch
        ));
    }
    let text = format!("{body}\ncrc {:08x}\n", crc32fast::hash(body.as_bytes()));
    let tmp = root.join(".clean.tmp");
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = fs::File::create(&tmp).map_err(|e| StoreError::io(ctx("creating"), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| StoreError::io(ctx("writing"), e))?;
    f.sync_all()
        .map_err(|e| StoreError::io(ctx("syncing"), e))?;
    fs::rename(&tmp, root.join(CLEAN_MARKER)).map_err(|e| StoreError::io(ctx("renaming"), e))?;
    sync_dir(root)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let keys = [ExtentKey {
            volume_id: 1,
            extent_index: 2,
            epoch: 3,
        }];
        write_clean_marker(dir.path(), &keys).unwrap();
        let got = take_clean_marker(dir.path()).unwrap().unwrap();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), keys);
        assert!(
            take_clean_marker(dir.path()).unwrap().is_none(),
            "marker is consumed"
        );
        write_clean_marker(dir.path(), &[]).unwrap();
        let p = dir.path().join(CLEAN_MARKER);
        let t = fs::read_to_string(&p).unwrap().replace("v1", "v2");
        fs::write(&p, t).unwrap();
        assert!(
            take_clean_marker(dir.path()).unwrap().is_none(),
            "damaged marker means unclean"
        );
    }
}
