//! AVX-512 VNNI and AVX2 kernels for the kiln formats (`I8_CH`, `I4_B64`, `LUT2` to `LUT8`,
//! `LUT4_B32[_G{n}]`).
//!
//! Tiles of 4 weight rows by 2 activation rows, rows outermost, as for the ggml formats: a
//! tile's weights are unpacked once and stay in L1 while the activation rows pass.
//!
//! - `I8_CH`, AVX-512: `vpdpbusd` wants unsigned × signed bytes, so the weight codes are
//!   offset by 128 (`c ^ 0x80`) and `128 · Σ_b d_b Σ x` (the activation block sums) is taken
//!   off at the end. One activation row (decode) reads the rows one at a time
//!   ([`i8ch_rows_512`]). AVX2: `vpsignb` moves the weight's sign onto the activation, and
//!   `vpmaddubsw` multiplies `|c|` (≤ 128) by it without saturating (2 · 128 · 127 < 2^15).
//! - `I4_B64`: the nibbles of a 64-element block are its unsigned codes `q` in order (low
//!   nibbles elements 0..32, high nibbles 32..64), multiplied by the two activation blocks; the
//!   `−8` offset comes in through the activation block sums, once per block.
//! - `LUT4_B32`: the nibbles index the row's 16-byte table (the tensor's; with groups, each
//!   row of a tile loads its group's, as a tile may straddle two groups; AVX-512: `vpermb`, which needs
//!   VBMI and ignores the index bits above the nibble, so no mask; AVX2, and AVX-512 without
//!   VBMI: `vpshufb`), giving unsigned 7-bit weights that `vpdpbusd` (AVX2: `vpmaddubsw`,
//!   whose pair sums stay below 2 · 127 · 127 < 2^15) multiplies with the int8 activations.
//!   Four blocks per step as for Q4_0 (whose block layout `LUT4_B32`'s shares): their scale
//!   and offset codes times the activation block scales and sums in one multiply, the offsets
//!   collected in a vector; the row's two units apply once at the end.
//! - Lookup tables (`LUT2` to `LUT8`): 16-bit integer weights (each table made integer once per
//!   call) against 14-bit activation codes, by `vpdpwssd`: AVX-512 with VBMI looks the words up
//!   in registers (`vpermw` over a 4- or 16-entry table repeated through one register,
//!   `vpermi2w` over 64 entries, byte planes and `vpermi2b` over 256); AVX2, and AVX-512
//!   without VBMI, look 2- and 4-bit tables up from byte planes by `vpshufb` and multiply with
//!   `vpmaddwd`, and gather 6- and 8-bit ones as f32 against the dequantized activations (see
//!   the section below).

// Tiles index several parallel arrays (accumulators, tables, rows) by row and token; index
// loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;
use std::ops::Range;

use kiln_format::kiln_types::{
    self, KilnType, CHUNK, I4_BLOCK, I4_BLOCK_BYTES, LUT4_B32_BLOCK_BYTES, LUT4_B32_ROW_HEADER,
};

use super::avx512::{block_codes_512, dpbusd_refined, PAIR_IDX};
use super::dequant_out::{put1, put16, put32};
use super::prefetch_weights;
use crate::activation::QuantizedRow;
use crate::kiln_formats::KilnMatrix;
use crate::Isa;

/// Whether `isa`'s kernel for `ty` multiplies refined activation rows in one pass: the integer
/// formats, on AVX-512 and AVX2 alike.
pub(crate) fn fuses_refined(isa: Isa, ty: KilnType) -> bool {
    match ty {
        KilnType::I8Ch | KilnType::I4B64 | KilnType::Lut4B32 { .. } => {
            matches!(isa, Isa::Avx512Vnni | Isa::Avx2)
        }
        KilnType::Lut { .. } => false,
    }
}

/// `Σ u·x` per lane of four byte products (`vpmaddubsw` pairs, then `vpmaddwd`); with
/// `REFINED`, `x` and `y` are the high and low parts of refined activation codes and the
/// result is `(Σ u·x) · 256 + Σ u·y`. Exact for unsigned `u` ≤ 128 and parts within ±127: the
/// byte pairs stay within i16 and a lane's high sum below 2^17.
#[target_feature(enable = "avx2")]
#[inline]
fn sums_256<const REFINED: bool>(u: __m256i, x: __m256i, y: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let i = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
    if REFINED {
        let low = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), ones);
        _mm256_add_epi32(_mm256_slli_epi32::<8>(i), low)
    } else {
        i
    }
}

/// Whether `isa` has a kernel for `ty` here (the others run the reference).
pub(crate) fn has_kernel(isa: Isa, ty: KilnType) -> bool {
    let simd = matches!(isa, Isa::Avx2 | Isa::Avx512Vnni);
    simd && matches!(
        ty,
        KilnType::I8Ch
            | KilnType::I4B64
            | KilnType::Lut4B32 { .. }
            | KilnType::Lut {
                bits: 2 | 4 | 6 | 8,
                ..
            }
    )
}

const TILE_ROWS: usize = super::TILE_ROWS;

/// Runs `kernel::<R, T>(args…, xs)` for every tile of `rows` by the activation rows `xq`
/// ([`for_tiles`]: `R` = 4 or 1 rows, `T` = 2 or 1 activation rows) and stores each into `out`,
/// `stride` apart per activation row, row indices relative to `base`. `r` names the tile's
/// first row for use in `args`.
///
/// The kernels are called in an `unsafe` block: the macro's user guarantees that every tile's
/// rows and activation rows exist, `out` holds them, and the CPU has the kernel's features.
macro_rules! run_tiles {
    ($rows:expr, $xq:expr, $out:expr, $stride:expr, $base:expr,
     |$r:ident| $kernel:ident $(<$($g:tt),*>)? ($($arg:expr),*)) => {{
        let (xq, out, stride, base): (&[QuantizedRow], &mut [f32], usize, usize) =
            ($xq, $out, $stride, $base);
        for_tiles($rows, xq.len(), |$r, n, t, m| {
            // SAFETY: the macro's user's guarantee (see above).
            unsafe {
                tile!(n, m, xq, t, out, stride, $r - base, $kernel $(<$($g),*>)? ($($arg),*))
            }
        });
    }};
}

/// One tile of `$n` rows (`TILE_ROWS` or 1) by `$m` activation rows (2 or 1, from `$xq[$t]`):
/// `$kernel::<G.., R, T>(args.., rows)` (`G..` the kernel's leading generic arguments, if any),
/// stored at row `$row` and activation row `$t` of `$out`. Unsafe as the kernel is.
macro_rules! tile {
    ($n:expr, $m:expr, $xq:expr, $t:expr, $out:expr, $stride:expr, $row:expr,
     $kernel:ident $(<$($g:tt),*>)? ($($arg:expr),*)) => {{
        let (xq, t): (&[QuantizedRow], usize) = ($xq, $t);
        match ($n, $m) {
            (TILE_ROWS, 2) => store(
                &$kernel::<$($($g,)*)? TILE_ROWS, 2>($($arg,)* [&xq[t], &xq[t + 1]]),
                $out, $stride, $row, t,
            ),
            (TILE_ROWS, _) => store(
                &$kernel::<$($($g,)*)? TILE_ROWS, 1>($($arg,)* [&xq[t]]),
                $out, $stride, $row, t,
            ),
            (_, 2) => store(
                &$kernel::<$($($g,)*)? 1, 2>($($arg,)* [&xq[t], &xq[t + 1]]),
                $out, $stride, $row, t,
            ),
            _ => store(&$kernel::<$($($g,)*)? 1, 1>($($arg,)* [&xq[t]]), $out, $stride, $row, t),
        }
    }};
}

/// # Safety
/// The CPU has `isa` (AVX2 or AVX-512 VNNI, with FMA and F16C); `has_kernel(isa, w.ty)`;
/// every `xq[t]` is in the activation format of `w.ty` and `w.cols` long; `rows` lies within
/// `w`; `out` holds `(xq.len() - 1) * out_stride + rows.len()` values.
pub(crate) unsafe fn dot_block(
    isa: Isa,
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    if let KilnType::Lut { .. } = w.ty {
        // SAFETY: the caller's guarantees.
        return unsafe { lut_i16_dot_block(isa, w, rows, xq, out, out_stride) };
    }
    if isa == Isa::Avx512Vnni && w.ty == KilnType::I8Ch && xq.len() == 1 {
        // SAFETY: the caller's guarantees, for the one activation row.
        return unsafe {
            if xq[0].is_refined() {
                i8ch_rows_512::<true>(w, rows, &xq[0], out)
            } else {
                i8ch_rows_512::<false>(w, rows, &xq[0], out)
            }
        };
    }
    let base = rows.start;
    run_tiles!(rows, xq, out, out_stride, base, |r| tile(isa, w, r));
}

fn store<const R: usize, const T: usize>(
    v: &[[f32; T]; R],
    out: &mut [f32],
    stride: usize,
    r0: usize,
    t0: usize,
) {
    for (i, vals) in v.iter().enumerate() {
        for (j, &x) in vals.iter().enumerate() {
            out[(t0 + j) * stride + r0 + i] = x;
        }
    }
}

/// # Safety
/// As [`dot_block`], for rows `r0..r0 + R`.
#[inline(always)]
unsafe fn tile<const R: usize, const T: usize>(
    isa: Isa,
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    // SAFETY: the caller's guarantees are what each kernel needs.
    unsafe {
        match (isa, w.ty) {
            (Isa::Avx512Vnni, KilnType::I8Ch) if xs[0].is_refined() => {
                i8ch_512::<R, T, true>(w, r0, xs)
            }
            (Isa::Avx512Vnni, KilnType::I8Ch) => i8ch_512::<R, T, false>(w, r0, xs),
            (Isa::Avx512Vnni, KilnType::I4B64) => match (xs[0].is_refined(), w.planar) {
                (false, false) => i4b64_512::<R, T, false, false>(w, r0, xs),
                (true, false) => i4b64_512::<R, T, true, false>(w, r0, xs),
                (false, true) => i4b64_512::<R, T, false, true>(w, r0, xs),
                (true, true) => i4b64_512::<R, T, true, true>(w, r0, xs),
            },
            (Isa::Avx512Vnni, KilnType::Lut4B32 { group }) if has_vbmi() => {
                // A tile within one group multiplies as a tensor-wide table does, with that
                // group's table (one register rather than one per row). One 32-bit division
                // per tile finds the group (rows are far below 2^32: the tables would not fit
                // otherwise).
                let gr = w.group_rows;
                let g0 = r0 as u32 / gr;
                let grouped = group.is_some() && (r0 as u32 - g0 * gr) as usize + R > gr as usize;
                let g0 = g0 as usize;
                match (grouped, xs[0].is_refined(), w.planar) {
                    (false, false, false) => {
                        lut4b32_512::<R, T, false, false, false>(w, r0, g0, xs)
                    }
                    (false, true, false) => lut4b32_512::<R, T, false, true, false>(w, r0, g0, xs),
                    (true, false, false) => lut4b32_512::<R, T, true, false, false>(w, r0, g0, xs),
                    (true, true, false) => lut4b32_512::<R, T, true, true, false>(w, r0, g0, xs),
                    (false, false, true) => lut4b32_512::<R, T, false, false, true>(w, r0, g0, xs),
                    (false, true, true) => lut4b32_512::<R, T, false, true, true>(w, r0, g0, xs),
                    (true, false, true) => lut4b32_512::<R, T, true, false, true>(w, r0, g0, xs),
                    (true, true, true) => lut4b32_512::<R, T, true, true, true>(w, r0, g0, xs),
                }
            }
            (_, KilnType::I8Ch) if xs[0].is_refined() => i8ch_256::<R, T, true>(w, r0, xs),
            (_, KilnType::I8Ch) => i8ch_256::<R, T, false>(w, r0, xs),
            (_, KilnType::I4B64) if xs[0].is_refined() => i4b64_256::<R, T, true>(w, r0, xs),
            (_, KilnType::I4B64) => i4b64_256::<R, T, false>(w, r0, xs),
            (_, KilnType::Lut4B32 { group }) => match (group.is_some(), xs[0].is_refined()) {
                (false, false) => lut4b32_256::<R, T, false, false>(w, r0, xs),
                (false, true) => lut4b32_256::<R, T, false, true>(w, r0, xs),
                (true, false) => lut4b32_256::<R, T, true, false>(w, r0, xs),
                (true, true) => lut4b32_256::<R, T, true, true>(w, r0, xs),
            },
            (_, KilnType::Lut { .. }) => unreachable!("lookup tables go to lut_i16_dot_block"),
        }
    }
}

/// Prefetches the table bytes `ahead` past `p` into L1: tables are read a few lines ahead.
#[inline(always)]
fn prefetch_table(p: *const u8, ahead: usize) {
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast()) };
}

/// `[a; 8] ++ [b; 8]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair_ps(a: f32, b: f32) -> __m512 {
    let lo = _mm256_set1_ps(a);
    let hi = _mm256_set1_ps(b);
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castps_pd(_mm512_castps256_ps512(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// Sum of the 8 lanes of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of `v`, 16 lanes at a time (a scalar loop is one long chain of dependent adds, paid
/// once per tile).
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum_512(v: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for chunk in v.chunks(16) {
        let mask: __mmask16 = ((1u32 << chunk.len()) - 1) as u16;
        // SAFETY: the mask covers the chunk's elements only.
        acc = _mm512_add_ps(acc, unsafe { _mm512_maskz_loadu_ps(mask, chunk.as_ptr()) });
    }
    _mm512_reduce_add_ps(acc)
}

/// The f32 value of the f16 at `p`.
///
/// # Safety
/// `p..p + 2` is readable.
#[target_feature(enable = "f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: two readable bytes (the caller's guarantee).
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

// ---------------------------------------------------------------------------------------------
// I8_CH

/// The f32 scales of rows `r0..r0 + R` of the `I8_CH` tensor `w` (stored after every row's
/// codes).
///
/// Called at the start of a tile, so the load overlaps the tile's code stream rather than
/// waiting at its end, and prefetching the scales 64 rows on: the scales are a second stream
/// beside the codes, one cache line per 16 rows, and reading them only at the end of each tile
/// cost about 2 % of whole decode speed (Gemma 3, SmolLM2).
#[inline(always)]
fn i8ch_scales<const R: usize>(w: &KilnMatrix, r0: usize) -> [f32; R] {
    let at = w.rows * w.row_bytes + r0 * kiln_types::I8_CH_SCALE_BYTES;
    prefetch_weights(
        w.data.as_ptr().wrapping_add(at),
        64 * kiln_types::I8_CH_SCALE_BYTES,
    );
    std::array::from_fn(|r| kiln_types::i8_ch_scale(w.data, w.rows, w.cols, r0 + r))
}

/// # Safety
/// AVX-512 VNNI; as [`dot_block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn i8ch_512<const R: usize, const T: usize, const REFINED: bool>(
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let cols = w.cols;
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let s = i8ch_scales::<R>(w, r0);
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut c = 0;
    while c < cols {
        let b = c / CHUNK;
        let two = c + 2 * CHUNK <= cols;
        let mut xv = [_mm512_setzero_si512(); T];
        let mut yv = [_mm512_setzero_si512(); T];
        let mut dv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: 32 or 64 codes from c lie within the activation row (and its low parts
            // when refined).
            xv[t] = unsafe { step_bytes(xs[t].codes.as_ptr().add(c).cast(), two) };
            if REFINED {
                // SAFETY: as above.
                yv[t] = unsafe { step_bytes(xs[t].low.as_ptr().add(c).cast(), two) };
            }
            let d1 = if two { xs[t].scales[b + 1] } else { 0.0 };
            dv[t] = pair_ps(xs[t].scales[b], d1);
        }
        for r in 0..R {
            let wp = p.wrapping_add(r * rb + c);
            prefetch_weights(wp, ahead);
            // SAFETY: the codes of row r0 + r from c: 64 bytes when `two`, else 32 (masked).
            // A row is `cols` bytes, so with `cols` a multiple of 64 (and the tensor 64-byte
            // aligned, as packages store it) every load is one whole cache line.
            let wv = unsafe { step_bytes(wp, two) };
            let wv = _mm512_xor_si512(wv, flip);
            for t in 0..T {
                let dp = dpbusd_refined::<REFINED>(wv, xv[t], yv[t]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), dv[t], acc[r][t]);
            }
        }
        c += if two { 2 * CHUNK } else { CHUNK };
    }
    let mut offset = [0.0f32; T];
    for t in 0..T {
        // SAFETY: AVX-512 F (this function's features).
        offset[t] = 128.0 * unsafe { sum_512(&xs[t].sums) };
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s[r] * (_mm512_reduce_add_ps(acc[r][t]) - offset[t]);
        }
    }
    out
}

/// The integer sums of the 64 (32 unless `two`) codes at `wp` with the activation row `x`'s
/// from `c`, per four products, as f32.
///
/// # Safety
/// AVX-512 VNNI; 64 (32 unless `two`) bytes are readable at `wp`, and codes `c..` as many on
/// in `x` (and its low parts if `REFINED`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn i8ch_step<const REFINED: bool>(
    wp: *const u8,
    x: &QuantizedRow,
    c: usize,
    two: bool,
) -> __m512 {
    // SAFETY: the caller's guarantees.
    let (wv, xv, yv) = unsafe {
        (
            step_bytes(wp, two),
            step_bytes(x.codes.as_ptr().add(c).cast(), two),
            if REFINED {
                step_bytes(x.low.as_ptr().add(c).cast(), two)
            } else {
                _mm512_setzero_si512()
            },
        )
    };
    // Flipping the sign bit makes the codes unsigned for `vpdpbusd` (plus 128, taken back out
    // through the activation sums).
    let wv = _mm512_xor_si512(wv, _mm512_set1_epi8(-128));
    _mm512_cvtepi32_ps(dpbusd_refined::<REFINED>(wv, xv, yv))
}

/// `out[i] = row (rows.start + i) · x` for one activation row, a row at a time: one weight
/// stream, which the hardware prefetchers follow better than a tile's four, as for Q8_0; the
/// activation block sums taken once per call rather than once per tile; and two accumulators
/// per row, in two named registers (an accumulator array indexed by a loop variable lives on
/// the stack, and each step then waits on the last one's store). SmolLM2 `int8-channel` on a
/// Zen 4 host, whose 32 MB L3 it does not fit: 117 → 149 tok/s at one thread, 150 → 172 at
/// two, level with its `Q8_0` twin (`docs/quantization.md`). Each line is prefetched into L2
/// at three distances ([`super::prefetch_weights_deep`]): with one, this kernel read the
/// models' matrices more slowly than `Q8_0`'s.
///
/// # Safety
/// AVX-512 VNNI; as [`dot_block`] with one activation row `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn i8ch_rows_512<const REFINED: bool>(
    w: &KilnMatrix,
    rows: Range<usize>,
    x: &QuantizedRow,
    out: &mut [f32],
) {
    let cols = w.cols;
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    // SAFETY: AVX-512 F (this function's features).
    let offset = 128.0 * unsafe { sum_512(&x.sums) };
    for (i, r) in rows.enumerate() {
        let p = w.data[r * rb..].as_ptr();
        let [s] = i8ch_scales::<1>(w, r);
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut c = 0;
        while c + 4 * CHUNK <= cols {
            let wp = p.wrapping_add(c);
            super::prefetch_weights_deep(wp, ahead);
            super::prefetch_weights_deep(wp.wrapping_add(2 * CHUNK), ahead);
            // SAFETY: 128 codes from c lie within row r and the activation row (and its low
            // parts when refined), and so do the four block scales from c / 32.
            let (d, a0, a1) = unsafe {
                let d = _mm512_castps128_ps512(_mm_loadu_ps(x.scales.as_ptr().add(c / CHUNK)));
                (
                    d,
                    i8ch_step::<REFINED>(wp, x, c, true),
                    i8ch_step::<REFINED>(wp.wrapping_add(2 * CHUNK), x, c + 2 * CHUNK, true),
                )
            };
            acc0 = _mm512_fmadd_ps(a0, _mm512_permutexvar_ps(PAIR_IDX[0], d), acc0);
            acc1 = _mm512_fmadd_ps(a1, _mm512_permutexvar_ps(PAIR_IDX[1], d), acc1);
            c += 4 * CHUNK;
        }
        while c < cols {
            let b = c / CHUNK;
            let two = c + 2 * CHUNK <= cols;
            let wp = p.wrapping_add(c);
            super::prefetch_weights_deep(wp, ahead);
            let d1 = if two { x.scales[b + 1] } else { 0.0 };
            // SAFETY: 32 or 64 codes from c lie within row r (64 only when `two`) and within
            // the activation row (and its low parts when refined).
            let a = unsafe { i8ch_step::<REFINED>(wp, x, c, two) };
            acc0 = _mm512_fmadd_ps(a, pair_ps(x.scales[b], d1), acc0);
            c += if two { 2 * CHUNK } else { CHUNK };
        }
        let acc = _mm512_add_ps(acc0, acc1);
        out[i] = s * (_mm512_reduce_add_ps(acc) - offset);
    }
}

