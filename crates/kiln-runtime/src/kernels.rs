//! Numeric kernels of the forward pass: the weight matmul on every path, norms and gated
//! activations; the SIMD kernels themselves (each with a scalar reference and a property test
//! holding it to that reference) are in `kiln-kernels`. Weights stay in their file format
//! (GGUF blocks); the paths differ in how activations meet them (see [`Precision`]).

use crate::pool::{split_range, ThreadPool};
use crate::weights::WeightMatrix;
use kiln_format::kiln_types::TensorFormat;
use kiln_kernels::aligned::AlignedVec;
use kiln_kernels::{ActivationFormat, QuantizedRow};
use std::cell::RefCell;

// The f32 vector kernels (SIMD per level, with scalar references) live with the other kernels.
pub use kiln_kernels::elementwise::softmax_exp;
pub use kiln_kernels::vector::{axpy_f32, axpy_rows_f32, dot_f32, dot_rows_f32, sum_f32};

/// Rows of the weight matrix dequantized together in a prefill tile: 16 rows of up to a few
/// thousand columns stay in L2 while every token of the batch is multiplied with them.
const PREFILL_TILE_ROWS: usize = 16;

thread_local! {
    static ROW_SCRATCH: RefCell<AlignedVec<f32>> = const { RefCell::new(AlignedVec::new()) };
}

/// How a matrix product treats its activations.
///
/// Batches of [`GEMM_MIN_TOKENS`] or more (prompts) run as a GEMM. Under `Refined` and `Exact`
/// it multiplies exactly dequantized weights: bf16 operands with f32 accumulation where the
/// CPU has AVX-512 BF16 (`Refined`), f32 otherwise and always under `Exact`. Under `Int8` the
/// weights in the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) multiply int8
/// activations in integer SIMD instead (`kiln_kernels::gemm_i8`, AVX-512 VNNI or AVX2); other
/// formats, and CPUs without those kernels, keep the bf16/f32 GEMM. Smaller batches (decode)
/// take the path named here, except for the formats whose kernels take other activations
/// whatever the precision: 14-bit codes in blocks of 256 for the 6- and 8-bit lookup tables
/// (fine enough without a residual: SmolLM2's perplexity through them moves by under 0.01 %
/// from f32 activations), f32 for the float formats and the 2- and 4-bit lookup tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Activations quantized to 8 bits per block, and again the quantization residual
    /// (`x ≈ d1·q1 + d2·q2`, about 254× finer), multiplied in integer SIMD in one sweep over
    /// the weights. The default: residual streams carry a few huge channels that make plain
    /// 8-bit blocks coarse (SmolLM2's logits move by up to 1.8 with them, by under 0.01 with
    /// the residual), while decode stays bound by reading the weights once.
    #[default]
    Refined,
    /// Activations quantized to 8 bits per block only: the least arithmetic, the most error,
    /// prompts included (the int8 GEMM, about 1.6 times the bf16 GEMM's multiply rate, on the
    /// same quantized activations as decode). On SmolLM2 the last token's logits stay within
    /// cosine 0.9986 of the exact path and perplexity within 0.5 %; a refined (two-pass) prompt
    /// GEMM would double the integer work and lose to bf16, so `Refined` keeps bf16 prompts.
    Int8,
    /// Weights dequantized exactly and multiplied with f32 activations, prompts included: the
    /// reference path.
    Exact,
}

impl Precision {
    /// Parses `refined`, `int8` or `exact`.
    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "refined" => Some(Precision::Refined),
            "int8" => Some(Precision::Int8),
            "exact" => Some(Precision::Exact),
            _ => None,
        }
    }

    /// The name `from_name` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Refined => "refined",
            Precision::Int8 => "int8",
            Precision::Exact => "exact",
        }
    }
}

thread_local! {
    static QUANTIZED_ROWS: RefCell<Vec<QuantizedRow>> = const { RefCell::new(Vec::new()) };
    static TILE_OUT: RefCell<AlignedVec<f32>> = const { RefCell::new(AlignedVec::new()) };
}

