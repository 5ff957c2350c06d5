//! Inference sessions: the forward pass over a batch of tokens with a key/value cache.

use crate::config::{ModelConfig, RopeStyle};
use crate::error::ModelError;
use crate::kernels::{self, matmul, Precision, SharedOut};
use crate::model::{LayerWeights, Model};
use crate::pool::ThreadPool;
use kiln_kernels::aligned::AlignedVec;
use std::cell::RefCell;

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the row after the last token of the batch (generation).
    Last,
    /// One row per token of the batch (perplexity, teacher forcing).
    All,
}

/// Keys and values of every past position, per layer, laid out `[kv_head][position][head_dim]`
/// so one head's keys are contiguous for the attention dot products.
pub struct KvCache {
    keys: Vec<AlignedVec<f32>>,
    values: Vec<AlignedVec<f32>>,
    n_ctx: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    fn new(c: &ModelConfig, n_ctx: usize) -> KvCache {
        let per_layer = c.n_kv_heads * n_ctx * c.head_dim;
        KvCache {
            keys: (0..c.n_layers)
                .map(|_| AlignedVec::filled(per_layer, 0.0))
                .collect(),
            values: (0..c.n_layers)
                .map(|_| AlignedVec::filled(per_layer, 0.0))
                .collect(),
            n_ctx,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    fn offset(&self, head: usize, pos: usize) -> usize {
        (head * self.n_ctx + pos) * self.head_dim
    }

    /// Bytes the cache occupies.
    pub fn n_bytes(&self) -> usize {
        2 * self.keys.len() * self.n_kv_heads * self.n_ctx * self.head_dim * 4
    }
}

/// One conversation's state: the KV cache and the number of positions already processed.
pub struct Session<'m> {
    model: &'m Model,
    pool: &'m ThreadPool,
    cache: KvCache,
    n_past: usize,
    precision: Precision,
    scratch: Buffers,
}

thread_local! {
    static SCORES: RefCell<AlignedVec<f32>> = const { RefCell::new(AlignedVec::new()) };
}

impl<'m> Session<'m> {
    /// A new session able to hold `n_ctx` positions (capped by the model's context length).
    pub fn new(model: &'m Model, pool: &'m ThreadPool, n_ctx: usize) -> Session<'m> {
        let n_ctx = n_ctx.clamp(1, model.config.context_length.max(1));
        Session {
            model,
            pool,
            cache: KvCache::new(&model.config, n_ctx),
            n_past: 0,
            precision: Precision::default(),
            scratch: Buffers::default(),
        }
    }

