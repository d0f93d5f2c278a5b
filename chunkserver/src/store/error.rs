//! Store errors. Every variant names what it concerns (volume, extent, block, file).

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::ExtentKey;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The request itself is wrong (alignment, range, extent size).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A block's data matches none of its stored checksums: torn by a crash
    /// before it was flushed, or decayed on disk. Never returned as data.
    #[error("checksum mismatch in volume {:#x} extent {} epoch {} block {block_index} ({path}): {detail}", .key.volume_id, .key.extent_index, .key.epoch, path = .path.display())]
    Checksum {
        key: ExtentKey,
        block_index: u32,
        path: PathBuf,
        detail: String,
    },

    /// An extent file exists with another extent size than the request names.
    #[error("volume {:#x} extent {} epoch {} is stored with extent size {stored_bytes} bytes, request says {requested_bytes}", .key.volume_id, .key.extent_index, .key.epoch)]
    ExtentSizeMismatch {
        key: ExtentKey,
        stored_bytes: u32,
        requested_bytes: u32,
    },

    /// An extent file's header or size is not what Cairn writes.
    #[error("corrupt extent file {}: {reason}", .path.display())]
    CorruptExtent { path: PathBuf, reason: String },

    /// The file system holding the data directory is full.
    #[error("no space left on the data directory's file system while {context}")]
    NoSpace { context: String },

    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// A flush failed earlier; the kernel may have dropped dirty pages, so the
    /// store refuses further writes rather than acknowledge what it cannot keep.
    #[error("store failed and refuses writes: {0}")]
    Failed(String),

    #[error("extent not found: volume {:#x} extent {} epoch {}", .0.volume_id, .0.extent_index, .0.epoch)]
    NotFound(ExtentKey),

    #[error("store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// Wraps an OS error with what the store was doing; ENOSPC becomes `NoSpace`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            StoreError::NoSpace { context }
        } else {
            StoreError::Io { context, source }
        }
    }

    pub fn from_errno(context: impl Into<String>, errno: i32) -> Self {
        Self::io(context, io::Error::from_raw_os_error(errno))
    }
}

impl Clone for StoreError {
    fn clone(&self) -> Self {
        match self {
            StoreError::InvalidArgument(s) => StoreError::InvalidArgument(s.clone()),
            StoreError::Checksum {
                key,
                block_index,
                path,
                detail,
            } => StoreError::Checksum {
                key: *key,
                block_index: *block_index,
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::ExtentSizeMismatch {
                key,
                stored_bytes,
                requested_bytes,
            } => StoreError::ExtentSizeMismatch {
                key: *key,
                stored_bytes: *stored_bytes,
                requested_bytes: *requested_bytes,
            },
            StoreError::CorruptExtent { path, reason } => StoreError::CorruptExtent {
                path: path.clone(),
                reason: reason.clone(),
            },
            StoreError::NoSpace { context } => StoreError::NoSpace {
                context: context.clone(),
            },
            StoreError::Io { context, source } => StoreError::Io {
                context: context.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Failed(s) => StoreError::Failed(s.clone()),
            StoreError::NotFound(k) => StoreError::NotFound(*k),
            StoreError::ShuttingDown => StoreError::ShuttingDown,
        }
    }
}
