//! The non-linear 4-bit quantizations IQ4_NL and IQ4_XS: each 4-bit code indexes a fixed table
//! of 16 signed levels ([`IQ4_NL_VALUES`]) instead of standing for itself, so the levels crowd
//! near zero where most weights lie. Neither needs an importance matrix, which is why both are
//! common in published GGUF files.
//!
//! Layouts (little-endian, `ggml-common.h`):
//!
//! | type   | bytes | fields |
//! |--------|-------|--------|
//! | IQ4_NL | 18    | `d: f16`, `qs: [u8; 16]` (32 elements) |
//! | IQ4_XS | 136   | `d: f16`, `scales_h: u16`, `scales_l: [u8; 4]`, `qs: [u8; 128]` (256 elements) |
//!
//! IQ4_NL: element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its high nibble,
//! and `x = d * IQ4_NL_VALUES[nibble]` (the Q4_0 layout with a table in place of `q - 8`).
//!
//! IQ4_XS: eight sub-blocks of 32, each laid out as one IQ4_NL block's nibbles (sub-block `ib`
//! owns `qs[16 * ib..16 * ib + 16]`), with a 6-bit scale `ls`: its low four bits are nibble
//! `ib % 2` of `scales_l[ib / 2]`, its top two are bits `2 * ib..2 * ib + 2` of `scales_h`.
//! `x = d * (ls - 32) * IQ4_NL_VALUES[nibble]`, with `d * (ls - 32)` rounded to f32 first, as
//! ggml's `dequantize_row_iq4_xs` does.

use super::{dot_lanes, f16_at, QK, QK_K};

/// The 16 levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`), indexed by the 4-bit code.
pub const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub(crate) const IQ4_NL_BYTES: usize = 2 + QK / 2;
pub(crate) const IQ4_XS_BYTES: usize = 2 + 2 + QK_K / 64 + QK_K / 2;

/// Byte offset of `scales_h` in an IQ4_XS super-block.
const XS_SCALES_H: usize = 2;
/// Byte offset of `scales_l`.
const XS_SCALES_L: usize = 4;
/// Byte offset of the packed codes.
const XS_QS: usize = 8;