/// # Safety
/// AVX2, FMA; as [`dot_block`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn i8ch_256<const R: usize, const T: usize, const REFINED: bool>(
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let cols = w.cols;
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let s = i8ch_scales::<R>(w, r0);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for c in (0..cols).step_by(CHUNK) {
        let b = c / CHUNK;
        let mut xv = [_mm256_setzero_si256(); T];
        let mut yv = [_mm256_setzero_si256(); T];
        let mut dv = [_mm256_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: 32 codes from c lie within the activation row (and its low parts when
            // refined).
            xv[t] = unsafe { _mm256_loadu_si256(xs[t].codes.as_ptr().add(c).cast()) };
            if REFINED {
                // SAFETY: as above.
                yv[t] = unsafe { _mm256_loadu_si256(xs[t].low.as_ptr().add(c).cast()) };
            }
            dv[t] = _mm256_set1_ps(xs[t].scales[b]);
        }
        for r in 0..R {
            prefetch_weights(p.wrapping_add(r * rb + c), ahead);
            // SAFETY: the codes of row r0 + r from c.
            let wv = unsafe { _mm256_loadu_si256(p.add(r * rb + c).cast()) };
            let aw = _mm256_sign_epi8(wv, wv);
            for t in 0..T {
                let p32 = sums_256::<REFINED>(
                    aw,
                    _mm256_sign_epi8(xv[t], wv),
                    _mm256_sign_epi8(yv[t], wv),
                );
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), dv[t], acc[r][t]);
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s[r] * hsum256(acc[r][t]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// I4_B64

/// # Safety
/// AVX-512 VNNI; as [`dot_block`], in planar rows ([`crate::planar::i4_b64`]) if `PLANAR`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn i4b64_512<const R: usize, const T: usize, const REFINED: bool, const PLANAR: bool>(
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nblk = w.cols / I4_BLOCK;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut blk = 0;
    while blk + 2 <= nblk {
        // SAFETY: blocks blk..blk + 2 exist in every row of the tile and activation row.
        unsafe { i4b64_step_512::<R, T, 2, REFINED, PLANAR>(w, r0, &xs, blk, &mut acc) };
        blk += 2;
    }
    if blk < nblk {
        // SAFETY: block blk exists (the last).
        unsafe { i4b64_step_512::<R, T, 1, REFINED, PLANAR>(w, r0, &xs, blk, &mut acc) };
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// Adds blocks `blk..blk + N` (N ≤ 2) of the tile's rows times every activation row to `acc`:
/// the first block's codes in one register and the second's in another, so one `vpdpbusd`
/// covers two activation blocks as they lie (planar rows hold the codes so; stored ones are
/// rearranged, two shuffles per row).
///
/// # Safety
/// AVX-512 VNNI; as [`dot_block`] for rows `r0..r0 + R` of `w` (an `I4_B64` tensor, planar
/// if `PLANAR`); blocks `blk..blk + N` exist.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn i4b64_step_512<
    const R: usize,
    const T: usize,
    const N: usize,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: &KilnMatrix,
    r0: usize,
    xs: &[&QuantizedRow; T],
    blk: usize,
    acc: &mut [[__m512; T]; R],
) {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let a = 2 * blk;
    // Activation blocks a..a + 2N: their scales and sums in lanes 0..2N.
    let lanes: __mmask8 = (1u8 << (2 * N)) - 1;
    // Activation blocks a, a + 1 in one register and a + 2, a + 3 in the other; the weight
    // codes are brought to meet them (planar rows hold them so).
    let codes = |c: *const i8| {
        // SAFETY: 2N blocks of codes from `c` (the caller's guarantee, below).
        unsafe {
            if N == 2 {
                block_codes_512::<4>(c)
            } else {
                block_codes_512::<2>(c)
            }
        }
    };
    let mut xlo = [_mm512_setzero_si512(); T];
    let mut xhi = [_mm512_setzero_si512(); T];
    let mut ylo = [_mm512_setzero_si512(); T];
    let mut yhi = [_mm512_setzero_si512(); T];
    let mut dx = [_mm_setzero_ps(); T];
    let mut ds = [_mm_setzero_ps(); T];
    for t in 0..T {
        let x = xs[t];
        // SAFETY: activation blocks a..a + 2N exist in every activation row (and its low
        // parts when refined); masked-off lanes are not read.
        unsafe {
            (xlo[t], xhi[t]) = codes(x.codes.as_ptr().add(a * CHUNK));
            if REFINED {
                (ylo[t], yhi[t]) = codes(x.low.as_ptr().add(a * CHUNK));
            }
            dx[t] = _mm_maskz_loadu_ps(lanes, x.scales.as_ptr().add(a));
            ds[t] = _mm_maskz_loadu_ps(lanes, x.sums.as_ptr().add(a));
        }
    }
    let low = _mm512_set1_epi8(0x0f);
    let p = w.data[r0 * rb..].as_ptr();
    let scale_plane = crate::planar::i4_b64::scales(w.cols / I4_BLOCK);
    // The step's offsets into every planar row, shared by the tile's rows ([`opaque_offset`]).
    let code_at = opaque_offset(blk * (I4_BLOCK / 2));
    let scale_at = scale_plane + code_at / 16;
    for (r, acc) in acc.iter_mut().enumerate() {
        let (wlo, whi, dw) = if PLANAR {
            let row = p.wrapping_add(r * rb);
            let cp = row.wrapping_add(code_at);
            // The code plane streams: one line a step keeps every line of it a tile ahead.
            prefetch_weights(cp, ahead);
            if blk == 0 {
                prefetch_weights(row.wrapping_add(scale_plane), ahead);
            }
            // SAFETY: blocks blk..blk + N of the planar row r0 + r: 32 code bytes each from
            // 32 · blk, and a 2-byte scale each from the scale plane's 2 · blk.
            unsafe {
                let (nib, d) = if N == 2 {
                    // A pair: block blk's codes in the low nibbles, blk + 1's in the high.
                    (
                        _mm512_loadu_si512(cp.cast()),
                        row.add(scale_at).cast::<u32>().read_unaligned(),
                    )
                } else {
                    // The last block as stored: elements 0..32 low, 32..64 high; the high
                    // nibbles go to the upper half so the block meets one register of codes.
                    let v = _mm256_loadu_si256(cp.cast());
                    let v = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(v),
                        _mm256_srli_epi16::<4>(v),
                    );
                    (
                        _mm512_and_si512(v, low),
                        u32::from(row.add(scale_at).cast::<u16>().read_unaligned()),
                    )
                };
                // [d0, d0, d1, d1]: each block's scale for its two activation blocks.
                let d = _mm_cvtsi32_si128(d as i32);
                // The first block's codes, then the second's (none for a last block alone).
                (
                    _mm512_and_si512(nib, low),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(nib), low),
                    _mm_cvtph_ps(_mm_unpacklo_epi16(d, d)),
                )
            }
        } else {
            // SAFETY: blocks blk..blk + N of the stored row r0 + r.
            let (nib, dw) = unsafe {
                i4b64_stored_blocks::<N>(p.wrapping_add(r * rb + blk * I4_BLOCK_BYTES), ahead)
            };
            // Low nibbles: elements 0..32 of each block; high: 32..64. Rearranged to the
            // planar rows' order, so both layouts sum alike and give the same results.
            let lo = _mm512_and_si512(nib, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(nib), low);
            (
                _mm512_shuffle_i64x2::<0x44>(lo, hi),
                _mm512_shuffle_i64x2::<0xee>(lo, hi),
                dw,
            )
        };
        let offset = _mm_mul_ps(dw, _mm_set1_ps(-8.0));
        for t in 0..T {
            let s = _mm512_castps128_ps512(_mm_mul_ps(dw, dx[t]));
            let ilo = dpbusd_refined::<REFINED>(wlo, xlo[t], ylo[t]);
            let mut v = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(ilo),
                _mm512_permutexvar_ps(PAIR_IDX[0], s),
                acc[t],
            );
            if N == 2 {
                // (A last block alone has nothing here: its activation codes are zero.)
                let ihi = dpbusd_refined::<REFINED>(whi, xhi[t], yhi[t]);
                v = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(ihi),
                    _mm512_permutexvar_ps(PAIR_IDX[1], s),
                    v,
                );
            }
            // The codes' bias: −8 · d_w · (d_x Σ x) per activation block.
            let c = _mm_mul_ps(offset, ds[t]);
            acc[t] = _mm512_add_ps(v, _mm512_zextps128_ps512(c));
        }
    }
}

/// The codes of stored `I4_B64` blocks `0..N` (N ≤ 2) at `bp`, one block per 256-bit half,
/// and their scales as `[d0, d0, d1, d1]` (each for its block's two activation blocks).
///
/// # Safety
/// AVX-512 F and F16C; the `N` blocks (34 bytes each) are readable at `bp`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn i4b64_stored_blocks<const N: usize>(bp: *const u8, ahead: usize) -> (__m512i, __m128) {
    prefetch_weights(bp, ahead);
    if N == 2 {
        prefetch_weights(bp.wrapping_add(64), ahead);
    }
    // SAFETY: the N blocks at bp: a 2-byte scale and 32 bytes of nibbles each.
    let (nib, d) = unsafe {
        let first = _mm512_castsi256_si512(_mm256_loadu_si256(bp.add(2).cast()));
        let d0 = u64::from(bp.cast::<u16>().read_unaligned());
        if N == 2 {
            let second = _mm256_loadu_si256(bp.add(I4_BLOCK_BYTES + 2).cast());
            let d1 = u64::from(bp.add(I4_BLOCK_BYTES).cast::<u16>().read_unaligned());
            (
                _mm512_inserti64x4::<1>(first, second),
                (d0 * 0x1_0001) | ((d1 * 0x1_0001) << 32),
            )
        } else {
            (first, d0 * 0x1_0001)
        }
    };
    (nib, _mm_cvtph_ps(_mm_cvtsi64_si128(d as i64)))
}

/// # Safety
/// AVX2, FMA, F16C; as [`dot_block`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn i4b64_256<const R: usize, const T: usize, const REFINED: bool>(
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for blk in 0..w.cols / I4_BLOCK {
        let a = 2 * blk;
        let mut xa = [_mm256_setzero_si256(); T];
        let mut xb = [_mm256_setzero_si256(); T];
        let mut ya = [_mm256_setzero_si256(); T];
        let mut yb = [_mm256_setzero_si256(); T];
        for t in 0..T {
            // SAFETY: the 64 codes of activation blocks a and a + 1 (and their low parts when
            // refined).
            unsafe {
                xa[t] = _mm256_loadu_si256(xs[t].codes.as_ptr().add(a * CHUNK).cast());
                xb[t] = _mm256_loadu_si256(xs[t].codes.as_ptr().add((a + 1) * CHUNK).cast());
                if REFINED {
                    ya[t] = _mm256_loadu_si256(xs[t].low.as_ptr().add(a * CHUNK).cast());
                    yb[t] = _mm256_loadu_si256(xs[t].low.as_ptr().add((a + 1) * CHUNK).cast());
                }
            }
        }
        for r in 0..R {
            let bp = p.wrapping_add(r * rb + blk * I4_BLOCK_BYTES);
            prefetch_weights(bp, ahead);
            // SAFETY: block blk of row r0 + r: a 2-byte scale and 32 bytes of nibbles.
            let (d, nib) = unsafe { (f16_at(bp), _mm256_loadu_si256(bp.add(2).cast())) };
            let lo = _mm256_and_si256(nib, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(nib), low);
            let dw = _mm256_set1_ps(d);
            for t in 0..T {
                let x = xs[t];
                let pa = sums_256::<REFINED>(lo, xa[t], ya[t]);
                let pb = sums_256::<REFINED>(hi, xb[t], yb[t]);
                let va = _mm256_fmsub_ps(
                    _mm256_cvtepi32_ps(pa),
                    _mm256_set1_ps(x.scales[a]),
                    _mm256_set1_ps(x.sums[a]),
                );
                let vb = _mm256_fmsub_ps(
                    _mm256_cvtepi32_ps(pb),
                    _mm256_set1_ps(x.scales[a + 1]),
                    _mm256_set1_ps(x.sums[a + 1]),
                );
                acc[r][t] = _mm256_fmadd_ps(_mm256_add_ps(va, vb), dw, acc[r][t]);
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum256(acc[r][t]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// LUT4_B32
//
// A `LUT4_B32` block has Q4_0's layout (two bytes of parameters, then 16 bytes of nibbles,
// low nibbles elements 0..16 and high 16..32), so the kernels take four blocks per step the
// way the Q4_0 kernels do (one window over the four blocks on AVX-512). The per-block scalar
// work of a block at a time (the offset codes times the activation sums, the scale codes times
// the activation scales) had made the kernel 1.5 times slower than Q4_0's at one token.
//
// On AVX-512 the table lookups cost what Q4_0's nibble masks do not, and the kernel pays them
// back by scaling each block once: the four blocks' low nibbles and high nibbles meet the
// activation codes rearranged to the same block order (`lut4b32_halves`), so their integer
// sums add up before one conversion, one scale spread and one multiply-add, where Q4_0's
// kernel has two of each.

/// The 32 indices of a `LUT4_B32` block (16 bytes at `p`), in element order: low nibbles
/// (elements 0..16) in the lower lane, high nibbles (16..32) in the upper.
///
/// # Safety
/// `p..p + 16` is readable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lut4b32_indices(p: *const u8) -> __m256i {
    // The 16 bytes in both lanes (a broadcast load, no shuffle), the upper lane shifted by a
    // nibble: shuffles are what this kernel runs short of.
    // SAFETY: 16 readable bytes (the caller's guarantee).
    let n = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast())) };
    let n = _mm256_srlv_epi32(n, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(n, _mm256_set1_epi8(0x0f))
}

/// The row's f32 scale unit `S` and offset unit `M`.
///
/// # Safety
/// `p..p + 8` (the row's header) is readable.
#[inline(always)]
unsafe fn lut4b32_header(p: *const u8) -> (f32, f32) {
    // SAFETY: 8 readable bytes (the caller's guarantee).
    unsafe {
        (
            p.cast::<f32>().read_unaligned(),
            p.add(4).cast::<f32>().read_unaligned(),
        )
    }
}

/// Sum of the 4 lanes of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum128(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `vpermb` indices gathering, from a window over four `LUT4_B32` blocks, the scale codes
/// (byte 0 of each block) into bytes 0..4 and the offset codes (byte 1) into bytes 4..8.
const LUT4B32_PARAMS_IDX: __m512i = {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 4 {
        a[k] = (k * LUT4_B32_BLOCK_BYTES) as u8;
        a[4 + k] = (k * LUT4_B32_BLOCK_BYTES + 1) as u8;
        k += 1;
    }
    // SAFETY: [u8; 64] and __m512i have the same size and every bit pattern is valid in both.
    unsafe { core::mem::transmute::<[u8; 64], __m512i>(a) }
};

/// The tables of rows `r0..r0 + R` of a `LUT4_B32` tensor, each in every 16 bytes of a
/// register (`GROUPED == false`: group `g0`'s, the one of every row, in the first only).
///
/// # Safety
/// AVX-512 F; rows `r0..r0 + R` exist in `w`, a `LUT4_B32` tensor; `g0` is row `r0`'s group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut4b32_tables_512<const R: usize, const GROUPED: bool>(
    w: &KilnMatrix,
    r0: usize,
    g0: usize,
) -> [__m512i; R] {
    let mut tables = [_mm512_setzero_si512(); R];
    if !GROUPED {
        debug_assert_eq!(w.lut4_b32_table(r0), w.lut4_b32_group_table(g0));
        // SAFETY: a table is 16 bytes.
        let t128 = unsafe { _mm_loadu_si128(w.lut4_b32_group_table(g0).as_ptr().cast()) };
        tables[0] = _mm512_broadcast_i32x4(t128);
        return tables;
    }
    // The tile's groups counted on from g0, with no division per row: row r0 is `at` rows
    // into its group.
    let group = w.group_rows as usize;
    let (mut g, mut at) = (g0, r0 - g0 * group);
    for t in tables.iter_mut() {
        if at == group {
            (g, at) = (g + 1, 0);
        }
        debug_assert!(g < w.rows.div_ceil(group));
        // SAFETY: a table is 16 bytes.
        let t128 = unsafe { _mm_loadu_si128(w.lut4_b32_group_table(g).as_ptr().cast()) };
        *t = _mm512_broadcast_i32x4(t128);
        at += 1;
    }
    tables
}

