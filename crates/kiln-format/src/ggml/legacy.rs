//! The 32-element block quantizations: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//!
//! Layouts (little-endian, `ggml-common.h`):
//!
//! | type | bytes | fields |
//! |------|-------|--------|
//! | Q4_0 | 18 | `d: f16`, `qs: [u8; 16]` |
//! | Q4_1 | 20 | `d: f16`, `m: f16`, `qs: [u8; 16]` |
//! | Q5_0 | 22 | `d: f16`, `qh: u32`, `qs: [u8; 16]` |
//! | Q5_1 | 24 | `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]` |
//! | Q8_0 | 34 | `d: f16`, `qs: [i8; 32]` |
//! | Q8_1 | 36 | `d: f16`, `s: f16`, `qs: [i8; 32]` |
//!
//! In the 4- and 5-bit types, element `j < 16` is the low nibble of `qs[j]` and element
//! `j + 16` its high nibble; the fifth bit of element `j` is bit `j` of `qh`.
//!
//! Each type has an `unpack_*` that writes the block's integer codes as f32 (exact: they are
//! small integers). Dequantization scales those codes; the fused dot product takes the dot of
//! the codes with the activations first and scales once per block, which is both what keeps
//! it cheap and why it differs from "dequantize, then dot" by rounding only.

use super::{dot_lanes, f16_at, sum_lanes, QK};

pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;
pub(crate) const Q4_1_BYTES: usize = 4 + QK / 2;
pub(crate) const Q5_0_BYTES: usize = 2 + 4 + QK / 2;
pub(crate) const Q5_1_BYTES: usize = 4 + 4 + QK / 2;
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
pub(crate) const Q8_1_BYTES: usize = 4 + QK;

#[inline(always)]
fn unpack_nibbles(qs: &[u8], offset: i32, q: &mut [f32; QK]) {
    let (lo, hi) = q.split_at_mut(QK / 2);
    for ((&b, l), h) in qs[..QK / 2].iter().zip(lo).zip(hi) {
        *l = (i32::from(b & 0x0f) + offset) as f32;
        *h = (i32::from(b >> 4) + offset) as f32;
    }
}

#[inline(always)]
fn unpack_nibbles_5(qh: u32, qs: &[u8], offset: i32, q: &mut [f32; QK]) {
    let (lo, hi) = q.split_at_mut(QK / 2);
    for (j, ((&b, l), h)) in qs[..QK / 2].iter().zip(lo).zip(hi).enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + QK / 2)) & 1) << 4;
        *l = ((u32::from(b & 0x0f) | h0) as i32 + offset) as f32;
        *h = ((u32::from(b >> 4) | h1) as i32 + offset) as f32;
    }
}

#[inline(always)]
fn unpack_i8(qs: &[u8], q: &mut [f32; QK]) {
    for (v, &b) in q.iter_mut().zip(&qs[..QK]) {
        *v = f32::from(b as i8);
    }
}

#[inline(always)]
fn qh_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn scale(q: &[f32; QK], d: f32, y: &mut [f32; QK]) {
    for (y, &q) in y.iter_mut().zip(q) {
        *y = q * d;
    }
}

#[inline(always)]
fn scale_min(q: &[f32; QK], d: f32, m: f32, y: &mut [f32; QK]) {
    for (y, &q) in y.iter_mut().zip(q) {
        *y = q * d + m;
    }
}

pub(crate) fn dequant_q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_nibbles(&b[2..], -8, &mut q);
    scale(&q, f16_at(b, 0), y);
}

pub(crate) fn dot_q4_0(b: &[u8; Q4_0_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_nibbles(&b[2..], -8, &mut q);
    f16_at(b, 0) * dot_lanes(&q, x)
}

pub(crate) fn dequant_q4_1(b: &[u8; Q4_1_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_nibbles(&b[4..], 0, &mut q);
    scale_min(&q, f16_at(b, 0), f16_at(b, 2), y);
}

pub(crate) fn dot_q4_1(b: &[u8; Q4_1_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_nibbles(&b[4..], 0, &mut q);
    f16_at(b, 0) * dot_lanes(&q, x) + f16_at(b, 2) * sum_lanes(x)
}

pub(crate) fn dequant_q5_0(b: &[u8; Q5_0_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_nibbles_5(qh_at(b, 2), &b[6..], -16, &mut q);
    scale(&q, f16_at(b, 0), y);
}

pub(crate) fn dot_q5_0(b: &[u8; Q5_0_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_nibbles_5(qh_at(b, 2), &b[6..], -16, &mut q);
    f16_at(b, 0) * dot_lanes(&q, x)
}

pub(crate) fn dequant_q5_1(b: &[u8; Q5_1_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_nibbles_5(qh_at(b, 4), &b[8..], 0, &mut q);
    scale_min(&q, f16_at(b, 0), f16_at(b, 2), y);
}

pub(crate) fn dot_q5_1(b: &[u8; Q5_1_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_nibbles_5(qh_at(b, 4), &b[8..], 0, &mut q);
    f16_at(b, 0) * dot_lanes(&q, x) + f16_at(b, 2) * sum_lanes(x)
}

pub(crate) fn dequant_q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_i8(&b[2..], &mut q);
    scale(&q, f16_at(b, 0), y);
}

pub(crate) fn dot_q8_0(b: &[u8; Q8_0_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_i8(&b[2..], &mut q);
    f16_at(b, 0) * dot_lanes(&q, x)
}

// Q8_1's second field (`d * sum(q)`) only speeds up dot products against Q4_1/Q5_1 weights;
// the element values depend on `d` and the codes alone.
pub(crate) fn dequant_q8_1(b: &[u8; Q8_1_BYTES], y: &mut [f32; QK]) {
    let mut q = [0.0; QK];
    unpack_i8(&b[4..], &mut q);
    scale(&q, f16_at(b, 0), y);
}

pub(crate) fn dot_q8_1(b: &[u8; Q8_1_BYTES], x: &[f32; QK]) -> f32 {
    let mut q = [0.0; QK];
    unpack_i8(&b[4..], &mut q);
    f16_at(b, 0) * dot_lanes(&q, x)
}
