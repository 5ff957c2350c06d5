//! AVX2 kernels.
//!
//! One 32-element block fills a 256-bit register. `vpmaddubsw` multiplies unsigned weight
//! codes with signed activation codes into 16-bit pair sums (never saturating: codes are at
//! most 63 and activations at most 127 in magnitude), and `vpmaddwd` widens them to int32,
//! by ones for the 32-element formats or by the sub-block scales for the K-quants. Q8_0's
//! signed weights use the sign trick instead: `|w|` times `x * sign(w)`, and so do the IQ4
//! types, whose nibbles a `vpshufb` turns into their signed table levels first.
//!
//! AVX-VNNI (`vpdpbusd` on 256-bit registers, on CPUs without AVX-512) is not used yet: it
//! would fuse the `vpmaddubsw`/`vpmaddwd` pairs.

use core::arch::x86_64::*;

use kiln_format::ggml::GgmlType;

use super::{iq4, kq, leg, tiled_dot_block};
use crate::activation::QuantizedRow;
use crate::layout::*;

tiled_dot_block!(tile, |_| false, no_row_at_a_time);

/// AVX2 reads every format in tiles (the row-at-a-time path is AVX-512's).
///
/// # Safety
/// Never called.
unsafe fn no_row_at_a_time(
    _: GgmlType,
    _: &[u8],
    _: usize,
    _: usize,
    _: &QuantizedRow,
    _: &mut [f32],
) {
    unreachable!("AVX2 reads no format a row at a time")
}

/// `vpshufb` indices putting 16-element sub-block scales `2c` (low lane) and `2c + 1` (high
/// lane) under the eight pair sums of each 128-bit lane.
const PAIR_SCALES: [__m128i; 8] = {
    let mut out = [[0u8; 16]; 8];
    let mut c = 0;
    while c < 8 {
        let mut i = 0;
        while i < 16 {
            out[c][i] = (2 * c + i / 8) as u8;
            i += 1;
        }
        c += 1;
    }
    // SAFETY: [[u8; 16]; 8] and [__m128i; 8] have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[[u8; 16]; 8], [__m128i; 8]>(out) }
};

/// `vpshufb` indices doubling each of eight bytes.
const DUP_PAIRS: __m128i = {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = (i / 2) as u8;
        i += 1;
    }
    // SAFETY: [u8; 16] and __m128i have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u8; 16], __m128i>(a) }
};

/// Spreads the bytes of a broadcast 32-bit word: byte `i / 8` under element `i`.
const SPREAD_BITS: __m256i = {
    let mut a = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        a[i] = (i / 8) as u8 % 2 + if i >= 16 { 2 } else { 0 };
        i += 1;
    }
    // SAFETY: [u8; 32] and __m256i have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u8; 32], __m256i>(a) }
};

/// Bit `i % 8` under element `i`.
const BIT_OF_ELEMENT: __m256i = {
    let mut a = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        a[i] = 1 << (i % 8);
        i += 1;
    }
    // SAFETY: as above.
    unsafe { core::mem::transmute::<[u8; 32], __m256i>(a) }
};

/// The IQ4 levels, in both lanes.
// SAFETY: [u8; 32] and __m256i have the same size; every bit pattern is valid in both.
const IQ4_SIGNED: __m256i = unsafe { core::mem::transmute::<[u8; 32], __m256i>(iq4::SIGNED_32) };

