//! The fp16 range check: the forward pass with every operation's output rounded to IEEE
//! binary16, as the Apple Neural Engine computes, measuring the largest magnitude each
//! operation produces in each layer.
//!
//! This is a reference forward of its own over the same [`Model`] weights rather than hooks in
//! [`crate::session`]: the values the Neural Engine rounds include intermediate results the fast
//! path never materialises (RMSNorm's squares and their mean, which the CPU kernel accumulates
//! in f64; attention scores and softmax sums, which the session's attention fuses and merges in
//! chunks), so observing them there would mean restructuring those kernels, and every hook
//! would sit on the hot path. Here matrix products go through the runtime's exact f32 kernels
//! and everything else is plain scalar code, one operation per step, the way an exported graph
//! spells it. With [`Rounding::None`] it computes in f32 and agrees with
//! [`Session`](crate::Session) (a test holds the two to a logits cosine of 0.99999), which
//! keeps the two descriptions of the network from drifting apart.
//!
//! Rounding model: each operation's inputs are fp16 values and its output is rounded to fp16
//! once (a matrix product accumulates in f32, as the Neural Engine's multiply-accumulate does).
//! Weights are used as stored (fp16 or narrower on a device already); norm weights are rounded
//! to fp16.

use crate::calibration::{InputStats, OUTPUT_WEIGHT};
use crate::config::{Activation, ModelConfig};
use crate::error::ModelError;
use crate::kernels::{matmul, Precision};
use crate::model::{LayerWeights, Model};
use crate::pool::ThreadPool;
use crate::session::RopeTable;
use half::f16;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The largest finite fp16 value.
pub const FP16_MAX: f32 = 65504.0;

/// The smallest normal fp16 value, 2^-14.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// How the forward pass treats each operation's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// f32 throughout: the answer the fp16 runs are compared with.
    None,
    /// Rounded to fp16 precision, but a value beyond the fp16 range is kept as it is (and counted
    /// as an overflow), so every operation's true magnitude is measured, not only the first
    /// one to overflow.
    Measure,
    /// IEEE fp16: beyond-range values become infinities, as on the device.
    Strict,
}

/// Names of the operations the range check reports, in the order the forward pass runs them.
/// Tensor-like names follow the GGUF weight they apply (`attn_q` is the query projection's
/// output); `NORM.square`, `NORM.mean` and `NORM.rsqrt` are RMSNorm's intermediate results.
pub mod ops {
    /// Token embedding rows (times the embedding scale).
    pub const TOKEN_EMBD: &str = "token_embd";
    /// Query projection.
    pub const ATTN_Q: &str = "attn_q";
    /// Key projection.
    pub const ATTN_K: &str = "attn_k";
    /// Value projection.
    pub const ATTN_V: &str = "attn_v";
    /// Queries after rotary embedding.
    pub const ATTN_Q_ROPE: &str = "attn_q_rope";
    /// Keys after rotary embedding.
    pub const ATTN_K_ROPE: &str = "attn_k_rope";
    /// Scaled (and soft-capped) attention scores.
    pub const ATTN_SCORES: &str = "attn_scores";
    /// Sum of the softmax exponentials.
    pub const ATTN_SOFTMAX_SUM: &str = "attn_softmax.sum";
    /// Attention probabilities.
    pub const ATTN_SOFTMAX: &str = "attn_softmax";
    /// Probability-weighted values.
    pub const ATTN_VALUES: &str = "attn_values";
    /// Attention output projection.
    pub const ATTN_OUTPUT: &str = "attn_output";
    /// Residual stream after the attention sub-block.
    pub const ATTN_RESIDUAL: &str = "attn_residual";
    /// Feed-forward gate projection.
    pub const FFN_GATE: &str = "ffn_gate";
    /// Feed-forward up projection.
    pub const FFN_UP: &str = "ffn_up";
    /// The gate's activation (SiLU or GELU).
    pub const FFN_ACT: &str = "ffn_act";
    /// Activation times up projection.
    pub const FFN_GATED: &str = "ffn_gated";
    /// Feed-forward down projection.
    pub const FFN_DOWN: &str = "ffn_down";
    /// Residual stream after the feed-forward sub-block.
    pub const FFN_RESIDUAL: &str = "ffn_residual";
    /// Output logits.
    pub const LOGITS: &str = "logits";
    /// RMSNorm before attention.
    pub const ATTN_NORM: &str = "attn_norm";
    /// RMSNorm over query heads.
    pub const ATTN_Q_NORM: &str = "attn_q_norm";
    /// RMSNorm over key heads.
    pub const ATTN_K_NORM: &str = "attn_k_norm";
    /// RMSNorm on the attention output.
    pub const POST_ATTENTION_NORM: &str = "post_attention_norm";
    /// RMSNorm before the feed-forward block.
    pub const FFN_NORM: &str = "ffn_norm";
    /// RMSNorm on the feed-forward output.
    pub const POST_FFW_NORM: &str = "post_ffw_norm";
    /// Final RMSNorm.
    pub const OUTPUT_NORM: &str = "output_norm";
    /// The RMSNorms that read the residual stream.
    pub const RESIDUAL_NORMS: [&str; 3] = [ATTN_NORM, FFN_NORM, OUTPUT_NORM];
}

