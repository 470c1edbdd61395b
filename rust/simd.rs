//! Run-time SIMD dispatch.
//!
//! The crate is built for the baseline target (SSE2 on x86_64, NEON on aarch64). Each hot loop
//! is one generic `#[inline(always)]` safe Rust function; on x86_64 it is also compiled inside a
//! `#[target_feature(enable = "avx2,fma")]` wrapper, where LLVM vectorises the same loops with
//! 256-bit registers and `f32::mul_add` becomes one `vfmadd` instruction. Which copy runs is
//! chosen once per process ([`Level::detected`]) from `is_x86_feature_detected!`.
//!
//! The wrappers are the crate's only `unsafe`: calling a `target_feature` function is unsafe
//! because the CPU must have the feature. That is guaranteed by construction: the AVX2 variant
//! of [`Level`] carries an [`Avx2Fma`] token whose field is private to this module, and the only
//! code that makes one runs after `is_x86_feature_detected!("avx2")` and `("fma")` both returned
//! true. No AVX-512 variant: the measuring machine (AMD EPYC, Zen 3) has none, so it could not
//! be measured or tested.
//!
//! `VBLORA_RS_SIMD=portable` in the environment (read once) forces the portable loops, e.g. to
//! compare the two paths from Python.

use std::sync::OnceLock;

/// Proof that AVX2 and FMA were detected on this CPU. Only [`Level::detected`] and
/// [`Level::available`] construct one, after checking.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2Fma(());

/// The instruction-set level a kernel runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// The baseline build: SSE2 on x86_64, NEON on aarch64. Plain `mul` + `add`, never fused.
    Portable,
    /// AVX2 with FMA (x86_64), detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma(Avx2Fma),
}

impl Level {
    /// The best level this CPU supports (or `Portable` when `VBLORA_RS_SIMD=portable`), cached.
    pub(crate) fn detected() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::env::var_os("VBLORA_RS_SIMD").is_some_and(|v| v == "portable") {
                Level::Portable
            } else {
                Self::best()
            }
        })
    }

    fn best() -> Level {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2Fma(Avx2Fma(()));
        }
        Level::Portable
    }

    /// Every level this CPU supports, portable first (tests run each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Level> {
        let mut levels = vec![Level::Portable];
        if Self::best() != Level::Portable {
            levels.push(Self::best());
        }
        levels
    }

    /// Whether the level's multiply-adds are fused (one rounding).
    #[cfg(test)]
    pub(crate) fn fma(self) -> bool {
        self != Level::Portable
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma(_) => "avx2+fma",
        }
    }
}

/// The SIMD level the kernels use in this process: `"avx2+fma"` or `"portable"`.
pub fn simd_level() -> &'static str {
    Level::detected().name()
}

/// `acc + a * b`: fused (one rounding) when `FMA`, else a plain multiply then add. Only call with
/// `FMA = true` from code compiled with the `fma` target feature, where `mul_add` is one
/// instruction (elsewhere it is a libm call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

/// Runs `$generic::<..>($args)` at `$level`: on the portable path directly, on AVX2 through
/// `$avx2`, a `#[target_feature(enable = "avx2,fma")]` wrapper that calls the same generic body.
macro_rules! dispatch {
    ($level:expr, $portable:expr, $avx2:expr) => {
        match $level {
            $crate::simd::Level::Portable => $portable,
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            $crate::simd::Level::Avx2Fma(_) => {
                // SAFETY: a `Level::Avx2Fma` holds an `Avx2Fma` token, which `simd` creates only
                // after `is_x86_feature_detected!` found both avx2 and fma on this CPU, so the
                // `target_feature(enable = "avx2,fma")` function may be called.
                unsafe { $avx2 }
            }
        }
    };
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_level_is_available() {
        assert!(Level::available().contains(&Level::detected()));
        assert_eq!(Level::available()[0], Level::Portable);
        assert!(!Level::Portable.fma());
        assert!(["portable", "avx2+fma"].contains(&simd_level()));
    }

    #[test]
    fn madd_rounds_once_only_when_fused() {
        // 1 + 2^-23 squared is 1 + 2^-22 + 2^-46: the last term survives only when fused.
        let a = 1.0 + f32::EPSILON;
        assert_eq!(madd::<false>(-1.0, a, a), 2.0 * f32::EPSILON);
        assert_eq!(
            madd::<true>(-1.0, a, a),
            2.0 * f32::EPSILON + f32::EPSILON * f32::EPSILON
        );
    }
}
