//! ggml tensor element types: block layouts, dequantization, fused row dot products and
//! reference quantizers.
//!
//! A ggml tensor row is a sequence of fixed-size *blocks*; each block encodes
//! [`GgmlType::block_len`] consecutive elements in [`GgmlType::block_bytes`] bytes. The layouts
//! follow ggml's `ggml-common.h`; the arithmetic follows ggml's scalar reference code
//! (`ggml-quants.c`) operation for operation, so dequantized values are bit-identical to ggml's.
//!
//! Everything here is scalar, portable code. [`dot_row`] is the reference the runtime's SIMD
//! kernels are checked against; it is written so the compiler can vectorise it on its own.

mod iquants;
mod kquantize;
mod kquants;
mod legacy;
mod quantize;
mod scale;

use std::fmt;

pub use iquants::IQ4_NL_VALUES;
pub use quantize::quantize;
pub use scale::scale_pow2;

/// Elements per block of the "legacy" quantizations (Q4_0 … Q8_1).
pub(crate) const QK: usize = 32;
/// Elements per super-block of the K-quantizations (Q2_K … Q8_K).
pub(crate) const QK_K: usize = 256;

/// A ggml tensor element type.
///
/// Only the types kiln implements are listed; a GGUF tensor of any other type is reported as
/// unsupported when the file is opened.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// 4-bit, 32 elements per block, one f16 scale: `x = d * (q - 8)`.
    Q4_0,
    /// 4-bit, 32 elements per block, f16 scale and minimum: `x = d * q + m`.
    Q4_1,
    /// 5-bit, 32 elements per block, one f16 scale: `x = d * (q - 16)`.
    Q5_0,
    /// 5-bit, 32 elements per block, f16 scale and minimum: `x = d * q + m`.
    Q5_1,
    /// 8-bit, 32 elements per block, one f16 scale: `x = d * q`.
    Q8_0,
    /// 8-bit, 32 elements per block, f16 scale and f16 `d * sum(q)` (an activation format).
    Q8_1,
    /// 2-bit K-quant: 256-element super-blocks of 16 sub-blocks with 4-bit scales and minimums.
    Q2_K,
    /// 3-bit K-quant: 256-element super-blocks of 16 sub-blocks with 6-bit scales.
    Q3_K,
    /// 4-bit K-quant: 256-element super-blocks of 8 sub-blocks with 6-bit scales and minimums.
    Q4_K,
    /// 5-bit K-quant: 256-element super-blocks of 8 sub-blocks with 6-bit scales and minimums.
    Q5_K,
    /// 6-bit K-quant: 256-element super-blocks of 16 sub-blocks with 8-bit scales.
    Q6_K,
    /// 8-bit K-quant with an f32 scale and per-16 sums (an activation format).
    Q8_K,
    /// Non-linear 4-bit, 32 elements per block, one f16 scale: `x = d * IQ4_NL_VALUES[q]`.
    IQ4_NL,
    /// Non-linear 4-bit in 256-element super-blocks of 8 sub-blocks with 6-bit scales:
    /// `x = d * (ls - 32) * IQ4_NL_VALUES[q]`.
    IQ4_XS,
    /// bfloat16: the upper half of an IEEE 754 binary32.
    BF16,
}

