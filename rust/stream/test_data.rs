//! Deterministic test data shared by the stream tests.

/// `n` pseudo-random values in `[-half_width, half_width)` (xorshift32, seeded).
pub(super) fn rand_f32(n: usize, seed: u32, half_width: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 * half_width - half_width
        })
        .collect()
}

/// The little-endian bytes of `xs` (as safetensors stores them).
pub(super) fn le_bytes<T: bytemuck::Pod>(xs: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(xs).to_vec()
}