/// The largest magnitude one operation produced at one place in the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRange {
    /// The transformer block, `None` for operations outside the blocks (embedding, output
    /// norm, logits).
    pub layer: Option<usize>,
    /// The operation (see [`ops`]).
    pub op: String,
    /// Largest finite |value|, as computed before rounding.
    pub max_abs: f32,
    /// Values produced.
    pub values: u64,
    /// Finite values beyond [`FP16_MAX`].
    pub overflows: u64,
    /// Infinities and NaNs (a strict run's overflows and what follows from them).
    pub non_finite: u64,
    /// Whether the operation was computed in fp32 as the fix in force says (its overflows
    /// do not count).
    pub fp32: bool,
}

impl OpRange {
    /// `max_abs` as a multiple of [`FP16_MAX`].
    pub fn ratio(&self) -> f64 {
        f64::from(self.max_abs) / f64::from(FP16_MAX)
    }

    /// Whether this operation leaves the fp16 range where it is computed in fp16.
    pub fn fails(&self) -> bool {
        !self.fp32 && (self.overflows > 0 || self.non_finite > 0)
    }

    /// `layer 3 ffn_norm.square` or `output logits`.
    pub fn site(&self) -> String {
        match self.layer {
            Some(l) => format!("layer {l} {}", self.op),
            None => format!("output {}", self.op),
        }
    }
}

/// Per layer and operation, the largest magnitude seen over one or more forward passes, in the
/// order the operations run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RangeReport {
    /// One entry per (layer, operation).
    pub ops: Vec<OpRange>,
    #[serde(skip)]
    index: HashMap<(Option<usize>, String), usize>,
}

impl RangeReport {
    fn entry(&mut self, layer: Option<usize>, op: &str, fp32: bool) -> &mut OpRange {
        let key = (layer, op.to_string());
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                self.ops.push(OpRange {
                    layer,
                    op: op.to_string(),
                    max_abs: 0.0,
                    values: 0,
                    overflows: 0,
                    non_finite: 0,
                    fp32,
                });
                self.index.insert(key, self.ops.len() - 1);
                self.ops.len() - 1
            }
        };
        &mut self.ops[i]
    }

    /// Folds another report (e.g. of another prompt) into this one.
    pub fn merge(&mut self, other: &RangeReport) {
        for o in &other.ops {
            let e = self.entry(o.layer, &o.op, o.fp32);
            e.max_abs = e.max_abs.max(o.max_abs);
            e.values += o.values;
            e.overflows += o.overflows;
            e.non_finite += o.non_finite;
        }
    }

    /// The entry of one operation at one place.
    pub fn get(&self, layer: Option<usize>, op: &str) -> Option<&OpRange> {
        self.ops.iter().find(|o| o.layer == layer && o.op == op)
    }

    /// The largest magnitude of `op` over every layer (and outside them).
    pub fn max_of(&self, op: &str) -> f32 {
        self.ops
            .iter()
            .filter(|o| o.op == op)
            .map(|o| o.max_abs)
            .fold(0.0, f32::max)
    }

    /// The operations that leave the fp16 range, worst first.
    pub fn failures(&self) -> Vec<&OpRange> {
        let mut v: Vec<&OpRange> = self.ops.iter().filter(|o| o.fails()).collect();
        v.sort_by(|a, b| b.max_abs.total_cmp(&a.max_abs));
        v
    }

    /// Operation names in first-seen order, each once.
    pub fn op_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for o in &self.ops {
            if !names.contains(&o.op.as_str()) {
                names.push(&o.op);
            }
        }
        names
    }
}

