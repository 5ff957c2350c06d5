//! AVX-512 VNNI kernels.
//!
//! 32-element formats: two blocks fill a 512-bit register; `vpdpbusd` multiplies the unsigned
//! weight codes with the signed activation codes into eight int32 lanes per block, which are
//! converted and scaled by `d_w * d_x` of their block. Weight offsets (Q4_0's -8, Q5_0's -16,
//! Q8_0's -128 after flipping its sign bit) and stored minimums are applied through the
//! activation block sums, once per block.
//!
//! K-quants: `vpmaddubsw` gives 16-bit pair sums of codes times activations, and `vpdpwssd`
//! multiplies those by the 16-bit sub-block scales and accumulates in int32, so a whole
//! super-block is one integer sum. Minimums and offsets come from the per-16 activation sums.
//!
//! IQ4: a `vpshufb` turns the nibbles into table levels. IQ4_NL takes them plus 128 and runs as
//! Q8_0 does; IQ4_XS multiplies the signed levels as `|w|` times `x` negated where `w < 0`
//! (exact in `vpmaddubsw`: |levels| and |codes| are at most 127), then as the K-quants.

use core::arch::x86_64::*;

use kiln_format::ggml::GgmlType;

use super::{iq4, kq, leg, tiled_dot_block, TILE_ROWS};
use crate::activation::QuantizedRow;
use crate::layout::*;

tiled_dot_block!(tile, row_at_a_time, rows_one_at_a_time::<false>);

/// Whether a single activation row reads `weights` a row at a time rather than four rows side
/// by side: Q8_0, whose one byte per weight needs little unpacking, so the four interleaved
/// row streams of a tile (which the hardware prefetchers follow worse than one) cost more than
/// sharing the activation loads saves. Gemma 3's Q8_0 output projection (262 144 rows of 640)
/// streams at 38 GB/s a row at a time against 32-36 GB/s in tiles of four, one thread, one
/// refined activation row (`decode_kernels --fused`, three interleaved rounds); its Q5_0
/// matrices lose that way (20 against 25 GB/s) and keep the tiles.
fn row_at_a_time(weights: GgmlType) -> bool {
    weights == GgmlType::Q8_0
}

/// `out[r] = row r · x` for the `n_rows` rows at `w` (planar rows if `PLANAR`), a row at a time in one loop (a call and
/// a format dispatch per row showed at 262 144 rows).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA, F16C; `row_at_a_time(weights)`; `w` holds `n_rows` rows of
/// `row_bytes` bytes, each one (planar if `PLANAR`) row of `x.len()` elements of `weights`; `x` is in the weights'
/// activation format; `out` has `n_rows` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_one_at_a_time<const PLANAR: bool>(
    weights: GgmlType,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    x: &QuantizedRow,
    out: &mut [f32],
) {
    debug_assert!(weights == GgmlType::Q8_0 && out.len() >= n_rows);
    let refined = x.is_refined();
    for (r, o) in out[..n_rows].iter_mut().enumerate() {
        let p = w[r * row_bytes..].as_ptr();
        // SAFETY: row r lies within `w`; the rest is the caller's guarantee.
        *o = unsafe {
            if refined {
                legacy::<{ leg::Q8_0 }, 1, 1, true, PLANAR>(p, row_bytes, [x])[0][0]
            } else {
                legacy::<{ leg::Q8_0 }, 1, 1, false, PLANAR>(p, row_bytes, [x])[0][0]
            }
        };
    }
}

const fn words(group: usize, base: usize) -> __m512i {
    let mut a = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        a[i] = (base + i / group) as i16;
        i += 1;
    }
    // SAFETY: [i16; 32] and __m512i have the same size and every bit pattern is valid in both.
    unsafe { core::mem::transmute::<[i16; 32], __m512i>(a) }
}

const fn dwords(group: usize, base: usize) -> __m512i {
    let mut a = [0i32; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = (base + i / group) as i32;
        i += 1;
    }
    // SAFETY: as in `words`.
    unsafe { core::mem::transmute::<[i32; 16], __m512i>(a) }
}

/// `vpermw` indices spreading the eight Q4_K/Q5_K sub-block scales over the 32 pair sums of
/// a 64-element register: sub-block `2g` on the low half, `2g + 1` on the high half.
const K32_IDX: [__m512i; 4] = [words(16, 0), words(16, 2), words(16, 4), words(16, 6)];
/// The same for 16-element sub-blocks: four per register.
const K16_IDX: [__m512i; 4] = [words(8, 0), words(8, 4), words(8, 8), words(8, 12)];
/// `vpermps` indices spreading four block scales over two blocks' eight lanes each.
pub(super) const PAIR_IDX: [__m512i; 2] = [dwords(8, 0), dwords(8, 2)];
/// `vpermps` indices spreading four block scales over four lanes each.
pub(super) const QUAD_IDX: __m512i = dwords(4, 0);
/// `vpermt2w` indices gathering, from a 128-byte window over four blocks of format `f`, the
/// four f16 scales into words 0..4 and (for Q4_1/Q5_1) the four minimums into words 4..8.
const fn leg_scale_idx(f: u8) -> __m512i {
    let (bytes, min) = (leg::bytes(f), leg::has_min(f));
    let mut a = [0i16; 32];
    let mut k = 0;
    while k < 4 {
        a[k] = (k * bytes / 2) as i16;
        if min {
            a[4 + k] = ((k * bytes + 2) / 2) as i16;
        }
        k += 1;
    }
    // SAFETY: [i16; 32] and __m512i have the same size and every bit pattern is valid in both.
    unsafe { core::mem::transmute::<[i16; 32], __m512i>(a) }
}