/// `y[t, o] = sum_i w[o, i] * x[t, i]` for `n_tokens` rows of activations.
///
/// `x` is `n_tokens × w.cols()`, `y` is `n_tokens × w.rows()`, both row-major.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    precision: Precision,
) {
    assert_eq!(x.len(), n_tokens * w.cols(), "matmul: activation shape");
    assert_eq!(y.len(), n_tokens * w.rows(), "matmul: output shape");
    if n_tokens >= GEMM_MIN_TOKENS {
        // Prompts under `Int8`: weights in the 32-element block formats multiply int8
        // activations in integer SIMD, which does twice the multiply-adds per instruction of
        // bf16 and dequantizes nothing.
        if let Some(ty) = int8_gemm_type(&[w], n_tokens, precision) {
            return matmul_gemm_i8(pool, &[w], ty, x, n_tokens, &mut [y]);
        }
        // Other prompts: bf16 operands double the multiply rate where the CPU has AVX-512
        // BF16 and runs it as fast as an FMA (`bf16_pays`, measured: not on every core that
        // has it). They move the real models' logits by up to ~0.15 (cosine >= 0.999993
        // against transformers' float32, perplexity +0.06 %), within the default path's bar;
        // `Exact` keeps f32.
        if precision != Precision::Exact && kiln_kernels::gemm_bf16::bf16_pays() {
            return matmul_gemm_bf16(pool, w, x, n_tokens, y);
        }
        return matmul_gemm(pool, w, x, n_tokens, y);
    }
    if precision == Precision::Exact {
        return matmul_exact(pool, w, x, n_tokens, y);
    }
    let refine = precision == Precision::Refined;
    quantized_products(
        pool,
        w.cols(),
        x,
        n_tokens,
        &[integer_product(w)],
        &mut [y],
        refine,
    );
}

/// `ys[i] = x · ws[i]ᵀ` for several weight matrices that multiply the same activations (a
/// layer's query, key and value projections; its gate and up projections), each as
/// [`matmul`] computes it. Prompts on the int8 GEMM quantize `x` once for all of them and
/// share one parallel section, so small matrices do not each pay a synchronisation.
///
/// # Panics
/// If `ws` and `ys` differ in length, the matrices differ in columns, or a shape is wrong.
pub fn matmul_shared(
    pool: &ThreadPool,
    ws: &[&WeightMatrix],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
    precision: Precision,
) {
    assert_eq!(ws.len(), ys.len(), "matmul_shared: one output per matrix");
    let cols = ws.first().map_or(0, |w| w.cols());
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(w.cols(), cols, "matmul_shared: matrices differ in columns");
        assert_eq!(x.len(), n_tokens * cols, "matmul_shared: activation shape");
        assert_eq!(y.len(), n_tokens * w.rows(), "matmul_shared: output shape");
    }
    if let Some(ty) = int8_gemm_type(ws, n_tokens, precision) {
        return matmul_gemm_i8(pool, ws, ty, x, n_tokens, ys);
    }
    // Decode: one quantization of `x` and one parallel section for all the matrices, when
    // their kernels read the same activation format.
    if n_tokens < GEMM_MIN_TOKENS && precision != Precision::Exact {
        let products: Vec<IntegerProduct> = ws.iter().map(|w| integer_product(w)).collect();
        if products.iter().all(|p| p.fmt == products[0].fmt) {
            let refine = precision == Precision::Refined;
            return quantized_products(pool, cols, x, n_tokens, &products, ys, refine);
        }
    }
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        matmul(pool, w, x, n_tokens, y, precision);
    }
}

/// The weight type, if a product of `n_tokens` activation rows with every matrix of `ws`
/// takes the int8 GEMM: prompts under [`Precision::Int8`], all matrices in the same 32-element
/// block format, and a SIMD kernel for it on this CPU.
fn int8_gemm_type(
    ws: &[&WeightMatrix],
    n_tokens: usize,
    precision: Precision,
) -> Option<kiln_kernels::GgmlType> {
    if n_tokens < GEMM_MIN_TOKENS || precision != Precision::Int8 {
        return None;
    }
    let ty = ws.first()?.tensor_format().ggml()?;
    let same = ws.iter().all(|w| w.tensor_format().ggml() == Some(ty));
    (same && kiln_kernels::gemm_i8::available(ty)).then_some(ty)
}

/// One matrix's side of an integer product at decode batch sizes: its output channels, the
/// activation format its kernel reads, and the kernel over a range of rows (`tile[t * width +
/// r]`, as the kernel crate's `dot_block` writes).
pub(crate) struct IntegerProduct<'a> {
    pub rows: usize,
    pub fmt: ActivationFormat,
    /// Whether the kernel multiplies refined activation rows in one pass
    /// ([`kiln_kernels::fuses_refined`]).
    pub fuses_refined: bool,
    #[allow(clippy::type_complexity)]
    pub dot: Box<dyn Fn(std::ops::Range<usize>, &[QuantizedRow], &mut [f32], usize) + Sync + 'a>,
}

