//! Quantized dot-product kernels: ggml weight blocks times int8 activations.
//!
//! Weights stay in their GGUF block layout, or in the equally large [`planar`] layout the
//! runtime rewrites the 32-element formats into at load where the kernels read it faster
//! (AVX-512). Activations are quantized once per row
//! ([`quantize_row`]) to int8 with one f32 scale per block, in the [`ActivationFormat`] the
//! weight type needs ([`activation_format`]). A dot product then multiplies the integer codes
//! of both sides in integer SIMD (`vpmaddubsw`, `vpdpbusd`/`vpdpwssd`, `sdot`), exactly, and
//! applies the scales once per block.
//!
//! ```
//! use kiln_kernels::{activation_format, dot, quantize_row, GgmlType, QuantizedRow};
//!
//! let k = 64;
//! let w: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
//! let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.11).cos()).collect();
//! let row = kiln_format::ggml::quantize(GgmlType::Q4_0, &w).unwrap();
//!
//! let mut xq = QuantizedRow::new();
//! quantize_row(&x, activation_format(GgmlType::Q4_0), &mut xq);
//! let y = dot(GgmlType::Q4_0, &row, &xq);
//! let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
//! assert!((y - exact).abs() < 0.1);
//! ```
//!
//! The kernels are chosen at run time ([`detect`], overridable downwards with `KILN_ISA`):
//! AVX-512 VNNI and AVX2 on x86-64, NEON with and without the dot-product extension on
//! aarch64, and the scalar reference ([`dot_reference`]) everywhere else. Every SIMD kernel
//! agrees with the reference within [`reference::error_bound`]; the integer parts are exact.
//!
//! # Shape of the work
//!
//! - **Activations** ([`ActivationFormat`]): every 32-element weight type multiplies with
//!   32-element int8 blocks that carry `d * sum(codes)` (ggml's Q8_1 idea, f32 scale), so
//!   weight offsets and minimums cost one multiply per block and the kernels can multiply
//!   *unsigned* weight codes (what `vpmaddubsw`/`vpdpbusd` want); the K-quants use
//!   256-element blocks with per-16 integer sums (ggml's Q8_K); float weights take f32.
//! - **Tiles**: [`dot_block`] runs 4 weight rows × 2 activation rows at a time on x86 (rows
//!   outermost), so a weight block is unpacked once per tile and the tile's rows stay in L1
//!   while all activation rows pass. x86 kernels prefetch one tile ahead; with that, a single
//!   thread streams quantized weights at 35-40 GB/s on the development machine (its
//!   prefetched memory read does 43-50 GB/s). The aarch64 kernels work row by row.
//! - **Refined rows** ([`quantize_row_refined`]): int8 codes plus an int8 residual at a fixed
//!   1/256 of the block scale, 16 bits per activation. The 32-element kernels of every SIMD
//!   level fold the residual into their integer sums (`(Σ u·q << 8) + Σ u·l`) and apply the
//!   scales once ([`fuses_refined`]); the others multiply the row's two halves and add.
//! - **Accuracy**: integer parts are exact; the rest is f32 rounding bounded by
//!   [`reference::error_bound`]. Results may differ between levels in the last bits (not in
//!   the integer sums), never between runs.
//!
//! Prompts (many activation rows at once) run as panel GEMMs instead: [`gemm`] (f32) and
//! [`gemm_bf16`] on dequantized weights, and [`gemm_i8`], which multiplies the integer codes
//! of the 32-element formats with int8 activations (`vpdpbusd`, or `vpmaddubsw` on AVX2),
//! bit for bit its scalar reference.
//!
//! The f32 vector kernels of the forward pass (dot products, sums, `y += a·x`) are in
//! [`vector`], with the same dispatch and the same kind of references; the element-wise ones
//! built on a vectorized exponential (gated activations, softmax) in [`elementwise`].
//!
//! The K-quants' rows are dequantized for those GEMMs by the AVX-512 kernels of
//! [`ggml_dequant`], bit for bit as kiln-format dequantizes them.
//!
//! The kiln package's own formats (`I8_CH`, `I4_B64`, lookup tables) have their kernels in
//! [`kiln_formats`].
//!
//! Covered weight types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
//! IQ4_XS, F32, F16 and BF16 have SIMD kernels; Q8_1 and Q8_K (activation formats in ggml) are
//! accepted as weights too and computed by the reference.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod activation;
pub mod aligned;
pub mod elementwise;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_i8;
pub mod ggml_dequant;
mod isa;
pub mod kiln_formats;
mod layout;
pub mod planar;
pub mod reference;
pub mod vector;

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod arm;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

pub use activation::{
    activation_format, i16_element, quantize_row, quantize_row_refined, ActivationFormat,
    QuantizedRow, I16_BLOCK, I16_CODE_MAX,
};
pub use isa::{available_isas, detect, Isa};
pub use kiln_format::ggml::GgmlType;
pub use reference::dot_reference;

