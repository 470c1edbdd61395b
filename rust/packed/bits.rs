//! Bit-packing of top-K indices at `b` bits each (1 <= b <= 32), little-endian bit order: index
//! `j` occupies stream bits `j*b .. j*b+b`, LSB first within each byte; pad bits at the end are 0.
//!
//! Both directions move 32 bits at a time through a 64-bit accumulator (at most 31 bits are left
//! over before a word is added, so `31 + 32 < 64` never overflows), not a bit at a time: at the
//! Llama-2-7B shape (78,080 indices at 11 bits) either direction takes well under a millisecond.

use std::fmt;

/// The widest index this module packs; a bank of more than 2^32 vectors is refused upstream.
pub const MAX_BITS: u32 = 32;

/// Why a pack or unpack failed. `position` is the index's place in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitsError {
    /// Index `position` is `value`, outside `[0, bound)`.
    OutOfRange {
        position: usize,
        value: i64,
        bound: u64,
    },
    /// The packed buffer is `len` bytes, but `count` indices at `bits` need `expected`.
    Length { len: usize, expected: Option<usize> },
    /// A pad bit after the last index is set (the stream is not in its one canonical form).
    NonZeroPadding,
    /// `bits` is outside `1..=MAX_BITS`.
    Width(u32),
}

impl fmt::Display for BitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitsError::OutOfRange {
                position,
                value,
                bound,
            } => write!(f, "index {position} is {value}, outside [0, {bound})"),
            BitsError::Length {
                len,
                expected: Some(e),
            } => write!(f, "holds {len} bytes, expected {e}"),
            BitsError::Length {
                len,
                expected: None,
            } => write!(f, "holds {len} bytes, but the expected length overflows"),
            BitsError::NonZeroPadding => f.write_str("has non-zero pad bits after the last index"),
            BitsError::Width(b) => write!(f, "index width {b} bits is outside 1..={MAX_BITS}"),
        }
    }
}

impl std::error::Error for BitsError {}

/// `max(1, ceil(log2(num_vectors)))`: the fewest bits holding every index below `num_vectors`.
pub fn index_bits(num_vectors: u64) -> u32 {
    if num_vectors <= 2 {
        1
    } else {
        u64::BITS - (num_vectors - 1).leading_zeros()
    }
}

/// Bytes that `count` indices of `bits` bits fill, or `None` on overflow.
pub fn packed_len(count: usize, bits: u32) -> Option<usize> {
    let total = count.checked_mul(usize::try_from(bits).ok()?)?;
    Some(total / 8 + usize::from(total % 8 != 0))
}

fn check_width(bits: u32) -> Result<(), BitsError> {
    if (1..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(BitsError::Width(bits))
    }
}