impl GgmlType {
    /// Every type kiln implements, in ggml id order.
    pub const ALL: [GgmlType; 17] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::BF16,
    ];

    /// The type with ggml type id `id`, or `None` if kiln does not implement it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml type id, as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::IQ4_NL => 20,
            GgmlType::IQ4_XS => 23,
            GgmlType::BF16 => 30,
        }
    }

    /// The type's name as ggml spells it (`"Q4_K"`, `"F32"`, …).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::IQ4_NL => "IQ4_NL",
            GgmlType::IQ4_XS => "IQ4_XS",
            GgmlType::BF16 => "BF16",
        }
    }

    /// The type named `name` (case-insensitive), or `None`.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block: 1 for the float types, 32 for Q4_0 … Q8_1 and IQ4_NL, 256 for the
    /// K-quants and IQ4_XS.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::IQ4_NL => QK,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K
            | GgmlType::IQ4_XS => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => legacy::Q4_0_BYTES,
            GgmlType::Q4_1 => legacy::Q4_1_BYTES,
            GgmlType::Q5_0 => legacy::Q5_0_BYTES,
            GgmlType::Q5_1 => legacy::Q5_1_BYTES,
            GgmlType::Q8_0 => legacy::Q8_0_BYTES,
            GgmlType::Q8_1 => legacy::Q8_1_BYTES,
            GgmlType::Q2_K => kquants::Q2_K_BYTES,
            GgmlType::Q3_K => kquants::Q3_K_BYTES,
            GgmlType::Q4_K => kquants::Q4_K_BYTES,
            GgmlType::Q5_K => kquants::Q5_K_BYTES,
            GgmlType::Q6_K => kquants::Q6_K_BYTES,
            GgmlType::Q8_K => kquants::Q8_K_BYTES,
            GgmlType::IQ4_NL => iquants::IQ4_NL_BYTES,
            GgmlType::IQ4_XS => iquants::IQ4_XS_BYTES,
        }
    }

    /// Bytes taken by `n_elements` consecutive elements, or `None` if `n_elements` is not a
    /// whole number of blocks or the size overflows `usize`.
    pub fn row_bytes(self, n_elements: usize) -> Option<usize> {
        if n_elements % self.block_len() != 0 {
            return None;
        }
        (n_elements / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Whether the type is a block quantization (anything but F32, F16 and BF16).
    pub fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A (de)quantization request that does not fit the type: a length that is not a whole number
/// of blocks, a byte count that does not match, or a type without a quantizer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DequantError(pub String);

/// Dequantizes `dst.len()` elements of type `ty` from `src` into `dst`.
///
/// `dst.len()` must be a multiple of `ty.block_len()` and `src.len()` must be exactly
/// `ty.row_bytes(dst.len())`; anything else is an error, never a panic. The results are
/// bit-identical to ggml's scalar `dequantize_row_*`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    let expected = ty.row_bytes(dst.len()).ok_or_else(|| {
        DequantError(format!(
            "cannot dequantize {} elements of {ty}: not a multiple of its block length {}",
            dst.len(),
            ty.block_len()
        ))
    })?;
    if src.len() != expected {
        return Err(DequantError(format!(
            "cannot dequantize {} elements of {ty}: expected {expected} bytes, got {}",
            dst.len(),
            src.len()
        )));
    }
    match ty {
        GgmlType::F32 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::BF16 => {
            for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::Q4_0 => each_block(src, dst, legacy::dequant_q4_0),
        GgmlType::Q4_1 => each_block(src, dst, legacy::dequant_q4_1),
        GgmlType::Q5_0 => each_block(src, dst, legacy::dequant_q5_0),
        GgmlType::Q5_1 => each_block(src, dst, legacy::dequant_q5_1),
        GgmlType::Q8_0 => each_block(src, dst, legacy::dequant_q8_0),
        GgmlType::Q8_1 => each_block(src, dst, legacy::dequant_q8_1),
        GgmlType::Q2_K => each_block(src, dst, kquants::dequant_q2_k),
        GgmlType::Q3_K => each_block(src, dst, kquants::dequant_q3_k),
        GgmlType::Q4_K => each_block(src, dst, kquants::dequant_q4_k),
        GgmlType::Q5_K => each_block(src, dst, kquants::dequant_q5_k),
        GgmlType::Q6_K => each_block(src, dst, kquants::dequant_q6_k),
        GgmlType::Q8_K => each_block(src, dst, kquants::dequant_q8_k),
        GgmlType::IQ4_NL => each_block(src, dst, iquants::dequant_iq4_nl),
        GgmlType::IQ4_XS => each_block(src, dst, iquants::dequant_iq4_xs),
    }
    Ok(())
}

/// The fused dot product of one row of type `ty` with `x`: `sum_i dequant(row)[i] * x[i]`,
/// computed block by block without materialising the dequantized row.
///
/// This is the scalar reference for the runtime's matrix-vector kernels. Each block's partial
/// sum is accumulated in f32 over eight independent lanes (so the compiler can vectorise it)
/// and then scaled, so the result differs from "dequantize, then dot" by rounding only.
///
/// `row.len()` must equal `ty.row_bytes(x.len())`. That is checked only in debug builds, since
/// this sits on the hot path; in release builds a mismatched row covers the shorter of the two.
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(
        Some(row.len()),
        ty.row_bytes(x.len()),
        "dot_row: {} bytes of {ty} do not hold {} elements",
        row.len(),
        x.len()
    );
    match ty {
        GgmlType::F32 => dot_f32_bytes(row, x),
        GgmlType::F16 => dot_half(row, x, f16_to_f32),
        GgmlType::BF16 => dot_half(row, x, bf16_to_f32),
        GgmlType::Q4_0 => dot_blocks(row, x, legacy::dot_q4_0),
        GgmlType::Q4_1 => dot_blocks(row, x, legacy::dot_q4_1),
        GgmlType::Q5_0 => dot_blocks(row, x, legacy::dot_q5_0),
        GgmlType::Q5_1 => dot_blocks(row, x, legacy::dot_q5_1),
        GgmlType::Q8_0 => dot_blocks(row, x, legacy::dot_q8_0),
        GgmlType::Q8_1 => dot_blocks(row, x, legacy::dot_q8_1),
        GgmlType::Q2_K => dot_blocks(row, x, kquants::dot_q2_k),
        GgmlType::Q3_K => dot_blocks(row, x, kquants::dot_q3_k),
        GgmlType::Q4_K => dot_blocks(row, x, kquants::dot_q4_k),
        GgmlType::Q5_K => dot_blocks(row, x, kquants::dot_q5_k),
        GgmlType::Q6_K => dot_blocks(row, x, kquants::dot_q6_k),
        GgmlType::Q8_K => dot_blocks(row, x, kquants::dot_q8_k),
        GgmlType::IQ4_NL => dot_blocks(row, x, iquants::dot_iq4_nl),
        GgmlType::IQ4_XS => dot_blocks(row, x, iquants::dot_iq4_xs),
    }
}