/// What an exported graph computes differently from the plain network so that it stays in
/// fp16 range: the graph half of an [`Fp16Fix`](crate::fp16_fix::Fp16Fix) (its weight half is
/// already in the weights).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphFix {
    /// RMSNorms (by name, every layer) computed on the row divided by its largest magnitude:
    /// `m = max|x|`, `y = x / m`, `out = y / sqrt(mean(y²) + eps/m²) * w`, the same value in
    /// exact arithmetic with every square in [0, 1] and a mean no smaller than 1/width. A
    /// constant divisor cannot do this: residual rows of ordinary tokens are thousands of times
    /// smaller than the rows with massive activations, so a divisor that keeps the latter's
    /// squares in range pushes the former's into fp16's subnormals.
    #[serde(default)]
    pub max_scaled_norms: Vec<String>,
    /// Operations computed in fp32 (by name, every layer): what no rescaling keeps in range.
    #[serde(default)]
    pub fp32_ops: Vec<String>,
}

impl GraphFix {
    fn max_scaled(&self, norm: &str) -> bool {
        self.max_scaled_norms.iter().any(|n| n == norm)
    }

    fn is_fp32(&self, op: &str) -> bool {
        self.fp32_ops.iter().any(|o| o == op)
    }
}

/// Rounds, measures and records operation outputs.
struct Probe<'a> {
    rounding: Rounding,
    graph: &'a GraphFix,
    report: &'a mut RangeReport,
    /// With calibration: the inputs of every matrix product are summed here.
    inputs: Option<&'a mut InputStats>,
}

impl Probe<'_> {
    /// Rounds `values` (the output of `op` in `layer`) in place and records their range.
    fn out(&mut self, layer: Option<usize>, op: &str, values: &mut [f32]) {
        // An operation kept in fp32 stays fp32, and so do the sub-steps of a norm kept in fp32.
        let base = op.split('.').next().unwrap_or(op);
        let fp32 = self.graph.is_fp32(op) || self.graph.is_fp32(base);
        let (mut max, mut over, mut bad) = (0.0f32, 0u64, 0u64);
        for v in values.iter_mut() {
            if v.is_finite() {
                let a = v.abs();
                max = max.max(a);
                if a > FP16_MAX {
                    over += 1;
                }
            } else {
                bad += 1;
            }
            if !fp32 {
                *v = self.round(*v);
            }
        }
        let e = self.report.entry(layer, op, fp32);
        e.max_abs = e.max_abs.max(max);
        e.values += values.len() as u64;
        e.overflows += over;
        e.non_finite += bad;
    }

    fn one(&mut self, layer: Option<usize>, op: &str, v: f32) -> f32 {
        let mut a = [v];
        self.out(layer, op, &mut a);
        a[0]
    }

    fn round(&self, v: f32) -> f32 {
        match self.rounding {
            Rounding::None => v,
            Rounding::Strict => f16::from_f32(v).to_f32(),
            Rounding::Measure => {
                let h = f16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    v
                } else {
                    h.to_f32()
                }
            }
        }
    }

    /// RMSNorm of each `w.len()`-wide row of `x` in place, as a graph spells it: square,
    /// mean, rsqrt, normalise, scale; max-scaled first when the fix says so.
    fn rms_norm(&mut self, layer: Option<usize>, name: &str, x: &mut [f32], w: &[f32], eps: f32) {
        let dim = w.len();
        let scaled = self.graph.max_scaled(name);
        let w: Vec<f32> = w.iter().map(|&v| self.round(v)).collect();
        let mut sq = vec![0.0f32; dim];
        let sq_name = format!("{name}.square");
        let mean_name = format!("{name}.mean");
        let rsqrt_name = format!("{name}.rsqrt");
        for row in x.chunks_exact_mut(dim) {
            let mut eps_row = self.round(eps);
            if scaled {
                // The smallest normal fp16 value keeps an all-zero row from dividing by zero.
                let m = row
                    .iter()
                    .fold(0.0f32, |a, v| a.max(v.abs()))
                    .max(F16_MIN_NORMAL);
                row.iter_mut().for_each(|v| *v = self.round(*v / m));
                eps_row = self.round(self.round(eps / m) / m);
            }
            for (s, &v) in sq.iter_mut().zip(row.iter()) {
                *s = v * v;
            }
            self.out(layer, &sq_name, &mut sq);
            let sum: f64 = sq.iter().map(|&v| f64::from(v)).sum();
            let mean = self.one(layer, &mean_name, (sum / dim as f64) as f32);
            let r = self.one(layer, &rsqrt_name, 1.0 / (mean + eps_row).sqrt());
            for (v, wi) in row.iter_mut().zip(&w) {
                *v = self.round(*v * r) * wi;
            }
            self.out(layer, name, row);
        }
    }
}