/// `vpermt2w` indices gathering the packed nibbles of blocks `2 * pair` and `2 * pair + 1`
/// from the same window, each twice: `[qs_a, qs_a, qs_b, qs_b]` (16 bytes each). Every field
/// of every 32-element format starts at an even offset, so words suffice.
const fn leg_code_idx(f: u8, pair: usize) -> __m512i {
    let (bytes, qs) = (leg::bytes(f), leg::qs(f));
    let mut a = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        let block = 2 * pair + i / 16;
        a[i] = ((block * bytes + qs) / 2 + i % 8) as i16;
        i += 1;
    }
    // SAFETY: as above.
    unsafe { core::mem::transmute::<[i16; 32], __m512i>(a) }
}

pub(super) const LEG_SCALE_IDX: [__m512i; 6] = [
    leg_scale_idx(leg::Q4_0),
    leg_scale_idx(leg::Q4_1),
    leg_scale_idx(leg::Q5_0),
    leg_scale_idx(leg::Q5_1),
    leg_scale_idx(leg::Q8_0),
    leg_scale_idx(leg::IQ4_NL),
];

/// Indexed by format id; Q8_0 (id 4) reads its bytes whole and has no entry of its own.
pub(super) const LEG_CODE_IDX: [[__m512i; 2]; 6] = [
    [leg_code_idx(leg::Q4_0, 0), leg_code_idx(leg::Q4_0, 1)],
    [leg_code_idx(leg::Q4_1, 0), leg_code_idx(leg::Q4_1, 1)],
    [leg_code_idx(leg::Q5_0, 0), leg_code_idx(leg::Q5_0, 1)],
    [leg_code_idx(leg::Q5_1, 0), leg_code_idx(leg::Q5_1, 1)],
    [leg_code_idx(leg::Q4_0, 0), leg_code_idx(leg::Q4_0, 1)],
    [leg_code_idx(leg::IQ4_NL, 0), leg_code_idx(leg::IQ4_NL, 1)],
];

/// The IQ4 levels plus 128, in every lane.
// SAFETY: [u8; 64] and __m512i have the same size; every bit pattern is valid in both.
const IQ4_UNSIGNED: __m512i =
    unsafe { core::mem::transmute::<[u8; 64], __m512i>(iq4::UNSIGNED_64) };
/// The IQ4 levels, in every lane.
// SAFETY: as above.
const IQ4_SIGNED: __m512i = unsafe { core::mem::transmute::<[u8; 64], __m512i>(iq4::SIGNED_64) };

/// `vpshufb` indices doubling each of eight bytes (Q4_K minimums onto their two 16-sums).
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

