//! The decoder-only transformer as a stateful ML Program: one package, or one chunk of a
//! model cut into packages over layer ranges. The architecture files (`llama.rs`,
//! `gemma3.rs`) check what their family needs; the program is built here from the
//! model's description, as kiln's runtime computes it.
//!
//! Interface of a package (the protocol of the coremltools-made reference packages):
//! - `input_ids`: int32 `[1, q]` in the package holding the embedding, or `hidden_in`: fp16
//!   `[1, q, hidden]` (the previous package's `hidden_out`) in the others;
//! - `causal_mask`: fp16 `[1, 1, q, past + q]`, added to the attention scores (0 where a query
//!   may look, `-inf` where it may not); its last dimension tells the program how many
//!   positions are already cached, so no position input is needed. Packages without layers
//!   take none;
//! - states `keyCache`, `valueCache`: fp16 `[layers, 1, kv_heads, context, head_dim]` for the
//!   package's layers, the keys (after rotary embedding) and values of every position seen,
//!   written at `past..past + q` on each call;
//! - output `logits`: fp16 `[1, q, vocab]`, or `next_token`: int32 `[1, q]` (the arg max), in
//!   the package holding the LM head; `hidden_out` in the others.
//!
//! Precision: activations are fp16. With [`Precision::Mixed`] RMSNorm's square, mean and
//! rsqrt run in fp32: the residual stream of real models reaches values whose squares
//! overflow fp16. Rotary angles are computed in fp32 in both modes; positions times
//! frequencies lose too much in fp16 beyond a few hundred positions.
//!
//! Models whose sub-blocks end in a norm (Gemma 3) carry their residual stream scaled by
//! [`residual_scale`]: Gemma 3 270M's reaches ~105000, beyond fp16's 65504. Only the
//! embedding scale and the post-norm weights change; the norms that read the stream are
//! scale-invariant once their epsilon is scaled by the square (exact), so the logits are
//! those of the unscaled model. `hidden_in` / `hidden_out` carry the scaled stream.

use super::mil::{InputDim, ProgramBuilder, Var};
use super::weights::{self, WeightFormat};
use super::{ExportError, ExportOptions, OutputKind, Precision};
use crate::proto::DataType;
use kiln_format::kiln_types::{self, KilnType, LUT4_B32_TABLE_BYTES};
use kiln_runtime::config::{Activation, ModelConfig, RopeStyle};
use kiln_runtime::fp16::ops as norm_role;
use kiln_runtime::weights::WeightMatrix;
use kiln_runtime::Model;
use std::ops::Range;

const F16: DataType = DataType::Float16;
const F32: DataType = DataType::Float32;
const I32: DataType = DataType::Int32;

/// What one package of an export holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSpec {
    /// The transformer blocks it runs.
    pub layers: Range<usize>,
    /// Whether it starts from token ids (it holds the embedding).
    pub embedding: bool,
    /// Whether it ends in the LM head.
    pub head: bool,
}

/// Names of the interface, shared with the sidecar description.
pub mod names {
    /// Token ids input.
    pub const INPUT_IDS: &str = "input_ids";
    /// Hidden states input of a package that does not start from token ids.
    pub const HIDDEN_IN: &str = "hidden_in";
    /// Hidden states output of a package that does not end in the LM head.
    pub const HIDDEN_OUT: &str = "hidden_out";
    /// Additive attention mask input.
    pub const CAUSAL_MASK: &str = "causal_mask";
    /// Key cache state.
    pub const KEY_CACHE: &str = "keyCache";
    /// Value cache state.
    pub const VALUE_CACHE: &str = "valueCache";
    /// Logits output.
    pub const LOGITS: &str = "logits";
    /// Arg max output.
    pub const NEXT_TOKEN: &str = "next_token";
}

