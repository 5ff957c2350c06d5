//! The K-quantizations: 256-element super-blocks split into sub-blocks with their own
//! (quantized) scales.
//!
//! Layouts (little-endian, `ggml-common.h`):
//!
//! | type | bytes | fields |
//! |------|-------|--------|
//! | Q2_K | 84  | `scales: [u8; 16]` (low nibble scale, high nibble min), `qs: [u8; 64]`, `d: f16`, `dmin: f16` |
//! | Q3_K | 110 | `hmask: [u8; 32]`, `qs: [u8; 64]`, `scales: [u8; 12]` (16 × 6 bits), `d: f16` |
//! | Q4_K | 144 | `d: f16`, `dmin: f16`, `scales: [u8; 12]` (8 scales + 8 mins, 6 bits), `qs: [u8; 128]` |
//! | Q5_K | 176 | `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]` |
//! | Q6_K | 210 | `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16` |
//! | Q8_K | 292 | `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]` |
//!
//! As for the legacy types, each `unpack_*` writes the integer codes in element order as f32,
//! together with the per-sub-block multipliers (and subtracted minimums) in the exact form
//! ggml computes them, so that dequantization is bit-identical to `dequantize_row_*_K`.

use super::{dot_lanes, f16_at, sum_lanes, QK_K};

pub(crate) const Q2_K_BYTES: usize = QK_K / 16 + QK_K / 4 + 4;
pub(crate) const Q3_K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
pub(crate) const Q4_K_BYTES: usize = 4 + 12 + QK_K / 2;
pub(crate) const Q5_K_BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;
pub(crate) const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
pub(crate) const Q8_K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Integer codes of one super-block, as f32, in element order.
type Codes = [f32; QK_K];

/// `y = mul[s] * q - min[s]` per sub-block `s` of `SUB` elements.
#[inline(always)]
fn apply_affine<const SUB: usize>(q: &Codes, mul: &[f32], min: &[f32], y: &mut [f32; QK_K]) {
    for (((ys, qs), &d), &m) in y
        .chunks_exact_mut(SUB)
        .zip(q.chunks_exact(SUB))
        .zip(mul)
        .zip(min)
    {
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = d * q - m;
        }
    }
}

/// `y = mul[s] * q` per sub-block `s` of `SUB` elements.
#[inline(always)]
fn apply_scale<const SUB: usize>(q: &Codes, mul: &[f32], y: &mut [f32; QK_K]) {
    for ((ys, qs), &d) in y.chunks_exact_mut(SUB).zip(q.chunks_exact(SUB)).zip(mul) {
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = d * q;
        }
    }
}

/// `sum_s mul[s] * dot(q_s, x_s) - min[s] * sum(x_s)` over sub-blocks of `SUB` elements.
#[inline(always)]
fn dot_affine<const SUB: usize>(q: &Codes, mul: &[f32], min: &[f32], x: &[f32; QK_K]) -> f32 {
    let mut acc = 0.0f32;
    for (((qs, xs), &d), &m) in q
        .chunks_exact(SUB)
        .zip(x.chunks_exact(SUB))
        .zip(mul)
        .zip(min)
    {
        acc += d * dot_lanes(qs, xs) - m * sum_lanes(xs);
    }
    acc
}

/// `sum_s mul[s] * dot(q_s, x_s)` over sub-blocks of `SUB` elements.
#[inline(always)]
fn dot_scale<const SUB: usize>(q: &Codes, mul: &[f32], x: &[f32; QK_K]) -> f32 {
    let mut acc = 0.0f32;
    for ((qs, xs), &d) in q.chunks_exact(SUB).zip(x.chunks_exact(SUB)).zip(mul) {
        acc += d * dot_lanes(qs, xs);
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Q2_K: element n*128 + j*32 + b is bits 2j..2j+2 of qs[n*32 + b]; sub-blocks of 16.

#[inline(always)]
fn unpack_q2_k(b: &[u8; Q2_K_BYTES], q: &mut Codes, mul: &mut [f32; 16], min: &mut [f32; 16]) {
    let (scales, rest) = b.split_at(QK_K / 16);
    let (qs, dd) = rest.split_at(QK_K / 4);
    let d = f16_at(dd, 0);
    let dmin = f16_at(dd, 2);
    for ((&sc, mu), mi) in scales.iter().zip(mul.iter_mut()).zip(min.iter_mut()) {
        *mu = d * f32::from(sc & 0x0f);
        *mi = dmin * f32::from(sc >> 4);
    }
    for (half, bytes) in q.chunks_exact_mut(128).zip(qs.chunks_exact(32)) {
        for (j, quarter) in half.chunks_exact_mut(32).enumerate() {
            for (v, &byte) in quarter.iter_mut().zip(bytes) {
                *v = f32::from((byte >> (2 * j)) & 3);
            }
        }
    }
}

pub(crate) fn dequant_q2_k(b: &[u8; Q2_K_BYTES], y: &mut [f32; QK_K]) {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 16], [0.0; 16]);
    unpack_q2_k(b, &mut q, &mut mul, &mut min);
    apply_affine::<16>(&q, &mul, &min, y);
}

