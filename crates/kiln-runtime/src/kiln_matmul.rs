//! The matrix product for weights in the kiln package's own formats (`I8_CH`, `I4_B64`,
//! lookup tables) at decode batch sizes; prompts (and `Precision::Exact`) take the shared
//! paths of [`crate::kernels`], which read any format through `dequantize_row`.
//!
//! As for the ggml formats: activations are quantized once per call (`I8_CH`, `I4_B64`: int8
//! blocks, plus the quantization residual under `Precision::Refined`; lookup tables: f32
//! copies, which need no refinement), then each task runs the kernel crate's tiled dot
//! products over its share of the weight rows.

use crate::pool::ThreadPool;
use crate::weights::WeightMatrix;
use kiln_kernels::kiln_formats::{self, KilnMatrix};

/// `y[t, o] = sum_i w[o, i] * x[t, i]` for `n_tokens` activation rows of a kiln-format `w`
/// (`refine`: add the product with each row's int8 quantization residual).
///
/// # Panics
/// If `w` is not in a kiln format or the shapes do not match.
pub(crate) fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    refine: bool,
) {
    let ty = w.kiln_format().expect("kiln-format weights");
    let (rows, cols) = (w.rows(), w.cols());
    let m = KilnMatrix::new(ty, w.data(), rows, cols).expect("shape validated at load");
    let fmt = kiln_formats::activation_format(ty);
    crate::kernels::quantized_product(
        pool,
        rows,
        cols,
        fmt,
        x,
        n_tokens,
        y,
        refine,
        |range, xq, tile, width| kiln_formats::dot_block(&m, range, xq, tile, width),
    );
}
