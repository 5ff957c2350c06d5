//! Properties of the ggml block code: type table facts, error handling, `dot_row` against
//! "dequantize, then dot" on random blocks, and quantizer round-trip error bounds.

use kiln_format::ggml::{self, GgmlType};
use proptest::prelude::*;

#[test]
fn type_table() {
    let expected = [
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
        (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
        (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
        (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
        (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
        (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
        (GgmlType::BF16, 30, "BF16", 1, 2),
    ];
    assert_eq!(GgmlType::ALL.len(), expected.len());
    for (ty, id, name, len, bytes) in expected {
        assert_eq!(ty.id(), id);
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.name(), name);
        assert_eq!(ty.to_string(), name);
        assert_eq!(GgmlType::from_name(&name.to_lowercase()), Some(ty));
        assert_eq!(ty.block_len(), len);
        assert_eq!(ty.block_bytes(), bytes);
        assert_eq!(ty.row_bytes(len * 3), Some(bytes * 3));
        assert_eq!(ty.row_bytes(0), Some(0));
        if len > 1 {
            assert_eq!(ty.row_bytes(len + 1), None);
        }
        assert_eq!(ty.is_quantized(), len > 1);
    }
    for id in [4, 5, 16, 29, 31, 39, 99, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "{id}");
    }
    // Overflow is None, not a panic.
    assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None);
}

#[test]
fn dequantize_rejects_mismatched_lengths() {
    let mut out = vec![0.0; 32];
    let e = ggml::dequantize(GgmlType::Q4_0, &[0; 17], &mut out).unwrap_err();
    assert!(e.to_string().contains("expected 18 bytes, got 17"), "{e}");
    let e = ggml::dequantize(GgmlType::Q4_0, &[0; 18], &mut out[..31]).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of its block length 32"),
        "{e}"
    );
    let e = ggml::dequantize(GgmlType::F32, &[0; 3], &mut out[..1]).unwrap_err();
    assert!(e.to_string().contains("expected 4 bytes"), "{e}");
    assert!(ggml::dequantize(GgmlType::Q6_K, &[], &mut []).is_ok());
    let e = ggml::quantize(GgmlType::Q4_K, &[0.0; 255]).unwrap_err();
    assert!(
        e.to_string().contains("Q4_K") && e.to_string().contains("256"),
        "{e}"
    );
    let e = ggml::quantize(GgmlType::Q8_0, &[0.0; 33]).unwrap_err();
    assert!(e.to_string().contains("33"), "{e}");
}

#[test]
fn q8_k_and_q8_1_layouts() {
    // Q8_K: f32 d, 256 signed codes, 16 i16 sums.
    let mut block = vec![0u8; 292];
    block[..4].copy_from_slice(&0.5f32.to_le_bytes());
    for i in 0..256 {
        block[4 + i] = (i as i32 - 128) as i8 as u8;
    }
    let mut out = vec![0.0; 256];
    ggml::dequantize(GgmlType::Q8_K, &block, &mut out).unwrap();
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, 0.5 * (i as f32 - 128.0));
    }
    // Q8_1 holds Q8_0's scale and codes, plus d * sum(codes).
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let q8_0 = ggml::quantize(GgmlType::Q8_0, &x).unwrap();
    let q8_1 = ggml::quantize(GgmlType::Q8_1, &x).unwrap();
    let (mut a, mut b) = (vec![0.0; 64], vec![0.0; 64]);
    ggml::dequantize(GgmlType::Q8_0, &q8_0, &mut a).unwrap();
    ggml::dequantize(GgmlType::Q8_1, &q8_1, &mut b).unwrap();
    assert_eq!(a, b);
    for blk in 0..2 {
        let bytes = &q8_1[blk * 36..(blk + 1) * 36];
        let d = ggml::f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]]));
        let s = ggml::f16_to_f32(u16::from_le_bytes([bytes[2], bytes[3]]));
        let sum: i32 = bytes[4..].iter().map(|&q| i32::from(q as i8)).sum();
        let want = ggml::f16_to_f32(ggml::f32_to_f16(sum as f32 * d));
        assert!(
            (s - want).abs() <= want.abs() * 2e-3 + 1e-6,
            "{s} vs {want}"
        );
    }
}