/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` a `LUT4_B32` tensor, `g0` row `r0`'s group,
/// with one table per group of rows if `GROUPED` (a tile's rows may straddle groups, so each
/// row takes its own), in planar rows ([`crate::planar::lut4_b32`]) if `PLANAR`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut4b32_512<
    const R: usize,
    const T: usize,
    const GROUPED: bool,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: &KilnMatrix,
    r0: usize,
    g0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nb = w.cols / CHUNK;
    let p = w.data[r0 * w.row_bytes..].as_ptr();
    // In every 16 bytes: `vpermb` then reads entry `i & 15` whatever bits 4..6 of `i` hold.
    // SAFETY: rows r0..r0 + R exist and g0 is r0's group (the caller's guarantee).
    let table = unsafe { lut4b32_tables_512::<R, GROUPED>(w, r0, g0) };
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut offs = [[_mm256_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 4 <= nb {
        // SAFETY: blocks b..b + 4 exist in every weight row and activation row.
        unsafe {
            lut4b32_step_512::<R, T, 4, GROUPED, REFINED, PLANAR>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            )
        };
        b += 4;
    }
    // SAFETY: the last nb - b blocks exist.
    unsafe {
        match nb - b {
            1 => lut4b32_pair_512::<R, T, 1, GROUPED, REFINED, PLANAR>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            2 => lut4b32_pair_512::<R, T, 2, GROUPED, REFINED, PLANAR>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            3 => lut4b32_step_512::<R, T, 3, GROUPED, REFINED, PLANAR>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            _ => {}
        }
    }
    // Each row's sums scaled by its units, the offset sums (lanes 4..8 of `offs`) beside the
    // others, then added up four rows at a time.
    let mut fin = [[_mm512_setzero_ps(); T]; R];
    for r in 0..R {
        // SAFETY: row r0 + r's 8-byte header.
        let (s, m) = unsafe { lut4b32_header(p.add(r * w.row_bytes)) };
        for t in 0..T {
            let o =
                _mm512_maskz_mul_ps(0xf0, _mm512_castps256_ps512(offs[r][t]), _mm512_set1_ps(m));
            fin[r][t] = _mm512_fmadd_ps(acc[r][t], _mm512_set1_ps(s), o);
        }
    }
    let mut out = [[0.0; T]; R];
    for t in 0..T {
        if R == 4 {
            let sums: [f32; 4] = f32x4_lanes(sums4([fin[0][t], fin[1][t], fin[2][t], fin[3][t]]));
            for r in 0..R {
                out[r][t] = sums[r];
            }
        } else {
            for r in 0..R {
                out[r][t] = _mm512_reduce_add_ps(fin[r][t]);
            }
        }
    }
    out
}

/// The four lanes of `v`.
#[target_feature(enable = "sse")]
#[inline]
fn f32x4_lanes(v: __m128) -> [f32; 4] {
    let mut a = [0.0f32; 4];
    // SAFETY: `a` has room for the 16 bytes stored.
    unsafe { _mm_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// The sums of the 16 lanes of each of four registers: far fewer shuffles than four
/// reductions one register at a time.
#[target_feature(enable = "avx512f")]
#[inline]
fn sums4(v: [__m512; 4]) -> __m128 {
    // 128-bit lanes 0 + 2 and 1 + 3 of two registers side by side: [v0, v0, v1, v1].
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    };
    let (a, b) = (halves(v[0], v[1]), halves(v[2], v[3]));
    // One 128-bit lane per register: [v0, v1, v2, v3].
    let c = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
    );
    // Within each lane, every element the lane's sum.
    let d = _mm512_add_ps(c, _mm512_permute_ps::<0b01_00_11_10>(c));
    let e = _mm512_add_ps(d, _mm512_permute_ps::<0b10_11_00_01>(d));
    let first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(first, e))
}

/// `vpermt2b` indices gathering, from a window over four stored `LUT4_B32` blocks, their 16
/// index bytes each into bytes `16k..16k + 16` (the planar code plane's order).
const LUT4B32_CODES_IDX: __m512i = {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 4 {
        let mut j = 0;
        while j < 16 {
            a[16 * k + j] = (k * LUT4_B32_BLOCK_BYTES + 2 + j) as u8;
            j += 1;
        }
        k += 1;
    }
    // SAFETY: [u8; 64] and __m512i have the same size and every bit pattern is valid in both.
    unsafe { core::mem::transmute::<[u8; 64], __m512i>(a) }
};

/// Four blocks' activation codes, two blocks per register (`x01`: blocks 0 and 1, each 32
/// bytes in element order), rearranged as the four blocks' elements `0..16` (the first) and
/// `16..32` (the second), 16 bytes per block: the order of a `LUT4_B32` group's looked-up low
/// and high nibbles.
#[target_feature(enable = "avx512f")]
#[inline]
fn lut4b32_halves(x01: __m512i, x23: __m512i) -> (__m512i, __m512i) {
    (
        _mm512_shuffle_i64x2::<0b10_00_10_00>(x01, x23),
        _mm512_shuffle_i64x2::<0b11_01_11_01>(x01, x23),
    )
}

/// Blocks `b..b + N` (N ≤ 4) of one activation row: its block scales in lanes 0..4 and block
/// sums in 4..8 (one multiply with a weight block's scale and offset codes gives both
/// products), and its codes and (if `REFINED`) low parts, two blocks per register, zero beyond
/// `N`.
///
/// # Safety
/// AVX-512 F/BW; blocks `b..b + N` exist in `x` (refined if `REFINED`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut4b32_activation_blocks<const N: usize, const REFINED: bool>(
    x: &QuantizedRow,
    b: usize,
) -> (__m256, [__m512i; 2], [__m512i; 2]) {
    let lanes: __mmask8 = (1u8 << N) - 1;
    // SAFETY: blocks b..b + N exist, so N scales and sums from index b and N * 32 codes (and
    // as many low parts of a refined row) from b * 32 are in bounds; masked-off lanes are not
    // read.
    unsafe {
        let dx = _mm_maskz_loadu_ps(lanes, x.scales.as_ptr().add(b));
        let ds = _mm_maskz_loadu_ps(lanes, x.sums.as_ptr().add(b));
        let xf = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(dx), ds);
        let (x01, x23) = block_codes_512::<N>(x.codes.as_ptr().add(b * CHUNK));
        let (y01, y23) = if REFINED {
            block_codes_512::<N>(x.low.as_ptr().add(b * CHUNK))
        } else {
            (x01, x23)
        };
        (xf, [x01, x23], [y01, y23])
    }
}

/// Adds blocks `b..b + N` (N ≤ 4) of every row and activation row of the tile: the scaled
/// integer sums to `acc`, the offset codes times the activation block sums to lanes 4..8 of
/// `offs` (lanes 0..4 collect what is not needed).
///
/// Each block's elements `0..16` and `16..32` (the low and high nibbles of its index bytes)
/// meet the activation codes in the same lanes ([`lut4b32_halves`]), so one integer sum per
/// lane covers both halves and each block is scaled once.
///
/// # Safety
/// AVX-512 VNNI and VBMI; `p` is row `r0` of `w` (a `LUT4_B32` tensor) with `R` rows from it,
/// `table` their tables ([`lut4b32_tables_512`]); blocks `b..b + N` exist in every activation
/// row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_step_512<
    const R: usize,
    const T: usize,
    const N: usize,
    const GROUPED: bool,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: &KilnMatrix,
    p: *const u8,
    table: &[__m512i; R],
    xs: &[&QuantizedRow; T],
    b: usize,
    acc: &mut [[__m512; T]; R],
    offs: &mut [[__m256; T]; R],
) {
    let ahead = super::prefetch_distance(w.row_bytes);
    let mut xf = [_mm256_setzero_ps(); T];
    let mut xa = [_mm512_setzero_si512(); T];
    let mut xb = [_mm512_setzero_si512(); T];
    let mut ya = [_mm512_setzero_si512(); T];
    let mut yb = [_mm512_setzero_si512(); T];
    for t in 0..T {
        // SAFETY: blocks b..b + N exist in every activation row (the caller's guarantee).
        let (f, [x01, x23], [y01, y23]) =
            unsafe { lut4b32_activation_blocks::<N, REFINED>(xs[t], b) };
        xf[t] = f;
        (xa[t], xb[t]) = lut4b32_halves(x01, x23);
        (ya[t], yb[t]) = lut4b32_halves(y01, y23);
    }
    let len = N * LUT4_B32_BLOCK_BYTES;
    let nb = w.cols / CHUNK;
    let param_plane = crate::planar::lut4_b32::params(nb);
    // The step's offsets into every planar row, shared by the tile's rows ([`opaque_offset`]).
    let code_offset = opaque_offset((CHUNK / 2) * b);
    let code_at = LUT4_B32_ROW_HEADER + code_offset;
    let param_at = param_plane + code_offset / 8;
    for r in 0..R {
        let row = p.wrapping_add(r * w.row_bytes);
        let bp = row.wrapping_add(LUT4_B32_ROW_HEADER + b * LUT4_B32_BLOCK_BYTES);
        // Every line of these blocks one tile ahead, and further on into L2
        // (harmless at any address).
        for line in (0..4 * LUT4_B32_BLOCK_BYTES).step_by(64) {
            prefetch_weights(bp.wrapping_add(line), ahead);
        }
        // The blocks' parameter codes (scales in bytes 0..4, offsets in 4..8) and their 16
        // index bytes each (zero beyond N: those lanes meet zero activations).
        let (params, v) = if PLANAR {
            // SAFETY: row r0 + r is a planar row of nb blocks: blocks b..b + N have their
            // index bytes from 16 · b in the code plane and their 2 · N parameter codes from
            // 2 · b among the parameters (N scale codes, then N offset codes: the masks
            // read those bytes only).
            unsafe {
                let codes = row.add(code_at);
                let v = if N == 4 {
                    _mm512_loadu_si512(codes.cast())
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << (16 * N)) - 1, codes.cast())
                };
                let at = row.add(param_at);
                let params = if N == 4 {
                    _mm_loadl_epi64(at.cast())
                } else {
                    let n: __mmask16 = (1u16 << N) - 1;
                    _mm_unpacklo_epi32(
                        _mm_maskz_loadu_epi8(n, at.cast()),
                        _mm_maskz_loadu_epi8(n, at.add(N).cast()),
                    )
                };
                (params, v)
            }
        } else {
            // SAFETY: blocks b..b + N of row r0 + r are readable; the masks cover those
            // `len` bytes only.
            let (lo, hi) = unsafe {
                let lo = if len >= 64 {
                    _mm512_loadu_si512(bp.cast())
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << len) - 1, bp.cast())
                };
                let hi = if len > 64 {
                    _mm512_maskz_loadu_epi8((1u64 << (len - 64)) - 1, bp.add(64).cast())
                } else {
                    _mm512_setzero_si512()
                };
                (lo, hi)
            };
            // The parameters of the four blocks all lie in the first 64 bytes; indices past
            // `len` read the masked-off zeros.
            let params = _mm512_permutexvar_epi8(LUT4B32_PARAMS_IDX, lo);
            let v = _mm512_permutex2var_epi8(lo, LUT4B32_CODES_IDX, hi);
            (_mm512_castsi512_si128(params), v)
        };
        let codes = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(params));
        // `vpermb` reads entry `i & 15` of the table repeated in every 16 bytes, so neither
        // the low nibbles nor the shifted high ones need a mask.
        let table_r = table[if GROUPED { r } else { 0 }];
        let wa = _mm512_permutexvar_epi8(v, table_r);
        let wb = _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(v), table_r);
        lut4b32_accumulate::<T, REFINED>(
            codes,
            (wa, wb),
            &xf,
            (&xa, &xb),
            (&ya, &yb),
            &mut acc[r],
            &mut offs[r],
        );
    }
}

/// One or two blocks' activation codes (`x01`: 32 bytes a block, in element order) as both
/// blocks' elements `0..16` (the first) and `16..32` (the second): [`lut4b32_halves`] for a
/// pair.
#[target_feature(enable = "avx512f")]
#[inline]
fn lut4b32_pair_halves(x01: __m512i) -> (__m256i, __m256i) {
    let v = _mm512_shuffle_i64x2::<0b11_01_10_00>(x01, x01);
    (_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Adds the last `N` (1 or 2) blocks `b..b + N` of the tile's rows as [`lut4b32_step_512`]
/// does four, in 256-bit registers: a row of 18 blocks (576 elements, SmolLM2's width) spent
/// a fifth of its time on a 512-bit step for its last two.
///
/// # Safety
/// As [`lut4b32_step_512`]; `b + N` is the rows' block count.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_pair_512<
    const R: usize,
    const T: usize,
    const N: usize,
    const GROUPED: bool,
    const REFINED: bool,
    const PLANAR: bool,
>(
    w: &KilnMatrix,
    p: *const u8,
    table: &[__m512i; R],
    xs: &[&QuantizedRow; T],
    b: usize,
    acc: &mut [[__m512; T]; R],
    offs: &mut [[__m256; T]; R],
) {
    debug_assert!(N <= 2 && b + N == w.cols / CHUNK);
    let mut xf = [_mm256_setzero_ps(); T];
    let mut xa = [_mm256_setzero_si256(); T];
    let mut xb = [_mm256_setzero_si256(); T];
    let mut ya = [_mm256_setzero_si256(); T];
    let mut yb = [_mm256_setzero_si256(); T];
    for t in 0..T {
        // SAFETY: blocks b..b + N exist in every activation row (the caller's guarantee).
        let (f, [x01, _], [y01, _]) = unsafe { lut4b32_activation_blocks::<N, REFINED>(xs[t], b) };
        xf[t] = f;
        (xa[t], xb[t]) = lut4b32_pair_halves(x01);
        (ya[t], yb[t]) = lut4b32_pair_halves(y01);
    }
    let len = N * LUT4_B32_BLOCK_BYTES;
    let nb = w.cols / CHUNK;
    let code_at = LUT4_B32_ROW_HEADER + (CHUNK / 2) * b;
    let param_at = crate::planar::lut4_b32::params(nb) + 2 * b;
    let ahead = super::prefetch_distance(w.row_bytes);
    for r in 0..R {
        let row = p.wrapping_add(r * w.row_bytes);
        // The lines the four-block step would fetch ahead for these rows' ends.
        let bp = row.wrapping_add(LUT4_B32_ROW_HEADER + b * LUT4_B32_BLOCK_BYTES);
        for line in (0..4 * LUT4_B32_BLOCK_BYTES).step_by(64) {
            prefetch_weights(bp.wrapping_add(line), ahead);
        }
        // The blocks' parameter codes (scales in bytes 0..N, offsets in 4..4 + N) and their
        // index bytes (zero beyond N).
        let (params, v) = if PLANAR {
            // SAFETY: blocks b..b + N of the planar row r0 + r: their 16 · N index bytes from
            // 16 · b in the code plane, their N scale codes and then N offset codes from 2 · b
            // among the parameters; the masks read those bytes only.
            unsafe {
                let v = _mm256_maskz_loadu_epi8(
                    (u64::MAX >> (64 - 16 * N)) as __mmask32,
                    row.add(code_at).cast(),
                );
                let n: __mmask16 = (1u16 << N) - 1;
                let at = row.add(param_at);
                let params = _mm_unpacklo_epi32(
                    _mm_maskz_loadu_epi8(n, at.cast()),
                    _mm_maskz_loadu_epi8(n, at.add(N).cast()),
                );
                (params, v)
            }
        } else {
            // SAFETY: blocks b..b + N of row r0 + r are readable; the mask covers those `len`
            // bytes only.
            let lo = unsafe { _mm512_maskz_loadu_epi8((1u64 << len) - 1, bp.cast()) };
            let params = _mm512_permutexvar_epi8(LUT4B32_PARAMS_IDX, lo);
            let v = _mm512_permutexvar_epi8(LUT4B32_CODES_IDX, lo);
            (_mm512_castsi512_si128(params), _mm512_castsi512_si256(v))
        };
        let codes = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(params));
        let table_r = _mm512_castsi512_si256(table[if GROUPED { r } else { 0 }]);
        let wa = _mm256_permutexvar_epi8(v, table_r);
        let wb = _mm256_permutexvar_epi8(_mm256_srli_epi16::<4>(v), table_r);
        for t in 0..T {
            let f = _mm256_mul_ps(codes, xf[t]);
            offs[r][t] = _mm256_add_ps(offs[r][t], f);
            let s = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
            let high = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wa, xa[t]);
            let mut i = _mm256_dpbusd_epi32(high, wb, xb[t]);
            if REFINED {
                i = _mm256_dpbusd_epi32(_mm256_slli_epi32::<8>(i), wa, ya[t]);
                i = _mm256_dpbusd_epi32(i, wb, yb[t]);
            }
            let sum = _mm256_mul_ps(_mm256_cvtepi32_ps(i), s);
            acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_zextps256_ps512(sum));
        }
    }
}

/// Adds one row's four blocks to its sums with every activation row: `codes` holds the
/// blocks' scale codes in lanes 0..4 and offset codes in 4..8, `w` their looked-up 7-bit
/// weights (elements `0..16` of each block, then `16..32`), `xf` each activation row's block
/// scales and sums (lanes 0..4, 4..8), `x` its codes in the same order as the weights and `y`
/// a refined row's low parts.
///
/// Exact integer sums: a lane adds eight products of a weight ≤ 127 and a code within ±128
/// (below 2^17), and a refined row's high sum shifted by 8 plus its low sum stays below 2^26.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
fn lut4b32_accumulate<const T: usize, const REFINED: bool>(
    codes: __m256,
    w: (__m512i, __m512i),
    xf: &[__m256; T],
    x: (&[__m512i; T], &[__m512i; T]),
    y: (&[__m512i; T], &[__m512i; T]),
    acc: &mut [__m512; T],
    offs: &mut [__m256; T],
) {
    use super::avx512::QUAD_IDX;
    for t in 0..T {
        let f = _mm256_mul_ps(codes, xf[t]);
        offs[t] = _mm256_add_ps(offs[t], f);
        let s = _mm512_permutexvar_ps(QUAD_IDX, _mm512_castps256_ps512(f));
        let high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.0, x.0[t]);
        let mut i = _mm512_dpbusd_epi32(high, w.1, x.1[t]);
        if REFINED {
            i = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(i), w.0, y.0[t]);
            i = _mm512_dpbusd_epi32(i, w.1, y.1[t]);
        }
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[t]);
    }
}

/// `vpshufb` indices gathering the scale codes (even bytes) of four 2-byte parameter pairs
/// into bytes 0..4 and the offset codes (odd bytes) into 4..8.
const LUT4B32_SPLIT: [i8; 16] = [0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1];

/// # Safety
/// AVX2, FMA; as [`dot_block`], `w` a `LUT4_B32` tensor, with one table per group of rows if
/// `GROUPED`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut4b32_256<const R: usize, const T: usize, const GROUPED: bool, const REFINED: bool>(
    w: &KilnMatrix,
    r0: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let nb = w.cols / CHUNK;
    let p = w.data[r0 * w.row_bytes..].as_ptr();
    let mut table = [_mm256_setzero_si256(); R];
    for (r, t) in table
        .iter_mut()
        .enumerate()
        .take(if GROUPED { R } else { 1 })
    {
        // SAFETY: a table is 16 bytes.
        let t128 = unsafe { _mm_loadu_si128(w.lut4_b32_table(r0 + r).as_ptr().cast()) };
        *t = _mm256_broadcastsi128_si256(t128);
    }
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut offs = [[_mm256_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 4 <= nb {
        // SAFETY: blocks b..b + 4 exist in every weight row and activation row.
        unsafe {
            lut4b32_step_256::<R, T, 4, GROUPED, REFINED>(w, p, &table, &xs, b, &mut acc, &mut offs)
        };
        b += 4;
    }
    // SAFETY: the last nb - b blocks exist.
    unsafe {
        match nb - b {
            1 => lut4b32_step_256::<R, T, 1, GROUPED, REFINED>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            2 => lut4b32_step_256::<R, T, 2, GROUPED, REFINED>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            3 => lut4b32_step_256::<R, T, 3, GROUPED, REFINED>(
                w, p, &table, &xs, b, &mut acc, &mut offs,
            ),
            _ => {}
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        // SAFETY: row r0 + r's 8-byte header.
        let (s, m) = unsafe { lut4b32_header(p.add(r * w.row_bytes)) };
        for t in 0..T {
            let o = hsum128(_mm256_extractf128_ps::<1>(offs[r][t]));
            out[r][t] = s * hsum256(acc[r][t]) + m * o;
        }
    }
    out
}

/// As [`lut4b32_step_512`] for AVX2.
///
/// # Safety
/// AVX2, FMA; `p` is row `r0` of `w` (a `LUT4_B32` tensor) with `R` rows from it, `table`
/// their tables (the first only unless `GROUPED`); blocks `b..b + N` exist in every
/// activation row.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_step_256<
    const R: usize,
    const T: usize,
    const N: usize,
    const GROUPED: bool,
    const REFINED: bool,
>(
    w: &KilnMatrix,
    p: *const u8,
    table: &[__m256i; R],
    xs: &[&QuantizedRow; T],
    b: usize,
    acc: &mut [[__m256; T]; R],
    offs: &mut [[__m256; T]; R],
) {
    let ahead = super::prefetch_distance(w.row_bytes);
    let lane = |k: i32| if (k as usize) < N { -1 } else { 0 };
    let lanes = _mm_setr_epi32(lane(0), lane(1), lane(2), lane(3));
    // SAFETY: [i8; 16] and __m128i have the same size and every bit pattern is valid in both.
    let split = unsafe { core::mem::transmute::<[i8; 16], __m128i>(LUT4B32_SPLIT) };
    let mut xf = [_mm256_setzero_ps(); T];
    for t in 0..T {
        // SAFETY: N scales and sums from index b are in bounds; masked lanes are not read.
        unsafe {
            let dx = _mm_maskload_ps(xs[t].scales.as_ptr().add(b), lanes);
            let ds = _mm_maskload_ps(xs[t].sums.as_ptr().add(b), lanes);
            xf[t] = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(dx), ds);
        }
    }
    for r in 0..R {
        let bp = p.wrapping_add(r * w.row_bytes + LUT4_B32_ROW_HEADER + b * LUT4_B32_BLOCK_BYTES);
        for line in (0..4 * LUT4_B32_BLOCK_BYTES).step_by(64) {
            prefetch_weights(bp.wrapping_add(line), ahead);
        }
        let mut pairs = 0u64;
        for k in 0..N {
            // SAFETY: block b + k of row r0 + r is readable; its parameters lead it.
            let ab = unsafe {
                bp.add(k * LUT4_B32_BLOCK_BYTES)
                    .cast::<u16>()
                    .read_unaligned()
            };
            pairs |= u64::from(ab) << (16 * k);
        }
        let codes = _mm_shuffle_epi8(_mm_cvtsi64_si128(pairs as i64), split);
        let codes = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        let mut f = [_mm256_setzero_ps(); T];
        for t in 0..T {
            f[t] = _mm256_mul_ps(codes, xf[t]);
            offs[r][t] = _mm256_add_ps(offs[r][t], f[t]);
        }
        for k in 0..N {
            // SAFETY: block b + k of row r0 + r: 16 bytes of indices after its parameters.
            let i = unsafe { lut4b32_indices(bp.add(k * LUT4_B32_BLOCK_BYTES + 2)) };
            let wq = _mm256_shuffle_epi8(table[if GROUPED { r } else { 0 }], i);
            for t in 0..T {
                // SAFETY: block b + k of every activation row is in bounds.
                let x =
                    unsafe { _mm256_loadu_si256(xs[t].codes.as_ptr().add((b + k) * CHUNK).cast()) };
                let y = if REFINED {
                    // SAFETY: a refined row's low parts are as long as its codes.
                    unsafe { _mm256_loadu_si256(xs[t].low.as_ptr().add((b + k) * CHUNK).cast()) }
                } else {
                    x
                };
                let i = sums_256::<REFINED>(wq, x, y);
                let s = _mm256_permutevar8x32_ps(f[t], _mm256_set1_epi32(k as i32));
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc[r][t]);
            }
        }
    }
}

/// Whether `isa` has a dequantization kernel for `ty` here: `LUT4_B32`; every lookup-table
/// width on AVX-512 (register lookups, gathers for 8 bits); 8-bit tables on AVX2, whose
/// 256-entry table per row is what the reference spends its time widening (for the smaller
/// tables AVX2's gathers lose to the reference's scalar lookups).
pub(crate) fn has_dequantize(isa: Isa, ty: KilnType) -> bool {
    match (isa, ty) {
        (Isa::Avx2 | Isa::Avx512Vnni, KilnType::Lut4B32 { .. }) => true,
        (Isa::Avx512Vnni, KilnType::I4B64 | KilnType::I8Ch) => true,
        (Isa::Avx512Vnni, KilnType::Lut { .. }) => true,
        (Isa::Avx2, KilnType::Lut { bits, .. }) => bits == 8,
        _ => false,
    }
}

/// Row `r` of the `LUT4_B32` tensor `w` dequantized into `out` (with its group's table),
/// exactly as
/// `kiln_types::dequantize_row`: per block the 16 values `(S·a · u[k] + M·b)` in f64, rounded
/// to f32 once, then looked up by the indices (`vpermps`; AVX2: two 8-entry halves and a
/// blend on the index's top bit).
///
/// # Safety
/// The CPU has `isa` (AVX2 or AVX-512 VNNI, with FMA and F16C); `has_dequantize(isa, w.ty)`;
/// `r < w.rows` and `out.len() == w.cols`.
pub(crate) unsafe fn dequantize_row(isa: Isa, w: &KilnMatrix, r: usize, out: &mut [f32]) {
    // SAFETY: the caller's guarantees; `out` holds the row's f32 values.
    unsafe { dequantize_into::<false>(isa, w, r, out.as_mut_ptr().cast()) }
}

/// Rows `start..start + n` of `w` dequantized and rounded to bf16, row `i` at
/// `out[i * stride..]`: each value `crate::gemm_bf16::to_bf16` of [`dequantize_row`]'s, without
/// the f32 rows in between; 8-bit tables that consecutive rows share are rounded once.
///
/// # Safety
/// AVX-512 F/BW/VL, FMA, F16C and AVX-512 BF16 (`crate::gemm_bf16::bf16_available`);
/// `has_dequantize(Isa::Avx512Vnni, w.ty)`; planar rows only where
/// `crate::planar::kiln::supported`; `start + n <= w.rows`, `stride >= w.cols` and
/// `out.len() >= (n - 1) * stride + w.cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_rows_bf16(
    w: &KilnMatrix,
    start: usize,
    n: usize,
    out: &mut [u16],
    stride: usize,
) {
    if matches!(w.ty, KilnType::Lut { bits: 8, .. }) && has_vbmi() {
        // SAFETY: VBMI checked; the rest is the caller's.
        return unsafe { lut8_rows_vbmi::<true>(w, start, n, out.as_mut_ptr().cast(), stride) };
    }
    for i in 0..n {
        // SAFETY: row start + i < w.rows into its `w.cols` words of `out` (the caller's).
        unsafe {
            let o = out.as_mut_ptr().add(i * stride).cast();
            dequantize_into::<true>(Isa::Avx512Vnni, w, start + i, o)
        }
    }
}

/// [`dequantize_row`] (`BF16`: a row of [`dequantize_rows_bf16`]) into `out`, `w.cols` f32
/// (u16) values.
///
/// # Safety
/// As [`dequantize_row`] (with `BF16`, [`dequantize_rows_bf16`]); `out` is writable for the
/// row's values.
#[inline]
unsafe fn dequantize_into<const BF16: bool>(isa: Isa, w: &KilnMatrix, r: usize, out: *mut u8) {
    // Only the f32 values come from the AVX2 kernels (the bf16 GEMM needs AVX-512).
    let f32_out = || {
        // SAFETY: without `BF16`, `out` holds `w.cols` f32 values (the caller's guarantee).
        unsafe { std::slice::from_raw_parts_mut(out.cast::<f32>(), w.cols) }
    };
    if let KilnType::Lut { bits, .. } = w.ty {
        // SAFETY: the caller's guarantees are what each kernel needs.
        return unsafe {
            if BF16 || isa == Isa::Avx512Vnni {
                lut_dequantize_512::<BF16>(bits, w, r, out)
            } else {
                lut_dequantize_256(bits, w, r, f32_out())
            }
        };
    }
    let row = w.row(r);
    match w.ty {
        // SAFETY (both): AVX-512 (has_dequantize; planar rows only where
        // `crate::planar::i4_b64::supported`); `row` is row r, `out` its values.
        KilnType::I4B64 if w.planar => {
            return unsafe { i4b64_dequantize_512::<BF16, true>(row, out, w.cols) };
        }
        KilnType::I4B64 => {
            return unsafe { i4b64_dequantize_512::<BF16, false>(row, out, w.cols) };
        }
        KilnType::I8Ch => {
            let scale = kiln_types::i8_ch_scale(w.data, w.rows, w.cols, r);
            // SAFETY: as above.
            return unsafe { i8ch_dequantize_512::<BF16>(row, scale, out, w.cols) };
        }
        _ => {}
    }
    let (s, m) = {
        // SAFETY: the row starts with its 8-byte header.
        let (s, m) = unsafe { lut4b32_header(row.as_ptr()) };
        (f64::from(s), f64::from(m))
    };
    let u = w.lut4_b32_table(r);
    // SAFETY: the caller's guarantees are what each kernel needs (planar rows only where
    // `crate::planar::lut4_b32::supported`: AVX-512).
    unsafe {
        if w.planar {
            lut4b32_dequantize_planar_512::<BF16>(row, w.cols / CHUNK, u, s, m, out)
        } else if BF16 || isa == Isa::Avx512Vnni {
            lut4b32_dequantize_512::<BF16>(row, u, s, m, out, w.cols)
        } else {
            lut4b32_dequantize_256(row, u, s, m, f32_out())
        }
    }
}

/// The 16 bf16 words of a `__m256bh`.
#[inline]
fn bf16_words_256(v: __m256bh) -> __m256i {
    // SAFETY: both are plain 32-byte vectors with no invalid bit patterns.
    unsafe { std::mem::transmute::<__m256bh, __m256i>(v) }
}

/// A lookup-table row's f16 table widened to f32 (`vcvtph2ps` is exact, as kiln-format's
/// conversion is), padded to 256 entries.
///
/// # Safety
/// F16C; `t` is the row's table, at most 256 f16 entries, a multiple of 4.
#[target_feature(enable = "avx2,f16c")]
unsafe fn lut_table_f32(t: &[u8]) -> [f32; 256] {
    let mut table = [0.0f32; 256];
    for (k, e) in t.chunks_exact(8).enumerate() {
        // SAFETY: 4 entries (8 bytes) of the table in, 4 of the 256 floats out.
        unsafe {
            let h = _mm_loadl_epi64(e.as_ptr().cast());
            _mm_storeu_ps(table.as_mut_ptr().add(4 * k), _mm_cvtph_ps(h));
        }
    }
    table
}

