//! What the benchmark needs to know about the file system it runs on.

use std::path::Path;

use anyhow::{bail, Context};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FsInfo {
    /// Name of the file system type where known (`ext4`, `xfs`, ...).
    pub fs_type: String,
    /// Bytes an unprivileged writer may still use.
    pub available_bytes: u64,
    pub capacity_bytes: u64,
}

/// `statfs(2)` magic numbers of the file systems worth naming in a report.
const FS_NAMES: &[(i64, &str)] = &[
    (0xEF53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
    (0x2FC1_2FC1, "zfs"),
    (0xF2F5_2010, "f2fs"),
    (0x6969, "nfs"),
];

pub fn fs_info(path: &Path) -> anyhow::Result<FsInfo> {
    let context = || format!("reading file system information of {}", path.display());
    let fs = nix::sys::statfs::statfs(path).with_context(context)?;
    let vfs = nix::sys::statvfs::statvfs(path).with_context(context)?;
    // The libc field types differ in width and sign between targets; every
    // value here fits in 64 bits.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let (magic, fragment_bytes, available, capacity) = (
        fs.filesystem_type().0 as i64,
        vfs.fragment_size() as u64,
        vfs.blocks_available() as u64,
        vfs.blocks() as u64,
    );
    let fs_type = FS_NAMES
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| name.to_string())
        .unwrap_or_else(|| format!("unknown ({magic:#x})"));
    Ok(FsInfo {
        fs_type,
        available_bytes: available.saturating_mul(fragment_bytes),
        capacity_bytes: capacity.saturating_mul(fragment_bytes),
    })
}

/// Refuses to start a run that would fill the file system half-way through.
pub fn check_space(dir: &Path, info: &FsInfo, needed_bytes: u64) -> anyhow::Result<()> {
    if info.available_bytes < needed_bytes {
        bail!(
            "the benchmark needs about {} free on the file system of {} but only {} is available; \
             pass a smaller --size-mib or --extents-for-memory, or --dir on a larger file system",
            crate::output::bytes_human(needed_bytes),
            dir.display(),
            crate::output::bytes_human(info.available_bytes),
        );
    }
    Ok(())
}
