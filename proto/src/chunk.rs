//! Chunk server RPC messages.
//!
//! One request frame carries a [`ChunkRequest`] header and, for `Write`, the
//! data bytes. One reply frame carries a [`ChunkResponse`] header and, for a
//! successful `Read`, the data bytes. Replies carry the request's id and may
//! arrive in any order.

/// Operations a chunk server answers. Unknown values are answered with
/// `Status::UnknownOp`, never by closing the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum Op {
    Unspecified = 0,
    Read = 1,
    Write = 2,
    WriteZeroes = 3,
    Trim = 4,
    Flush = 5,
    ExtentList = 6,
    ExtentStat = 7,
    NodeStat = 8,
    /// A volume client's request to a group's primary: header field
    /// `group`, data a write's bytes; a read's reply carries the data.
    /// Refusals come back as `Status::Refused` with `refusal` set.
    Group = 9,
    /// A message between members of a group: header field `peer`, data a
    /// forwarded write or pushed extent. Never answered: the group protocol
    /// acknowledges with messages of its own (see `crate::group`).
    Peer = 10,
    /// Which 4 KiB blocks one extent version holds itself (written or
    /// zeroed in that version, not read through to older epochs): the
    /// reply's data is a bitmap, bit `i` of little-endian 64-bit word
    /// `i / 64` for block `i`. `Status::NotFound` if the version is not
    /// stored. For snapshot diffs.
    ExtentHeld = 11,
}

/// Outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    /// Bad offset, length, alignment or extent size; `message` says which.
    InvalidArgument = 1,
    UnknownOp = 2,
    /// A block failed its CRC32 check; `message` names volume, extent and block.
    ChecksumMismatch = 3,
    /// The data directory's file system is full.
    NoSpace = 4,
    /// Any other I/O error from the disk; `message` carries the OS error.
    IoError = 5,
    /// The server is stopping and takes no new work.
    ShuttingDown = 6,
    /// The extent named by `ExtentStat` does not exist.
    NotFound = 7,
    /// An extent file exists with another extent size than the request's.
    ExtentSizeMismatch = 8,
    /// A `Group` request was refused by the group protocol; `refusal` says
    /// why. Every refusal is worth a retry (after a newer map for some).
    Refused = 9,
}

/// Which stored extent version a request addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct ExtentKey {
    #[prost(uint64, tag = "1")]
    pub volume_id: u64,
    #[prost(uint64, tag = "2")]
    pub extent_index: u64,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ChunkRequest {
    /// Chosen by the client, echoed in the reply; never 0 (a reply with id 0
    /// means the server could not decode a header and is closing).
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(enumeration = "Op", tag = "2")]
    pub op: i32,
    #[prost(message, optional, tag = "3")]
    pub extent: ::core::option::Option<ExtentKey>,
    /// The volume's extent size; a power of two from 64 KiB to 64 MiB.
    #[prost(uint32, tag = "4")]
    pub extent_bytes: u32,
    /// Byte offset inside the extent; a multiple of 512.
    #[prost(uint64, tag = "5")]
    pub offset_bytes: u64,
    /// Bytes to read, zero or trim; for `Write` it must equal the data length.
    #[prost(uint32, tag = "6")]
    pub length_bytes: u32,
    /// Write, WriteZeroes: durable before the reply.
    #[prost(bool, tag = "7")]
    pub fua: bool,
    /// ExtentList: only this volume.
    #[prost(uint64, optional, tag = "8")]
    pub volume_filter: ::core::option::Option<u64>,
    /// ExtentList: continue after this key (exclusive); pages are key-ordered.
    #[prost(message, optional, tag = "9")]
    pub list_after: ::core::option::Option<ExtentKey>,
    /// ExtentList: most entries wanted; the server caps it at its own page size.
    #[prost(uint32, tag = "10")]
    pub list_limit: u32,
    /// WriteZeroes: keep the blocks allocated instead of punching a hole.
    #[prost(bool, tag = "11")]
    pub no_hole: bool,
    /// Op `Group`.
    #[prost(message, optional, tag = "12")]
    pub group: ::core::option::Option<crate::group::GroupRequest>,
    /// Op `Peer`.
    #[prost(message, optional, tag = "13")]
    pub peer: ::core::option::Option<crate::group::PeerHeader>,
    /// Read: the epochs beneath `extent`'s, newest first: blocks the
    /// version does not hold are read through them (diagnostics and replica
    /// comparisons; volume clients read through `Group`).
    #[prost(uint64, repeated, tag = "14")]
    pub below: ::prost::alloc::vec::Vec<u64>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ExtentInfo {
    #[prost(message, optional, tag = "1")]
    pub key: ::core::option::Option<ExtentKey>,
    #[prost(uint32, tag = "2")]
    pub extent_bytes: u32,
    /// Bytes the file system has allocated for this extent (data and metadata).
    #[prost(uint64, tag = "3")]
    pub allocated_bytes: u64,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NodeStat {
    #[prost(string, tag = "1")]
    pub cluster_id: ::prost::alloc::string::String,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    /// Size of the file system holding the data directory.
    #[prost(uint64, tag = "3")]
    pub capacity_bytes: u64,
    /// Bytes still available to the chunk server on that file system.
    #[prost(uint64, tag = "4")]
    pub free_bytes: u64,
    /// Bytes allocated by extent files.
    #[prost(uint64, tag = "5")]
    pub used_bytes: u64,
    #[prost(uint64, tag = "6")]
    pub extents: u64,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ChunkResponse {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    /// Human-readable error naming volume, extent, block and node where known.
    #[prost(string, tag = "3")]
    pub message: ::prost::alloc::string::String,
    #[prost(message, repeated, tag = "4")]
    pub extents: ::prost::alloc::vec::Vec<ExtentInfo>,
    /// ExtentList: true if more entries follow the last one returned.
    #[prost(bool, tag = "5")]
    pub list_more: bool,
    #[prost(message, optional, tag = "6")]
    pub node: ::core::option::Option<NodeStat>,
    /// With `Status::Refused`.
    #[prost(message, optional, tag = "7")]
    pub refusal: ::core::option::Option<crate::group::GroupRefusal>,
}

/// Largest number of entries in one ExtentList reply page.
pub const EXTENT_LIST_PAGE_MAX: u32 = 4096;