/// Runs `tokens` from an empty context through `model` with the given rounding, adding every
/// operation's range to `report`; returns the logits after the last token.
///
/// `graph` is the graph half of an fp16 fix (use `GraphFix::default()` for the plain network).
pub fn forward(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    rounding: Rounding,
    graph: &GraphFix,
    report: &mut RangeReport,
) -> Result<Vec<f32>, ModelError> {
    forward_observed(model, pool, tokens, rounding, graph, report, None)
}

/// [`forward`], adding the squares of every matrix product's inputs to `inputs` when given
/// (for the output projection, those of every position, not only the last).
pub(crate) fn forward_observed(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    rounding: Rounding,
    graph: &GraphFix,
    report: &mut RangeReport,
    inputs: Option<&mut InputStats>,
) -> Result<Vec<f32>, ModelError> {
    let c = &model.config;
    if tokens.is_empty() {
        return Err(ModelError::Request("forward called with no tokens".into()));
    }
    if tokens.len() > c.context_length {
        return Err(ModelError::Request(format!(
            "{} tokens exceed the model's context of {} positions",
            tokens.len(),
            c.context_length
        )));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::Request(format!(
            "token id {bad} is outside the vocabulary (size {})",
            c.vocab_size
        )));
    }
    let mut probe = Probe {
        rounding,
        graph,
        report,
        inputs,
    };
    let (t_len, e) = (tokens.len(), c.n_embd);
    let mut x = vec![0.0f32; t_len * e];
    for (row, &tok) in x.chunks_exact_mut(e).zip(tokens) {
        model.token_embd.dequantize_row(tok as usize, row);
        if let Some(s) = c.embedding_scale {
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
    probe.out(None, ops::TOKEN_EMBD, &mut x);
    let residual_eps = c.residual_eps();
    for (il, w) in model.layers.iter().enumerate() {
        layer(&mut probe, pool, c, il, w, &mut x, t_len, residual_eps);
    }
    if let Some(stats) = probe.inputs.as_deref_mut() {
        let mut all = x.clone();
        crate::kernels::rms_norm(&mut all, &model.output_norm, residual_eps);
        stats.add(OUTPUT_WEIGHT, &all, e);
    }
    let last = &mut x[(t_len - 1) * e..];
    probe.rms_norm(
        None,
        ops::OUTPUT_NORM,
        last,
        &model.output_norm,
        residual_eps,
    );
    let mut logits = vec![0.0f32; c.vocab_size];
    matmul(pool, &model.output, last, 1, &mut logits, Precision::Exact);
    if let Some(cap) = c.final_logit_softcap {
        logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
    }
    probe.out(None, ops::LOGITS, &mut logits);
    Ok(logits)
}

/// A matrix product and its optional bias, rounded as one operation.
#[allow(clippy::too_many_arguments)]
fn linear(
    probe: &mut Probe<'_>,
    pool: &ThreadPool,
    il: usize,
    op: &str,
    w: &crate::weights::WeightMatrix,
    bias: Option<&[f32]>,
    x: &[f32],
    t_len: usize,
) -> Vec<f32> {
    if let Some(stats) = probe.inputs.as_deref_mut() {
        stats.add(&format!("blk.{il}.{op}.weight"), x, w.cols());
    }
    let mut y = vec![0.0f32; t_len * w.rows()];
    matmul(pool, w, x, t_len, &mut y, Precision::Exact);
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
        }
    }
    probe.out(Some(il), op, &mut y);
    y
}