pub(crate) fn dot_q2_k(b: &[u8; Q2_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 16], [0.0; 16]);
    unpack_q2_k(b, &mut q, &mut mul, &mut min);
    dot_affine::<16>(&q, &mul, &min, x)
}

// ---------------------------------------------------------------------------------------------
// Q3_K: element n*128 + j*32 + b is bits 2j..2j+2 of qs[n*32 + b], minus 4 unless bit 4n+j of
// hmask[b] is set; sub-blocks of 16 with signed 6-bit scales (stored biased by 32): the low
// four bits of scale s are in byte s (s < 8, low nibble) or s-8 (high nibble), the top two in
// byte 8 + s%4 at bit 2*(s/4).

#[inline(always)]
fn unpack_q3_k(b: &[u8; Q3_K_BYTES], q: &mut Codes, mul: &mut [f32; 16]) {
    let (hmask, rest) = b.split_at(QK_K / 8);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let (sc, dd) = rest.split_at(12);
    let d = f16_at(dd, 0);
    for (s, mu) in mul.iter_mut().enumerate() {
        let low = if s < 8 { sc[s] & 0x0f } else { sc[s - 8] >> 4 };
        let high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
        let scale = i32::from(low | (high << 4)) - 32;
        *mu = d * scale as f32;
    }
    for (n, (half, bytes)) in q.chunks_exact_mut(128).zip(qs.chunks_exact(32)).enumerate() {
        for (j, quarter) in half.chunks_exact_mut(32).enumerate() {
            let bit = 1u8 << (4 * n + j);
            for ((v, &byte), &hm) in quarter.iter_mut().zip(bytes).zip(hmask) {
                let low = i32::from((byte >> (2 * j)) & 3);
                let sub = if hm & bit != 0 { 0 } else { 4 };
                *v = (low - sub) as f32;
            }
        }
    }
}

pub(crate) fn dequant_q3_k(b: &[u8; Q3_K_BYTES], y: &mut [f32; QK_K]) {
    let (mut q, mut mul) = ([0.0; QK_K], [0.0; 16]);
    unpack_q3_k(b, &mut q, &mut mul);
    apply_scale::<16>(&q, &mul, y);
}

pub(crate) fn dot_q3_k(b: &[u8; Q3_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let (mut q, mut mul) = ([0.0; QK_K], [0.0; 16]);
    unpack_q3_k(b, &mut q, &mut mul);
    dot_scale::<16>(&q, &mul, x)
}

// ---------------------------------------------------------------------------------------------
// Q4_K / Q5_K: element g*64 + h*32 + l is nibble h of qs[g*32 + l] (Q5_K adds bit 2g+h of
// qh[l] as the fifth bit); sub-blocks of 32 with 6-bit scales and minimums packed in 12 bytes.

/// The 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`): sub-blocks 0..4
/// are the low six bits of bytes j and j+4; sub-blocks 4..8 take their low four bits from byte
/// j+4 and their top two from the spare bits of bytes j-4 and j.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn k4_scales(b: &[u8], mul: &mut [f32; 8], min: &mut [f32; 8]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    for (j, (mu, mi)) in mul.iter_mut().zip(min.iter_mut()).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        *mu = d * f32::from(sc);
        *mi = dmin * f32::from(m);
    }
}

#[inline(always)]
fn unpack_q4_k(b: &[u8; Q4_K_BYTES], q: &mut Codes, mul: &mut [f32; 8], min: &mut [f32; 8]) {
    k4_scales(b, mul, min);
    let qs = &b[16..];
    for (group, bytes) in q.chunks_exact_mut(64).zip(qs.chunks_exact(32)) {
        let (lo, hi) = group.split_at_mut(32);
        for ((l, h), &byte) in lo.iter_mut().zip(hi).zip(bytes) {
            *l = f32::from(byte & 0x0f);
            *h = f32::from(byte >> 4);
        }
    }
}

pub(crate) fn dequant_q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 8], [0.0; 8]);
    unpack_q4_k(b, &mut q, &mut mul, &mut min);
    apply_affine::<32>(&q, &mul, &min, y);
}