/// The kernel for `R` rows by `T` activation rows.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, FMA and F16C; `w` starts `R` rows of `row_bytes` bytes,
/// each one row of `xs[t].len()` elements of `weights`; every `xs[t]` is in the weights'
/// activation format.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile<const R: usize, const T: usize>(
    weights: GgmlType,
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    // SAFETY: the caller's guarantees are exactly what each kernel needs.
    unsafe {
        match weights {
            GgmlType::Q4_0 => legacy_any::<{ leg::Q4_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q4_1 => legacy_any::<{ leg::Q4_1 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q5_0 => legacy_any::<{ leg::Q5_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q5_1 => legacy_any::<{ leg::Q5_1 }, R, T, false>(w, row_bytes, xs),
            GgmlType::Q8_0 => legacy_any::<{ leg::Q8_0 }, R, T, false>(w, row_bytes, xs),
            GgmlType::IQ4_NL => legacy_any::<{ leg::IQ4_NL }, R, T, false>(w, row_bytes, xs),
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

// ---------------------------------------------------------------------------------------------
// 32-element formats

/// [`legacy`] for plain or refined activation rows (all of one kind, as `dot_block` checks).
///
/// # Safety
/// As [`legacy`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn legacy_any<const F: u8, const R: usize, const T: usize, const PLANAR: bool>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    // SAFETY: the caller's guarantees, passed on.
    unsafe {
        if xs[0].is_refined() {
            legacy::<F, R, T, true, PLANAR>(w, row_bytes, xs)
        } else {
            legacy::<F, R, T, false, PLANAR>(w, row_bytes, xs)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn legacy<
    const F: u8,
    const R: usize,
    const T: usize,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nb = xs[0].len / QK;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 4 <= nb {
        // SAFETY: blocks b..b + 4 exist in every weight row and activation row.
        unsafe { leg_step::<F, R, T, 4, REFINED, PLANAR>(w, row_bytes, &xs, b, &mut acc) };
        b += 4;
    }
    // SAFETY: the last nb - b blocks exist.
    unsafe {
        match nb - b {
            1 => leg_step::<F, R, T, 1, REFINED, PLANAR>(w, row_bytes, &xs, b, &mut acc),
            2 => leg_step::<F, R, T, 2, REFINED, PLANAR>(w, row_bytes, &xs, b, &mut acc),
            3 => leg_step::<F, R, T, 3, REFINED, PLANAR>(w, row_bytes, &xs, b, &mut acc),
            _ => {}
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// The codes of `N` (≤ 4) consecutive 32-element activation blocks at `c`, two blocks per
/// register (zero beyond `N`; nothing beyond them is read).
///
/// # Safety
/// `N * 32` codes are readable at `c`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn block_codes_512<const N: usize>(c: *const i8) -> (__m512i, __m512i) {
    let low_half: __mmask64 = u64::from(u32::MAX);
    // SAFETY: the masks cover the first N * 32 bytes at `c` only.
    unsafe {
        let x01 = if N >= 2 {
            _mm512_loadu_si512(c.cast())
        } else {
            _mm512_maskz_loadu_epi8(low_half, c)
        };
        let x23 = match N {
            4 => _mm512_loadu_si512(c.add(2 * QK).cast()),
            3 => _mm512_maskz_loadu_epi8(low_half, c.add(2 * QK)),
            _ => _mm512_setzero_si512(),
        };
        (x01, x23)
    }
}

/// `Σ w·x` per lane of four byte products (`vpdpbusd`); with `REFINED`, `x` and `y` are the
/// high and low parts of refined activation codes and the result is `(Σ w·x) · 256 + Σ w·y`,
/// the sum over the 16-bit codes. Exact for unsigned `w` < 256 and parts within ±127: a lane's
/// high sum is below 2^17, so the shifted total stays below 2^26.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(super) fn dpbusd_refined<const REFINED: bool>(w: __m512i, x: __m512i, y: __m512i) -> __m512i {
    let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
    if REFINED {
        _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(i), w, y)
    } else {
        i
    }
}

/// Adds blocks `b..b + N` (N ≤ 4) of every row and activation row of the tile to `acc`.
///
/// `REFINED`: the activation rows are refined, their codes `256·high + low`: the integer sum
/// of the high parts is shifted left by 8 and the low parts multiply-added onto it, so the
/// block's scales apply once. No overflow: a lane sums 4 products of a code ≤ 255 and one of
/// magnitude ≤ 127 (129 540) and the shifted sum plus the low part stays below 2^26.
///
/// # Safety
/// Blocks `b..b + N` exist in the `R` weight rows at `w` and in every activation row (and
/// its low parts if `REFINED`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn leg_step<
    const F: u8,
    const R: usize,
    const T: usize,
    const N: usize,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: *const u8,
    row_bytes: usize,
    xs: &[&QuantizedRow; T],
    b: usize,
    acc: &mut [[__m512; T]; R],
) {
    let bytes = leg::bytes(F);
    let ahead = super::prefetch_distance(row_bytes);
    let lanes: __mmask8 = (1u8 << N) - 1;
    let mut dx = [_mm_setzero_ps(); T];
    let mut ds = [_mm_setzero_ps(); T];
    let mut x01 = [_mm512_setzero_si512(); T];
    let mut x23 = [_mm512_setzero_si512(); T];
    let mut y01 = [_mm512_setzero_si512(); T];
    let mut y23 = [_mm512_setzero_si512(); T];
    for t in 0..T {
        let x = xs[t];
        if REFINED {
            // SAFETY: as for the high parts below; a refined row's low parts are as long.
            (y01[t], y23[t]) = unsafe { block_codes_512::<N>(x.low.as_ptr().add(b * QK)) };
        }
        // SAFETY: blocks b..b + N exist, so N scales and sums from index b and N * 32 codes
        // from b * 32 are in bounds; masked-off lanes are not read.
        unsafe {
            dx[t] = _mm_maskz_loadu_ps(lanes, x.scales.as_ptr().add(b));
            ds[t] = _mm_maskz_loadu_ps(lanes, x.sums.as_ptr().add(b));
            (x01[t], x23[t]) = block_codes_512::<N>(x.codes.as_ptr().add(b * QK));
        }
    }
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let p = w.wrapping_add(r * row_bytes + b * bytes);
        // Every line of these blocks one tile ahead, and further on into L2
        // (harmless at any address).
        for line in (0..4 * bytes).step_by(64) {
            super::prefetch_weights(p.wrapping_add(line), ahead);
        }
        // SAFETY: row r's blocks b..b + N are in bounds (the caller's guarantee).
        let (d4, m4, u01, u23) = unsafe {
            if PLANAR {
                leg_unpack_planar::<F, N>(w.add(r * row_bytes), xs[0].len / QK, b)
            } else {
                leg_unpack::<F, N>(p)
            }
        };
        for t in 0..T {
            let s = _mm512_castps128_ps512(_mm_mul_ps(d4, dx[t]));
            let i01 = dpbusd_refined::<REFINED>(u01, x01[t], y01[t]);
            let mut a = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(i01),
                _mm512_permutexvar_ps(PAIR_IDX[0], s),
                acc_r[t],
            );
            if N > 2 {
                let i23 = dpbusd_refined::<REFINED>(u23, x23[t], y23[t]);
                a = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(i23),
                    _mm512_permutexvar_ps(PAIR_IDX[1], s),
                    a,
                );
            }
            let c = _mm_mul_ps(m4, ds[t]);
            acc_r[t] = _mm512_add_ps(a, _mm512_zextps128_ps512(c));
        }
    }
}

/// Blocks `0..N` (N ≤ 4) at `p`: their scales `d` and offsets `m` (`w = d * u + m`, zero
/// beyond `N`), and their unsigned codes in element order, two blocks per register (blocks
/// beyond `N` give codes that meet zero activations).
///
/// The blocks are read as one window of at most 128 bytes (two loads, masked to the `N`
/// blocks), out of which word permutes gather the scales and the packed codes: far fewer
/// instructions than collecting the fields one block at a time.
///
/// # Safety
/// `N` blocks of format `F` are readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn leg_unpack<const F: u8, const N: usize>(
    p: *const u8,
) -> (__m128, __m128, __m512i, __m512i) {
    let bytes = leg::bytes(F);
    let len = N * bytes;
    if F == leg::Q8_0 {
        let mut dh = 0u64;
        let mut c = [_mm256_setzero_si256(); 4];
        for (k, c) in c.iter_mut().enumerate().take(N) {
            // SAFETY: block k < N is readable: an f16 scale and 32 code bytes.
            unsafe {
                dh |= u64::from(rd_u16(p.add(k * bytes))) << (16 * k);
                *c = _mm256_loadu_si256(p.add(k * bytes + 2).cast());
            }
        }
        let d = _mm_cvtph_ps(_mm_cvtsi64_si128(dh as i64));
        let m = _mm_mul_ps(d, _mm_set1_ps(leg::offset(F)));
        // Flipping the sign bit adds 128, making the codes unsigned for vpdpbusd; the offset
        // of -128 * d takes it back out.
        let flip = _mm512_set1_epi8(i8::MIN);
        let u01 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(c[0]), c[1]);
        let u23 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(c[2]), c[3]);
        return (
            d,
            m,
            _mm512_xor_si512(u01, flip),
            _mm512_xor_si512(u23, flip),
        );
    }
    // SAFETY: the masks cover the first `len` bytes at `p` only, which are readable.
    let (lo, hi) = unsafe {
        let lo = if len >= 64 {
            _mm512_loadu_si512(p.cast())
        } else {
            _mm512_maskz_loadu_epi8((1u64 << len) - 1, p.cast())
        };
        let hi = if len > 64 {
            let rest = len - 64;
            let m = if rest >= 64 {
                u64::MAX
            } else {
                (1u64 << rest) - 1
            };
            _mm512_maskz_loadu_epi8(m, p.add(64).cast())
        } else {
            _mm512_setzero_si512()
        };
        (lo, hi)
    };
    let halves = _mm512_permutex2var_epi16(lo, LEG_SCALE_IDX[F as usize], hi);
    let dm = _mm256_cvtph_ps(_mm512_castsi512_si128(halves));
    let d = _mm256_castps256_ps128(dm);
    let m = if leg::has_min(F) {
        _mm256_extractf128_ps::<1>(dm)
    } else {
        _mm_mul_ps(d, _mm_set1_ps(leg::offset(F)))
    };
    let mut u = [_mm512_setzero_si512(); 2];
    for (pair, u) in u.iter_mut().enumerate().take(N.div_ceil(2)) {
        let z = _mm512_permutex2var_epi16(lo, LEG_CODE_IDX[F as usize][pair], hi);
        // Low nibbles are elements 0..16 of a block, high nibbles 16..32: shift the second
        // copy of each block.
        let z = _mm512_mask_srli_epi16(z, 0xff00_ff00, z, 4);
        let mut v = _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
        if leg::is_q5(F) {
            let mut qh = 0u64;
            for k in 2 * pair..(2 * pair + 2).min(N) {
                // SAFETY: block k < N holds its 32 fifth bits at offset leg::qh(F).
                let bits = unsafe { rd_u32(p.add(k * bytes + leg::qh(F))) };
                qh |= u64::from(bits) << (32 * (k % 2));
            }
            // Bit i of the fifth bits belongs to element i: it is a byte mask already.
            v = _mm512_mask_add_epi8(v, qh, v, _mm512_set1_epi8(16));
        }
        if F == leg::IQ4_NL {
            v = _mm512_shuffle_epi8(IQ4_UNSIGNED, v);
        }
        *u = v;
    }
    (d, m, u[0], u[1])
}