#[allow(clippy::too_many_arguments)]
fn layer(
    probe: &mut Probe<'_>,
    pool: &ThreadPool,
    c: &ModelConfig,
    il: usize,
    w: &LayerWeights,
    x: &mut [f32],
    t_len: usize,
    residual_eps: f32,
) {
    let l = Some(il);
    let hd = c.head_dim;

    // Attention sub-block.
    let mut h = x.to_vec();
    probe.rms_norm(l, ops::ATTN_NORM, &mut h, &w.attn_norm, residual_eps);
    let mut q = linear(
        probe,
        pool,
        il,
        ops::ATTN_Q,
        &w.wq,
        w.bq.as_deref(),
        &h,
        t_len,
    );
    let mut k = linear(
        probe,
        pool,
        il,
        ops::ATTN_K,
        &w.wk,
        w.bk.as_deref(),
        &h,
        t_len,
    );
    let v = linear(
        probe,
        pool,
        il,
        ops::ATTN_V,
        &w.wv,
        w.bv.as_deref(),
        &h,
        t_len,
    );
    if let Some(qn) = &w.q_norm {
        probe.rms_norm(l, ops::ATTN_Q_NORM, &mut q, qn, c.rms_eps);
    }
    if let Some(kn) = &w.k_norm {
        probe.rms_norm(l, ops::ATTN_K_NORM, &mut k, kn, c.rms_eps);
    }
    let lc = &c.layers[il];
    let rope = RopeTable::new(c, lc.rope_base, lc.rope_freq_scale);
    let mut angles = Vec::new();
    for t in 0..t_len {
        rope.angles(t, &mut angles);
        for head in q[t * c.q_dim()..(t + 1) * c.q_dim()].chunks_exact_mut(hd) {
            RopeTable::rotate(head, &angles, c.rope_style);
        }
        for head in k[t * c.kv_dim()..(t + 1) * c.kv_dim()].chunks_exact_mut(hd) {
            RopeTable::rotate(head, &angles, c.rope_style);
        }
    }
    probe.out(l, ops::ATTN_Q_ROPE, &mut q);
    probe.out(l, ops::ATTN_K_ROPE, &mut k);
    let attn = attention(probe, c, il, &q, &k, &v, t_len);
    let mut o = linear(
        probe,
        pool,
        il,
        ops::ATTN_OUTPUT,
        &w.wo,
        w.bo.as_deref(),
        &attn,
        t_len,
    );
    if let Some(pn) = &w.post_attn_norm {
        probe.rms_norm(l, ops::POST_ATTENTION_NORM, &mut o, pn, c.rms_eps);
    }
    x.iter_mut().zip(&o).for_each(|(xi, oi)| *xi += oi);
    probe.out(l, ops::ATTN_RESIDUAL, x);

    // Feed-forward sub-block.
    let mut h = x.to_vec();
    probe.rms_norm(l, ops::FFN_NORM, &mut h, &w.ffn_norm, residual_eps);
    let mut gate = linear(
        probe,
        pool,
        il,
        ops::FFN_GATE,
        &w.w_gate,
        w.b_gate.as_deref(),
        &h,
        t_len,
    );
    let up = linear(
        probe,
        pool,
        il,
        ops::FFN_UP,
        &w.w_up,
        w.b_up.as_deref(),
        &h,
        t_len,
    );
    for g in gate.iter_mut() {
        *g = match c.activation {
            Activation::Silu => *g / (1.0 + (-*g).exp()),
            Activation::GeluTanh => {
                let u = 0.797_884_6 * (*g + 0.044_715 * *g * *g * *g);
                0.5 * *g * (1.0 + u.tanh())
            }
        };
    }
    probe.out(l, ops::FFN_ACT, &mut gate);
    gate.iter_mut().zip(&up).for_each(|(g, u)| *g *= u);
    probe.out(l, ops::FFN_GATED, &mut gate);
    let mut d = linear(
        probe,
        pool,
        il,
        ops::FFN_DOWN,
        &w.w_down,
        w.b_down.as_deref(),
        &gate,
        t_len,
    );
    if let Some(pn) = &w.post_ffn_norm {
        probe.rms_norm(l, ops::POST_FFW_NORM, &mut d, pn, c.rms_eps);
    }
    x.iter_mut().zip(&d).for_each(|(xi, di)| *xi += di);
    probe.out(l, ops::FFN_RESIDUAL, x);
}