/// Row `r` of a `bits`-bit lookup-table tensor dequantized into `out`, bit for bit as
/// kiln-format does: 8-bit rows widen their table once and gather 16 entries at a time; the
/// 2-, 4- and 6-bit rows unpack their indices in registers, as the dot-product kernels do, and
/// look the entries up with `vpermps` (`vpermt2ps` and a blend for 64 entries; planar 6-bit
/// rows look up the f16 table's byte planes, [`lut6_planar_row_512`]).
///
/// # Safety
/// AVX-512 F/BW (with `BF16`, AVX-512 BF16); `w` a lookup-table tensor of `bits` bits,
/// `r < w.rows`, `out` writable for `w.cols` values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn lut_dequantize_512<const BF16: bool>(bits: u8, w: &KilnMatrix, r: usize, out: *mut u8) {
    let tp = w.table(r).as_ptr();
    // Planar 2-bit rows: the chunks after the last whole I16 block are as stored; planar
    // 6-bit rows are planar throughout.
    let planar_chunks = match (w.planar, bits) {
        (true, 2) => w.cols / crate::activation::I16_BLOCK * (crate::activation::I16_BLOCK / CHUNK),
        (true, 6) => w.cols / CHUNK,
        _ => 0,
    };
    let chunks = w
        .row(r)
        .chunks_exact(4 * usize::from(bits))
        .enumerate()
        .map(|(j, c)| (CHUNK * j, c))
        .take(w.cols / CHUNK)
        .skip(planar_chunks);
    // Writes one chunk's 32 values.
    let store = |at: usize, w0: __m512, w1: __m512| {
        // SAFETY: the chunk's 32 values lie within the row (the caller's `out`).
        unsafe { put32::<BF16>(out, at, w0, w1) }
    };
    // SAFETY (loads): each table holds 2^bits f16 entries; each chunk holds 4·bits bytes of
    // indices.
    match bits {
        2 => {
            // SAFETY: 4 entries are 8 bytes; indices below 4 never reach the undefined upper
            // half of the register.
            let t = _mm512_castps256_ps512(_mm256_cvtph_ps(unsafe { _mm_loadl_epi64(tp.cast()) }));
            if planar_chunks > 0 {
                // SAFETY: the row is planar, of whole chunks (`KilnMatrix::new_planar`).
                unsafe { lut2_planar_blocks_512::<BF16>(w.row(r), planar_chunks, t, out) };
            }
            for (o, c) in chunks {
                // SAFETY: the chunk's 8 bytes.
                let (i0, i1) = unsafe { lut2_indices_512(c.as_ptr()) };
                store(
                    o,
                    _mm512_permutexvar_ps(i0, t),
                    _mm512_permutexvar_ps(i1, t),
                );
            }
        }
        4 if w.planar => {
            // SAFETY: 16 entries are 32 bytes.
            let t = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(tp.cast()) });
            let (row, nb) = (w.row(r), w.cols / CHUNK);
            // bf16: the table rounded once, repeated through a register of 32 words, and
            // looked up by `vpermw` (the index bytes widened to words) 32 values at a time.
            let mut tb = [0u16; 32];
            if BF16 {
                // SAFETY: 32 words.
                unsafe {
                    put16::<true>(tb.as_mut_ptr().cast(), 0, t);
                    put16::<true>(tb.as_mut_ptr().cast(), 16, t);
                }
            }
            // SAFETY: 32 words.
            let tw = unsafe { _mm512_loadu_si512(tb.as_ptr().cast()) };
            let mut idx = [0u8; 4 * CHUNK];
            let mut b = 0;
            while b < nb {
                let n = (nb - b).min(4);
                // SAFETY: chunks b..b + n of the row (a group of four or the rest after the
                // last group), their runs within its code plane; 128 bytes of `idx`.
                unsafe {
                    let at = row.as_ptr().add(CHUNK / 2 * b);
                    let (u01, u23) = match n {
                        1 => super::avx512::planar_codes4::<1>(at),
                        2 => super::avx512::planar_codes4::<2>(at),
                        3 => super::avx512::planar_codes4::<3>(at),
                        _ => super::avx512::planar_codes4::<4>(at),
                    };
                    if BF16 {
                        let halves = [
                            _mm512_castsi512_si256(u01),
                            _mm512_extracti64x4_epi64::<1>(u01),
                            _mm512_castsi512_si256(u23),
                            _mm512_extracti64x4_epi64::<1>(u23),
                        ];
                        for (k, &h) in halves.iter().enumerate().take(n) {
                            let v = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(h), tw);
                            let o = out.cast::<u16>().add(CHUNK * (b + k));
                            _mm512_storeu_si512(o.cast(), v);
                        }
                        b += n;
                        continue;
                    }
                    _mm512_storeu_si512(idx.as_mut_ptr().cast(), u01);
                    _mm512_storeu_si512(idx.as_mut_ptr().add(2 * CHUNK).cast(), u23);
                }
                for k in 0..n {
                    // SAFETY: chunk b + k's 32 indices (each below 16) and its 32 values.
                    unsafe {
                        let i = |h: usize| {
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                idx.as_ptr().add(CHUNK * k + 16 * h).cast(),
                            ))
                        };
                        store(
                            CHUNK * (b + k),
                            _mm512_permutexvar_ps(i(0), t),
                            _mm512_permutexvar_ps(i(1), t),
                        );
                    }
                }
                b += n;
            }
        }
        4 => {
            // SAFETY: 16 entries are 32 bytes.
            let t = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(tp.cast()) });
            for (o, c) in chunks {
                // SAFETY: the chunk's 16 bytes.
                let (i0, i1) = unsafe { lut4_indices_512(c.as_ptr()) };
                store(
                    o,
                    _mm512_permutexvar_ps(i0, t),
                    _mm512_permutexvar_ps(i1, t),
                );
            }
        }
        6 if planar_chunks > 0 => {
            // SAFETY: 64 f16 entries are 128 bytes.
            let words = unsafe {
                [
                    _mm512_loadu_si512(tp.cast()),
                    _mm512_loadu_si512(tp.add(64).cast()),
                ]
            };
            // SAFETY: the row is planar throughout, of whole chunks (`KilnMatrix::new_planar`);
            // VBMI (the planar layout's level).
            unsafe { lut6_planar_row_512::<BF16>(w.row(r), w.cols, &byte_planes64(&words), out) };
        }
        6 => {
            // SAFETY: 64 entries are 128 bytes.
            let t = unsafe { lut6_table_512(tp) };
            for (o, c) in chunks {
                // SAFETY: the chunk's 24 bytes.
                let (i0, i1) = unsafe { lut6_indices_512(c.as_ptr()) };
                store(o, lookup64_512(i0, &t), lookup64_512(i1, &t));
            }
        }
        // SAFETY: the caller's guarantees, and VBMI checked.
        _ if has_vbmi() => unsafe { lut8_rows_vbmi::<BF16>(w, r, 1, out, w.cols) },
        _ => {
            // SAFETY: the row's table holds 2^bits f16 entries, at most 256.
            let table = unsafe { lut_table_f32(w.table(r)) };
            let mut idx = [0u8; CHUNK];
            for (o, c) in chunks {
                kiln_types::unpack_chunk(bits, c, &mut idx);
                for h in 0..2 {
                    // SAFETY: 16 indices (each below 2^bits <= 256) into the 256-entry table,
                    // and 16 values of the chunk.
                    unsafe {
                        let i =
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(idx.as_ptr().add(16 * h).cast()));
                        let v = _mm512_i32gather_ps::<4>(i, table.as_ptr());
                        put16::<BF16>(out, o + 16 * h, v);
                    }
                }
            }
        }
    }
}

/// Rows `start..start + n` of the 8-bit lookup-table tensor `w` dequantized with the table as
/// byte planes (`vpermi2b`, see [`lookup256_vbmi`]), 64 entries per step, then widened by
/// `vcvtph2ps`; with `BF16`, the planes are of the table rounded to bf16 once, and the words
/// looked up are the values. Row `i` is at `out` plus `i · stride` values; the planes of a
/// table that consecutive rows share are made once.
///
/// # Safety
/// AVX-512 with VBMI (with `BF16`, AVX-512 BF16); `start + n <= w.rows`; `out` writable for
/// `n` rows of `stride >= w.cols` values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
unsafe fn lut8_rows_vbmi<const BF16: bool>(
    w: &KilnMatrix,
    start: usize,
    n: usize,
    out: *mut u8,
    stride: usize,
) {
    let value_bytes = if BF16 { 2 } else { 4 };
    let mut made: Option<(*const u8, BytePlanes)> = None;
    for i in 0..n {
        let t = w.table(start + i);
        let planes = match made {
            Some((at, planes)) if at == t.as_ptr() => planes,
            _ => {
                // SAFETY: a 256-entry f16 table (512 bytes); AVX-512 BF16 with `BF16` (the
                // caller's).
                let planes = unsafe {
                    if BF16 {
                        lut8_planes_bf16(t)
                    } else {
                        byte_planes(t.as_ptr())
                    }
                };
                made = Some((t.as_ptr(), planes));
                planes
            }
        };
        // SAFETY: row start + i of `w`, into its row of `out` (the caller's guarantees).
        unsafe {
            lut8_row_vbmi::<BF16>(
                &planes,
                w.row(start + i),
                w.cols,
                out.add(i * stride * value_bytes),
            )
        };
    }
}

/// Rows `start..start + n` of `w` dequantized into f32 rows `stride` values apart, each as
/// [`dequantize_row`] gives it: 8-bit lookup tables that consecutive rows share are made into
/// byte planes once (per row, that took a fifth of a 576-column row's time).
///
/// # Safety
/// As [`dequantize_row`] for every row, with `isa`'s level; `start + n <= w.rows`; `out`
/// writable for `n` rows of `stride >= w.cols` values.
pub(crate) unsafe fn dequantize_rows(
    isa: Isa,
    w: &KilnMatrix,
    start: usize,
    n: usize,
    out: *mut f32,
    stride: usize,
) {
    if isa == Isa::Avx512Vnni && matches!(w.ty, KilnType::Lut { bits: 8, .. }) && has_vbmi() {
        // SAFETY: VBMI checked, AVX-512 the caller's; the rows and `out` the caller's.
        return unsafe { lut8_rows_vbmi::<false>(w, start, n, out.cast(), stride) };
    }
    for i in 0..n {
        // SAFETY: row start + i into its `w.cols` values of `out` (the caller's).
        unsafe {
            let row = std::slice::from_raw_parts_mut(out.add(i * stride), w.cols);
            dequantize_row(isa, w, start + i, row)
        };
    }
}

/// The byte planes of an 8-bit table rounded to bf16.
///
/// # Safety
/// AVX-512 with VBMI and BF16, F16C; `t` holds 256 f16 entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,f16c")]
unsafe fn lut8_planes_bf16(t: &[u8]) -> BytePlanes {
    // SAFETY: the caller's guarantees; the rounded table is 512 bytes.
    unsafe { byte_planes(lut8_table_bf16(t).as_ptr().cast()) }
}

/// One 8-bit lookup-table row of `cols` indices looked up in `planes` (f16 entries, or with
/// `BF16` entries already rounded to bf16) into `out`.
///
/// # Safety
/// AVX-512 with VBMI; `row` holds `cols` indices, a multiple of 32; `out` is writable for
/// `cols` values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
#[inline]
unsafe fn lut8_row_vbmi<const BF16: bool>(
    planes: &BytePlanes,
    row: &[u8],
    cols: usize,
    out: *mut u8,
) {
    let planes = *planes;
    let mut c = 0;
    while c < cols {
        // 64 elements at a time, or the last 32 (rows are whole chunks of 32).
        let two = c + 2 * CHUNK <= cols;
        // SAFETY: 32 or 64 index bytes of the row from c.
        let i = unsafe { step_bytes(row.as_ptr().add(c), two) };
        let (a, b) = lookup256_vbmi(_mm512_permutexvar_epi8(VBMI_ORDER, i), &planes);
        if BF16 {
            // SAFETY: elements c .. c + 32 (and c + 32 .. c + 64 when `two`) lie within the row.
            unsafe {
                _mm512_storeu_si512(out.cast::<u16>().add(c).cast(), a);
                if two {
                    _mm512_storeu_si512(out.cast::<u16>().add(c + CHUNK).cast(), b);
                }
            }
            c += if two { 2 * CHUNK } else { CHUNK };
            continue;
        }
        let v = [
            _mm512_cvtph_ps(_mm512_castsi512_si256(a)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(a)),
            _mm512_cvtph_ps(_mm512_castsi512_si256(b)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(b)),
        ];
        for (k, vk) in v.iter().enumerate().take(if two { 4 } else { 2 }) {
            // SAFETY: elements c + 16k .. c + 16k + 16 lie within the row.
            unsafe { _mm512_storeu_ps(out.cast::<f32>().add(c + 16 * k), *vk) };
        }
        c += if two { 2 * CHUNK } else { CHUNK };
    }
}

/// An 8-bit lookup-table row's 256 f16 entries rounded to bf16 (through f32, exactly, as the
/// f32 values would be).
///
/// # Safety
/// AVX-512 F and BF16, F16C; `t` holds 256 f16 entries.
#[target_feature(enable = "avx512f,avx512bf16,avx2,f16c")]
unsafe fn lut8_table_bf16(t: &[u8]) -> [u16; 256] {
    debug_assert_eq!(t.len(), 512);
    let mut words = [0u16; 256];
    for q in 0..16 {
        // SAFETY: entries 16q .. 16q + 16 are bytes 32q .. 32q + 32 of `t`, and words 16q ..
        // 16q + 16 of `words`.
        unsafe {
            let f = _mm512_cvtph_ps(_mm256_loadu_si256(t.as_ptr().add(32 * q).cast()));
            let v = bf16_words_256(_mm512_cvtneps_pbh(f));
            _mm256_storeu_si256(words.as_mut_ptr().add(16 * q).cast(), v);
        }
    }
    words
}

/// [`lut_dequantize_512`] with AVX2 gathers of 8.
///
/// # Safety
/// AVX2 and F16C; as [`lut_dequantize_512`] otherwise.
#[target_feature(enable = "avx2,f16c")]
unsafe fn lut_dequantize_256(bits: u8, w: &KilnMatrix, r: usize, out: &mut [f32]) {
    // SAFETY: as in `lut_dequantize_512`.
    let table = unsafe { lut_table_f32(w.table(r)) };
    let mut idx = [0u8; CHUNK];
    for (o, c) in out
        .chunks_exact_mut(CHUNK)
        .zip(w.row(r).chunks_exact(4 * usize::from(bits)))
    {
        kiln_types::unpack_chunk(bits, c, &mut idx);
        for q in 0..4 {
            // SAFETY: 8 indices (each below 256) into the table, and 8 values of `o`.
            unsafe {
                let i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(idx.as_ptr().add(8 * q).cast()));
                let v = _mm256_i32gather_ps::<4>(table.as_ptr(), i);
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * q), v);
            }
        }
    }
}

/// The 16 values of one block, `(a · u[k] + b)` rounded to f32, from the table widened to f64
/// (`u0` entries 0..4, `u1` 4..8, `u2` 8..12, `u3` 12..16).
#[target_feature(enable = "avx2")]
#[inline]
fn lut4b32_values(u: &[__m256d; 4], a: f64, b: f64) -> [__m128; 4] {
    let (a, b) = (_mm256_set1_pd(a), _mm256_set1_pd(b));
    // A multiply and an add, not a fused multiply-add: the reference rounds twice in f64.
    u.map(|u| _mm256_cvtpd_ps(_mm256_add_pd(_mm256_mul_pd(a, u), b)))
}

/// The table widened to f64, four entries per register.
#[target_feature(enable = "avx2")]
#[inline]
fn lut4b32_table_f64(u: &[u8; 16]) -> [__m256d; 4] {
    std::array::from_fn(|k| {
        _mm256_setr_pd(
            f64::from(u[4 * k]),
            f64::from(u[4 * k + 1]),
            f64::from(u[4 * k + 2]),
            f64::from(u[4 * k + 3]),
        )
    })
}

/// The table widened to f64, eight entries per register.
#[target_feature(enable = "avx512f")]
#[inline]
fn lut4b32_table_f64_512(u: &[u8; 16]) -> [__m512d; 2] {
    std::array::from_fn(|h| {
        _mm512_setr_pd(
            f64::from(u[8 * h]),
            f64::from(u[8 * h + 1]),
            f64::from(u[8 * h + 2]),
            f64::from(u[8 * h + 3]),
            f64::from(u[8 * h + 4]),
            f64::from(u[8 * h + 5]),
            f64::from(u[8 * h + 6]),
            f64::from(u[8 * h + 7]),
        )
    })
}

/// An `I4_B64` row's values, `d · (q − 8)` as the reference rounds them (the difference is
/// exact, the product rounded once).
///
/// Each 16 code bytes are widened to dwords once and give 32 values, their low nibbles and
/// (shifted right by four) their high ones; [`i4_values16`] makes a nibble its float with no
/// shuffle. A planar row's scales are converted ahead, 16 at a time, and broadcast from
/// memory, which is a load where a broadcast from a register would be a shuffle.
///
/// # Safety
/// AVX-512 F/BW and F16C (with `BF16`, AVX-512 BF16); `row` is one `I4_B64` row of `n`
/// elements (planar if `PLANAR`: [`crate::planar::i4_b64`]), `out` writable for them (f32,
/// or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn i4b64_dequantize_512<const BF16: bool, const PLANAR: bool>(
    row: &[u8],
    out: *mut u8,
    n: usize,
) {
    let nb = n / I4_BLOCK;
    assert_eq!(row.len(), nb * I4_BLOCK_BYTES);
    let p = row.as_ptr();
    // SAFETY (`widen`): 16 bytes at `at` within the row (each caller's offsets below).
    let widen = |at: usize| unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(at).cast())) };
    // A block whose 32 code bytes at `at` hold elements 0..32 in their low nibbles and 32..64
    // in their high ones (every stored block; a planar row's last block when `nb` is odd).
    let single = |at: usize, d: __m512, o: usize| {
        let x = [widen(at), widen(at + 16)];
        for (h, x) in x.into_iter().enumerate() {
            // SAFETY: the block's 64 values of `out`.
            unsafe {
                put16::<BF16>(out, o + 16 * h, i4_values16::<false>(x, d));
                put16::<BF16>(out, o + 32 + 16 * h, i4_values16::<true>(x, d));
            }
        }
    };
    if !PLANAR {
        for b in 0..nb {
            // SAFETY: block b's 2-byte scale, then its 32 code bytes, lie in the row.
            let d = _mm512_set1_ps(unsafe { f16_at(p.add(b * I4_BLOCK_BYTES)) });
            single(b * I4_BLOCK_BYTES + 2, d, b * I4_BLOCK);
        }
        return;
    }
    let scale_plane = crate::planar::i4_b64::scales(nb);
    let paired = nb / 2 * 2;
    let mut scales = [0.0f32; 16];
    for b in (0..paired).step_by(2) {
        if b % 16 == 0 {
            let k = 16.min(nb - b);
            let mask: __mmask16 = if k == 16 { !0 } else { (1 << k) - 1 };
            // SAFETY: blocks b..b + k's f16 scales lie in the scale plane; the mask keeps the
            // load to them.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(mask, p.add(scale_plane + 2 * b).cast());
                _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_cvtph_ps(h));
            }
        }
        let (d0, d1) = (
            _mm512_set1_ps(scales[b % 16]),
            _mm512_set1_ps(scales[b % 16 + 1]),
        );
        // The pair's 64 code bytes: block b in their low nibbles, block b + 1 in their high
        // ones, each in element order.
        let at = (b / 2) * I4_BLOCK;
        for i in 0..4 {
            let x = widen(at + 16 * i);
            // SAFETY: the two blocks' values of `out`.
            unsafe {
                put16::<BF16>(out, b * I4_BLOCK + 16 * i, i4_values16::<false>(x, d0));
                put16::<BF16>(out, (b + 1) * I4_BLOCK + 16 * i, i4_values16::<true>(x, d1));
            }
        }
    }
    if paired < nb {
        // SAFETY: the last block's scale lies in the scale plane.
        let d = _mm512_set1_ps(unsafe { f16_at(p.add(scale_plane + 2 * paired)) });
        single(paired * (I4_BLOCK / 2), d, paired * I4_BLOCK);
    }
}

/// `d · (q − 8)` for the 16 codes `q` in the low nibbles (with `HIGH`, bits 4..8) of the dwords
/// of `x`, whose bits above 8 are zero. OR-ing the nibble into the bits of 2^23 makes the
/// float 2^23 + q exactly, and taking 2^23 + 8 from that leaves q − 8 exactly: the value the
/// reference multiplies by `d`. (A fused multiply-add `d · q − 8d` would round the same but
/// give +0 where the reference's product is −0.)
#[target_feature(enable = "avx512f")]
#[inline]
fn i4_values16<const HIGH: bool>(x: __m512i, d: __m512) -> __m512 {
    const TWO_23: i32 = 0x4b00_0000;
    let q = if HIGH { _mm512_srli_epi32::<4>(x) } else { x };
    // (q & 15) | TWO_23 in one instruction (0xEA: A & B | C).
    let f = _mm512_ternarylogic_epi32::<0xea>(q, _mm512_set1_epi32(15), _mm512_set1_epi32(TWO_23));
    _mm512_mul_ps(
        d,
        _mm512_sub_ps(_mm512_castsi512_ps(f), _mm512_set1_ps(8_388_616.0)),
    )
}

/// The values of the whole I16 blocks of a planar 2-bit row ([`crate::planar::lut2`]), the
/// first `chunks` chunks, into `out`: per step of 64 elements its two fields (each 32 words
/// in the I16 codes' order) interleaved back into element order by two `vpermt2q`, then
/// widened to dwords and looked up in `t` (the table's 4 f32 entries in lanes 0..4), or for
/// bf16 looked up as words in the table rounded once.
///
/// # Safety
/// AVX-512 F/BW (with `BF16`, AVX-512 BF16); `row` is a planar 2-bit row with `chunks / 8`
/// whole blocks, `out` writable for their values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut2_planar_blocks_512<const BF16: bool>(
    row: &[u8],
    chunks: usize,
    t: __m512,
    out: *mut u8,
) {
    const BLOCK: usize = crate::activation::I16_BLOCK;
    // Quadwords of the fields (a: 0..8, b: 8..16) in element order: elements 16j + 8h + i
    // come from word 8j + i of field h.
    // SAFETY (both): [u64; 8] and __m512i have the same size; every bit pattern is valid.
    let first = unsafe { core::mem::transmute::<[u64; 8], __m512i>([0, 1, 8, 9, 2, 3, 10, 11]) };
    let second = unsafe { core::mem::transmute::<[u64; 8], __m512i>([4, 5, 12, 13, 6, 7, 14, 15]) };
    let three = _mm512_set1_epi16(3);
    // The table in every four lanes: `vpermps` reads four bits of an index below 4.
    let t = _mm512_shuffle_f32x4::<0>(t, t);
    // bf16: the table rounded once, in every four of 32 words (`vpermw` reads five bits).
    let mut tb = [0u16; 32];
    if BF16 {
        // SAFETY: 32 words.
        unsafe {
            put16::<true>(tb.as_mut_ptr().cast(), 0, t);
            put16::<true>(tb.as_mut_ptr().cast(), 16, t);
        }
    }
    // SAFETY: 32 words.
    let tw = unsafe { _mm512_loadu_si512(tb.as_ptr().cast()) };
    debug_assert!(chunks.is_multiple_of(BLOCK / CHUNK) && row.len() >= chunks * 8);
    for b in 0..chunks / (BLOCK / CHUNK) {
        // SAFETY: the block's 64 bytes.
        let v = unsafe { _mm512_loadu_si512(row.as_ptr().add(b * (BLOCK / 4)).cast()) };
        let fields = [
            v,
            _mm512_srli_epi16::<2>(v),
            _mm512_srli_epi16::<4>(v),
            _mm512_srli_epi16::<6>(v),
            _mm512_srli_epi16::<8>(v),
            _mm512_srli_epi16::<10>(v),
            _mm512_srli_epi16::<12>(v),
            _mm512_srli_epi16::<14>(v),
        ];
        for step in 0..4 {
            let (a, h) = (
                _mm512_and_si512(fields[2 * step], three),
                _mm512_and_si512(fields[2 * step + 1], three),
            );
            for (k, idx) in [first, second].into_iter().enumerate() {
                let words = _mm512_permutex2var_epi64(a, idx, h);
                let at = b * BLOCK + 64 * step + 32 * k;
                if BF16 {
                    let v = _mm512_permutexvar_epi16(words, tw);
                    // SAFETY: the step's 32 words from `at` lie within the blocks (the
                    // caller's `out`).
                    unsafe { _mm512_storeu_si512(out.cast::<u16>().add(at).cast(), v) };
                    continue;
                }
                let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(words));
                let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(words));
                // SAFETY: the step's 32 values from here lie within the blocks (the caller's
                // `out`).
                unsafe {
                    put32::<BF16>(
                        out,
                        at,
                        _mm512_permutexvar_ps(lo, t),
                        _mm512_permutexvar_ps(hi, t),
                    )
                };
            }
        }
    }
}

