//! Dequantization of ggml rows for the prompt GEMMs, which dequantize every weight row once
//! per batch: AVX-512 kernels for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), whose scalar
//! dequantization took more of a Gemma 3 Q4_K_M prompt than the SIMD dequantization of its far
//! larger Q5_0 / Q8_0 tensors; `kiln_format::ggml::dequantize` for everything else.
//!
//! The values are bit for bit `kiln_format::ggml::dequantize`'s (ggml's
//! `dequantize_row_*`), on every CPU: the kernels round each sub-block multiplier and minimum
//! to f32 once and apply them in two roundings, as the scalar code does.

use kiln_format::ggml::{self, GgmlType};

#[allow(unused_imports)]
use crate::Isa;

/// Whether this CPU runs an AVX-512 kernel for `ty` in [`dequantize_row`] (the level
/// [`crate::detect`] chooses is AVX-512 VNNI, and `ty` is one of the K-quants above).
pub fn has_kernel(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::x86::kquant_dequant::has_kernel(ty) && crate::detect() == Isa::Avx512Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// Whether [`dequantize_row_bf16`] has a kernel for `ty` on this CPU (one that writes bf16
/// without an f32 row in between): [`has_kernel`] and AVX-512 BF16, as the bf16 GEMM
/// ([`crate::gemm_bf16`]) needs.
pub fn has_bf16_kernel(ty: GgmlType) -> bool {
    has_kernel(ty) && crate::gemm_bf16::bf16_available()
}

/// Panics unless `row` is exactly one row of `n` elements of `ty`.
fn check_row(what: &str, ty: GgmlType, row: &[u8], n: usize) {
    let want = ty.row_bytes(n);
    assert!(
        want == Some(row.len()),
        "{what}: {} bytes are not one row of {n} {ty} elements ({})",
        row.len(),
        match want {
            Some(b) => format!("{b} bytes"),
            None => format!("not a multiple of the block length {}", ty.block_len()),
        }
    );
}

/// One row of `ty` (`row`, `out.len()` elements) dequantized into `out`: exactly
/// `kiln_format::ggml::dequantize`'s values, by an AVX-512 kernel where [`has_kernel`].
///
/// # Panics
/// If `row` is not one row of `out.len()` elements of `ty`.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    check_row("dequantize_row", ty, row, out.len());
    #[cfg(target_arch = "x86_64")]
    if has_kernel(ty) {
        // SAFETY: the AVX-512 VNNI level (detected) has AVX-512 F/BW/VL, AVX2 and F16C; there
        // is a kernel for `ty`; `row` is whole super-blocks (checked above) and `out` holds
        // their f32 values.
        unsafe {
            crate::x86::kquant_dequant::dequantize_into::<false>(ty, row, out.as_mut_ptr().cast())
        };
        return;
    }
    ggml::dequantize(ty, row, out)
        .unwrap_or_else(|e| panic!("dequantize_row: {ty} row of {} bytes: {e}", row.len()));
}

/// One row of `ty` dequantized and rounded to bf16 into `out` (`out.len()` elements): each
/// value [`crate::gemm_bf16::to_bf16`] of [`dequantize_row`]'s, which is what the bf16 GEMM's
/// packing makes of the row. With a kernel ([`has_bf16_kernel`]) no f32 row is written.
///
/// # Panics
/// If `row` is not one row of `out.len()` elements of `ty`.
pub fn dequantize_row_bf16(ty: GgmlType, row: &[u8], out: &mut [u16]) {
    check_row("dequantize_row_bf16", ty, row, out.len());
    #[cfg(target_arch = "x86_64")]
    if has_bf16_kernel(ty) {
        // SAFETY: as in `dequantize_row`, and the CPU has AVX-512 BF16 (bf16_available);
        // `out` holds the row's bf16 values.
        unsafe {
            crate::x86::kquant_dequant::dequantize_into::<true>(ty, row, out.as_mut_ptr().cast())
        };
        return;
    }
    let mut values = vec![0.0f32; out.len()];
    dequantize_row(ty, row, &mut values);
    crate::gemm_bf16::round_to_bf16(&values, out);
}
