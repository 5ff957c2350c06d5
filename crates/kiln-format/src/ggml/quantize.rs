//! Reference quantizers, following the arithmetic of ggml's `quantize_row_*_ref` so that
//! kiln-made test models hold the same bytes ggml would have written (the IQ4 types excepted:
//! their quantizers, in `iquants`, are kiln's own).

use super::{
    f32_to_bf16, f32_to_f16, iquants, kquantize, kquants, legacy, DequantError, GgmlType, QK, QK_K,
};

/// Quantizes `src` to type `ty` with ggml's reference semantics (`quantize_row_*_ref`):
/// round-to-nearest for the float and 32-element types, and for the K-quants ggml's
/// per-sub-block scale search without an importance matrix. IQ4_NL and IQ4_XS get kiln's own
/// least-squares scale search (valid blocks, not necessarily ggml's bytes).
///
/// Implemented for every [`GgmlType`]. `src.len()` must be a multiple of `ty.block_len()`.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, DequantError> {
    let n_bytes = ty.row_bytes(src.len()).ok_or_else(|| {
        DequantError(format!(
            "cannot quantize {} elements to {ty}: not a multiple of its block length {}",
            src.len(),
            ty.block_len()
        ))
    })?;
    let mut out = vec![0u8; n_bytes];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => each(src, &mut out, legacy::Q4_0_BYTES, quant_q4_0),
        GgmlType::Q4_1 => each(src, &mut out, legacy::Q4_1_BYTES, quant_q4_1),
        GgmlType::Q5_0 => each(src, &mut out, legacy::Q5_0_BYTES, quant_q5_0),
        GgmlType::Q5_1 => each(src, &mut out, legacy::Q5_1_BYTES, quant_q5_1),
        GgmlType::Q8_0 => each(src, &mut out, legacy::Q8_0_BYTES, quant_q8_0),
        GgmlType::Q8_1 => each(src, &mut out, legacy::Q8_1_BYTES, quant_q8_1),
        GgmlType::Q2_K => each_k(src, &mut out, kquants::Q2_K_BYTES, kquantize::quant_q2_k),
        GgmlType::Q3_K => each_k(src, &mut out, kquants::Q3_K_BYTES, kquantize::quant_q3_k),
        GgmlType::Q4_K => each_k(src, &mut out, kquants::Q4_K_BYTES, kquantize::quant_q4_k),
        GgmlType::Q5_K => each_k(src, &mut out, kquants::Q5_K_BYTES, kquantize::quant_q5_k),
        GgmlType::Q6_K => each_k(src, &mut out, kquants::Q6_K_BYTES, kquantize::quant_q6_k),
        GgmlType::Q8_K => each_k(src, &mut out, kquants::Q8_K_BYTES, kquantize::quant_q8_k),
        GgmlType::IQ4_NL => each(src, &mut out, iquants::IQ4_NL_BYTES, iquants::quant_iq4_nl),
        GgmlType::IQ4_XS => each_k(src, &mut out, iquants::IQ4_XS_BYTES, iquants::quant_iq4_xs),
    }
    Ok(out)
}

fn each(src: &[f32], out: &mut [u8], block_bytes: usize, f: fn(&[f32], &mut [u8])) {
    for (x, y) in src.chunks_exact(QK).zip(out.chunks_exact_mut(block_bytes)) {
        f(x, y);
    }
}

fn each_k(src: &[f32], out: &mut [u8], block_bytes: usize, f: fn(&[f32], &mut [u8])) {
    for (x, y) in src
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(block_bytes))
    {
        f(x, y);
    }
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
}

/// The element of largest magnitude, with its sign (the first one on ties).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 codes of up to 5 bits: low nibbles into `qs` (element j and j+16 share byte j),
/// fifth bits into `qh` if given.
fn pack(codes: &[u8; QK], qs: &mut [u8], qh: Option<&mut [u8]>) {
    let mut high = 0u32;
    for j in 0..QK / 2 {
        let (a, b) = (codes[j], codes[j + QK / 2]);
        qs[j] = (a & 0x0f) | ((b & 0x0f) << 4);
        high |= u32::from((a >> 4) & 1) << j;
        high |= u32::from((b >> 4) & 1) << (j + QK / 2);
    }
    if let Some(qh) = qh {
        qh.copy_from_slice(&high.to_le_bytes());
    }
}

// ggml truncates toward zero after adding 0.5 (or the bias plus 0.5) rather than calling
// round(); the `as i32` cast does the same and saturates on NaN/inf instead of invoking UB.

fn quant_q4_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    }
    pack(&codes, &mut y[2..], None);
}

fn quant_q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
    }
    pack(&codes, &mut y[4..], None);
}

fn quant_q5_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
    }
    let (qh, qs) = y[2..].split_at_mut(4);
    pack(&codes, qs, Some(qh));
}

fn quant_q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8;
    }
    let (qh, qs) = y[4..].split_at_mut(4);
    pack(&codes, qs, Some(qh));
}

/// Shared by Q8_0 and Q8_1: writes the codes, returns `(d, sum of codes)`.
fn quant_q8(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        // f32::round rounds half away from zero, like C's roundf.
        let code = (v * id).round() as i8;
        sum += i32::from(code);
        *q = code as u8;
    }
    (d, sum)
}

fn quant_q8_0(x: &[f32], y: &mut [u8]) {
    let (d, _) = quant_q8(x, &mut y[2..]);
    put_f16(y, 0, d);
}

fn quant_q8_1(x: &[f32], y: &mut [u8]) {
    let (d, sum) = quant_q8(x, &mut y[4..]);
    put_f16(y, 0, d);
    put_f16(y, 2, sum as f32 * d);
}