/// The decode product of `w`: the kernel crate's tiled dot products for its format (ggml
/// blocks, float rows or a kiln format).
fn integer_product(w: &WeightMatrix) -> IntegerProduct<'_> {
    match w.tensor_format() {
        TensorFormat::Kiln(_) => crate::kiln_matmul::product(w),
        TensorFormat::Ggml(ty) => {
            let (data, row_bytes) = (w.data(), w.row_bytes());
            let isa = kiln_kernels::detect();
            IntegerProduct {
                rows: w.rows(),
                fmt: kiln_kernels::activation_format(ty),
                fuses_refined: kiln_kernels::fuses_refined(isa, ty),
                dot: if w.is_planar() {
                    Box::new(move |range, xq, tile, width| {
                        kiln_kernels::planar::dot_block(
                            isa, ty, data, row_bytes, range, xq, tile, width,
                        )
                    })
                } else {
                    Box::new(move |range, xq, tile, width| {
                        kiln_kernels::dot_block(ty, data, row_bytes, range, xq, tile, width)
                    })
                },
            }
        }
    }
}

/// The shape of every integer matrix product: `x` (`n_tokens` rows of `cols`) quantized once
/// into the products' common activation format (with `refine`, as refined rows when every
/// product's kernel multiplies those in one pass, otherwise with each row's quantization
/// residual as rows `n_tokens..2·n_tokens`), then every product's output channels shared
/// out between the tasks of one parallel section, each task calling its product's kernel for
/// its rows and adding the residual products in. Several matrices that multiply the same
/// activations (a layer's query, key and value) so pay one quantization and one
/// synchronisation.
///
/// # Panics
/// If the products differ in activation format or `ys` do not match them.
pub(crate) fn quantized_products(
    pool: &ThreadPool,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    products: &[IntegerProduct],
    ys: &mut [&mut [f32]],
    refine: bool,
) {
    assert_eq!(products.len(), ys.len(), "one output per product");
    let Some(fmt) = products.first().map(|p| p.fmt) else {
        return;
    };
    assert!(
        products.iter().all(|p| p.fmt == fmt),
        "products share one activation format"
    );
    QUANTIZED_ROWS.with(|cell| {
        let mut xq = cell.borrow_mut();
        // Refinement in one pass: each row's residual rides in the row itself, at a fixed
        // 1/256 of its scale, and the kernels fold it into their integer sums.
        let fused =
            refine && fmt == ActivationFormat::Q8_1 && products.iter().all(|p| p.fuses_refined);
        // Otherwise rows n_tokens..2·n_tokens hold each row's quantization residual (for the
        // int8 formats: 16-bit codes and f32 copies are fine enough without one).
        let int8 = matches!(fmt, ActivationFormat::Q8_1 | ActivationFormat::Q8_K);
        let n_rows_q = if refine && int8 && !fused {
            2 * n_tokens
        } else {
            n_tokens
        };
        if xq.len() < n_rows_q {
            xq.resize_with(n_rows_q, QuantizedRow::new);
        }
        ROW_SCRATCH.with(|residual| {
            let mut residual = residual.borrow_mut();
            for t in 0..n_tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                if fused {
                    kiln_kernels::quantize_row_refined(xt, &mut xq[t]);
                    continue;
                }
                kiln_kernels::quantize_row(xt, fmt, &mut xq[t]);
                if n_rows_q > n_tokens {
                    residual.resize(cols, 0.0);
                    xq[t].dequantize_into(&mut residual);
                    residual.iter_mut().zip(xt).for_each(|(r, v)| *r = v - *r);
                    kiln_kernels::quantize_row(&residual, fmt, &mut xq[n_tokens + t]);
                }
            }
        });
        let xq = &xq[..n_rows_q];
        let outs: Vec<SharedOut> = ys
            .iter_mut()
            .zip(products)
            .map(|(y, p)| {
                assert_eq!(y.len(), n_tokens * p.rows, "product output shape");
                SharedOut::new(y)
            })
            .collect();
        // One task per thread and product, each a band of rows (for every token, so a band's
        // weights are read once). Several products in one section (query, key and value) still
        // let a thread that finishes early take another's band. Four bands per thread read
        // slower: a band's first rows come before its prefetches reach ahead, and every kernel
        // call has a fixed cost. One token's products at two threads (`decode_matmuls`, the
        // same model twice in one process, four bands against one): SmolLM2 `Q4_0` 2.6-5.8 %
        // slower, `LUT4_B32` 7-8 %, `LUT8` 4 %, `I4_B64` 3 %, `Q8_0` 1.4-2.9 %, `I8_CH` level;
        // Gemma 3 `Q4_0` 2.5-3 %, `LUT4_B32_G16` 4-5 %, `Q8_0` 2-16 %.
        let tasks: Vec<usize> = products
            .iter()
            .map(|p| pool.n_threads().min(p.rows.div_ceil(16)).max(1))
            .collect();
        let total: usize = tasks.iter().sum();
        pool.for_each(total, |item| {
            let (mut which, mut task) = (0, item);
            while task >= tasks[which] {
                task -= tasks[which];
                which += 1;
            }
            let (p, rows) = (&products[which], products[which].rows);
            let range = split_range(rows, tasks[which], task);
            if range.is_empty() {
                return;
            }
            if n_rows_q == 1 {
                // One activation row: the kernel writes this task's outputs in place.
                // SAFETY: rows `range` of this product belong to this task alone.
                let dst = unsafe { outs[which].slice(range.clone()) };
                let width = range.len();
                (p.dot)(range, xq, dst, width);
                return;
            }
            TILE_OUT.with(|tile| {
                let mut tile = tile.borrow_mut();
                let width = range.len();
                tile.resize(n_rows_q * width, 0.0);
                // One sweep over the weights for the activations and their residuals: the
                // kernel loads each weight tile once for all activation rows.
                (p.dot)(range.clone(), xq, &mut tile, width);
                let (sum, residual) = tile.split_at_mut(n_tokens * width);
                if n_rows_q > n_tokens {
                    sum.iter_mut()
                        .zip(residual.iter())
                        .for_each(|(s, r)| *s += r);
                }
                for t in 0..n_tokens {
                    // SAFETY: rows `range` of token `t` of this product belong to this task
                    // alone.
                    let dst =
                        unsafe { outs[which].slice(t * rows + range.start..t * rows + range.end) };
                    dst.copy_from_slice(&sum[t * width..(t + 1) * width]);
                }
            });
        });
    });
}

