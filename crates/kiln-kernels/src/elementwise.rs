//! Element-wise kernels of the forward pass built on a vectorized exponential: the gated
//! activations of the feed-forward block ([`silu_mul`], [`gelu_tanh_mul`]) and the
//! exponentials of an attention softmax ([`softmax_exp`]), with AVX-512 and AVX2+FMA kernels
//! on x86-64, NEON on aarch64, and scalar references (on the C library's `expf`) elsewhere.
//!
//! # The exponential
//!
//! `exp(x) = 2^n · exp(r)` with `n = round(x · log2 e)` and `r = x - n · ln 2`, so that
//! `|r| <= ln 2 / 2`. `ln 2` is split in two (Cody and Waite): `ln2_hi`, the f32 nearest
//! `ln 2`, and `ln2_lo = ln 2 - ln2_hi`. For `|n| <= 150` the fused `x - n · ln2_hi` is exact
//! (both terms lie on a grid of 2⁻²⁵ and the difference is below ½), so `r` carries one
//! rounding, whose error `e` is recovered with one more fused multiply-add. `exp(r)` is
//! `1 + (r + (r² q(r) + e))` with `q` of degree 4, fitted for the least maximum relative error
//! on `[-ln 2 / 2, ln 2 / 2]` (3·10⁻⁹ before f32 evaluation) and evaluated by Horner's rule in
//! fused multiply-adds; adding `e` to the small terms keeps `r`'s rounding from reaching the
//! result (without it the error reaches 1.02 ulp). The scaling by `2^n` rounds once:
//! AVX-512 `vscalefps` does it in one instruction; AVX2 and NEON multiply by `2^⌊n/2⌋` (exact)
//! and then by `2^(n - ⌊n/2⌋)`, so results that overflow become `+inf` and results below
//! f32's normal range come out as correctly rounded subnormals or zero. Inputs are clamped
//! to `[-104, 89]` first, outside of which every result is `0` or `+inf`; NaNs pass through.
//!
//! **Accuracy**: over every f32 input whose exponential is a normal f32, the result is within
//! [`EXP_MAX_ULP`] ulp of the exact value (all such inputs checked against f64 `exp`: at most
//! 0.8915 ulp); results in the subnormal range are within one subnormal step; `exp(0)` is exactly
//! 1, `exp(-inf)` is 0, `exp(+inf)` and every input above `ln(f32::MAX)` give `+inf`, NaN
//! gives NaN. Every SIMD level computes the same operations in the same order, so AVX-512,
//! AVX2 and NEON agree bit for bit; the result of an element never depends on its position
//! in the slice (tails run through the same vector code).
//!
//! The gated products and the softmax add their own f32 roundings on top (a division, an
//! addition, a product): each is stated on its function.

use crate::isa::{detect, Isa};

/// The largest error of the SIMD exponential, in units in the last place of the exact
/// result, over all f32 inputs whose exponential is a normal f32 (the largest seen over all
/// of them is 0.8915). The tests hold the scalar reference (the C library's `expf`) to it
/// too.
pub const EXP_MAX_ULP: f32 = 0.9;

/// `2 · sqrt(2 / pi)`: `gelu_tanh(x) = x · sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x³)`.
const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
/// The cubic coefficient of the tanh approximation of GELU.
const GELU_CUBIC: f32 = 0.044_715;

