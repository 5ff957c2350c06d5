//! The K-quant dequantization of `kiln_kernels::ggml_dequant` (AVX-512 kernels where the CPU
//! has them) against kiln-format's scalar dequantization, bit for bit, on random super-blocks.

use kiln_format::ggml::{self, f32_to_f16, GgmlType};
use kiln_kernels::gemm_bf16::{bf16_available, to_bf16};
use kiln_kernels::ggml_dequant::{
    dequantize_row, dequantize_row_bf16, has_bf16_kernel, has_kernel,
};
use kiln_kernels::{detect, Isa};
use proptest::prelude::*;

mod common;
use common::same_bits;

const QK_K: usize = 256;

/// The K-quants with kernels, with each one's super-block size and the offsets of its f16
/// scales (`d`, then `dmin` where it has one).
const TYPES: [(GgmlType, usize, &[usize]); 5] = [
    (GgmlType::Q2_K, 84, &[80, 82]),
    (GgmlType::Q3_K, 110, &[108]),
    (GgmlType::Q4_K, 144, &[0, 2]),
    (GgmlType::Q5_K, 176, &[0, 2]),
    (GgmlType::Q6_K, 210, &[208]),
];

/// A finite f16 scale: ordinary values, zeros of both signs, the extremes of the range,
/// subnormals, and any finite bit pattern.
fn f16_value() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => (-4.0f32..4.0).prop_map(f32_to_f16),
        1 => Just(0u16),
        1 => Just(0x8000u16),
        1 => Just(0x7bffu16),
        1 => Just(0xfbffu16),
        1 => Just(0x0001u16),
        1 => (0u16..0x0400).prop_map(|m| m | 0x8000),
        1 => (-1e-3f32..1e-3).prop_map(f32_to_f16),
        2 => any::<u16>().prop_filter("finite", |h| h & 0x7c00 != 0x7c00),
    ]
}

/// One row of 1..=4 super-blocks of `TYPES[i]`: random bytes, random f16 scales.
fn row(i: usize) -> impl Strategy<Value = Vec<u8>> {
    let (_, bytes, scales) = TYPES[i];
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), bytes),
            prop::collection::vec(f16_value(), scales.len()),
        ),
        1..=4,
    )
    .prop_map(move |blocks| {
        blocks
            .into_iter()
            .flat_map(|(mut b, ds)| {
                for (&at, d) in scales.iter().zip(ds) {
                    b[at..at + 2].copy_from_slice(&d.to_le_bytes());
                }
                b
            })
            .collect()
    })
}

fn type_and_row() -> impl Strategy<Value = (usize, Vec<u8>)> {
    (0..TYPES.len()).prop_flat_map(|i| (Just(i), row(i)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// f32 values bit for bit kiln-format's; bf16 values those rounded.
    #[test]
    fn matches_kiln_format((i, row) in type_and_row()) {
        let ty = TYPES[i].0;
        let n = row.len() / TYPES[i].1 * QK_K;
        let mut want = vec![0.0f32; n];
        ggml::dequantize(ty, &row, &mut want).unwrap();
        let mut got = vec![f32::NAN; n];
        dequantize_row(ty, &row, &mut got);
        same_bits(&got, &want, || format!("{ty} against kiln-format"))?;
        let mut words = vec![0xffffu16; n];
        dequantize_row_bf16(ty, &row, &mut words);
        for (k, (&g, &w)) in words.iter().zip(&want).enumerate() {
            prop_assert!(
                g == to_bf16(w),
                "{ty} element {k}: bf16 {g:#06x} for {w:e} ({:#06x})",
                to_bf16(w)
            );
        }
    }
}

/// On an AVX-512 VNNI machine the kernels are what the test above compares (not the scalar
/// dequantization against itself), the bf16 ones wherever the bf16 GEMM runs.
#[test]
fn kernels_in_use() {
    for (ty, _, _) in TYPES {
        assert_eq!(has_kernel(ty), detect() == Isa::Avx512Vnni, "{ty}");
        assert_eq!(
            has_bf16_kernel(ty),
            has_kernel(ty) && bf16_available(),
            "{ty}"
        );
    }
    assert!(!has_kernel(GgmlType::Q8_0) && !has_kernel(GgmlType::Q8_K));
}

/// The other types pass through to kiln-format's dequantization.
#[test]
fn other_types_fall_back() {
    let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let row = ggml::quantize(GgmlType::Q4_0, &w).unwrap();
    let mut want = vec![0.0f32; 64];
    ggml::dequantize(GgmlType::Q4_0, &row, &mut want).unwrap();
    let mut got = vec![0.0f32; 64];
    dequantize_row(GgmlType::Q4_0, &row, &mut got);
    assert_eq!(got, want);
    let mut words = vec![0u16; 64];
    dequantize_row_bf16(GgmlType::Q4_0, &row, &mut words);
    assert!(words.iter().zip(&want).all(|(&g, &w)| g == to_bf16(w)));
}

#[test]
#[should_panic(expected = "not one row of 256 Q4_K elements")]
fn length_mismatch_panics() {
    dequantize_row(GgmlType::Q4_K, &[0u8; 143], &mut [0.0f32; 256]);
}

#[test]
#[should_panic(expected = "not one row of 255 Q6_K elements")]
fn partial_super_block_panics() {
    dequantize_row_bf16(GgmlType::Q6_K, &[0u8; 210], &mut [0u16; 255]);
}