/// The 4-bit codes of blocks `b..b + N` (N ≤ 4) of a planar code plane
/// ([`crate::planar`]), read at `codes` (where block `b`'s run starts: `16 · b` bytes into the
/// plane), as unsigned values in element order, two blocks per register (zero beyond `N`).
///
/// # Safety
/// `b` is a multiple of 4 and `N == 4` unless blocks `b..b + N` are the last of the row; their
/// `16 · N` bytes of runs are readable at `codes`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
pub(super) unsafe fn planar_codes4<const N: usize>(codes: *const u8) -> (__m512i, __m512i) {
    let low = _mm512_set1_epi8(0x0f);
    // A block stored whole (16 GGUF code bytes at `p`: elements j and j + 16 in byte j) as
    // 32 codes in element order in the low half of a register.
    let single = |p: *const u8| {
        // SAFETY: the caller's `p` has 16 readable bytes (below).
        let q = unsafe { _mm_loadu_si128(p.cast()) };
        let lo = _mm_and_si128(q, _mm_set1_epi8(0x0f));
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0f));
        _mm512_zextsi256_si512(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
    };
    // SAFETY: the runs of the N blocks (64 bytes for a group, a 32-byte pair run and a
    // 16-byte single block after the last group) are readable (the caller's guarantee).
    unsafe {
        if N == 4 {
            let v = _mm512_loadu_si512(codes.cast());
            (
                _mm512_and_si512(v, low),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low),
            )
        } else if N >= 2 {
            // The pair run of the two blocks after the last group (low, then high nibbles),
            // then for N = 3 the last block whole.
            let v = _mm512_castsi256_si512(_mm256_loadu_si256(codes.cast()));
            let lo = _mm512_and_si512(v, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            let u01 = _mm512_inserti64x4::<1>(lo, _mm512_castsi512_si256(hi));
            let u23 = if N == 3 {
                single(codes.add(32))
            } else {
                _mm512_setzero_si512()
            };
            (u01, u23)
        } else {
            (single(codes), _mm512_setzero_si512())
        }
    }
}

