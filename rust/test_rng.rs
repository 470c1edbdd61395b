//! Deterministic pseudo-random data for the kernels' tests (one 64-bit LCG, seeded), so that a
//! failure reproduces.

/// `len` values uniform in `[-half_width, half_width)`, from the LCG seeded with `seed`.
pub(crate) fn uniform(seed: u64, len: usize, half_width: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * (2.0 * half_width) - half_width
        })
        .collect()
}
