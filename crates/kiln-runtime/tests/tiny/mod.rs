//! Tiny random models written as GGUF files, and a naive f64 forward pass to check the
//! runtime against.
//!
//! The reference below is written straight from the model equations and shares no code with
//! the runtime: it takes its hyperparameters from the [`Spec`] the file was generated from
//! (not from the runtime's parsed configuration) and its weights from the file, dequantized
//! with `GgufFile::tensor_f32`, so quantized files are checked against exactly the numbers
//! their blocks encode.
//!
//! Conventions (those of llama.cpp's GGUF files, which the runtime follows):
//!
//! - Matrices are stored in ggml order `[cols, rows]`: row `r` (one output channel) is the
//!   `cols` contiguous values starting at `r * cols`, and `y[r] = sum_c W[r][c] * x[c]`.
//! - RMSNorm is `x / sqrt(mean(x²) + eps) * w`. Gemma's `1 + w` is already folded into the
//!   stored weights, so Gemma uses the same formula.
//! - Rotary embedding rotates the first `rope_dim` dimensions of every query and key head by
//!   `pos * inv_freq_i`, `inv_freq_i = freq_scale / base^(2i / rope_dim) / factor_i`, where
//!   `freq_scale` is 1 / the linear scaling factor and `factor_i` comes from `rope_freqs.weight`
//!   (1 without it). `llama` pairs dimensions `(2i, 2i+1)` (its converter permuted q/k);
//!   `qwen2`, `qwen3` and `gemma3` pair `(i, i + rope_dim/2)`.
//! - Attention is causal with grouped-query sharing: query head `h` reads key/value head
//!   `h / (n_heads / n_kv_heads)`; scores are scaled by `1/sqrt(head_dim)`.
//! - Gemma 3: layer `il` is global iff `(il + 1) % 6 == 0`; global layers use rotary base
//!   `gemma3.rope.freq_base`, local ones base 10000 and see only keys `j` with `p - j < window`
//!   from query position `p`. Embeddings are multiplied by `sqrt(n_embd)`; q and k heads are
//!   RMS-normalised before rotary embedding; both sub-block outputs are RMS-normalised before
//!   their residual add; the feed-forward gate is GELU with the tanh approximation.
//!   A linear rope scaling factor applies to the global layers only.
//! - Llama family: SwiGLU feed-forward (`silu(gate) * up`), optional q/k/v biases (Qwen 2),
//!   optional per-head q/k RMSNorm (Qwen 3), optional untied `output.weight`.
//! - Any bias tensor present in the file (`attn_output.bias`, `ffn_{gate,up,down}.bias`
//!   included, as llama.cpp's `llama` loader accepts them) is added after its projection.

use kiln_format::ggml::GgmlType;
use kiln_format::gguf::{GgufFile, GgufWriter, MetadataValue};
use std::path::{Path, PathBuf};

/// A seeded generator (SplitMix64), so every model and token sequence is reproducible without
/// a dependency.
pub struct Rng(u64);

impl Rng {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (f64::from(lo) + u * f64::from(hi - lo)) as f32
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values uniform in `[-a, a)`.
    fn symmetric(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.range(-a, a)).collect()
    }
}

