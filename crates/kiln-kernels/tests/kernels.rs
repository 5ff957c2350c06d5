//! Every SIMD kernel against the scalar reference, the reference against kiln-format's
//! dequantization, and the activation quantizers.

use kiln_format::ggml::{dequantize, f32_to_bf16, f32_to_f16, GgmlType};
use kiln_kernels::reference::{dot_magnitude, error_bound};
use kiln_kernels::{
    activation_format, available_isas, dot_block_with, dot_reference, dot_with, fuses_refined,
    i16_element, quantize_row, quantize_row_refined, ActivationFormat, Isa, QuantizedRow,
    I16_BLOCK, I16_CODE_MAX,
};
use proptest::prelude::*;

mod common;
use common::same_bits;

/// Weight types with SIMD kernels.
const SIMD_TYPES: [GgmlType; 15] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

/// How many of [`SIMD_TYPES`] are quantized (they come first).
const N_QUANTIZED: usize = 12;

/// Byte offsets of the f16 scale fields of a block (`ggml-common.h`).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
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

/// An f16 scale: random finite values and the extremes (zero, largest, smallest subnormal).
fn f16_scale() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => any::<u16>().prop_map(|h| if h & 0x7c00 == 0x7c00 { h & !0x4000 } else { h }),
        1 => Just(0u16),
        1 => Just(0x7bffu16),
        1 => Just(0xfbffu16),
        1 => Just(0x0001u16),
        1 => Just(0x8001u16),
        2 => (-4.0f32..4.0).prop_map(f32_to_f16),
    ]
}

/// How a block's codes are filled: random, all-zero block (scales too), codes all ones,
/// codes all zeros.
fn pattern() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)]
}

/// A row of `blocks` blocks of a quantized type.
fn quant_row(ty: GgmlType, blocks: usize) -> impl Strategy<Value = Vec<u8>> {
    let bytes = ty.block_bytes();
    (
        prop::collection::vec(any::<u8>(), blocks * bytes),
        prop::collection::vec((pattern(), f16_scale(), f16_scale()), blocks),
    )
        .prop_map(move |(mut raw, meta)| {
            for (blk, (pat, s0, s1)) in raw.chunks_exact_mut(bytes).zip(meta) {
                match pat {
                    1 => blk.fill(0),
                    2 => blk.fill(0xff),
                    3 => blk.fill(0),
                    _ => {}
                }
                if pat != 1 {
                    for (k, &at) in f16_fields(ty).iter().enumerate() {
                        let s = if k == 0 { s0 } else { s1 };
                        blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
                    }
                }
            }
            raw
        })
}

/// Float weights: finite values of every magnitude, stored in `ty`.
fn float_row(ty: GgmlType, n: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => -10.0f32..10.0,
            1 => Just(0.0f32),
            1 => -60000.0f32..60000.0,
            1 => -1e-6f32..1e-6,
        ],
        n,
    )
    .prop_map(move |v| {
        let mut out = Vec::new();
        for x in v {
            match ty {
                GgmlType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                GgmlType::F16 => out.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
                _ => out.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
            }
        }
        out
    })
}

/// Activations: ordinary, zero, tiny and large values, with whole blocks of zeros or of one
/// extreme value (codes at ±127).
fn activations(n: usize) -> impl Strategy<Value = Vec<f32>> {
    let bl = 32;
    (
        prop::collection::vec(
            prop_oneof![
                6 => -4.0f32..4.0,
                1 => Just(0.0f32),
                1 => -1e5f32..1e5,
                1 => -1e-20f32..1e-20,
            ],
            n,
        ),
        prop::collection::vec(0u8..6, n.div_ceil(bl)),
    )
        .prop_map(move |(mut x, pats)| {
            for (c, p) in x.chunks_mut(bl).zip(pats) {
                match p {
                    0 => c.fill(0.0),
                    1 => c.iter_mut().enumerate().for_each(|(i, v)| {
                        *v = if i % 3 == 0 { -1e4 } else { 1e4 };
                    }),
                    _ => {}
                }
            }
            x
        })
}

/// A weight row of `ty` and matching activations, with `units` blocks (super-blocks for the
/// K-quants, elements for floats) chosen from `max_units`.
fn case(ty: GgmlType, max_units: usize) -> impl Strategy<Value = (Vec<u8>, Vec<f32>)> {
    (1..=max_units).prop_flat_map(move |units| {
        let n = units * ty.block_len();
        let w = if ty.is_quantized() {
            quant_row(ty, units).boxed()
        } else {
            float_row(ty, n).boxed()
        };
        (w, activations(n))
    })
}

