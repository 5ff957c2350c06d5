//! The kiln-format kernels (`I8_CH`, `I4_B64`, lookup tables, `LUT4_B32`) at every available level
//! against their scalar reference, and the reference against kiln-format's dequantization.

use kiln_format::ggml::f32_to_f16;
use kiln_format::kiln_types::{self, KilnType};
use kiln_kernels::gemm_bf16::{bf16_available, to_bf16};
use kiln_kernels::kiln_formats::{
    activation_format, convert_row_tables, dequantize_row_bf16, dequantize_row_with,
    dequantize_rows, dequantize_rows_bf16, dot_block_with, dot_reference, error_bound,
    has_bf16_dequantize, lut_table_i16, KilnMatrix, LUT_I16_ENTRY_MAX,
};
use kiln_kernels::{
    available_isas, planar, quantize_row, quantize_row_refined, ActivationFormat, QuantizedRow,
};
use proptest::prelude::*;

mod common;
use common::same_bits;

/// An f16 scale or table entry: ordinary values, zero, the extremes of the range.
fn f16_value() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => (-4.0f32..4.0).prop_map(f32_to_f16),
        1 => Just(0u16),
        1 => Just(0x7bffu16),
        1 => Just(0xfbffu16),
        1 => Just(0x0001u16),
        1 => (-1e-3f32..1e-3).prop_map(f32_to_f16),
    ]
}

/// An f32 row scale of `I8_CH`.
fn f32_scale() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -0.1f32..0.1,
        1 => Just(0.0f32),
        1 => -1e4f32..1e4,
        1 => -1e-30f32..1e-30,
    ]
}

/// The bytes of a `rows` × `cols` tensor of `ty`: random codes or indices (every byte value,
/// including `I8_CH`'s −128), random scales and tables.
fn tensor(ty: KilnType, rows: usize, cols: usize) -> BoxedStrategy<Vec<u8>> {
    let row_bytes = ty.row_bytes(cols).unwrap();
    match ty {
        // Every row's codes, then every row's scale.
        KilnType::I8Ch => (
            prop::collection::vec(any::<u8>(), rows * cols),
            prop::collection::vec(f32_scale(), rows),
        )
            .prop_map(|(codes, scales)| {
                codes
                    .into_iter()
                    .chain(scales.into_iter().flat_map(f32::to_le_bytes))
                    .collect()
            })
            .boxed(),
        KilnType::I4B64 => prop::collection::vec(
            (f16_value(), prop::collection::vec(any::<u8>(), 32)),
            rows * cols / 64,
        )
        .prop_map(|bs| {
            bs.into_iter()
                .flat_map(|(d, q)| d.to_le_bytes().into_iter().chain(q))
                .collect()
        })
        .boxed(),
        KilnType::Lut4B32 { .. } => (
            prop::collection::vec(
                (
                    f32_scale(),
                    f32_scale(),
                    prop::collection::vec(any::<u8>(), cols / 32 * 18),
                ),
                rows,
            ),
            // Any entries of the 7-bit grid, in any order, in every table.
            prop::collection::vec(
                0u8..=kiln_types::LUT4_B32_ENTRY_MAX,
                16 * ty.lut4_b32_tables(rows).unwrap(),
            ),
        )
            .prop_map(|(rs, table)| {
                rs.into_iter()
                    .flat_map(|(s, m, blocks)| {
                        s.to_le_bytes()
                            .into_iter()
                            .chain(m.to_le_bytes())
                            .chain(blocks)
                    })
                    .chain(table)
                    .collect()
            })
            .boxed(),
        KilnType::Lut { .. } => {
            let tables = ty.tables(rows).unwrap() * ty.table_len();
            (
                prop::collection::vec(any::<u8>(), rows * row_bytes),
                prop::collection::vec(f16_value(), tables),
            )
                .prop_map(|(idx, t)| {
                    idx.into_iter()
                        .chain(t.into_iter().flat_map(u16::to_le_bytes))
                        .collect()
                })
                .boxed()
        }
    }
}