/// The kernel for `R` rows by `T` activation rows.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` starts `R` rows of `row_bytes` bytes, each one row of
/// `xs[t].len()` elements of `weights`; every `xs[t]` is in the weights' activation format.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const T: usize>(
    weights: GgmlType,
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    // SAFETY: the caller's guarantees are exactly what each kernel needs.
    unsafe {
        match weights {
            GgmlType::Q4_0 if xs[0].is_refined() => {
                legacy::<{ leg::Q4_0 }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::Q4_0 => legacy::<{ leg::Q4_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q4_1 if xs[0].is_refined() => {
                legacy::<{ leg::Q4_1 }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::Q4_1 => legacy::<{ leg::Q4_1 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q5_0 if xs[0].is_refined() => {
                legacy::<{ leg::Q5_0 }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::Q5_0 => legacy::<{ leg::Q5_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q5_1 if xs[0].is_refined() => {
                legacy::<{ leg::Q5_1 }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::Q5_1 => legacy::<{ leg::Q5_1 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q8_0 if xs[0].is_refined() => {
                legacy::<{ leg::Q8_0 }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::Q8_0 => legacy::<{ leg::Q8_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::IQ4_NL if xs[0].is_refined() => {
                legacy::<{ leg::IQ4_NL }, R, T, true>(w, row_bytes, xs)
            }
            GgmlType::IQ4_NL => legacy::<{ leg::IQ4_NL }, R, T, false>(w, row_bytes, xs),
            GgmlType::IQ4_XS => iq4_xs::<R, T>(w, row_bytes, xs),
            GgmlType::Q2_K => kquant::<{ kq::Q2_K }, R, T>(w, row_bytes, xs),
            GgmlType::Q3_K => kquant::<{ kq::Q3_K }, R, T>(w, row_bytes, xs),
            GgmlType::Q4_K => kquant::<{ kq::Q4_K }, R, T>(w, row_bytes, xs),
            GgmlType::Q5_K => kquant::<{ kq::Q5_K }, R, T>(w, row_bytes, xs),
            GgmlType::Q6_K => kquant::<{ kq::Q6_K }, R, T>(w, row_bytes, xs),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                float::<R, T>(weights, w, row_bytes, xs)
            }
            _ => crate::reference_tile::<R, T>(weights, w, row_bytes, xs),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `v` with every byte's bits moved from position `from` to `to` (16-bit shifts: a byte's
/// bit keeps coming from the same byte as long as both positions lie within it).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn move_bits(v: __m256i, from: i32, to: i32) -> __m256i {
    if from >= to {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(from - to))
    } else {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(to - from))
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element formats

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn legacy<const F: u8, const R: usize, const T: usize, const REFINED: bool>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nb = xs[0].len / QK;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 4 <= nb {
        // SAFETY: blocks b..b + 4 exist in every weight row and activation row.
        unsafe { leg_step::<F, R, T, 4, REFINED>(w, row_bytes, &xs, b, &mut acc) };
        b += 4;
    }
    // SAFETY: the last nb - b blocks exist.
    unsafe {
        match nb - b {
            1 => leg_step::<F, R, T, 1, REFINED>(w, row_bytes, &xs, b, &mut acc),
            2 => leg_step::<F, R, T, 2, REFINED>(w, row_bytes, &xs, b, &mut acc),
            3 => leg_step::<F, R, T, 3, REFINED>(w, row_bytes, &xs, b, &mut acc),
            _ => {}
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
    out
}

/// Adds blocks `b..b + N` (N ≤ 4) of every row and activation row of the tile to `acc`.
///
/// `REFINED`: the activation rows are refined, their codes `256·high + low`; the low parts'
/// products are added to the high parts' integer sums shifted left by 8, so the block's scales
/// apply once. Exact: a lane's high sum is at most 4 · 128 · 127 (65 024), the total below 2^25.
///
/// # Safety
/// Blocks `b..b + N` exist in the `R` weight rows at `w` and in every activation row (and its
/// low parts if `REFINED`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn leg_step<
    const F: u8,
    const R: usize,
    const T: usize,
    const N: usize,
    const REFINED: bool,
>(
    w: *const u8,
    row_bytes: usize,
    xs: &[&QuantizedRow; T],
    b: usize,
    acc: &mut [[__m256; T]; R],
) {
    let bytes = leg::bytes(F);
    let ahead = super::prefetch_distance(row_bytes);
    let lane = |k: i32| if (k as usize) < N { -1 } else { 0 };
    let lanes = _mm_setr_epi32(lane(0), lane(1), lane(2), lane(3));
    let mut dx = [_mm_setzero_ps(); T];
    let mut ds = [_mm_setzero_ps(); T];
    for t in 0..T {
        // SAFETY: N scales and sums from index b are in bounds; masked lanes are not read.
        unsafe {
            dx[t] = _mm_maskload_ps(xs[t].scales.as_ptr().add(b), lanes);
            ds[t] = _mm_maskload_ps(xs[t].sums.as_ptr().add(b), lanes);
        }
    }
    let ones = _mm256_set1_epi16(1);
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let p = w.wrapping_add(r * row_bytes + b * bytes);
        // Every line of these blocks one tile ahead, and further on into L2
        // (harmless at any address).
        for line in (0..4 * bytes).step_by(64) {
            super::prefetch_weights(p.wrapping_add(line), ahead);
        }
        // SAFETY: as above.
        let (d4, m4) = unsafe { leg_scales::<F, N>(p) };
        let mut s4 = [_mm256_setzero_ps(); T];
        for t in 0..T {
            s4[t] = _mm256_castps128_ps256(_mm_mul_ps(d4, dx[t]));
            let c = _mm_mul_ps(m4, ds[t]);
            acc_r[t] = _mm256_add_ps(acc_r[t], _mm256_zextps128_ps256(c));
        }
        for k in 0..N {
            // SAFETY: block b + k of row r is in bounds.
            let u = unsafe { leg_codes::<F>(p.add(k * bytes)) };
            let uu = if leg::is_signed(F) {
                _mm256_sign_epi8(u, u)
            } else {
                u
            };
            // Signed weights: |w| times x with w's sign, so the first operand is unsigned.
            let signed = |x: __m256i| {
                if leg::is_signed(F) {
                    _mm256_sign_epi8(x, u)
                } else {
                    x
                }
            };
            for t in 0..T {
                // SAFETY: block b + k of every activation row is in bounds.
                let x =
                    unsafe { _mm256_loadu_si256(xs[t].codes.as_ptr().add((b + k) * QK).cast()) };
                let mut i = _mm256_madd_epi16(_mm256_maddubs_epi16(uu, signed(x)), ones);
                if REFINED {
                    // SAFETY: a refined row's low parts are as long as its codes.
                    let y =
                        unsafe { _mm256_loadu_si256(xs[t].low.as_ptr().add((b + k) * QK).cast()) };
                    let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(uu, signed(y)), ones);
                    i = _mm256_add_epi32(_mm256_slli_epi32::<8>(i), lo);
                }
                let s = _mm256_permutevar8x32_ps(s4[t], _mm256_set1_epi32(k as i32));
                acc_r[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc_r[t]);
            }
        }
    }
}

/// Scales `d` and offsets `m` of blocks `0..N` at `p` (zero beyond `N`). Q8_0 and IQ4_NL have
/// no offset here: their kernel multiplies signed codes.
///
/// # Safety
/// `N` blocks of format `F` are readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn leg_scales<const F: u8, const N: usize>(p: *const u8) -> (__m128, __m128) {
    let bytes = leg::bytes(F);
    let (mut dh, mut mh) = (0u64, 0u64);
    for k in 0..N {
        // SAFETY: block k < N is readable; its f16 scale (and minimum) lead it.
        unsafe {
            dh |= u64::from(rd_u16(p.add(k * bytes))) << (16 * k);
            if leg::has_min(F) {
                mh |= u64::from(rd_u16(p.add(k * bytes + 2))) << (16 * k);
            }
        }
    }
    let d = _mm_cvtph_ps(_mm_cvtsi64_si128(dh as i64));
    let m = if leg::has_min(F) {
        _mm_cvtph_ps(_mm_cvtsi64_si128(mh as i64))
    } else if leg::is_signed(F) {
        _mm_setzero_ps()
    } else {
        _mm_mul_ps(d, _mm_set1_ps(leg::offset(F)))
    };
    (d, m)
}

/// The codes of the block at `p` in element order: unsigned, or Q8_0's signed bytes, or
/// IQ4_NL's signed levels.
///
/// # Safety
/// One block of format `F` is readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn leg_codes<const F: u8>(p: *const u8) -> __m256i {
    if F == leg::Q8_0 {
        // SAFETY: the block holds 32 code bytes at offset 2.
        return unsafe { _mm256_loadu_si256(p.add(2).cast()) };
    }
    // SAFETY: the block holds 16 bytes of nibbles at offset leg::qs(F).
    let a = unsafe { _mm_loadu_si128(p.add(leg::qs(F)).cast()) };
    let mut u = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(a), a),
        _mm256_set1_epi8(0x0f),
    );
    if leg::is_q5(F) {
        // SAFETY: the block holds its 32 fifth bits at offset leg::qh(F).
        let qh = unsafe { rd_u32(p.add(leg::qh(F))) };
        let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), SPREAD_BITS);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, BIT_OF_ELEMENT), BIT_OF_ELEMENT);
        u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)));
    }
    if F == leg::IQ4_NL {
        u = _mm256_shuffle_epi8(IQ4_SIGNED, u);
    }
    u
}

