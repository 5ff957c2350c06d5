//! Scalar references: the exact meaning of every kernel, and the error bound they are held to.
//!
//! Every weight block is read as *unsigned codes with per-sub-block affine parameters*:
//! element `i` of sub-block `s` is `w_i = d_s * u_i + m_s`, with `u_i` the unsigned integer
//! stored in the block. That form covers every format (Q4_0 is `d * u - 8d`, Q6_K is
//! `d * sc * u - 32 * d * sc`, Q4_K is `d * sc * u - dmin * mn`, …) and is the form the
//! SIMD kernels compute in: an integer dot product of codes per sub-block, then scales.
//! Signed codes are read with an offset of 128 (Q8_0's `q` is `u - 128`, IQ4's table level
//! `L[q]` is `(L[q] + 128) - 128`), which is how the VNNI kernels multiply them, and is the
//! larger of the forms kernels use, so [`error_bound`] covers those that multiply signed
//! codes directly.
//!
//! The reference does the same integer sums exactly and combines them in f64, so it is the
//! exact dot product of the dequantized weights and the dequantized activations up to one
//! rounding to f32 at the end.

use kiln_format::ggml::{bf16_to_f32, f16_to_f32, GgmlType, IQ4_NL_VALUES};

use crate::activation::{activation_format, ActivationFormat, QuantizedRow};
use crate::layout::*;

/// The scalar reference of [`crate::dot`]: `sum_i dequant(w)[i] * dequant(xq)[i]`, with the
/// integer part of every block exact and the rest in f64.
///
/// # Panics
/// As [`crate::dot`]: if `xq` is not in `activation_format(weights)` or `w_row` is not one
/// row of `xq.len()` elements.
pub fn dot_reference(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> f32 {
    crate::check_row(weights, w_row, xq);
    fold(weights, w_row, xq).0 as f32
}

/// `sum_i (|d_s * u_i| + |m_s|) * |x_i|` over the row, in the decomposition described in the
/// module docs (for float weights: `sum_i |w_i * x_i|`).
///
/// Every partial sum a kernel forms is bounded by this, so a kernel's rounding error is a
/// small multiple of `f32::EPSILON` times it; see [`error_bound`].
///
/// # Panics
/// As [`dot_reference`].
pub fn dot_magnitude(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> f64 {
    crate::check_row(weights, w_row, xq);
    fold(weights, w_row, xq).1
}

/// The largest difference the crate guarantees between a SIMD kernel and [`dot_reference`]:
/// `(len / 16 + 64) * f32::EPSILON * dot_magnitude(..)`.
///
/// The integer parts of all kernels are exact; what is left is f32 rounding of the per-block
/// scale products and of the accumulation, whose longest chain of additions is at most
/// `len / 16` plus a few horizontal steps.
pub fn error_bound(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> f64 {
    let m = dot_magnitude(weights, w_row, xq);
    (xq.len() / 16 + 64) as f64 * f64::from(f32::EPSILON) * m
}

/// One weight block in the unsigned-code form: element `i` is `d[i / sub] * u[i] + m[i / sub]`.
struct Decoded {
    u: [i32; QK_K],
    d: [f64; 16],
    m: [f64; 16],
    /// Elements per sub-block.
    sub: usize,
}

impl Decoded {
    fn new() -> Decoded {
        Decoded {
            u: [0; QK_K],
            d: [0.0; 16],
            m: [0.0; 16],
            sub: QK,
        }
    }
}

fn f16(b: &[u8], at: usize) -> f64 {
    f64::from(f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]])))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one block of `ty` (a quantized type) into `out`.