/// `n` token ids below `vocab`, drawn from `seed`.
pub fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// Everything that decides a tiny model's shape and the features it uses. The reference reads
/// its hyperparameters from here, independently of the runtime's metadata parsing.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `general.architecture`: `llama`, `qwen2`, `qwen3` or `gemma3`.
    pub arch: &'static str,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head width; written as `attention.key_length` only when it differs from
    /// `n_embd / n_heads`, so both the explicit and the derived path are used.
    pub head_dim: usize,
    /// Feed-forward hidden width.
    pub n_ff: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `context_length`.
    pub n_ctx: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// `rope.freq_base` (the global layers' base for Gemma 3).
    pub rope_base: f32,
    /// Rotated dimensions per head (`rope.dimension_count`).
    pub rope_dim: usize,
    /// Gemma 3 local attention window.
    pub sliding_window: usize,
    /// q/k/v biases (Qwen 2).
    pub qkv_bias: bool,
    /// Per-head q/k RMSNorm in the Llama family (Qwen 3); always on for Gemma 3.
    pub qk_norm: bool,
    /// A separate `output.weight` instead of the tied embedding matrix.
    pub untied_output: bool,
    /// A Llama 3 style `rope_freqs.weight` tensor of per-frequency divisors.
    pub rope_freqs: bool,
    /// Linear rope scaling factor (`rope.scaling.type = "linear"`).
    pub linear_rope_factor: Option<f32>,
    /// Block format of every matrix (embeddings and output included); vectors stay F32.
    pub matrix_type: GgmlType,
    /// Give the vocabulary size as a `tokenizer.ggml.tokens` list rather than `vocab_size`.
    pub vocab_from_token_list: bool,
}

impl Spec {
    /// A plain Llama model; variants change a few fields of it.
    pub fn llama() -> Spec {
        Spec {
            arch: "llama",
            n_layers: 2,
            n_embd: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            n_ff: 96,
            vocab: 96,
            n_ctx: 64,
            eps: 1e-5,
            rope_base: 10_000.0,
            rope_dim: 16,
            sliding_window: 0,
            qkv_bias: false,
            qk_norm: false,
            untied_output: false,
            rope_freqs: false,
            linear_rope_factor: None,
            matrix_type: GgmlType::F32,
            vocab_from_token_list: false,
        }
    }

    /// A small Gemma 3 model: four heads sharing one key-value head, local layers of window 4.
    #[allow(dead_code)]
    pub fn gemma3() -> Spec {
        Spec {
            arch: "gemma3",
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 32,
            rope_dim: 32,
            sliding_window: 4,
            eps: 1e-6,
            rope_base: 1_000_000.0,
            ..Spec::llama()
        }
    }

    fn is_gemma3(&self) -> bool {
        self.arch == "gemma3"
    }