/// Checks what every family shares: layer list, attention shapes, request sizes.
pub fn check_common(c: &ModelConfig, opts: &ExportOptions) -> Result<(), ExportError> {
    if c.layers.len() != c.n_layers || c.n_layers == 0 {
        return Err(ExportError::Invalid(format!(
            "the configuration describes {} layers but lists {}",
            c.n_layers,
            c.layers.len()
        )));
    }
    if c.rope_dim != c.head_dim {
        return Err(ExportError::Unsupported(format!(
            "{} model: partial rotary embedding (rope_dim != head_dim) is not supported by the Core ML exporter yet",
            c.architecture
        )));
    }
    if c.attn_logit_softcap.is_some() {
        return Err(ExportError::Unsupported(format!(
            "{} model: attention logit soft-capping is not supported by the Core ML exporter yet",
            c.architecture
        )));
    }
    if c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 || c.head_dim % 2 != 0 {
        return Err(ExportError::Invalid(format!(
            "{} query heads, {} key/value heads and head size {} do not form grouped-query attention",
            c.n_heads, c.n_kv_heads, c.head_dim
        )));
    }
    if let Some(f) = &c.rope_freq_factors {
        if f.len() < c.rope_dim / 2 {
            return Err(ExportError::Invalid(format!(
                "{} rope frequency factors for {} frequencies",
                f.len(),
                c.rope_dim / 2
            )));
        }
    }
    let (lo, hi) = opts.query;
    if opts.context == 0 || lo == 0 || lo > hi || hi > opts.context {
        return Err(ExportError::Invalid(format!(
            "context {} and query lengths {lo}-{hi} must satisfy 1 <= min <= max <= context",
            opts.context
        )));
    }
    if opts.context > c.context_length.max(1) {
        return Err(ExportError::Invalid(format!(
            "context {} exceeds the model's trained context of {} positions",
            opts.context, c.context_length
        )));
    }
    if opts.context > i32::MAX as usize / 2 {
        return Err(ExportError::Invalid(format!(
            "context {} is too large",
            opts.context
        )));
    }
    Ok(())
}

/// The matrix as row-major f32 `[rows, cols]` (`[out, in]`, the layout `linear` takes).
pub fn dense(m: &WeightMatrix) -> Vec<f32> {
    dense_rows(m, 0..m.rows())
}

/// Rows `rows` of the matrix as row-major f32.
fn dense_rows(m: &WeightMatrix, rows: Range<usize>) -> Vec<f32> {
    let cols = m.cols();
    let mut out = vec![0f32; rows.len() * cols];
    for (r, row) in rows.zip(out.chunks_exact_mut(cols)) {
        m.dequantize_row(r, row);
    }
    out
}

/// Reorders the rows of each head from adjacent rotary pairs `(2i, 2i+1)` to split halves
/// `(i, i + d/2)`. Applied to both q and k it leaves every attention score unchanged, and
/// lets one rotary formulation serve GGUF llama files (whose converter permuted the rows)
/// and Hugging Face checkpoints alike.
pub fn deinterleave(rows: &[f32], cols: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len());
    for r in deinterleaved_order(heads, head_dim) {
        out.extend_from_slice(&rows[r * cols..(r + 1) * cols]);
    }
    out
}

/// The source row of each row [`deinterleave`] writes.
fn deinterleaved_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; heads * head_dim];
    for h in 0..heads {
        for i in 0..half {
            for (dst, src) in [(i, 2 * i), (i + half, 2 * i + 1)] {
                order[h * head_dim + dst] = h * head_dim + src;
            }
        }
    }
    order
}

/// Emits rows `order` of `m`, in that order, as a matrix in `format`. A `LUT4_B32` tensor
/// (or `LUT4_B32_G{n}`) exported as `lut4-block32`, and a `LUT4`/`LUT6` tensor (any grouping)
/// exported as a lookup table of the same bits, keep their own encoding (their rows are
/// independent of each other but for the table they use), so the Core ML program holds the
/// package's values, not a second quantization of them.
fn matrix_rows(
    b: &mut ProgramBuilder,
    hint: &str,
    format: WeightFormat,
    m: &WeightMatrix,
    order: &[usize],
) -> Result<Var, ExportError> {
    let cols = m.cols();
    if let (WeightFormat::Lut4Block32, Some(ty @ KilnType::Lut4B32 { group })) =
        (format, m.kiln_format())
    {
        let (data, rows, rb) = (m.data(), m.rows(), m.row_bytes());
        // The tables follow the rows as stored (only the rows may be held planar).
        let table = |r: usize| kiln_types::lut4_b32_table(ty, data, rows, cols, r);
        let mut own = Vec::with_capacity(order.len() * (rb + LUT4_B32_TABLE_BYTES));
        for &r in order {
            own.extend_from_slice(&m.stored_row(r));
        }
        // With groups, the rows taken (reordered or a slice) may no longer fall in whole
        // groups: each carries its own group's table, and the export merges the rows that
        // still share one.
        let own_ty = match group {
            None => {
                own.extend_from_slice(table(0));
                ty
            }
            Some(_) => {
                for &r in order {
                    own.extend_from_slice(table(r));
                }
                KilnType::Lut4B32 { group: Some(1) }
            }
        };
        return weights::lut4_block32(b, hint, own_ty, order.len(), cols, &own);
    }
    if let (WeightFormat::Lut { bits, .. }, Some(ty @ KilnType::Lut { bits: stored, .. })) =
        (format, m.kiln_format())
    {
        if bits == stored {
            // The package's own tables and indices: a calibrated package keeps its calibration.
            let (data, rows) = (m.data(), m.rows());
            let mut indices = Vec::with_capacity(order.len() * cols);
            let mut idx = [0u8; kiln_types::CHUNK];
            for &r in order {
                for chunk in m.stored_row(r).chunks_exact(4 * bits as usize) {
                    kiln_types::unpack_chunk(bits, chunk, &mut idx);
                    indices.extend_from_slice(&idx);
                }
            }
            let tables: Vec<Vec<f32>> = order
                .iter()
                .map(|&r| {
                    let (start, len) = kiln_types::lut_table_range(ty, rows, cols, r);
                    data[start..start + len]
                        .chunks_exact(2)
                        .map(|h| kiln_format::ggml::f16_to_f32(u16::from_le_bytes([h[0], h[1]])))
                        .collect()
                })
                .collect();
            return weights::lut_stored(b, hint, bits, order.len(), cols, &indices, &tables);
        }
    }
    let mut w = vec![0f32; order.len() * cols];
    for (&r, row) in order.iter().zip(w.chunks_exact_mut(cols)) {
        m.dequantize_row(r, row);
    }
    weights::matrix(b, hint, format, order.len(), cols, &w)
}