/// Activations with zero blocks, tiny and large values.
fn activations(n: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(
            prop_oneof![
                6 => -4.0f32..4.0,
                1 => Just(0.0f32),
                1 => -1e4f32..1e4,
                1 => -1e-20f32..1e-20,
            ],
            n,
        ),
        prop::collection::vec(0u8..6, n.div_ceil(32)),
    )
        .prop_map(|(mut x, pats)| {
            for (c, p) in x.chunks_mut(32).zip(pats) {
                if p == 0 {
                    c.fill(0.0);
                }
            }
            x
        })
}

/// A tensor of `ty` with 1..=9 rows (a multiple of the table group) and 1..=`max_units`
/// units of columns, and 1..=5 activation rows.
fn case(
    ty: KilnType,
    max_units: usize,
) -> impl Strategy<Value = (usize, usize, Vec<u8>, Vec<Vec<f32>>)> {
    let group = match ty {
        KilnType::Lut { group: Some(g), .. } | KilnType::Lut4B32 { group: Some(g) } => g as usize,
        _ => 1,
    };
    (1..=9usize / group.min(9), 1..=max_units, 1..=5usize).prop_flat_map(move |(g, u, t)| {
        let rows = g * group;
        let cols = u * ty.row_multiple();
        (
            Just(rows),
            Just(cols),
            tensor(ty, rows, cols),
            prop::collection::vec(activations(cols), t),
        )
    })
}

fn check(
    ty: KilnType,
    rows: usize,
    cols: usize,
    data: &[u8],
    xs: &[Vec<f32>],
) -> Result<(), TestCaseError> {
    check_with(ty, rows, cols, data, xs, false)?;
    if activation_format(ty) == ActivationFormat::Q8_1 {
        // Refined rows too: the kernels take their two plain rows, the reference the 16-bit
        // codes.
        check_with(ty, rows, cols, data, xs, true)?;
    }
    Ok(())
}

