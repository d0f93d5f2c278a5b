//! The hash every placement decision rests on, and a logarithm with the same
//! bits on every machine.
//!
//! Where data lives is computed, never stored: every process that holds the
//! cluster map derives the same locations from it. So the functions here are
//! part of the on-disk format. Changing any constant, the order of the fields
//! fed in, or a single rounding step would move data that is already written
//! to nodes that do not hold it. The tests at the bottom pin known outputs so
//! that an accidental change fails the build; a deliberate change needs a new
//! placement version and a migration, not an edit.
//!
//! Why written here rather than taken from a crate: the mixer is a dozen lines
//! whose output is fixed by its definition (splitmix64's finaliser, below), so
//! there is nothing to keep up to date, and no dependency can change it under
//! us. General-purpose hashers (`std`'s `DefaultHasher`, `ahash`, ...) make no
//! promise that their output stays the same across releases or platforms.

/// splitmix64's output function (Steele, Lea and Flood, "Fast splittable
/// pseudorandom number generators", OOPSLA 2014; the constants are David
/// Stafford's "Mix13" variant, as in `java.util.SplittableRandom` and in the
/// seeding of xoshiro). A bijection on `u64` with full avalanche: every input
/// bit flips each output bit with probability close to 1/2.
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64's increment, 2^64 divided by the golden ratio (odd).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Domain tag for extent -> group (`group_of`).
pub(crate) const TAG_GROUP: u64 = u64::from_be_bytes(*b"cairn/gp");
/// Domain tag for the rendezvous draw of (group, node).
pub(crate) const TAG_DRAW: u64 = u64::from_be_bytes(*b"cairn/rv");

/// A stable 64-bit hash of a tag and a sequence of words:
///
/// ```text
/// h = mix64(tag)
/// for each word w:  h = mix64((h + GOLDEN_GAMMA) ^ w)      (wrapping add)
/// ```
///
/// Each step is a bijection of the word for a fixed prefix, so two inputs of
/// the same length that differ in one word never collide on that account, and
/// the finaliser after every word spreads it over all 64 bits. The tag keeps
/// the two uses (extent -> group, group x node draws) independent.
pub(crate) fn stable_hash(tag: u64, words: &[u64]) -> u64 {
    let mut h = mix64(tag);
    for &w in words {
        h = mix64(h.wrapping_add(GOLDEN_GAMMA) ^ w);
    }
    h
}

/// Natural logarithm of a positive normal `f64`, computed with IEEE-754
/// addition, multiplication and division only.
///
/// `f64::ln` calls the platform's libm, and libms differ in the last bit
/// between platforms and versions; a last-bit difference can flip which of two
/// nodes scores higher, and then two processes disagree about where a replica
/// is. The basic operations are correctly rounded by IEEE 754 (Rust neither
/// fuses them nor reorders them), so this function returns the same bits on
/// every platform with IEEE-754 binary64 arithmetic: x86-64, aarch64 and the
/// other 64-bit targets. (Not i586, whose x87 unit rounds to 80 bits first;
/// Cairn does not run there.)
///
/// Method: `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`; then
/// `ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...)` with `s = (m-1)/(m+1)`,
/// `|s| < 0.1716`, summed to the `s^19` term (truncation below 1e-17
/// relative), and `ln x = e ln 2 + ln m`. Accurate to a few units in the last
/// place, which is far more than placement needs: what matters is that it is
/// the same everywhere.
pub(crate) fn ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0, "ln({x}) is outside its domain");
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Same mantissa, exponent 0: m in [1, 2).
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exponent += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // Horner over 1 + s2/3 + s2^2/5 + ... + s2^9/19.
    let mut p = 1.0 / 19.0;
    for k in (0..9).rev() {
        p = p * s2 + 1.0 / (2 * k + 1) as f64;
    }
    exponent as f64 * std::f64::consts::LN_2 + 2.0 * s * p
}

/// [`stable_hash`]`(TAG_DRAW, [group, node])` with the group's part computed
/// once: the same value, for loops over every node of one group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupKey(u64);

impl GroupKey {
    pub fn new(group: u32) -> Self {
        GroupKey(stable_hash(TAG_DRAW, &[u64::from(group)]))
    }
}