/// Batches at least this large (prompt processing) take the GEMM path: each weight is used by
/// enough tokens that packing it once (dequantized, or as integer codes for the int8 GEMM)
/// beats per-row dot products. Operands are bf16 with f32 sums where AVX-512 BF16 is present
/// (twice the multiply rate), f32 otherwise and under `Precision::Exact`, integer codes with
/// int8 activations under `Precision::Int8` (see [`Precision`]).
pub const GEMM_MIN_TOKENS: usize = 8;

thread_local! {
    static GEMM_ROWS: RefCell<AlignedVec<f32>> = const { RefCell::new(AlignedVec::new()) };
    static GEMM_ROWS_BF16: RefCell<AlignedVec<u16>> = const { RefCell::new(AlignedVec::new()) };
    static GEMM_PANEL: RefCell<AlignedVec<f32>> = const { RefCell::new(AlignedVec::new()) };
}

/// Prompt processing: each task dequantizes a panel of weight rows once
/// (`dequantize(first_row, rows)`, rows `stride` values apart in `scratch`) and hands it to
/// `multiply`, which packs it and runs every token of the batch through a register-blocked
/// panel GEMM into the panel's columns of `y` ([`PanelOut`]).
fn gemm_by_panels<T: Copy + Default + 'static>(
    pool: &ThreadPool,
    w: &WeightMatrix,
    n_tokens: usize,
    y: &mut [f32],
    (scratch, stride): (
        &'static std::thread::LocalKey<RefCell<AlignedVec<T>>>,
        usize,
    ),
    dequantize: impl Fn(usize, &mut [T]) + Sync,
    multiply: impl Fn(&[T], usize, &PanelOut) + Sync,
) {
    use kiln_kernels::gemm::PANEL_ROWS;
    let rows = w.rows();
    let out = SharedOut::new(y);
    pool.for_each(rows.div_ceil(PANEL_ROWS), |p| {
        let start = p * PANEL_ROWS;
        let n = PANEL_ROWS.min(rows - start);
        scratch.with(|dq| {
            let mut dq = dq.borrow_mut();
            dq.resize(n * stride, T::default());
            dequantize(start, &mut dq);
            let panel_out = PanelOut {
                out: &out,
                start,
                n,
                n_tokens,
                stride: rows,
            };
            multiply(&dq, n, &panel_out);
        });
    });
}

/// One panel's share of a GEMM's output: columns `start..start + n` of each of `n_tokens`
/// rows `stride` apart, which no other task writes.
struct PanelOut<'a> {
    out: &'a SharedOut,
    start: usize,
    n: usize,
    n_tokens: usize,
    stride: usize,
}

