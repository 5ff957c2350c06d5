//! The matrix product for weights in the kiln package's own formats (`I8_CH`, `I4_B64`,
//! lookup tables) at decode batch sizes; prompts (and `Precision::Exact`) take the shared
//! paths of [`crate::kernels`], which read any format through `dequantize_row`.
//!
//! As for the ggml formats: activations are quantized once per call (`I8_CH`, `I4_B64`: int8
//! blocks, plus the quantization residual under `Precision::Refined`; lookup tables: 14-bit
//! codes in blocks of 256, which need no refinement), then each task runs the kernel crate's
//! tiled dot products over its share of the weight rows.

use crate::kernels::IntegerProduct;
use crate::weights::WeightMatrix;
use kiln_kernels::kiln_formats;

/// The decode product of a kiln-format `w`: its activation format and tiled kernel, for
/// [`crate::kernels::quantized_products`] (which quantizes the activations, adds the residual
/// product under `Precision::Refined`, and shares the rows out between threads).
///
/// # Panics
/// If `w` is not in a kiln format.
pub(crate) fn product(w: &WeightMatrix) -> IntegerProduct<'_> {
    let m = w.kiln_matrix();
    let (ty, rows) = (m.format(), m.rows());
    IntegerProduct {
        fuses_refined: kiln_formats::fuses_refined(kiln_kernels::detect(), ty),
        rows,
        fmt: kiln_formats::activation_format(ty),
        dot: Box::new(move |range, xq, tile, width| {
            kiln_formats::dot_block(&m, range, xq, tile, width)
        }),
    }
}