/// Blocks `b..b + N` (N ≤ 4) of the planar row at `row` ([`crate::planar`]), `nb` blocks
/// long, as [`leg_unpack`] gives them for a GGUF row: scales, offsets and unsigned codes (zero
/// beyond `N`).
///
/// # Safety
/// `row` starts a planar row of `nb` blocks of format `F` (not `IQ4_NL`); `b` is a multiple of
/// 4 and `b + N <= nb`, with `N == 4` unless `b + N == nb` (the blocks after the last whole
/// group).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn leg_unpack_planar<const F: u8, const N: usize>(
    row: *const u8,
    nb: usize,
    b: usize,
) -> (__m128, __m128, __m512i, __m512i) {
    let code_bytes = if F == leg::Q8_0 { QK } else { QK / 2 };
    let qh_bytes = if leg::is_q5(F) { 4 * nb } else { 0 };
    // SAFETY: blocks b..b + N of the row: their codes (N · code_bytes bytes from
    // b · code_bytes, by the layout's runs), fifth bits (4 bytes each) and scales and minimums
    // (2 bytes each, masked to N) lie within the row; nothing beyond them is read.
    unsafe {
        let codes = row.add(b * code_bytes);
        let (mut u01, mut u23) = if F == leg::Q8_0 {
            block_codes_512::<N>(codes.cast())
        } else {
            planar_codes4::<N>(codes)
        };
        let planes = row.add(nb * code_bytes);
        if leg::is_q5(F) {
            let qh = planes.add(4 * b);
            let bits = |k: usize| u64::from(qh.add(4 * k).cast::<u32>().read_unaligned());
            let sixteen = _mm512_set1_epi8(16);
            let h01 = if N >= 2 {
                bits(0) | bits(1) << 32
            } else {
                bits(0)
            };
            u01 = _mm512_mask_add_epi8(u01, h01, u01, sixteen);
            if N > 2 {
                let h23 = if N == 4 {
                    bits(2) | bits(3) << 32
                } else {
                    bits(2)
                };
                u23 = _mm512_mask_add_epi8(u23, h23, u23, sixteen);
            }
        }
        let lanes: __mmask8 = (1u8 << N) - 1;
        let scales = planes.add(qh_bytes);
        let d = _mm_cvtph_ps(_mm_maskz_loadu_epi16(lanes, scales.add(2 * b).cast()));
        let m = if leg::has_min(F) {
            _mm_cvtph_ps(_mm_maskz_loadu_epi16(
                lanes,
                scales.add(2 * nb + 2 * b).cast(),
            ))
        } else {
            _mm_mul_ps(d, _mm_set1_ps(leg::offset(F)))
        };
        (d, m, u01, u23)
    }
}

/// The kernels for planar rows ([`crate::planar`]): the 32-element kernels above with the
/// planar unpacking, tiled the same way.
pub(crate) mod planar {
    use super::*;

    tiled_dot_block!(tile, row_at_a_time, rows_one_at_a_time::<true>);