/// Inputs are clamped to `[EXP_LO, EXP_HI]`: below, every exponential rounds to 0 (it is under
/// half the smallest subnormal, `exp(-103.972...)`); above, every exponential overflows.
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 89.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` rounded to f32 (`0x3f317218`), and the rest (-1.9047e-9).
const LN2_HI: f32 = std::f32::consts::LN_2;
const LN2_LO: f32 = (std::f64::consts::LN_2 - LN2_HI as f64) as f32;
/// `exp(r) ≈ 1 + r + r² (C2 + C3 r + C4 r² + C5 r³ + C6 r⁴)` on `|r| <= ln 2 / 2`: a weighted
/// least-squares fit iterated to the minimax relative error.
const C2: f32 = 0.499_999_93;
const C3: f32 = 0.166_665_2;
const C4: f32 = 0.041_668_39;
const C5: f32 = 0.008_368_717;
const C6: f32 = 0.001_381_46;

/// Scalar reference of [`exp_f32`]: the standard library's `f32::exp` (the C library's
/// `expf`) per element.
pub fn exp_f32_reference(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// Scalar reference of [`silu_mul`]: `gate = gate / (1 + exp(-gate)) * up` per element, on
/// the C library's `expf`.
///
/// # Panics
/// If the slices differ in length.
pub fn silu_mul_reference(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    for (g, u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Scalar reference of [`gelu_tanh_mul`], on the C library's `expf`.
///
/// # Panics
/// If the slices differ in length.
pub fn gelu_tanh_mul_reference(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_tanh_mul: lengths differ");
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let two_u = TWO_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        *g = x / (1.0 + (-two_u).exp()) * u;
    }
}

/// Scalar reference of [`softmax_exp`]: `v = exp(v - m)` on the C library's `expf`, summed
/// in order.
pub fn softmax_exp_reference(v: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0f32;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// `x = exp(x)` element by element, within [`EXP_MAX_ULP`] ulp (see the module's notes).
#[inline]
pub fn exp_f32(x: &mut [f32]) {
    exp_f32_with(detect(), x)
}

/// [`exp_f32`] at a given level.
///
/// # Panics
/// If the CPU lacks `isa`.
pub fn exp_f32_with(isa: Isa, x: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX-512F (`is_available`).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::exp(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX2 and FMA (`is_available`).
        Isa::Avx2 if isa.is_available() => unsafe { avx2::exp(x) },
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        // SAFETY: NEON is part of every aarch64 CPU.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::exp(x) },
        _ => {
            assert!(isa.is_available(), "exp_f32: this CPU cannot run {isa:?}");
            exp_f32_reference(x)
        }
    }
}

/// SiLU-gated product: `gate = gate / (1 + exp(-gate)) * up`, i.e. `silu(gate) * up`.
///
/// Besides the exponential, each element rounds an addition, a division and a product: the
/// relative error against the exact `silu(gate) * up` of the f32 inputs is at most
/// `(EXP_MAX_ULP + 2) · 2⁻²³` wherever that is a normal f32 (the exponential's error reaches
/// the result scaled by `exp(-g) / (1 + exp(-g)) < 1`). Gates below about -88.7, whose
/// `exp(-gate)` overflows, give a zero (the exact value is below `|gate · up| · 2⁻¹²⁷`), as the
/// reference does.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_with(detect(), gate, up)
}

/// [`silu_mul`] at a given level.
///
/// # Panics
/// If the slices differ in length or the CPU lacks `isa`.
pub fn silu_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX-512F (`is_available`); equal lengths (asserted).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::silu_mul(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX2 and FMA (`is_available`); equal lengths (asserted).
        Isa::Avx2 if isa.is_available() => unsafe { avx2::silu_mul(gate, up) },
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        // SAFETY: NEON is part of every aarch64 CPU; equal lengths (asserted).
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::silu_mul(gate, up) },
        _ => {
            assert!(isa.is_available(), "silu_mul: this CPU cannot run {isa:?}");
            silu_mul_reference(gate, up)
        }
    }
}

/// GELU (tanh approximation)-gated product: `gate = gelu_tanh(gate) * up`.
///
/// `0.5 · (1 + tanh(u)) = sigmoid(2u)` exactly, so the tanh form costs one exponential:
/// `gelu_tanh(x) = x / (1 + exp(-2u))` with `u = sqrt(2/pi) · (x + 0.044715 x³)`.
///
/// `2u` is computed in f32 with a relative error of a few 2⁻²⁴, which the exponential
/// multiplies by `|2u|`; that error reaches the result scaled by `1 - sigmoid(2u)`, which is
/// below `e^(-2u)` for positive `u` and only matters for negative ones, where the result is
/// `x · e^(2u)`, small. Against the exact formula (with the same f32 constants) on f32
/// inputs, the relative error is at most `(EXP_MAX_ULP + 3 + 3·|2u|·(1 - sigmoid(2u))) · 2⁻²³`
/// wherever the result is a normal f32; the reference on `expf` has the same conditioning.
/// Where `exp(-2u)` overflows (`2u` below about -88.7) the result is a zero.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_with(detect(), gate, up)
}

/// [`gelu_tanh_mul`] at a given level.
///
/// # Panics
/// If the slices differ in length or the CPU lacks `isa`.
pub fn gelu_tanh_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_tanh_mul: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX-512F (`is_available`); equal lengths (asserted).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::gelu_tanh_mul(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX2 and FMA (`is_available`); equal lengths (asserted).
        Isa::Avx2 if isa.is_available() => unsafe { avx2::gelu_tanh_mul(gate, up) },
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        // SAFETY: NEON is part of every aarch64 CPU; equal lengths (asserted).
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::gelu_tanh_mul(gate, up) },
        _ => {
            assert!(
                isa.is_available(),
                "gelu_tanh_mul: this CPU cannot run {isa:?}"
            );
            gelu_tanh_mul_reference(gate, up)
        }
    }
}

/// The exponentials of a softmax: `v = exp(v - m)` in place, returning their sum.
///
/// `m` is normally the maximum of `v`, so every result lies in `[0, 1]`. `v - m` is rounded
/// to f32 first (exact when both are within a factor of two of each other), then each
/// element is within [`EXP_MAX_ULP`] ulp of `exp` of that difference (see the module's
/// notes). The sum is accumulated per vector lane and the lanes added at the end, so it
/// differs from an in-order sum by f32 rounding only.
#[inline]
pub fn softmax_exp(v: &mut [f32], m: f32) -> f32 {
    softmax_exp_with(detect(), v, m)
}

/// [`softmax_exp`] at a given level.
///
/// # Panics
/// If the CPU lacks `isa`.
pub fn softmax_exp_with(isa: Isa, v: &mut [f32], m: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX-512F (`is_available`).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::softmax_exp(v, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level includes AVX2 and FMA (`is_available`).
        Isa::Avx2 if isa.is_available() => unsafe { avx2::softmax_exp(v, m) },
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        // SAFETY: NEON is part of every aarch64 CPU.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::softmax_exp(v, m) },
        _ => {
            assert!(
                isa.is_available(),
                "softmax_exp: this CPU cannot run {isa:?}"
            );
            softmax_exp_reference(v, m)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// The exponential of 16 lanes (see the module's notes).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp16(x: __m512) -> __m512 {
        // `vminps`/`vmaxps` return their second operand when either is NaN: NaNs pass.
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x);
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)),
        );
        let r_hi = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r_hi);
        let r_err = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_sub_ps(r_hi, r));
        let q = _mm512_fmadd_ps(_mm512_set1_ps(C6), r, _mm512_set1_ps(C5));
        let q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C4));
        let q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C3));
        let q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C2));
        let s = _mm512_fmadd_ps(_mm512_mul_ps(r, r), q, r_err);
        let p = _mm512_add_ps(_mm512_set1_ps(1.0), _mm512_add_ps(r, s));
        _mm512_scalef_ps(p, n)
    }

    /// `x / (1 + exp(-x)) * up`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn silu16(x: __m512, up: __m512) -> __m512 {
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e)), up)
    }

    /// `x / (1 + exp(-2u)) * up`, `2u = 2 sqrt(2/pi) (x + 0.044715 x³)`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn gelu16(x: __m512, up: __m512) -> __m512 {
        let cx2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(GELU_CUBIC), x), x);
        let inner = _mm512_fmadd_ps(cx2, x, x);
        let minus_two_u = _mm512_mul_ps(_mm512_set1_ps(-TWO_SQRT_2_OVER_PI), inner);
        let e = exp16(minus_two_u);
        _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e)), up)
    }

    /// The mask of the first `n < 16` lanes.
    #[inline(always)]
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp(x: &mut [f32]) {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let mut i = 0;
        // SAFETY: full vectors read and write 16 floats at offsets i + 16 <= n; the tail's
        // masked accesses touch only lanes below n - i.
        unsafe {
            while i + 16 <= n {
                _mm512_storeu_ps(p.add(i), exp16(_mm512_loadu_ps(p.add(i))));
                i += 16;
            }
            if i < n {
                let m = tail_mask(n - i);
                let v = exp16(_mm512_maskz_loadu_ps(m, p.add(i)));
                _mm512_mask_storeu_ps(p.add(i), m, v);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let (n, g, u) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
        let mut i = 0;
        // SAFETY: as in `exp`, over both slices of length n.
        unsafe {
            while i + 16 <= n {
                let v = silu16(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)));
                _mm512_storeu_ps(g.add(i), v);
                i += 16;
            }
            if i < n {
                let m = tail_mask(n - i);
                let v = silu16(
                    _mm512_maskz_loadu_ps(m, g.add(i)),
                    _mm512_maskz_loadu_ps(m, u.add(i)),
                );
                _mm512_mask_storeu_ps(g.add(i), m, v);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        let (n, g, u) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
        let mut i = 0;
        // SAFETY: as in `exp`, over both slices of length n.
        unsafe {
            while i + 16 <= n {
                let v = gelu16(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)));
                _mm512_storeu_ps(g.add(i), v);
                i += 16;
            }
            if i < n {
                let m = tail_mask(n - i);
                let v = gelu16(
                    _mm512_maskz_loadu_ps(m, g.add(i)),
                    _mm512_maskz_loadu_ps(m, u.add(i)),
                );
                _mm512_mask_storeu_ps(g.add(i), m, v);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_exp(v: &mut [f32], m: f32) -> f32 {
        let (n, p) = (v.len(), v.as_mut_ptr());
        let vm = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        // SAFETY: as in `exp`.
        unsafe {
            while i + 16 <= n {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm));
                _mm512_storeu_ps(p.add(i), e);
                acc = _mm512_add_ps(acc, e);
                i += 16;
            }
            if i < n {
                let k = tail_mask(n - i);
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), vm));
                _mm512_mask_storeu_ps(p.add(i), k, e);
                acc = _mm512_mask_add_ps(acc, k, acc, e);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// `2^e` for integer lanes `e` in `-126..=127`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn pow2(e: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    }

    /// The exponential of 8 lanes (see the module's notes).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        // `vminps`/`vmaxps` return their second operand when either is NaN: NaNs pass.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
        let x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)),
        );
        let r_hi = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r_hi);
        let r_err = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_sub_ps(r_hi, r));
        let q = _mm256_fmadd_ps(_mm256_set1_ps(C6), r, _mm256_set1_ps(C5));
        let q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C4));
        let q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C3));
        let q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C2));
        let s = _mm256_fmadd_ps(_mm256_mul_ps(r, r), q, r_err);
        let p = _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_add_ps(r, s));
        // n in -150..=128 (NaN lanes give an arbitrary n, and p is NaN): two factors within
        // the normal range, the first product exact, the second rounding once.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2))
    }

    /// `x / (1 + exp(-x)) * up`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn silu8(x: __m256, up: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e)), up)
    }

    /// `x / (1 + exp(-2u)) * up`, `2u = 2 sqrt(2/pi) (x + 0.044715 x³)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn gelu8(x: __m256, up: __m256) -> __m256 {
        let cx2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_CUBIC), x), x);
        let inner = _mm256_fmadd_ps(cx2, x, x);
        let minus_two_u = _mm256_mul_ps(_mm256_set1_ps(-TWO_SQRT_2_OVER_PI), inner);
        let e = exp8(minus_two_u);
        _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e)), up)
    }

    /// Up to 8 values copied into a vector's worth of zeros.
    #[inline(always)]
    fn tail(src: &[f32]) -> [f32; 8] {
        let mut buf = [0.0f32; 8];
        buf[..src.len()].copy_from_slice(src);
        buf
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: a chunk is 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = tail(rest);
            // SAFETY: `buf` is 8 floats.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), exp8(_mm256_loadu_ps(buf.as_ptr()))) };
            let len = rest.len();
            rest.copy_from_slice(&buf[..len]);
        }
    }

    /// Runs `op` on 8 gates and 8 ups at a time, the tail through a zero-padded buffer.
    macro_rules! gated {
        ($gate:ident, $up:ident, $op:ident) => {{
            let mut gs = $gate.chunks_exact_mut(8);
            let mut us = $up.chunks_exact(8);
            for (g, u) in (&mut gs).zip(&mut us) {
                // SAFETY: both chunks are 8 floats.
                unsafe {
                    let v = $op(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
                    _mm256_storeu_ps(g.as_mut_ptr(), v);
                }
            }
            let (g, u) = (gs.into_remainder(), us.remainder());
            if !g.is_empty() {
                let (mut gb, ub) = (tail(g), tail(u));
                // SAFETY: both buffers are 8 floats.
                unsafe {
                    let v = $op(_mm256_loadu_ps(gb.as_ptr()), _mm256_loadu_ps(ub.as_ptr()));
                    _mm256_storeu_ps(gb.as_mut_ptr(), v);
                }
                let len = g.len();
                g.copy_from_slice(&gb[..len]);
            }
        }};
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        gated!(gate, up, silu8)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        gated!(gate, up, gelu8)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_exp(v: &mut [f32], m: f32) -> f32 {
        let vm = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: a chunk is 8 floats.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vm));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` is 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = tail(rest);
            // SAFETY: `buf` is 8 floats.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), vm));
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
            }
            let len = rest.len();
            rest.copy_from_slice(&buf[..len]);
            // Only the tail's own lanes count (the padding's exponentials are not zero).
            lanes.iter_mut().zip(&buf[..len]).for_each(|(l, e)| *l += e);
        }
        lanes.iter().sum()
    }
}

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// `2^e` for integer lanes `e` in `-126..=127`.
    #[target_feature(enable = "neon")]
    #[inline]
    fn pow2(e: int32x4_t) -> float32x4_t {
        vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(e, vdupq_n_s32(127))))
    }

    /// The exponential of 4 lanes (see the module's notes).
    #[target_feature(enable = "neon")]
    #[inline]
    fn exp4(x: float32x4_t) -> float32x4_t {
        // `fmin`/`fmax` return NaN when either operand is NaN: NaNs pass.
        let x = vminq_f32(vdupq_n_f32(EXP_HI), x);
        let x = vmaxq_f32(vdupq_n_f32(EXP_LO), x);
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2_E)));
        let r_hi = vfmsq_f32(x, n, vdupq_n_f32(LN2_HI));
        let r = vfmsq_f32(r_hi, n, vdupq_n_f32(LN2_LO));
        let r_err = vfmsq_f32(vsubq_f32(r_hi, r), n, vdupq_n_f32(LN2_LO));
        let q = vfmaq_f32(vdupq_n_f32(C5), vdupq_n_f32(C6), r);
        let q = vfmaq_f32(vdupq_n_f32(C4), q, r);
        let q = vfmaq_f32(vdupq_n_f32(C3), q, r);
        let q = vfmaq_f32(vdupq_n_f32(C2), q, r);
        let s = vfmaq_f32(r_err, vmulq_f32(r, r), q);
        let p = vaddq_f32(vdupq_n_f32(1.0), vaddq_f32(r, s));
        // As on AVX2: two in-range factors, one rounding.
        let ni = vcvtq_s32_f32(n);
        let n1 = vshrq_n_s32::<1>(ni);
        let n2 = vsubq_s32(ni, n1);
        vmulq_f32(vmulq_f32(p, pow2(n1)), pow2(n2))
    }

    /// `x / (1 + exp(-x)) * up`.
    #[target_feature(enable = "neon")]
    #[inline]
    fn silu4(x: float32x4_t, up: float32x4_t) -> float32x4_t {
        let e = exp4(vsubq_f32(vdupq_n_f32(0.0), x));
        vmulq_f32(vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0), e)), up)
    }

    /// `x / (1 + exp(-2u)) * up`, `2u = 2 sqrt(2/pi) (x + 0.044715 x³)`.
    #[target_feature(enable = "neon")]
    #[inline]
    fn gelu4(x: float32x4_t, up: float32x4_t) -> float32x4_t {
        let cx2 = vmulq_f32(vmulq_f32(vdupq_n_f32(GELU_CUBIC), x), x);
        let inner = vfmaq_f32(x, cx2, x);
        let minus_two_u = vmulq_f32(vdupq_n_f32(-TWO_SQRT_2_OVER_PI), inner);
        let e = exp4(minus_two_u);
        vmulq_f32(vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0), e)), up)
    }

    /// Up to 4 values copied into a vector's worth of zeros.
    #[inline(always)]
    fn tail(src: &[f32]) -> [f32; 4] {
        let mut buf = [0.0f32; 4];
        buf[..src.len()].copy_from_slice(src);
        buf
    }

    /// # Safety
    /// None beyond NEON, which every aarch64 CPU has.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn exp(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(4);
        for c in &mut chunks {
            // SAFETY: a chunk is 4 floats.
            unsafe { vst1q_f32(c.as_mut_ptr(), exp4(vld1q_f32(c.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = tail(rest);
            // SAFETY: `buf` is 4 floats.
            unsafe { vst1q_f32(buf.as_mut_ptr(), exp4(vld1q_f32(buf.as_ptr()))) };
            let len = rest.len();
            rest.copy_from_slice(&buf[..len]);
        }
    }

    /// Runs `op` on 4 gates and 4 ups at a time, the tail through a zero-padded buffer.
    macro_rules! gated {
        ($gate:ident, $up:ident, $op:ident) => {{
            let mut gs = $gate.chunks_exact_mut(4);
            let mut us = $up.chunks_exact(4);
            for (g, u) in (&mut gs).zip(&mut us) {
                // SAFETY: both chunks are 4 floats.
                unsafe {
                    vst1q_f32(
                        g.as_mut_ptr(),
                        $op(vld1q_f32(g.as_ptr()), vld1q_f32(u.as_ptr())),
                    )
                };
            }
            let (g, u) = (gs.into_remainder(), us.remainder());
            if !g.is_empty() {
                let (mut gb, ub) = (tail(g), tail(u));
                // SAFETY: both buffers are 4 floats.
                unsafe {
                    vst1q_f32(
                        gb.as_mut_ptr(),
                        $op(vld1q_f32(gb.as_ptr()), vld1q_f32(ub.as_ptr())),
                    )
                };
                let len = g.len();
                g.copy_from_slice(&gb[..len]);
            }
        }};
    }

    /// # Safety
    /// `gate.len() == up.len()` (NEON is always present on aarch64).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        gated!(gate, up, silu4)
    }

    /// # Safety
    /// `gate.len() == up.len()` (NEON is always present on aarch64).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        gated!(gate, up, gelu4)
    }

    /// # Safety
    /// None beyond NEON, which every aarch64 CPU has.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn softmax_exp(v: &mut [f32], m: f32) -> f32 {
        let vm = vdupq_n_f32(m);
        let mut acc = vdupq_n_f32(0.0);
        let mut chunks = v.chunks_exact_mut(4);
        for c in &mut chunks {
            // SAFETY: a chunk is 4 floats.
            unsafe {
                let e = exp4(vsubq_f32(vld1q_f32(c.as_ptr()), vm));
                vst1q_f32(c.as_mut_ptr(), e);
                acc = vaddq_f32(acc, e);
            }
        }
        let rest = chunks.into_remainder();
        let mut sum = vaddvq_f32(acc);
        if !rest.is_empty() {
            let mut buf = tail(rest);
            // SAFETY: `buf` is 4 floats.
            unsafe {
                vst1q_f32(
                    buf.as_mut_ptr(),
                    exp4(vsubq_f32(vld1q_f32(buf.as_ptr()), vm)),
                )
            };
            let len = rest.len();
            rest.copy_from_slice(&buf[..len]);
            // Only the tail's own lanes count (the padding's exponentials are not zero).
            sum += buf[..len].iter().sum::<f32>();
        }
        sum
    }
}
