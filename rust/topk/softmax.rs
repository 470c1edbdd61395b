//! The softmax of a row's kept logits, computed as torch's CPU kernel computes it, so that the
//! weights can be bit for bit torch's without a second pass through torch.
//!
//! torch's last-dimension softmax (`_vec_softmax_lastdim`) on a row of `k` values takes the
//! maximum `m`, writes `e_j = exp(x_j - m)` with its vectorised `exp` (SLEEF's `expf_u10`
//! algorithm on x86-64's AVX2 and AVX-512 builds), adds the `e_j` one after the other when the
//! row is shorter than one vector register, and multiplies each `e_j` by `1 / sum`. [`exp_u10`]
//! follows the same algorithm step by step (range reduction by `ln 2` in two parts, a degree-5
//! polynomial, every step a fused multiply-add), so each step rounds as torch's does.
//!
//! That holds for rows shorter than the narrowest register torch may use (8 floats): the
//! Python side uses these weights only for `k <= MAX_K` and only after it has compared them
//! with `torch.softmax` in the same process (`vblora_rs.ops`): a torch built another way (no
//! SIMD, another `exp`) keeps its own softmax.

/// The largest `k` whose sum order is the same in torch's AVX2 and AVX-512 kernels (one partial
/// register, summed left to right).
#[cfg_attr(not(feature = "python"), allow(dead_code))] // read by the binding (`rust/py`)
pub const MAX_K: usize = 7;

/// `exp(d)` by the steps of SLEEF's `expf_u10`: `q = rint(d / ln 2)`, `s = d - q ln 2` (with
/// `ln 2` split in a high part exact in few bits and a low part), a polynomial in `s`, scaled by
/// `2^q` in two halves so that no step leaves the normal range early. 0 below -104, +inf above
/// 100, NaN for NaN, as SLEEF's.
#[inline(always)]
pub(crate) fn exp_u10(d: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // The constants as exact f32 bit patterns (shortest decimals in the comments).
    const LN2_HIGH: f32 = f32::from_bits(0x3f31_7200); // 0.69314575: ln 2 in 16 bits, q * it is exact
    const LN2_LOW: f32 = f32::from_bits(0x35bf_be8e); // 1.4286068e-6: ln 2 - LN2_HIGH
                                                      // Coefficients of (e^s - 1 - s) / s^2 on |s| <= ln2 / 2, highest degree first.
    const POLY: [f32; 6] = [
        f32::from_bits(0x3950_2bda), // 1.9852762e-4
        f32::from_bits(0x3ab6_96c9), // 1.3930436e-3
        f32::from_bits(0x3c08_88a6), // 8.333361e-3
        f32::from_bits(0x3d2a_aa7a), // 4.1666485e-2
        f32::from_bits(0x3e2a_aaab), // 0.16666667
        0.5,
    ];
    if d.is_nan() {
        return d;
    }
    if d < -104.0 {
        return 0.0;
    }
    if d > 100.0 {
        return f32::INFINITY;
    }
    let qf = (d * LOG2_E).round_ties_even();
    // |d| <= 104, so |q| <= 151: exact as i32 and in f32.
    let q = qf as i32;
    let s = qf.mul_add(-LN2_HIGH, d);
    let s = qf.mul_add(-LN2_LOW, s);
    let u = POLY[1..].iter().fold(POLY[0], |u, &c| u.mul_add(s, c));
    let u = 1.0 + (s * s).mul_add(u, s);
    // 2^q as two normal powers of two (|q / 2| <= 76 stays inside f32's exponent range).
    let half = q >> 1;
    u * pow2(half) * pow2(q - half)
}

/// `2^e` for `-126 <= e <= 127`.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    // The biased exponent 1..=254 fills bits 23..31: a normal power of two.
    f32::from_bits(((e + 127) as u32) << 23)
}

/// torch's softmax of `vals` (the kept logits, largest first) into `out` (same length).
#[inline(always)]
pub(crate) fn softmax_into(vals: impl Iterator<Item = f32> + Clone, out: &mut [f32]) {
    let max = vals
        .clone()
        .fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    let mut sum = 0.0_f32; // 0 + e_0 = e_0 exactly: the sum starts at e_0 as torch's does
    for (o, x) in out.iter_mut().zip(vals) {
        *o = exp_u10(x - max);
        sum += *o;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Units in the last place between `a` and the exact `b`, at `a`'s scale.
    fn ulps(a: f32, b: f64) -> f64 {
        let spacing = f64::from(f32::from_bits(a.to_bits() + 1) - a);
        (f64::from(a) - b).abs() / spacing
    }

    #[test]
    fn exp_u10_edges() {
        assert_eq!(exp_u10(0.0).to_bits(), 1.0_f32.to_bits());
        assert_eq!(exp_u10(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_u10(-104.5), 0.0);
        assert_eq!(exp_u10(100.5), f32::INFINITY);
        assert!(exp_u10(f32::NAN).is_nan());
        // the smallest results are subnormal, and still close
        assert!(exp_u10(-103.0) > 0.0);
    }

    proptest! {
        #[test]
        fn exp_u10_is_within_one_ulp(d in -87.0_f32..88.0) {
            let got = exp_u10(d);
            prop_assert!(ulps(got, f64::from(d).exp()) <= 1.0, "exp({d}) = {got}");
        }

        #[test]
        fn softmax_weights_sum_to_one_and_keep_the_order(mut xs in prop::collection::vec(-50.0_f32..50.0, 1..=MAX_K)) {
            xs.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let mut w = vec![0.0; xs.len()];
            softmax_into(xs.iter().copied(), &mut w);
            let total: f32 = w.iter().sum();
            prop_assert!((total - 1.0).abs() <= 4.0 * xs.len() as f32 * f32::EPSILON);
            prop_assert!(w.windows(2).all(|p| p[0] >= p[1]));
        }
    }

    #[test]
    fn a_row_of_minus_infinity_gives_nan_as_torch() {
        let mut w = [0.0; 2];
        softmax_into([f32::NEG_INFINITY; 2].into_iter(), &mut w);
        assert!(w.iter().all(|x| x.is_nan()));
        softmax_into([1.0, f32::NEG_INFINITY].into_iter(), &mut w);
        assert_eq!(w, [1.0, 0.0]);
    }
}