/// The values of a planar 6-bit row ([`crate::planar::lut6`]) of `cols` elements: each step's
/// index bytes ([`lut6_planar_indices`], [`lut6_planar_tail_indices`]: element order) look up
/// the f16 table's byte planes (`planes`, [`byte_planes64`]) with one `vpermb` each, a byte
/// interleave joins the halves into f16 values in order, and those widen to f32.
///
/// Per 64 values that is 10 operations on the shuffle port (two `vpermb`, two interleaves, two
/// extracts and four conversions' halves) where looking up the f32 table took about 20 (per
/// 16: a widening of the index bytes, two `vpermt2ps`, a bit test, an extract). The values are
/// the same: f16 to f32 is exact.
///
/// # Safety
/// AVX-512 F/BW and VBMI (with `BF16`, AVX-512 BF16); `row` is a planar 6-bit row of `cols`
/// elements (whole chunks), `out` writable for its values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
#[inline]
unsafe fn lut6_planar_row_512<const BF16: bool>(
    row: &[u8],
    cols: usize,
    planes: &[__m512i; 2],
    out: *mut u8,
) {
    const BLOCK: usize = crate::activation::I16_BLOCK;
    assert!(cols.is_multiple_of(CHUNK) && row.len() >= cols / CHUNK * 24);
    // `n` values from element `at` (32 per half of the index bytes `i`).
    let put = |at: usize, i: __m512i, n: usize| {
        let words = words_of_planes64(&[
            _mm512_permutexvar_epi8(i, planes[0]),
            _mm512_permutexvar_epi8(i, planes[1]),
        ]);
        for (half, words) in words.into_iter().enumerate().take(n / CHUNK) {
            // SAFETY: the 32 values from `at + 32 half` lie within the row (the caller's
            // `out`).
            unsafe {
                put32::<BF16>(
                    out,
                    at + CHUNK * half,
                    _mm512_cvtph_ps(_mm512_castsi512_si256(words)),
                    _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(words)),
                )
            };
        }
    };
    for (start, n) in crate::planar::lut6::parts(cols) {
        let bp = row[start / CHUNK * 24..].as_ptr();
        // SAFETY (all): the part's bytes lie within the row (its length, asserted).
        if n == BLOCK {
            unsafe {
                put(start, lut6_planar_indices::<0>(bp), 64);
                put(start + 64, lut6_planar_indices::<1>(bp), 64);
                put(start + 128, lut6_planar_indices::<2>(bp), 64);
                put(start + 192, lut6_planar_indices::<3>(bp), 64);
            }
        } else if n == 64 {
            put(start, unsafe { lut6_planar_tail_indices::<64>(bp) }, 64);
        } else {
            put(start, unsafe { lut6_planar_tail_indices::<32>(bp) }, 32);
        }
    }
}

/// An `I8_CH` row's values, `scale · c`.
///
/// # Safety
/// AVX-512 F/BW (with `BF16`, AVX-512 BF16); `row` is one `I8_CH` row of `n` codes, `out`
/// writable for `n` values (f32, or u16 with `BF16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn i8ch_dequantize_512<const BF16: bool>(row: &[u8], scale: f32, out: *mut u8, n: usize) {
    let s = _mm512_set1_ps(scale);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: codes and values i..i + 16.
        unsafe {
            let c = _mm512_cvtepi8_epi32(_mm_loadu_si128(row.as_ptr().add(i).cast()));
            put16::<BF16>(out, i, _mm512_mul_ps(s, _mm512_cvtepi32_ps(c)));
        }
        i += 16;
    }
    for (j, &c) in row[..n].iter().enumerate().skip(i) {
        // SAFETY: value j < n.
        unsafe { put1::<BF16>(out, j, scale * f32::from(c as i8)) };
    }
}

/// The 16 values of one block, `(a · u[k] + b)` rounded to f32, in one register: a fused
/// multiply-add in f64 rounds as the reference's multiply and add do, because `a · u[k]` (an
/// f32 unit times a code of 8 bits times an entry of 7) is exact in f64.
#[target_feature(enable = "avx512f")]
#[inline]
fn lut4b32_values_512(u: &[__m512d; 2], a: f64, b: f64) -> __m512 {
    let (a, b) = (_mm512_set1_pd(a), _mm512_set1_pd(b));
    let lo = _mm512_cvtpd_ps(_mm512_fmadd_pd(a, u[0], b));
    let hi = _mm512_cvtpd_ps(_mm512_fmadd_pd(a, u[1], b));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castps_pd(_mm512_castps256_ps512(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// A planar `LUT4_B32` row's values ([`crate::planar::lut4_b32`]): whole groups of four
/// blocks by [`lut4b32_planar_groups_512`], the blocks after the last group one at a time.
///
/// # Safety
/// AVX-512 F (with `BF16`, AVX-512 BF16); `row` is one planar `LUT4_B32` row
/// ([`crate::planar::lut4_b32`]) of `nb` blocks, `out` writable for its `32 · nb` values (f32,
/// or u16 with `BF16`), `u` its table.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_dequantize_planar_512<const BF16: bool>(
    row: &[u8],
    nb: usize,
    u: &[u8; 16],
    s: f64,
    m: f64,
    out: *mut u8,
) {
    let uf = lut4b32_table_f64_512(u);
    let params = crate::planar::lut4_b32::params(nb);
    assert!(row.len() >= params + 2 * nb);
    // SAFETY: the row's length was asserted; `out` holds the row's values.
    unsafe { lut4b32_planar_groups_512::<BF16>(row, nb, &uf, s, m, out) };
    // The blocks after the last whole group.
    let codes = row[LUT4_B32_ROW_HEADER..].as_ptr();
    for b in nb / 4 * 4..nb {
        let (a, o) = crate::planar::lut4_b32::param_slots(nb, b);
        let v = lut4b32_values_512(
            &uf,
            s * f64::from(row[params + a] as i8),
            m * f64::from(row[params + o] as i8),
        );
        // SAFETY: block b's 16 index bytes lie in the code plane (the row's length, asserted),
        // and its 32 values in `out`.
        unsafe { lut4b32_block_512::<BF16>(codes.add((CHUNK / 2) * b), v, out, b * CHUNK) };
    }
}

/// The values of a planar `LUT4_B32` row's whole groups of four blocks.
///
/// The shuffle port is what limits this loop, so work moves off it where it can:
/// - a group's four scale and four offset codes become their f64 multipliers in one vector,
///   stored for a chunk of groups ahead, and each block's two multipliers are broadcast from
///   there (a broadcast from memory is a load; from a register it is a shuffle);
/// - a block's 16 index bytes are widened to dwords once and serve both its halves
///   ([`lut4b32_block_512`]).
///
/// # Safety
/// As [`lut4b32_dequantize_planar_512`], whose caller asserted the row's length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_planar_groups_512<const BF16: bool>(
    row: &[u8],
    nb: usize,
    uf: &[__m512d; 2],
    s: f64,
    m: f64,
    out: *mut u8,
) {
    // Groups whose multipliers are made ahead of their lookups (a 512-byte stack buffer).
    const AHEAD: usize = 8;
    let groups = nb / 4;
    let params = crate::planar::lut4_b32::params(nb);
    debug_assert!(row.len() >= params + 2 * nb);
    let codes = row[LUT4_B32_ROW_HEADER..].as_ptr();
    let units = _mm512_setr_pd(s, s, s, s, m, m, m, m);
    let mut mult = [0.0f64; 8 * AHEAD];
    let mut g0 = 0;
    while g0 < groups {
        let n = AHEAD.min(groups - g0);
        for g in 0..n {
            // SAFETY: group g0 + g's 8 parameter codes (4 scales, then 4 offsets) lie in the
            // row's parameter plane; `mult` holds AHEAD groups of 8.
            unsafe {
                let c = _mm_loadl_epi64(row.as_ptr().add(params + 8 * (g0 + g)).cast());
                let v = _mm512_cvtepi32_pd(_mm256_cvtepi8_epi32(c));
                _mm512_storeu_pd(mult.as_mut_ptr().add(8 * g), _mm512_mul_pd(v, units));
            }
        }
        for g in 0..n {
            for k in 0..4 {
                let b = 4 * (g0 + g) + k;
                let v = lut4b32_values_512(uf, mult[8 * g + k], mult[8 * g + 4 + k]);
                // SAFETY: block b's 16 index bytes lie in the code plane, its 32 values in
                // the row's.
                unsafe { lut4b32_block_512::<BF16>(codes.add((CHUNK / 2) * b), v, out, b * CHUNK) };
            }
        }
        g0 += n;
    }
}

/// One `LUT4_B32` block's 32 values into elements `at..at + 32` of `out`: its 16 index bytes
/// at `idx` (element `j` in the low nibble of byte `j`, `j + 16` in its high one, in stored
/// and planar rows alike) looked up in `v`, its 16 values. `vpermps` reads an index's low four
/// bits only, so the widened bytes need no mask.
///
/// # Safety
/// AVX-512 F (with `BF16`, AVX-512 BF16); 16 bytes are readable at `idx` and elements
/// `at..at + 32` of `out` (f32, or u16 with `BF16`) are writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut4b32_block_512<const BF16: bool>(idx: *const u8, v: __m512, out: *mut u8, at: usize) {
    // SAFETY: the caller's guarantees.
    unsafe {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(idx.cast()));
        let w0 = _mm512_permutexvar_ps(q, v);
        let w1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), v);
        put32::<BF16>(out, at, w0, w1);
    }
}

/// # Safety
/// AVX-512 F (with `BF16`, AVX-512 BF16); `row` is one `LUT4_B32` row of `n` elements, `out`
/// writable for them (f32, or u16 with `BF16`), `u` its table.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn lut4b32_dequantize_512<const BF16: bool>(
    row: &[u8],
    u: &[u8; 16],
    s: f64,
    m: f64,
    out: *mut u8,
    n: usize,
) {
    let uf = lut4b32_table_f64_512(u);
    for (o, blk) in (0..n)
        .step_by(CHUNK)
        .zip(row[LUT4_B32_ROW_HEADER..].chunks_exact(LUT4_B32_BLOCK_BYTES))
    {
        let a = s * f64::from(blk[0] as i8);
        let b = m * f64::from(blk[1] as i8);
        let v = lut4b32_values_512(&uf, a, b);
        // SAFETY: the block's 16 index bytes, and its 32 values of `out`.
        unsafe { lut4b32_block_512::<BF16>(blk.as_ptr().add(2), v, out, o) };
    }
}

/// # Safety
/// AVX2; `row` is one `LUT4_B32` row of `out.len()` elements, `u` its table.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut4b32_dequantize_256(row: &[u8], u: &[u8; 16], s: f64, m: f64, out: &mut [f32]) {
    let uf = lut4b32_table_f64(u);
    let low = _mm256_set1_epi32(0x0f);
    for (o, blk) in out
        .chunks_exact_mut(CHUNK)
        .zip(row[LUT4_B32_ROW_HEADER..].chunks_exact(LUT4_B32_BLOCK_BYTES))
    {
        let a = s * f64::from(blk[0] as i8);
        let b = m * f64::from(blk[1] as i8);
        let [v0, v1, v2, v3] = lut4b32_values(&uf, a, b);
        let lo = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(v0), v1);
        let hi = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(v2), v3);
        for half in 0..2 {
            // SAFETY: 8 of the block's 16 index bytes, and 16 values of `o`.
            unsafe {
                let q = _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * half).cast());
                let q = _mm256_cvtepu8_epi32(q);
                for (k, idx) in [_mm256_and_si256(q, low), _mm256_srli_epi32::<4>(q)]
                    .into_iter()
                    .enumerate()
                {
                    // Bit 3 of the index picks the upper eight entries.
                    let pick = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                    let w = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(lo, idx),
                        _mm256_permutevar8x32_ps(hi, idx),
                        pick,
                    );
                    _mm256_storeu_ps(o.as_mut_ptr().add(16 * k + 8 * half), w);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lookup tables

/// The 32 indices of a 2-bit lookup-table chunk (the 8 bytes at `p`) as two registers of 16:
/// elements 0..16 and 16..32. Byte j holds elements j + 8k at bits 2k, so two copies of the 8
/// bytes shifted by 0 and 2 give elements 0..16, by 4 and 6 elements 16..32.
///
/// # Safety
/// AVX-512 F/BW; 8 bytes readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut2_indices_512(p: *const u8) -> (__m512i, __m512i) {
    let shift_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let shift_hi = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    let three = _mm512_set1_epi32(3);
    // SAFETY: the caller's 8 bytes.
    let b = unsafe { _mm_loadl_epi64(p.cast()) };
    let b = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, b));
    (
        _mm512_and_si512(_mm512_srlv_epi32(b, shift_lo), three),
        _mm512_and_si512(_mm512_srlv_epi32(b, shift_hi), three),
    )
}

/// The 32 indices of a 4-bit lookup-table chunk (the 16 bytes at `p`: low nibbles elements
/// 0..16, high nibbles 16..32) as two registers of 16.
///
/// # Safety
/// AVX-512 F; 16 bytes readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut4_indices_512(p: *const u8) -> (__m512i, __m512i) {
    // SAFETY: the caller's 16 bytes.
    let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) });
    (
        _mm512_and_si512(b, _mm512_set1_epi32(0x0f)),
        _mm512_srli_epi32::<4>(b),
    )
}

/// The 32 indices of a 6-bit lookup-table chunk (the 24 bytes at `p`: the low nibbles laid out
/// as a 4-bit chunk, then the top two bits as a 2-bit one) as two registers of 16.
///
/// # Safety
/// AVX-512 F/BW; 24 bytes readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn lut6_indices_512(p: *const u8) -> (__m512i, __m512i) {
    let top = _mm512_set1_epi32(0x30);
    // The top bits shifted left by 4 first: a right shift by 2k then leaves element j + 8k's
    // two bits at bits 4..6 (the shifts of `lut2_indices_512`).
    let shift_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let shift_hi = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    // SAFETY: the caller's 24 bytes: 16 of nibbles, then 8 of top bits.
    let ((l0, l1), h) = unsafe { (lut4_indices_512(p), _mm_loadl_epi64(p.add(16).cast())) };
    let h = _mm512_slli_epi32::<4>(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(h, h)));
    (
        _mm512_or_si512(l0, _mm512_and_si512(_mm512_srlv_epi32(h, shift_lo), top)),
        _mm512_or_si512(l1, _mm512_and_si512(_mm512_srlv_epi32(h, shift_hi), top)),
    )
}

/// Entries `i` (0..64) of a 64-entry table held in four registers of 16.
#[target_feature(enable = "avx512f")]
#[inline]
fn lookup64_512(i: __m512i, t: &[__m512; 4]) -> __m512 {
    // vpermt2ps picks from 32 entries by the index's low five bits; bit 5 picks the pair.
    let lo = _mm512_permutex2var_ps(t[0], i, t[1]);
    let hi = _mm512_permutex2var_ps(t[2], i, t[3]);
    _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), lo, hi)
}

/// A 64-entry f16 table (128 bytes at `t`) widened to f32, 16 entries per register.
///
/// # Safety
/// AVX-512 F; 128 bytes readable at `t`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn lut6_table_512(t: *const u8) -> [__m512; 4] {
    // SAFETY: entries 16q .. 16q + 16 are the caller's bytes 32q .. 32q + 32.
    std::array::from_fn(|q| _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(t.add(32 * q).cast()) }))
}

// ---------------------------------------------------------------------------------------------
// Lookup tables against I16 activations
//
// These multiply 16-bit integer weights (the table as `lut_table_i16` makes it, once per call
// and table) with 14-bit activation codes ([`ActivationFormat::I16`]), which are stored in the
// order the lookups below produce their words, so nothing is shuffled between a lookup and
// `vpdpwssd`. Each 256-element activation block's 32-bit sums are converted and scaled once;
// the table's scale applies at the end.
//
// - `LUT8` (VBMI): the table's byte planes (low bytes in four registers, high bytes in four),
//   `vpermi2b` twice per plane and a byte blend on the index's top bit, then
//   `vpunpcklbw` / `vpunpckhbw` to words: 64 weights in two registers.
// - `LUT6` (VBMI): the 64 words of the table in two registers, picked by `vpermi2w`. One
//   `vpermi2b` gathers each word's index bytes from the 48 index bytes of 64 elements and the
//   same shifted right by four: its nibble (from the shifted copy for a high nibble) and its
//   top-bits byte; a variable shift lines the top bits up and a bit select joins the two
//   (`vpermi2w` reads the low six bits only). Planar rows ([`crate::planar::lut6`]) give each
//   whole block's 64 indices in element order with one bit select, looked up as `LUT4`'s
//   planar rows were, in the table's byte planes (64 entries fill a register): two `vpermb`
//   and two byte interleaves per 64 weights.
// - `LUT4` / `LUT2` (VBMI): the table's 16 (4) words repeated through one register, so every
//   row of a tile keeps its own. Per 32 weights one `vpermb` puts each word's index byte in
//   both its bytes, a variable word shift brings the index down to bit 0, and `vpermw` looks
//   it up: it reads the low five bits, and the bits above the index, its neighbours', pick
//   a copy of the same entry. Per 64 weights: one load, six shuffles and shifts, and two
//   `vpdpwssd` per activation row, where the f32 kernel took two widening loads, four index
//   masks or shifts, four `vpermps` and four multiply-adds per activation row.
// - `LUT4` / `LUT2` without VBMI, and on AVX2: each row's table as byte planes, `vpshufb`
//   and `vpunpck{l,h}bw` to words, `vpmaddwd` ([`lut_small_i16_256`]).
// - `LUT6` / `LUT8` without VBMI, and on AVX2: the activations dequantized to f32 once per call
//   and the table's integers widened to f32, gathered and multiplied in f32 (the table's scale
//   at the end).

/// Calls `f(r, n, t, m)` for every tile of `n` rows from `r` (4, or 1 at the end) by `m`
/// activation rows from `t` (2, or 1 at the end) within `rows` × `0..n_act`, rows outermost.
#[inline(always)]
fn for_tiles(rows: Range<usize>, n_act: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut r = rows.start;
    while r < rows.end {
        let n = if r + TILE_ROWS <= rows.end {
            TILE_ROWS
        } else {
            1
        };
        let mut t = 0;
        while t < n_act {
            let m = if t + 2 <= n_act { 2 } else { 1 };
            f(r, n, t, m);
            t += m;
        }
        r += n;
    }
}

/// [`crate::kiln_formats::lut_table_i16`] with AVX2, bit for bit (the same IEEE products and
/// round-to-nearest-even; the scalar version's max and min are exact too).
///
/// # Safety
/// AVX2 and F16C; `table` holds 64 or 256 f16 entries and `u` at least as many.
#[target_feature(enable = "avx2,f16c")]
unsafe fn lut_table_i16_256(table: &[u8], u: &mut [i16]) -> f32 {
    let n = table.len() / 2;
    debug_assert!(n.is_multiple_of(16) && u.len() >= n);
    let tp = table.as_ptr();
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let mut m = _mm256_setzero_ps();
    for k in (0..n).step_by(8) {
        // SAFETY: entries k..k + 8 of the table.
        let t = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(tp.add(2 * k).cast()) });
        m = _mm256_max_ps(m, _mm256_and_ps(t, abs));
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = lanes.iter().fold(0.0f32, |a, &v| a.max(v));
    let entry_max = f32::from(crate::kiln_formats::LUT_I16_ENTRY_MAX);
    let s = amax / entry_max;
    if s.is_nan() || s <= 0.0 {
        u[..n].fill(0);
        return s;
    }
    let inv = _mm256_set1_ps(entry_max / amax);
    let max = _mm256_set1_ps(entry_max);
    let min = _mm256_sub_ps(_mm256_setzero_ps(), max);
    for k in (0..n).step_by(16) {
        // SAFETY: entries k..k + 16 of the table in, 16 words of `u` out.
        unsafe {
            let q = [0, 8].map(|h| {
                let t = _mm256_cvtph_ps(_mm_loadu_si128(tp.add(2 * (k + h)).cast()));
                let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(t, inv),
                );
                _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(q, min), max))
            });
            // packs works per 128-bit lane; the 64-bit permute puts the words back in order.
            let w = _mm256_permute4x64_epi64::<0xd8>(_mm256_packs_epi32(q[0], q[1]));
            _mm256_storeu_si256(u.as_mut_ptr().add(k).cast(), w);
        }
    }
    s
}

/// [`lut_table_i16_256`] with AVX-512, for the kernels that convert a table per group of
/// rows: bit for bit the same (`vcvtps2dq` rounds to nearest-even under the default MXCSR).
///
/// # Safety
/// AVX-512 F/BW and F16C; `table` holds 64 or 256 f16 entries and `u` at least as many.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn lut_table_i16_512(table: &[u8], u: &mut [i16]) -> f32 {
    let n = table.len() / 2;
    debug_assert!(n.is_multiple_of(16) && u.len() >= n);
    let tp = table.as_ptr();
    let mut m = _mm512_setzero_ps();
    for k in (0..n).step_by(16) {
        // SAFETY: entries k..k + 16 of the table.
        let t = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(tp.add(2 * k).cast()) });
        m = _mm512_max_ps(m, _mm512_abs_ps(t));
    }
    let amax = _mm512_reduce_max_ps(m);
    let entry_max = crate::kiln_formats::LUT_I16_ENTRY_MAX;
    let s = amax / f32::from(entry_max);
    if s.is_nan() || s <= 0.0 {
        u[..n].fill(0);
        return s;
    }
    let inv = _mm512_set1_ps(f32::from(entry_max) / amax);
    let (lo, hi) = (
        _mm512_set1_epi32(-i32::from(entry_max)),
        _mm512_set1_epi32(i32::from(entry_max)),
    );
    for k in (0..n).step_by(16) {
        // SAFETY: entries k..k + 16 of the table in, 16 words of `u` out.
        unsafe {
            let t = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(2 * k).cast()));
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(t, inv));
            let q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            _mm256_storeu_si256(u.as_mut_ptr().add(k).cast(), _mm512_cvtepi32_epi16(q));
        }
    }
    s
}

/// # Safety
/// As [`dot_block`], `w` a lookup-table tensor (so every `xq[t]` is I16).
unsafe fn lut_i16_dot_block(
    isa: Isa,
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    let bits = w.ty.table_len().trailing_zeros();
    let group = w.rows_per_table();
    let native = isa == Isa::Avx512Vnni && has_vbmi();
    if bits <= 4 {
        // SAFETY: the caller's guarantees; VBMI where `native` (checked), AVX2 at either level.
        return unsafe {
            match (native, bits) {
                (true, 4) => lut_small_dot_block::<4>(w, rows, xq, out, out_stride),
                (true, _) => lut_small_dot_block::<2>(w, rows, xq, out, out_stride),
                (false, 4) => lut_small_dot_block_256::<4>(w, rows, xq, out, out_stride),
                (false, _) => lut_small_dot_block_256::<2>(w, rows, xq, out, out_stride),
            }
        };
    }
    let base = rows.start;
    F32_ROWS.with(|cell| {
        let mut f32_rows = cell.borrow_mut();
        if !native {
            if f32_rows.len() < xq.len() {
                f32_rows.resize_with(xq.len(), QuantizedRow::new);
            }
            for (x, f) in xq.iter().zip(f32_rows.iter_mut()) {
                x.dequantize_to_f32(f);
            }
        }
        let mut r = rows.start;
        while r < rows.end {
            let seg = r..((r / group + 1) * group).min(rows.end);
            let mut u = [0i16; 256];
            // The table as converted ahead, or converted here.
            let converted = if native {
                w.converted_table(r / group)
            } else {
                None
            };
            let s = match converted {
                Some((_, s)) => s,
                // SAFETY: the CPU has AVX-512 when `native`, AVX2 and F16C at either level;
                // the table holds 64 or 256 entries.
                None => unsafe {
                    if native {
                        lut_table_i16_512(w.table(r), &mut u)
                    } else {
                        lut_table_i16_256(w.table(r), &mut u)
                    }
                },
            };
            // Every tile below: its rows and activation rows exist, the rest is the caller's
            // guarantee; the kernels' features are the level's.
            match (native, bits) {
                (true, 8) => {
                    // SAFETY: 256 words are 512 bytes, and so are the converted planes.
                    let planes = unsafe {
                        match converted {
                            Some((p, _)) => load_planes(p),
                            None => byte_planes(u.as_ptr().cast()),
                        }
                    };
                    if xq.len() == 1 {
                        let o = &mut out[seg.start - base..seg.end - base];
                        // SAFETY: the rows of `seg` share these planes; the rest is as above.
                        unsafe { lut8_rows_512(w, seg.clone(), &planes, s, &xq[0], o) };
                    } else {
                        run_tiles!(seg.clone(), xq, out, out_stride, base, |r| lut8_i16_512(
                            w, r, &planes, s
                        ));
                    }
                }
                (true, _) => {
                    // SAFETY: 64 words are 128 bytes, and so are the converted planes;
                    // AVX-512 where `native`.
                    let (table, planes) = unsafe {
                        match converted {
                            Some((p, _)) => {
                                let planes = load_planes(p);
                                (words_of_planes64(&planes), planes)
                            }
                            None => {
                                let table = [
                                    _mm512_loadu_si512(u.as_ptr().cast()),
                                    _mm512_loadu_si512(u.as_ptr().add(32).cast()),
                                ];
                                (table, byte_planes64(&table))
                            }
                        }
                    };
                    if w.planar {
                        run_tiles!(seg.clone(), xq, out, out_stride, base, |r| lut6_i16_512<true>(
                            w, r, &table, &planes, s
                        ));
                    } else {
                        run_tiles!(seg.clone(), xq, out, out_stride, base, |r| lut6_i16_512<false>(
                            w, r, &table, &planes, s
                        ));
                    }
                }
                (false, _) => {
                    let mut table = [0.0f32; 256];
                    for (t, &v) in table.iter_mut().zip(&u) {
                        *t = f32::from(v);
                    }
                    let xs = &f32_rows[..xq.len()];
                    if bits == 8 {
                        run_tiles!(seg.clone(), xs, out, out_stride, base, |r| lut8_256(
                            w, r, &table, s
                        ));
                    } else {
                        run_tiles!(seg.clone(), xs, out, out_stride, base, |r| lut6_256(
                            w, r, &table, s
                        ));
                    }
                }
            }
            r = seg.end;
        }
    });
}

