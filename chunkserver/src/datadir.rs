//! The data directory: which node of which cluster it belongs to, and who is
//! using it.
//!
//! ```text
//! <data_dir>/identity.toml   cluster id, node id, format version, creation time, crc32
//! <data_dir>/LOCK            flock'd by the running server; holds its pid
//! <data_dir>/extents/        the store's root (Store::open)
//! ```
//!
//! The rules protect data that must outlive the hardware it sits on:
//! - a directory is formatted only on request (`--init`) and only when empty,
//!   so an unmounted data disk (an empty mount point) never silently becomes a
//!   new, empty node that the cluster would then trust;
//! - a directory formatted for one node is never served as another, nor
//!   reformatted; a damaged identity is reported, never rewritten;
//! - one server per directory, enforced by `flock` on LOCK, which the kernel
//!   drops when the process dies, so a crash never leaves a stale lock.
//!
//! [`DataDir::open`] runs every check in order, touching nothing until the
//! read-only checks have passed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::statvfs::{statvfs, FsFlags};
use serde::Deserialize;
use thiserror::Error;

pub const IDENTITY_FILE: &str = "identity.toml";
pub const LOCK_FILE: &str = "LOCK";
pub const EXTENTS_DIR: &str = "extents";
/// The identity format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The identity is a few hundred bytes; anything much larger is not ours.
const IDENTITY_BYTES_MAX: u64 = 64 << 10;
/// Written before the rename that publishes a new identity.
const IDENTITY_TMP_FILE: &str = "identity.toml.tmp";
/// Prefix of the file written and removed to prove the directory writable.
const PROBE_FILE_PREFIX: &str = ".cairn-write-probe-";
/// Bytes written by the probe: one file system block, so a full file system
/// fails the probe rather than fitting it into an inode.
const PROBE_BYTES: usize = 4096;
/// LOCK holds the pid padded to this width (u64's widest) and a newline.
const LOCK_PID_WIDTH: usize = 20;
/// Entries listed in the error for `--init` on a directory that is not empty.
const FOREIGN_ENTRIES_SHOWN_MAX: usize = 5;

/// Who a data directory belongs to, as stored in identity.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: u64,
    pub format_version: u32,
    pub created_unix_s: u64,
}

/// identity.toml as parsed, before its crc is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    cluster_id: String,
    node_id: u64,
    format_version: u32,
    created_unix_s: u64,
    crc32: u32,
}

impl Identity {
    fn new(cluster_id: &str, node_id: u64) -> Identity {
        let created_unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Identity {
            cluster_id: cluster_id.to_string(),
            node_id,
            format_version: FORMAT_VERSION,
            created_unix_s,
        }
    }

    /// CRC32 over every field in a fixed encoding (not over the TOML text, so
    /// it survives reformatting by hand; any changed value still fails it).
    /// The cluster id is length-prefixed so no two identities encode alike.
    pub fn crc32(&self) -> u32 {
        let encoded = format!(
            "cairn-identity format_version={} cluster_id={}:{} node_id={} created_unix_s={}",
            self.format_version,
            self.cluster_id.len(),
            self.cluster_id,
            self.node_id,
            self.created_unix_s
        );
        crc32fast::hash(encoded.as_bytes())
    }

    /// The file's text, values in a fixed order with the crc last. The
    /// comment is not covered by the crc; every value is.
    pub fn to_toml(&self) -> String {
        // toml::Value renders the string quoted and escaped.
        let cluster_id = toml::Value::String(self.cluster_id.clone());
        format!(
            "# Identity of a Cairn chunk server data directory, written once by\n\
             # `cairn-chunkserver --init`. Do not edit: crc32 covers every value, and a\n\
             # mismatch stops the server.\n\
             format_version = {}\n\
             cluster_id = {cluster_id}\n\
             node_id = {}\n\
             created_unix_s = {}\n\
             crc32 = {}\n",
            self.format_version,
            self.node_id,
            self.created_unix_s,
            self.crc32()
        )
    }