impl PanelOut<'_> {
    /// Copies `tile` (`n_tokens` rows of `n`) into place.
    fn put_tile(&self, tile: &[f32]) {
        let (start, n) = (self.start, self.n);
        for t in 0..self.n_tokens {
            let at = t * self.stride + start;
            // SAFETY: columns start..start + n of every row belong to this panel alone.
            let dst = unsafe { self.out.slice(at..at + n) };
            dst.copy_from_slice(&tile[t * n..(t + 1) * n]);
        }
    }

    /// The panel's first element, for a kernel that writes the panel in place, row `t` at
    /// `t * stride` from it.
    ///
    /// # Safety
    /// Only the panel's elements (rows `t < n_tokens`, columns `< n` from the first) may be
    /// written through it, and only during the parallel section.
    unsafe fn first(&self) -> *mut f32 {
        let span = (self.n_tokens.max(1) - 1) * self.stride + self.n;
        // SAFETY: the span lies within the output (checked there); exclusive use of the
        // panel's elements is the caller's contract.
        unsafe { self.out.ptr_to(self.start, span) }
    }
}

thread_local! {
    static GEMM_X_BF16: RefCell<AlignedVec<u16>> = const { RefCell::new(AlignedVec::new()) };
    static GEMM_PANEL_BF16: RefCell<AlignedVec<u16>> = const { RefCell::new(AlignedVec::new()) };
}

/// Dequantizes the rows of `w` from the first given into whole f32 rows.
fn dequantize_f32(w: &WeightMatrix) -> impl Fn(usize, &mut [f32]) + Sync + '_ {
    move |start, rows| w.dequantize_rows(start, rows)
}

/// The f32 panel GEMM.
fn matmul_gemm(pool: &ThreadPool, w: &WeightMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    use kiln_kernels::gemm::{gemm_panel, pack_panel};
    let cols = w.cols();
    gemm_by_panels(
        pool,
        w,
        n_tokens,
        y,
        (&GEMM_ROWS, cols),
        dequantize_f32(w),
        |rows, n, out| {
            GEMM_PANEL.with(|panel| {
                TILE_OUT.with(|tile| {
                    let (mut panel, mut tile) = (panel.borrow_mut(), tile.borrow_mut());
                    pack_panel(rows, cols, &mut panel);
                    tile.resize(n_tokens * n, 0.0);
                    gemm_panel(&panel, cols, n, x, n_tokens, &mut tile, n);
                    out.put_tile(&tile);
                });
            });
        },
    );
}

/// The bf16 panel GEMM (sums stay f32): activations rounded once per call, each panel once.
fn matmul_gemm_bf16(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    use kiln_kernels::gemm_bf16::{
        convert_activations_bf16, gemm_panel_bf16_into, pack_panel_bf16, pack_panel_bf16_words,
        pairs,
    };
    let cols = w.cols();
    GEMM_X_BF16.with(|xb| {
        let mut xb = xb.borrow_mut();
        convert_activations_bf16(x, n_tokens, cols, &mut xb);
        let xb = &xb[..];
        let multiply = |panel: &[u16], n: usize, out: &PanelOut| {
            // SAFETY: the kernel writes rows `t < n_tokens`, columns `< n` of the panel only.
            unsafe { gemm_panel_bf16_into(panel, cols, n, xb, n_tokens, out.first(), out.stride) }
        };
        if w.has_bf16_dequantize() {
            // Rows rounded to bf16 as they are dequantized, padded to whole pairs.
            let stride = 2 * pairs(cols);
            let dequantize = |start: usize, rows: &mut [u16]| {
                w.dequantize_rows_bf16(start, rows, stride);
            };
            let scratch = (&GEMM_ROWS_BF16, stride);
            gemm_by_panels(pool, w, n_tokens, y, scratch, dequantize, |rows, n, out| {
                GEMM_PANEL_BF16.with(|panel| {
                    let mut panel = panel.borrow_mut();
                    pack_panel_bf16_words(rows, cols, &mut panel);
                    multiply(&panel, n, out);
                });
            });
            return;
        }
        let dequantize = dequantize_f32(w);
        gemm_by_panels(
            pool,
            w,
            n_tokens,
            y,
            (&GEMM_ROWS, cols),
            dequantize,
            |rows, n, out| {
                GEMM_PANEL_BF16.with(|panel| {
                    let mut panel = panel.borrow_mut();
                    pack_panel_bf16(rows, cols, &mut panel);
                    multiply(&panel, n, out);
                });
            },
        );
    });
}

thread_local! {
    static GEMM_I8_BATCH: RefCell<kiln_kernels::gemm_i8::QuantizedBatch> =
        RefCell::new(kiln_kernels::gemm_i8::QuantizedBatch::new());
    static GEMM_I8_PANEL: RefCell<kiln_kernels::gemm_i8::PackedPanel> =
        RefCell::new(kiln_kernels::gemm_i8::PackedPanel::new());
}