/// Packs `indices` at `bits` bits each; every index must lie in `[0, bound)` and `bound` must
/// fit in `bits` bits (callers pass `bits = index_bits(bound)`).
pub fn pack(indices: &[i64], bits: u32, bound: u64) -> Result<Vec<u8>, BitsError> {
    check_width(bits)?;
    let len = packed_len(indices.len(), bits).ok_or(BitsError::Length {
        len: 0,
        expected: None,
    })?;
    let bound = bound.min(1 << bits);
    let mut out = Vec::with_capacity(len);
    let mut acc = 0_u64;
    let mut filled = 0_u32;
    for (position, &value) in indices.iter().enumerate() {
        let v = u64::try_from(value)
            .ok()
            .filter(|v| *v < bound)
            .ok_or(BitsError::OutOfRange {
                position,
                value,
                bound,
            })?;
        acc |= v << filled;
        filled += bits;
        if filled >= 32 {
            out.extend_from_slice(&(acc as u32).to_le_bytes());
            acc >>= 32;
            filled -= 32;
        }
    }
    let tail = acc.to_le_bytes();
    out.extend_from_slice(&tail[..filled.div_ceil(8) as usize]);
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// Unpacks `count` indices of `bits` bits from `bytes`, which must be exactly
/// `packed_len(count, bits)` long with zero pad bits; every index must lie in `[0, bound)`.
pub fn unpack(bytes: &[u8], count: usize, bits: u32, bound: u64) -> Result<Vec<i64>, BitsError> {
    check_width(bits)?;
    let expected = packed_len(count, bits);
    if expected != Some(bytes.len()) {
        return Err(BitsError::Length {
            len: bytes.len(),
            expected,
        });
    }
    let mask = (1_u64 << bits) - 1;
    let mut words = bytes.chunks(4).map(|c| {
        let mut w = [0_u8; 4];
        w[..c.len()].copy_from_slice(c);
        u64::from(u32::from_le_bytes(w))
    });
    // `count` is at most 8 * bytes.len() here, so this allocation is bounded by the input.
    let mut out = Vec::with_capacity(count);
    let mut acc = 0_u64;
    let mut avail = 0_u32;
    for position in 0..count {
        if avail < bits {
            // The length check above guarantees a word is left whenever bits are missing.
            acc |= words.next().unwrap_or(0) << avail;
            avail += 32;
        }
        let v = acc & mask;
        acc >>= bits;
        avail -= bits;
        if v >= bound {
            return Err(BitsError::OutOfRange {
                position,
                value: v as i64,
                bound,
            });
        }
        out.push(v as i64);
    }
    if acc != 0 || words.any(|w| w != 0) {
        return Err(BitsError::NonZeroPadding);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format's definition, one bit at a time: the reference the fast code is checked against.
    fn pack_reference(indices: &[i64], bits: u32) -> Vec<u8> {
        let mut out = vec![0_u8; packed_len(indices.len(), bits).unwrap()];
        for (j, &v) in indices.iter().enumerate() {
            for t in 0..bits as usize {
                if (v >> t) & 1 == 1 {
                    let p = j * bits as usize + t;
                    out[p / 8] |= 1 << (p % 8);
                }
            }
        }
        out
    }

    #[test]
    fn index_bits_is_ceil_log2_at_least_one() {
        let cases = [
            (1, 1),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (256, 8),
            (257, 9),
            (2048, 11),
            (2049, 12),
            (1 << 32, 32),
            ((1 << 32) + 1, 33),
        ];
        for (n, b) in cases {
            assert_eq!(index_bits(n), b, "num_vectors {n}");
        }
    }

    #[test]
    fn packs_lsb_first() {
        // 3-bit indices 5 (101), 1 (001), 6 (110): stream bits 101 100 011 -> 0b1000_1101, 0b1
        assert_eq!(pack(&[5, 1, 6], 3, 8).unwrap(), vec![0b1000_1101, 0b1]);
        assert_eq!(unpack(&[0b1000_1101, 0b1], 3, 3, 8).unwrap(), vec![5, 1, 6]);
    }

    #[test]
    fn every_width_matches_the_reference() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        for bits in 1..=MAX_BITS {
            let bound = 1_u64 << bits;
            for count in [0, 1, 2, 7, 31, 32, 33, 100] {
                let indices: Vec<i64> = (0..count)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % bound) as i64
                    })
                    .collect();
                let packed = pack(&indices, bits, bound).unwrap();
                assert_eq!(packed, pack_reference(&indices, bits), "bits {bits}");
                assert_eq!(unpack(&packed, count, bits, bound).unwrap(), indices);
            }
        }
    }

    #[test]
    fn out_of_range_is_rejected_on_both_sides() {
        let err = pack(&[0, 3, 7], 3, 6).unwrap_err();
        assert_eq!(
            err,
            BitsError::OutOfRange {
                position: 2,
                value: 7,
                bound: 6
            }
        );
        assert!(matches!(
            pack(&[-1], 3, 6),
            Err(BitsError::OutOfRange { value: -1, .. })
        ));
        let packed = pack(&[0, 3, 7], 3, 8).unwrap();
        assert_eq!(
            unpack(&packed, 3, 3, 6).unwrap_err().to_string(),
            "index 2 is 7, outside [0, 6)"
        );
    }

    #[test]
    fn length_and_padding_are_checked() {
        let packed = pack(&[1, 2, 3], 5, 32).unwrap();
        assert_eq!(packed.len(), 2);
        assert!(matches!(
            unpack(&packed[..1], 3, 5, 32),
            Err(BitsError::Length { .. })
        ));
        let mut long = packed.clone();
        long.push(0);
        assert!(matches!(
            unpack(&long, 3, 5, 32),
            Err(BitsError::Length { .. })
        ));
        let mut dirty = packed;
        dirty[1] |= 0x80;
        assert_eq!(unpack(&dirty, 3, 5, 32), Err(BitsError::NonZeroPadding));
        assert_eq!(unpack(&[], 0, 5, 32), Ok(vec![]));
        assert_eq!(pack(&[0], 0, 1), Err(BitsError::Width(0)));
        assert_eq!(unpack(&[0; 5], 1, 33, 1), Err(BitsError::Width(33)));
    }

    #[test]
    fn huge_counts_fail_before_allocating() {
        assert!(matches!(
            unpack(&[0; 8], usize::MAX / 2, 11, 2048),
            Err(BitsError::Length { expected: None, .. })
        ));
        assert!(matches!(
            unpack(&[0; 8], 1 << 40, 11, 2048),
            Err(BitsError::Length { .. })
        ));
    }
}