// ---------------------------------------------------------------------------------------------
// K-quants

/// What a super-block needs before its codes: scales, and the correction
/// `f * sum_s c16[s] * (activation sum of 16-group s)`.
struct KHead {
    d: f32,
    f: f32,
    c16: __m256i,
    /// Q4_K/Q5_K: eight 6-bit scales, one byte each.
    sc8: u64,
    /// Other K-quants: sixteen signed 8-bit scales.
    sc16: __m128i,
    /// Q5_K: the fifth bits; Q3_K: the high bits.
    hi: __m256i,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn kquant<const F: u8, const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nsb = xs[0].len / QK_K;
    let bytes = kq::bytes(F);
    let ahead = super::prefetch_distance(row_bytes);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for sb in 0..nsb {
        let mut dx = [0.0f32; T];
        let mut bs = [_mm256_setzero_si256(); T];
        let mut xp = [core::ptr::null::<i8>(); T];
        for t in 0..T {
            dx[t] = xs[t].scales[sb];
            // SAFETY: super-block sb exists: its 16 group sums and 256 codes are in bounds.
            unsafe {
                bs[t] = _mm256_loadu_si256(xs[t].group_sums.as_ptr().add(sb * 16).cast());
                xp[t] = xs[t].codes.as_ptr().add(sb * QK_K);
            }
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let p = w.wrapping_add(r * row_bytes + sb * bytes);
            // Every line of the super-block one tile ahead, and further on into L2
            // (harmless at any address).
            for line in (0..bytes).step_by(64) {
                super::prefetch_weights(p.wrapping_add(line), ahead);
            }
            // SAFETY: as above.
            let h = unsafe { khead::<F>(p) };
            let mut isum = [_mm256_setzero_si256(); T];
            for c in 0..8 {
                // SAFETY: as above.
                let (u, sv) = unsafe { kchunk::<F>(p, c, &h) };
                for t in 0..T {
                    // SAFETY: xp[t] points at 256 codes.
                    let x = unsafe { _mm256_loadu_si256(xp[t].add(32 * c).cast()) };
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), sv);
                    isum[t] = _mm256_add_epi32(isum[t], prod);
                }
            }
            for t in 0..T {
                let corr = _mm256_madd_epi16(h.c16, bs[t]);
                let a = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[t]),
                    _mm256_set1_ps(h.d * dx[t]),
                    acc_r[t],
                );
                acc_r[t] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(h.f * dx[t]), a);
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
    out
}