fn check_with(
    ty: KilnType,
    rows: usize,
    cols: usize,
    data: &[u8],
    xs: &[Vec<f32>],
    refine: bool,
) -> Result<(), TestCaseError> {
    let w = KilnMatrix::new(ty, data, rows, cols).expect("a well-sized tensor");
    let xq: Vec<QuantizedRow> = xs
        .iter()
        .map(|x| {
            let mut q = QuantizedRow::new();
            if refine {
                quantize_row_refined(x, &mut q);
            } else {
                quantize_row(x, activation_format(ty), &mut q);
            }
            q
        })
        .collect();
    // The reference is the exact product of the dequantized weights and activations, up to
    // f64 and one rounding to f32. Against 16-bit activations the weights are the table's
    // 16-bit integers times its scale, each within half the scale of the stored entry.
    let mut wrow = vec![0.0f32; cols];
    let mut wide = vec![0.0f64; cols];
    for r in 0..rows {
        kiln_types::dequantize_row(ty, data, rows, cols, r, &mut wrow);
        if activation_format(ty) == ActivationFormat::I16 {
            let (at, len) = kiln_types::lut_table_range(ty, rows, cols, r);
            let mut u = [0i16; 256];
            let s = lut_table_i16(&data[at..at + len], &mut u);
            let table = &data[at..at + len];
            let amax = table
                .chunks_exact(2)
                .map(|h| kiln_format::ggml::f16_to_f32(u16::from_le_bytes([h[0], h[1]])).abs())
                .fold(0.0f32, f32::max);
            prop_assert_eq!(s, amax / f32::from(LUT_I16_ENTRY_MAX));
            prop_assert!(u.iter().all(|v| v.abs() <= LUT_I16_ENTRY_MAX));
            for (c, &v) in wrow.iter().enumerate() {
                // The entry this weight is: the table index of the stored value.
                let e = table
                    .chunks_exact(2)
                    .position(|h| {
                        kiln_format::ggml::f16_to_f32(u16::from_le_bytes([h[0], h[1]])) == v
                    })
                    .expect("a table value");
                let q = f64::from(s) * f64::from(u[e]);
                // Half a step, and the f32 rounding of the scale and of the product with its
                // reciprocal: up to 2^-24 each of an entry of up to 16383 steps, 0.002 of a step.
                prop_assert!(
                    (q - f64::from(v)).abs() <= f64::from(s) * (0.5 + 4e-3),
                    "{ty} row {r}: entry {v} as {q} (scale {s})"
                );
                wide[c] = q;
            }
        } else {
            wide.iter_mut()
                .zip(&wrow)
                .for_each(|(w, &v)| *w = f64::from(v));
        }
        for q in &xq {
            let x = q.dequantize();
            let exact: f64 = wide.iter().zip(&x).map(|(&a, &b)| a * f64::from(b)).sum();
            let mag: f64 = wide
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a * f64::from(b)).abs())
                .sum();
            let reference = f64::from(dot_reference(&w, r, q));
            // LUT4_B32's reference takes each block's offset times the activation block's sum,
            // a product rounded to f32 once (for a refined row once per part, each part's sum
            // within about twice the block's magnitudes), where `exact` adds the rounded
            // activations: when a block's scaled entries and offset cancel, that rounding is
            // not bounded by `mag`.
            let offsets = if matches!(ty, KilnType::Lut4B32 { .. }) {
                let row = &data[r * ty.row_bytes(cols).unwrap()..];
                let m = f64::from(f32::from_le_bytes([row[4], row[5], row[6], row[7]]));
                (0..cols / 32)
                    .map(|b| (m * f64::from(row[8 + 18 * b + 1] as i8)).abs())
                    .zip(x.chunks_exact(32))
                    .map(|(mb, xb)| mb * xb.iter().map(|&v| f64::from(v).abs()).sum::<f64>())
                    .sum::<f64>()
            } else {
                0.0
            };
            prop_assert!(
                (reference - exact).abs() <= 1e-6 * mag + 2f64.powi(-21) * offsets + 1e-30,
                "{ty} row {r}: reference {reference}, exact {exact}"
            );
        }
    }
    // Every level, over row ranges not starting at 0 and not ending at the last row when
    // there is room (so with table groups they start and end inside a group, and tiles of
    // four rows straddle groups, by every number of rows for groups of up to six), into a
    // strided output.
    let inner = (rows >= 3).then(|| 1..rows - 1);
    let starts = (2..rows.min(6)).map(|s| s..rows);
    for range in std::iter::once(usize::from(rows > 4)..rows)
        .chain(inner)
        .chain(starts)
    {
        let start = range.start;
        let n = range.len();
        let stride = n + 3;
        for isa in available_isas() {
            let mut out = vec![f32::NAN; (xq.len() - 1) * stride + n];
            dot_block_with(isa, &w, range.clone(), &xq, &mut out, stride);
            for (t, q) in xq.iter().enumerate() {
                for k in 0..n {
                    let got = f64::from(out[t * stride + k]);
                    let want = f64::from(dot_reference(&w, start + k, q));
                    let bound = error_bound(&w, start + k, q);
                    prop_assert!(
                        (got - want).abs() <= bound,
                        "{ty} {isa:?} row {} token {t} (refined {refine}): got {got}, \
                         reference {want}, bound {bound}",
                        start + k
                    );
                }
            }
        }
    }
    if matches!(
        ty,
        KilnType::Lut4B32 { .. }
            | KilnType::Lut {
                bits: 2 | 4 | 6,
                ..
            }
            | KilnType::I4B64
    ) && (cols >= 256 || !matches!(ty, KilnType::Lut { bits: 2, .. }))
    {
        check_planar(&w, data, &xq)?;
    }
    if let Some(tables) = convert_row_tables(&w) {
        // Tables converted ahead: the products of converting them per call, bit for bit.
        let c = w
            .with_row_tables(&tables)
            .expect("tables of the tensor's size");
        same_products(&w, &c, &xq, "with converted tables")?;
    }
    Ok(())
}