thread_local! {
    /// The I16 activation rows of a call dequantized to f32, for the kernels without integer
    /// lookups.
    static F32_ROWS: std::cell::RefCell<Vec<QuantizedRow>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Adds an I16 block's integer sums to the tile's f32 sums, each times its activation row's
/// scale for block `b`: what every kernel on I16 activations does at the end of a block.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_i16_block<const R: usize, const T: usize>(
    acc: &mut [[__m512; T]; R],
    sums: &[[__m512i; T]; R],
    xs: &[&QuantizedRow; T],
    b: usize,
) {
    for t in 0..T {
        let d = _mm512_set1_ps(xs[t].scales[b]);
        for r in 0..R {
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][t]), d, acc[r][t]);
        }
    }
}

/// The tile's products: each row's sums added up and times its table's scale `s[r]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn scaled_tile_sums<const R: usize, const T: usize>(
    acc: &[[__m512; T]; R],
    s: &[f32],
) -> [[f32; T]; R] {
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s[r] * _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// One step of `n` elements (64, or the last 32 of a row) of a 6- or 8-bit row against the
/// I16 codes from `c`: the codes as the two registers of words the lookups pair them with
/// (the second half of the group's codes in the second; a 32-element step fills the lower
/// half of each, the rest zero).
///
/// # Safety
/// AVX-512 BW; codes `c..c + n` exist.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn i16_codes_512(x: &QuantizedRow, c: usize, two: bool) -> (__m512i, __m512i) {
    let p = x.wide.as_ptr();
    // SAFETY: codes c..c + 64 (c + 32 without `two`; masked-off words are not read).
    unsafe {
        if two {
            (
                _mm512_loadu_si512(p.add(c).cast()),
                _mm512_loadu_si512(p.add(c + 32).cast()),
            )
        } else {
            (
                _mm512_maskz_loadu_epi16(0xffff, p.add(c).cast()),
                _mm512_maskz_loadu_epi16(0xffff, p.add(c + 16).cast()),
            )
        }
    }
}

/// The 64 bytes at `p` when `two`, else the 32 there and 32 zeros: a step of a row's bytes.
/// A whole step is a plain load, because the masked one costs a vector-port operation as
/// well on Intel cores, where the lookup kernels' shuffles already wait.
///
/// # Safety
/// AVX-512 BW; the bytes exist.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn step_bytes(p: *const u8, two: bool) -> __m512i {
    // SAFETY: the caller's guarantee; the masked load reads only the first 32 bytes.
    unsafe {
        if two {
            _mm512_loadu_si512(p.cast())
        } else {
            _mm512_maskz_loadu_epi8(u64::from(u32::MAX), p.cast())
        }
    }
}

/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` an 8-bit lookup-table tensor whose rows
/// `r0..r0 + R` share the table `planes` (of `lut_table_i16`, scale `s`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut8_i16_512<const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    planes: &BytePlanes,
    s: f32,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    let mut start = 0;
    while start < w.cols {
        let end = (start + crate::activation::I16_BLOCK).min(w.cols);
        let mut sums = [[_mm512_setzero_si512(); T]; R];
        let mut c = start;
        while c < end {
            let two = c + 2 * CHUNK <= end;
            let mut xv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
            for t in 0..T {
                // SAFETY: the block's codes from c.
                xv[t] = unsafe { i16_codes_512(xs[t], c, two) };
            }
            for r in 0..R {
                let ip = p.wrapping_add(r * rb + c);
                prefetch_weights(ip, ahead);
                // SAFETY: 32 or 64 index bytes of row r0 + r from c.
                let i = unsafe { step_bytes(ip, two) };
                // The words come in the codes' order; zeroed indices meet zeroed codes.
                let (lo, hi) = lookup256_vbmi(i, planes);
                for t in 0..T {
                    sums[r][t] = dpwssd(sums[r][t], lo, xv[t].0);
                    sums[r][t] = dpwssd(sums[r][t], hi, xv[t].1);
                }
            }
            c += if two { 2 * CHUNK } else { CHUNK };
        }
        add_i16_block(&mut acc, &sums, &xs, b);
        b += 1;
        start = end;
    }
    scaled_tile_sums(&acc, &[s; R])
}

/// `out[i] = row (rows.start + i) · x` for one activation row of an 8-bit lookup-table tensor
/// whose `rows` share the table `planes` (scale `s`), a row at a time: one weight stream, which
/// the hardware prefetchers follow better than a tile's four (as for `I8_CH`), with the
/// lookups' two halves summed into two named registers, two steps at a time. On a Zen 4 host,
/// whose L3 no model fits, SmolLM2 `lut8` decodes at 160 → 177 tok/s with two threads, Gemma 3
/// 96 → 101 (1.02–1.04x with one); from L2 the tiles stay ahead (`kilnbench`, k 1536: 0.0385
/// against 0.0445 ns/w), which a model never reads from (`docs/quantization.md`).
///
/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`] with one activation row `x`; `out` holds
/// `rows.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut8_rows_512(
    w: &KilnMatrix,
    rows: Range<usize>,
    planes: &BytePlanes,
    s: f32,
    x: &QuantizedRow,
    out: &mut [f32],
) {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    for (i, r) in rows.enumerate() {
        let p = w.data[r * rb..].as_ptr();
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        let mut start = 0;
        while start < w.cols {
            let end = (start + crate::activation::I16_BLOCK).min(w.cols);
            let (mut lo_sum, mut hi_sum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            let mut c = start;
            while c + 4 * CHUNK <= end {
                let ip = p.wrapping_add(c);
                prefetch_weights(ip, ahead);
                prefetch_weights(ip.wrapping_add(2 * CHUNK), ahead);
                // SAFETY: 128 index bytes of row r from c, and the activation codes there.
                let (i0, x0, i1, x1) = unsafe {
                    (
                        step_bytes(ip, true),
                        i16_codes_512(x, c, true),
                        step_bytes(ip.wrapping_add(2 * CHUNK), true),
                        i16_codes_512(x, c + 2 * CHUNK, true),
                    )
                };
                let (lo0, hi0) = lookup256_vbmi(i0, planes);
                let (lo1, hi1) = lookup256_vbmi(i1, planes);
                lo_sum = dpwssd(dpwssd(lo_sum, lo0, x0.0), lo1, x1.0);
                hi_sum = dpwssd(dpwssd(hi_sum, hi0, x0.1), hi1, x1.1);
                c += 4 * CHUNK;
            }
            while c < end {
                let two = c + 2 * CHUNK <= end;
                let ip = p.wrapping_add(c);
                prefetch_weights(ip, ahead);
                // SAFETY: 32 or 64 index bytes of row r from c, and the activation codes there.
                let (i, xv) = unsafe { (step_bytes(ip, two), i16_codes_512(x, c, two)) };
                // The words come in the codes' order; zeroed indices meet zeroed codes.
                let (lo, hi) = lookup256_vbmi(i, planes);
                lo_sum = dpwssd(lo_sum, lo, xv.0);
                hi_sum = dpwssd(hi_sum, hi, xv.1);
                c += if two { 2 * CHUNK } else { CHUNK };
            }
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum, hi_sum));
            acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(x.scales[b]), acc);
            b += 1;
            start = end;
        }
        out[i] = s * _mm512_reduce_add_ps(acc);
    }
}

/// `vpermi2b` indices and shift counts that turn the index bytes of one step of a 6-bit row
/// (and the same bytes shifted right by four) into the words of half `h` of the step, in the
/// I16 codes' order: word `q` takes its element's nibble at bits 0..4 of its low byte (from
/// the shifted bytes for a high nibble), and its top-bits byte as its high byte; shifted
/// right by the count, the two top bits land at bits 4..6. `n` is the step (64 elements: 48
/// bytes, two 32-element chunks of 24; or 32).
const fn lut6_step(n: usize, h: usize) -> ([u8; 64], [u16; 32]) {
    let mut bytes = [0u8; 64];
    let mut top = [0u16; 32];
    let mut q = 0;
    while q < n / 2 {
        let e = crate::activation::i16_element(h * n / 2 + q, n);
        let (chunk, j) = (e / CHUNK, e % CHUNK);
        // Index bit 6 picks the second source, the bytes shifted right by four.
        let high = if j < 16 { 0 } else { 64 };
        bytes[2 * q] = (24 * chunk + j % 16 + high) as u8;
        bytes[2 * q + 1] = (24 * chunk + 16 + j % 8) as u8;
        // Byte j % 8 holds element j's two bits at 2 (j / 8); in the high byte, at 8 + 2 (j / 8).
        top[q] = (4 + 2 * (j / 8)) as u16;
        q += 1;
    }
    (bytes, top)
}

/// [`lut6_step`] as registers for both halves of a step: byte indices and top-bit shifts.
struct Lut6Step {
    bytes: [__m512i; 2],
    top: [__m512i; 2],
}

/// The registers of [`lut6_step`] for a step of `n` elements.
#[target_feature(enable = "avx512f")]
#[inline]
fn lut6_step_512(n: usize) -> Lut6Step {
    let regs = |h: usize| {
        let (b, t) = lut6_step(n, h);
        // SAFETY: 64 bytes and 32 words; every bit pattern is a valid __m512i.
        unsafe {
            (
                _mm512_loadu_si512(b.as_ptr().cast()),
                _mm512_loadu_si512(t.as_ptr().cast()),
            )
        }
    };
    let (b0, t0) = regs(0);
    let (b1, t1) = regs(1);
    Lut6Step {
        bytes: [b0, b1],
        top: [t0, t1],
    }
}

/// The 64-entry table's words for half `h` of a step of 6-bit indices `i` (its index bytes;
/// `i4` the same shifted right by four).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn lookup64_words(
    i: __m512i,
    i4: __m512i,
    st: &Lut6Step,
    h: usize,
    table: &[__m512i; 2],
) -> __m512i {
    let v = _mm512_permutex2var_epi8(i, st.bytes[h], i4);
    let top = _mm512_srlv_epi16(v, st.top[h]);
    // Bits 0..4 from the nibble, the rest from the top bits: (c & a) | (!c & b).
    let idx = _mm512_ternarylogic_epi32::<0xe4>(v, top, _mm512_set1_epi16(0x0f));
    _mm512_permutex2var_epi16(table[0], idx, table[1])
}

/// The byte planes of a 64-entry table's 16-bit integers (`table`, 32 words per register):
/// low bytes in `[0]`, high bytes in `[1]`, entry `k` at byte `k`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn byte_planes64(table: &[__m512i; 2]) -> [__m512i; 2] {
    let bytes = |a: __m512i, b: __m512i| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtepi16_epi8(a)),
            _mm512_cvtepi16_epi8(b),
        )
    };
    [
        bytes(table[0], table[1]),
        bytes(
            _mm512_srli_epi16::<8>(table[0]),
            _mm512_srli_epi16::<8>(table[1]),
        ),
    ]
}

/// A table's byte planes as converted ahead ([`KilnMatrix::converted_table`]): `N` registers
/// of 64 bytes, the low-byte plane's first.
///
/// # Safety
/// AVX-512 F; `p` holds `64 N` bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_planes<const N: usize>(p: &[u8]) -> [__m512i; N] {
    debug_assert!(p.len() == 64 * N);
    // SAFETY: the caller's guarantee.
    std::array::from_fn(|k| unsafe { _mm512_loadu_si512(p.as_ptr().add(64 * k).cast()) })
}

/// The 64-entry table's 16-bit integers (32 per register, in order) from its byte planes:
/// [`byte_planes64`] undone.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn words_of_planes64(planes: &[__m512i; 2]) -> [__m512i; 2] {
    // Byte 2k of the first register takes entry k's low byte (index k of the low plane),
    // byte 2k + 1 its high byte (index 64 + k); the second register, entries 32..64.
    const fn interleave(first: usize) -> [u8; 64] {
        let mut idx = [0u8; 64];
        let mut k = 0;
        while k < 32 {
            idx[2 * k] = (first + k) as u8;
            idx[2 * k + 1] = (64 + first + k) as u8;
            k += 1;
        }
        idx
    }
    const LOW: [u8; 64] = interleave(0);
    const HIGH: [u8; 64] = interleave(32);
    // SAFETY: 64-byte arrays; every bit pattern is a valid __m512i.
    let (a, b) = unsafe {
        (
            _mm512_loadu_si512(LOW.as_ptr().cast()),
            _mm512_loadu_si512(HIGH.as_ptr().cast()),
        )
    };
    [
        _mm512_permutex2var_epi8(planes[0], a, planes[1]),
        _mm512_permutex2var_epi8(planes[0], b, planes[1]),
    ]
}

/// The index bytes, in element order, of step `s` (elements `64 s .. 64 s + 64`) of a whole
/// block of a planar 6-bit row ([`crate::planar::lut6`]) at `bp`: the step's nibbles (a nibble
/// register as read, or shifted right by four for its high nibbles) joined by a bit select
/// with the top bits shifted to bits 4..6. Bits 6..8 hold other elements' bits, which
/// `vpermb` and the 64-entry lookups ignore.
///
/// # Safety
/// AVX-512 BW; the block's 192 bytes are readable at `bp`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn lut6_planar_indices<const S: usize>(bp: *const u8) -> __m512i {
    // SAFETY: the nibble register of the step and the top-bits register (the caller's bytes).
    let (n, t) = unsafe {
        (
            _mm512_loadu_si512(bp.add(64 * (S / 2)).cast()),
            _mm512_loadu_si512(bp.add(128).cast()),
        )
    };
    let n = if S % 2 == 1 {
        _mm512_srli_epi16::<4>(n)
    } else {
        n
    };
    // Top bits of step S at bits 2S..2S + 2 of each byte, to bits 4..6.
    let t = match S {
        0 => _mm512_slli_epi16::<4>(t),
        1 => _mm512_slli_epi16::<2>(t),
        2 => t,
        _ => _mm512_srli_epi16::<2>(t),
    };
    // Bits 0..4 from the nibbles, the rest from the top bits: (c & a) | (!c & b).
    _mm512_ternarylogic_epi32::<0xe4>(n, t, _mm512_set1_epi8(0x0f))
}

/// `vpmultishiftqb` controls that bring the top bits of a planar 6-bit step of `N` elements
/// after the last whole block ([`crate::planar::lut6`]), its top-bits bytes repeated through
/// the register (every 16 bytes for 64 elements, every 8 for 32), to bits 4..6 of each
/// element's byte: element `e` (byte `e`) takes its bits at `2 q` of its byte within the
/// repeat, `q = e / 16` (`e / 8`), so byte `k` of its quadword reads from bit
/// `8 k + 2 q - 4`.
const fn lut6_tail_top(n: usize) -> [u8; 64] {
    let mut c = [0u8; 64];
    let mut e = 0;
    while e < 64 {
        let q = e / (n / 4);
        c[e] = ((8 * (e % 8) + 2 * (q % 4) + 60) % 64) as u8;
        e += 1;
    }
    c
}

/// Word shift counts that bring a planar 6-bit step's nibble bytes, repeated through the
/// register, to the low nibble of each element's byte: `0` for the first `N / 2` elements,
/// `4` (the high nibbles) for the next `N / 2`.
const fn lut6_tail_nibbles(n: usize) -> [u16; 32] {
    let mut c = [0u16; 32];
    let mut w = 0;
    while w < 32 {
        c[w] = if (2 * w) % n >= n / 2 { 4 } else { 0 };
        w += 1;
    }
    c
}

/// [`lut6_planar_indices`] for a step of `N` (64 or 32) elements after the last whole block
/// of a planar 6-bit row, at `p`: its `N / 2` nibble bytes repeated through the register and
/// shifted by word, its `N / 4` top-bits bytes repeated and moved by `vpmultishiftqb`, joined
/// by a bit select. For 32 elements, bytes 32..64 hold what the zero codes there meet.
///
/// # Safety
/// AVX-512 BW and VBMI; the step's `3 N / 4` bytes are readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[inline]
unsafe fn lut6_planar_tail_indices<const N: usize>(p: *const u8) -> __m512i {
    let nibbles = const { lut6_tail_nibbles(N) };
    let top = const { lut6_tail_top(N) };
    // SAFETY: the step's bytes (the caller's guarantee); the constants are 64 bytes each.
    unsafe {
        let (n, t) = if N == 64 {
            (
                _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast())),
                _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(32).cast())),
            )
        } else {
            (
                _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast())),
                _mm512_set1_epi64(p.add(16).cast::<i64>().read_unaligned()),
            )
        };
        let n = _mm512_srlv_epi16(n, _mm512_loadu_si512(nibbles.as_ptr().cast()));
        let t = _mm512_multishift_epi64_epi8(_mm512_loadu_si512(top.as_ptr().cast()), t);
        _mm512_ternarylogic_epi32::<0xe4>(n, t, _mm512_set1_epi8(0x0f))
    }
}