    /// Parses and checks identity.toml's text. The error says what is wrong
    /// (the caller adds the path).
    pub fn parse(text: &str) -> Result<Identity, String> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| format!("not valid TOML ({})", e.message().trim().replace('\n', " ")))?;
        // The version first: a newer format may have other keys, and saying
        // "written by a newer version" beats "unknown key".
        match table.get("format_version") {
            None => return Err("missing field `format_version`".to_string()),
            Some(toml::Value::Integer(v)) if *v == i64::from(FORMAT_VERSION) => {}
            Some(toml::Value::Integer(v)) => {
                return Err(format!(
                    "unknown format_version {v} (this cairn-chunkserver reads version {FORMAT_VERSION}; was it written by a newer one?)"
                ))
            }
            Some(other) => return Err(format!("format_version is not an integer: {other}")),
        }
        let file: IdentityFile = table
            .try_into()
            .map_err(|e: toml::de::Error| e.message().trim().replace('\n', " "))?;
        let identity = Identity {
            cluster_id: file.cluster_id,
            node_id: file.node_id,
            format_version: file.format_version,
            created_unix_s: file.created_unix_s,
        };
        let computed = identity.crc32();
        if computed != file.crc32 {
            return Err(format!(
                "crc32 mismatch: the file says {:#010x}, its values give {computed:#010x}; a value was changed or has decayed",
                file.crc32
            ));
        }
        Ok(identity)
    }
}

#[derive(Debug, Error)]
pub enum DataDirError {
    #[error("data directory {} does not exist. To format a new node there, pass --init (cluster {cluster_id} node {node_id}); if this node already has data, check that its disk is mounted and --data-dir points at it", .dir.display())]
    Missing {
        dir: PathBuf,
        cluster_id: String,
        node_id: u64,
    },

    #[error("data directory {} is not a directory", .dir.display())]
    NotADirectory { dir: PathBuf },

    #[error("data directory {} is not formatted (it has no {IDENTITY_FILE}{}). To format it as a new node, node {node_id} of cluster {cluster_id}, pass --init; if this node already has data, check that its disk is mounted and --data-dir points at it", .dir.display(), if *.has_other_files { " but holds other files" } else { "" })]
    NotInitialized {
        dir: PathBuf,
        cluster_id: String,
        node_id: u64,
        has_other_files: bool,
    },

    #[error("refusing to --init data directory {}: it is not empty and has no {IDENTITY_FILE} (it holds {}). --init formats only an empty directory and never writes over files it did not create; point --data-dir at an empty directory, or move those files away", .dir.display(), .entries.join(", "))]
    InitNotEmpty { dir: PathBuf, entries: Vec<String> },

    #[error("data directory {} belongs to cluster {found_cluster} node {found_node}; this server is configured for cluster {want_cluster} node {want_node}. Pass the --data-dir of this node, or wipe the directory to reuse it (--init never reformats)", .dir.display())]
    IdentityMismatch {
        dir: PathBuf,
        found_cluster: String,
        found_node: u64,
        want_cluster: String,
        want_node: u64,
    },

    #[error("identity file {} is corrupt: {reason}. It was left unchanged; restore it from a backup or from the cluster's records (this node's cluster id and node id)", .path.display())]
    CorruptIdentity { path: PathBuf, reason: String },

    #[error("data directory {} has an identity but no {EXTENTS_DIR}/ folder: its extents are missing. Refusing to serve it as an empty node; check the disk, or wipe the directory and re-add the node", .dir.display())]
    ExtentsMissing { dir: PathBuf },

    #[error("data directory {} is in use by another cairn-chunkserver ({}). Stop that server first, or pass the --data-dir of another node", .dir.display(), match .pid { Some(pid) => format!("pid {pid} in {}", .lock_path.display()), None => format!("pid unknown, {} holds no pid", .lock_path.display()) })]
    InUse {
        dir: PathBuf,
        lock_path: PathBuf,
        pid: Option<u32>,
    },