fn decode(ty: GgmlType, b: &[u8], out: &mut Decoded) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = f16(b, 0);
            let (m, qh, qs) = match ty {
                GgmlType::Q4_0 => (-8.0 * d, 0, 2),
                GgmlType::Q4_1 => (f16(b, 2), 0, 4),
                GgmlType::Q5_0 => (-16.0 * d, u32_at(b, 2), 6),
                _ => (f16(b, 2), u32_at(b, 4), 8),
            };
            for j in 0..16 {
                let byte = b[qs + j];
                let h0 = (qh >> j) & 1;
                let h1 = (qh >> (j + 16)) & 1;
                out.u[j] = (u32::from(byte & 0x0f) | (h0 << 4)) as i32;
                out.u[j + 16] = (u32::from(byte >> 4) | (h1 << 4)) as i32;
            }
            out.d[0] = d;
            out.m[0] = m;
            out.sub = QK;
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let d = f16(b, 0);
            let qs = if ty == GgmlType::Q8_0 { 2 } else { 4 };
            for j in 0..QK {
                out.u[j] = i32::from(b[qs + j] as i8) + 128;
            }
            out.d[0] = d;
            out.m[0] = -128.0 * d;
            out.sub = QK;
        }
        GgmlType::IQ4_NL => {
            let d = f16(b, 0);
            iq4_levels(&b[2..18], &mut out.u[..QK]);
            out.d[0] = d;
            out.m[0] = -128.0 * d;
            out.sub = QK;
        }
        GgmlType::IQ4_XS => {
            let d = f16(b, 0);
            let sh = u16::from_le_bytes([b[IQ4_XS_SCALES_H], b[IQ4_XS_SCALES_H + 1]]);
            for ib in 0..8 {
                let low = (b[IQ4_XS_SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0x0f;
                let high = ((sh >> (2 * ib)) & 3) as u8;
                out.d[ib] = d * f64::from(i32::from(low | (high << 4)) - 32);
                out.m[ib] = -128.0 * out.d[ib];
                let qs = IQ4_XS_QS + 16 * ib;
                iq4_levels(&b[qs..qs + 16], &mut out.u[32 * ib..32 * ib + 32]);
            }
            out.sub = QK;
        }
        GgmlType::Q8_K => {
            let d = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            for j in 0..QK_K {
                out.u[j] = i32::from(b[4 + j] as i8) + 128;
            }
            out.d[0] = d;
            out.m[0] = -128.0 * d;
            out.sub = QK_K;
        }
        GgmlType::Q2_K => {
            let d = f16(b, Q2_K_D);
            let dmin = f16(b, Q2_K_D + 2);
            for ((od, om), &sc) in out.d.iter_mut().zip(&mut out.m).zip(&b[..16]) {
                *od = d * f64::from(sc & 0x0f);
                *om = -dmin * f64::from(sc >> 4);
            }
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let byte = b[Q2_K_QS + n * 32 + l];
                        out.u[n * 128 + j * 32 + l] = i32::from((byte >> (2 * j)) & 3);
                    }
                }
            }
            out.sub = 16;
        }
        GgmlType::Q3_K => {
            let d = f16(b, Q3_K_D);
            let sc = &b[Q3_K_SCALES..Q3_K_SCALES + 12];
            for s in 0..16 {
                let low = if s < 8 { sc[s] & 0x0f } else { sc[s - 8] >> 4 };
                let high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                out.d[s] = d * f64::from(i32::from(low | (high << 4)) - 32);
                out.m[s] = -4.0 * out.d[s];
            }
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let low = (b[Q3_K_QS + n * 32 + l] >> (2 * j)) & 3;
                        let high = (b[l] >> (4 * n + j)) & 1;
                        out.u[n * 128 + j * 32 + l] = i32::from(low | (high << 2));
                    }
                }
            }
            out.sub = 16;
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let d = f16(b, 0);
            let dmin = f16(b, 2);
            let sc = &b[Q4_K_SCALES..Q4_K_SCALES + 12];
            for j in 0..8 {
                let (s, m) = if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0x0f) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                };
                out.d[j] = d * f64::from(s);
                out.m[j] = -dmin * f64::from(m);
            }
            let five = ty == GgmlType::Q5_K;
            let qs = if five { Q5_K_QS } else { Q4_K_QS };
            for g in 0..4 {
                for l in 0..32 {
                    let byte = b[qs + g * 32 + l];
                    let (h0, h1) = if five {
                        let qh = b[Q5_K_QH + l];
                        (((qh >> (2 * g)) & 1) << 4, ((qh >> (2 * g + 1)) & 1) << 4)
                    } else {
                        (0, 0)
                    };
                    out.u[g * 64 + l] = i32::from((byte & 0x0f) | h0);
                    out.u[g * 64 + 32 + l] = i32::from((byte >> 4) | h1);
                }
            }
            out.sub = 32;
        }
        GgmlType::Q6_K => {
            let d = f16(b, Q6_K_D);
            for s in 0..16 {
                out.d[s] = d * f64::from(b[Q6_K_SCALES + s] as i8);
                out.m[s] = -32.0 * out.d[s];
            }
            for n in 0..2 {
                for k in 0..4 {
                    for l in 0..32 {
                        let lo = (b[n * 64 + (k % 2) * 32 + l] >> (4 * (k / 2))) & 0x0f;
                        let hi = (b[Q6_K_QH + n * 32 + l] >> (2 * k)) & 3;
                        out.u[n * 128 + k * 32 + l] = i32::from(lo | (hi << 4));
                    }
                }
            }
            out.sub = 16;
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("float types are not block-decoded")
        }
    }
}

/// The 32 table levels packed in `qs` (16 bytes: element `j` low nibble of byte `j`, element
/// `j + 16` its high nibble), offset by 128.
fn iq4_levels(qs: &[u8], u: &mut [i32]) {
    let level = |q: u8| i32::from(IQ4_NL_VALUES[usize::from(q)]) + 128;
    for (j, &byte) in qs.iter().enumerate() {
        u[j] = level(byte & 0x0f);
        u[j + 16] = level(byte >> 4);
    }
}

/// Returns (dot product, magnitude) of a row already checked by the caller.
pub(crate) fn fold(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> (f64, f64) {
    match weights {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            let size = weights.block_bytes();
            for (b, &x) in w_row.chunks_exact(size).zip(&xq.values) {
                let w = match weights {
                    GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    GgmlType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                    _ => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                };
                let p = f64::from(w) * f64::from(x);
                sum += p;
                mag += p.abs();
            }
            (sum, mag)
        }
        _ => {
            debug_assert_ne!(xq.format, ActivationFormat::F32);
            let (len, bytes) = (weights.block_len(), weights.block_bytes());
            let act = activation_format(weights).block_len();
            let mut blk = Decoded::new();
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            for (bi, b) in w_row.chunks_exact(bytes).enumerate() {
                decode(weights, b, &mut blk);
                for (s, us) in blk.u[..len].chunks_exact(blk.sub).enumerate() {
                    let first = bi * len + s * blk.sub;
                    let (mut uq, mut q, mut uq_abs, mut q_abs) = (0i64, 0i64, 0i64, 0i64);
                    for (i, &u) in us.iter().enumerate() {
                        let x = i64::from(xq.code(first + i));
                        uq += i64::from(u) * x;
                        q += x;
                        uq_abs += (i64::from(u) * x).abs();
                        q_abs += x.abs();
                    }
                    let dx = f64::from(xq.scales[(bi * len + s * blk.sub) / act]);
                    let (d, m) = (blk.d[s] * dx, blk.m[s] * dx);
                    sum += d * uq as f64 + m * q as f64;
                    mag += d.abs() * uq_abs as f64 + m.abs() * q_abs as f64;
                }
            }
            (sum, mag)
        }
    }
}
