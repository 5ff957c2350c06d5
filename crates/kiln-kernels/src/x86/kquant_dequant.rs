//! AVX-512 dequantization of the ggml K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), for the bf16
//! prompt GEMM's packing, which dequantizes every weight row once per batch.
//!
//! The values are bit for bit those of `kiln_format::ggml::dequantize` (ggml's
//! `dequantize_row_*_K`): per sub-block a multiplier `d · scale` (and for the affine types a
//! minimum `dmin · min`) rounded to f32 once, then each code `q` as `mul · q` or
//! `mul · q − min`, products and difference rounded separately as the scalar code does. With
//! f16 `d` and `dmin` (11 significant bits) and codes and scales of at most 8 bits, every
//! product is exact in f32 except Q6_K's `d · scale · q` (up to 25 bits), which is rounded
//! once however it is grouped: no order of the operations, fused or not, changes a value,
//! which is why the tests cannot tell a fused multiply-subtract apart. The codes are
//! unpacked in the same way as for the dot-product kernels (`x86::avx512::kunpack`), 32 at a
//! time in a 256-bit register, widened to 16 f32 lanes, multiplied, and written by [`put32`]
//! as f32 or rounded to bf16.

use core::arch::x86_64::*;

use kiln_format::ggml::GgmlType;

use super::dequant_out::put32;
use crate::layout::*;

/// Whether there is a kernel here for `ty`.
pub(crate) fn has_kernel(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
    )
}

/// `row` (whole super-blocks of `ty`) dequantized into `out`, `256 · row.len() / bytes` values:
/// f32, or (`BF16`) each rounded to bf16 as `crate::gemm_bf16::to_bf16` does.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2 and F16C (the AVX-512 VNNI level has them); with `BF16`, AVX-512 BF16;
/// `has_kernel(ty)`; `row.len()` a multiple of `ty`'s super-block size; `out` writable for the
/// row's values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub(crate) unsafe fn dequantize_into<const BF16: bool>(ty: GgmlType, row: &[u8], out: *mut u8) {
    // SAFETY: each kernel reads whole super-blocks of `row` and writes their values to `out`
    // (the caller's guarantees).
    unsafe {
        match ty {
            GgmlType::Q2_K => each::<BF16, Q2_K_BYTES>(row, out, q2_k::<BF16>),
            GgmlType::Q3_K => each::<BF16, Q3_K_BYTES>(row, out, q3_k::<BF16>),
            GgmlType::Q4_K => each::<BF16, Q4_K_BYTES>(row, out, q45_k::<BF16, false>),
            GgmlType::Q5_K => each::<BF16, Q5_K_BYTES>(row, out, q45_k::<BF16, true>),
            GgmlType::Q6_K => each::<BF16, Q6_K_BYTES>(row, out, q6_k::<BF16>),
            _ => unreachable!("no K-quant dequantization kernel for {ty}"),
        }
    }
}

/// Runs `block` over the super-blocks of `row` (of `BYTES` each), super-block `i` writing
/// values `256 i..256 (i + 1)` of `out`.
///
/// # Safety
/// `block` is safe to call on a readable super-block and `QK_K` writable values; `out` is
/// writable for `QK_K` values per super-block of `row`.
#[inline(always)]
unsafe fn each<const BF16: bool, const BYTES: usize>(
    row: &[u8],
    out: *mut u8,
    block: unsafe fn(*const u8, *mut u8, usize),
) {
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        // SAFETY: `b` is one whole super-block; its values lie within `out` (the caller's).
        unsafe { block(b.as_ptr(), out, i * QK_K) };
    }
}

/// The f16 at `p` as f32 (`vcvtph2ps` is exact, as kiln-format's conversion is).
///
/// # Safety
/// F16C; two bytes are readable at `p`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    let h = i32::from(unsafe { rd_u16(p) });
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
}

/// Sixteen byte lanes (`sixteen`, zero- or sign-extended) times `x`, each product rounded to
/// f32: the sub-block multipliers `x · scale` as kiln-format computes them, stored for
/// broadcasting.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn times<const SIGNED: bool>(sixteen: __m128i, x: f32) -> [f32; 16] {
    let wide = if SIGNED {
        _mm512_cvtepi8_epi32(sixteen)
    } else {
        _mm512_cvtepu8_epi32(sixteen)
    };
    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(wide), _mm512_set1_ps(x));
    let mut a = [0.0f32; 16];
    // SAFETY: sixteen floats into sixteen.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// Writes the 32 elements at `at` whose codes are the bytes of `codes` (signed or unsigned):