/// # Safety
/// `p..p + 2` is readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(unsafe {
        rd_u16(p)
    }))))
}

/// # Safety
/// One super-block of format `F` is readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn khead<const F: u8>(p: *const u8) -> KHead {
    let zero = _mm256_setzero_si256();
    // SAFETY: every offset below lies within one super-block of format F.
    unsafe {
        match F {
            kq::Q4_K | kq::Q5_K => {
                let (sc8, mn8) = k4_scales_mins(
                    rd_u32(p.add(Q4_K_SCALES)),
                    rd_u32(p.add(Q4_K_SCALES + 4)),
                    rd_u32(p.add(Q4_K_SCALES + 8)),
                );
                let c16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
                    _mm_cvtsi64_si128(mn8 as i64),
                    DUP_PAIRS,
                ));
                let hi = if F == kq::Q5_K {
                    _mm256_loadu_si256(p.add(Q5_K_QH).cast())
                } else {
                    zero
                };
                KHead {
                    d: f16_at(p),
                    f: -f16_at(p.add(2)),
                    c16,
                    sc8,
                    sc16: _mm_setzero_si128(),
                    hi,
                }
            }
            kq::Q6_K => {
                let d = f16_at(p.add(Q6_K_D));
                let sc16 = _mm_loadu_si128(p.add(Q6_K_SCALES).cast());
                KHead {
                    d,
                    f: -32.0 * d,
                    c16: _mm256_cvtepi8_epi16(sc16),
                    sc8: 0,
                    sc16,
                    hi: zero,
                }
            }
            kq::Q3_K => {
                let d = f16_at(p.add(Q3_K_D));
                let (lo, hi) =
                    q3k_scales(rd_u64(p.add(Q3_K_SCALES)), rd_u32(p.add(Q3_K_SCALES + 8)));
                let sc16 = _mm_sub_epi8(_mm_set_epi64x(hi as i64, lo as i64), _mm_set1_epi8(32));
                KHead {
                    d,
                    f: -4.0 * d,
                    c16: _mm256_cvtepi8_epi16(sc16),
                    sc8: 0,
                    sc16,
                    hi: _mm256_loadu_si256(p.cast()),
                }
            }
            _ => {
                // Q2_K
                let scb = _mm_loadu_si128(p.cast());
                let m4 = _mm_set1_epi8(0x0f);
                KHead {
                    d: f16_at(p.add(Q2_K_D)),
                    f: -f16_at(p.add(Q2_K_D + 2)),
                    c16: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(scb), m4)),
                    sc8: 0,
                    sc16: _mm_and_si128(scb, m4),
                    hi: zero,
                }
            }
        }
    }
}