fn max_units(ty: GgmlType) -> usize {
    match ty.block_len() {
        1 => 100,
        32 => 13,
        _ => 3,
    }
}

fn quantized(ty: GgmlType, x: &[f32]) -> QuantizedRow {
    let mut xq = QuantizedRow::new();
    quantize_row(x, activation_format(ty), &mut xq);
    xq
}

fn check_all_isas(ty: GgmlType, w: &[u8], x: &[f32]) -> Result<(), TestCaseError> {
    let xq = quantized(ty, x);
    let want = dot_reference(ty, w, &xq);
    let bound = error_bound(ty, w, &xq);
    for isa in available_isas() {
        let got = dot_with(isa, ty, w, &xq);
        let diff = (f64::from(got) - f64::from(want)).abs();
        prop_assert!(
            diff <= bound,
            "{ty} {isa:?}: got {got}, reference {want}, |diff| {diff} > bound {bound}"
        );
    }
    Ok(())
}

macro_rules! simd_vs_reference {
    ($($name:ident: $ty:expr;)*) => {$(
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(384))]
            /// Every available level against the reference, within `error_bound`.
            #[test]
            fn $name((w, x) in case($ty, max_units($ty))) {
                check_all_isas($ty, &w, &x)?;
            }
        }
    )*};
}

simd_vs_reference! {
    q4_0_kernels_match_reference: GgmlType::Q4_0;
    q4_1_kernels_match_reference: GgmlType::Q4_1;
    q5_0_kernels_match_reference: GgmlType::Q5_0;
    q5_1_kernels_match_reference: GgmlType::Q5_1;
    q8_0_kernels_match_reference: GgmlType::Q8_0;
    q2_k_kernels_match_reference: GgmlType::Q2_K;
    q3_k_kernels_match_reference: GgmlType::Q3_K;
    q4_k_kernels_match_reference: GgmlType::Q4_K;
    q5_k_kernels_match_reference: GgmlType::Q5_K;
    q6_k_kernels_match_reference: GgmlType::Q6_K;
    iq4_nl_kernels_match_reference: GgmlType::IQ4_NL;
    iq4_xs_kernels_match_reference: GgmlType::IQ4_XS;
    f32_kernels_match_reference: GgmlType::F32;
    f16_kernels_match_reference: GgmlType::F16;
    bf16_kernels_match_reference: GgmlType::BF16;
}

/// The 32-element types, whose kernels take refined activation rows.
const REFINABLE: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::IQ4_NL,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]
    /// Refined rows: every level (one pass where it fuses them, the two plain rows otherwise)
    /// against the reference, within `error_bound`.
    #[test]
    fn refined_kernels_match_reference(
        (ty, w, x) in (0usize..REFINABLE.len()).prop_flat_map(|i| {
            let ty = REFINABLE[i];
            case(ty, max_units(ty)).prop_map(move |(w, x)| (ty, w, x))
        })
    ) {
        let mut xq = QuantizedRow::new();
        quantize_row_refined(&x, &mut xq);
        let want = dot_reference(ty, &w, &xq);
        let bound = error_bound(ty, &w, &xq);
        for isa in available_isas() {
            let got = dot_with(isa, ty, &w, &xq);
            let diff = (f64::from(got) - f64::from(want)).abs();
            prop_assert!(
                diff <= bound,
                "{ty} {isa:?} refined: got {got}, reference {want}, |diff| {diff} > bound {bound}"
            );
        }
    }
}