/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` a 6-bit lookup-table tensor (planar rows
/// with `PLANAR`: [`crate::planar::lut6`]) whose rows `r0..r0 + R` share the table `table`
/// (64 words of `lut_table_i16`, scale `s`; `planes` its [`byte_planes64`]).
///
/// Planar rows: each whole I16 block's steps of 64 come as index bytes in element order
/// ([`lut6_planar_indices`]), which two `vpermb` in the byte planes and two byte interleaves
/// turn into the words of the I16 codes' order ([`byte_plane_words`]); the steps after the
/// last whole block likewise from [`lut6_planar_tail_indices`]. The words are those of the
/// stored rows, in the same places, so the results are the same, bit for bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut6_i16_512<const PLANAR: bool, const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    table: &[__m512i; 2],
    planes: &[__m512i; 2],
    s: f32,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    const BLOCK: usize = crate::activation::I16_BLOCK;
    const BLOCK_BYTES: usize = BLOCK * 6 / 8;
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let full = lut6_step_512(64);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    let mut start = 0;
    if PLANAR {
        while start + BLOCK <= w.cols {
            let mut sums = [[_mm512_setzero_si512(); T]; R];
            // The block's offset in every row of the tile ([`opaque_offset`]).
            let at = opaque_offset(b * BLOCK_BYTES);
            macro_rules! step {
                ($s:literal) => {{
                    let c = start + 64 * $s;
                    let mut xv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
                    for t in 0..T {
                        // SAFETY: the block's codes from c.
                        xv[t] = unsafe { i16_codes_512(xs[t], c, true) };
                    }
                    for r in 0..R {
                        let bp = p.wrapping_add(r * rb + at);
                        if $s < 3 {
                            prefetch_weights(bp.wrapping_add(64 * $s), ahead);
                        }
                        // SAFETY: the whole block's bytes of row r0 + r.
                        let i = unsafe { lut6_planar_indices::<$s>(bp) };
                        let (lo, hi) = byte_plane_words(i, planes);
                        for t in 0..T {
                            sums[r][t] = dpwssd(sums[r][t], lo, xv[t].0);
                            sums[r][t] = dpwssd(sums[r][t], hi, xv[t].1);
                        }
                    }
                }};
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            add_i16_block(&mut acc, &sums, &xs, b);
            b += 1;
            start += BLOCK;
        }
    }
    // Stored rows, or the steps after a planar row's last whole block (in one block).
    while start < w.cols {
        let end = (start + BLOCK).min(w.cols);
        let mut sums = [[_mm512_setzero_si512(); T]; R];
        let mut c = start;
        while c < end {
            let two = c + 2 * CHUNK <= end;
            let tail;
            let (st, mask): (&Lut6Step, __mmask64) = if two {
                (&full, (1u64 << 48) - 1)
            } else {
                tail = lut6_step_512(32);
                (&tail, (1u64 << 24) - 1)
            };
            let mut xv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
            for t in 0..T {
                // SAFETY: the block's codes from c.
                xv[t] = unsafe { i16_codes_512(xs[t], c, two) };
            }
            for r in 0..R {
                // A chunk of 32 six-bit indices is 24 bytes (so is a planar step's share).
                let ip = p.wrapping_add(r * rb + c / CHUNK * 24);
                prefetch_weights(ip, ahead);
                let (lo, hi) = if PLANAR {
                    // SAFETY: the step's 48 (or 24) bytes of row r0 + r.
                    let i = unsafe {
                        if two {
                            lut6_planar_tail_indices::<64>(ip)
                        } else {
                            lut6_planar_tail_indices::<32>(ip)
                        }
                    };
                    byte_plane_words(i, planes)
                } else {
                    // SAFETY: 48 (or 24) index bytes of row r0 + r from element c.
                    let i = unsafe { _mm512_maskz_loadu_epi8(mask, ip.cast()) };
                    let i4 = _mm512_srli_epi16::<4>(i);
                    (
                        lookup64_words(i, i4, st, 0, table),
                        lookup64_words(i, i4, st, 1, table),
                    )
                };
                for t in 0..T {
                    sums[r][t] = dpwssd(sums[r][t], lo, xv[t].0);
                    sums[r][t] = dpwssd(sums[r][t], hi, xv[t].1);
                }
            }
            c += if two { 2 * CHUNK } else { CHUNK };
        }
        add_i16_block(&mut acc, &sums, &xs, b);
        b += 1;
        start = end;
    }
    scaled_tile_sums(&acc, &[s; R])
}

/// `vpermb` indices and word shifts that turn the index bytes of one step of a 2- or 4-bit
/// row into the indices of half `h` of the step, in the I16 codes' order: word `q` takes its
/// element's index byte in both its bytes, and shifted right by the count, the element's
/// index lands at bit 0 (the bits above it are the neighbours', which the table's copies make
/// irrelevant, see [`small_table_i16_512`]). `n` is the step (64 elements, or 32).
const fn lut_small_step(bits: usize, n: usize, h: usize) -> ([u8; 64], [u16; 32]) {
    let mut bytes = [0u8; 64];
    let mut shift = [0u16; 32];
    let mut q = 0;
    while q < n / 2 {
        let e = crate::activation::i16_element(h * n / 2 + q, n);
        let (chunk, j) = (e / CHUNK, e % CHUNK);
        // 4 bits: byte j % 16 of the chunk, the high nibble for j ≥ 16; 2 bits: byte j % 8,
        // bits 2 (j / 8).
        let (byte, s) = if bits == 4 {
            (16 * chunk + j % 16, 4 * (j / 16))
        } else {
            (8 * chunk + j % 8, 2 * (j / 8))
        };
        bytes[2 * q] = byte as u8;
        bytes[2 * q + 1] = byte as u8;
        shift[q] = s as u16;
        q += 1;
    }
    (bytes, shift)
}

/// [`lut_small_step`] as registers: `vpermb` indices and word shifts for both halves.
struct SmallStep {
    bytes: [__m512i; 2],
    shift: [__m512i; 2],
}

/// The registers of [`lut_small_step`] for `BITS` and a step of `N` elements (constants: built
/// at run time, they would cost more than a short row's lookups).
#[target_feature(enable = "avx512f")]
#[inline]
fn small_step_512<const BITS: usize, const N: usize>() -> SmallStep {
    let [(b0, t0), (b1, t1)] = const { [lut_small_step(BITS, N, 0), lut_small_step(BITS, N, 1)] };
    // SAFETY: 64 bytes and 32 words each; every bit pattern is a valid __m512i.
    unsafe {
        SmallStep {
            bytes: [
                _mm512_loadu_si512(b0.as_ptr().cast()),
                _mm512_loadu_si512(b1.as_ptr().cast()),
            ],
            shift: [
                _mm512_loadu_si512(t0.as_ptr().cast()),
                _mm512_loadu_si512(t1.as_ptr().cast()),
            ],
        }
    }
}

/// The f16 table `table` of `n` (4 or 16) entries as [`crate::kiln_formats::lut_table_i16`]
/// makes it, bit for bit (for finite entries), with its scale: the `n` words repeated through a
/// register of 32. `vpermw` reads an index's low five bits, and with the table repeated every
/// `n` words the bits above the index (its neighbours' in the packed bytes) pick a copy of the
/// same entry.
///
/// Every row of a 1-row group converts its table per call, so the largest magnitude comes from
/// the f16 bits (finite f16 magnitudes order as their bits do) by `vphminposuw` rather than a
/// reduction of f32 lanes.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C; `table` holds `n` entries, `n` is 4 or 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn small_table_i16_512(table: &[u8], n: usize) -> (__m512i, f32) {
    debug_assert!((n == 4 || n == 16) && table.len() >= 2 * n);
    let mask: __mmask16 = if n == 16 { u16::MAX } else { 0xf };
    // SAFETY: the caller's n entries; masked-off words are not read.
    let h = unsafe { _mm256_maskz_loadu_epi16(mask, table.as_ptr().cast()) };
    let mag = _mm256_and_si256(h, _mm256_set1_epi16(0x7fff));
    let mag = _mm_max_epu16(
        _mm256_castsi256_si128(mag),
        _mm256_extracti128_si256::<1>(mag),
    );
    // The smallest complement is the largest magnitude.
    let all = _mm_set1_epi16(-1);
    let top = _mm_xor_si128(_mm_minpos_epu16(_mm_xor_si128(mag, all)), all);
    let amax = _mm_cvtss_f32(_mm_cvtph_ps(_mm_and_si128(top, _mm_cvtsi32_si128(0xffff))));
    let entry_max = crate::kiln_formats::LUT_I16_ENTRY_MAX;
    let s = amax / f32::from(entry_max);
    if s.is_nan() || s <= 0.0 {
        return (_mm512_setzero_si512(), s);
    }
    let inv = _mm512_set1_ps(f32::from(entry_max) / amax);
    let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtph_ps(h), inv));
    let q = _mm512_min_epi32(
        _mm512_max_epi32(q, _mm512_set1_epi32(-i32::from(entry_max))),
        _mm512_set1_epi32(i32::from(entry_max)),
    );
    let words = _mm512_cvtepi32_epi16(q);
    let table = if n == 16 {
        _mm512_broadcast_i64x4(words)
    } else {
        _mm512_broadcastq_epi64(_mm256_castsi256_si128(words))
    };
    (table, s)
}

/// [`small_table_i16_512`] for four consecutive 16-entry tables at `p` at once: the largest
/// magnitudes by shuffles and maxima within each table's 256 bits, both divisions once for the
/// four. With a table per row, converting them one by one cost about a third of a 576-column
/// row's time.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C; 128 bytes (four tables of 16 f16 entries) readable at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[inline]
unsafe fn small_tables4_i16_512(p: *const u8) -> ([__m512i; 4], [f32; 4]) {
    // SAFETY: the caller's 128 bytes.
    let (a, b) = unsafe {
        (
            _mm512_loadu_si512(p.cast()),
            _mm512_loadu_si512(p.add(64).cast()),
        )
    };
    let (ma, mb) = (half_max_512(a), half_max_512(b));
    // Words 0 and 16 of each: the four tables' largest magnitudes.
    let pick = _mm512_setr_epi32(
        16 << 16,
        (48 << 16) | 32,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    );
    let top = _mm512_permutex2var_epi16(ma, pick, mb);
    let amax = _mm_cvtph_ps(_mm512_castsi512_si128(top));
    let entry_max = crate::kiln_formats::LUT_I16_ENTRY_MAX;
    let max = _mm_set1_ps(f32::from(entry_max));
    let s4 = _mm_div_ps(amax, max);
    let inv4 = _mm512_castps128_ps512(_mm_div_ps(max, amax));
    // A zero (or NaN) scale gives a table of zeros, as the scalar conversion does.
    let valid = _mm_cmp_ps_mask::<_CMP_GT_OQ>(s4, _mm_setzero_ps());
    let (lo, hi) = (
        _mm512_set1_epi32(-i32::from(entry_max)),
        _mm512_set1_epi32(i32::from(entry_max)),
    );
    let halves = [
        _mm512_castsi512_si256(a),
        _mm512_extracti64x4_epi64::<1>(a),
        _mm512_castsi512_si256(b),
        _mm512_extracti64x4_epi64::<1>(b),
    ];
    let mut tables = [_mm512_setzero_si512(); 4];
    for k in 0..4 {
        let inv = _mm512_permutexvar_ps(_mm512_set1_epi32(k as i32), inv4);
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtph_ps(halves[k]), inv));
        let q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        let keep: __mmask8 = if valid & (1 << k) != 0 { 0xff } else { 0 };
        tables[k] = _mm512_maskz_mov_epi64(keep, _mm512_broadcast_i64x4(_mm512_cvtepi32_epi16(q)));
    }
    let mut s = [0.0f32; 4];
    // SAFETY: four floats.
    unsafe { _mm_storeu_ps(s.as_mut_ptr(), s4) };
    (tables, s)
}

/// The f16 magnitudes of `x` (16-bit words, two tables of 16) with every word of each 128-bit
/// lane, word 0 at least, raised to its 256-bit half's largest (finite f16 magnitudes order as
/// their bits do).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn half_max_512(x: __m512i) -> __m512i {
    let x = _mm512_and_si512(x, _mm512_set1_epi16(0x7fff));
    let x = _mm512_max_epu16(x, _mm512_shuffle_i64x2::<0xb1>(x, x));
    let x = _mm512_max_epu16(x, _mm512_shuffle_epi32::<0x4e>(x));
    let x = _mm512_max_epu16(x, _mm512_shuffle_epi32::<0xb1>(x));
    _mm512_max_epu16(x, _mm512_srli_epi32::<16>(x))
}

/// The 2- or 4-bit lookup-table rows `rows` of `w` against I16 activation rows, in tiles whose
/// rows each take their own table (a table is one register).
///
/// Every table the rows use is converted first, in one loop: with a table per row, converting
/// each tile's tables just before its lookups left the conversions' long dependency chains
/// (a horizontal maximum, two divisions) exposed, at about half again a 576-column row's time.
///
/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` a `BITS`-bit lookup-table tensor.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut_small_dot_block<const BITS: usize>(
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    stride: usize,
) {
    let n = 1usize << BITS;
    let base = rows.start;
    let group = w.rows_per_table();
    let first = base / group;
    // The tables follow one another after the last row (the first is `w.table(0)`).
    let tables_at = w.table(0).as_ptr();
    // Taken out of the thread-local and put back: a closure would not take this function's
    // features, and would move the tables through 128-bit registers.
    let (mut converted, mut scales, mut group_planes) = SMALL_TABLES.with(|cell| cell.take());
    converted.clear();
    scales.clear();
    // A table per row of 16 entries: a tile's four tables are converted as the tile comes, at
    // once, so the conversion overlaps the previous tile's lookups and nothing is gathered.
    let per_row = group == 1 && n == 16;
    {
        let end = if per_row {
            first
        } else {
            rows.end.div_ceil(group)
        };
        let mut g = first;
        while g < end {
            let table = w.table(g * group);
            debug_assert_eq!(table.as_ptr(), tables_at.wrapping_add(2 * n * g));
            // Without a prefetch ahead, each conversion waits for its table's load (of a
            // 1-row group's tables, from DRAM); four tables of 16 entries are two lines.
            prefetch_table(table.as_ptr(), 32 * 2 * n);
            if n == 16 && g + 4 <= end {
                prefetch_table(table.as_ptr(), 32 * 2 * n + 64);
                // SAFETY: the CPU has AVX-512 (the caller's guarantee); tables g..g + 4 follow
                // one another, 16 entries each.
                let (v, s4) = unsafe { small_tables4_i16_512(table.as_ptr()) };
                converted.extend_from_slice(&v);
                scales.extend_from_slice(&s4);
                g += 4;
                continue;
            }
            // SAFETY: the CPU has AVX-512 (the caller's guarantee); the table holds n entries.
            let (v, s) = unsafe { small_table_i16_512(table, n) };
            converted.push(v);
            scales.push(s);
            g += 1;
        }
        // Planar 4-bit rows look their tables up as byte planes: made once per table.
        group_planes.clear();
        if w.planar && BITS == 4 {
            group_planes.extend(converted.iter().map(|&t| planes_of_words(t)));
        }
        // A loop rather than `for_tiles`, for the same reason.
        let mut tables = [_mm512_setzero_si512(); TILE_ROWS];
        let mut s = [0.0f32; TILE_ROWS];
        let mut r = rows.start;
        while r < rows.end {
            let rn = if r + TILE_ROWS <= rows.end {
                TILE_ROWS
            } else {
                1
            };
            let mut planes = [[_mm512_setzero_si512(); 2]; TILE_ROWS];
            if per_row && w.row_tables.is_some() {
                // Tables converted ahead (4 bits, one per row): each row's byte planes.
                for k in 0..rn {
                    let (at, scale) = w.converted_table(r + k).expect("converted tables");
                    // SAFETY: the row's two planes of 16 bytes (`with_row_tables` checked the
                    // size).
                    planes[k] = unsafe {
                        [
                            _mm512_broadcast_i32x4(_mm_loadu_si128(at.as_ptr().cast())),
                            _mm512_broadcast_i32x4(_mm_loadu_si128(at[16..].as_ptr().cast())),
                        ]
                    };
                    tables[k] = words_of_planes(planes[k]);
                    s[k] = scale;
                }
            } else if per_row {
                let table = w.table(r);
                prefetch_table(table.as_ptr(), 32 * 2 * n);
                prefetch_table(table.as_ptr(), 32 * 2 * n + 64);
                if rn == TILE_ROWS {
                    debug_assert_eq!(w.table(r + 3).as_ptr(), table.as_ptr().wrapping_add(96));
                    // SAFETY: the CPU has AVX-512 (the caller's guarantee); the tables of rows
                    // r..r + 4 follow one another, 16 entries each.
                    (tables, s) = unsafe { small_tables4_i16_512(table.as_ptr()) };
                } else {
                    // SAFETY: as above; the table holds 16 entries.
                    (tables[0], s[0]) = unsafe { small_table_i16_512(table, n) };
                }
            } else {
                for k in 0..rn {
                    let g = (r + k) / group - first;
                    (tables[k], s[k]) = (converted[g], scales[g]);
                    if w.planar && BITS == 4 {
                        planes[k] = group_planes[g];
                    }
                }
            }
            if w.planar && per_row && w.row_tables.is_none() {
                for k in 0..rn {
                    planes[k] = planes_of_words(tables[k]);
                }
            }
            let mut t = 0;
            while t < xq.len() {
                let m = if t + 2 <= xq.len() { 2 } else { 1 };
                let (tb, pl, sc) = (&tables, &planes, &s);
                // SAFETY: the tile's rows and activation rows exist, the rest is the caller's
                // guarantee (planar rows are 4-bit: `KilnMatrix::new_planar`).
                unsafe {
                    if w.planar && BITS == 2 {
                        tile!(
                            rn,
                            m,
                            xq,
                            t,
                            out,
                            stride,
                            r - base,
                            lut2_planar_i16_512(w, r, tb, sc)
                        )
                    } else if w.planar {
                        tile!(
                            rn,
                            m,
                            xq,
                            t,
                            out,
                            stride,
                            r - base,
                            lut4_planar_i16_512(w, r, pl, sc)
                        )
                    } else {
                        tile!(rn, m, xq, t, out, stride, r - base, lut_small_i16_512<BITS>(w, r, tb, sc))
                    }
                }
                t += m;
            }
            r += rn;
        }
    }
    SMALL_TABLES.with(|cell| cell.replace((converted, scales, group_planes)));
}

thread_local! {
    /// The converted tables of a 2- or 4-bit call ([`small_table_i16_512`]), their scales, and
    /// for planar rows their byte planes.
    static SMALL_TABLES: std::cell::Cell<(Vec<__m512i>, Vec<f32>, Vec<Planes16>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// The table's words for half `h` of a step of 2- or 4-bit indices `i` (its index bytes).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn small_words(i: __m512i, st: &SmallStep, h: usize, table: __m512i) -> __m512i {
    let v = _mm512_permutexvar_epi8(st.bytes[h], i);
    _mm512_permutexvar_epi16(_mm512_srlv_epi16(v, st.shift[h]), table)
}

/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` a `BITS`-bit (2 or 4) lookup-table tensor;
/// row `r0 + r` takes `tables[r]` with scale `s[r]` ([`small_table_i16_512`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut_small_i16_512<const BITS: usize, const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    tables: &[__m512i; TILE_ROWS],
    s: &[f32; TILE_ROWS],
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    let mut start = 0;
    while start < w.cols {
        let end = (start + crate::activation::I16_BLOCK).min(w.cols);
        // SAFETY: elements start..end of the tile's rows and activation rows (the caller's).
        let sums = unsafe { lut_small_block::<BITS, R, T>(p, rb, ahead, start..end, tables, &xs) };
        add_i16_block(&mut acc, &sums, &xs, b);
        b += 1;
        start = end;
    }
    scaled_tile_sums(&acc, s)
}

/// The integer sums of one I16 block, elements `block`, of the stored `BITS`-bit rows at `p`
/// (`rb` bytes apart; row `r` takes `tables[r]`) with every activation row.
///
/// # Safety
/// AVX-512 VNNI and VBMI; the rows' index bytes of `block` are readable, and the activation
/// rows' codes of `block` exist.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn lut_small_block<const BITS: usize, const R: usize, const T: usize>(
    p: *const u8,
    rb: usize,
    ahead: usize,
    block: Range<usize>,
    tables: &[__m512i; TILE_ROWS],
    xs: &[&QuantizedRow; T],
) -> [[__m512i; T]; R] {
    let full = small_step_512::<BITS, 64>();
    let mut sums = [[_mm512_setzero_si512(); T]; R];
    let (mut c, end) = (block.start, block.end);
    while c < end {
        let two = c + 2 * CHUNK <= end;
        let tail;
        // A step of 64 elements is 8 · BITS bytes.
        let (st, mask): (&SmallStep, __mmask64) = if two {
            (&full, (1u64 << (8 * BITS)) - 1)
        } else {
            tail = small_step_512::<BITS, 32>();
            (&tail, (1u64 << (4 * BITS)) - 1)
        };
        let mut xv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
        for t in 0..T {
            // SAFETY: the block's codes from c.
            xv[t] = unsafe { i16_codes_512(xs[t], c, two) };
        }
        for r in 0..R {
            let ip = p.wrapping_add(r * rb + c * BITS / 8);
            prefetch_weights(ip, ahead);
            // SAFETY: 8 · BITS (or 4 · BITS) index bytes of row r from element c.
            let i = unsafe { _mm512_maskz_loadu_epi8(mask, ip.cast()) };
            let lo = small_words(i, st, 0, tables[r]);
            let hi = small_words(i, st, 1, tables[r]);
            for t in 0..T {
                sums[r][t] = _mm512_dpwssd_epi32(sums[r][t], lo, xv[t].0);
                sums[r][t] = _mm512_dpwssd_epi32(sums[r][t], hi, xv[t].1);
            }
        }
        c += if two { 2 * CHUNK } else { CHUNK };
    }
    sums
}

/// `vpermw` indices that turn a 2-bit table register (its 4 words repeated:
/// [`small_table_i16_512`]) into one whose word `k` is entry `(k >> 2) & 3`: looked up by a
/// word, it gives the entry named by the word's bits 2..4.
const LUT2_SECOND_FIELD: __m512i = {
    let mut idx = [0u16; 32];
    let mut k = 0;
    while k < 32 {
        idx[k] = ((k >> 2) & 3) as u16;
        k += 1;
    }
    // SAFETY: [u16; 32] and __m512i have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u16; 32], __m512i>(idx) }
};

/// [`lut_small_i16_512`] for planar 2-bit rows ([`crate::planar::lut2`]): per whole I16 block
/// one 64-byte read per row holds its 256 indices as eight 2-bit fields of 32 words, each
/// field in the I16 codes' order, so `vpermw` looks each field up with no index shuffles:
/// fields 0 and 1 as read (the table register repeated every four words, and the same
/// spread to read bits 2..4), the others after shifting the words right by 4, 8 and 12. The
/// words are summed as [`lut_small_i16_512`] sums them, so the results are its results, bit
/// for bit. The elements after the last whole block are as stored.
///
/// # Safety
/// AVX-512 VNNI and VBMI; as [`dot_block`], `w` a planar 2-bit lookup-table tensor; row
/// `r0 + r` takes `tables[r]` with scale `s[r]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut2_planar_i16_512<const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    tables: &[__m512i; TILE_ROWS],
    s: &[f32; TILE_ROWS],
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    const BLOCK: usize = crate::activation::I16_BLOCK;
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut second = [_mm512_setzero_si512(); TILE_ROWS];
    for r in 0..R {
        second[r] = _mm512_permutexvar_epi16(LUT2_SECOND_FIELD, tables[r]);
    }
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let whole = w.cols / BLOCK;
    for b in 0..whole {
        let mut sums = [[_mm512_setzero_si512(); T]; R];
        // Steps of 64 elements: fields 2·step and 2·step + 1, after a shift of 4·step.
        macro_rules! step {
            ($step:literal) => {{
                let c = b * BLOCK + 64 * $step;
                let mut xv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
                for t in 0..T {
                    // SAFETY: the block's codes from c.
                    xv[t] = unsafe { i16_codes_512(xs[t], c, true) };
                }
                for r in 0..R {
                    let ip = p.wrapping_add(r * rb + b * (BLOCK / 4));
                    if $step == 0 {
                        prefetch_weights(ip, ahead);
                    }
                    // SAFETY: the block's 64 index bytes of row r0 + r.
                    let v = unsafe { _mm512_loadu_si512(ip.cast()) };
                    let v = _mm512_srli_epi16::<{ 4 * $step }>(v);
                    let lo = _mm512_permutexvar_epi16(v, tables[r]);
                    let hi = _mm512_permutexvar_epi16(v, second[r]);
                    for t in 0..T {
                        sums[r][t] = dpwssd(sums[r][t], lo, xv[t].0);
                        sums[r][t] = dpwssd(sums[r][t], hi, xv[t].1);
                    }
                }
            }};
        }
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        add_i16_block(&mut acc, &sums, &xs, b);
    }
    if whole * BLOCK < w.cols {
        // SAFETY: the elements after the last whole block, as stored (the caller's).
        let sums =
            unsafe { lut_small_block::<2, R, T>(p, rb, ahead, whole * BLOCK..w.cols, tables, &xs) };
        add_i16_block(&mut acc, &sums, &xs, whole);
    }
    scaled_tile_sums(&acc, s)
}

/// A 16-entry table's 16-bit integers as byte planes for byte lookups: the low bytes of the
/// 16 entries in every 128-bit lane of `[0]`, the high bytes in every lane of `[1]`.
type Planes16 = [__m512i; 2];

/// [`Planes16`] of a converted table register (16 words in each 256-bit half, as
/// [`small_table_i16_512`] makes it).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn planes_of_words(words: __m512i) -> Planes16 {
    let lo = _mm512_castsi512_si128(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(words)));
    let hi = _mm512_cvtepi16_epi8(_mm512_srli_epi16::<8>(words));
    [
        _mm512_broadcast_i32x4(lo),
        _mm512_broadcast_i32x4(_mm256_castsi256_si128(hi)),
    ]
}