/// Unsigned codes of elements `32c..32c + 32` of the super-block at `p`, and the scales
/// under their sixteen pair sums.
///
/// # Safety
/// One super-block of format `F` is readable at `p`; `c < 8`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn kchunk<const F: u8>(p: *const u8, c: usize, h: &KHead) -> (__m256i, __m256i) {
    let ci = c as i32;
    let pair_scales = || _mm256_cvtepi8_epi16(_mm_shuffle_epi8(h.sc16, PAIR_SCALES[c]));
    // SAFETY: every offset below lies within one super-block of format F, as c < 8.
    unsafe {
        match F {
            kq::Q4_K | kq::Q5_K => {
                let qs = if F == kq::Q5_K { Q5_K_QS } else { Q4_K_QS };
                let q = _mm256_loadu_si256(p.add(qs + 32 * (c / 2)).cast());
                let q = if c.is_multiple_of(2) {
                    q
                } else {
                    _mm256_srli_epi16::<4>(q)
                };
                let mut u = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                if F == kq::Q5_K {
                    let bit = _mm256_and_si256(move_bits(h.hi, ci, 4), _mm256_set1_epi8(0x10));
                    u = _mm256_or_si256(u, bit);
                }
                let sv = _mm256_set1_epi16(((h.sc8 >> (8 * c)) & 0xff) as i16);
                (u, sv)
            }
            kq::Q6_K => {
                let (n, k) = (c / 4, c % 4);
                let ql = _mm256_loadu_si256(p.add(64 * n + 32 * (k % 2)).cast());
                let ql = if k < 2 {
                    ql
                } else {
                    _mm256_srli_epi16::<4>(ql)
                };
                let lo = _mm256_and_si256(ql, _mm256_set1_epi8(0x0f));
                let qh = _mm256_loadu_si256(p.add(Q6_K_QH + 32 * n).cast());
                let hi = _mm256_and_si256(move_bits(qh, 2 * k as i32, 4), _mm256_set1_epi8(0x30));
                (_mm256_or_si256(lo, hi), pair_scales())
            }
            kq::Q3_K => {
                let (n, j) = (c / 4, (c % 4) as i32);
                let q = _mm256_loadu_si256(p.add(Q3_K_QS + 32 * n).cast());
                let low = _mm256_and_si256(move_bits(q, 2 * j, 0), _mm256_set1_epi8(3));
                let high = _mm256_and_si256(move_bits(h.hi, ci, 2), _mm256_set1_epi8(4));
                (_mm256_or_si256(low, high), pair_scales())
            }
            _ => {
                let (n, j) = (c / 4, (c % 4) as i32);
                let q = _mm256_loadu_si256(p.add(Q2_K_QS + 32 * n).cast());
                let low = _mm256_and_si256(move_bits(q, 2 * j, 0), _mm256_set1_epi8(3));
                (low, pair_scales())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IQ4_XS: per 32-element sub-block, signed levels times activations by the sign trick, pair
// sums widened by the sub-block's integer scale; one float multiply per super-block.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn iq4_xs<const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nsb = xs[0].len / QK_K;
    let ahead = super::prefetch_distance(row_bytes);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for sb in 0..nsb {
        let mut dx = [0.0f32; T];
        let mut xp = [core::ptr::null::<i8>(); T];
        for t in 0..T {
            dx[t] = xs[t].scales[sb];
            // SAFETY: super-block sb exists: its 256 codes are in bounds.
            xp[t] = unsafe { xs[t].codes.as_ptr().add(sb * QK_K) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let p = w.wrapping_add(r * row_bytes + sb * IQ4_XS_BYTES);
            // Every line of the super-block one tile ahead, and further on into L2
            // (harmless at any address).
            for line in (0..IQ4_XS_BYTES).step_by(64) {
                super::prefetch_weights(p.wrapping_add(line), ahead);
            }
            // SAFETY: super-block sb of row r is in bounds (the caller's guarantee).
            let (d, scales) = unsafe {
                (
                    f16_at(p),
                    iq4xs_scales(
                        rd_u16(p.add(IQ4_XS_SCALES_H)),
                        rd_u32(p.add(IQ4_XS_SCALES_L)),
                    ),
                )
            };
            let mut isum = [_mm256_setzero_si256(); T];
            for c in 0..8 {
                // SAFETY: sub-block c's 16 bytes of nibbles lie within the super-block.
                let a = unsafe { _mm_loadu_si128(p.add(IQ4_XS_QS + 16 * c).cast()) };
                let nib = _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16::<4>(a), a),
                    _mm256_set1_epi8(0x0f),
                );
                let levels = _mm256_shuffle_epi8(IQ4_SIGNED, nib);
                let aw = _mm256_sign_epi8(levels, levels);
                let sv = _mm256_set1_epi16(((scales >> (8 * c)) & 0xff) as i16 - 32);
                for t in 0..T {
                    // SAFETY: xp[t] points at 256 codes.
                    let x = unsafe { _mm256_loadu_si256(xp[t].add(32 * c).cast()) };
                    let pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, levels));
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pairs, sv));
                }
            }
            for t in 0..T {
                acc_r[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[t]),
                    _mm256_set1_ps(d * dx[t]),
                    acc_r[t],
                );
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Float formats

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn float<const R: usize, const T: usize>(
    weights: GgmlType,
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let n = xs[0].len;
    let size = weights.block_bytes();
    let ahead = super::prefetch_distance(row_bytes);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut i = 0;
    while i + 8 <= n {
        let mut xv = [_mm256_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: elements i..i + 8 are within the row of n values.
            xv[t] = unsafe { _mm256_loadu_ps(xs[t].values.as_ptr().add(i)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // Float rows are long: fetch the same place in the next tile's rows, which is
            // both far enough ahead and not already being read (harmless at any address).
            super::prefetch_weights(w.wrapping_add(r * row_bytes + size * i), ahead);
            // SAFETY: elements i..i + 8 of row r are in bounds.
            let wv = unsafe {
                let p = w.add(r * row_bytes);
                match weights {
                    GgmlType::F32 => _mm256_loadu_ps(p.add(4 * i).cast()),
                    GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast())),
                    _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                        _mm_loadu_si128(p.add(2 * i).cast()),
                    ))),
                }
            };
            for t in 0..T {
                acc_r[t] = _mm256_fmadd_ps(wv, xv[t], acc_r[t]);
            }
        }
        i += 8;
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        // SAFETY: row r is `row_bytes` readable bytes.
        let row = unsafe { std::slice::from_raw_parts(w.add(r * row_bytes), row_bytes) };
        for t in 0..T {
            let mut tail = 0.0f32;
            for (e, &x) in xs[t].values.iter().enumerate().skip(i) {
                tail += float_at(weights, row, e) * x;
            }
            out[r][t] = hsum(acc[r][t]) + tail;
        }
    }
    out
}

fn float_at(weights: GgmlType, row: &[u8], e: usize) -> f32 {
    match weights {
        GgmlType::F32 => {
            f32::from_le_bytes([row[4 * e], row[4 * e + 1], row[4 * e + 2], row[4 * e + 3]])
        }
        GgmlType::F16 => {
            kiln_format::ggml::f16_to_f32(u16::from_le_bytes([row[2 * e], row[2 * e + 1]]))
        }
        _ => kiln_format::ggml::bf16_to_f32(u16::from_le_bytes([row[2 * e], row[2 * e + 1]])),
    }
}
