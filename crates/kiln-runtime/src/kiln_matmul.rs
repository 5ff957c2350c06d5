//! The matrix product for weights in the kiln package's own formats (`I8_CH`, `I4_B64`,
//! lookup tables) at decode batch sizes; prompts (and `Precision::Exact`) take the shared
//! paths of [`crate::kernels`], which read any format through `dequantize_row`.
//!
//! As for the ggml formats: activations are quantized once per call (`I8_CH`, `I4_B64`: int8
//! blocks, plus the quantization residual under `Precision::Refined`; lookup tables: f32
//! copies, which need no refinement), then each task runs the kernel crate's tiled dot
//! products over its share of the weight rows.

use crate::kernels::SharedOut;
use crate::pool::{split_range, ThreadPool};
use crate::weights::WeightMatrix;
use kiln_kernels::kiln_formats::{self, KilnMatrix};
use kiln_kernels::{ActivationFormat, QuantizedRow};
use std::cell::RefCell;

thread_local! {
    static ROWS: RefCell<Vec<QuantizedRow>> = const { RefCell::new(Vec::new()) };
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

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
    ROWS.with(|cell| {
        let mut xq = cell.borrow_mut();
        let n_q = if refine && fmt != ActivationFormat::F32 {
            2 * n_tokens
        } else {
            n_tokens
        };
        if xq.len() < n_q {
            xq.resize_with(n_q, QuantizedRow::new);
        }
        for t in 0..n_tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            kiln_kernels::quantize_row(xt, fmt, &mut xq[t]);
            if n_q > n_tokens {
                let mut residual = xq[t].dequantize();
                residual.iter_mut().zip(xt).for_each(|(r, v)| *r = v - *r);
                kiln_kernels::quantize_row(&residual, fmt, &mut xq[n_tokens + t]);
            }
        }
        let xq = &xq[..n_q];
        let out = SharedOut::new(y);
        let n_tasks = (pool.n_threads() * 4).min(rows.div_ceil(16)).max(1);
        pool.for_each(n_tasks, |task| {
            let range = split_range(rows, n_tasks, task);
            if range.is_empty() {
                return;
            }
            TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                let width = range.len();
                tile.resize(n_q * width, 0.0);
                kiln_formats::dot_block(&m, range.clone(), xq, &mut tile, width);
                let (sum, residual) = tile.split_at_mut(n_tokens * width);
                if n_q > n_tokens {
                    sum.iter_mut()
                        .zip(residual.iter())
                        .for_each(|(s, r)| *s += r);
                }
                for t in 0..n_tokens {
                    // SAFETY: rows `range` of token `t` belong to this task alone.
                    let dst = unsafe { out.slice(t * rows + range.start..t * rows + range.end) };
                    dst.copy_from_slice(&sum[t * width..(t + 1) * width]);
                }
            });
        });
    });
}