/// the first 16 as `q · m0 − n0`, the last 16 as `q · m1 − n1` (without `AFFINE`, `q · m`).
///
/// # Safety
/// AVX-512 F/BW/VL (with `BF16`, AVX-512 BF16); elements `at..at + 32` of `out` are writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn emit32<const BF16: bool, const SIGNED: bool, const AFFINE: bool>(
    out: *mut u8,
    at: usize,
    codes: __m256i,
    m0: f32,
    n0: f32,
    m1: f32,
    n1: f32,
) {
    let widen = |b: __m128i| {
        _mm512_cvtepi32_ps(if SIGNED {
            _mm512_cvtepi8_epi32(b)
        } else {
            _mm512_cvtepu8_epi32(b)
        })
    };
    let value = |q: __m512, m: f32, n: f32| {
        let p = _mm512_mul_ps(q, _mm512_set1_ps(m));
        if AFFINE {
            _mm512_sub_ps(p, _mm512_set1_ps(n))
        } else {
            p
        }
    };
    let w0 = value(widen(_mm256_castsi256_si128(codes)), m0, n0);
    let w1 = value(widen(_mm256_extracti128_si256::<1>(codes)), m1, n1);
    // SAFETY: the caller's guarantees.
    unsafe { put32::<BF16>(out, at, w0, w1) };
}

/// Bytes `0..32` of `v` shifted right by `2 j` bits, `j` below 4 (within 16-bit lanes: the
/// bits shifted in from the next byte are above the two taken).
#[target_feature(enable = "avx2")]
#[inline]
fn shr2(v: __m256i, j: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * j as i32))
}

/// One Q4_K (`FIVE`: Q5_K) super-block at `p` into values `at..at + 256` of `out`: eight
/// sub-blocks of 32, element `64 g + 32 h + l` nibble `h` of `qs[32 g + l]` (Q5_K: plus bit
/// `2 g + h` of `qh[l]` as 16), `d · sc · q − dmin · m`.
///
/// # Safety
/// AVX-512 F/BW/VL, F16C (with `BF16`, AVX-512 BF16); one super-block readable at `p`; values
/// `at..at + 256` of `out` writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn q45_k<const BF16: bool, const FIVE: bool>(p: *const u8, out: *mut u8, at: usize) {
    // SAFETY: every offset read lies within the super-block; the writes are the caller's.
    unsafe {
        let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
        let (sc, mn) = k4_scales_mins(
            rd_u32(p.add(Q4_K_SCALES)),
            rd_u32(p.add(Q4_K_SCALES + 4)),
            rd_u32(p.add(Q4_K_SCALES + 8)),
        );
        let mul = times::<false>(_mm_cvtsi64_si128(sc as i64), d);
        let min = times::<false>(_mm_cvtsi64_si128(mn as i64), dmin);
        let qs = p.add(if FIVE { Q5_K_QS } else { Q4_K_QS });
        let qh = if FIVE {
            _mm256_loadu_si256(p.add(Q5_K_QH).cast())
        } else {
            _mm256_setzero_si256()
        };
        let m4 = _mm256_set1_epi8(0x0f);
        for g in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * g).cast());
            let mut halves = [
                _mm256_and_si256(q, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
            ];
            for (h, v) in halves.iter_mut().enumerate() {
                let s = 2 * g + h;
                if FIVE {
                    let k = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << s));
                    *v = _mm256_mask_add_epi8(*v, k, *v, _mm256_set1_epi8(16));
                }
                emit32::<BF16, false, true>(out, at + 32 * s, *v, mul[s], min[s], mul[s], min[s]);
            }
        }
    }
}