/// The int8 panel GEMM over one or more matrices of type `ty` sharing the activations `x`:
/// activations quantized once per call (as the decode path quantizes them), then each task
/// packs a panel of weight rows straight from their blocks and runs every token through it.
fn matmul_gemm_i8(
    pool: &ThreadPool,
    ws: &[&WeightMatrix],
    ty: kiln_kernels::GgmlType,
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) {
    use kiln_kernels::gemm_i8::{gemm_panel_i8_ahead, pack_panel, quantize_batch, PANEL_ROWS};
    let cols = ws[0].cols();
    // Panels are numbered across the matrices: matrix i owns panels first[i]..first[i + 1].
    let mut first = Vec::with_capacity(ws.len() + 1);
    first.push(0);
    for w in ws {
        first.push(first.last().copied().unwrap_or(0) + w.rows().div_ceil(PANEL_ROWS));
    }
    let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut::new(y)).collect();
    GEMM_I8_BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        quantize_batch(x, n_tokens, cols, ty, &mut batch);
        let batch = &*batch;
        let n_panels = first[ws.len()];
        let n_threads = pool.n_threads();
        pool.for_each(n_panels, |p| {
            let i = first.partition_point(|&f| f <= p) - 1;
            let (w, out) = (ws[i], &outs[i]);
            let rows = w.rows();
            let start = (p - first[i]) * PANEL_ROWS;
            let n = PANEL_ROWS.min(rows - start);
            // Threads take panels in turn, so this one most likely gets the panel
            // `n_threads` ahead next: have its weights on the way while this one computes.
            let next = p + n_threads;
            let ahead = if next < n_panels {
                let j = first.partition_point(|&f| f <= next) - 1;
                let (data, row_bytes) = (ws[j].data(), ws[j].row_bytes());
                let s = (next - first[j]) * PANEL_ROWS * row_bytes;
                &data[s..(s + PANEL_ROWS * row_bytes).min(data.len())]
            } else {
                &[]
            };
            GEMM_I8_PANEL.with(|panel| {
                TILE_OUT.with(|tile| {
                    let (mut panel, mut tile) = (panel.borrow_mut(), tile.borrow_mut());
                    if w.is_planar() {
                        kiln_kernels::gemm_i8::pack_panel_planar(
                            ty,
                            w.data(),
                            w.row_bytes(),
                            start..start + n,
                            &mut panel,
                        );
                    } else {
                        pack_panel(ty, w.data(), w.row_bytes(), start..start + n, &mut panel);
                    }
                    tile.resize(n_tokens * n, 0.0);
                    gemm_panel_i8_ahead(&panel, batch, &mut tile, n, ahead);
                    for (t, src) in tile.chunks_exact(n).enumerate() {
                        // SAFETY: rows start..start + n of token t of matrix i belong to
                        // panel p alone.
                        let dst = unsafe { out.slice(t * rows + start..t * rows + start + n) };
                        // Whole panels as fixed-size copies: a call to memmove per token and
                        // panel showed in profiles.
                        if n == PANEL_ROWS {
                            let d: &mut [f32; PANEL_ROWS] = dst.try_into().expect("whole panel");
                            *d = *<&[f32; PANEL_ROWS]>::try_from(src).expect("whole panel");
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                });
            });
        });
    });
}

/// The exact path: tiles of weight rows dequantized to f32, then f32 dot products.
fn matmul_exact(pool: &ThreadPool, w: &WeightMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    // Each output row is written by one task only; tasks hand disjoint rows to `write`.
    let out = SharedOut::new(y);
    let n_tasks = (pool.n_threads() * 4)
        .min(rows.div_ceil(PREFILL_TILE_ROWS))
        .max(1);
    pool.for_each(n_tasks, |task| {
        let range = split_range(rows, n_tasks, task);
        ROW_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(PREFILL_TILE_ROWS * cols, 0.0);
            let mut start = range.start;
            while start < range.end {
                let end = (start + PREFILL_TILE_ROWS).min(range.end);
                let tile = &mut scratch[..(end - start) * cols];
                w.dequantize_rows(start, tile);
                for t in 0..n_tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for (k, wrow) in tile.chunks_exact(cols).enumerate() {
                        // SAFETY: row `start + k` of token `t` belongs to this task alone.
                        unsafe { out.write(t * rows + start + k, dot_f32(wrow, xt)) };
                    }
                }
                start = end;
            }
        });
    });
}