/// The formats with a planar row layout ([`kiln_kernels::planar`]).
const PLANAR: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Planar rows: packing then unpacking gives the GGUF bytes back, dequantizing gives the
    /// GGUF row's values bit for bit, and every level's
    /// planar products (plain and refined rows, tiles of four rows and the rows after them,
    /// one to three activation rows) equal its products of the GGUF rows bit for bit and stay
    /// within `error_bound` of the reference.
    #[test]
    fn planar_rows_match_gguf_rows(
        (ty, blocks, w, xs, refined) in (0usize..PLANAR.len(), 1usize..=14, 1usize..=6, 1usize..=3)
            .prop_flat_map(|(i, blocks, rows, tokens)| {
                let ty = PLANAR[i];
                let n = 32 * blocks;
                (
                    Just(ty),
                    Just(blocks),
                    prop::collection::vec(quant_row(ty, blocks), rows),
                    prop::collection::vec(activations(n), tokens),
                    any::<bool>(),
                )
            })
    ) {
        let cols = 32 * blocks;
        let row_bytes = w[0].len();
        let gguf: Vec<u8> = w.concat();
        let mut planar = vec![0u8; gguf.len()];
        kiln_kernels::planar::pack_rows(ty, cols, &gguf, &mut planar);
        let mut back = vec![0u8; row_bytes];
        let (mut want_values, mut values) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        for (r, row) in planar.chunks_exact(row_bytes).enumerate() {
            kiln_kernels::planar::unpack_row(ty, cols, row, &mut back);
            prop_assert_eq!(&back, &w[r], "{} row {}: the round trip changed it", ty, r);
            dequantize(ty, &w[r], &mut want_values).unwrap();
            kiln_kernels::planar::dequantize_row(ty, cols, row, &mut values);
            same_bits(&values, &want_values, || format!("{ty} planar row {r}"))?;
        }
        let xq: Vec<QuantizedRow> = xs
            .iter()
            .map(|x| {
                let mut q = QuantizedRow::new();
                if refined {
                    quantize_row_refined(x, &mut q);
                } else {
                    quantize_row(x, activation_format(ty), &mut q);
                }
                q
            })
            .collect();
        let n_rows = w.len();
        for isa in available_isas() {
            let mut want = vec![f32::NAN; n_rows * xq.len()];
            dot_block_with(isa, ty, &gguf, row_bytes, 0..n_rows, &xq, &mut want, n_rows);
            let mut got = vec![f32::NAN; n_rows * xq.len()];
            kiln_kernels::planar::dot_block(
                isa, ty, &planar, row_bytes, 0..n_rows, &xq, &mut got, n_rows,
            );
            for (t, x) in xq.iter().enumerate() {
                for r in 0..n_rows {
                    let (g, e) = (got[t * n_rows + r], want[t * n_rows + r]);
                    prop_assert!(
                        g.to_bits() == e.to_bits(),
                        "{ty} {isa:?} row {r} token {t}: planar {g}, GGUF {e}"
                    );
                    let reference = dot_reference(ty, &w[r], x);
                    let bound = error_bound(ty, &w[r], x);
                    let diff = (f64::from(g) - f64::from(reference)).abs();
                    prop_assert!(diff <= bound, "{ty} {isa:?}: {g} vs reference {reference}");
                }
            }
        }
    }
}

#[test]
fn planar_layout_is_offered_where_kernels_read_it() {
    use kiln_kernels::planar::supported;
    for ty in PLANAR {
        assert!(supported(Isa::Avx512Vnni, ty, 640), "{ty}");
        assert!(
            supported(Isa::Avx512Vnni, ty, 576),
            "{ty}: two blocks after the groups"
        );
        assert!(
            !supported(Isa::Avx512Vnni, ty, 600),
            "{ty}: not whole blocks"
        );
        assert!(
            !supported(Isa::Avx2, ty, 640),
            "{ty}: AVX2 has no planar kernels"
        );
    }
    assert!(!supported(Isa::Avx512Vnni, GgmlType::Q4_K, 1024));
    assert!(!supported(Isa::Avx512Vnni, GgmlType::IQ4_NL, 1024));
}

#[test]
fn planar_codes_sit_where_the_layout_says() {
    // Q4_0, 4 blocks: block k's element j has code (k * 5 + j) % 16, scale bytes [k, 0x3c].
    let mut gguf = vec![0u8; 4 * 18];
    for (k, blk) in gguf.chunks_exact_mut(18).enumerate() {
        blk[..2].copy_from_slice(&[k as u8, 0x3c]);
        let code = |j: usize| ((k * 5 + j) % 16) as u8;
        for j in 0..16 {
            blk[2 + j] = code(j) | code(j + 16) << 4;
        }
    }
    let mut planar = vec![0u8; gguf.len()];
    kiln_kernels::planar::pack_rows(GgmlType::Q4_0, 128, &gguf, &mut planar);
    for (i, &byte) in planar[..64].iter().enumerate() {
        let (lo, hi) = ((i / 32) * 5 + i % 32, (2 + i / 32) * 5 + i % 32);
        assert_eq!(
            byte,
            (lo % 16) as u8 | ((hi % 16) as u8) << 4,
            "code byte {i}"
        );
    }
    assert_eq!(
        &planar[64..72],
        &[0, 0x3c, 1, 0x3c, 2, 0x3c, 3, 0x3c],
        "scales"
    );

    // Three blocks, no whole group: blocks 0 and 1 share a run (low, high), block 2 follows
    // as GGUF stores it.
    let tail = &gguf[..3 * 18];
    let mut planar = vec![0u8; tail.len()];
    kiln_kernels::planar::pack_rows(GgmlType::Q4_0, 96, tail, &mut planar);
    for (i, &byte) in planar[..32].iter().enumerate() {
        assert_eq!(
            byte,
            (i % 16) as u8 | (((5 + i) % 16) as u8) << 4,
            "tail byte {i}"
        );
    }
    assert_eq!(
        &planar[32..48],
        &tail[2 * 18 + 2..3 * 18],
        "last block whole"
    );
    assert_eq!(&planar[48..54], &[0, 0x3c, 1, 0x3c, 2, 0x3c], "scales");
}

