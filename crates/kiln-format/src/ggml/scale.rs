//! Multiplying stored tensors by a power of two without requantizing them.
//!
//! Every ggml block format stores its values as integer codes times float fields (scales,
//! minimums, sums): `x = d·q`, `x = d·q + m`, `x = d·sc·q − dmin·m`. Scaling those float
//! fields by 2^k scales every value by 2^k and leaves the codes alone, so a quantized tensor
//! keeps its exact block contents — where requantizing the scaled values would round again.
//! A power of two is exact in any float format unless the result leaves its range (an fp16
//! field going subnormal or infinite); such fields are counted.

use super::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, DequantError, GgmlType};

/// A float field inside a block.
#[derive(Clone, Copy)]
enum Field {
    F32(usize),
    F16(usize),
    Bf16(usize),
}

/// The float fields of one block of `ty`, by byte offset.
fn fields(ty: GgmlType) -> &'static [Field] {
    use Field::*;
    match ty {
        GgmlType::F32 | GgmlType::Q8_K => &[F32(0)],
        GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[F16(0)],
        // IQ4_XS's sub-block scales are integers relative to d.
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[F16(0)],
        GgmlType::BF16 => &[Bf16(0)],
        // Q8_1's second field is d·sum(q), which scales with d.
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
            &[F16(0), F16(2)]
        }
        GgmlType::Q2_K => &[F16(80), F16(82)],
        GgmlType::Q3_K => &[F16(108)],
        GgmlType::Q6_K => &[F16(208)],
    }
}

/// Multiplies every value held in `data` (whole blocks of `ty`) by 2^`exp` in place, by
/// scaling the blocks' float fields.
///
/// Returns how many fields could not be scaled exactly (they left their format's normal range:
/// subnormal, zero or infinite). With 0, `dequantize(after) == 2^exp · dequantize(before)` for
/// every element, bit for bit. A length that is not a whole number of blocks is an error.
pub fn scale_pow2(ty: GgmlType, data: &mut [u8], exp: i32) -> Result<usize, DequantError> {
    let block = ty.block_bytes();
    if data.len() % block != 0 {
        return Err(DequantError(format!(
            "cannot scale {} bytes of {ty}: not a whole number of {block}-byte blocks",
            data.len()
        )));
    }
    if exp == 0 {
        return Ok(0);
    }
    let factor = 2f64.powi(exp);
    let mut inexact = 0usize;
    // Each field is scaled in f64 (exact for any f32 or f16 value and |exp| < 900), then
    // rounded back once; the field is exact when the rounding changed nothing.
    for b in data.chunks_exact_mut(block) {
        for &field in fields(ty) {
            match field {
                Field::F32(at) => {
                    let bytes: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
                    let want = f64::from(f32::from_le_bytes(bytes)) * factor;
                    let got = want as f32;
                    inexact += usize::from(f64::from(got) != want && want.is_finite());
                    b[at..at + 4].copy_from_slice(&got.to_le_bytes());
                }
                Field::F16(at) | Field::Bf16(at) => {
                    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
                    let half = matches!(field, Field::F16(_));
                    let to_f32 = if half { f16_to_f32 } else { bf16_to_f32 };
                    let from_f32 = if half { f32_to_f16 } else { f32_to_bf16 };
                    let want = f64::from(to_f32(bits)) * factor;
                    let got = from_f32(want as f32);
                    inexact += usize::from(f64::from(to_f32(got)) != want && want.is_finite());
                    b[at..at + 2].copy_from_slice(&got.to_le_bytes());
                }
            }
        }
    }
    Ok(inexact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{dequantize, quantize};

    /// Deterministic values with a few outliers, none so small that an fp16 element or block
    /// scale divided by 2^3 would be subnormal.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let u = u + 0.1f32.copysign(u);
                if i % 97 == 0 {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect()
    }

    #[test]
    fn every_format_scales_exactly() {
        for ty in GgmlType::ALL {
            let v = values(512, ty as u64 + 1);
            let mut data = quantize(ty, &v).unwrap();
            let mut before = vec![0.0f32; v.len()];
            dequantize(ty, &data, &mut before).unwrap();
            for exp in [-3, 2] {
                let mut scaled = data.clone();
                assert_eq!(
                    scale_pow2(ty, &mut scaled, exp).unwrap(),
                    0,
                    "{ty} by 2^{exp}"
                );
                let mut after = vec![0.0f32; v.len()];
                dequantize(ty, &scaled, &mut after).unwrap();
                let factor = 2f32.powi(exp);
                for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                    assert_eq!(*a, b * factor, "{ty} by 2^{exp}, element {i}");
                }
            }
            // Scaling back restores the bytes.
            let original = data.clone();
            assert_eq!(scale_pow2(ty, &mut data, -2).unwrap(), 0);
            assert_eq!(scale_pow2(ty, &mut data, 2).unwrap(), 0);
            assert_eq!(data, original, "{ty}: 2^-2 then 2^2");
        }
    }

    #[test]
    fn fields_leaving_the_range_are_counted() {
        // 1 + 2^-10 times 2^-20 needs a bit below fp16's smallest subnormal, 2^-24; 0 and 1
        // scale exactly.
        let mut data = quantize(GgmlType::F16, &[1.0, 1.0 + 2f32.powi(-10), 0.0]).unwrap();
        assert_eq!(scale_pow2(GgmlType::F16, &mut data, -20).unwrap(), 1);
        let mut data = quantize(GgmlType::F16, &[60000.0]).unwrap();
        assert_eq!(scale_pow2(GgmlType::F16, &mut data, 1).unwrap(), 1);
        let mut odd = vec![0u8; 19];
        assert!(scale_pow2(GgmlType::Q4_0, &mut odd, 1).is_err());
    }
}