/// [`matrix_rows`] of every row in order.
fn matrix_of(
    b: &mut ProgramBuilder,
    hint: &str,
    format: WeightFormat,
    m: &WeightMatrix,
) -> Result<Var, ExportError> {
    matrix_rows(b, hint, format, m, &(0..m.rows()).collect::<Vec<_>>())
}

/// Row ranges of the LM head's pieces: `pieces` ranges as equal as possible.
pub fn head_pieces(vocab: usize, pieces: usize) -> Vec<Range<usize>> {
    let per = vocab.div_ceil(pieces.max(1));
    (0..vocab)
        .step_by(per.max(1))
        .map(|s| s..(s + per).min(vocab))
        .collect()
}

/// Weight bytes of each part of the model in `format`: the embedding, each layer, one LM
/// head stored apart from the embedding. Blob records and alignment are counted.
pub fn part_bytes(model: &Model, format: WeightFormat, head_pieces: usize) -> (u64, Vec<u64>, u64) {
    const RECORD: u64 = 64 + 64;
    let c = &model.config;
    // Blobs per matrix: data and scale (or indices and table); the chain of lut4-block32 adds
    // its table and offset.
    let blobs = if matches!(format, WeightFormat::Lut4Block32) {
        4
    } else {
        2
    };
    let m = |w: &WeightMatrix| format.matrix_bytes(w.rows(), w.cols()) + blobs * RECORD;
    let v = |n: usize| 4 * n as u64 + RECORD;
    let embed = m(&model.token_embd);
    let layers = model
        .layers
        .iter()
        .map(|l| {
            let mut s = [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                .iter()
                .map(|w| m(w))
                .sum::<u64>()
                + v(l.attn_norm.len())
                + v(l.ffn_norm.len());
            for o in [&l.q_norm, &l.k_norm, &l.post_attn_norm, &l.post_ffn_norm]
                .into_iter()
                .flatten()
            {
                s += v(o.len());
            }
            for bias in [&l.bq, &l.bk, &l.bv, &l.bo, &l.b_gate, &l.b_up, &l.b_down]
                .into_iter()
                .flatten()
            {
                s += v(bias.len());
            }
            s
        })
        .collect();
    let head = m(&model.output) + v(c.n_embd) + head_pieces as u64 * 2 * RECORD;
    (embed, layers, head)
}

/// The factor the residual stream is carried at: 1/16 when every layer ends both sub-blocks
/// in a norm (so every addition to the stream can be scaled through that norm's weight),
/// else 1. A power of two, so the scaling itself is exact in fp16.
pub fn residual_scale(model: &Model) -> f32 {
    let post = model
        .layers
        .iter()
        .all(|l| l.post_attn_norm.is_some() && l.post_ffn_norm.is_some());
    if post {
        1.0 / 16.0
    } else {
        1.0
    }
}

/// Epsilon of the RMSNorms that read the residual stream as the program carries it: the
/// model's own for those norms (a model made fp16-safe by `kiln convert --fp16-safe` already
/// carries its stream scaled and says so in `residual_rms_eps`), times the square of the
/// program's further [`residual_scale`], so the norms' outputs are those of the unscaled model.
fn stream_eps(model: &Model) -> f32 {
    let rs = residual_scale(model);
    model.config.residual_eps() * rs * rs
}

/// Per distinct rotary setting, the fp16 `cos` and `sin` of this call's positions.
struct RopeTables {
    tables: Vec<((u32, u32), Var, Var)>,
}

/// What a chunk's layers share: positions, masks, rotary tables, cache bounds.
struct Shared {
    mask: Var,
    /// Per window size, the mask with positions beyond the window hidden as well.
    window_masks: Vec<(usize, Var)>,
    rope: RopeTables,
    minus_one: Var,
    past1: Var,
    end1: Var,
    zero1: Var,
    hd1: Var,
    scale: Var,
}

/// Emits the program of `chunk` into `b`, writing weights as it goes; returns the outputs.
pub fn build(
    b: &mut ProgramBuilder,
    model: &Model,
    opts: &ExportOptions,
    chunk: &ChunkSpec,
) -> Result<Vec<Var>, ExportError> {
    let c = &model.config;
    let (hd, nkv) = (c.head_dim, c.n_kv_heads);
    let ctx = opts.context;
    let (qlo, qhi) = opts.query;
    let qdim = InputDim::Range(qlo, qhi);
    let wf = opts.weights;

    let mut x = if chunk.embedding {
        b.input(names::INPUT_IDS, I32, &[InputDim::Fixed(1), qdim])
    } else {
        b.input(
            names::HIDDEN_IN,
            F16,
            &[InputDim::Fixed(1), qdim, InputDim::Fixed(c.n_embd)],
        )
    };
    let first_input = x.clone();

    let shared = if chunk.layers.is_empty() {
        None
    } else {
        let mask = b.input(
            names::CAUSAL_MASK,
            F16,
            &[
                InputDim::Fixed(1),
                InputDim::Fixed(1),
                qdim,
                InputDim::Range(qlo, ctx),
            ],
        );
        Some(shared_values(b, c, opts, chunk, &first_input, mask))
    };
    let n_local = chunk.layers.len();
    let caches = (n_local > 0).then(|| {
        let shape = [n_local, 1, nkv, ctx, hd];
        (
            b.state(names::KEY_CACHE, F16, &shape),
            b.state(names::VALUE_CACHE, F16, &shape),
        )
    });

    let mut embed_var = None;
    if chunk.embedding {
        let embed = matrix_of(b, "embed_tokens", wf, &model.token_embd)?;
        x = b.gather("embeddings", &embed, &x, 0);
        let scale = c.embedding_scale.unwrap_or(1.0) * residual_scale(model);
        if scale != 1.0 {
            let s = b.scalar("embedding_scale", F16, scale);
            x = b.mul("embeddings_scaled", &x, &s);
        }
        embed_var = Some(embed);
    }

    if let (Some(sh), Some((kc, vc))) = (&shared, &caches) {
        for (local, l) in chunk.layers.clone().enumerate() {
            x = layer(b, model, opts, sh, kc, vc, l, local, &x)?;
        }
    }

    if !chunk.head {
        let out = b.unary("identity", names::HIDDEN_OUT, &x);
        return Ok(vec![out]);
    }
    let h = rms_norm(
        b,
        opts,
        norm_role::OUTPUT_NORM,
        stream_eps(model),
        "final_norm",
        &x,
        &model.output_norm,
    );
    let pieces = head_pieces(c.vocab_size, opts.head_pieces(c.vocab_size));
    let single = pieces.len() == 1;
    let logits_name = match (opts.output, c.final_logit_softcap) {
        (OutputKind::Logits, None) => names::LOGITS,
        _ => "logits_raw",
    };
    let shared_head = embed_var.filter(|_| single && model.tied_embeddings);
    let logits = if let Some(e) = shared_head {
        b.linear(logits_name, &h, &e, None)
    } else {
        let mut parts = Vec::with_capacity(pieces.len());
        for (i, rows) in pieces.iter().enumerate() {
            let hint = if single {
                "lm_head".to_string()
            } else {
                format!("lm_head_{i}")
            };
            let order: Vec<usize> = rows.clone().collect();
            let w = matrix_rows(b, &hint, wf, &model.output, &order)?;
            let name = if single {
                logits_name.to_string()
            } else {
                format!("{hint}_logits")
            };
            parts.push(b.linear(&name, &h, &w, None));
        }
        if single {
            parts.pop().expect("one piece")
        } else {
            let refs: Vec<&Var> = parts.iter().collect();
            b.concat(logits_name, &refs, -1)
        }
    };
    let logits = match c.final_logit_softcap {
        Some(cap) => {
            let inv = b.scalar("softcap_inverse", F16, 1.0 / cap);
            let capv = b.scalar("softcap", F16, cap);
            let t = b.mul("logits_over_cap", &logits, &inv);
            let t = b.unary("tanh", "logits_tanh", &t);
            let name = match opts.output {
                OutputKind::Logits => names::LOGITS,
                OutputKind::Argmax => "logits_capped",
            };
            b.mul(name, &t, &capv)
        }
        None => logits,
    };
    Ok(vec![match opts.output {
        OutputKind::Logits => logits,
        OutputKind::Argmax => b.argmax_last(names::NEXT_TOKEN, &logits),
    }])
}

fn shared_values(
    b: &mut ProgramBuilder,
    c: &ModelConfig,
    opts: &ExportOptions,
    chunk: &ChunkSpec,
    first_input: &Var,
    mask: Var,
) -> Shared {
    let (hd, half) = (c.head_dim, c.head_dim / 2);
    // Positions past..end, from the shapes of the inputs.
    let in_shape = b.shape_of("input_shape", first_input);
    let one = b.int("one", 1);
    let three = b.int("three", 3);
    let q_len = b.gather("q_len", &in_shape, &one, 0);
    let mask_shape = b.shape_of("mask_shape", &mask);
    let end = b.gather("end", &mask_shape, &three, 0);
    let past = b.sub("past", &end, &q_len);
    let positions = b.range_1d("positions", &past, &end, &one);
    let pos_f = b.cast("positions_fp32", &positions, F32);
    let pos_f = b.expand_dims("positions_column", &pos_f, 1);

    let mut rope = RopeTables { tables: Vec::new() };
    let mut window_masks: Vec<(usize, Var)> = Vec::new();
    let mut zero = None;
    for l in chunk.layers.clone() {
        let lc = &c.layers[l];
        let key = (lc.rope_base.to_bits(), lc.rope_freq_scale.to_bits());
        if !rope.tables.iter().any(|(k, _, _)| *k == key) {
            let tag = rope.tables.len();
            let inv_freq: Vec<f32> = (0..half)
                .map(|i| {
                    let mut f = lc.rope_freq_scale / lc.rope_base.powf((2 * i) as f32 / hd as f32);
                    if let Some(factors) = &c.rope_freq_factors {
                        f /= factors[i];
                    }
                    f
                })
                .collect();
            let inv_freq = b.const_f32(&format!("inv_freq_{tag}"), &[half], &inv_freq);
            let freqs = b.mul(&format!("freqs_{tag}"), &pos_f, &inv_freq);
            let angles = b.concat(&format!("angles_{tag}"), &[&freqs, &freqs], -1);
            let cos32 = b.unary("cos", &format!("cos_{tag}_fp32"), &angles);
            let sin32 = b.unary("sin", &format!("sin_{tag}_fp32"), &angles);
            let cos = b.cast(&format!("cos_{tag}"), &cos32, F16);
            let sin = b.cast(&format!("sin_{tag}"), &sin32, F16);
            rope.tables.push((key, cos, sin));
        }
        // A window at least as long as the caches never hides anything.
        if let Some(w) = lc.sliding_window.filter(|&w| w < opts.context) {
            if !window_masks.iter().any(|(n, _)| *n == w) {
                // Hide key j from the query at position p when p - j >= w.
                let zero = zero.get_or_insert_with(|| b.int("zero", 0)).clone();
                let keys = b.range_1d(&format!("window{w}_keys"), &zero, &end, &one);
                let col = b.expand_dims(&format!("window{w}_queries"), &positions, 1);
                let dist = b.sub(&format!("window{w}_distance"), &col, &keys);
                let wv = b.int(&format!("window{w}_size"), w as i32);
                let far = b.greater_equal(&format!("window{w}_outside"), &dist, &wv);
                let ninf = b.scalar(&format!("window{w}_hidden"), F16, f32::NEG_INFINITY);
                let m = b.select(&format!("window{w}_mask"), &far, &ninf, &mask);
                window_masks.push((w, m));
            }
        }
    }
    let minus_one = b.scalar("minus_one", F16, -1.0);
    // Cache write bounds shared by every layer: [l, 0, 0, past, 0] .. [l + 1, 1, nkv, end, hd].
    let past1 = b.expand_dims("past_1d", &past, 0);
    let end1 = b.expand_dims("end_1d", &end, 0);
    let zero1 = b.ints("zero_1d", &[0]);
    let hd1 = b.ints("head_dim_1d", &[hd as i32]);
    let scale = b.scalar("attn_scale", F16, c.attn_scale);
    Shared {
        mask,
        window_masks,
        rope,
        minus_one,
        past1,
        end1,
        zero1,
        hd1,
        scale,
    }
}

/// RMSNorm over the last axis with weight `w`; statistics in fp32 under mixed precision.
fn rms_norm(
    b: &mut ProgramBuilder,
    opts: &ExportOptions,
    role: &str,
    eps: f32,
    name: &str,
    x: &Var,
    w: &[f32],
) -> Var {
    let graph = &opts.fp16_graph;
    let fp32 = opts.precision == Precision::Mixed
        || graph
            .fp32_ops
            .iter()
            .any(|op| op.split('.').next() == Some(role));
    if fp32 {
        let xf = b.cast(&format!("{name}_x_fp32"), x, F32);
        let sq = b.mul(&format!("{name}_square"), &xf, &xf);
        let ms = b.mean_last(&format!("{name}_mean"), &sq);
        let r = b.rsqrt(&format!("{name}_rsqrt"), &ms, eps);
        let n = b.mul(&format!("{name}_normalized"), &xf, &r);
        let wv = b.weight(&format!("{name}_weight"), F32, &[w.len()], w);
        let y = b.mul(&format!("{name}_scaled"), &n, &wv);
        return b.cast(name, &y, F16);
    }
    let wv = b.weight(&format!("{name}_weight"), F16, &[w.len()], w);
    if graph.max_scaled_norms.iter().any(|n| n == role) {
        // Divided by the row's largest magnitude first: every square is at most 1 and the
        // mean at least 1/width, so nothing overflows or vanishes in fp16; the epsilon is
        // divided by the same factor squared, which keeps the value of the norm. The floor
        // (fp16's smallest normal) keeps an all-zero row finite.
        let a = b.unary("abs", &format!("{name}_abs"), x);
        let m = b.reduce_last("reduce_max", &format!("{name}_row_max"), &a);
        let floor = b.scalar(&format!("{name}_floor"), F16, F16_MIN_NORMAL);
        let m = b.binary("maximum", &format!("{name}_divisor"), &m, &floor);
        let y = b.binary("real_div", &format!("{name}_max_scaled"), x, &m);
        let sq = b.mul(&format!("{name}_square"), &y, &y);
        let ms = b.mean_last(&format!("{name}_mean"), &sq);
        let e = b.scalar(&format!("{name}_eps"), F16, eps);
        let e = b.binary("real_div", &format!("{name}_eps_once"), &e, &m);
        let e = b.binary("real_div", &format!("{name}_eps_scaled"), &e, &m);
        let t = b.add(&format!("{name}_mean_eps"), &ms, &e);
        let r = b.rsqrt(&format!("{name}_rsqrt"), &t, 0.0);
        let n = b.mul(&format!("{name}_normalized"), &y, &r);
        return b.mul(name, &n, &wv);
    }
    let sq = b.mul(&format!("{name}_square"), x, x);
    let ms = b.mean_last(&format!("{name}_mean"), &sq);
    let r = b.rsqrt(&format!("{name}_rsqrt"), &ms, eps);
    let n = b.mul(&format!("{name}_normalized"), x, &r);
    b.mul(name, &n, &wv)
}

/// fp16's smallest normal value.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// Whether an operation the fp16 fix names (`attn_norm`, `ffn_norm.square`, …) belongs to an
/// RMSNorm, the only operations the exported program can compute in fp32.
pub(super) fn is_norm(op: &str) -> bool {
    op.split('.')
        .next()
        .is_some_and(|base| base.ends_with("norm"))
}

/// x `[1, n, q, hd]` → x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1].
fn rope(
    b: &mut ProgramBuilder,
    sh: &Shared,
    key: (u32, u32),
    name: &str,
    x: &Var,
    n: usize,
) -> Var {
    let hd = x.shape().last().copied().flatten().unwrap_or(0);
    let half = hd / 2;
    let (_, cos, sin) = sh
        .rope
        .tables
        .iter()
        .find(|(k, _, _)| *k == key)
        .expect("a table per rotary setting of the chunk");
    let x1 = b.slice(
        &format!("{name}_x1"),
        x,
        &[0, 0, 0, 0],
        &[1, n as i64, 0, half as i64],
        &[true, true, true, false],
    );
    let x2 = b.slice(
        &format!("{name}_x2"),
        x,
        &[0, 0, 0, half as i64],
        &[1, n as i64, 0, hd as i64],
        &[true, true, true, false],
    );
    let neg = b.mul(&format!("{name}_neg_x2"), &x2, &sh.minus_one);
    let rot = b.concat(&format!("{name}_rotated"), &[&neg, &x1], -1);
    let a = b.mul(&format!("{name}_cos"), x, cos);
    let s = b.mul(&format!("{name}_sin"), &rot, sin);
    b.add(name, &a, &s)
}

#[allow(clippy::too_many_arguments)]
fn layer(
    b: &mut ProgramBuilder,
    model: &Model,
    opts: &ExportOptions,
    sh: &Shared,
    key_cache: &Var,
    value_cache: &Var,
    l: usize,
    local: usize,
    x: &Var,
) -> Result<Var, ExportError> {
    let c = &model.config;
    let lw = &model.layers[l];
    let lc = &c.layers[l];
    let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
    let group = nh / nkv;
    let wf = opts.weights;
    let eps = c.rms_eps;
    let interleaved = c.rope_style == RopeStyle::Interleaved;
    let p = format!("layer{l}");
    // The norms reading the (scaled) residual stream see its epsilon scaled alike; the post
    // norms write into the stream at its scale.
    let rs = residual_scale(model);
    let stream_eps = stream_eps(model);
    let into_stream = |w: &[f32]| -> Vec<f32> { w.iter().map(|v| v * rs).collect() };
    let h = rms_norm(
        b,
        opts,
        norm_role::ATTN_NORM,
        stream_eps,
        &format!("{p}_attn_norm"),
        x,
        &lw.attn_norm,
    );

    let (mut q_order, mut k_order): (Vec<usize>, Vec<usize>) =
        ((0..lw.wq.rows()).collect(), (0..lw.wk.rows()).collect());
    let (mut bq, mut bk) = (lw.bq.clone(), lw.bk.clone());
    if interleaved {
        q_order = deinterleaved_order(nh, hd);
        k_order = deinterleaved_order(nkv, hd);
        bq = bq.map(|v| deinterleave(&v, 1, nh, hd));
        bk = bk.map(|v| deinterleave(&v, 1, nkv, hd));
    }
    let wq = matrix_rows(b, &format!("{p}_q_proj"), wf, &lw.wq, &q_order)?;
    let wk = matrix_rows(b, &format!("{p}_k_proj"), wf, &lw.wk, &k_order)?;
    let wv = matrix_of(b, &format!("{p}_v_proj"), wf, &lw.wv)?;
    let bias = |b: &mut ProgramBuilder, name: &str, v: &Option<Vec<f32>>| -> Option<Var> {
        v.as_ref()
            .map(|v| b.weight(&format!("{name}_bias"), F16, &[v.len()], v))
    };
    let bq = bias(b, &format!("{p}_q_proj"), &bq);
    let bk = bias(b, &format!("{p}_k_proj"), &bk);
    let bv = bias(b, &format!("{p}_v_proj"), &lw.bv);

    // [1, q, n·hd] → [1, q, n, hd] (per-head norm here) → [1, n, q, hd].
    let heads = |b: &mut ProgramBuilder,
                 name: &str,
                 w: &Var,
                 bias: Option<&Var>,
                 n: usize,
                 norm: Option<(&str, &Vec<f32>)>| {
        let y = b.linear(&format!("{name}_linear"), &h, w, bias);
        let mut y = b.reshape(&format!("{name}_heads"), &y, &[1, -1, n as i64, hd as i64]);
        if let Some((role, nw)) = norm {
            y = rms_norm(b, opts, role, eps, &format!("{name}_norm"), &y, nw);
        }
        b.transpose(name, &y, &[0, 2, 1, 3])
    };
    let q = heads(
        b,
        &format!("{p}_q"),
        &wq,
        bq.as_ref(),
        nh,
        lw.q_norm.as_ref().map(|w| (norm_role::ATTN_Q_NORM, w)),
    );
    let k = heads(
        b,
        &format!("{p}_k"),
        &wk,
        bk.as_ref(),
        nkv,
        lw.k_norm.as_ref().map(|w| (norm_role::ATTN_K_NORM, w)),
    );
    let v = heads(b, &format!("{p}_v"), &wv, bv.as_ref(), nkv, None);
    let rope_key = (lc.rope_base.to_bits(), lc.rope_freq_scale.to_bits());
    let q = rope(b, sh, rope_key, &format!("{p}_q_rope"), &q, nh);
    let k = rope(b, sh, rope_key, &format!("{p}_k_rope"), &k, nkv);

    // Write this call's keys and values into the layer's slice of the caches.
    let lead = b.ints(&format!("{p}_cache_begin_lead"), &[local as i32, 0, 0]);
    let begin = b.concat(
        &format!("{p}_cache_begin"),
        &[&lead, &sh.past1, &sh.zero1],
        0,
    );
    let lead_end = b.ints(
        &format!("{p}_cache_end_lead"),
        &[local as i32 + 1, 1, nkv as i32],
    );
    let stop = b.concat(
        &format!("{p}_cache_end"),
        &[&lead_end, &sh.end1, &sh.hd1],
        0,
    );
    let read_from = b.ints(
        &format!("{p}_cache_read_begin"),
        &[local as i32, 0, 0, 0, 0],
    );
    let mut cached = Vec::with_capacity(2);
    for (name, state, new) in [("key", key_cache, &k), ("value", value_cache, &v)] {
        let all = b.read_state(&format!("{p}_{name}_cache"), state);
        let new5 = b.expand_dims(&format!("{p}_{name}_update"), new, 0);
        let updated = b.slice_update(
            &format!("{p}_{name}_cache_updated"),
            &all,
            &new5,
            &begin,
            &stop,
        );
        b.write_state(&format!("{p}_{name}_cache_write"), state, &updated);
        let now = b.read_state(&format!("{p}_{name}_cache_now"), state);
        let seen = b.slice_dynamic(
            &format!("{p}_{name}s_seen"),
            &now,
            &read_from,
            &stop,
            &[true, false, false, false, false],
            vec![Some(1), Some(nkv), None, Some(hd)],
        );
        // Grouped-query attention: each key/value head serves `group` query heads.
        let seen = if group > 1 {
            let e = b.expand_dims(&format!("{p}_{name}s_grouped"), &seen, 2);
            let t = b.tile(&format!("{p}_{name}s_tiled"), &e, &[1, 1, group, 1, 1]);
            b.reshape(
                &format!("{p}_{name}s_repeated"),
                &t,
                &[1, nh as i64, -1, hd as i64],
            )
        } else {
            seen
        };
        cached.push(seen);
    }
    let (keys, values) = (&cached[0], &cached[1]);

    let mask = match lc.sliding_window {
        Some(w) => sh
            .window_masks
            .iter()
            .find(|(n, _)| *n == w)
            .map_or(&sh.mask, |(_, m)| m),
        None => &sh.mask,
    };
    let qs = b.mul(&format!("{p}_q_scaled"), &q, &sh.scale);
    let scores = b.matmul(&format!("{p}_scores"), &qs, keys, false, true);
    let masked = b.add(&format!("{p}_scores_masked"), &scores, mask);
    let attn = b.softmax(&format!("{p}_attention"), &masked, -1);
    let o = b.matmul(&format!("{p}_attn_values"), &attn, values, false, false);
    let o = b.transpose(&format!("{p}_attn_tokens"), &o, &[0, 2, 1, 3]);
    let o = b.reshape(&format!("{p}_attn_merged"), &o, &[1, -1, (nh * hd) as i64]);
    let wo = matrix_of(b, &format!("{p}_o_proj"), wf, &lw.wo)?;
    let bo = bias(b, &format!("{p}_o_proj"), &lw.bo);
    let mut o = b.linear(&format!("{p}_attn_out"), &o, &wo, bo.as_ref());
    if let Some(pn) = &lw.post_attn_norm {
        o = rms_norm(
            b,
            opts,
            norm_role::POST_ATTENTION_NORM,
            eps,
            &format!("{p}_post_attn_norm"),
            &o,
            &into_stream(pn),
        );
    }
    let x = b.add(&format!("{p}_attn_residual"), x, &o);

    let h = rms_norm(
        b,
        opts,
        norm_role::FFN_NORM,
        stream_eps,
        &format!("{p}_ffn_norm"),
        &x,
        &lw.ffn_norm,
    );
    let proj = |b: &mut ProgramBuilder,
                name: &str,
                m: &WeightMatrix,
                bv: &Option<Vec<f32>>,
                input: &Var|
     -> Result<Var, ExportError> {
        let w = matrix_of(b, &format!("{p}_{name}"), wf, m)?;
        let bb = bias(b, &format!("{p}_{name}"), bv);
        Ok(b.linear(&format!("{p}_{name}_out"), input, &w, bb.as_ref()))
    };
    let gate = proj(b, "gate_proj", &lw.w_gate, &lw.b_gate, &h)?;
    let up = proj(b, "up_proj", &lw.w_up, &lw.b_up, &h)?;
    let act = match c.activation {
        Activation::Silu => b.unary("silu", &format!("{p}_gate_silu"), &gate),
        Activation::GeluTanh => b.gelu(&format!("{p}_gate_gelu"), &gate, "TANH_APPROXIMATION"),
    };
    let prod = b.mul(&format!("{p}_gated"), &act, &up);
    let mut down = proj(b, "down_proj", &lw.w_down, &lw.b_down, &prod)?;
    if let Some(pn) = &lw.post_ffn_norm {
        down = rms_norm(
            b,
            opts,
            norm_role::POST_FFW_NORM,
            eps,
            &format!("{p}_post_ffn_norm"),
            &down,
            &into_stream(pn),
        );
    }
    Ok(b.add(&format!("{p}_ffn_residual"), &x, &down))
}