/// Converts IEEE binary16 bits to f32 (exact, NaN payloads kept).
///
/// Done with integer arithmetic and selects rather than through `half`, whose per-call
/// runtime CPU-feature dispatch costs more than the conversion itself and keeps the loops
/// that call this from vectorising.
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let h = u32::from(bits);
    // Exponent and mantissa moved into f32 position, exponent rebiased from 15 to 127.
    let shifted = (h & 0x7fff) << 13;
    let exp = shifted & 0x0f80_0000;
    let normal = shifted + ((127 - 15) << 23);
    // Infinity or NaN: push the exponent on to all ones.
    let inf_nan = normal + ((128 - 16) << 23);
    // Zero or subnormal: let the FPU normalise it. Adding one to the exponent and then
    // subtracting 2^-14 (the exponent's implicit one) leaves mantissa * 2^-24.
    let subnormal = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    // All three are computed and one selected, so a loop over this stays branch-free.
    let magnitude = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(magnitude | ((h & 0x8000) << 16))
}

/// Converts f32 to IEEE binary16 bits, rounding to nearest even (ggml's `GGML_FP32_TO_FP16`).
#[inline]
pub fn f32_to_f16(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// Converts bfloat16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Converts f32 to bfloat16 bits the way ggml does: round to nearest even, and NaNs are kept
/// NaN (quieted) rather than allowed to round into infinity.
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        ((u >> 16) | 64) as u16
    } else {
        ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Runs a per-block dequantizer over matching runs of blocks and outputs.
#[inline(always)]
fn each_block<const BYTES: usize, const LEN: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; BYTES], &mut [f32; LEN]),
) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(LEN)) {
        // chunks_exact yields exactly BYTES / LEN items, so these conversions cannot fail.
        if let (Ok(b), Ok(y)) = (b.try_into(), y.try_into()) {
            f(b, y);
        }
    }
}

/// Sums a per-block fused dot product over a row.
#[inline(always)]
fn dot_blocks<const BYTES: usize, const LEN: usize>(
    row: &[u8],
    x: &[f32],
    f: impl Fn(&[u8; BYTES], &[f32; LEN]) -> f32,
) -> f32 {
    let mut acc = 0.0f32;
    for (b, xs) in row.chunks_exact(BYTES).zip(x.chunks_exact(LEN)) {
        if let (Ok(b), Ok(xs)) = (b.try_into(), xs.try_into()) {
            acc += f(b, xs);
        }
    }
    acc
}

/// Number of independent accumulators in the inner dot loops: one 256-bit vector of f32.
pub(crate) const LANES: usize = 8;

/// `sum_i w[i] * x[i]` over eight interleaved lanes. Callers pass equal lengths that are
/// multiples of [`LANES`] (a remainder would be ignored).
#[inline(always)]
pub(crate) fn dot_lanes(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (wc, xc) in w.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for ((a, &wv), &xv) in acc.iter_mut().zip(wc).zip(xc) {
            *a += wv * xv;
        }
    }
    hsum(acc)
}

/// `sum_i x[i]` over eight interleaved lanes; `x.len()` is a multiple of [`LANES`].
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for xc in x.chunks_exact(LANES) {
        for (a, &xv) in acc.iter_mut().zip(xc) {
            *a += xv;
        }
    }
    hsum(acc)
}

#[inline(always)]
pub(crate) fn hsum(acc: [f32; LANES]) -> f32 {
    let a = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (a[0] + a[2]) + (a[1] + a[3])
}

fn dot_f32_bytes(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut row_chunks = row.chunks_exact(4 * LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (rc, xc) in (&mut row_chunks).zip(&mut x_chunks) {
        for ((a, b), &xv) in acc.iter_mut().zip(rc.chunks_exact(4)).zip(xc) {
            *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * xv;
        }
    }
    let mut tail = 0.0f32;
    for (b, &xv) in row_chunks
        .remainder()
        .chunks_exact(4)
        .zip(x_chunks.remainder())
    {
        tail += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * xv;
    }
    hsum(acc) + tail
}

fn dot_half(row: &[u8], x: &[f32], conv: impl Fn(u16) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut row_chunks = row.chunks_exact(2 * LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (rc, xc) in (&mut row_chunks).zip(&mut x_chunks) {
        for ((a, b), &xv) in acc.iter_mut().zip(rc.chunks_exact(2)).zip(xc) {
            *a += conv(u16::from_le_bytes([b[0], b[1]])) * xv;
        }
    }
    let mut tail = 0.0f32;
    for (b, &xv) in row_chunks
        .remainder()
        .chunks_exact(2)
        .zip(x_chunks.remainder())
    {
        tail += conv(u16::from_le_bytes([b[0], b[1]])) * xv;
    }
    hsum(acc) + tail
}