    #[error("data directory {} is not writable ({reason}). Remount its file system read-write or fix its permissions", .dir.display())]
    NotWritable { dir: PathBuf, reason: String },

    /// Below `free_bytes_min`, or a write failed with ENOSPC (`failed`
    /// says which write).
    #[error("file system of {} is full ({free_bytes} bytes free; {}). Free some space on it", .dir.display(), match .failed { Some(doing) => format!("{doing} failed: no space left on device"), None => format!("cairn-chunkserver needs at least {free_bytes_min}, set by --free-bytes-min / free_bytes_min") })]
    Full {
        dir: PathBuf,
        free_bytes: u64,
        free_bytes_min: u64,
        failed: Option<String>,
    },

    #[error("data directory {}: {context}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },
}

/// What [`DataDir::open`] needs to know.
#[derive(Debug, Clone)]
pub struct DataDirOptions {
    pub dir: PathBuf,
    pub cluster_id: String,
    pub node_id: u64,
    /// Format the directory if it is empty (`--init`).
    pub init: bool,
    /// Refuse to start below this many free bytes.
    pub free_bytes_min: u64,
}

/// An opened data directory: identity checked, lock held. Dropping it
/// releases the lock, so keep it until the store has shut down.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    identity: Identity,
    /// Whether this open formatted the directory.
    formatted: bool,
    _lock: Flock<File>,
}

/// What the read-only inspection found.
enum Contents {
    Identity(Identity),
    /// Nothing but what an interrupted `--init` or `mkfs` leaves.
    Empty,
    Foreign(Vec<String>),
}

