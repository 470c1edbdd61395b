//! Run-time SIMD dispatch.
//!
//! The crate is built for the baseline target (SSE2 on x86_64, NEON on aarch64). Each hot loop
//! is one generic `#[inline(always)]` safe Rust function; on x86_64 it is also compiled inside
//! thin `#[target_feature]` wrappers, one per level, where LLVM vectorises the same loops with
//! wider registers and `f32::mul_add` becomes one `vfmadd` instruction:
//!
//! * AVX2 (`avx2,fma`): 256-bit registers, 16 of them.
//! * AVX-512 (`avx512f,avx512bw,avx512vl` plus `avx2,fma`): 512-bit registers, 32 of them, and
//!   compares into mask registers. The arithmetic is the same FMA chain as on AVX2, so both give
//!   the same bits; only the speed differs.
//!
//! AVX512-BF16 is not used: `vdpbf16ps` multiplies bf16 by bf16, but PEFT's products are float32
//! by float32 (softmax weights, upcast factors), and `vcvtneps2bf16` flushes subnormals to zero
//! where torch's float-to-bf16 cast rounds them, so neither keeps PEFT's bits. (Widening bf16 is a
//! 16-bit shift, which the AVX-512 build already vectorises.)
//!
//! Which copy runs is chosen once per process ([`Level::detected`]) from
//! `is_x86_feature_detected!`.
//!
//! The wrappers are the crate's only `unsafe` besides the OpenMP binding: calling a
//! `target_feature` function is unsafe because the CPU must have the features. That is
//! guaranteed by construction: the AVX2 and AVX-512 variants of [`Level`] carry tokens
//! ([`Avx2Fma`], [`Avx512`]) whose fields are private to this module, and the only code that
//! makes one runs after `is_x86_feature_detected!` returned true for each feature the wrappers
//! enable.
//!
//! `VBLORA_RS_SIMD` (read once) caps the level, to test or time one level against another:
//! `portable`, `avx2` (or `avx2+fma`), `avx512`. A level the CPU lacks gives the best one it
//! has below it ([`simd_level`] says which runs); any other value is ignored.

use std::sync::OnceLock;

/// Proof that AVX2 and FMA were detected on this CPU. Only [`Level::available`] constructs one,
/// after checking.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2Fma(());

/// Proof that AVX-512 F, BW and VL, AVX2 and FMA were detected on this CPU. Only
/// [`Level::available`] constructs one, after checking.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512(());

/// The instruction-set level a kernel runs at, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// The baseline build: SSE2 on x86_64, NEON on aarch64. Plain `mul` + `add`, never fused.
    Portable,
    /// AVX2 with FMA (x86_64), detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma(Avx2Fma),
    /// AVX-512 F/BW/VL with AVX2 and FMA (x86_64), detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

impl Level {
    /// The best level this CPU supports, capped by `VBLORA_RS_SIMD`, cached.
    pub(crate) fn detected() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let cap = std::env::var("VBLORA_RS_SIMD").ok();
            Self::capped(&Self::available(), cap.as_deref())
        })
    }

    /// The best of `levels` (lowest first, never empty) not above the one named `cap`.
    fn capped(levels: &[Level], cap: Option<&str>) -> Level {
        let rank = match cap {
            Some("portable") => 0,
            Some("avx2" | "avx2+fma") => 1,
            _ => 2,
        };
        levels[rank.min(levels.len() - 1)]
    }

    /// Every level this CPU supports, portable first (tests run each).
    pub(crate) fn available() -> Vec<Level> {
        let mut levels = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                levels.push(Level::Avx2Fma(Avx2Fma(())));
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                    levels.push(Level::Avx512(Avx512(())));
                }
            }
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
            #[cfg(target_arch = "x86_64")]
            Level::Avx512(_) => "avx512",
        }
    }
}

/// The SIMD level the kernels use in this process: `"avx512"`, `"avx2+fma"` or `"portable"`.
pub fn simd_level() -> &'static str {
    Level::detected().name()
}

/// Every SIMD level this CPU supports, lowest first (each a [`simd_level`] name); what
/// `VBLORA_RS_SIMD` can select.
pub fn simd_levels() -> Vec<&'static str> {
    Level::available().into_iter().map(Level::name).collect()
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
/// `$avx2`, a `#[target_feature(enable = "avx2,fma")]` wrapper, and on AVX-512 through `$avx512`,
/// a `#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]` wrapper, both of which
/// call the same generic body.
macro_rules! dispatch {
    ($level:expr, $portable:expr, $avx2:expr, $avx512:expr) => {
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
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            $crate::simd::Level::Avx512(_) => {
                // SAFETY: a `Level::Avx512` holds an `Avx512` token, which `simd` creates only
                // after `is_x86_feature_detected!` found avx2, fma, avx512f, avx512bw and
                // avx512vl on this CPU, so the function enabling exactly those may be called.
                unsafe { $avx512 }
            }
        }
    };
}
pub(crate) use dispatch;

/// Defines the two `#[target_feature]` copies of a generic kernel body that [`dispatch!`] calls:
/// `$avx2` compiled with `avx2,fma`, `$avx512` with `avx512f,avx512bw,avx512vl,avx2,fma`, both
/// with the signature given (generics in brackets) and each running its own expression (the
/// same generic call with the level's building blocks or tile sizes).
macro_rules! level_wrappers {
    (
        $(#[$doc:meta])*
        fn $avx2:ident, $avx512:ident [$($gen:tt)*] ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? {
            avx2: $body2:expr,
            avx512: $body512:expr $(,)?
        }
    ) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
            $body2
        }

        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        fn $avx512<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
            $body512
        }
    };
}
pub(crate) use level_wrappers;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_level_is_available() {
        let levels = Level::available();
        assert!(levels.contains(&Level::detected()));
        assert_eq!(levels[0], Level::Portable);
        assert!(!Level::Portable.fma());
        assert!(["portable", "avx2+fma", "avx512"].contains(&simd_level()));
        assert_eq!(simd_levels()[0], "portable");
    }

    #[test]
    fn the_environment_caps_the_level() {
        let levels = Level::available();
        let best = *levels.last().unwrap();
        assert_eq!(Level::capped(&levels, None), best);
        assert_eq!(Level::capped(&levels, Some("avx512")), best);
        assert_eq!(Level::capped(&levels, Some("nonsense")), best);
        assert_eq!(Level::capped(&levels, Some("portable")), Level::Portable);
        let avx2 = levels.get(1).copied().unwrap_or(Level::Portable);
        assert_eq!(Level::capped(&levels, Some("avx2")), avx2);
        assert_eq!(Level::capped(&levels, Some("avx2+fma")), avx2);
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