/// Causal (optionally sliding-window) attention of every position over the batch, from an
/// empty context, one (position, head) at a time.
fn attention(
    probe: &mut Probe<'_>,
    c: &ModelConfig,
    il: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t_len: usize,
) -> Vec<f32> {
    let l = Some(il);
    let (hd, group) = (c.head_dim, c.group_size());
    let window = c.layers[il].sliding_window;
    let mut out = vec![0.0f32; t_len * c.q_dim()];
    let mut scores = Vec::with_capacity(t_len);
    let mut acc = vec![0.0f32; hd];
    for t in 0..t_len {
        let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
        for h in 0..c.n_heads {
            let g = h / group;
            let qh = &q[(t * c.n_heads + h) * hd..(t * c.n_heads + h + 1) * hd];
            scores.clear();
            for j in first..=t {
                let kh = &k[(j * c.n_kv_heads + g) * hd..(j * c.n_kv_heads + g + 1) * hd];
                let dot: f32 = qh.iter().zip(kh).map(|(a, b)| a * b).sum();
                let mut s = dot * c.attn_scale;
                if let Some(cap) = c.attn_logit_softcap {
                    s = cap * (s / cap).tanh();
                }
                scores.push(s);
            }
            probe.out(l, ops::ATTN_SCORES, &mut scores);
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores
                .iter_mut()
                .for_each(|s| *s = probe.round((*s - m).exp()));
            let sum = probe.one(l, ops::ATTN_SOFTMAX_SUM, scores.iter().sum());
            scores.iter_mut().for_each(|s| *s /= sum);
            probe.out(l, ops::ATTN_SOFTMAX, &mut scores);
            acc.fill(0.0);
            for (jj, j) in (first..=t).enumerate() {
                let vh = &v[(j * c.n_kv_heads + g) * hd..(j * c.n_kv_heads + g + 1) * hd];
                acc.iter_mut()
                    .zip(vh)
                    .for_each(|(a, b)| *a += scores[jj] * b);
            }
            probe.out(l, ops::ATTN_VALUES, &mut acc);
            out[(t * c.n_heads + h) * hd..(t * c.n_heads + h + 1) * hd].copy_from_slice(&acc);
        }
    }
    out
}

/// One prompt run in strict fp16, compared with the same network in f32.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrictRun {
    /// The prompt text.
    pub text: String,
    /// Its tokens.
    pub n_tokens: usize,
    /// Cosine of the fp16 logits with the f32 logits after the last token (0 when the fp16
    /// logits are all zero, NaN when some are not finite).
    pub cosine: f64,
    /// Whether both put the same token first.
    pub top1_agrees: bool,
    /// fp16 logits that are infinite or NaN.
    pub non_finite_logits: usize,
}

/// The outcome of [`check`].
#[derive(Clone, Debug, PartialEq)]
pub struct Fp16Check {
    /// Ranges of every operation over all prompts ([`Rounding::Measure`]).
    pub report: RangeReport,
    /// Each prompt's strict fp16 run.
    pub prompts: Vec<StrictRun>,
}

impl Fp16Check {
    /// Whether no operation computed in fp16 leaves the fp16 range.
    pub fn passed(&self) -> bool {
        self.report.failures().is_empty()
    }
}

