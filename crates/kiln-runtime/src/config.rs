//! Hyperparameters of a decoder-only transformer, in the terms the forward pass needs.
//!
//! Each architecture file turns its GGUF metadata into this one description; the forward
//! pass, and later the exporters and planners, read only this. It serializes (serde) as the
//! `config` object of a kiln package manifest.

/// How rotary position embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF llama files, whose q/k weights the converter permuted.
    Interleaved,
    /// Split halves `(i, i + d/2)`: the Hugging Face layout, kept by gemma3 and qwen2 files.
    Neox,
}

/// The gate activation of the feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU with the tanh approximation).
    GeluTanh,
}

/// Per-layer attention settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerConfig {
    /// Keys further back than this many positions are masked (local attention); `None` = global.
    pub sliding_window: Option<usize>,
    /// Rotary base frequency of this layer.
    pub rope_base: f32,
    /// Linear position scaling (1 / scaling factor); 1.0 = none.
    pub rope_freq_scale: f32,
}

/// A decoder-only transformer's shape and conventions.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The GGUF `general.architecture` name (`llama`, `gemma3`, …).
    pub architecture: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Hidden width of the feed-forward block.
    pub n_ff: usize,
    /// Vocabulary size (rows of the embedding and output matrices).
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Dimensions of each head that rotary embedding rotates (the rest pass through).
    pub rope_dim: usize,
    /// Pairing of rotated dimensions.
    pub rope_style: RopeStyle,
    /// Per-frequency divisors (Llama 3 style rope scaling, from the `rope_freqs` tensor).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// One entry per layer.
    pub layers: Vec<LayerConfig>,
    /// Multiplier applied to token embeddings (Gemma: sqrt(n_embd)).
    pub embedding_scale: Option<f32>,
    /// Feed-forward gate activation.
    pub activation: Activation,
    /// RMSNorm over each query and key head before rotary embedding (Gemma 3, Qwen 3).
    pub qk_norm: bool,
    /// RMSNorm on the attention and feed-forward outputs before the residual add (Gemma).
    pub post_norms: bool,
    /// Factor applied to attention scores (usually 1/sqrt(head_dim)).
    pub attn_scale: f32,
    /// `cap * tanh(logit / cap)` on the output logits.
    pub final_logit_softcap: Option<f32>,
    /// `cap * tanh(score / cap)` on attention scores.
    pub attn_logit_softcap: Option<f32>,
    /// Whether q/k/v projections carry biases (Qwen 2).
    pub qkv_bias: bool,
    /// Epsilon of the RMSNorms that read the residual stream (before attention, before the
    /// feed-forward block, and the final norm) when it differs from `rms_eps`: a model whose
    /// residual stream is carried divided by `s` (see [`crate::fp16_fix`]) uses
    /// `rms_eps / s²` there, which leaves those norms' outputs unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_rms_eps: Option<f32>,
}

impl ModelConfig {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Epsilon of the RMSNorms that read the residual stream (see `residual_rms_eps`).
    pub fn residual_eps(&self) -> f32 {
        self.residual_rms_eps.unwrap_or(self.rms_eps)
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