/// `vpdpwssd`: `acc` plus the sums of `a`·`b`'s word pairs, as one instruction. As the
/// intrinsic, the compiler splits most of a loop's into `vpmaddwd` and `vpaddd`, two
/// instructions where one does.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: AVX-512 VNNI (this function's features); the instruction reads and writes only
    // the registers named.
    unsafe {
        core::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `v`, which the compiler can no longer see through. A kernel's step addresses each of its
/// rows at a shared offset; seeing the offset grow with the step, the compiler makes a pointer
/// per row and per stream instead (sixteen for a 4-row `I4_B64` tile), which do not fit the
/// registers, and the loop spends its issue slots spilling and reloading them. (`kilnbench
/// --runtime --tokens 1 --mb 1`, `I4_B64`, ns a weight: 0.0384 → 0.0360 at k 576, 0.0323 →
/// 0.0303 at k 1536, level with `Q4_0`'s 0.0302.)
#[inline(always)]
fn opaque_offset(mut v: usize) -> usize {
    // SAFETY: no instruction (the template is a comment), which only claims to change the
    // register holding `v`; it reads and writes no memory.
    unsafe {
        core::arch::asm!(
            "/* {v} */",
            v = inout(reg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    v
}

/// The complement of a 64-lane mask, as one `knotq` on the mask unit. Written as `!`, the
/// compiler folds the complement into the instruction the mask came from: `!vpmovb2m`
/// becomes a byte compare (`vpcmpb`), which on Intel cores runs on the shuffle port the
/// `LUT8` lookups fill, one more operation there per 64 weights. (`kilnbench`, `LUT8` with
/// the weights in L2: 0.0593 → 0.0564 ns a weight; in the shared cache on both cores:
/// 0.064 → 0.062.)
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn not_mask(k: __mmask64) -> __mmask64 {
    let out: __mmask64;
    // SAFETY: AVX-512 BW (this function's features); the instruction reads and writes only
    // the mask registers named.
    unsafe {
        core::arch::asm!(
            "knotq {out}, {k}",
            k = in(kreg) k,
            out = lateout(kreg) out,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// [`Planes16`] as the table register [`small_table_i16_512`] makes (16 words in each 256-bit
/// half).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn words_of_planes(p: Planes16) -> __m512i {
    // In every 128-bit lane: entries 0..8 as words, then (unpackhi) entries 8..16.
    let lo = _mm512_unpacklo_epi8(p[0], p[1]);
    let hi = _mm512_unpackhi_epi8(p[0], p[1]);
    // Lanes [lo 0, lo 0, hi 0, hi 0], then [lo 0, hi 0, lo 0, hi 0]: entries 0..16 in each
    // 256-bit half.
    let x = _mm512_shuffle_i64x2::<0x00>(lo, hi);
    _mm512_shuffle_i64x2::<0x88>(x, x)
}

/// The table's words for one step of 64 (or 32) indices in element order (`i`: one byte
/// each) in a table's byte planes (low bytes of its 16-bit entries in `[0]`, high bytes in
/// `[1]`): two lookups and two byte interleaves give lane `j` of the first register elements
/// `16j .. 16j + 8`, of the second `16j + 8 .. 16j + 16`, the I16 codes' order. `vpermb` reads
/// the low six bits of each index byte: a 64-entry table ([`byte_planes64`]) takes them all;
/// the planes of a 16-entry one ([`Planes16`]) repeat every 16 bytes, so bits 4..8 of its
/// indices may hold anything and the code plane's bytes need no masking.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn byte_plane_words(i: __m512i, planes: &[__m512i; 2]) -> (__m512i, __m512i) {
    let lo = _mm512_permutexvar_epi8(i, planes[0]);
    let hi = _mm512_permutexvar_epi8(i, planes[1]);
    (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi))
}

/// [`lut_small_i16_512`] for planar 4-bit rows ([`crate::planar::lut4`]): one 64-byte read of
/// the code plane gives 128 indices in element order (as read, and shifted), which
/// [`byte_plane_words`] looks up in the table's byte planes, two byte permutes and two
/// interleaves per 64 indices where the stored rows take two permutes, two shifts and two
/// word permutes. The words arrive in the I16 codes' order and are
/// summed as [`lut_small_i16_512`] sums them, so the results are its results, bit for bit.
///
/// # Safety
/// AVX-512 VNNI; as [`dot_block`], `w` a planar 4-bit lookup-table tensor; row `r0 + r` takes
/// `planes[r]` with scale `s[r]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn lut4_planar_i16_512<const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    planes: &[Planes16; TILE_ROWS],
    s: &[f32; TILE_ROWS],
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    let mut start = 0;
    while start < w.cols {
        let end = (start + crate::activation::I16_BLOCK).min(w.cols);
        let mut sums = [[_mm512_setzero_si512(); T]; R];
        let mut c = start;
        // Groups of four chunks (blocks start at multiples of 256, so groups never straddle
        // them), then the chunks after the row's last group.
        // SAFETY (both): chunks c / 32 .. c / 32 + n of every row of the tile and their codes.
        while c + 4 * CHUNK <= end {
            sums = unsafe { lut4_planar_group::<R, T, 4>(p, rb, c, ahead, planes, xs, sums) };
            c += 4 * CHUNK;
        }
        if c < end {
            sums = unsafe {
                match (end - c) / CHUNK {
                    1 => lut4_planar_group::<R, T, 1>(p, rb, c, ahead, planes, xs, sums),
                    2 => lut4_planar_group::<R, T, 2>(p, rb, c, ahead, planes, xs, sums),
                    _ => lut4_planar_group::<R, T, 3>(p, rb, c, ahead, planes, xs, sums),
                }
            };
        }
        add_i16_block(&mut acc, &sums, &xs, b);
        b += 1;
        start = end;
    }
    scaled_tile_sums(&acc, s)
}

/// `sums` plus chunks `c / 32 .. c / 32 + N` (a group of four, or the `N` after a row's last
/// group) of the tile's planar rows at `p` against the activation rows.
///
/// # Safety
/// AVX-512 VNNI; the chunks are the rows' (`rb` bytes apart from `p`), and the activation
/// rows' codes from `c` exist.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn lut4_planar_group<const R: usize, const T: usize, const N: usize>(
    p: *const u8,
    rb: usize,
    c: usize,
    ahead: usize,
    planes: &[Planes16; TILE_ROWS],
    xs: [&QuantizedRow; T],
    mut sums: [[__m512i; T]; R],
) -> [[__m512i; T]; R] {
    // The steps: 64 indices from the first register (32 for N = 1), then 64 (N = 4) or 32
    // (N = 3) from the second.
    let first_two = N >= 2;
    let mut x0 = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
    let mut x1 = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
    for t in 0..T {
        // SAFETY: the codes of the group's elements (the caller's guarantee).
        unsafe {
            x0[t] = i16_codes_512(xs[t], c, first_two);
            if N >= 3 {
                x1[t] = i16_codes_512(xs[t], c + 2 * CHUNK, N == 4);
            }
        }
    }
    // Rows written out (`R` is at most four): as a loop, the rows' sums and tables went
    // through memory.
    macro_rules! row {
        ($r:expr) => {
            if $r < R {
                let ip = p.wrapping_add($r * rb + c / 2);
                // SAFETY: the group's runs of row r (the caller's guarantee).
                sums[$r] =
                    unsafe { lut4_planar_row::<T, N>(ip, ahead, &planes[$r], &x0, &x1, sums[$r]) };
            }
        };
    }
    row!(0);
    row!(1);
    row!(2);
    row!(3);
    sums
}

/// One row's part of [`lut4_planar_group`]: `sums` plus the group's chunks at `ip` (planes
/// `planes`) against the activation codes `x0` (and `x1` for the second register).
///
/// # Safety
/// AVX-512 VNNI; the group's runs are readable at `ip`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn lut4_planar_row<const T: usize, const N: usize>(
    ip: *const u8,
    ahead: usize,
    planes: &Planes16,
    x0: &[(__m512i, __m512i); T],
    x1: &[(__m512i, __m512i); T],
    mut sums: [__m512i; T],
) -> [__m512i; T] {
    prefetch_weights(ip, ahead);
    // SAFETY: the caller's runs (a whole group's 64 bytes for N = 4).
    let (u01, u23) = unsafe {
        if N == 4 {
            // The code bytes as they are (low nibbles) and shifted (high ones): the lookups
            // ignore the bits above.
            let v = _mm512_loadu_si512(ip.cast());
            (v, _mm512_srli_epi16::<4>(v))
        } else {
            super::avx512::planar_codes4::<N>(ip)
        }
    };
    let (w0, w1) = byte_plane_words(u01, planes);
    for t in 0..T {
        sums[t] = dpwssd(sums[t], w0, x0[t].0);
        sums[t] = dpwssd(sums[t], w1, x0[t].1);
    }
    if N >= 3 {
        let (w0, w1) = byte_plane_words(u23, planes);
        for t in 0..T {
            sums[t] = dpwssd(sums[t], w0, x1[t].0);
            sums[t] = dpwssd(sums[t], w1, x1[t].1);
        }
    }
    sums
}

/// The byte planes of a table's 16-bit integers (the first 16 of `u`) for `vpshufb`: low bytes
/// in both 128-bit lanes of the first register, high bytes in both of the second.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn small_planes_256(u: &[i16; 256]) -> (__m256i, __m256i) {
    // SAFETY: 16 words.
    let v = unsafe { _mm256_loadu_si256(u.as_ptr().cast()) };
    // Per lane: even bytes (low) to the first eight, odd (high) to the last eight.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
        7, 9, 11, 13, 15,
    );
    // Quadwords: low bytes of entries 0..8, 8..16, then high bytes of 0..8, 8..16.
    let v = _mm256_permute4x64_epi64::<0xd8>(_mm256_shuffle_epi8(v, split));
    (
        _mm256_permute2x128_si256::<0x00>(v, v),
        _mm256_permute2x128_si256::<0x11>(v, v),
    )
}

/// The 2- or 4-bit lookup-table rows `rows` of `w` against I16 activation rows on AVX2: each
/// row's table as byte planes looked up by `vpshufb`, words by `vpunpck{l,h}bw`, multiplied
/// with the codes by `vpmaddwd` (see [`lut_small_i16_256`]).
///
/// # Safety
/// AVX2, FMA and F16C; as [`dot_block`], `w` a `BITS`-bit lookup-table tensor.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut_small_dot_block_256<const BITS: usize>(
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    stride: usize,
) {
    let n = 1usize << BITS;
    let base = rows.start;
    let group = w.rows_per_table();
    let zero = _mm256_setzero_si256();
    let mut planes = [(zero, zero); TILE_ROWS];
    let mut s = [0.0f32; TILE_ROWS];
    // The table of the last row converted: rows of a group share it.
    let mut last = (usize::MAX, (zero, zero), 0.0f32);
    let mut r = rows.start;
    while r < rows.end {
        let rn = if r + TILE_ROWS <= rows.end {
            TILE_ROWS
        } else {
            1
        };
        for k in 0..rn {
            let g = (r + k) / group;
            if g != last.0 {
                let mut u = [0i16; 256];
                // A 4-entry table padded with zeros to 16 converts to the same integers and
                // scale (zeros leave the largest magnitude alone).
                let mut table = [0u8; 32];
                table[..2 * n].copy_from_slice(w.table(r + k));
                // SAFETY: the CPU has AVX2 and F16C (the caller's guarantee); 16 entries.
                let sc = unsafe { lut_table_i16_256(&table, &mut u) };
                // SAFETY: AVX2.
                last = (g, unsafe { small_planes_256(&u) }, sc);
            }
            (planes[k], s[k]) = (last.1, last.2);
        }
        let mut t = 0;
        while t < xq.len() {
            let m = if t + 2 <= xq.len() { 2 } else { 1 };
            let (pl, sc) = (&planes, &s);
            // SAFETY: the tile's rows and activation rows exist, the rest is the caller's
            // guarantee.
            unsafe {
                tile!(rn, m, xq, t, out, stride, r - base, lut_small_i16_256<BITS>(w, r, pl, sc))
            }
            t += m;
        }
        r += rn;
    }
}

/// The index bytes of one 32-element chunk of a 2- or 4-bit row at `p`, in element order:
/// elements 0..16 in the low lane, 16..32 in the high one.
///
/// # Safety
/// AVX2; the chunk's `4 · BITS` bytes readable at `p`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn small_indices_256<const BITS: usize>(p: *const u8) -> __m256i {
    // SAFETY: the caller's bytes.
    let lane = unsafe {
        if BITS == 4 {
            // Low nibbles are elements 0..16, high nibbles 16..32.
            _mm_loadu_si128(p.cast())
        } else {
            // Byte j holds element j + 8k at bits 2k: elements 0..16 are the bytes and the
            // bytes shifted by two, 16..32 the same shifted by four more.
            let x = _mm_loadl_epi64(p.cast());
            _mm_unpacklo_epi64(x, _mm_srli_epi16::<2>(x))
        }
    };
    let mask = _mm256_set1_epi8(if BITS == 4 { 0x0f } else { 0x03 });
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(lane), lane), mask)
}

/// # Safety
/// AVX2 and FMA; as [`dot_block`], `w` a `BITS`-bit (2 or 4) lookup-table tensor; row
/// `r0 + r` takes the byte planes `planes[r]` ([`small_planes_256`]) with scale `s[r]`.
///
/// Per 32-element chunk `vpshufb` looks the index bytes (in element order, elements 0..16 in
/// the low lane) up in both planes; `vpunpcklbw` / `vpunpckhbw` join them into the words of
/// elements 0..8 and 16..24, and 8..16 and 24..32: the I16 codes' order, 16 words at a time.
/// `vpmaddwd` adds two products per 32-bit lane, so each of the two word registers has its own
/// accumulator: a lane sees 16 products per 256-element block, as with `vpdpwssd`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut_small_i16_256<const BITS: usize, const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    planes: &[(__m256i, __m256i); TILE_ROWS],
    s: &[f32; TILE_ROWS],
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut b = 0;
    let mut start = 0;
    while start < w.cols {
        let end = (start + crate::activation::I16_BLOCK).min(w.cols);
        let mut sums = [[[_mm256_setzero_si256(); 2]; T]; R];
        let mut g = start;
        while g < end {
            // A group of 64 elements stores each chunk's two halves of words 16 and 32 codes
            // apart (the second chunk's 16 further on); a row's last group of 32, 16 apart.
            let two = g + 2 * CHUNK <= end;
            let chunks: &[(usize, usize)] = if two {
                &[(0, 32), (16, 48)]
            } else {
                &[(0, 16)]
            };
            for (ci, &(a, h)) in chunks.iter().enumerate() {
                let c = g + CHUNK * ci;
                let mut xv = [[_mm256_setzero_si256(); 2]; T];
                for t in 0..T {
                    let xp = xs[t].wide.as_ptr();
                    // SAFETY: codes g .. g + 64 (g + 32 for a last group) of the row.
                    unsafe {
                        xv[t] = [
                            _mm256_loadu_si256(xp.add(g + a).cast()),
                            _mm256_loadu_si256(xp.add(g + h).cast()),
                        ];
                    }
                }
                for r in 0..R {
                    let ip = p.wrapping_add(r * rb + c * BITS / 8);
                    prefetch_weights(ip, ahead);
                    // SAFETY: the chunk's index bytes of row r0 + r.
                    let i = unsafe { small_indices_256::<BITS>(ip) };
                    let lo = _mm256_shuffle_epi8(planes[r].0, i);
                    let hi = _mm256_shuffle_epi8(planes[r].1, i);
                    let words = [_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)];
                    for t in 0..T {
                        for k in 0..2 {
                            sums[r][t][k] = _mm256_add_epi32(
                                sums[r][t][k],
                                _mm256_madd_epi16(words[k], xv[t][k]),
                            );
                        }
                    }
                }
            }
            g += if two { 2 * CHUNK } else { CHUNK };
        }
        for t in 0..T {
            let d = _mm256_set1_ps(xs[t].scales[b]);
            for r in 0..R {
                let v = _mm256_add_ps(
                    _mm256_cvtepi32_ps(sums[r][t][0]),
                    _mm256_cvtepi32_ps(sums[r][t][1]),
                );
                acc[r][t] = _mm256_fmadd_ps(v, d, acc[r][t]);
            }
        }
        b += 1;
        start = end;
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s[r] * hsum256(acc[r][t]);
        }
    }
    out
}

/// # Safety
/// AVX2, FMA; as [`dot_block`], `w` a 6-bit lookup-table tensor whose rows `r0..r0 + R` share
/// `table` (the first 64 entries used; integers of `lut_table_i16`, scale `s`), `xs` F32 rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut6_256<const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    table: &[f32; 256],
    s: f32,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let low = _mm256_set1_epi32(0x0f);
    let top = _mm256_set1_epi32(0x30);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for c in (0..w.cols).step_by(CHUNK) {
        for r in 0..R {
            let ip = p.wrapping_add(r * rb + c / CHUNK * 24);
            prefetch_weights(ip, ahead);
            // SAFETY: the 24 index bytes of this chunk of row r0 + r.
            let (b0, b1, h) = unsafe {
                (
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(ip.cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(ip.add(8).cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(ip.add(16).cast())),
                )
            };
            // Byte j of the top bits holds elements j + 8k at bits 2k: shifted left by 4,
            // then right by 2k, they land at bits 4..6.
            let h = _mm256_slli_epi32::<4>(h);
            let idx = [
                _mm256_or_si256(_mm256_and_si256(b0, low), _mm256_and_si256(h, top)),
                _mm256_or_si256(
                    _mm256_and_si256(b1, low),
                    _mm256_and_si256(_mm256_srli_epi32::<2>(h), top),
                ),
                _mm256_or_si256(
                    _mm256_srli_epi32::<4>(b0),
                    _mm256_and_si256(_mm256_srli_epi32::<4>(h), top),
                ),
                _mm256_or_si256(
                    _mm256_srli_epi32::<4>(b1),
                    _mm256_and_si256(_mm256_srli_epi32::<6>(h), top),
                ),
            ];
            let mut wv = [_mm256_setzero_ps(); 4];
            for (wk, &ik) in wv.iter_mut().zip(&idx) {
                // SAFETY: every index is below 64, inside the table.
                *wk = unsafe { _mm256_i32gather_ps::<4>(table.as_ptr(), ik) };
            }
            for t in 0..T {
                let xp = xs[t].values.as_ptr();
                for (k, wk) in wv.iter().enumerate() {
                    // SAFETY: values c + 8k .. c + 8k + 8 lie within the activation row.
                    let x = unsafe { _mm256_loadu_ps(xp.add(c + 8 * k)) };
                    acc[r][t] = _mm256_fmadd_ps(*wk, x, acc[r][t]);
                }
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s * hsum256(acc[r][t]);
        }
    }
    out
}

/// # Safety
/// AVX2, FMA; as [`dot_block`], `w` an 8-bit lookup-table tensor whose rows `r0..r0 + R`
/// share `table` (integers of `lut_table_i16`, scale `s`), `xs` F32 rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lut8_256<const R: usize, const T: usize>(
    w: &KilnMatrix,
    r0: usize,
    table: &[f32; 256],
    s: f32,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let rb = w.row_bytes;
    let ahead = super::prefetch_distance(rb);
    let p = w.data[r0 * rb..].as_ptr();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for c in (0..w.cols).step_by(CHUNK) {
        for r in 0..R {
            let ip = p.wrapping_add(r * rb + c);
            prefetch_weights(ip, ahead);
            let mut wv = [_mm256_setzero_ps(); 4];
            for (k, wk) in wv.iter_mut().enumerate() {
                // SAFETY: index bytes 8k..8k + 8 of this chunk of row r0 + r; every index is
                // below 256, inside the table.
                *wk = unsafe {
                    let i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ip.add(8 * k).cast()));
                    _mm256_i32gather_ps::<4>(table.as_ptr(), i)
                };
            }
            for t in 0..T {
                let xp = xs[t].values.as_ptr();
                for (k, wk) in wv.iter().enumerate() {
                    // SAFETY: values c + 8k .. c + 8k + 8 lie within the activation row.
                    let x = unsafe { _mm256_loadu_ps(xp.add(c + 8 * k)) };
                    acc[r][t] = _mm256_fmadd_ps(*wk, x, acc[r][t]);
                }
            }
        }
    }
    let mut out = [[0.0; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = s * hsum256(acc[r][t]);
        }
    }
    out
}

/// Whether the CPU has AVX-512 VBMI (`vpermi2b`), which the fast 8-bit lookup needs (Ice Lake
/// and later; Cascade Lake's AVX-512 VNNI has no VBMI).
pub(crate) fn has_vbmi() -> bool {
    static VBMI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VBMI.get_or_init(|| is_x86_feature_detected!("avx512vbmi"))
}

/// `vpermb` indices that order 64 bytes so that interleaving their low and high bytes per
/// 128-bit lane (`vpunpcklbw` / `vpunpckhbw`) gives elements 0..32 and 32..64 in order:
/// position `16j + m` takes element `8j + m`, position `16j + 8 + m` element `32 + 8j + m`.
const VBMI_ORDER: __m512i = {
    let mut a = [0u8; 64];
    let mut j = 0;
    while j < 4 {
        let mut m = 0;
        while m < 8 {
            a[16 * j + m] = (8 * j + m) as u8;
            a[16 * j + 8 + m] = (32 + 8 * j + m) as u8;
            m += 1;
        }
        j += 1;
    }
    // SAFETY: [u8; 64] and __m512i have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u8; 64], __m512i>(a) }
};

/// An f16 table of 256 entries as byte planes: low bytes in `[0]` (entries 0..64) to `[3]`,
/// high bytes in `[4]` to `[7]`.
type BytePlanes = [__m512i; 8];

/// # Safety
/// AVX-512 BW/VBMI; `t` is 512 readable bytes (256 f16 entries).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
unsafe fn byte_planes(t: *const u8) -> BytePlanes {
    let mut planes = [_mm512_setzero_si512(); 8];
    for q in 0..4 {
        // SAFETY: entries 64q .. 64q + 64 are 128 readable bytes.
        let (a, b) = unsafe {
            (
                _mm512_loadu_si512(t.add(128 * q).cast()),
                _mm512_loadu_si512(t.add(128 * q + 64).cast()),
            )
        };
        [planes[q], planes[4 + q]] = byte_planes64(&[a, b]);
    }
    planes
}

/// The 16-bit entries of 64 indices as two registers of 32 words: lane `j` of the first
/// holds the entries of indices `16j .. 16j + 8`, of the second `16j + 8 .. 16j + 16` (with
/// the indices in [`VBMI_ORDER`], elements 0..32 and 32..64).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn lookup256_vbmi(i: __m512i, t: &BytePlanes) -> (__m512i, __m512i) {
    // vpermi2b picks from 128 bytes by the index's low seven bits; bit 7 picks the half. The
    // first lookup writes the lower half's lanes and leaves the others holding their index,
    // which the second looks up in the upper half: the halves merge in the permutes, with no
    // blend on the vector ports the permutes already fill.
    let upper = _mm512_movepi8_mask(i);
    let lower = not_mask(upper);
    let plane = |a: usize| {
        let low = _mm512_mask2_permutex2var_epi8(t[a], i, lower, t[a + 1]);
        _mm512_mask2_permutex2var_epi8(t[a + 2], low, upper, t[a + 3])
    };
    let (lo, hi) = (plane(0), plane(4));
    (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_format::ggml::f32_to_f16;

    /// The SIMD table conversions give the scalar one's integers and scale, bit for bit, on
    /// tables with ordinary values, f16 extremes, subnormals, zeros and rounding ties.
    #[test]
    fn table_conversions_match_the_scalar_one() {
        let mut tables: Vec<Vec<f32>> = Vec::new();
        for n in [16usize, 64, 256] {
            for seed in 0..40u32 {
                let scale = [1e-6f32, 1e-3, 0.37, 5.0, 6e4][seed as usize % 5];
                tables.push(
                    (0..n)
                        .map(|k| (k as f32 * 1.618 + seed as f32).sin() * scale)
                        .collect(),
                );
            }
            // Entries that land on ties of the 16-bit grid: max 16383, so the multiplier is 1.
            tables.push(
                (0..n)
                    .map(|k| if k == 0 { 16383.0 } else { k as f32 + 0.5 })
                    .collect(),
            );
            tables.push(vec![0.0; n]);
            let mut extremes = vec![6e-8f32; n];
            extremes[3] = -65504.0;
            tables.push(extremes);
        }
        for t in tables {
            let bytes: Vec<u8> = t
                .iter()
                .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                .collect();
            let mut want = [0i16; 256];
            let s = crate::kiln_formats::lut_table_i16(&bytes, &mut want);
            let mut got = [0i16; 256];
            if Isa::Avx2.is_available() {
                // SAFETY: AVX2 and F16C are present (checked); 64 or 256 entries.
                let s2 = unsafe { lut_table_i16_256(&bytes, &mut got) };
                assert_eq!((s2.to_bits(), &got[..]), (s.to_bits(), &want[..]), "AVX2");
            }
            if Isa::Avx512Vnni.is_available() && t.len() == 16 {
                for n in [4usize, 16] {
                    let mut want = [0i16; 16];
                    let s = crate::kiln_formats::lut_table_i16(&bytes[..2 * n], &mut want);
                    // SAFETY: AVX-512 and F16C are present (checked); 16 entries.
                    let (v, s5) = unsafe { small_table_i16_512(&bytes, n) };
                    let mut words = [0i16; 32];
                    // SAFETY: 32 words.
                    unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), v) };
                    let repeated: Vec<i16> = (0..32).map(|k| want[k % n]).collect();
                    assert_eq!(
                        (s5.to_bits(), &words[..]),
                        (s.to_bits(), &repeated[..]),
                        "{n}"
                    );
                }
            }
            if Isa::Avx512Vnni.is_available() && t.len() >= 64 {
                // Four tables at once: the first 64 entries as four tables of 16.
                // SAFETY: AVX-512 and F16C are present (checked); 128 bytes.
                let (v, s4) = unsafe { small_tables4_i16_512(bytes.as_ptr()) };
                for k in 0..4 {
                    let mut want = [0i16; 16];
                    let s =
                        crate::kiln_formats::lut_table_i16(&bytes[32 * k..32 * (k + 1)], &mut want);
                    let mut words = [0i16; 32];
                    // SAFETY: 32 words.
                    unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), v[k]) };
                    let repeated: Vec<i16> = (0..32).map(|i| want[i % 16]).collect();
                    assert_eq!(
                        (s4[k].to_bits(), &words[..]),
                        (s.to_bits(), &repeated[..]),
                        "table {k} of four"
                    );
                }
            }
            if Isa::Avx512Vnni.is_available() {
                got.fill(0);
                // SAFETY: AVX-512 and F16C are present (checked); 64 or 256 entries.
                let s5 = unsafe { lut_table_i16_512(&bytes, &mut got) };
                assert_eq!(
                    (s5.to_bits(), &got[..]),
                    (s.to_bits(), &want[..]),
                    "AVX-512"
                );
            }
        }
    }
}