#[test]
fn refined_rows_are_fused_where_expected() {
    for ty in REFINABLE {
        for isa in [Isa::Avx512Vnni, Isa::Avx2, Isa::Neon, Isa::NeonDotprod] {
            assert!(
                fuses_refined(isa, ty),
                "{ty} on {isa:?} multiplies refined rows in one pass"
            );
        }
        assert!(!fuses_refined(Isa::Scalar, ty));
    }
    assert!(!fuses_refined(Isa::Avx512Vnni, GgmlType::Q4_K));
}

/// A refined row is a plain Q8_1 row's codes with a second int8 part in steps of 1/256 of its
/// scale: the error per element falls from half a step to half of 1/256 of a step.
#[test]
fn refined_rows_round_trip_within_a_512th_of_a_step() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    for round in 0..200 {
        let n = 32 * (1 + round % 7);
        let spread = [1e-3f64, 1.0, 40.0, 1e4][round % 4];
        let mut x: Vec<f32> = (0..n)
            .map(|_| ((next() * 2.0 - 1.0) * spread) as f32)
            .collect();
        if round % 5 == 0 {
            x[..32].fill(0.0);
        }
        if round % 3 == 0 {
            // Halfway values of the coarse step, where the low part reaches its ±127 clamp.
            x[40.min(n - 1)] = 3.5 * x[33.min(n - 1)].abs().max(1.0);
        }
        let mut plain = QuantizedRow::new();
        quantize_row(&x, ActivationFormat::Q8_1, &mut plain);
        let mut refined = QuantizedRow::new();
        quantize_row_refined(&x, &mut refined);
        assert!(refined.is_refined() && !plain.is_refined());
        assert_eq!(
            refined.codes(),
            plain.codes(),
            "the high parts are the plain codes"
        );
        let values = refined.dequantize();
        let mut into = vec![f32::NAN; n];
        refined.dequantize_into(&mut into);
        assert_eq!(values, into);
        for b in 0..n / 32 {
            let d = plain.scales()[b];
            assert_eq!(refined.scales()[b], d / 256.0);
            let mut code_sum = 0i64;
            for i in 32 * b..32 * (b + 1) {
                let code = 256 * i64::from(refined.codes()[i]) + i64::from(refined.low_codes()[i]);
                assert!(refined.low_codes()[i] != i8::MIN);
                code_sum += code;
                assert_eq!(values[i], refined.scales()[b] * code as f32);
                let err = (f64::from(values[i]) - f64::from(x[i])).abs();
                // Half a fine step, or one fine step where the low part was clamped; plus the
                // f32 rounding of the residual and of the value.
                let fine = f64::from(d) / 256.0;
                let bound =
                    fine * if refined.low_codes()[i].abs() == 127 {
                        1.01
                    } else {
                        0.51
                    } + 4.0 * f64::from(f32::EPSILON) * f64::from(x[i].abs());
                assert!(
                    err <= bound,
                    "x {} → {}: error {err} > {bound}",
                    x[i],
                    values[i]
                );
            }
            assert_eq!(
                refined.block_sums()[b],
                refined.scales()[b] * code_sum as f32
            );
        }
    }
}