/// A mutable output buffer shared by tasks that write disjoint indices.
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint indices (each caller's contract), so no two threads touch the
// same element, and the buffer outlives the parallel section that uses it.
unsafe impl Sync for SharedOut {}
// SAFETY: as above.
unsafe impl Send for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// # Safety
    /// No other thread may read or write index `i` during the parallel section.
    #[inline]
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len);
        // SAFETY: in bounds (checked), and exclusive by the caller's contract.
        unsafe { *self.ptr.add(i) = v };
    }

    /// A pointer to index `start`, `len` elements of which lie within the buffer.
    ///
    /// # Safety
    /// Writes through it may only reach indices no other thread accesses during the parallel
    /// section.
    pub(crate) unsafe fn ptr_to(&self, start: usize, len: usize) -> *mut f32 {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.add(start) }
    }

    /// A mutable view of `range`.
    ///
    /// # Safety
    /// No other thread may access any index of `range` during the parallel section.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked), and exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// RMS normalisation of each `dim`-wide row of `x` in place: `x * w / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_exact_mut(dim) {
        let ss: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let scale = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
        for (v, wi) in row.iter_mut().zip(w) {
            *v = *v * scale * wi;
        }
    }
}

/// SiLU-gated product: `gate = silu(gate) * up`, vectorized
/// ([`kiln_kernels::elementwise::silu_mul`]).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    kiln_kernels::elementwise::silu_mul(gate, up);
}

/// GELU (tanh approximation)-gated product: `gate = gelu_tanh(gate) * up`, vectorized
/// ([`kiln_kernels::elementwise::gelu_tanh_mul`]).
///
/// `0.5 * (1 + tanh(u)) = sigmoid(2u)` exactly, so the tanh form costs one exponential:
/// `gelu_tanh(x) = x / (1 + exp(-2u))` with `u = sqrt(2/pi) * (x + 0.044715 x^3)`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    kiln_kernels::elementwise::gelu_tanh_mul(gate, up);
}

/// Elements below which an element-wise operation is not worth spreading over threads.
const PARALLEL_ELEMENTWISE: usize = 1 << 15;