/// One Q6_K super-block at `p` into values `at..at + 256` of `out`: sixteen sub-blocks of 16,
/// element `128 n + 32 k + l` the nibble `k / 2` of `ql[64 n + 32 (k % 2) + l]` with bits
/// `2 k..2 k + 2` of `qh[32 n + l]` on top, minus 32, times `d · scale`.
///
/// # Safety
/// As [`q45_k`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn q6_k<const BF16: bool>(p: *const u8, out: *mut u8, at: usize) {
    // SAFETY: every offset read lies within the super-block; the writes are the caller's.
    unsafe {
        let d = f16_at(p.add(Q6_K_D));
        let mul = times::<true>(_mm_loadu_si128(p.add(Q6_K_SCALES).cast()), d);
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        let bias = _mm256_set1_epi8(32);
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
            let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
            let qh = _mm256_loadu_si256(p.add(Q6_K_QH + 32 * n).cast());
            // Quarter k's top bits are bits 2k..2k+2 of qh, moved to bits 4..6 of each byte.
            let quarters = [
                (_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(qh)),
                (_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<2>(qh)),
                (_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), qh),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_srli_epi16::<2>(qh),
                ),
            ];
            for (k, (low, high)) in quarters.into_iter().enumerate() {
                let code = _mm256_or_si256(low, _mm256_and_si256(high, m30));
                let q = _mm256_sub_epi8(code, bias);
                let s = 8 * n + 2 * k;
                emit32::<BF16, true, false>(out, at + 16 * s, q, mul[s], 0.0, mul[s + 1], 0.0);
            }
        }
    }
}

/// One Q3_K super-block at `p` into values `at..at + 256` of `out`: sixteen sub-blocks of 16,
/// element `128 n + 32 j + b` bits `2 j..2 j + 2` of `qs[32 n + b]`, minus 4 unless bit
/// `4 n + j` of `hmask[b]` is set, times `d · (scale − 32)`.
///
/// # Safety
/// As [`q45_k`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn q3_k<const BF16: bool>(p: *const u8, out: *mut u8, at: usize) {
    // SAFETY: every offset read lies within the super-block; the writes are the caller's.
    unsafe {
        let d = f16_at(p.add(Q3_K_D));
        let (lo, hi) = q3k_scales(rd_u64(p.add(Q3_K_SCALES)), rd_u32(p.add(Q3_K_SCALES + 8)));
        let biased = _mm_set_epi64x(hi as i64, lo as i64);
        // 6-bit scales minus 32 fit a signed byte.
        let mul = times::<true>(_mm_sub_epi8(biased, _mm_set1_epi8(32)), d);
        let hmask = _mm256_loadu_si256(p.cast());
        let m3 = _mm256_set1_epi8(3);
        let four = _mm256_set1_epi8(4);
        for n in 0..2 {
            let q = _mm256_loadu_si256(p.add(Q3_K_QS + 32 * n).cast());
            for j in 0..4 {
                let low = _mm256_and_si256(shr2(q, j), m3);
                let set = _mm256_test_epi8_mask(hmask, _mm256_set1_epi8(1 << (4 * n + j)));
                let v = _mm256_mask_sub_epi8(low, !set, low, four);
                let s = 8 * n + 2 * j;
                emit32::<BF16, true, false>(out, at + 16 * s, v, mul[s], 0.0, mul[s + 1], 0.0);
            }
        }
    }
}

/// One Q2_K super-block at `p` into values `at..at + 256` of `out`: sixteen sub-blocks of 16,
/// element `128 n + 32 j + b` bits `2 j..2 j + 2` of `qs[32 n + b]`,
/// `d · sc · q − dmin · m` with `sc`, `m` the nibbles of the sub-block's scale byte.
///
/// # Safety
/// As [`q45_k`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn q2_k<const BF16: bool>(p: *const u8, out: *mut u8, at: usize) {
    // SAFETY: every offset read lies within the super-block; the writes are the caller's.
    unsafe {
        let (d, dmin) = (f16_at(p.add(Q2_K_D)), f16_at(p.add(Q2_K_D + 2)));
        let scales = _mm_loadu_si128(p.cast());
        let n4 = _mm_set1_epi8(0x0f);
        let mul = times::<false>(_mm_and_si128(scales, n4), d);
        let min = times::<false>(_mm_and_si128(_mm_srli_epi16::<4>(scales), n4), dmin);
        let m3 = _mm256_set1_epi8(3);
        for n in 0..2 {
            let q = _mm256_loadu_si256(p.add(Q2_K_QS + 32 * n).cast());
            for j in 0..4 {
                let v = _mm256_and_si256(shr2(q, j), m3);
                let s = 8 * n + 2 * j;
                emit32::<BF16, false, true>(
                    out,
                    at + 16 * s,
                    v,
                    mul[s],
                    min[s],
                    mul[s + 1],
                    min[s + 1],
                );
            }
        }
    }
}
