//! Scrubbing a volume's extents: every copy of every block is read and
//! compared, bad or differing copies are replaced (`ClientOp::Scrub`; the
//! protocol side is the primary's scrub task in `cairn-group`). What walks
//! a whole volume, paces it and reports progress is the CLI's
//! (`cairn volume scrub`).

use cairn_group::msg::{ClientOp, ScrubFound};
use futures::stream::{self, StreamExt};
use prost::Message;

use crate::error::ClientError;
use crate::volume::Volume;

/// One scrub request covers at most this much of an extent: the primary
/// holds the range's lock (writes to it wait) while every copy is read.
pub const SCRUB_PIECE_BYTES: u64 = 1 << 20;

/// Pieces of one extent scrubbed at once.
const SCRUB_PIECES_IN_FLIGHT: usize = 2;

/// What scrubbing one piece of an extent found.
#[derive(Debug)]
pub struct ScrubPiece {
    /// The extent.
    pub index: u64,
    /// Byte offset inside it.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// The primary's findings, or why the piece could not be scrubbed (its
    /// copy did not read and no replica could repair it, or the group
    /// stayed unavailable).
    pub found: Result<ScrubFound, ClientError>,
}

impl Volume {
    /// Scrubs all of extent `index` (the version this handle reads: the
    /// head, or a snapshot's for a snapshot view), piece by piece. Every
    /// piece is answered, clean, repaired or failed; the call itself fails
    /// only for an extent past the volume's end.
    pub async fn scrub_extent(&self, index: u64) -> Result<Vec<ScrubPiece>, ClientError> {
        let info = self.info();
        let extent_bytes = u64::from(info.extent_size_bytes);
        let extents = self.size().div_ceil(extent_bytes);
        if index >= extents {
            return Err(ClientError::InvalidArgument {
                volume: info.name.clone(),
                offset: index.saturating_mul(extent_bytes),
                len: extent_bytes,
                reason: format!("extent {index} is past the volume's last extent"),
            });
        }
        let piece = SCRUB_PIECE_BYTES.min(extent_bytes);
        let pieces = (0..extent_bytes.div_ceil(piece)).map(|i| {
            let offset = i * piece;
            (offset, piece.min(extent_bytes - offset))
        });
        Ok(stream::iter(pieces)
            .map(|(offset, len)| async move {
                let op = ClientOp::Scrub {
                    ext: self.extent_id(index),
                    offset,
                    len,
                };
                let found = match self.cluster().run(info, op, None).await {
                    Ok((key, data)) => ScrubFound::decode(&data[..]).map_err(|e| {
                        ClientError::Unavailable(format!(
                            "volume {}: the primary of {key} answered a scrub of extent {index} at {offset} with an undecodable report: {e}",
                            info.name
                        ))
                    }),
                    Err(e) => Err(e),
                };
                ScrubPiece {
                    index,
                    offset,
                    len,
                    found,
                }
            })
            .buffered(SCRUB_PIECES_IN_FLIGHT)
            .collect()
            .await)
    }
}