impl DataDir {
    /// Checks and locks the data directory, formatting it first if it is
    /// empty and `init` is set. Order: existence, identity (read only), free
    /// space and read-only mount (statvfs), the lock, a write probe, then
    /// formatting. Nothing is written before the identity has been checked.
    pub fn open(options: &DataDirOptions) -> Result<DataDir, DataDirError> {
        let dir = &options.dir;
        ensure_exists(options)?;
        let contents = inspect(dir)?;
        match (&contents, options.init) {
            (Contents::Identity(found), _) => check_identity(dir, found, options)?,
            (Contents::Empty, true) => {}
            (Contents::Foreign(entries), true) => {
                return Err(DataDirError::InitNotEmpty {
                    dir: dir.clone(),
                    entries: entries.clone(),
                })
            }
            (Contents::Empty | Contents::Foreign(_), false) => {
                return Err(DataDirError::NotInitialized {
                    dir: dir.clone(),
                    cluster_id: options.cluster_id.clone(),
                    node_id: options.node_id,
                    has_other_files: matches!(contents, Contents::Foreign(_)),
                })
            }
        }
        check_space(dir, options.free_bytes_min)?;
        let lock = lock(dir, options.free_bytes_min)?;
        probe_writable(dir, options.free_bytes_min)?;

        let (identity, formatted) = match contents {
            Contents::Identity(identity) => {
                if !dir.join(EXTENTS_DIR).is_dir() {
                    return Err(DataDirError::ExtentsMissing { dir: dir.clone() });
                }
                (identity, false)
            }
            _ => {
                // Inspect again under the lock: another --init may have
                // finished between the first look and the lock.
                match inspect(dir)? {
                    Contents::Identity(found) => {
                        check_identity(dir, &found, options)?;
                        (found, false)
                    }
                    Contents::Foreign(entries) => {
                        return Err(DataDirError::InitNotEmpty {
                            dir: dir.clone(),
                            entries,
                        })
                    }
                    Contents::Empty => (format(dir, &options.cluster_id, options.node_id)?, true),
                }
            }
        };
        Ok(DataDir {
            dir: dir.clone(),
            identity,
            formatted,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The store's root, passed to [`Store::open`](crate::store::Store::open).
    pub fn extents_dir(&self) -> PathBuf {
        self.dir.join(EXTENTS_DIR)
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether this open formatted a new node (for the start-up log).
    pub fn formatted(&self) -> bool {
        self.formatted
    }
}

fn io_error(dir: &Path, context: impl Into<String>) -> impl FnOnce(io::Error) -> DataDirError {
    let dir = dir.to_path_buf();
    let context = context.into();
    move |source| DataDirError::Io {
        dir,
        context,
        source,
    }
}

fn ensure_exists(options: &DataDirOptions) -> Result<(), DataDirError> {
    let dir = &options.dir;
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DataDirError::NotADirectory { dir: dir.clone() }),
        Err(e) if e.kind() == ErrorKind::NotFound && options.init => {
            fs::create_dir_all(dir).map_err(|e| classify_write_error(dir, "creating it", e, 0))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Err(DataDirError::Missing {
            dir: dir.clone(),
            cluster_id: options.cluster_id.clone(),
            node_id: options.node_id,
        }),
        Err(e) => Err(io_error(dir, "reading its metadata")(e)),
    }
}

/// Looks at the directory without writing anything.
fn inspect(dir: &Path) -> Result<Contents, DataDirError> {
    let identity_path = dir.join(IDENTITY_FILE);
    if let Some(identity) = read_identity(&identity_path)? {
        return Ok(Contents::Identity(identity));
    }
    let mut foreign = Vec::new();
    let entries = fs::read_dir(dir).map_err(io_error(dir, "listing it"))?;
    for entry in entries {
        let entry = entry.map_err(io_error(dir, "listing it"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !leftover_of_init(dir, &name) {
            foreign.push(name);
        }
    }
    if foreign.is_empty() {
        return Ok(Contents::Empty);
    }
    foreign.sort();
    let more = foreign.len().saturating_sub(FOREIGN_ENTRIES_SHOWN_MAX);
    foreign.truncate(FOREIGN_ENTRIES_SHOWN_MAX);
    if more > 0 {
        foreign.push(format!("and {more} more"));
    }
    Ok(Contents::Foreign(foreign))
}

/// Entries an empty directory may hold: `lost+found` of a fresh file system,
/// and what an `--init` interrupted before its identity was published leaves
/// (LOCK, an empty extents/, the temporary identity, a write probe).
fn leftover_of_init(dir: &Path, name: &str) -> bool {
    let path = dir.join(name);
    match name {
        "lost+found" => path.is_dir(),
        LOCK_FILE | IDENTITY_TMP_FILE => path.is_file(),
        EXTENTS_DIR => fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none()),
        _ => name.starts_with(PROBE_FILE_PREFIX) && path.is_file(),
    }
}

/// Reads identity.toml; `None` if there is none.
fn read_identity(path: &Path) -> Result<Option<Identity>, DataDirError> {
    let corrupt = |reason: String| DataDirError::CorruptIdentity {
        path: path.to_path_buf(),
        reason,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(corrupt(format!("cannot open it: {e}"))),
    };
    let mut raw = Vec::new();
    // Bounded, so a huge file in the wrong place is an error, not an allocation.
    file.take(IDENTITY_BYTES_MAX + 1)
        .read_to_end(&mut raw)
        .map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    if raw.len() as u64 > IDENTITY_BYTES_MAX {
        return Err(corrupt(format!("larger than {IDENTITY_BYTES_MAX} bytes")));
    }
    if raw.is_empty() {
        return Err(corrupt("the file is empty".to_string()));
    }
    let text = String::from_utf8(raw).map_err(|_| corrupt("not UTF-8 text".to_string()))?;
    Identity::parse(&text).map(Some).map_err(corrupt)
}

fn check_identity(
    dir: &Path,
    found: &Identity,
    options: &DataDirOptions,
) -> Result<(), DataDirError> {
    if found.cluster_id == options.cluster_id && found.node_id == options.node_id {
        return Ok(());
    }
    Err(DataDirError::IdentityMismatch {
        dir: dir.to_path_buf(),
        found_cluster: found.cluster_id.clone(),
        found_node: found.node_id,
        want_cluster: options.cluster_id.clone(),
        want_node: options.node_id,
    })
}

/// Free bytes for unprivileged writers (f_bavail): the root reserve is left
/// for the administrator's repairs, not for extents.
fn free_bytes(dir: &Path) -> Result<(u64, bool), DataDirError> {
    let stat = statvfs(dir)
        .map_err(|e| io_error(dir, "reading its file system's free space")(io::Error::from(e)))?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let free = u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
    Ok((free, stat.flags().contains(FsFlags::ST_RDONLY)))
}

fn check_space(dir: &Path, free_bytes_min: u64) -> Result<(), DataDirError> {
    let (free, read_only) = free_bytes(dir)?;
    if read_only {
        return Err(DataDirError::NotWritable {
            dir: dir.to_path_buf(),
            reason: "its file system is mounted read-only".to_string(),
        });
    }
    if free < free_bytes_min {
        return Err(DataDirError::Full {
            dir: dir.to_path_buf(),
            free_bytes: free,
            free_bytes_min,
            failed: None,
        });
    }
    Ok(())
}

/// Maps a failed write to the error a person can act on.
fn classify_write_error(
    dir: &Path,
    doing: &str,
    error: io::Error,
    free_bytes_min: u64,
) -> DataDirError {
    match error.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DataDirError::Full {
            dir: dir.to_path_buf(),
            free_bytes: free_bytes(dir).map(|(free, _)| free).unwrap_or(0),
            free_bytes_min,
            failed: Some(doing.to_string()),
        },
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => DataDirError::NotWritable {
            dir: dir.to_path_buf(),
            reason: format!("{doing} failed: {error}"),
        },
        _ => DataDirError::Io {
            dir: dir.to_path_buf(),
            context: doing.to_string(),
            source: error,
        },
    }
}

/// Takes the exclusive lock and writes this process's pid into LOCK.
fn lock(dir: &Path, free_bytes_min: u64) -> Result<Flock<File>, DataDirError> {
    let lock_path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| classify_write_error(dir, "opening LOCK", e, free_bytes_min))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
                lock_path,
                pid,
            });
        }
        Err((_, errno)) => {
            return Err(io_error(dir, "locking LOCK")(io::Error::from(errno)));
        }
    };
    // The pid is for people (the InUse message); the flock is the lock. It is
    // not fsynced: after a crash the lock is gone with the process anyway.
    // Fixed width and written in place, so a later start overwrites the same
    // bytes and needs no new block even on a full file system.
    let pid = format!("{:<width$}\n", std::process::id(), width = LOCK_PID_WIDTH);
    lock.write_all_at(pid.as_bytes(), 0)
        .map_err(|e| classify_write_error(dir, "writing the pid into LOCK", e, free_bytes_min))?;
    Ok(lock)
}