pub(crate) fn dot_q4_k(b: &[u8; Q4_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 8], [0.0; 8]);
    unpack_q4_k(b, &mut q, &mut mul, &mut min);
    dot_affine::<32>(&q, &mul, &min, x)
}

#[inline(always)]
fn unpack_q5_k(b: &[u8; Q5_K_BYTES], q: &mut Codes, mul: &mut [f32; 8], min: &mut [f32; 8]) {
    k4_scales(b, mul, min);
    let qh = &b[16..16 + QK_K / 8];
    let qs = &b[16 + QK_K / 8..];
    for (g, (group, bytes)) in q.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (lo, hi) = group.split_at_mut(32);
        for (((l, h), &byte), &high) in lo.iter_mut().zip(hi).zip(bytes).zip(qh) {
            let h0 = ((high >> (2 * g)) & 1) << 4;
            let h1 = ((high >> (2 * g + 1)) & 1) << 4;
            *l = f32::from((byte & 0x0f) | h0);
            *h = f32::from((byte >> 4) | h1);
        }
    }
}

pub(crate) fn dequant_q5_k(b: &[u8; Q5_K_BYTES], y: &mut [f32; QK_K]) {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 8], [0.0; 8]);
    unpack_q5_k(b, &mut q, &mut mul, &mut min);
    apply_affine::<32>(&q, &mul, &min, y);
}

pub(crate) fn dot_q5_k(b: &[u8; Q5_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let (mut q, mut mul, mut min) = ([0.0; QK_K], [0.0; 8], [0.0; 8]);
    unpack_q5_k(b, &mut q, &mut mul, &mut min);
    dot_affine::<32>(&q, &mul, &min, x)
}

// ---------------------------------------------------------------------------------------------
// Q6_K: element n*128 + k*32 + l takes its low four bits from nibble k/2 of
// ql[n*64 + (k%2)*32 + l] and its top two from bits 2k..2k+2 of qh[n*32 + l], biased by 32;
// sub-blocks of 16 with signed 8-bit scales.

#[inline(always)]
fn unpack_q6_k(b: &[u8; Q6_K_BYTES], q: &mut Codes, mul: &mut [f32; 16]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let (scales, dd) = rest.split_at(QK_K / 16);
    let d = f16_at(dd, 0);
    for (mu, &s) in mul.iter_mut().zip(scales) {
        *mu = d * f32::from(s as i8);
    }
    for ((half, ql), qh) in q
        .chunks_exact_mut(128)
        .zip(ql.chunks_exact(64))
        .zip(qh.chunks_exact(32))
    {
        for (k, quarter) in half.chunks_exact_mut(32).enumerate() {
            let low_bytes = &ql[(k % 2) * 32..(k % 2) * 32 + 32];
            let shift = 4 * (k / 2);
            for ((v, &lo), &hi) in quarter.iter_mut().zip(low_bytes).zip(qh) {
                let code = ((lo >> shift) & 0x0f) | (((hi >> (2 * k)) & 3) << 4);
                *v = (i32::from(code) - 32) as f32;
            }
        }
    }
}

pub(crate) fn dequant_q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
    let (mut q, mut mul) = ([0.0; QK_K], [0.0; 16]);
    unpack_q6_k(b, &mut q, &mut mul);
    apply_scale::<16>(&q, &mul, y);
}

pub(crate) fn dot_q6_k(b: &[u8; Q6_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let (mut q, mut mul) = ([0.0; QK_K], [0.0; 16]);
    unpack_q6_k(b, &mut q, &mut mul);
    dot_scale::<16>(&q, &mul, x)
}

// ---------------------------------------------------------------------------------------------
// Q8_K: a plain f32 scale over 256 signed bytes; the trailing per-16 sums are redundant with
// the codes and only used by ggml's integer dot products.

#[inline(always)]
fn unpack_q8_k(b: &[u8; Q8_K_BYTES], q: &mut Codes) -> f32 {
    for (v, &byte) in q.iter_mut().zip(&b[4..4 + QK_K]) {
        *v = f32::from(byte as i8);
    }
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn dequant_q8_k(b: &[u8; Q8_K_BYTES], y: &mut [f32; QK_K]) {
    let mut q = [0.0; QK_K];
    let d = unpack_q8_k(b, &mut q);
    for (y, &q) in y.iter_mut().zip(&q) {
        *y = d * q;
    }
}

pub(crate) fn dot_q8_k(b: &[u8; Q8_K_BYTES], x: &[f32; QK_K]) -> f32 {
    let mut q = [0.0; QK_K];
    let d = unpack_q8_k(b, &mut q);
    d * dot_lanes(&q, x)
}
