//! Float dtype conversion of raw little-endian tensor bytes (`F64`, `F32`, `F16`, `BF16`), as torch's
//! `tensor.to(dtype)` rounds: every value goes through `f32` (torch converts `double` to half types
//! via `float` too) and narrows to nearest, ties to even; `BF16` NaNs become the canonical `0x7FC0`.

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use crate::element::{Element, CHUNK};

/// `dst = src` converted from `from` to `to`; both slices hold the same number of elements and
/// are aligned for their dtype (the callers' buffers are `u64`-backed).
pub fn convert(from: Dtype, src: &[u8], to: Dtype, dst: &mut [u8]) {
    let mut wide = [0.0_f32; CHUNK];
    let from_size = super::header::float_size(from).expect("float dtype");
    let to_size = super::header::float_size(to).expect("float dtype");
    for (s, d) in src
        .chunks(CHUNK * from_size)
        .zip(dst.chunks_mut(CHUNK * to_size))
    {
        let n = s.len() / from_size;
        let w = &mut wide[..n];
        widen(from, s, w);
        narrow(w, to, d);
    }
}

fn widen(from: Dtype, src: &[u8], out: &mut [f32]) {
    fn go<T: Element>(src: &[u8], out: &mut [f32]) {
        let src: &[T] = bytemuck::cast_slice(src);
        let mut buf = [0.0_f32; CHUNK];
        out.copy_from_slice(T::widen(src, &mut buf));
    }
    match from {
        Dtype::F64 => {
            let src: &[f64] = bytemuck::cast_slice(src);
            for (o, &x) in out.iter_mut().zip(src) {
                *o = x as f32;
            }
        }
        Dtype::F32 => go::<f32>(src, out),
        Dtype::F16 => go::<f16>(src, out),
        Dtype::BF16 => go::<bf16>(src, out),
        other => unreachable!("not a float dtype: {other}"),
    }
}

fn narrow(src: &[f32], to: Dtype, out: &mut [u8]) {
    match to {
        Dtype::F64 => {
            let out: &mut [f64] = bytemuck::cast_slice_mut(out);
            for (o, &x) in out.iter_mut().zip(src) {
                *o = f64::from(x);
            }
        }
        Dtype::F32 => f32::narrow(src, bytemuck::cast_slice_mut(out)),
        Dtype::F16 => f16::narrow(src, bytemuck::cast_slice_mut(out)),
        Dtype::BF16 => bf16::narrow(src, bytemuck::cast_slice_mut(out)),
        other => unreachable!("not a float dtype: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: bytemuck::Pod>(xs: &[T]) -> Vec<u64> {
        let raw = bytemuck::cast_slice::<T, u8>(xs);
        let mut out = vec![0_u64; raw.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut out)[..raw.len()].copy_from_slice(raw);
        out
    }

    #[test]
    fn converts_like_torch_rounding() {
        let xs: Vec<f64> = (0..CHUNK * 2 + 5)
            .map(|i| (i as f64 - 300.0) * 0.0123 + 1e-9)
            .collect();
        let src = bytes(&xs);
        let n = xs.len();
        let src_b = &bytemuck::cast_slice::<u64, u8>(&src)[..n * 8];
        for (to, size) in [(Dtype::F32, 4), (Dtype::F16, 2), (Dtype::BF16, 2)] {
            let mut dst = vec![0_u64; (n * size).div_ceil(8)];
            let dst_b = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut dst)[..n * size];
            convert(Dtype::F64, src_b, to, dst_b);
            for (i, &x) in xs.iter().enumerate() {
                let f = x as f32;
                let got: u32 = match to {
                    Dtype::F32 => bytemuck::cast_slice::<u8, f32>(dst_b)[i].to_bits(),
                    Dtype::F16 => u32::from(bytemuck::cast_slice::<u8, u16>(dst_b)[i]),
                    _ => u32::from(bytemuck::cast_slice::<u8, u16>(dst_b)[i]),
                };
                let want: u32 = match to {
                    Dtype::F32 => f.to_bits(),
                    Dtype::F16 => u32::from(f16::from_f32(f).to_bits()),
                    _ => u32::from(bf16::from_f32(f).to_bits()),
                };
                assert_eq!(got, want, "{x} -> {to}");
            }
        }
        // bf16 -> f32 -> f64 is exact.
        let b: Vec<bf16> = xs.iter().map(|&x| bf16::from_f64(x)).collect();
        let src = bytes(&b);
        let mut dst = vec![0_u64; n];
        convert(
            Dtype::BF16,
            &bytemuck::cast_slice::<u64, u8>(&src)[..n * 2],
            Dtype::F64,
            bytemuck::cast_slice_mut(&mut dst),
        );
        let back: &[f64] = bytemuck::cast_slice(&dst);
        for (x, y) in b.iter().zip(back) {
            assert_eq!(x.to_f64(), *y);
        }
    }
}