/// The uniform variate behind the draw of `node` for the group of `key`: the
/// hash's top 52 bits plus one half, over 2^52, so strictly between 0 and 1.
pub(crate) fn unit_in(key: GroupKey, node: u64) -> f64 {
    let h = mix64(key.0.wrapping_add(GOLDEN_GAMMA) ^ node);
    // Exact: (h >> 12) + 0.5 needs at most 53 significant bits, and the
    // scale is a power of two.
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// The rendezvous draw of `node` for the group of `key`: `-ln(u)` for `u` =
/// [`unit_in`]`(key, node)`, i.e. a standard exponential variate. Divided by
/// a node's weight it is that node's arrival time in an exponential race (see
/// the crate documentation). Finite and positive (at most about 36.7).
pub(crate) fn draw_in(key: GroupKey, node: u64) -> f64 {
    -ln(unit_in(key, node))
}

/// [`draw_in`] for one (group, node) pair.
#[cfg(test)]
pub(crate) fn draw(group: u32, node: u64) -> f64 {
    draw_in(GroupKey::new(group), node)
}

/// A lower bound on [`draw_in`] that needs no logarithm: `-ln(u) >= 1 - u`, less
/// a relative 1e-12 that covers every rounding in both computations.
pub(crate) fn draw_lower_bound(u: f64) -> f64 {
    (1.0 - u) * (1.0 - 1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64 reference values: the first outputs of the generator seeded
    /// with 0 are mix64(k * GOLDEN_GAMMA) for k = 1, 2, 3 (these are the
    /// published test values of SplittableRandom/splitmix64).
    #[test]
    fn mix64_matches_splitmix64() {
        assert_eq!(mix64(GOLDEN_GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(3)), 0x06c4_5d18_8009_454f);
        assert_eq!(mix64(0), 0);
    }

    /// Pinned outputs. If this test fails, placement has changed: data
    /// written by an older build would be looked for on the wrong nodes.
    #[test]
    fn stable_hash_is_pinned() {
        assert_eq!(stable_hash(TAG_GROUP, &[0, 0]), PINNED_GROUP_0_0);
        assert_eq!(stable_hash(TAG_GROUP, &[1, 2]), PINNED_GROUP_1_2);
        assert_eq!(stable_hash(TAG_DRAW, &[7, 42]), PINNED_DRAW_7_42);
        assert_eq!(stable_hash(TAG_DRAW, &[]), mix64(TAG_DRAW));
    }

    const PINNED_GROUP_0_0: u64 = 0x69b0_09da_8b44_b3d4;
    const PINNED_GROUP_1_2: u64 = 0xe930_a5d5_0718_d661;
    const PINNED_DRAW_7_42: u64 = 0x07c0_d822_468a_279c;

    #[test]
    fn ln_is_accurate() {
        let mut x = f64::MIN_POSITIVE;
        while x < 1e300 {
            for scale in [1.0, 1.1, 1.3, 1.414, 1.4143, 1.5, 1.7, 1.9, 1.999] {
                let v = x * scale;
                let want = v.ln();
                let got = ln(v);
                let err = (got - want).abs() / want.abs().max(1.0);
                assert!(
                    err < 4.0 * f64::EPSILON,
                    "ln({v}) = {got}, libm says {want}"
                );
            }
            x *= 7.3;
        }
        assert_eq!(ln(1.0), 0.0);
    }

    /// Pinned bits of the logarithm and of draws: the same on every platform.
    #[test]
    fn ln_and_draw_are_pinned() {
        assert_eq!(ln(0.5).to_bits(), PINNED_LN_HALF);
        assert_eq!(ln(1e-9).to_bits(), PINNED_LN_1E_9);
        assert_eq!(draw(0, 1).to_bits(), PINNED_DRAW_0_1);
        assert_eq!(draw(1023, 12).to_bits(), PINNED_DRAW_1023_12);
    }

    // ln(0.5) and ln(1e-9) happen to equal the correctly rounded values.
    const PINNED_LN_HALF: u64 = 0xbfe6_2e42_fefa_39ef;
    const PINNED_LN_1E_9: u64 = 0xc034_b927_f32b_ffb8;
    /// 0.10461243137267595
    const PINNED_DRAW_0_1: u64 = 0x3fba_c7e1_5b80_2d10;
    /// 2.199629415519416
    const PINNED_DRAW_1023_12: u64 = 0x4001_98d7_4e97_cdcc;

    #[test]
    fn draws_are_exponential() {
        // Mean 1, and P(draw > 1) = 1/e, over many (group, node) pairs.
        let n = 200_000u32;
        let (mut sum, mut above) = (0.0, 0u32);
        for g in 0..n {
            let d = draw(g, u64::from(g % 97) + 1);
            assert!(d > 0.0 && d.is_finite());
            sum += d;
            above += u32::from(d > 1.0);
        }
        let mean = sum / f64::from(n);
        let tail = f64::from(above) / f64::from(n);
        assert!((mean - 1.0).abs() < 0.01, "mean draw {mean}");
        assert!(
            (tail - (-1.0f64).exp()).abs() < 0.005,
            "P(draw > 1) = {tail}"
        );
    }

    #[test]
    fn group_key_is_the_same_hash() {
        for (g, n) in [(0u32, 0u64), (7, 42), (1023, 12), (u32::MAX, u64::MAX)] {
            let h = stable_hash(TAG_DRAW, &[u64::from(g), n]);
            let u = ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64;
            assert_eq!(unit_in(GroupKey::new(g), n).to_bits(), u.to_bits());
        }
    }

    #[test]
    fn lower_bound_is_below_the_draw() {
        for g in 0..100_000u32 {
            let u = unit_in(GroupKey::new(g), 5);
            assert!(draw_lower_bound(u) < -ln(u));
        }
        for u in [
            0.5,
            0.9,
            0.999_999,
            1.0 - 1e-15,
            1.0 - f64::EPSILON,
            2f64.powi(-53),
        ] {
            assert!(draw_lower_bound(u) < -ln(u), "{u}");
        }
    }
}