    fn neox(&self) -> bool {
        self.arch != "llama"
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// One tensor before it is written, so tests can break a shape or drop a tensor first.
pub struct TensorSpec {
    /// GGUF tensor name.
    pub name: String,
    /// ggml order: `[cols, rows]` for matrices.
    pub dims: Vec<u64>,
    /// Stored block format.
    pub ty: GgmlType,
    /// Values in ggml element order (quantized when written).
    pub values: Vec<f32>,
}

/// The contents of a tiny GGUF file, editable before writing.
pub struct TinyFile {
    /// Metadata entries in write order.
    pub metadata: Vec<(String, MetadataValue)>,
    /// Tensors in write order.
    pub tensors: Vec<TensorSpec>,
}

impl TinyFile {
    /// Random weights and the metadata that describes them.
    pub fn generate(spec: &Spec, seed: u64) -> TinyFile {
        let mut rng = Rng::new(seed);
        let a = spec.arch;
        let mut metadata: Vec<(String, MetadataValue)> = Vec::new();
        let mut meta = |k: &str, v: MetadataValue| {
            let key = if k.starts_with("general.") || k.starts_with("tokenizer.") {
                k.to_string()
            } else {
                format!("{a}.{k}")
            };
            metadata.push((key, v));
        };
        let u = |n: usize| MetadataValue::U32(n as u32);
        meta("general.architecture", MetadataValue::from(a));
        meta("block_count", u(spec.n_layers));
        meta("embedding_length", u(spec.n_embd));
        meta("attention.head_count", u(spec.n_heads));
        meta("attention.head_count_kv", u(spec.n_kv_heads));
        meta("feed_forward_length", u(spec.n_ff));
        meta("context_length", u(spec.n_ctx));
        meta(
            "attention.layer_norm_rms_epsilon",
            MetadataValue::F32(spec.eps),
        );
        meta("rope.freq_base", MetadataValue::F32(spec.rope_base));
        meta("rope.dimension_count", u(spec.rope_dim));
        if spec.head_dim != spec.n_embd / spec.n_heads {
            meta("attention.key_length", u(spec.head_dim));
            meta("attention.value_length", u(spec.head_dim));
        }
        if spec.is_gemma3() {
            meta("attention.sliding_window", u(spec.sliding_window));
        }
        if let Some(f) = spec.linear_rope_factor {
            meta("rope.scaling.type", MetadataValue::from("linear"));
            meta("rope.scaling.factor", MetadataValue::F32(f));
        }
        if spec.vocab_from_token_list {
            let tokens: Vec<String> = (0..spec.vocab).map(|i| format!("<t{i}>")).collect();
            meta("tokenizer.ggml.tokens", MetadataValue::from(tokens));
        } else {
            meta("vocab_size", u(spec.vocab));
        }

        let mut tensors = Vec::new();
        let mt = spec.matrix_type;
        // Uniform in ±sqrt(3 / cols): unit-variance inputs give unit-variance outputs.
        let mut matrix = |rng: &mut Rng, name: String, cols: usize, rows: usize| {
            tensors.push(TensorSpec {
                name,
                dims: vec![cols as u64, rows as u64],
                ty: mt,
                values: rng.symmetric(cols * rows, (3.0 / cols as f32).sqrt()),
            });
        };
        let mut vectors: Vec<TensorSpec> = Vec::new();
        let mut vector = |rng: &mut Rng, name: String, len: usize, lo: f32, hi: f32| {
            vectors.push(TensorSpec {
                name,
                dims: vec![len as u64],
                ty: GgmlType::F32,
                values: (0..len).map(|_| rng.range(lo, hi)).collect(),
            });
        };
        matrix(
            &mut rng,
            "token_embd.weight".into(),
            spec.n_embd,
            spec.vocab,
        );
        vector(&mut rng, "output_norm.weight".into(), spec.n_embd, 0.7, 1.3);
        if spec.untied_output {
            matrix(&mut rng, "output.weight".into(), spec.n_embd, spec.vocab);
        }
        if spec.rope_freqs {
            // Llama 3 style divisors between 1 and 6.
            vector(
                &mut rng,
                "rope_freqs.weight".into(),
                spec.rope_dim / 2,
                1.0,
                6.0,
            );
        }
        for il in 0..spec.n_layers {
            let n = |s: &str| format!("blk.{il}.{s}");
            vector(&mut rng, n("attn_norm.weight"), spec.n_embd, 0.7, 1.3);
            matrix(&mut rng, n("attn_q.weight"), spec.n_embd, spec.q_dim());
            matrix(&mut rng, n("attn_k.weight"), spec.n_embd, spec.kv_dim());
            matrix(&mut rng, n("attn_v.weight"), spec.n_embd, spec.kv_dim());
            matrix(&mut rng, n("attn_output.weight"), spec.q_dim(), spec.n_embd);
            if spec.qkv_bias {
                vector(&mut rng, n("attn_q.bias"), spec.q_dim(), -0.5, 0.5);
                vector(&mut rng, n("attn_k.bias"), spec.kv_dim(), -0.5, 0.5);
                vector(&mut rng, n("attn_v.bias"), spec.kv_dim(), -0.5, 0.5);
            }
            if spec.qk_norm || spec.is_gemma3() {
                vector(&mut rng, n("attn_q_norm.weight"), spec.head_dim, 0.5, 1.5);
                vector(&mut rng, n("attn_k_norm.weight"), spec.head_dim, 0.5, 1.5);
            }
            if spec.is_gemma3() {
                vector(
                    &mut rng,
                    n("post_attention_norm.weight"),
                    spec.n_embd,
                    0.7,
                    1.3,
                );
            }
            vector(&mut rng, n("ffn_norm.weight"), spec.n_embd, 0.7, 1.3);
            matrix(&mut rng, n("ffn_gate.weight"), spec.n_embd, spec.n_ff);
            matrix(&mut rng, n("ffn_up.weight"), spec.n_embd, spec.n_ff);
            matrix(&mut rng, n("ffn_down.weight"), spec.n_ff, spec.n_embd);
            if spec.is_gemma3() {
                vector(&mut rng, n("post_ffw_norm.weight"), spec.n_embd, 0.7, 1.3);
            }
        }
        tensors.extend(vectors);
        // Unit-variance embedding entries, except for Gemma, whose embeddings are multiplied
        // by sqrt(n_embd) in the forward pass and so are stored that much smaller.
        if !spec.is_gemma3() {
            let scale = (spec.n_embd as f32).sqrt();
            let embd = tensors.iter_mut().find(|t| t.name == "token_embd.weight");
            for v in &mut embd.expect("token_embd.weight").values {
                *v *= scale;
            }
        }
        TinyFile { metadata, tensors }
    }

    /// The tensor called `name`, for tests that damage it.
    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorSpec {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// Sets (or replaces) a metadata entry.
    pub fn set_metadata(&mut self, key: &str, value: MetadataValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Writes the file to the test target's scratch directory as `{name}.gguf`.
    pub fn write(&self, name: &str) -> PathBuf {
        let mut w = GgufWriter::new();
        for (k, v) in &self.metadata {
            w.add_metadata(k.clone(), v.clone());
        }
        for t in &self.tensors {
            w.add_tensor_f32(t.name.clone(), &t.dims, t.ty, &t.values)
                .unwrap_or_else(|e| panic!("adding {}: {e}", t.name));
        }
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tiny-{name}.gguf"));
        w.write(&path).expect("write tiny model");
        path
    }
}

/// A deliberate mistake the reference can make, to show that the comparison with the runtime
/// notices when a feature is computed the wrong way (a check that passes with the feature
/// ignored would prove nothing about it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mistake {
    /// Pair rotary dimensions the other way (interleaved ↔ split halves).
    SwapRopePairing,
    /// Ignore `rope_freqs.weight`.
    IgnoreRopeFactors,
    /// Ignore linear rope scaling.
    IgnoreLinearScaling,
    /// Apply Gemma 3's linear rope scaling to the local layers as well.
    ScaleLocalLayersToo,
    /// Leave out the q/k/v biases.
    IgnoreBiases,
    /// Skip the per-head q/k RMSNorm.
    IgnoreQkNorm,
    /// Use the embedding matrix as the LM head even though `output.weight` exists.
    TieOutput,
    /// Map query head `h` to key/value head `h % n_kv_heads` instead of `h / group`.
    InterleaveKvHeads,
    /// Let local layers see one key more than the window allows.
    WindowOneTooWide,
    /// Treat every Gemma 3 layer as local.
    NoGlobalLayers,
    /// Give the global layers the local rotary base.
    GlobalLayersUseLocalBase,
}

/// Weights of one block, dequantized to f64, row-major `[rows][cols]` matrices.
struct RefLayer {
    attn_norm: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    wo: Vec<f64>,
    bq: Option<Vec<f64>>,
    bk: Option<Vec<f64>>,
    bv: Option<Vec<f64>>,
    bo: Option<Vec<f64>>,
    q_norm: Option<Vec<f64>>,
    k_norm: Option<Vec<f64>>,
    post_attn_norm: Option<Vec<f64>>,
    ffn_norm: Vec<f64>,
    w_gate: Vec<f64>,
    w_up: Vec<f64>,
    w_down: Vec<f64>,
    b_gate: Option<Vec<f64>>,
    b_up: Option<Vec<f64>>,
    b_down: Option<Vec<f64>>,
    post_ffn_norm: Option<Vec<f64>>,
}

/// Per weight matrix (GGUF name): rows of input seen, the per-channel sums of their squares and
/// the sums of their outer products (row-major, channels × channels).
pub type InputSquares = std::collections::BTreeMap<String, (u64, Vec<f64>, Vec<f64>)>;

/// The naive model: the [`Spec`] plus every weight of the file in f64.
pub struct Reference {
    spec: Spec,
    token_embd: Vec<f64>,
    output_norm: Vec<f64>,
    output: Option<Vec<f64>>,
    rope_factors: Option<Vec<f64>>,
    layers: Vec<RefLayer>,
    /// With [`Reference::input_squares`]: per weight matrix, rows of input seen and the sums
    /// of their squares per input channel.
    inputs: std::cell::RefCell<Option<InputSquares>>,
}

/// Local rotary base of Gemma 3 (`rope_local_base_freq`).
const GEMMA3_LOCAL_BASE: f64 = 10_000.0;
/// Gemma 3 makes every sixth layer global (`sliding_window_pattern`).
const GEMMA3_PATTERN: usize = 6;

impl Reference {
    /// Reads every weight of the file at `path` as f64.
    pub fn load(spec: &Spec, path: &Path) -> Reference {
        let file = GgufFile::open(path).expect("open tiny model");
        let get = |name: &str| -> Option<Vec<f64>> {
            let t = file.tensor(name)?;
            let v = file.tensor_f32(t).expect("dequantize");
            Some(v.into_iter().map(f64::from).collect())
        };
        let req = |name: &str| get(name).unwrap_or_else(|| panic!("missing {name}"));
        let layers = (0..spec.n_layers)
            .map(|il| {
                let n = |s: &str| format!("blk.{il}.{s}");
                RefLayer {
                    attn_norm: req(&n("attn_norm.weight")),
                    wq: req(&n("attn_q.weight")),
                    wk: req(&n("attn_k.weight")),
                    wv: req(&n("attn_v.weight")),
                    wo: req(&n("attn_output.weight")),
                    bq: get(&n("attn_q.bias")),
                    bk: get(&n("attn_k.bias")),
                    bv: get(&n("attn_v.bias")),
                    bo: get(&n("attn_output.bias")),
                    q_norm: get(&n("attn_q_norm.weight")),
                    k_norm: get(&n("attn_k_norm.weight")),
                    post_attn_norm: get(&n("post_attention_norm.weight")),
                    ffn_norm: req(&n("ffn_norm.weight")),
                    w_gate: req(&n("ffn_gate.weight")),
                    w_up: req(&n("ffn_up.weight")),
                    w_down: req(&n("ffn_down.weight")),
                    b_gate: get(&n("ffn_gate.bias")),
                    b_up: get(&n("ffn_up.bias")),
                    b_down: get(&n("ffn_down.bias")),
                    post_ffn_norm: get(&n("post_ffw_norm.weight")),
                }
            })
            .collect();
        Reference {
            spec: spec.clone(),
            token_embd: req("token_embd.weight"),
            output_norm: req("output_norm.weight"),
            output: get("output.weight"),
            rope_factors: get("rope_freqs.weight"),
            layers,
            inputs: std::cell::RefCell::new(None),
        }
    }

    /// Per weight matrix (GGUF name; `output.weight` also when tied), the number of input rows,
    /// the per-channel sums of their squares and of their outer products over [`Reference::logits`] of each sequence.
    // Each test binary compiles this module; not all of them record inputs.
    #[allow(dead_code)]
    pub fn input_squares(&self, sequences: &[Vec<u32>]) -> InputSquares {
        *self.inputs.borrow_mut() = Some(Default::default());
        for s in sequences {
            self.logits(s);
        }
        self.inputs.borrow_mut().take().expect("recording")
    }

    fn record(&self, name: &str, x: &[f64]) {
        if let Some(map) = self.inputs.borrow_mut().as_mut() {
            let n = x.len();
            let e = map
                .entry(name.to_string())
                .or_insert_with(|| (0, vec![0.0; n], vec![0.0; n * n]));
            e.0 += 1;
            e.1.iter_mut().zip(x).for_each(|(s, v)| *s += v * v);
            for (i, &a) in x.iter().enumerate() {
                for (j, &b) in x.iter().enumerate() {
                    e.2[i * n + j] += a * b;
                }
            }
        }
    }

    /// Logits (`vocab` values) after every position of `tokens`, computed from scratch.
    pub fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        self.logits_with(tokens, None)
    }

    /// Like [`Reference::logits`], but making `mistake` on purpose.
    pub fn logits_with(&self, tokens: &[u32], mistake: Option<Mistake>) -> Vec<Vec<f64>> {
        let s = &self.spec;
        let wrong = |m: Mistake| mistake == Some(m);
        let gemma = s.is_gemma3();
        let (e, hd) = (s.n_embd, s.head_dim);
        let embd_scale = if gemma { (e as f64).sqrt() } else { 1.0 };
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                let t = t as usize;
                self.token_embd[t * e..(t + 1) * e]
                    .iter()
                    .map(|v| v * embd_scale)
                    .collect()
            })
            .collect();
        let neox = s.neox() != wrong(Mistake::SwapRopePairing);
        let group = s.n_heads / s.n_kv_heads;
        for (il, l) in self.layers.iter().enumerate() {
            let global = gemma && (il + 1) % GEMMA3_PATTERN == 0 && !wrong(Mistake::NoGlobalLayers);
            let window = match (gemma, global) {
                (true, false) => {
                    Some(s.sliding_window + usize::from(wrong(Mistake::WindowOneTooWide)))
                }
                _ => None,
            };
            let local_base = !global || wrong(Mistake::GlobalLayersUseLocalBase);
            let base = if gemma && local_base {
                GEMMA3_LOCAL_BASE
            } else {
                f64::from(s.rope_base)
            };
            // Gemma 3 scales only its global layers; the local ones keep default rotary.
            let freq_scale = match s.linear_rope_factor {
                Some(f)
                    if !wrong(Mistake::IgnoreLinearScaling)
                        && (!gemma || global || wrong(Mistake::ScaleLocalLayersToo)) =>
                {
                    1.0 / f64::from(f)
                }
                _ => 1.0,
            };
            let factors = self
                .rope_factors
                .as_ref()
                .filter(|_| !wrong(Mistake::IgnoreRopeFactors));
            let inv_freq: Vec<f64> = (0..s.rope_dim / 2)
                .map(|i| {
                    let f = freq_scale / base.powf((2 * i) as f64 / s.rope_dim as f64);
                    f / factors.map_or(1.0, |fs| fs[i])
                })
                .collect();
            let bias = |b: &Option<Vec<f64>>| b.clone().filter(|_| !wrong(Mistake::IgnoreBiases));
            let (bq, bk, bv) = (bias(&l.bq), bias(&l.bk), bias(&l.bv));

            let mut q = Vec::new();
            let mut k = Vec::new();
            let mut v = Vec::new();
            for (pos, xt) in x.iter().enumerate() {
                let h = rms_norm(xt, &l.attn_norm, s.eps);
                for m in ["attn_q", "attn_k", "attn_v"] {
                    self.record(&format!("blk.{il}.{m}.weight"), &h);
                }
                let mut qt = add(matvec(&l.wq, &h), bq.as_deref());
                let mut kt = add(matvec(&l.wk, &h), bk.as_deref());
                let vt = add(matvec(&l.wv, &h), bv.as_deref());
                for (heads, norm) in [(&mut qt, &l.q_norm), (&mut kt, &l.k_norm)] {
                    for head in heads.chunks_exact_mut(hd) {
                        if let Some(w) = norm.as_ref().filter(|_| !wrong(Mistake::IgnoreQkNorm)) {
                            let n = rms_norm(head, w, s.eps);
                            head.copy_from_slice(&n);
                        }
                        rope(head, pos, &inv_freq, neox);
                    }
                }
                q.push(qt);
                k.push(kt);
                v.push(vt);
            }
            let scale = 1.0 / (hd as f64).sqrt();
            for (p, xt) in x.iter_mut().enumerate() {
                let mut attn = vec![0.0; s.q_dim()];
                for h in 0..s.n_heads {
                    let g = if wrong(Mistake::InterleaveKvHeads) {
                        h % s.n_kv_heads
                    } else {
                        h / group
                    };
                    let qh = &q[p][h * hd..(h + 1) * hd];
                    let visible: Vec<usize> = (0..=p)
                        .filter(|&j| window.is_none_or(|w| p - j < w))
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| dot(qh, &k[j][g * hd..(g + 1) * hd]) * scale)
                        .collect();
                    let probs = softmax(&scores);
                    let out = &mut attn[h * hd..(h + 1) * hd];
                    for (&j, pj) in visible.iter().zip(&probs) {
                        for (o, vj) in out.iter_mut().zip(&v[j][g * hd..(g + 1) * hd]) {
                            *o += pj * vj;
                        }
                    }
                }
                self.record(&format!("blk.{il}.attn_output.weight"), &attn);
                let mut a = add(matvec(&l.wo, &attn), l.bo.as_deref());
                if let Some(w) = &l.post_attn_norm {
                    a = rms_norm(&a, w, s.eps);
                }
                xt.iter_mut().zip(&a).for_each(|(xi, ai)| *xi += ai);

                let h = rms_norm(xt, &l.ffn_norm, s.eps);
                self.record(&format!("blk.{il}.ffn_gate.weight"), &h);
                self.record(&format!("blk.{il}.ffn_up.weight"), &h);
                let gate = add(matvec(&l.w_gate, &h), l.b_gate.as_deref());
                let up = add(matvec(&l.w_up, &h), l.b_up.as_deref());
                let act: Vec<f64> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| if gemma { gelu_tanh(g) * u } else { silu(g) * u })
                    .collect();
                self.record(&format!("blk.{il}.ffn_down.weight"), &act);
                let mut f = add(matvec(&l.w_down, &act), l.b_down.as_deref());
                if let Some(w) = &l.post_ffn_norm {
                    f = rms_norm(&f, w, s.eps);
                }
                xt.iter_mut().zip(&f).for_each(|(xi, fi)| *xi += fi);
            }
        }
        let head = match &self.output {
            Some(w) if !wrong(Mistake::TieOutput) => w,
            _ => &self.token_embd,
        };
        x.iter()
            .map(|xt| {
                let h = rms_norm(xt, &self.output_norm, s.eps);
                self.record("output.weight", &h);
                matvec(head, &h)
            })
            .collect()
    }
}