/// Proves the directory writable and the file system not full by creating,
/// filling, syncing and removing a small file. Permission bits cannot tell:
/// root ignores them, and a full or read-only-remounted disk shows up only
/// on writing.
fn probe_writable(dir: &Path, free_bytes_min: u64) -> Result<(), DataDirError> {
    let path = dir.join(format!("{PROBE_FILE_PREFIX}{}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    let removed = fs::remove_file(&path);
    result.map_err(|e| classify_write_error(dir, "writing a probe file", e, free_bytes_min))?;
    match removed {
        Ok(()) => Ok(()),
        Err(e) => Err(classify_write_error(
            dir,
            "removing a probe file",
            e,
            free_bytes_min,
        )),
    }
}

/// Formats an empty directory: extents/ first, then the identity, whose
/// rename is the commit point. A crash before the rename leaves a directory
/// [`inspect`] still calls empty, so `--init` can simply run again.
fn format(dir: &Path, cluster_id: &str, node_id: u64) -> Result<Identity, DataDirError> {
    let extents = dir.join(EXTENTS_DIR);
    match fs::create_dir(&extents) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(classify_write_error(dir, "creating extents/", e, 0)),
    }
    let identity = Identity::new(cluster_id, node_id);
    write_atomically(dir, IDENTITY_FILE, identity.to_toml().as_bytes())?;
    // Read back what was published: a format that cannot be read back is
    // better caught now than at the next start.
    let identity_path = dir.join(IDENTITY_FILE);
    match read_identity(&identity_path)? {
        Some(read) if read == identity => Ok(identity),
        other => Err(DataDirError::CorruptIdentity {
            path: identity_path,
            reason: format!("read back {other:?} right after writing {identity:?}"),
        }),
    }
}

/// Writes `name` in `dir` so that a crash leaves the old file or the new one,
/// never a mix: temporary file, fsync, rename, fsync of the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DataDirError> {
    let tmp = dir.join(IDENTITY_TMP_FILE);
    let fail = |doing: &str| {
        let doing = doing.to_string();
        move |e: io::Error| classify_write_error(dir, &doing, e, 0)
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(fail("creating identity.toml.tmp"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(fail("writing identity.toml.tmp"))?;
    drop(file);
    fs::rename(&tmp, dir.join(name)).map_err(fail("renaming identity.toml.tmp"))?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<(), DataDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "syncing the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, init: bool) -> DataDirOptions {
        DataDirOptions {
            dir: dir.to_path_buf(),
            cluster_id: "c1".to_string(),
            node_id: 3,
            init,
            free_bytes_min: 0,
        }
    }

    #[test]
    fn identity_round_trips_and_detects_changed_values() {
        let identity = Identity::new("c1", 3);
        let text = identity.to_toml();
        assert_eq!(Identity::parse(&text), Ok(identity.clone()));
        let changed = text.replace("node_id = 3", "node_id = 4");
        assert_ne!(changed, text);
        let error = Identity::parse(&changed).expect_err("crc");
        assert!(error.contains("crc32 mismatch"), "{error}");
        let newer = text.replace("format_version = 1", "format_version = 2");
        assert!(Identity::parse(&newer)
            .expect_err("version")
            .contains("unknown format_version 2"));
        let missing: String = text
            .lines()
            .filter(|l| !l.starts_with("node_id"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(Identity::parse(&missing)
            .expect_err("missing")
            .contains("node_id"));
        assert!(Identity::parse("\u{1}garbage = = =").is_err());
    }

    #[test]
    fn init_formats_then_reopens_and_refuses_others() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let opened = DataDir::open(&options(&dir, true)).expect("init");
        assert!(opened.formatted());
        assert!(opened.extents_dir().is_dir());
        // Locked while open.
        let busy = DataDir::open(&options(&dir, false)).expect_err("locked");
        assert!(
            matches!(busy, DataDirError::InUse { pid: Some(pid), .. } if pid == std::process::id())
        );
        drop(opened);
        let again = DataDir::open(&options(&dir, true)).expect("init is idempotent");
        assert!(!again.formatted());
        drop(again);
        let mut other = options(&dir, true);
        other.node_id = 4;
        let error = DataDir::open(&other).expect_err("other node");
        assert!(matches!(
            error,
            DataDirError::IdentityMismatch {
                found_node: 3,
                want_node: 4,
                ..
            }
        ));
    }

    #[test]
    fn no_identity_without_init_is_refused_and_untouched() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let error = DataDir::open(&options(tmp.path(), false)).expect_err("not formatted");
        assert!(matches!(error, DataDirError::NotInitialized { .. }));
        assert_eq!(fs::read_dir(tmp.path()).expect("list").count(), 0);
    }

    #[test]
    fn init_over_foreign_files_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("precious.dcm"), b"x").expect("write");
        let error = DataDir::open(&options(tmp.path(), true)).expect_err("foreign");
        assert!(error.to_string().contains("precious.dcm"), "{error}");
        assert_eq!(fs::read_dir(tmp.path()).expect("list").count(), 1);
    }

    #[test]
    fn free_space_minimum_is_enforced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut opts = options(tmp.path(), true);
        opts.free_bytes_min = u64::MAX;
        let error = DataDir::open(&opts).expect_err("full");
        assert!(matches!(error, DataDirError::Full { .. }), "{error}");
    }
}