/// Every level multiplies every row of `other` (the same tensor in another layout, or with
/// its tables converted ahead) with `xq` exactly as it does `w`'s rows, bit for bit.
fn same_products(
    w: &KilnMatrix,
    other: &KilnMatrix,
    xq: &[QuantizedRow],
    what: &str,
) -> Result<(), TestCaseError> {
    let (ty, rows) = (w.format(), w.rows());
    let n = xq.len() * rows;
    for isa in available_isas() {
        let (mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        dot_block_with(isa, w, 0..rows, xq, &mut a, rows);
        dot_block_with(isa, other, 0..rows, xq, &mut b, rows);
        same_bits(&b, &a, || {
            format!("{ty} {isa:?} products ({what}) against the stored rows'")
        })?;
    }
    Ok(())
}

/// The planar rows of a `LUT4_B32`, `LUT4`, `LUT2` (a whole I16 block or more), `LUT6` or
/// `I4_B64` tensor: a round trip gives the stored bytes back, and every level multiplies and
/// dequantizes them with exactly the results of the stored rows (with the tables converted
/// ahead too, where the format has them).
fn check_planar(w: &KilnMatrix, data: &[u8], xq: &[QuantizedRow]) -> Result<(), TestCaseError> {
    let (ty, rows, cols) = (w.format(), w.rows(), w.cols());
    let row_bytes = ty.row_bytes(cols).unwrap();
    let body = rows * row_bytes;
    let mut planar = data.to_vec();
    planar::kiln::pack_rows(ty, cols, &data[..body], &mut planar[..body]);
    if cols > 32 && data[..row_bytes].iter().any(|&b| b != data[0]) {
        // Two blocks or more, not all one byte: the layouts differ, so a kernel reading the
        // wrong one fails.
        prop_assert_ne!(&planar[..row_bytes], &data[..row_bytes]);
    }
    let mut back = vec![0u8; row_bytes];
    for r in 0..rows {
        let at = r * row_bytes..(r + 1) * row_bytes;
        planar::kiln::unpack_row(ty, cols, &planar[at.clone()], &mut back);
        prop_assert_eq!(&back[..], &data[at]);
    }
    let p = KilnMatrix::new_planar(ty, &planar, rows, cols).expect("a well-sized tensor");
    if let Some(tables) = convert_row_tables(w) {
        let c = p
            .with_row_tables(&tables)
            .expect("tables of the tensor's size");
        same_products(w, &c, xq, "planar, with converted tables")?;
    }
    same_products(w, &p, xq, "planar")?;
    let (mut want, mut got) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    for isa in available_isas() {
        for r in 0..rows {
            dequantize_row_with(isa, w, r, &mut want);
            dequantize_row_with(isa, &p, r, &mut got);
            same_bits(&got, &want, || format!("{ty} {isa:?} planar row {r}"))?;
        }
    }
    // The bf16 rows of the planar layout are the stored rows' values rounded.
    prop_assert_eq!(has_bf16_dequantize(&p), bf16_available());
    let mut words = vec![0u16; cols];
    for r in 0..rows {
        kiln_types::dequantize_row(ty, data, rows, cols, r, &mut want);
        dequantize_row_bf16(&p, r, &mut words);
        for (i, (&g, &e)) in words.iter().zip(&want).enumerate() {
            prop_assert!(
                g == to_bf16(e),
                "{ty} planar row {r} element {i}: bf16 {g:#06x} for {e}"
            );
        }
    }
    for (r, x) in (0..rows).zip(xq) {
        prop_assert_eq!(
            dot_reference(w, r, x).to_bits(),
            dot_reference(&p, r, x).to_bits()
        );
    }
    Ok(())
}

macro_rules! kernels_match_reference {
    ($($name:ident: $ty:expr, $units:expr;)*) => {$(
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(160))]
            /// Every available level against the reference, within `error_bound`.
            #[test]
            fn $name((rows, cols, data, xs) in case($ty, $units)) {
                check($ty, rows, cols, &data, &xs)?;
            }
        }
    )*};
}

