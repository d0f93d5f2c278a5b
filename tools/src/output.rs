//! Small helpers shared by the commands' human output.

use std::io;

/// True if `e` (or anything in its chain) is a write to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

const KIB: f64 = 1024.0;

/// `1536` -> `"1.5 KiB"`; binary units, one decimal.
pub fn bytes_human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= KIB && unit + 1 < units.len() {
        value /= KIB;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// `100000` -> `"100,000"`.
pub fn count_human(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Parses a volume id given as decimal or `0x`-prefixed hex (ids print as hex).
pub fn parse_u64_dec_or_hex(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}` is not a decimal or 0x-hex 64-bit number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes_human(0), "0 B");
        assert_eq!(bytes_human(1023), "1023 B");
        assert_eq!(bytes_human(1536), "1.5 KiB");
        assert_eq!(bytes_human(128 << 20), "128.0 MiB");
        assert_eq!(count_human(0), "0");
        assert_eq!(count_human(999), "999");
        assert_eq!(count_human(1000), "1,000");
        assert_eq!(count_human(100_000), "100,000");
        assert_eq!(count_human(1_234_567), "1,234,567");
    }

    #[test]
    fn volume_ids() {
        assert_eq!(parse_u64_dec_or_hex("42"), Ok(42));
        assert_eq!(parse_u64_dec_or_hex("0x2a"), Ok(42));
        assert_eq!(parse_u64_dec_or_hex("0X2A"), Ok(42));
        assert!(parse_u64_dec_or_hex("").is_err());
        assert!(parse_u64_dec_or_hex("0x").is_err());
        assert!(parse_u64_dec_or_hex("-1").is_err());
        assert!(parse_u64_dec_or_hex("18446744073709551616").is_err());
    }
}
