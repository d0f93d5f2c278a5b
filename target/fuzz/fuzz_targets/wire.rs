//! The pure byte-level code: request and option-data parsers, message
//! encoders, and the block status descriptor builder. Byte 0 picks the
//! function (mod 6); the rest is its input. Parsers must never panic, and
//! whatever they accept must encode back to the same bytes.
#![no_main]

use cairn_target::nbd::transmit::descriptors;
use cairn_target::nbd::wire::*;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, d)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            let mut h = [0u8; REQUEST_BYTES];
            let n = d.len().min(REQUEST_BYTES);
            h[..n].copy_from_slice(&d[..n]);
            match parse_request(&h) {
                Ok(r) => {
                    assert_eq!(encode_request(&r), h, "request round trip");
                    let _ = command_name(r.kind);
                }
                Err(BadMagic(m)) => assert_ne!(m, REQUEST_MAGIC),
            }
        }
        1 => match parse_info(d) {
            Ok(r) => {
                let mut e = Vec::new();
                string(&mut e, &r.name);
                e.extend_from_slice(&(r.requests.len() as u16).to_be_bytes());
                for q in &r.requests {
                    e.extend_from_slice(&q.to_be_bytes());
                }
                assert_eq!(e, d, "INFO/GO data round trip");
                assert!(r.name.len() <= STRING_BYTES_MAX);
            }
            Err(e) => {
                let _ = e.reply_type();
            }
        },
        2 => match parse_meta(d) {
            Ok(m) => {
                let mut e = Vec::new();
                string(&mut e, &m.export);
                e.extend_from_slice(&(m.queries.len() as u32).to_be_bytes());
                for q in &m.queries {
                    string(&mut e, q);
                    assert!(q.len() <= STRING_BYTES_MAX);
                    let _ = meta_matches(q, true);
                    let _ = meta_matches(q, false);
                }
                assert_eq!(e, d, "META_CONTEXT data round trip");
                assert!(m.queries.len() as u32 <= META_QUERIES_MAX);
            }
            Err(e) => {
                let _ = e.reply_type();
            }
        },
        3 => match parse_export_name(d) {
            Ok(n) => assert_eq!(n.as_bytes(), d, "EXPORT_NAME round trip"),
            Err(_) => assert!(d.len() > STRING_BYTES_MAX || std::str::from_utf8(d).is_err()),
        },
        4 => {
            // Strings the server puts on the wire: cut at the limit on a
            // character boundary, lengths in the headers matching.
            let s = String::from_utf8_lossy(d);
            let t = truncate(&s);
            assert!(s.starts_with(t) && t.len() <= STRING_BYTES_MAX);
            assert!(t.len() == s.len() || t.len() + 4 > STRING_BYTES_MAX);
            let r = option_error(OPT_GO, REP_ERR_INVALID, &s);
            assert_eq!(be32(&r[16..20]) as usize, r.len() - 20);
            assert_eq!(&r[20..], t.as_bytes());
            let c = error_chunk(7, EINVAL, &s);
            assert_eq!(be32(&c[16..20]) as usize, c.len() - 20);
            assert_eq!(u16::from_be_bytes([c[24], c[25]]) as usize, t.len());
            let v = rep_server(&s, &s);
            assert_eq!(be32(&v[16..20]) as usize, v.len() - 20);
            let i = info_string(OPT_INFO, INFO_DESCRIPTION, &s);
            assert_eq!(be32(&i[16..20]) as usize, i.len() - 20);
        }
        _ => {
            // Backend runs (u32 length, u32 flags) then the request length
            // and REQ_ONE: descriptors must be non-zero, at most one with
            // REQ_ONE and then within the length, and never go on once the
            // request is covered.
            if d.len() < 5 {
                return;
            }
            let len = be32(d);
            let req_one = d[4] & 1 != 0;
            let runs: Vec<(u64, u32)> = d[5..]
                .chunks_exact(8)
                .map(|c| ((be32(c) as u64) << (c[0] & 7), be32(&c[4..])))
                .collect();
            let out = descriptors(&runs, len, req_one);
            let total: u64 = runs.iter().map(|r| r.0).sum();
            if len > 0 && total > 0 {
                assert!(!out.is_empty(), "no descriptor for {runs:?} len {len}");
            }
            assert!(out.iter().all(|&(l, _)| l > 0), "zero-length descriptor {out:?}");
            if req_one {
                assert!(out.len() <= 1 && out.iter().all(|&(l, _)| l <= len), "{out:?}");
            }
            if let Some((_, head)) = out.split_last() {
                let s: u64 = head.iter().map(|&(l, _)| l as u64).sum();
                assert!(s < len as u64, "descriptors {out:?} go on past {len}");
            }
            let d_total: u64 = out.iter().map(|&(l, _)| l as u64).sum();
            assert!(d_total <= total, "descriptors {out:?} cover more than {runs:?}");
        }
    }
});