kernels_match_reference! {
    i8_ch: KilnType::I8Ch, 9;
    i4_b64: KilnType::I4B64, 5;
    lut4_b32: KilnType::Lut4B32 { group: None }, 9;
    lut4_b32_groups_of_two: KilnType::Lut4B32 { group: Some(2) }, 9;
    lut4_b32_groups_of_three: KilnType::Lut4B32 { group: Some(3) }, 9;
    lut4_b32_groups_of_six: KilnType::Lut4B32 { group: Some(6) }, 9;
    lut4_b32_groups_of_sixteen: KilnType::Lut4B32 { group: Some(16) }, 9;
    lut2: KilnType::Lut { bits: 2, group: None }, 19;
    lut2_groups_of_one: KilnType::Lut { bits: 2, group: Some(1) }, 19;
    lut2_groups_of_three: KilnType::Lut { bits: 2, group: Some(3) }, 19;
    lut2_groups_of_sixteen: KilnType::Lut { bits: 2, group: Some(16) }, 19;
    lut4_per_tensor: KilnType::Lut { bits: 4, group: None }, 19;
    lut4_groups_of_one: KilnType::Lut { bits: 4, group: Some(1) }, 19;
    lut4_groups_of_two: KilnType::Lut { bits: 4, group: Some(2) }, 19;
    lut4_groups_of_three: KilnType::Lut { bits: 4, group: Some(3) }, 19;
    lut4_groups_of_sixteen: KilnType::Lut { bits: 4, group: Some(16) }, 19;
    lut6: KilnType::Lut { bits: 6, group: None }, 19;
    lut6_groups_of_two: KilnType::Lut { bits: 6, group: Some(2) }, 19;
    lut8: KilnType::Lut { bits: 8, group: None }, 19;
    lut8_groups_of_four: KilnType::Lut { bits: 8, group: Some(4) }, 19;
}

macro_rules! dequantization_matches_reference {
    ($($name:ident: $ty:expr, $units:expr;)*) => {$(
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]
            /// Every level's dequantization gives kiln-format's values, bit for bit, and the
            /// bf16 dequantization those values rounded (by its kernel where the CPU has
            /// AVX-512 BF16).
            #[test]
            fn $name((rows, cols, data, _xs) in case($ty, $units)) {
                let w = KilnMatrix::new($ty, &data, rows, cols).expect("a well-sized tensor");
                prop_assert_eq!(has_bf16_dequantize(&w), bf16_available());
                let (mut want, mut got) = (vec![0.0f32; cols], vec![0.0f32; cols]);
                let mut words = vec![0u16; cols];
                // A panel of every row at once, padded by three words a row.
                let stride = cols + 3;
                let mut panel = vec![0x7fc1u16; rows * stride];
                dequantize_rows_bf16(&w, 0..rows, &mut panel, stride);
                // Every row but the first in f32, as a prompt panel takes them.
                let mut values = vec![f32::NAN; (rows - 1) * cols];
                dequantize_rows(&w, 1..rows, &mut values);
                for r in 0..rows {
                    kiln_types::dequantize_row($ty, &data, rows, cols, r, &mut want);
                    if r > 0 {
                        let row = &values[(r - 1) * cols..r * cols];
                        same_bits(row, &want, || format!("{} rows from 1, row {r}", $ty))?;
                    }
                    words.fill(0x7fc1);
                    dequantize_row_bf16(&w, r, &mut words);
                    let row = &panel[r * stride..(r + 1) * stride];
                    prop_assert_eq!(&row[..cols], &words[..], "{} row {} of a panel", $ty, r);
                    prop_assert_eq!(&row[cols..], &[0u16; 3][..]);
                    for (i, (&g, &e)) in words.iter().zip(&want).enumerate() {
                        prop_assert!(
                            g == to_bf16(e),
                            "{} row {r} element {i}: bf16 {g:#06x} for {e}",
                            $ty
                        );
                    }
                    for isa in available_isas() {
                        got.fill(f32::NAN);
                        dequantize_row_with(isa, &w, r, &mut got);
                        same_bits(&got, &want, || format!("{} {isa:?} row {r}", $ty))?;
                    }
                }
            }
        }
    )*};
}