/// The fp16 range check of `model` on `prompts` (text and token ids) under `graph`: the ranges
/// of every operation, and each prompt's strict fp16 logits against f32.
pub fn check(
    model: &Model,
    pool: &ThreadPool,
    prompts: &[(String, Vec<u32>)],
    graph: &GraphFix,
) -> Result<Fp16Check, ModelError> {
    let mut report = RangeReport::default();
    let mut runs = Vec::with_capacity(prompts.len());
    for (text, ids) in prompts {
        let mut scratch = RangeReport::default();
        let exact = forward(model, pool, ids, Rounding::None, graph, &mut scratch)?;
        forward(model, pool, ids, Rounding::Measure, graph, &mut report)?;
        let strict = forward(model, pool, ids, Rounding::Strict, graph, &mut scratch)?;
        runs.push(StrictRun {
            text: text.clone(),
            n_tokens: ids.len(),
            cosine: crate::validate::cosine(&exact, &strict),
            top1_agrees: crate::validate::argmax(&exact) == crate::validate::argmax(&strict),
            non_finite_logits: strict.iter().filter(|v| !v.is_finite()).count(),
        });
    }
    Ok(Fp16Check {
        report,
        prompts: runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_modes() {
        let g = GraphFix::default();
        let mut report = RangeReport::default();
        let mut probe = Probe {
            rounding: Rounding::Measure,
            graph: &g,
            report: &mut report,
            inputs: None,
        };
        let mut v = [1.0 + 2f32.powi(-12), 70000.0, -65519.0, f32::NAN];
        probe.out(Some(2), "x", &mut v);
        // Rounded to fp16 precision; beyond-range values kept for measuring.
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 70000.0);
        assert_eq!(v[2], -65504.0);
        let e = report.get(Some(2), "x").unwrap();
        assert_eq!((e.max_abs, e.overflows, e.non_finite), (70000.0, 2, 1));
        assert!(e.fails());
        assert_eq!(e.site(), "layer 2 x");

        let mut report = RangeReport::default();
        let mut probe = Probe {
            rounding: Rounding::Strict,
            graph: &g,
            report: &mut report,
            inputs: None,
        };
        let mut v = [70000.0f32, 65519.0];
        probe.out(None, "y", &mut v);
        assert_eq!(v, [f32::INFINITY, 65504.0]);

        // An operation marked fp32 is neither rounded nor failed.
        let g = GraphFix {
            max_scaled_norms: vec![],
            fp32_ops: vec!["attn_norm".into()],
        };
        let mut report = RangeReport::default();
        let mut probe = Probe {
            rounding: Rounding::Strict,
            graph: &g,
            report: &mut report,
            inputs: None,
        };
        let mut v = [1e6f32];
        probe.out(Some(0), "attn_norm.square", &mut v);
        assert_eq!(v, [1e6]);
        assert!(!report.ops[0].fails() && report.ops[0].fp32);
    }

    #[test]
    fn max_scaled_norm_matches_the_plain_one_and_avoids_overflow() {
        let w = [0.5f32, 2.0, 1.0, 1.5];
        let row = [300.0f32, -20.0, 0.25, 1.0];
        let eps = 1e-5;
        let plain = {
            let mut x = row;
            crate::kernels::rms_norm(&mut x, &w, eps);
            x
        };
        for (scaled, overflow) in [(false, true), (true, false)] {
            let g = GraphFix {
                max_scaled_norms: if scaled { vec!["n".into()] } else { vec![] },
                fp32_ops: vec![],
            };
            let mut report = RangeReport::default();
            let mut probe = Probe {
                rounding: Rounding::Strict,
                graph: &g,
                report: &mut report,
                inputs: None,
            };
            let mut x = row;
            probe.rms_norm(None, "n", &mut x, &w, eps);
            let sq = report.get(None, "n.square").unwrap();
            assert_eq!(sq.overflows > 0, overflow);
            if scaled {
                for (a, b) in x.iter().zip(&plain) {
                    assert!(
                        (a - b).abs() <= 2e-3 * b.abs().max(1e-3),
                        "{x:?} vs {plain:?}"
                    );
                }
            } else {
                // 300² overflows fp16: the mean is infinite and the row collapses to zeros.
                assert!(x.iter().all(|&v| v == 0.0), "{x:?}");
            }
        }
    }
}
