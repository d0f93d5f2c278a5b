//! Checks on single fields. Each returns what is wrong, in words; the caller
//! wraps it in a [`super::StateError`] naming the volume or node.

use super::{
    ADDR_BYTES_MAX, EXTENT_SIZE_BYTES_MAX, EXTENT_SIZE_BYTES_MIN, LABEL_BYTES_MAX, SECTOR_BYTES,
    VOLUME_NAME_BYTES_MAX, VOLUME_SIZE_BYTES_MAX,
};

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// `name` for an error message: at most [`VOLUME_NAME_BYTES_MAX`] bytes of
/// it, so that a megabyte of garbage is not echoed back whole.
pub fn shown(name: &str) -> String {
    if name.len() <= VOLUME_NAME_BYTES_MAX {
        return name.to_string();
    }
    let mut end = VOLUME_NAME_BYTES_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end])
}

/// Volume (and later snapshot) names: 1 to [`VOLUME_NAME_BYTES_MAX`] bytes
/// of `[A-Za-z0-9._-]`, not starting with `-` (it would read as a CLI flag)
/// or `.` (hidden files, `.` and `..` in paths built from names).
pub fn volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name is required".into());
    }
    if name.len() > VOLUME_NAME_BYTES_MAX {
        return Err(format!(
            "{} bytes long, at most {VOLUME_NAME_BYTES_MAX} allowed",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !name_char(*c)) {
        return Err(format!(
            "character {c:?} is not allowed (only A-Z a-z 0-9 . _ -)"
        ));
    }
    if name.starts_with(['-', '.']) {
        return Err("it must not start with '-' or '.'".into());
    }
    Ok(())
}

/// Failure-domain labels: up to [`LABEL_BYTES_MAX`] bytes of
/// `[A-Za-z0-9._-]`; empty only where `may_be_empty`.
pub fn label(what: &str, value: &str, may_be_empty: bool) -> Result<(), String> {
    if value.is_empty() && !may_be_empty {
        return Err(format!("a {what} label is required"));
    }
    if value.len() > LABEL_BYTES_MAX {
        return Err(format!(
            "{what} label is {} bytes long, at most {LABEL_BYTES_MAX} allowed",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| !name_char(*c)) {
        return Err(format!(
            "{what} label {value:?}: character {c:?} is not allowed (only A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(())
}

/// `host:port` (`[v6addr]:port` for IPv6): a host part without spaces and a
/// port from 1 to 65535. The host is not resolved here (apply does no I/O).
pub fn addr(addr: &str) -> Result<(), String> {
    if addr.len() > ADDR_BYTES_MAX {
        return Err(format!(
            "address is {} bytes long, at most {ADDR_BYTES_MAX} allowed",
            addr.len()
        ));
    }
    let bad = || format!("address {addr:?} is not host:port");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => Ok(()),
        _ => Err(format!("address {addr:?}: port {port:?} is not 1 to 65535")),
    }
}

/// Volume sizes: above 0, a multiple of [`SECTOR_BYTES`] (512), at most
/// [`VOLUME_SIZE_BYTES_MAX`].
///
/// Why 512 and not a multiple of the extent size: disk images are imported
/// at their exact size, which hypervisors only require to be whole sectors;
/// the last extent is then partly beyond the end and never addressed there.
pub fn volume_size(size_bytes: u64) -> Result<(), String> {
    if size_bytes == 0 {
        return Err("a volume needs at least one 512-byte sector".into());
    }
    if !size_bytes.is_multiple_of(SECTOR_BYTES) {
        let below = size_bytes - size_bytes % SECTOR_BYTES;
        return Err(match below.checked_add(SECTOR_BYTES) {
            Some(above) => {
                format!("not a multiple of {SECTOR_BYTES} (the nearest are {below} and {above})")
            }
            None => format!("not a multiple of {SECTOR_BYTES}"),
        });
    }
    if size_bytes > VOLUME_SIZE_BYTES_MAX {
        return Err(format!(
            "above the limit of {VOLUME_SIZE_BYTES_MAX} bytes (1 PiB)"
        ));
    }
    Ok(())
}

/// Extent sizes: a power of two from [`EXTENT_SIZE_BYTES_MIN`] (64 KiB) to
/// [`EXTENT_SIZE_BYTES_MAX`] (8 MiB).
///
/// The low end is the chunk server store's own limit (`EXTENT_BYTES_MIN` in
/// `chunkserver/src/store/layout.rs`), the high end the largest extent a
/// rejoin can copy in one frame (the store takes up to 64 MiB). Small extents suit
/// databases' small random writes after a snapshot (copy-on-write copies
/// less); large ones keep a petabyte volume's extent count down.
pub fn extent_size(extent_size_bytes: u32) -> bool {
    extent_size_bytes.is_power_of_two()
        && (EXTENT_SIZE_BYTES_MIN..=EXTENT_SIZE_BYTES_MAX).contains(&extent_size_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "pacs-vm1", "db_01.data", "A9", "x-", "x."] {
            assert_eq!(volume_name(good), Ok(()), "{good}");
        }
        assert!(volume_name(&"a".repeat(VOLUME_NAME_BYTES_MAX)).is_ok());
        for bad in ["", "-a", ".a", "a b", "a/b", "é", "a\0", "..", "a:b"] {
            assert!(volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(volume_name(&"a".repeat(VOLUME_NAME_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn long_names_are_cut_for_messages() {
        assert_eq!(shown("abc"), "abc");
        let long = "\u{e9}".repeat(VOLUME_NAME_BYTES_MAX);
        let cut = shown(&long);
        assert!(cut.len() <= VOLUME_NAME_BYTES_MAX + 3 && cut.ends_with("..."));
    }

    #[test]
    fn addrs() {
        for good in ["127.0.0.2:7000", "node-1:1", "[::1]:65535"] {
            assert_eq!(addr(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "host",
            ":7000",
            "host:",
            "host:0",
            "host:65536",
            "ho st:1",
            "host:+1",
            "host:x",
        ] {
            assert!(addr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert!(volume_size(512).is_ok());
        assert!(volume_size(VOLUME_SIZE_BYTES_MAX).is_ok());
        assert!(volume_size(0).is_err());
        assert!(volume_size(513).unwrap_err().contains("512 and 1024"));
        assert!(volume_size(VOLUME_SIZE_BYTES_MAX + 512).is_err());
        assert!(volume_size(u64::MAX).is_err());
        assert!(volume_size(u64::MAX - 511).is_err());
        assert!(extent_size(64 << 10) && extent_size(4 << 20) && extent_size(8 << 20));
        assert!(!extent_size(16 << 20));
        assert!(!extent_size(0) && !extent_size(32 << 10) && !extent_size(128 << 20));
        assert!(!extent_size(3 << 20));
    }
}