dequantization_matches_reference! {
    dequantize_lut4_b32: KilnType::Lut4B32 { group: None }, 9;
    dequantize_lut4_b32_groups_of_three: KilnType::Lut4B32 { group: Some(3) }, 9;
    dequantize_i8_ch: KilnType::I8Ch, 3;
    dequantize_i4_b64: KilnType::I4B64, 5;
    dequantize_lut2_groups_of_three: KilnType::Lut { bits: 2, group: Some(3) }, 9;
    dequantize_lut4: KilnType::Lut { bits: 4, group: None }, 4;
    dequantize_lut6_groups_of_two: KilnType::Lut { bits: 6, group: Some(2) }, 4;
    dequantize_lut8: KilnType::Lut { bits: 8, group: None }, 4;
    dequantize_lut8_groups_of_four: KilnType::Lut { bits: 8, group: Some(4) }, 4;
}

/// Rows wider than the cases above, in both layouts: `I4_B64` rows of 29 to 35 blocks (the
/// planar kernel converts the scales 16 at a time, and an odd count leaves a block unpaired),
/// `LUT4_B32` rows of 33 to 39 blocks (the planar kernel makes the multipliers of 8 groups of
/// four ahead, then takes the blocks after the last group). Every level and the prompt panel's
/// rows give kiln-format's values bit for bit.
fn wide_rows() -> impl Strategy<Value = (KilnType, usize, Vec<u8>)> {
    prop_oneof![
        (29usize..36).prop_map(|nb| (KilnType::I4B64, nb * 64)),
        (33usize..40).prop_map(|nb| (KilnType::Lut4B32 { group: None }, nb * 32)),
        (33usize..40).prop_map(|nb| (KilnType::Lut4B32 { group: Some(1) }, nb * 32)),
    ]
    .prop_flat_map(|(ty, cols)| (Just(ty), Just(cols), tensor(ty, 2, cols)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn wide_rows_dequantize_exactly((ty, cols, data) in wide_rows()) {
        let rows = 2;
        let row_bytes = ty.row_bytes(cols).unwrap();
        let body = rows * row_bytes;
        let mut packed = data.clone();
        planar::kiln::pack_rows(ty, cols, &data[..body], &mut packed[..body]);
        let stored = KilnMatrix::new(ty, &data, rows, cols).expect("a well-sized tensor");
        let planar = KilnMatrix::new_planar(ty, &packed, rows, cols).expect("a well-sized tensor");
        let mut want = vec![0.0f32; cols];
        let mut got = vec![0.0f32; cols];
        for w in [&stored, &planar] {
            let mut panel = vec![f32::NAN; rows * cols];
            dequantize_rows(w, 0..rows, &mut panel);
            for r in 0..rows {
                kiln_types::dequantize_row(ty, &data, rows, cols, r, &mut want);
                let row = &panel[r * cols..(r + 1) * cols];
                same_bits(row, &want, || {
                    format!("{ty} planar {}: panel row {r}", w.is_planar())
                })?;
                for isa in available_isas() {
                    got.fill(f32::NAN);
                    dequantize_row_with(isa, w, r, &mut got);
                    same_bits(&got, &want, || {
                        format!("{ty} {isa:?} planar {}: row {r}", w.is_planar())
                    })?;
                }
            }
        }
    }
}

/// On aarch64 the NEON kernels must be among the levels checked above (CI runs this file under
/// qemu-user, whose `-cpu max` adds the dot-product extension).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_kernels_are_checked() {
    assert!(available_isas().contains(&kiln_kernels::Isa::Neon));
}

#[test]
fn known_values() {
    // Two I8_CH rows (codes of both, then their scales 0.5 and -0.25): codes 1, -2, 0, ... and
    // their negation; activations exactly representable.
    let cols = 32;
    let codes: Vec<i8> = (0..cols as i32).map(|i| (i % 5 - 2) as i8).collect();
    let mut data: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
    data.extend(codes.iter().map(|&c| (-c) as u8));
    data.extend(0.5f32.to_le_bytes());
    data.extend((-0.25f32).to_le_bytes());
    let w = KilnMatrix::new(KilnType::I8Ch, &data, 2, cols).unwrap();
    let x: Vec<f32> = (0..cols)
        .map(|i| if i % 2 == 0 { 127.0 } else { -127.0 })
        .collect();
    let mut q = QuantizedRow::new();
    quantize_row(&x, activation_format(KilnType::I8Ch), &mut q);
    let want: f32 = codes
        .iter()
        .zip(&x)
        .map(|(&c, &v)| 0.5 * f32::from(c) * v)
        .sum();
    assert_eq!(dot_reference(&w, 1, &q), want / 2.0);
    assert_eq!(dot_reference(&w, 0, &q), want);
    for isa in available_isas() {
        let mut out = [0.0f32; 2];
        dot_block_with(isa, &w, 0..2, std::slice::from_ref(&q), &mut out, 2);
        assert_eq!(out, [want, want / 2.0], "{isa:?}");
    }
}

#[test]
fn lut4_b32_known_values() {
    // One row of two blocks: units S = 0.5, M = 0.25; block 0 scale 2, offset -4, block 1
    // scale -1, offset 8; table u[k] = 8k; index of element i is i % 16.
    let cols = 64;
    let mut data = 0.5f32.to_le_bytes().to_vec();
    data.extend(0.25f32.to_le_bytes());
    let mut want_w = Vec::new();
    for (a, b) in [(2i8, -4i8), (-1, 8)] {
        data.extend([a as u8, b as u8]);
        data.extend((0..16u8).map(|j| j | (j << 4)));
        want_w.extend(
            (0..32).map(|i| 0.5 * f32::from(a) * (8 * (i % 16)) as f32 + 0.25 * f32::from(b)),
        );
    }
    data.extend((0..16u8).map(|k| 8 * k));
    let ty = KilnType::Lut4B32 { group: None };
    let mut back = vec![0.0f32; cols];
    kiln_types::dequantize_row(ty, &data, 1, cols, 0, &mut back);
    assert_eq!(back, want_w);
    let w = KilnMatrix::new(ty, &data, 1, cols).unwrap();
    // Activations the int8 blocks hold exactly (each block's largest magnitude is 127).
    let x: Vec<f32> = (0..cols)
        .map(|i| {
            if i % 32 == 0 {
                127.0
            } else {
                ((i * 7) % 200) as f32 - 100.0
            }
        })
        .collect();
    let mut q = QuantizedRow::new();
    quantize_row(&x, activation_format(ty), &mut q);
    assert_eq!(q.dequantize(), x);
    let want: f32 = want_w.iter().zip(&x).map(|(&a, &b)| a * b).sum();
    assert_eq!(dot_reference(&w, 0, &q), want);
}

#[test]
#[should_panic(expected = "need I16 activations")]
fn lookup_tables_refuse_f32_activations() {
    let ty = KilnType::Lut {
        bits: 2,
        group: None,
    };
    let data = vec![0u8; ty.data_length(32, 1).unwrap() as usize];
    let w = KilnMatrix::new(ty, &data, 1, 32).unwrap();
    let mut q = QuantizedRow::new();
    quantize_row(&[1.0; 32], ActivationFormat::F32, &mut q);
    dot_reference(&w, 0, &q);
}

/// Known values through every level: 2- to 8-bit tables over a row of two 256-element
/// activation blocks and a 32-element tail. The table's 16-bit integers are computed here in
/// f64 from the largest entry; every level gives `Σ s·u[i]·x` within f32 rounding, which is
/// within half the table's scale of the product with the stored entries.
#[test]
fn lookup_tables_known_values() {
    for bits in [2u8, 4, 6, 8] {
        let ty = KilnType::Lut { bits, group: None };
        let cols = 544;
        let n = 1usize << bits;
        let entries: Vec<f32> = (0..n)
            .map(|k| kiln_format::ggml::f16_to_f32(f32_to_f16((k as f32 - 20.3).sin() * 0.37)))
            .collect();
        let amax = entries
            .iter()
            .fold(0.0f64, |m, &e| m.max(f64::from(e).abs()));
        let s = amax / 16383.0;
        let u: Vec<f64> = entries
            .iter()
            .map(|&e| (f64::from(e) / s).round())
            .collect();
        let idx: Vec<u8> = (0..cols).map(|i| ((i * 37 + 11) % n) as u8).collect();
        let mut data = vec![0u8; cols * bits as usize / 8];
        for (c, out) in idx
            .chunks_exact(32)
            .zip(data.chunks_exact_mut(4 * bits as usize))
        {
            kiln_types::pack_chunk(bits, c.try_into().unwrap(), out);
        }
        data.extend(entries.iter().flat_map(|&e| f32_to_f16(e).to_le_bytes()));
        let w = KilnMatrix::new(ty, &data, 1, cols).unwrap();
        // Multiples of 2^-4 whose blocks reach 8191 · 2^-4: the codes hold them exactly.
        let x: Vec<f32> = (0..cols)
            .map(|i| {
                if i % 256 == 5 || i == 530 {
                    -8191.0 / 16.0
                } else {
                    (((i * 53) % 400) as f32 - 200.0) / 16.0
                }
            })
            .collect();
        let mut q = QuantizedRow::new();
        quantize_row(&x, activation_format(ty), &mut q);
        assert_eq!(q.dequantize(), x);
        let (mut want, mut stored, mut mag) = (0.0f64, 0.0f64, 0.0f64);
        for (&i, &v) in idx.iter().zip(&x) {
            want += s * u[i as usize] * f64::from(v);
            stored += f64::from(entries[i as usize]) * f64::from(v);
            mag += f64::from(v).abs();
        }
        assert!((want - stored).abs() <= s / 2.0 * mag, "{ty}");
        let mut got = vec![f64::from(dot_reference(&w, 0, &q))];
        for isa in available_isas() {
            let mut out = [0.0f32];
            dot_block_with(isa, &w, 0..1, std::slice::from_ref(&q), &mut out, 1);
            got.push(f64::from(out[0]));
        }
        for g in got {
            assert!(
                (g - want).abs() <= 1e-5 * want.abs(),
                "{ty}: {g} against {want}"
            );
        }
    }
}

#[test]
#[should_panic(expected = "need I16 activations")]
fn lookup_tables_refuse_int8_activations() {
    let ty = KilnType::Lut {
        bits: 4,
        group: None,
    };
    let data = vec![0u8; ty.data_length(32, 1).unwrap() as usize];
    let w = KilnMatrix::new(ty, &data, 1, 32).unwrap();
    let mut q = QuantizedRow::new();
    quantize_row(&[1.0; 32], activation_format(KilnType::I8Ch), &mut q);
    dot_reference(&w, 0, &q);
}