#[test]
fn half_conversions() {
    assert_eq!(ggml::f32_to_bf16(1.0), 0x3f80);
    // Round to nearest even at the halfway point.
    assert_eq!(ggml::f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(ggml::f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    // NaN stays NaN instead of rounding into infinity.
    let nan = ggml::f32_to_bf16(f32::from_bits(0x7fff_ffff));
    assert!(ggml::bf16_to_f32(nan).is_nan());
    assert_eq!(ggml::f32_to_f16(1.0), 0x3c00);
    assert_eq!(ggml::f16_to_f32(0x7bff), 65504.0);
    assert_eq!(ggml::f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(ggml::f16_to_f32(0x8000).to_bits(), 0x8000_0000);
    assert_eq!(ggml::f16_to_f32(0xfc00), f32::NEG_INFINITY);
    // Every f16, NaN payloads included, converts exactly and round-trips.
    for bits in 0..=u16::MAX {
        let v = ggml::f16_to_f32(bits);
        let exp = (bits >> 10) & 0x1f;
        let man = f64::from(bits & 0x3ff);
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        match exp {
            0x1f if man == 0.0 => assert_eq!(f64::from(v), sign * f64::INFINITY),
            0x1f => {
                assert!(v.is_nan(), "{bits:#06x}");
                assert_eq!(v.to_bits() >> 31, u32::from(bits >> 15));
                assert_eq!(v.to_bits() & 0x7f_ffff, u32::from(bits & 0x3ff) << 13);
            }
            0 => assert_eq!(f64::from(v), sign * man * 2f64.powi(-24), "{bits:#06x}"),
            e => assert_eq!(
                f64::from(v),
                sign * (1.0 + man / 1024.0) * 2f64.powi(i32::from(e) - 15),
                "{bits:#06x}"
            ),
        }
        if !v.is_nan() {
            assert_eq!(ggml::f32_to_f16(v), bits, "{bits:#06x}");
        }
    }
}

/// Byte offsets of the scale fields within each block type, to keep random blocks sane
/// (random bytes there would be NaN, infinity or 1e4-sized scales).
fn scale_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        _ => &[],
    }
}

fn sanitize(ty: GgmlType, bytes: &mut [u8], scales: &[f32]) {
    let mut s = scales.iter().cycle();
    match ty {
        GgmlType::F16 => {
            for b in bytes.chunks_exact_mut(2) {
                b.copy_from_slice(&ggml::f32_to_f16(*s.next().unwrap() * 100.0).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for b in bytes.chunks_exact_mut(2) {
                b.copy_from_slice(&ggml::f32_to_bf16(*s.next().unwrap() * 100.0).to_le_bytes());
            }
        }
        GgmlType::F32 => {
            for b in bytes.chunks_exact_mut(4) {
                b.copy_from_slice(&(*s.next().unwrap() * 100.0).to_le_bytes());
            }
        }
        GgmlType::Q8_K => {
            for b in bytes.chunks_exact_mut(ty.block_bytes()) {
                b[..4].copy_from_slice(&s.next().unwrap().to_le_bytes());
            }
        }
        _ => {
            for b in bytes.chunks_exact_mut(ty.block_bytes()) {
                for &off in scale_fields(ty) {
                    b[off..off + 2]
                        .copy_from_slice(&ggml::f32_to_f16(*s.next().unwrap()).to_le_bytes());
                }
            }
        }
    }
}

fn any_type() -> impl Strategy<Value = GgmlType> {
    proptest::sample::select(GgmlType::ALL.to_vec())
}

/// A random row: type, block bytes with sane scales, activations.
fn random_row() -> impl Strategy<Value = (GgmlType, Vec<u8>, Vec<f32>)> {
    (any_type(), 1usize..6).prop_flat_map(|(ty, blocks)| {
        let n = ty.block_len().max(8) * blocks + if ty.block_len() == 1 { blocks % 3 } else { 0 };
        let bytes = ty.row_bytes(n).unwrap();
        (
            Just(ty),
            proptest::collection::vec(any::<u8>(), bytes),
            proptest::collection::vec(-0.1f32..0.1, 64),
            proptest::collection::vec(-4.0f32..4.0, n),
        )
            .prop_map(move |(ty, mut bytes, scales, x)| {
                sanitize(ty, &mut bytes, &scales);
                (ty, bytes, x)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The fused dot product equals "dequantize, then dot" up to f32 rounding: within 1e-5
    /// relative to sum |w_i x_i| (the result itself may cancel to near zero).
    #[test]
    fn dot_row_matches_dequantize_then_dot((ty, row, x) in random_row()) {
        let mut w = vec![0.0f32; x.len()];
        ggml::dequantize(ty, &row, &mut w).unwrap();
        let (exact, mag) = w.iter().zip(&x).fold((0.0f64, 0.0f64), |(s, m), (&a, &b)| {
            let p = f64::from(a) * f64::from(b);
            (s + p, m + p.abs())
        });
        let got = ggml::dot_row(ty, &row, &x);
        prop_assert!(
            (f64::from(got) - exact).abs() <= 1e-5 * mag + 1e-12,
            "{}: dot_row {} vs {} (magnitude {})", ty, got, exact, mag
        );
    }

    /// Quantize-then-dequantize stays within each type's rounding bound, per block.
    #[test]
    fn quantizers_round_trip_within_bounds(
        x in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4),
        scale in prop_oneof![Just(1.0f32), Just(1e-3), Just(1e-6)],
        ty in proptest::sample::select(vec![
            GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q8_1,
            GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
        ]),
    ) {
        let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
        let q = ggml::quantize(ty, &x).unwrap();
        prop_assert_eq!(q.len(), ty.row_bytes(x.len()).unwrap());
        let mut y = vec![0.0f32; x.len()];
        ggml::dequantize(ty, &q, &mut y).unwrap();
        // f16 has an 11-bit significand: a stored scale is off by at most 2^-11 relative
        // (plus a subnormal step when tiny).
        let h = 2f32.powi(-11);
        let sub = 2f32.powi(-24);
        for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let (min, max) = xs.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            for (i, (&a, &b)) in xs.iter().zip(ys).enumerate() {
                let bound = match ty {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => a.abs() * h + sub,
                    GgmlType::BF16 => a.abs() * 2f32.powi(-8),
                    // Codes round to nearest: half a step, plus the stored scale's error
                    // times the largest code.
                    GgmlType::Q8_0 | GgmlType::Q8_1 => {
                        let d = amax / 127.0;
                        0.5 * d + 127.0 * (d * h + sub)
                    }
                    // The code for -max is clamped one step short: a full step.
                    GgmlType::Q4_0 => { let d = amax / 8.0; d + 8.0 * (d * h + sub) }
                    GgmlType::Q5_0 => { let d = amax / 16.0; d + 16.0 * (d * h + sub) }
                    GgmlType::Q4_1 => {
                        let d = (max - min) / 15.0;
                        0.5 * d + 15.0 * (d * h + sub) + min.abs() * h + sub
                    }
                    GgmlType::Q5_1 => {
                        let d = (max - min) / 31.0;
                        0.5 * d + 31.0 * (d * h + sub) + min.abs() * h + sub
                    }
                    _ => unreachable!(),
                };
                // Slack for the f32 arithmetic itself.
                let bound = bound * 1.001 + amax * 1e-6;
                prop_assert!(
                    (a - b).abs() <= bound,
                    "{} block {} element {}: {} -> {} (error {}, bound {})",
                    ty, blk, i, a, b, (a - b).abs(), bound
                );
            }
        }
    }

    /// Quantizers never panic, whatever the floats (NaN, infinities, subnormals, extremes).
    #[test]
    fn quantize_accepts_any_floats(
        ty in any_type(),
        bits in proptest::collection::vec(any::<u32>(), 256),
        specials in proptest::collection::vec(
            prop_oneof![
                Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), Just(f32::MAX),
                Just(f32::MIN), Just(f32::MIN_POSITIVE), Just(1e-45f32), Just(0.0f32), Just(-0.0f32),
            ],
            0..8,
        ),
    ) {
        let mut x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        for (i, v) in specials.into_iter().enumerate() {
            x[i * 31 % 256] = v;
        }
        let q = ggml::quantize(ty, &x).unwrap();
        prop_assert_eq!(q.len(), ty.row_bytes(256).unwrap());
        let mut y = vec![0.0f32; 256];
        ggml::dequantize(ty, &q, &mut y).unwrap();
    }

    /// Dequantization never panics on arbitrary bytes (NaN and infinite scales included).
    #[test]
    fn dequantize_and_dot_accept_any_bytes(ty in any_type(), seed in any::<u64>(), blocks in 0usize..4) {
        let n = ty.block_len() * blocks;
        let mut s = seed | 1;
        let bytes: Vec<u8> = (0..ty.row_bytes(n).unwrap())
            .map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s as u8 })
            .collect();
        let mut out = vec![0.0f32; n];
        ggml::dequantize(ty, &bytes, &mut out).unwrap();
        let x = vec![1.0f32; n];
        let _ = ggml::dot_row(ty, &bytes, &x);
    }
}

/// Relative RMS error of quantize → dequantize on Gaussian data, per K-quant and IQ4 type,
/// against bounds a little above what the quantizers achieve (measured: Q2_K 0.298,
/// Q3_K 0.151, Q4_K 0.071, Q5_K 0.036, Q6_K 0.018, Q8_K 0.0068 with ggml's reference
/// arithmetic; IQ4_NL 0.075 and IQ4_XS 0.076 with kiln's own scale search, against Q4_0's
/// 0.085 on the same data).
#[test]
fn k_quantizers_round_trip() {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut gauss = || {
        // Box-Muller over a xorshift generator: plenty for an error-rate check.
        let mut u = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    };
    let x: Vec<f32> = (0..256 * 64).map(|_| gauss() * 0.02).collect();
    let rms = |v: &mut dyn Iterator<Item = f32>, n: usize| {
        (v.map(|e| f64::from(e).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    let signal = rms(&mut x.iter().copied(), x.len());
    for (ty, bound) in [
        (GgmlType::Q2_K, 0.32),
        (GgmlType::Q3_K, 0.165),
        (GgmlType::Q4_K, 0.078),
        (GgmlType::Q5_K, 0.04),
        (GgmlType::Q6_K, 0.02),
        (GgmlType::Q8_K, 0.0075),
        (GgmlType::IQ4_NL, 0.08),
        (GgmlType::IQ4_XS, 0.08),
    ] {
        let q = ggml::quantize(ty, &x).unwrap();
        assert_eq!(q.len(), ty.row_bytes(x.len()).unwrap());
        let mut y = vec![0.0f32; x.len()];
        ggml::dequantize(ty, &q, &mut y).unwrap();
        let err = rms(&mut x.iter().zip(&y).map(|(a, b)| a - b), x.len()) / signal;
        assert!(err <= bound, "{ty}: relative rms error {err} above {bound}");

        // All zeros stay zeros; a scaled copy quantizes to a scaled result.
        let zeros = ggml::quantize(ty, &[0.0; 256]).unwrap();
        let mut z = vec![1.0f32; 256];
        ggml::dequantize(ty, &zeros, &mut z).unwrap();
        assert!(z.iter().all(|&v| v == 0.0), "{ty}: zeros");
    }
    // Q8_K rounds each element to the nearest step of amax / 127.
    let q = ggml::quantize(GgmlType::Q8_K, &x[..256]).unwrap();
    let mut y = vec![0.0f32; 256];
    ggml::dequantize(GgmlType::Q8_K, &q, &mut y).unwrap();
    let amax = x[..256].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (a, b) in x.iter().zip(&y) {
        assert!((a - b).abs() <= 0.5 * amax / 127.0 * 1.0001, "{a} vs {b}");
    }
    // Q8_K's per-16 sums match its codes.
    for j in 0..16 {
        let sum: i32 = q[4 + 16 * j..4 + 16 * (j + 1)]
            .iter()
            .map(|&c| i32::from(c as i8))
            .sum();
        let stored = i16::from_le_bytes([q[260 + 2 * j], q[261 + 2 * j]]);
        assert_eq!(sum, i32::from(stored));
    }
}