/// `sum_i dequant(w_row)[i] * dequant(xq)[i]` for one weight row, with the kernels of
/// [`detect`]'s level.
///
/// `xq` must be in `activation_format(weights)` and `w_row` exactly one row of `xq.len()`
/// elements of `weights`.
///
/// # Panics
/// If those shapes do not match.
#[inline]
pub fn dot(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> f32 {
    dot_with(detect(), weights, w_row, xq)
}

/// [`dot`] with the kernels of a given level.
///
/// # Panics
/// If the CPU does not have `isa` or the shapes do not match.
pub fn dot_with(isa: Isa, weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) -> f32 {
    let mut out = [0.0f32];
    dot_block_with(
        isa,
        weights,
        w_row,
        w_row.len(),
        0..1,
        std::slice::from_ref(xq),
        &mut out,
        1,
    );
    out[0]
}

/// Dot products of several weight rows with several activation rows: for every `t` in
/// `0..xq.len()` and every `r` in `rows`,
/// `out[t * out_stride + (r - rows.start)] = dot(weights, row r of w, &xq[t])`.
///
/// `w` holds consecutive rows of `row_bytes` bytes each (row `r` starts at `r * row_bytes`).
/// This is the building block of a matrix product: the kernels work on tiles of several
/// rows by several activation rows, so each weight block is unpacked once per tile and each
/// activation block loaded once per tile. Each value is bit for bit what [`dot`] gives for
/// that pair (tiling never changes the arithmetic), so prefill and decode agree exactly.
/// Output indices are relative to `rows.start`, so a caller that splits the rows between
/// threads can hand each its own output slice.
///
/// # Panics
/// If any activation row is not in `activation_format(weights)` or not of the length that
/// `row_bytes` holds, if `w` is shorter than `rows.end` rows, or if `out` is too short
/// (`out_stride` must be at least `rows.len()` when there is more than one activation row).
pub fn dot_block(
    weights: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    dot_block_with(detect(), weights, w, row_bytes, rows, xq, out, out_stride)
}

/// [`dot_block`] with the kernels of a given level.
///
/// # Panics
/// As [`dot_block`], and if the CPU does not have `isa`.
#[allow(clippy::too_many_arguments)]
pub fn dot_block_with(
    isa: Isa,
    weights: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    let Some(rows_w) = checked_block(isa, weights, w, row_bytes, &rows, xq, out.len(), out_stride)
    else {
        return;
    };
    let n_rows = rows.len();
    if refined_rows(xq) && !fuses_refined(isa, weights) {
        split_refined_block(xq, n_rows, out, out_stride, |split, scratch, stride| {
            dot_block_with(isa, weights, w, row_bytes, rows, split, scratch, stride)
        });
        return;
    }
    let w = rows_w;
    if !has_simd(weights) || row_bytes == 0 {
        scalar_block(weights, w, row_bytes, n_rows, xq, out, out_stride);
        return;
    }
    match isa {
        Isa::Scalar => scalar_block(weights, w, row_bytes, n_rows, xq, out, out_stride),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI, FMA and F16C (asserted above through
        // is_available); `w` holds `n_rows` rows of `row_bytes`, which is exactly one row of
        // every activation row in the weights' activation format (check_shape), and `out`
        // has room for every (token, row) index (asserted above).
        Isa::Avx512Vnni => unsafe {
            x86::avx512::dot_block(weights, w, row_bytes, n_rows, xq, out, out_stride)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2, FMA and F16C.
        Isa::Avx2 => unsafe {
            x86::avx2::dot_block(weights, w, row_bytes, n_rows, xq, out, out_stride)
        },
        #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
        // SAFETY: as above; NEON is present (is_available), and the dot-product extension
        // when `isa` is NeonDotprod.
        Isa::Neon | Isa::NeonDotprod => unsafe {
            arm::dot_block(
                isa == Isa::NeonDotprod,
                weights,
                w,
                row_bytes,
                n_rows,
                xq,
                out,
                out_stride,
            )
        },
        #[allow(unreachable_patterns)]
        _ => scalar_block(weights, w, row_bytes, n_rows, xq, out, out_stride),
    }
}

/// Checks the arguments of a [`dot_block_with`] call (or of [`planar::dot_block`]'s, whose
/// rows take as many bytes), panicking as documented there, and returns the bytes of its rows,
/// or `None` when there is nothing to compute (no rows or no activation rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn checked_block<'w>(
    isa: Isa,
    weights: GgmlType,
    w: &'w [u8],
    row_bytes: usize,
    rows: &Range<usize>,
    xq: &[QuantizedRow],
    out_len: usize,
    out_stride: usize,
) -> Option<&'w [u8]> {
    assert!(
        isa.is_available(),
        "dot: this CPU cannot run {isa:?} kernels"
    );
    assert!(rows.start <= rows.end, "dot_block: bad row range {rows:?}");
    let first = xq.first()?;
    for x in xq {
        assert_eq!(
            x.len(),
            first.len(),
            "dot_block: activation rows differ in length"
        );
    }
    check_shape(weights, row_bytes, first);
    let end = rows
        .end
        .checked_mul(row_bytes)
        .filter(|&e| e <= w.len())
        .unwrap_or_else(|| {
            panic!(
                "dot_block: {} bytes do not hold rows {rows:?} of {row_bytes} bytes",
                w.len()
            )
        });
    if rows.is_empty() {
        return None;
    }
    check_output(rows.len(), xq.len(), out_len, out_stride);
    Some(&w[rows.start * row_bytes..end])
}

/// Whether `isa`'s kernels for `weights` multiply refined activation rows
/// ([`quantize_row_refined`]) in one pass: the 32-element formats on every SIMD level.
/// Elsewhere a refined row costs what its two plain rows cost (the kernels run both and add).
pub fn fuses_refined(isa: Isa, weights: GgmlType) -> bool {
    isa != Isa::Scalar
        && matches!(
            weights,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::IQ4_NL
        )
}

/// Whether the activation rows `xq` (at least one) are refined.
///
/// # Panics
/// If refined and plain rows are mixed: a kernel reads the first row's kind for all.
pub(crate) fn refined_rows(xq: &[QuantizedRow]) -> bool {
    let refined = xq[0].is_refined();
    assert!(
        xq.iter().all(|x| x.is_refined() == refined),
        "dot_block: refined and plain activation rows mixed"
    );
    refined
}

/// The products of refined rows `xq` by kernels without a refined path: `block` computes the
/// plain rows each refined row splits into (high and low parts, in that order) into a scratch
/// of `n_rows` values per row, and each pair is added into `out`.
pub(crate) fn split_refined_block(
    xq: &[QuantizedRow],
    n_rows: usize,
    out: &mut [f32],
    out_stride: usize,
    block: impl FnOnce(&[QuantizedRow], &mut [f32], usize),
) {
    let split: Vec<QuantizedRow> = xq.iter().flat_map(QuantizedRow::split_refined).collect();
    let mut scratch = vec![0.0f32; split.len() * n_rows];
    block(&split, &mut scratch, n_rows);
    for (t, pair) in scratch.chunks_exact(2 * n_rows).enumerate() {
        let (high, low) = pair.split_at(n_rows);
        for (r, (h, l)) in high.iter().zip(low).enumerate() {
            out[t * out_stride + r] = h + l;
        }
    }
}

/// Panics unless an output of `out_len` values with rows `out_stride` apart holds `n_rows`
/// values for each of `n_act` activation rows (`n_act >= 1`).
pub(crate) fn check_output(n_rows: usize, n_act: usize, out_len: usize, out_stride: usize) {
    assert!(
        n_act == 1 || out_stride >= n_rows,
        "dot_block: output stride {out_stride} is less than the {n_rows} rows"
    );
    let needed = (n_act - 1)
        .checked_mul(out_stride)
        .and_then(|v| v.checked_add(n_rows));
    assert!(
        needed.is_some_and(|n| n <= out_len),
        "dot_block: output of {out_len} values is too short"
    );
}

/// Whether `weights` has SIMD kernels (the others always run the reference).
fn has_simd(weights: GgmlType) -> bool {
    !matches!(weights, GgmlType::Q8_1 | GgmlType::Q8_K)
}

fn scalar_block(
    weights: GgmlType,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    for (t, x) in xq.iter().enumerate() {
        for r in 0..n_rows {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            out[t * out_stride + r] = reference::fold(weights, row, x).0 as f32;
        }
    }
}

/// Panics unless `xq` is in the activation format of `weights` and `row_bytes` is exactly one
/// row of `xq.len()` elements.
fn check_shape(weights: GgmlType, row_bytes: usize, xq: &QuantizedRow) {
    let want = activation_format(weights);
    assert_eq!(
        xq.format(),
        want,
        "dot: {weights} weights need {want:?} activations, got {:?}",
        xq.format()
    );
    assert_eq!(
        weights.row_bytes(xq.len()),
        Some(row_bytes),
        "dot: {row_bytes} bytes are not one row of {} {weights} elements",
        xq.len()
    );
}

pub(crate) fn check_row(weights: GgmlType, w_row: &[u8], xq: &QuantizedRow) {
    check_shape(weights, w_row.len(), xq);
}

/// A tile computed by the reference, for weight types a SIMD level has no kernel for.
///
/// # Safety
/// `w` starts `R` rows of `row_bytes` readable bytes.
#[allow(dead_code)]
pub(crate) unsafe fn reference_tile<const R: usize, const T: usize>(
    weights: GgmlType,
    w: *const u8,
    row_bytes: usize,
    xs: [&QuantizedRow; T],
) -> [[f32; T]; R] {
    let mut out = [[0.0; T]; R];
    for (r, out_r) in out.iter_mut().enumerate() {
        // SAFETY: row r is `row_bytes` readable bytes (the caller's guarantee).
        let row = unsafe { std::slice::from_raw_parts(w.add(r * row_bytes), row_bytes) };
        for (o, x) in out_r.iter_mut().zip(xs) {
            *o = reference::fold(weights, row, x).0 as f32;
        }
    }
    out
}