/// Q8_1 and Q8_K weights go through the reference at every level.
#[test]
fn activation_types_as_weights() {
    for ty in [GgmlType::Q8_1, GgmlType::Q8_K] {
        let n = 512;
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5)
            .collect();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 89) as f32 / 11.0 - 4.0)
            .collect();
        let row = kiln_format::ggml::quantize(ty, &w).unwrap();
        let xq = quantized(ty, &x);
        let want = dot_reference(ty, &row, &xq);
        for isa in available_isas() {
            assert_eq!(dot_with(isa, ty, &row, &xq), want, "{ty} {isa:?}");
        }
        let exact: f64 = w
            .iter()
            .zip(&x)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        assert!((f64::from(want) - exact).abs() < 1e-2 * exact.abs().max(1.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Exactness: with power-of-two scales every product and partial sum is exact in f32, so any
// difference at all is a wrong integer somewhere.

fn pow2_f16(e: i32, neg: bool) -> u16 {
    f32_to_f16(if neg { -(2f32.powi(e)) } else { 2f32.powi(e) })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn kernels_are_exact_with_power_of_two_scales(
        ty_i in 0usize..N_QUANTIZED,
        units in 1usize..=9,
        seed in prop::collection::vec(any::<u8>(), 9 * 292),
        e_w in -8i32..4,
        e_x in -6i32..6,
        signs in prop::collection::vec((any::<bool>(), 0i32..3), 36),
        codes in prop::collection::vec(-15i8..=15, 9 * 256),
    ) {
        let ty = SIMD_TYPES[ty_i];
        let units = if ty.block_len() == 256 { units.div_ceil(3) } else { units };
        let bytes = ty.block_bytes();
        let mut w = seed[..units * bytes].to_vec();
        for (b, blk) in w.chunks_exact_mut(bytes).enumerate() {
            for (k, &at) in f16_fields(ty).iter().enumerate() {
                let (neg, de) = signs[(2 * b + k) % signs.len()];
                blk[at..at + 2].copy_from_slice(&pow2_f16(e_w + de, neg).to_le_bytes());
            }
        }
        if ty == GgmlType::Q6_K {
            // Smaller sub-block scales, so that the sums of a whole super-block stay below
            // 2^24 units and the case is not skipped.
            for blk in w.chunks_exact_mut(bytes) {
                for b in &mut blk[192..208] {
                    *b = ((*b as i8) >> 2) as u8;
                }
            }
        }
        let n = units * ty.block_len();
        let fmt = activation_format(ty);
        let blocks = n / fmt.block_len();
        let scales: Vec<f32> = (0..blocks).map(|b| 2f32.powi(e_x + (b % 2) as i32)).collect();
        let xq = QuantizedRow::from_codes(fmt, &codes[..n], &scales);
        // The smallest product of scales any term can carry is 2^(e_w + e_x); all terms are
        // integer multiples of it, and the sum stays exact while below 2^24 of them.
        let unit = 2f64.powi(e_w + e_x);
        let magnitude = dot_magnitude(ty, &w, &xq);
        if magnitude / unit < f64::from(1u32 << 24) {
            let want = dot_reference(ty, &w, &xq);
            for isa in available_isas() {
                let got = dot_with(isa, ty, &w, &xq);
                prop_assert_eq!(got, want, "{} {:?}", ty, isa);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tiles: every (row, activation row) pair of dot_block is the single dot product, bit for bit,
// and nothing outside the output tile is written.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]
    #[test]
    fn dot_block_equals_dot_for_every_pair(
        ty_i in 0usize..SIMD_TYPES.len(),
        units in 1usize..=6,
        n_rows in 1usize..=10,
        skip in 0usize..3,
        n_tok in 1usize..=5,
        pad in 0usize..3,
        seed in any::<u64>(),
        refine in any::<bool>(),
    ) {
        let ty = SIMD_TYPES[ty_i];
        // Refined rows where the type takes them (its activations are Q8_1).
        let refine = refine && activation_format(ty) == ActivationFormat::Q8_1;
        let units = if ty.block_len() == 256 { units.div_ceil(3) } else { units };
        let n = units * ty.block_len();
        let row_bytes = ty.row_bytes(n).unwrap();
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let total_rows = skip + n_rows;
        let floats: Vec<f32> = (0..total_rows * n)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let w: Vec<u8> = floats
            .chunks_exact(n)
            .flat_map(|r| kiln_format::ggml::quantize(ty, r).unwrap())
            .collect();
        let xq: Vec<QuantizedRow> = (0..n_tok)
            .map(|_| {
                let x: Vec<f32> = (0..n).map(|_| (next() % 4001) as f32 / 500.0 - 4.0).collect();
                if refine {
                    let mut xq = QuantizedRow::new();
                    quantize_row_refined(&x, &mut xq);
                    xq
                } else {
                    quantized(ty, &x)
                }
            })
            .collect();
        let stride = n_rows + pad;
        for isa in available_isas() {
            let mut out = vec![f32::NAN; (n_tok - 1) * stride + n_rows + pad];
            dot_block_with(isa, ty, &w, row_bytes, skip..total_rows, &xq, &mut out, stride);
            for (t, x) in xq.iter().enumerate() {
                for r in 0..n_rows {
                    let row = &w[(skip + r) * row_bytes..(skip + r + 1) * row_bytes];
                    let want = dot_reference(ty, row, x);
                    let got = out[t * stride + r];
                    // Tiling changes which rows are computed together, never the arithmetic
                    // of one (row, activation row) pair.
                    prop_assert_eq!(got.to_bits(), dot_with(isa, ty, row, x).to_bits());
                    let bound = error_bound(ty, row, x);
                    prop_assert!(
                        (f64::from(got) - f64::from(want)).abs() <= bound,
                        "{} {:?} row {} token {}: {} vs {}", ty, isa, r, t, got, want
                    );
                }
                for i in n_rows..stride.min(out.len() - t * stride) {
                    prop_assert!(out[t * stride + i].is_nan(), "{} {:?} wrote padding", ty, isa);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reference against kiln-format: dequantize the weights, take the f64 dot with the
// dequantized activations. The two differ only by the f32 rounding inside dequantization.

fn all_quantized_and_float() -> Vec<GgmlType> {
    let mut v = SIMD_TYPES.to_vec();
    v.extend([GgmlType::Q8_1, GgmlType::Q8_K]);
    v
}

/// Any implemented type with a row and activations (Q8_K weights come from its quantizer,
/// whose f32 scale random bytes would not keep finite).
fn any_case() -> impl Strategy<Value = (GgmlType, Vec<u8>, Vec<f32>)> {
    (0usize..SIMD_TYPES.len() + 2).prop_flat_map(|i| {
        let ty = all_quantized_and_float()[i];
        if ty == GgmlType::Q8_K {
            (1usize..=2)
                .prop_flat_map(|u| (activations(u * 256), activations(u * 256)))
                .prop_map(move |(f, x)| (ty, kiln_format::ggml::quantize(ty, &f).unwrap(), x))
                .boxed()
        } else {
            case(ty, max_units(ty).min(6))
                .prop_map(move |(w, x)| (ty, w, x))
                .boxed()
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn reference_matches_dequantization((ty, w, x) in any_case()) {
        let n = x.len();
        let xq = quantized(ty, &x);

        let mut wd = vec![0.0f32; n];
        dequantize(ty, &w, &mut wd).unwrap();
        let xd = xq.dequantize();
        let mut into = vec![f32::NAN; n];
        xq.dequantize_into(&mut into);
        prop_assert_eq!(&into, &xd, "{}: dequantize_into differs from dequantize", ty);
        let exact: f64 = wd.iter().zip(&xd).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let got = f64::from(dot_reference(ty, &w, &xq));
        let m = dot_magnitude(ty, &w, &xq);
        // Dequantization rounds each weight (at most three f32 operations) and each activation
        // once; the reference rounds once at the end.
        let tight = 8.0 * f64::from(f32::EPSILON) * m + 1e-30;
        prop_assert!((got - exact).abs() <= tight, "{}: {} vs {} (bound {})", ty, got, exact, tight);

        // Against the unquantized activations the only approximation is the activations'
        // quantization: each element is off by at most half its block's scale.
        let bl = activation_format(ty).block_len();
        let err: f64 = match xq.format() {
            ActivationFormat::F32 => 0.0,
            _ => wd
                .iter()
                .enumerate()
                .map(|(i, w)| f64::from(w.abs()) * f64::from(xq.scales()[i / bl]) * 0.5 * (1.0 + 1e-5))
                .sum(),
        };
        let exact_x: f64 = wd.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let wide = tight + err + 1e-30 + 8.0 * f64::from(f32::EPSILON)
            * wd.iter().zip(&x).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum::<f64>();
        prop_assert!((got - exact_x).abs() <= wide, "{}: {} vs {} (bound {})", ty, got, exact_x, wide);
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn quantizers_round_trip_within_half_a_step(
        k in any::<bool>(),
        units in 1usize..=3,
        x in prop::collection::vec(
            prop_oneof![
                4 => -4.0f32..4.0,
                1 => Just(0.0f32),
                1 => -1e30f32..1e30,
                1 => -1e-40f32..1e-40,
            ],
            768,
        ),
    ) {
        let fmt = if k { ActivationFormat::Q8_K } else { ActivationFormat::Q8_1 };
        let bl = fmt.block_len();
        let x = &x[..units * bl];
        let mut xq = QuantizedRow::new();
        quantize_row(x, fmt, &mut xq);
        prop_assert_eq!(xq.len(), x.len());
        prop_assert_eq!(xq.scales().len(), x.len() / bl);
        for (b, (xs, qs)) in x.chunks_exact(bl).zip(xq.codes().chunks_exact(bl)).enumerate() {
            let d = xq.scales()[b];
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert_eq!(d, amax / 127.0);
            for (&v, &q) in xs.iter().zip(qs) {
                prop_assert!(q != i8::MIN);
                let err = (f64::from(d) * f64::from(q) - f64::from(v)).abs();
                // Half a step, plus the f32 roundings of `v · (1 / d)` before it is rounded to
                // a code: the inverse and the product each within half an ulp of a value up to
                // 127, so under 127 · 2⁻²³ of a step together (a 1e-5 allowance failed on a
                // block scaled near 7e27 whose code was 100).
                let slack = 127.0 * 2f64.powi(-23);
                let bound = f64::from(d) * (0.5 + slack) + f64::from(f32::MIN_POSITIVE);
                prop_assert!(err <= bound, "x {} q {} d {}: err {} > {}", v, q, d, err, bound);
            }
            let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
            match fmt {
                ActivationFormat::Q8_1 => prop_assert_eq!(xq.block_sums()[b], d * sum as f32),
                _ => {
                    for g in 0..16 {
                        let s: i32 = qs[16 * g..16 * g + 16].iter().map(|&q| i32::from(q)).sum();
                        prop_assert_eq!(i32::from(xq.group_sums()[b * 16 + g]), s);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// 16-bit codes: per block of 256 (the last one shorter) `d = max|x| / 8191`, every code
    /// within ±8191 and every element within half a step, stored in the lookups' word order.
    #[test]
    fn wide_codes_round_trip_within_half_a_step(
        chunks in 1usize..=20,
        x in prop::collection::vec(
            prop_oneof![
                4 => -4.0f32..4.0,
                1 => Just(0.0f32),
                1 => -1e30f32..1e30,
                1 => -1e-40f32..1e-40,
            ],
            640,
        ),
    ) {
        let x = &x[..32 * chunks];
        let mut xq = QuantizedRow::new();
        quantize_row(x, ActivationFormat::I16, &mut xq);
        prop_assert_eq!(xq.len(), x.len());
        prop_assert!(xq.codes().is_empty());
        prop_assert_eq!(xq.scales().len(), x.len().div_ceil(I16_BLOCK));
        let back = xq.dequantize();
        for (b, xs) in x.chunks(I16_BLOCK).enumerate() {
            let d = xq.scales()[b];
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert_eq!(d, amax / f32::from(I16_CODE_MAX));
            let codes = &xq.wide_codes()[b * I16_BLOCK..b * I16_BLOCK + xs.len()];
            prop_assert!(codes.iter().all(|q| q.abs() <= I16_CODE_MAX));
            // The stored order, from the codes themselves: group by group.
            let mut g = 0;
            while g < xs.len() {
                let n = if g + 64 <= xs.len() { 64 } else { 32 };
                for p in 0..n {
                    let e = g + i16_element(p, n);
                    prop_assert_eq!(back[b * I16_BLOCK + e], d * f32::from(codes[g + p]));
                }
                g += n;
            }
            // Half a step, plus the f32 rounding of x / d (codes reach 8191, so a few parts in
            // 10^4 of a step).
            let mut g = 0;
            while g < xs.len() {
                let n = if g + 64 <= xs.len() { 64 } else { 32 };
                for p in 0..n {
                    let v = xs[g + i16_element(p, n)];
                    let err = (f64::from(d) * f64::from(codes[g + p]) - f64::from(v)).abs();
                    let bound = f64::from(d) * 0.5
                        + f64::from(v).abs() * f64::from(f32::EPSILON)
                        + f64::from(f32::MIN_POSITIVE);
                    prop_assert!(err <= bound, "x {} d {}: err {} > {}", v, d, err, bound);
                }
                g += n;
            }
        }
    }
}

/// The stored order of 16-bit codes is a permutation of each group: by lanes of 16, the first
/// eight elements of every lane, then the last eight.
#[test]
fn wide_code_order() {
    for n in [32, 64] {
        let mut seen = vec![false; n];
        for p in 0..n {
            seen[i16_element(p, n)] = true;
        }
        assert!(seen.iter().all(|&s| s), "{n}");
    }
    let order: Vec<usize> = (0..32).map(|p| i16_element(p, 32)).collect();
    let want: Vec<usize> = (0..8).chain(16..24).chain(8..16).chain(24..32).collect();
    assert_eq!(order, want);
    assert_eq!(i16_element(8, 64), 16);
    assert_eq!(i16_element(32, 64), 8);
    assert_eq!(i16_element(63, 64), 63);
    // Ties round to even, the largest magnitude is the code bound.
    let mut x = [0.0f32; 32];
    x[0] = 8191.0;
    x[1] = 2.5;
    x[2] = -3.5;
    let mut xq = QuantizedRow::new();
    quantize_row(&x, ActivationFormat::I16, &mut xq);
    assert_eq!(xq.scales(), &[1.0]);
    assert_eq!(&xq.wide_codes()[..3], &[8191, 2, -4]);
}

#[test]
#[should_panic(expected = "whole number of 32-element blocks")]
fn wide_codes_need_whole_chunks() {
    quantize_row(&[0.0; 48], ActivationFormat::I16, &mut QuantizedRow::new());
}

#[test]
fn quantizer_edge_cases() {
    let mut xq = QuantizedRow::new();
    quantize_row(&[0.0; 32], ActivationFormat::Q8_1, &mut xq);
    assert_eq!(xq.scales(), &[0.0]);
    assert!(xq.codes().iter().all(|&q| q == 0));
    // Non-finite input must not panic.
    let mut x = [1.0f32; 256];
    x[3] = f32::NAN;
    x[9] = f32::INFINITY;
    quantize_row(&x, ActivationFormat::Q8_K, &mut xq);
    let mut x = [1.0f32; 32];
    x[0] = f32::NAN;
    quantize_row(&x, ActivationFormat::Q8_1, &mut xq);
    assert_eq!(xq.scales()[0], 1.0 / 127.0);
    assert_eq!(xq.codes()[1], 127);
    // Ties round to even.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = 3.5;
    x[3] = -2.5;
    quantize_row(&x, ActivationFormat::Q8_1, &mut xq);
    assert_eq!(&xq.codes()[..4], &[127, 2, 4, -2]);
}

#[test]
fn quantize_row_reuses_its_buffers() {
    let mut xq = QuantizedRow::new();
    let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    quantize_row(&x, ActivationFormat::Q8_K, &mut xq);
    let (codes, scales, sums) = (
        xq.codes().as_ptr(),
        xq.scales().as_ptr(),
        xq.group_sums().as_ptr(),
    );
    for len in [1024, 512, 256] {
        quantize_row(&x[..len], ActivationFormat::Q8_K, &mut xq);
        assert_eq!(xq.codes().as_ptr(), codes);
        assert_eq!(xq.scales().as_ptr(), scales);
        assert_eq!(xq.group_sums().as_ptr(), sums);
    }
    quantize_row(&x, ActivationFormat::F32, &mut xq);
    assert_eq!(xq.values(), &x[..]);
    assert!(xq.codes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Misuse is reported, never undefined.

#[test]
#[should_panic(expected = "need Q8_1 activations")]
fn wrong_activation_format_panics() {
    let w = vec![0u8; 18];
    let mut xq = QuantizedRow::new();
    quantize_row(&[0.0; 256], ActivationFormat::Q8_K, &mut xq);
    dot_with(Isa::Scalar, GgmlType::Q4_0, &w, &xq);
}

#[test]
#[should_panic(expected = "are not one row")]
fn short_row_panics() {
    let w = vec![0u8; 17];
    let mut xq = QuantizedRow::new();
    quantize_row(&[0.0; 32], ActivationFormat::Q8_1, &mut xq);
    kiln_kernels::dot(GgmlType::Q4_0, &w, &xq);
}

#[test]
#[should_panic(expected = "do not hold rows")]
fn short_matrix_panics() {
    let w = vec![0u8; 18 * 3];
    let mut xq = QuantizedRow::new();
    quantize_row(&[0.0; 32], ActivationFormat::Q8_1, &mut xq);
    let mut out = [0.0; 4];
    kiln_kernels::dot_block(GgmlType::Q4_0, &w, 18, 0..4, &[xq], &mut out, 4);
}

#[test]
#[should_panic(expected = "too short")]
fn short_output_panics() {
    let w = vec![0u8; 18 * 4];
    let mut xq = QuantizedRow::new();
    quantize_row(&[0.0; 32], ActivationFormat::Q8_1, &mut xq);
    let mut out = [0.0; 7];
    kiln_kernels::dot_block(GgmlType::Q4_0, &w, 18, 0..4, &[xq.clone(), xq], &mut out, 4);
}

#[test]
fn every_level_this_cpu_reports_runs() {
    let isas = available_isas();
    assert_eq!(isas[0], Isa::Scalar);
    assert!(isas.contains(&kiln_kernels::detect()));
    eprintln!("levels available: {isas:?}");
}