/// Applies `op(gate_chunk, up_chunk)` over `gate` and `up` in parallel chunks.
pub fn gated_parallel(pool: &ThreadPool, gate: &mut [f32], up: &[f32], op: fn(&mut [f32], &[f32])) {
    debug_assert_eq!(gate.len(), up.len());
    if gate.len() < PARALLEL_ELEMENTWISE || pool.n_threads() == 1 {
        op(gate, up);
        return;
    }
    let n_tasks = pool.n_threads() * 2;
    let n = gate.len();
    let out = SharedOut::new(gate);
    pool.for_each(n_tasks, |task| {
        let range = split_range(n, n_tasks, task);
        // SAFETY: the ranges of different tasks are disjoint.
        let g = unsafe { out.slice(range.clone()) };
        op(g, &up[range]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_known_values() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rms_norm(&mut x, &[1.0, 1.0, 2.0, 0.5], 0.0);
        let rms = (30.0f32 / 4.0).sqrt();
        let want = [1.0 / rms, 2.0 / rms, 6.0 / rms, 2.0 / rms];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
    }

    #[test]
    fn activations_known_values() {
        let mut g = vec![0.0, 1.0, -1.0];
        silu_mul(&mut g, &[1.0, 2.0, 1.0]);
        assert!((g[0]).abs() < 1e-7);
        assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-6);
        assert!((g[2] + 0.268_941_4).abs() < 1e-6);
        let mut g = vec![1.0, -2.0];
        gelu_tanh_mul(&mut g, &[1.0, 1.0]);
        // gelu_tanh(1) = 0.8411920, gelu_tanh(-2) = -0.0454023
        assert!((g[0] - 0.841_192).abs() < 1e-5);
        assert!((g[1] + 0.045_402_3).abs() < 1e-5);
    }
}

#[cfg(test)]
mod matmul_tests {
    use super::*;
    use crate::weights::{TensorRef, TensorSource, WeightStorage};
    use kiln_format::ggml::{self, GgmlType};
    use std::path::Path;
    use std::sync::Arc;

    struct OneTensor(TensorRef);

    impl TensorSource for OneTensor {
        fn origin(&self) -> &Path {
            Path::new("<test>")
        }
        fn tensor(&self, _name: &str) -> Option<TensorRef> {
            Some(self.0.clone())
        }
        fn names(&self) -> Vec<String> {
            vec!["w".into()]
        }
    }

    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> WeightMatrix {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        let bytes = ggml::quantize(ty, &values).unwrap();
        let t = TensorRef {
            storage: Arc::new(bytes) as Arc<dyn WeightStorage>,
            offset: 0,
            dims: vec![cols as u64, rows as u64],
            format: ty.into(),
        };
        WeightMatrix::load(&OneTensor(t), "w", cols, rows).unwrap()
    }

    /// Activations with a few huge channels, as SmolLM2's residual stream has.
    fn activations(n_tokens: usize, cols: usize) -> Vec<f32> {
        (0..n_tokens * cols)
            .map(|i| {
                let c = i % cols;
                let v = ((i as f32) * 0.618).sin();
                if c % 97 == 5 {
                    v * 600.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn refined_activations_are_far_closer_to_exact_than_plain_int8() {
        let pool = ThreadPool::new(2);
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ] {
            for n_tokens in [1, 5] {
                let (rows, cols) = (48, 512);
                let w = matrix(ty, rows, cols, 7);
                let x = activations(n_tokens, cols);
                let run = |p| {
                    let mut y = vec![0.0; n_tokens * rows];
                    matmul(&pool, &w, &x, n_tokens, &mut y, p);
                    y
                };
                let exact = run(Precision::Exact);
                let quantized = max_err(&run(Precision::Int8), &exact);
                let refined = max_err(&run(Precision::Refined), &exact);
                assert!(
                    refined * 50.0 < quantized,
                    "{ty} x{n_tokens}: refined error {refined} vs plain {quantized}"
                );
            }
        }
    }

    /// Prompts under `Int8` take the int8 GEMM for the 32-element formats: the same
    /// quantized activations and integer sums as the decode kernels, so the two agree up to
    /// f32 rounding. The other formats keep the bf16/f32 GEMM.
    #[test]
    fn int8_prompts_agree_with_the_int8_decode_kernels() {
        let pool = ThreadPool::new(2);
        let n_tokens = GEMM_MIN_TOKENS + 5;
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
        ] {
            let (rows, cols) = (70, 512);
            let w = matrix(ty, rows, cols, 5);
            let x = activations(n_tokens, cols);
            let mut prompt = vec![0.0; n_tokens * rows];
            matmul(&pool, &w, &x, n_tokens, &mut prompt, Precision::Int8);
            let mut decode = vec![0.0; n_tokens * rows];
            for (xt, yt) in x.chunks_exact(cols).zip(decode.chunks_exact_mut(rows)) {
                matmul(&pool, &w, xt, 1, yt, Precision::Int8);
            }
            let mut exact = vec![0.0; n_tokens * rows];
            matmul(&pool, &w, &x, n_tokens, &mut exact, Precision::Exact);
            let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = max_err(&prompt, &exact);
            if kiln_kernels::gemm_i8::available(ty) {
                let drift = max_err(&prompt, &decode);
                assert!(
                    drift <= 2e-6 * scale,
                    "{ty}: {drift} from decode (scale {scale})"
                );
                // And int8 activations are coarse, not wrong: within 2 % of the output range.
                assert!(
                    err <= 0.02 * scale && err > 1e-5 * scale,
                    "{ty}: {err} (scale {scale})"
                );
            } else {
                // The bf16 GEMM: weights dequantized exactly, operands rounded to bf16.
                assert!(err <= 0.01 * scale, "{ty}: {err} (scale {scale})");
            }
        }
    }

    #[test]
    fn shared_products_equal_separate_ones() {
        let pool = ThreadPool::new(2);
        let n_tokens = GEMM_MIN_TOKENS + 3;
        let cols = 256;
        let ws = [
            matrix(GgmlType::Q4_0, 64, cols, 1),
            matrix(GgmlType::Q4_0, 40, cols, 2),
            matrix(GgmlType::Q4_0, 33, cols, 3),
        ];
        let x = activations(n_tokens, cols);
        for p in [Precision::Int8, Precision::Refined, Precision::Exact] {
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n_tokens * w.rows()]).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            let refs: Vec<&WeightMatrix> = ws.iter().collect();
            matmul_shared(&pool, &refs, &x, n_tokens, &mut outs, p);
            for (w, y) in ws.iter().zip(&ys) {
                let mut one = vec![0.0; n_tokens * w.rows()];
                matmul(&pool, w, &x, n_tokens, &mut one, p);
                assert_eq!(&one, y, "{p:?}");
            }
        }
    }

    #[test]
    fn float_weights_are_exact_on_every_path() {
        let pool = ThreadPool::new(2);
        let w = matrix(GgmlType::F32, 16, 64, 3);
        let x = activations(3, 64);
        let mut exact = vec![0.0; 48];
        matmul(&pool, &w, &x, 3, &mut exact, Precision::Exact);
        for p in [Precision::Int8, Precision::Refined] {
            let mut y = vec![0.0; 48];
            matmul(&pool, &w, &x, 3, &mut y, p);
            let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(max_err(&y, &exact) <= 1e-5 * scale, "{p:?}");
        }
    }
}