/// `W x` for a row-major matrix with `x.len()` columns.
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn add(mut x: Vec<f64>, b: Option<&[f64]>) -> Vec<f64> {
    if let Some(b) = b {
        x.iter_mut().zip(b).for_each(|(xi, bi)| *xi += bi);
    }
    x
}

fn rms_norm(x: &[f64], w: &[f64], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + f64::from(eps)).sqrt();
    x.iter().zip(w).map(|(v, wi)| v * r * wi).collect()
}

/// Rotates the first `2 * inv_freq.len()` dimensions of one head by `pos * inv_freq_i`.
fn rope(head: &mut [f64], pos: usize, inv_freq: &[f64], neox: bool) {
    let half = inv_freq.len();
    for (i, f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f64 * f).sin_cos();
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos - x1 * sin;
        head[b] = x0 * sin + x1 * cos;
    }
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh())
}

/// A session on the exact path (f32 activations, weights dequantized exactly): what the
/// naive reference computes, so bounds can be tight.
pub fn exact_session<'m>(
    model: &'m kiln_runtime::Model,
    pool: &'m kiln_runtime::ThreadPool,
    n_ctx: usize,
) -> kiln_runtime::Session<'m> {
    let mut s = kiln_runtime::Session::new(model, pool, n_ctx);
    s.set_precision(kiln_runtime::Precision::Exact);
    s
}
