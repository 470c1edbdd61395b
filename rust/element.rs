//! Storage element types of weights, logits and banks: `f32`, `half::f16`, `half::bf16`.
//!
//! Kernels always compute in `f32`. Converting one element at a time is correct but slow for
//! `f16` (half checks for F16C on every call, which also blocks vectorisation), so the trait also
//! converts whole chunks; kernels move data through small `f32` stack buffers with these.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// Chunk length, in elements, that kernels use for their `f32` staging buffers.
pub const CHUNK: usize = 256;

/// An element type stored in a weight, logits or bank array.
///
/// `from_f32` rounds to nearest, ties to even, as torch does when it casts `float32` down.
pub trait Element: bytemuck::Pod + Send + Sync {
    /// Name used in messages: "float32", "float16", "bfloat16".
    const NAME: &'static str;

    /// Whether kernels should convert whole chunks (`widen`, `narrow`, `add_f32` on up to
    /// `CHUNK` elements) rather than a few elements at a time: true where one element's
    /// conversion does not vectorise (`f16`).
    const CHUNKED: bool = false;

    /// Exact widening to `f32`.
    fn to_f32(self) -> f32;

    /// Rounding (to nearest even) narrowing from `f32`.
    fn from_f32(x: f32) -> Self;

    /// The `f32` values of `src`, written to `buf[..src.len()]` when a conversion is needed.
    /// For `f32` this is `src` itself, so hot loops pay no copy. `buf` must be at least as long
    /// as `src`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        for (d, s) in buf.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        buf
    }

    /// `dst[j] = from_f32(src[j])` for equally long slices.
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }

    /// `dst[j] = from_f32(to_f32(dst[j]) + delta[j])` for equally long slices, at most `CHUNK`.
    #[inline(always)]
    fn add_f32(dst: &mut [Self], delta: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(delta) {
            *d = Self::from_f32(d.to_f32() + x);
        }
    }
}

impl Element for f32 {
    const NAME: &'static str = "float32";

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline(always)]
    fn widen<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn add_f32(dst: &mut [Self], delta: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(delta) {
            *d += x;
        }
    }
}

impl Element for f16 {
    const NAME: &'static str = "float16";
    const CHUNKED: bool = true;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    /// half's slice conversion checks for F16C once per call, then converts 4 or 8 lanes at a time.
    #[inline]
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }

    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }

    #[inline]
    fn add_f32(dst: &mut [Self], delta: &[f32]) {
        let mut buf = [0.0_f32; CHUNK];
        let wide = &mut buf[..dst.len()];
        dst.convert_to_f32_slice(wide);
        for (w, &x) in wide.iter_mut().zip(delta) {
            *w += x;
        }
        dst.convert_from_f32_slice(wide);
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    /// torch's `round_to_nearest_even` (c10/util/BFloat16.h), branch-free so that loops over it
    /// vectorise: add `0x7FFF` plus the lowest kept bit, truncate; every NaN becomes `0x7FC0`.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
        bf16::from_bits(if x.is_nan() { 0x7FC0 } else { rounded })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_for_non_nan() {
        // half's from_f32 is the independent round-to-nearest-even reference.
        let mut state = 0x1234_5678_u32;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = f32::from_bits(state);
            if x.is_nan() {
                continue;
            }
            assert_eq!(
                <bf16 as Element>::from_f32(x).to_bits(),
                bf16::from_f32(x).to_bits(),
                "{x:e}"
            );
        }
        for x in [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(
                <bf16 as Element>::from_f32(x).to_bits(),
                bf16::from_f32(x).to_bits()
            );
        }
    }

    #[test]
    fn bf16_ties_go_to_even_and_nan_is_canonical() {
        // 1 + 2^-8 lies halfway between bf16 1.0 and the next value; even is 1.0.
        assert_eq!(
            <bf16 as Element>::from_f32(1.0 + 1.0 / 256.0).to_bits(),
            0x3F80
        );
        // 1 + 3 * 2^-8 is halfway between odd 0x3F81 and even 0x3F82.
        assert_eq!(
            <bf16 as Element>::from_f32(1.0 + 3.0 / 256.0).to_bits(),
            0x3F82
        );
        assert_eq!(<bf16 as Element>::from_f32(f32::NAN).to_bits(), 0x7FC0);
        assert_eq!(<bf16 as Element>::from_f32(-f32::NAN).to_bits(), 0x7FC0);
    }

    #[test]
    fn widen_and_narrow_round_trip() {
        let xs: Vec<f32> = (0..CHUNK + 3).map(|i| i as f32 * 0.37 - 40.0).collect();
        let h: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
        let mut buf = [0.0; CHUNK + 3];
        let wide = <f16 as Element>::widen(&h, &mut buf);
        for (w, x) in wide.iter().zip(&h) {
            assert_eq!(*w, x.to_f32());
        }
        let mut back = vec![f16::ZERO; xs.len()];
        <f16 as Element>::narrow(&xs, &mut back);
        assert_eq!(back, h);
        let b: Vec<bf16> = xs.iter().map(|&x| <bf16 as Element>::from_f32(x)).collect();
        let wide = <bf16 as Element>::widen(&b, &mut buf);
        for (w, x) in wide.iter().zip(&b) {
            assert_eq!(*w, x.to_f32());
        }
        assert_eq!(<f32 as Element>::widen(&xs, &mut buf).as_ptr(), xs.as_ptr());
    }
}