    /// The values of the planar row at `row` (`nb` blocks of `weights`) into `out`, bit for
    /// bit what the scalar dequantization gives: `(u − bias) · d` in one rounding, or
    /// `u · d + m` in two (no fused multiply-add), as GGUF's definitions compute them.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, FMA, F16C; `row` starts a planar row of `nb` blocks of
    /// `weights` (a format [`crate::planar::supported`] names); `out` has `32 · nb` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn dequantize_row(
        weights: GgmlType,
        row: *const u8,
        nb: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe {
            match weights {
                GgmlType::Q4_0 => dequantize::<{ leg::Q4_0 }>(row, nb, out),
                GgmlType::Q4_1 => dequantize::<{ leg::Q4_1 }>(row, nb, out),
                GgmlType::Q5_0 => dequantize::<{ leg::Q5_0 }>(row, nb, out),
                GgmlType::Q5_1 => dequantize::<{ leg::Q5_1 }>(row, nb, out),
                GgmlType::Q8_0 => dequantize::<{ leg::Q8_0 }>(row, nb, out),
                _ => unreachable!("no planar layout for {weights}"),
            }
        }
    }

    /// # Safety
    /// As [`dequantize_row`], for format `F`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn dequantize<const F: u8>(row: *const u8, nb: usize, out: &mut [f32]) {
        debug_assert!(out.len() >= nb * QK);
        let mut b = 0;
        while b < nb {
            // SAFETY: blocks b..b + n exist (n = 4, or the rest after the last group).
            let (d, m, u01, u23) = unsafe {
                match nb - b {
                    1 => leg_unpack_planar::<F, 1>(row, nb, b),
                    2 => leg_unpack_planar::<F, 2>(row, nb, b),
                    3 => leg_unpack_planar::<F, 3>(row, nb, b),
                    _ => leg_unpack_planar::<F, 4>(row, nb, b),
                }
            };
            let n = (nb - b).min(4);
            let (mut ds, mut ms) = ([0.0f32; 4], [0.0f32; 4]);
            // SAFETY: four floats each.
            unsafe {
                _mm_storeu_ps(ds.as_mut_ptr(), d);
                _mm_storeu_ps(ms.as_mut_ptr(), m);
            }
            let codes = [u01, u23];
            let bias = _mm512_set1_ps(-leg::offset(F));
            for k in 0..n {
                let reg = codes[k / 2];
                let half = if k % 2 == 0 {
                    _mm512_castsi512_si256(reg)
                } else {
                    _mm512_extracti64x4_epi64::<1>(reg)
                };
                for q in 0..2 {
                    let bytes = if q == 0 {
                        _mm256_castsi256_si128(half)
                    } else {
                        _mm256_extracti128_si256::<1>(half)
                    };
                    let u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
                    let v = if leg::has_min(F) {
                        _mm512_add_ps(
                            _mm512_mul_ps(u, _mm512_set1_ps(ds[k])),
                            _mm512_set1_ps(ms[k]),
                        )
                    } else {
                        _mm512_mul_ps(_mm512_sub_ps(u, bias), _mm512_set1_ps(ds[k]))
                    };
                    let at = (b + k) * QK + 16 * q;
                    // SAFETY: element `at + 16` is within `out` (32 · nb elements).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), v) };
                }
            }
            b += n;
        }
    }

    /// # Safety
    /// As [`super::tile`], for planar rows of a format [`crate::planar::supported`] names.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        weights: GgmlType,
        w: *const u8,
        row_bytes: usize,
        xs: [&QuantizedRow; T],
    ) -> [[f32; T]; R] {
        // SAFETY: the caller's guarantees are exactly what each kernel needs.
        unsafe {
            match weights {
                GgmlType::Q4_0 => legacy_any::<{ leg::Q4_0 }, R, T, true>(w, row_bytes, xs),
                GgmlType::Q4_1 => legacy_any::<{ leg::Q4_1 }, R, T, true>(w, row_bytes, xs),
                GgmlType::Q5_0 => legacy_any::<{ leg::Q5_0 }, R, T, true>(w, row_bytes, xs),
                GgmlType::Q5_1 => legacy_any::<{ leg::Q5_1 }, R, T, true>(w, row_bytes, xs),
                GgmlType::Q8_0 => legacy_any::<{ leg::Q8_0 }, R, T, true>(w, row_bytes, xs),
                _ => unreachable!("no planar layout for {weights}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants

/// One super-block unpacked: codes in element order, scales spread over the pair sums,
/// and the correction `f * sum_s c16[s] * (sum of activations of 16-group s)`.
struct KBlock {
    u: [__m512i; 4],
    sv: [__m512i; 4],
    c16: __m256i,
    d: f32,
    f: f32,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn kquant<const F: u8, const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nsb = xs[0].len / QK_K;
    let bytes = kq::bytes(F);
    let ahead = super::prefetch_distance(row_bytes);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
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
            // SAFETY: super-block sb of row r is in bounds (the caller's guarantee).
            let k = unsafe { kunpack::<F>(p) };
            for t in 0..T {
                let mut i = _mm512_setzero_si512();
                for g in 0..4 {
                    // SAFETY: xp[t] points at 256 codes.
                    let x = unsafe { _mm512_loadu_si512(xp[t].add(64 * g).cast()) };
                    i = _mm512_dpwssd_epi32(i, _mm512_maddubs_epi16(k.u[g], x), k.sv[g]);
                }
                let c = _mm512_zextsi256_si512(_mm256_madd_epi16(k.c16, bs[t]));
                let a =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(k.d * dx[t]), acc_r[t]);
                acc_r[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(k.f * dx[t]), a);
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// Two f16 values at `p` as f32.
///
/// # Safety
/// Four bytes are readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees four readable bytes.
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe { rd_u32(p) } as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// # Safety
/// One super-block of format `F` is readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn kunpack<const F: u8>(p: *const u8) -> KBlock {
    let zero = _mm512_setzero_si512();
    let mut u = [zero; 4];
    let mut sv = [zero; 4];
    // SAFETY: every offset below lies within one super-block of format F.
    unsafe {
        match F {
            kq::Q4_K | kq::Q5_K => {
                let five = F == kq::Q5_K;
                let (d, dmin) = f16_pair(p);
                let (sc, mn) = k4_scales_mins(
                    rd_u32(p.add(Q4_K_SCALES)),
                    rd_u32(p.add(Q4_K_SCALES + 4)),
                    rd_u32(p.add(Q4_K_SCALES + 8)),
                );
                let scw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let qs = if five { Q5_K_QS } else { Q4_K_QS };
                // Fifth bits: the low half sees bit 2g of qh, the high half (shifted by one)
                // bit 2g + 1; the shift's spill into bit 7 is never tested.
                let hb = if five {
                    let qh = _mm256_loadu_si256(p.add(Q5_K_QH).cast());
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<1>(qh))
                } else {
                    zero
                };
                for g in 0..4 {
                    let q = _mm256_loadu_si256(p.add(qs + 32 * g).cast());
                    let z = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(q),
                        _mm256_srli_epi16::<4>(q),
                    );
                    let mut v = _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
                    if five {
                        let k = _mm512_test_epi8_mask(hb, _mm512_set1_epi8(1 << (2 * g)));
                        v = _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(16));
                    }
                    u[g] = v;
                    sv[g] = _mm512_permutexvar_epi16(K32_IDX[g], scw);
                }
                let c16 =
                    _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi64_si128(mn as i64), DUP_PAIRS));
                KBlock {
                    u,
                    sv,
                    c16,
                    d,
                    f: -dmin,
                }
            }
            kq::Q6_K => {
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(rd_u16(
                    p.add(Q6_K_D),
                )))));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(Q6_K_SCALES).cast()));
                let scw = _mm512_castsi256_si512(sc16);
                for n in 0..2 {
                    let ql = _mm512_loadu_si512(p.add(64 * n).cast());
                    let qh = _mm256_loadu_si256(p.add(Q6_K_QH + 32 * n).cast());
                    // Low half: bits 0-1 of qh (quarter 0) / high half: bits 2-3 (quarter 1);
                    // bits 4-5 serve quarters 2 and 3.
                    let hb = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(qh),
                        _mm256_srli_epi16::<2>(qh),
                    );
                    let lo = _mm512_and_si512(ql, _mm512_set1_epi8(0x0f));
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(ql), _mm512_set1_epi8(0x0f));
                    let hb_a = _mm512_and_si512(_mm512_slli_epi16::<4>(hb), _mm512_set1_epi8(0x30));
                    let hb_b = _mm512_and_si512(hb, _mm512_set1_epi8(0x30));
                    u[2 * n] = _mm512_or_si512(lo, hb_a);
                    u[2 * n + 1] = _mm512_or_si512(hi, hb_b);
                }
                for (q, s) in sv.iter_mut().enumerate() {
                    *s = _mm512_permutexvar_epi16(K16_IDX[q], scw);
                }
                KBlock {
                    u,
                    sv,
                    c16: sc16,
                    d,
                    f: -32.0 * d,
                }
            }
            kq::Q3_K => {
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(rd_u16(
                    p.add(Q3_K_D),
                )))));
                let (lo, hi) =
                    q3k_scales(rd_u64(p.add(Q3_K_SCALES)), rd_u32(p.add(Q3_K_SCALES + 8)));
                let scb = _mm_sub_epi8(_mm_set_epi64x(hi as i64, lo as i64), _mm_set1_epi8(32));
                let sc16 = _mm256_cvtepi8_epi16(scb);
                let scw = _mm512_castsi256_si512(sc16);
                let hm = _mm256_loadu_si256(p.cast());
                let hm2 =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(hm), _mm256_srli_epi16::<1>(hm));
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(Q3_K_QS + 32 * n).cast());
                    let q2 = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(q),
                        _mm256_srli_epi16::<2>(q),
                    );
                    for jp in 0..2 {
                        let src = if jp == 0 {
                            q2
                        } else {
                            _mm512_srli_epi16::<4>(q2)
                        };
                        let low = _mm512_and_si512(src, _mm512_set1_epi8(3));
                        let k = _mm512_test_epi8_mask(hm2, _mm512_set1_epi8(1 << (4 * n + 2 * jp)));
                        u[2 * n + jp] = _mm512_mask_add_epi8(low, k, low, _mm512_set1_epi8(4));
                    }
                }
                for (q, s) in sv.iter_mut().enumerate() {
                    *s = _mm512_permutexvar_epi16(K16_IDX[q], scw);
                }
                KBlock {
                    u,
                    sv,
                    c16: sc16,
                    d,
                    f: -4.0 * d,
                }
            }
            _ => {
                // Q2_K
                let (d, dmin) = f16_pair(p.add(Q2_K_D));
                let scb = _mm_loadu_si128(p.cast());
                let m4 = _mm_set1_epi8(0x0f);
                let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(scb, m4));
                let c16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(scb), m4));
                let scw = _mm512_castsi256_si512(sc16);
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(Q2_K_QS + 32 * n).cast());
                    let q2 = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(q),
                        _mm256_srli_epi16::<2>(q),
                    );
                    u[2 * n] = _mm512_and_si512(q2, _mm512_set1_epi8(3));
                    u[2 * n + 1] =
                        _mm512_and_si512(_mm512_srli_epi16::<4>(q2), _mm512_set1_epi8(3));
                }
                for (q, s) in sv.iter_mut().enumerate() {
                    *s = _mm512_permutexvar_epi16(K16_IDX[q], scw);
                }
                KBlock {
                    u,
                    sv,
                    c16,
                    d,
                    f: -dmin,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IQ4_XS
//
// A 64-byte load of packed codes holds four sub-blocks, one per 128-bit lane: their low
// nibbles are elements 0..16 of each, the high nibbles 16..32. The activations are regrouped
// once per super-block to match (lane `ib` = elements `32 ib..32 ib + 16`, or `+ 16..+ 32`), so
// each weight row needs only a mask, a shift and one table lookup per 128 elements.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn iq4_xs<const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nsb = xs[0].len / QK_K;
    let ahead = super::prefetch_distance(row_bytes);
    let zero = _mm512_setzero_si512();
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for sb in 0..nsb {
        let mut dx = [0.0f32; T];
        // Per activation row: [low halves of sub-blocks 0..4, their high halves, the same
        // for sub-blocks 4..8].
        let mut xg = [[zero; 4]; T];
        for t in 0..T {
            dx[t] = xs[t].scales[sb];
            // SAFETY: super-block sb exists: its 256 codes are in bounds.
            let v = unsafe {
                let c = xs[t].codes.as_ptr().add(sb * QK_K);
                [0, 1, 2, 3].map(|g| _mm512_loadu_si512(c.add(64 * g).cast()))
            };
            for h in 0..2 {
                xg[t][2 * h] = _mm512_shuffle_i64x2::<0b10_00_10_00>(v[2 * h], v[2 * h + 1]);
                xg[t][2 * h + 1] = _mm512_shuffle_i64x2::<0b11_01_11_01>(v[2 * h], v[2 * h + 1]);
            }
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let p = w.wrapping_add(r * row_bytes + sb * IQ4_XS_BYTES);
            // Every line of the super-block one tile ahead, and further on into L2
            // (harmless at any address).
            for line in (0..IQ4_XS_BYTES).step_by(64) {
                super::prefetch_weights(p.wrapping_add(line), ahead);
            }
            // SAFETY: super-block sb of row r is in bounds (the caller's guarantee): the
            // offsets below lie within its 136 bytes.
            let (d, scales, q) = unsafe {
                (
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(rd_u16(p))))),
                    iq4xs_scales(
                        rd_u16(p.add(IQ4_XS_SCALES_H)),
                        rd_u32(p.add(IQ4_XS_SCALES_L)),
                    ),
                    [0, 1].map(|h| _mm512_loadu_si512(p.add(IQ4_XS_QS + 64 * h).cast())),
                )
            };
            let sc = _mm_sub_epi8(_mm_cvtsi64_si128(scales as i64), _mm_set1_epi8(32));
            let scw = _mm512_castsi128_si512(_mm_cvtepi8_epi16(sc));
            let mut aw = [zero; 4];
            let mut neg = [0 as __mmask64; 4];
            for h in 0..2 {
                let nibbles = [
                    _mm512_and_si512(q[h], m4),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q[h]), m4),
                ];
                for (k, nib) in nibbles.into_iter().enumerate() {
                    let levels = _mm512_shuffle_epi8(IQ4_SIGNED, nib);
                    aw[2 * h + k] = _mm512_abs_epi8(levels);
                    neg[2 * h + k] = _mm512_movepi8_mask(levels);
                }
            }
            // Sub-block scales under the pair sums: one per lane.
            let sv = [
                _mm512_permutexvar_epi16(K16_IDX[0], scw),
                _mm512_permutexvar_epi16(K16_IDX[1], scw),
            ];
            for t in 0..T {
                let mut i = zero;
                for j in 0..4 {
                    let x = xg[t][j];
                    let sx = _mm512_mask_sub_epi8(x, neg[j], zero, x);
                    i = _mm512_dpwssd_epi32(i, _mm512_maddubs_epi16(aw[j], sx), sv[j / 2]);
                }
                acc_r[t] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(d * dx[t]), acc_r[t]);
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Float formats

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    while i < n {
        let mask: __mmask16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        let mut xv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: elements i.. up to the mask are within the row of n values.
            xv[t] = unsafe { _mm512_maskz_loadu_ps(mask, xs[t].values.as_ptr().add(i)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // Float rows are long: fetch the same place in the next tile's rows, which is
            // both far enough ahead and not already being read (harmless at any address).
            super::prefetch_weights(w.wrapping_add(r * row_bytes + size * i), ahead);
            // SAFETY: row r holds n elements of `weights`; masked lanes are not read.
            let wv = unsafe {
                let p = w.add(r * row_bytes);
                match weights {
                    GgmlType::F32 => _mm512_maskz_loadu_ps(mask, p.add(4 * i).cast()),
                    GgmlType::F16 => {
                        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.add(2 * i).cast()))
                    }
                    _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_maskz_loadu_epi16(mask, p.add(2 * i).cast()),
                    ))),
                }
            };
            for t in 0..T {
                acc_r[t] = _mm512_fmadd_ps(wv, xv[t], acc_r[t]);
            }
        }
        i += 16;
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}