/// The two levels a byte of packed codes stands for (low nibble, high nibble), as f32: one
/// lookup per byte instead of two, which more than doubles the speed of dequantization (what
/// prompt processing spends on every weight).
static LEVEL_PAIRS: [[f32; 2]; 256] = {
    let mut t = [[0.0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [IQ4_NL_VALUES[b & 0x0f] as f32, IQ4_NL_VALUES[b >> 4] as f32];
        b += 1;
    }
    t
};

/// The table levels of 32 elements packed as 16 bytes of nibbles, as f32, in element order.
#[inline(always)]
fn unpack_levels(qs: &[u8], q: &mut [f32; QK]) {
    let (lo, hi) = q.split_at_mut(QK / 2);
    for ((&b, l), h) in qs[..QK / 2].iter().zip(lo).zip(hi) {
        let [a, c] = LEVEL_PAIRS[usize::from(b)];
        *l = a;
        *h = c;
    }
}

/// The 6-bit scale of IQ4_XS sub-block `ib` (0..8), still biased by 32.
#[inline(always)]
pub(crate) fn xs_scale(b: &[u8], ib: usize) -> u8 {
    let scales_h = u16::from_le_bytes([b[XS_SCALES_H], b[XS_SCALES_H + 1]]);
    let low = (b[XS_SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0x0f;
    let high = ((scales_h >> (2 * ib)) & 3) as u8;
    low | (high << 4)
}

/// `y = d * level` for the 32 elements packed in `qs`.
#[inline(always)]
fn scale_levels(qs: &[u8], d: f32, y: &mut [f32]) {
    let (lo, hi) = y.split_at_mut(QK / 2);
    for ((&b, l), h) in qs[..QK / 2].iter().zip(lo).zip(hi) {
        let [a, c] = LEVEL_PAIRS[usize::from(b)];
        *l = d * a;
        *h = d * c;
    }
}

pub(crate) fn dequant_iq4_nl(b: &[u8; IQ4_NL_BYTES], y: &mut [f32; QK]) {
    scale_levels(&b[2..], f16_at(b, 0), y);
}

pub(crate) fn dot_iq4_nl(b: &[u8; IQ4_NL_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_levels(&b[2..], &mut q);
    f16_at(b, 0) * dot_lanes(&q, x)
}

/// The per-sub-block multipliers `d * (ls - 32)` of an IQ4_XS super-block.
#[inline(always)]
fn xs_multipliers(b: &[u8]) -> [f32; QK_K / QK] {
    let d = f16_at(b, 0);
    let mut mul = [0.0; QK_K / QK];
    for (ib, m) in mul.iter_mut().enumerate() {
        *m = d * (i32::from(xs_scale(b, ib)) - 32) as f32;
    }
    mul
}

pub(crate) fn dequant_iq4_xs(b: &[u8; IQ4_XS_BYTES], y: &mut [f32; QK_K]) {
    let mul = xs_multipliers(b);
    for ((ys, qs), &dl) in y
        .chunks_exact_mut(QK)
        .zip(b[XS_QS..].chunks_exact(QK / 2))
        .zip(&mul)
    {
        scale_levels(qs, dl, ys);
    }
}

pub(crate) fn dot_iq4_xs(b: &[u8; IQ4_XS_BYTES], x: &[f32; QK_K]) -> f32 {
    let mul = xs_multipliers(b);
    let mut q = [0.0; QK];
    let mut acc = 0.0f32;
    for ((xs, qs), &dl) in x
        .chunks_exact(QK)
        .zip(b[XS_QS..].chunks_exact(QK / 2))
        .zip(&mul)
    {
        unpack_levels(qs, &mut q);
        acc += dl * dot_lanes(&q, xs);
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Quantizers.
//
// ggml's own IQ4 quantizers weight each element by its square and search a few scales; kiln's
// choose, for each block, the scale that minimises the plain squared error over a similar
// search, so the bytes need not equal ggml's (the format, and so every reader, is the same).

/// Index of the table level nearest to `v` (the lower one on ties).
#[inline]
fn nearest_level(v: f32) -> u8 {
    // The levels are sorted: count how many midpoints lie below v.
    let mut idx = 0u8;
    for k in 0..15 {
        let mid = 0.5 * (f32::from(IQ4_NL_VALUES[k]) + f32::from(IQ4_NL_VALUES[k + 1]));
        if v > mid {
            idx = k as u8 + 1;
        }
    }
    idx
}

/// The best scale for `x` (32 values) and its codes: every candidate maps the element of
/// largest magnitude onto a level near the table's end, codes are the nearest levels, and the
/// scale is then refitted by least squares; the candidate with the smallest squared error wins.
/// Returns 0 (and zero-level codes) for a block of zeros.
fn fit_block(x: &[f32], codes: &mut [u8; QK]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 || !amax.is_finite() {
        codes.fill(nearest_level(0.0));
        return 0.0;
    }
    let (mut best_err, mut best_d) = (f32::INFINITY, 0.0f32);
    let mut trial = [0u8; QK];
    for step in -7i32..=7 {
        // The largest element lands on level -127 + step (in units of the scale): the far
        // end of the table, moved inwards or outwards a little.
        let inv = (step as f32 - 127.0) / max;
        let (mut sxq, mut sqq) = (0.0f32, 0.0f32);
        for (c, &v) in trial.iter_mut().zip(x) {
            *c = nearest_level(v * inv);
            let q = f32::from(IQ4_NL_VALUES[usize::from(*c)]);
            sxq += v * q;
            sqq += q * q;
        }
        if sqq == 0.0 {
            continue;
        }
        let d = sxq / sqq;
        let err: f32 = x
            .iter()
            .zip(&trial)
            .map(|(&v, &c)| {
                let e = v - d * f32::from(IQ4_NL_VALUES[usize::from(c)]);
                e * e
            })
            .sum();
        if err < best_err {
            best_err = err;
            best_d = d;
            codes.copy_from_slice(&trial);
        }
    }
    best_d
}

/// Packs 32 codes as ggml's nibble layout: element `j` low, element `j + 16` high.
fn pack_nibbles(codes: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = (codes[j] & 0x0f) | (codes[j + QK / 2] << 4);
    }
}

/// Re-picks the codes of `x` for a fixed (already rounded) scale `d`.
fn codes_for(x: &[f32], d: f32, codes: &mut [u8; QK]) {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = nearest_level(v * inv);
    }
}

pub(crate) fn quant_iq4_nl(x: &[f32], y: &mut [u8]) {
    let mut codes = [0u8; QK];
    let d = fit_block(x, &mut codes);
    let bits = super::f32_to_f16(d);
    y[..2].copy_from_slice(&bits.to_le_bytes());
    // The stored scale is rounded to f16: choose the codes for the scale readers will use.
    codes_for(x, super::f16_to_f32(bits), &mut codes);
    pack_nibbles(&codes, &mut y[2..]);
}

pub(crate) fn quant_iq4_xs(x: &[f32], y: &mut [u8]) {
    let mut codes = [0u8; QK];
    let mut scales = [0.0f32; QK_K / QK];
    for (s, xs) in scales.iter_mut().zip(x.chunks_exact(QK)) {
        *s = fit_block(xs, &mut codes);
    }
    // One super-block scale; sub-block scales become integers in -32..=31 of it, the largest
    // in magnitude landing on -32.
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &s in &scales {
        if s.abs() > amax {
            amax = s.abs();
            max = s;
        }
    }
    let d_bits = super::f32_to_f16(max / -32.0);
    let d = super::f16_to_f32(d_bits);
    let inv = if d != 0.0 && d.is_finite() {
        1.0 / d
    } else {
        0.0
    };
    y[..2].copy_from_slice(&d_bits.to_le_bytes());
    let mut scales_h = 0u16;
    let mut scales_l = [0u8; QK_K / 64];
    for (ib, (&s, xs)) in scales.iter().zip(x.chunks_exact(QK)).enumerate() {
        let l = ((s * inv).round() as i32).clamp(-32, 31);
        let ls = (l + 32) as u8;
        scales_l[ib / 2] |= (ls & 0x0f) << (4 * (ib % 2));
        scales_h |= u16::from(ls >> 4) << (2 * ib);
        codes_for(xs, d * l as f32, &mut codes);
        pack_nibbles(&codes, &mut y[XS_QS + 16 * ib..XS_QS + 16 * ib + 16]);
    }
    y[XS_SCALES_H..XS_SCALES_H + 2].copy_from_slice(&scales_h.to_le_bytes());
    y[XS_SCALES_L..XS_SCALES_L + 4].copy_from_slice(&scales_l);
}