    /// Chooses how matrix products treat activations (see [`Precision`]); takes effect from
    /// the next forward pass.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The precision of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Positions processed so far.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Positions the session can hold.
    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx
    }

    /// Forgets every position (the cache memory is kept).
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Drops positions from `n` on, so generation can resume from an earlier point.
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Runs `tokens` (one batch, all positions in one pass) and returns the requested logits:
    /// `vocab_size` values for [`Logits::Last`], `tokens.len() * vocab_size` for [`Logits::All`].
    pub fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ModelError> {
        let model = self.model;
        let c = &model.config;
        let t_len = tokens.len();
        if t_len == 0 {
            return Err(ModelError::Request("forward called with no tokens".into()));
        }
        if self.n_past + t_len > self.cache.n_ctx {
            return Err(ModelError::Request(format!(
                "{} tokens after {} already processed exceed the context of {} positions",
                t_len, self.n_past, self.cache.n_ctx
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        let e = c.n_embd;
        let precision = self.precision;
        // Scratch activations, the residual stream included, live in the session: a fresh
        // multi-megabyte allocation per forward pass would be paid again in page faults.
        let mut buf = std::mem::take(&mut self.scratch);
        buf.prepare(c, t_len);
        let mut x = std::mem::take(&mut buf.x);
        for (row, &tok) in x.chunks_exact_mut(e).zip(tokens) {
            model.token_embd.dequantize_row(tok as usize, row);
            if let Some(s) = c.embedding_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        for (il, layer) in model.layers.iter().enumerate() {
            self.layer_forward(il, layer, &mut x, &mut buf);
        }
        let rows: &mut [f32] = match want {
            Logits::Last => &mut x[(t_len - 1) * e..],
            Logits::All => &mut x[..],
        };
        let n_rows = rows.len() / e;
        kernels::rms_norm(rows, &model.output_norm, c.residual_eps());
        let mut logits = vec![0.0f32; n_rows * c.vocab_size];
        matmul(
            self.pool,
            &model.output,
            rows,
            n_rows,
            &mut logits,
            precision,
        );
        if let Some(cap) = c.final_logit_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        buf.x = x;
        self.scratch = buf;
        self.n_past += t_len;
        Ok(logits)
    }

    fn layer_forward(&mut self, il: usize, w: &LayerWeights, x: &mut [f32], b: &mut Buffers) {
        let c = &self.model.config;
        let pool = self.pool;
        let precision = self.precision;
        let t_len = b.t_len;
        let (hd, e) = (c.head_dim, c.n_embd);

        // Attention sub-block.
        b.h.copy_from_slice(x);
        kernels::rms_norm(&mut b.h, &w.attn_norm, c.residual_eps());
        kernels::matmul_shared(
            pool,
            &[&w.wq, &w.wk, &w.wv],
            &b.h,
            t_len,
            &mut [&mut b.q, &mut b.k, &mut b.v],
            precision,
        );
        add_bias(&mut b.q, w.bq.as_deref());
        add_bias(&mut b.k, w.bk.as_deref());
        add_bias(&mut b.v, w.bv.as_deref());
        if let Some(qn) = &w.q_norm {
            kernels::rms_norm(&mut b.q, qn, c.rms_eps);
        }
        if let Some(kn) = &w.k_norm {
            kernels::rms_norm(&mut b.k, kn, c.rms_eps);
        }
        let layer_cfg = &c.layers[il];
        let key = (
            layer_cfg.rope_base.to_bits(),
            layer_cfg.rope_freq_scale.to_bits(),
        );
        let at = match b.rope.iter().position(|r| r.key == key) {
            Some(at) => at,
            None => {
                let rope = RopeTable::new(c, layer_cfg.rope_base, layer_cfg.rope_freq_scale);
                let (mut all, mut angles) = (Vec::new(), Vec::new());
                for t in 0..t_len {
                    rope.angles(self.n_past + t, &mut angles);
                    all.extend_from_slice(&angles);
                }
                b.rope.push(BatchAngles { key, angles: all });
                b.rope.len() - 1
            }
        };
        let half = c.rope_dim / 2;
        for t in 0..t_len {
            // One table of (cos, sin) per position, shared by every query and key head.
            let angles = &b.rope[at].angles[t * half..(t + 1) * half];
            for head in b.q[t * c.q_dim()..(t + 1) * c.q_dim()].chunks_exact_mut(hd) {
                RopeTable::rotate(head, angles, c.rope_style);
            }
            for head in b.k[t * c.kv_dim()..(t + 1) * c.kv_dim()].chunks_exact_mut(hd) {
                RopeTable::rotate(head, angles, c.rope_style);
            }
        }
        // Append this batch's keys and values to the cache.
        {
            let cache = &mut self.cache;
            for t in 0..t_len {
                let pos = self.n_past + t;
                for g in 0..c.n_kv_heads {
                    let src = (t * c.n_kv_heads + g) * hd;
                    let dst = cache.offset(g, pos);
                    cache.keys[il][dst..dst + hd].copy_from_slice(&b.k[src..src + hd]);
                    cache.values[il][dst..dst + hd].copy_from_slice(&b.v[src..src + hd]);
                }
            }
        }
        self.attention(il, &b.q, &mut b.attn, t_len);
        matmul(pool, &w.wo, &b.attn, t_len, &mut b.h, precision);
        add_bias(&mut b.h, w.bo.as_deref());
        if let Some(pn) = &w.post_attn_norm {
            kernels::rms_norm(&mut b.h, pn, c.rms_eps);
        }
        x.iter_mut().zip(&b.h).for_each(|(xi, hi)| *xi += hi);

        // Feed-forward sub-block.
        b.h.copy_from_slice(x);
        kernels::rms_norm(&mut b.h, &w.ffn_norm, c.residual_eps());
        kernels::matmul_shared(
            pool,
            &[&w.w_gate, &w.w_up],
            &b.h,
            t_len,
            &mut [&mut b.gate, &mut b.up],
            precision,
        );
        add_bias(&mut b.gate, w.b_gate.as_deref());
        add_bias(&mut b.up, w.b_up.as_deref());
        let activation = match c.activation {
            crate::config::Activation::Silu => kernels::silu_mul,
            crate::config::Activation::GeluTanh => kernels::gelu_tanh_mul,
        };
        kernels::gated_parallel(pool, &mut b.gate, &b.up, activation);
        matmul(pool, &w.w_down, &b.gate, t_len, &mut b.h, precision);
        add_bias(&mut b.h, w.b_down.as_deref());
        if let Some(pn) = &w.post_ffn_norm {
            kernels::rms_norm(&mut b.h, pn, c.rms_eps);
        }
        debug_assert_eq!(x.len(), t_len * e);
        x.iter_mut().zip(&b.h).for_each(|(xi, hi)| *xi += hi);
    }

    /// Causal (optionally sliding-window) attention of the batch's queries over the cache.
    ///
    /// One work item covers one query position, one key/value head with all the query heads
    /// that share it (GQA: each key and value is read once for the whole group), and one chunk
    /// of the key range. Prefill has enough (position, head) items to keep every thread busy
    /// with a single chunk; decode splits long key ranges into chunks so a model with one
    /// key/value head still uses all threads. Each chunk's softmax is exact within the chunk;
    /// chunks are merged by rescaling to the common maximum (online softmax).
    fn attention(&self, il: usize, q: &[f32], out: &mut [f32], t_len: usize) {
        let c = &self.model.config;
        let (hd, group, n_kv) = (c.head_dim, c.group_size(), c.n_kv_heads);
        let window = c.layers[il].sliding_window;
        let keys = &self.cache.keys[il];
        let values = &self.cache.values[il];
        let cache = &self.cache;
        let n_past = self.n_past;
        let (scale, softcap) = (c.attn_scale, c.attn_logit_softcap);
        let key_range = |t: usize| {
            let pos = n_past + t;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            first..pos + 1
        };
        let longest = (0..t_len).map(|t| key_range(t).len()).max().unwrap_or(1);
        let base_items = t_len * n_kv;
        let threads = self.pool.n_threads();
        let n_chunks = if base_items >= 2 * threads {
            1
        } else {
            (2 * threads)
                .div_ceil(base_items)
                .min(longest.div_ceil(MIN_KEYS_PER_CHUNK))
                .max(1)
        };
        // Per item and group head: running max, sum of exponentials, and the weighted sum of
        // values (hd floats), merged below.
        let stride = hd + 2;
        let mut partial = vec![0.0f32; base_items * n_chunks * group * stride];
        let partial_out = SharedOut::new(&mut partial);
        self.pool.for_each(base_items * n_chunks, |item| {
            let (t, rest) = (item / (n_kv * n_chunks), item % (n_kv * n_chunks));
            let (g, chunk) = (rest / n_chunks, rest % n_chunks);
            let all = key_range(t);
            let part = crate::pool::split_range(all.len(), n_chunks, chunk);
            let keys_here = all.start + part.start..all.start + part.end;
            // SAFETY: item `item` alone writes its own stretch of the partial buffer.
            let dst =
                unsafe { partial_out.slice(item * group * stride..(item + 1) * group * stride) };
            SCORES.with(|scores| {
                let mut scores = scores.borrow_mut();
                let n = keys_here.len();
                scores.clear();
                scores.resize(group * n, 0.0);
                let q_base = (t * c.n_heads + g * group) * hd;
                // One head's positions are consecutive rows of the cache.
                let first = cache.offset(g, keys_here.start);
                let (ks, vs) = (&keys[first..first + n * hd], &values[first..first + n * hd]);
                for hh in 0..group {
                    let qh = &q[q_base + hh * hd..q_base + (hh + 1) * hd];
                    let row = &mut scores[hh * n..(hh + 1) * n];
                    kernels::dot_rows_f32(qh, ks, row);
                    for sc in row.iter_mut() {
                        *sc *= scale;
                        if let Some(cap) = softcap {
                            *sc = cap * (*sc / cap).tanh();
                        }
                    }
                }
                for hh in 0..group {
                    let row = &mut scores[hh * n..(hh + 1) * n];
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = kernels::softmax_exp(row, m);
                    let rec = &mut dst[hh * stride..(hh + 1) * stride];
                    rec[0] = m;
                    rec[1] = sum;
                    rec[2..].fill(0.0);
                }
                for hh in 0..group {
                    let p = &scores[hh * n..(hh + 1) * n];
                    kernels::axpy_rows_f32(p, vs, &mut dst[hh * stride + 2..(hh + 1) * stride]);
                }
            });
        });
        // Merge the chunks of each (position, head).
        let mut weights = vec![0.0f32; n_chunks];
        for t in 0..t_len {
            for g in 0..n_kv {
                for hh in 0..group {
                    let h = g * group + hh;
                    let o = &mut out[(t * c.n_heads + h) * hd..(t * c.n_heads + h + 1) * hd];
                    let rec = |chunk: usize| {
                        let item = (t * n_kv + g) * n_chunks + chunk;
                        let at = (item * group + hh) * stride;
                        &partial[at..at + stride]
                    };
                    let m = (0..n_chunks)
                        .map(|k| rec(k)[0])
                        .fold(f32::NEG_INFINITY, f32::max);
                    weights
                        .iter_mut()
                        .enumerate()
                        .for_each(|(k, w)| *w = rec(k)[0]);
                    kernels::softmax_exp(&mut weights, m);
                    let mut sum = 0.0f32;
                    o.fill(0.0);
                    for (k, &w) in weights.iter().enumerate() {
                        let r = rec(k);
                        if r[1] == 0.0 {
                            continue;
                        }
                        sum += r[1] * w;
                        kernels::axpy_f32(w, &r[2..], o);
                    }
                    let inv = 1.0 / sum;
                    o.iter_mut().for_each(|v| *v *= inv);
                }
            }
        }
    }
}

/// Fewest keys a decode attention chunk gets: below this, splitting costs more than it saves.
const MIN_KEYS_PER_CHUNK: usize = 64;

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for row in x.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
}

/// Scratch activations of a forward pass, reused from one pass to the next.
#[derive(Default)]
struct Buffers {
    t_len: usize,
    /// The residual stream.
    x: AlignedVec<f32>,
    h: AlignedVec<f32>,
    q: AlignedVec<f32>,
    k: AlignedVec<f32>,
    v: AlignedVec<f32>,
    attn: AlignedVec<f32>,
    gate: AlignedVec<f32>,
    up: AlignedVec<f32>,
    /// The batch's rotary (cos, sin) pairs, `t_len` rows of `rope_dim / 2`, per distinct
    /// (base, frequency scale) of the layers: made by the first layer that uses them, since
    /// sin and cos in f64 cost more than the rotations (Gemma 3's layers share two tables).
    rope: Vec<BatchAngles>,
}

/// The rotary angles of a batch's positions for one (base, frequency scale), by their bits.
struct BatchAngles {
    key: (u32, u32),
    /// `t_len` rows of `rope_dim / 2` (cos, sin) pairs.
    angles: Vec<(f32, f32)>,
}

impl Buffers {
    /// Sizes every buffer for a batch of `t_len` tokens (keeping the allocations).
    fn prepare(&mut self, c: &ModelConfig, t_len: usize) {
        self.t_len = t_len;
        self.rope.clear();
        for (buf, width) in [
            (&mut self.x, c.n_embd),
            (&mut self.h, c.n_embd),
            (&mut self.q, c.q_dim()),
            (&mut self.k, c.kv_dim()),
            (&mut self.v, c.kv_dim()),
            (&mut self.attn, c.q_dim()),
            (&mut self.gate, c.n_ff),
            (&mut self.up, c.n_ff),
        ] {
            buf.resize(t_len * width, 0.0);
        }
    }
}

/// Inverse frequencies of one layer's rotary embedding.
///
/// Angles are formed in f32 (`f32(pos) * inv_freq`), as the reference implementations do, so
/// long positions round the same way; only sin/cos are evaluated in f64.
pub(crate) struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    pub(crate) fn new(c: &ModelConfig, base: f32, freq_scale: f32) -> RopeTable {
        let half = c.rope_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / c.rope_dim as f32;
                let mut f = freq_scale / base.powf(exponent);
                if let Some(factors) = &c.rope_freq_factors {
                    f /= factors[i];
                }
                f
            })
            .collect();
        RopeTable { inv_freq }
    }

    /// The (cos, sin) pairs of position `pos`, one per rotated pair of dimensions.
    pub(crate) fn angles(&self, pos: usize, out: &mut Vec<(f32, f32)>) {
        out.clear();
        out.extend(self.inv_freq.iter().map(|&f| {
            let theta = f64::from(pos as f32 * f);
            (theta.cos() as f32, theta.sin() as f32)
        }));
    }

    /// Rotates one head by the angles of its position.
    pub(crate) fn rotate(head: &mut [f32], angles: &[(f32, f32)], style: RopeStyle) {
        let half = angles.len();
        for (i, &(cos, sin)) in angles.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}
