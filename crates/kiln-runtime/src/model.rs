//! A loaded model: its description and its weights, read in place from their storage.

use crate::arch;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::weights::{
    load_optional_vector, load_vector, prepare_for_kernels, GgufSource, HugePageMerge,
    HugePageOutcome, TensorSource, WeightMatrix,
};
use kiln_format::gguf::GgufFile;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Weights of one transformer block.
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Query projection, `n_embd` → `n_heads * head_dim`.
    pub wq: WeightMatrix,
    /// Key projection, `n_embd` → `n_kv_heads * head_dim`.
    pub wk: WeightMatrix,
    /// Value projection, `n_embd` → `n_kv_heads * head_dim`.
    pub wv: WeightMatrix,
    /// Attention output projection, `n_heads * head_dim` → `n_embd`.
    pub wo: WeightMatrix,
    /// Query/key/value biases (Qwen 2).
    pub bq: Option<Vec<f32>>,
    /// Key bias.
    pub bk: Option<Vec<f32>>,
    /// Value bias.
    pub bv: Option<Vec<f32>>,
    /// Attention output bias (Llama-family files converted with `attention_bias`).
    pub bo: Option<Vec<f32>>,
    /// RMSNorm over each query head.
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm over each key head.
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm on the attention output (Gemma).
    pub post_attn_norm: Option<Vec<f32>>,
    /// RMSNorm before the feed-forward block.
    pub ffn_norm: Vec<f32>,
    /// Gate projection, `n_embd` → `n_ff`.
    pub w_gate: WeightMatrix,
    /// Up projection, `n_embd` → `n_ff`.
    pub w_up: WeightMatrix,
    /// Down projection, `n_ff` → `n_embd`.
    pub w_down: WeightMatrix,
    /// Feed-forward biases (Llama-family files converted with `mlp_bias`).
    pub b_gate: Option<Vec<f32>>,
    /// Up projection bias.
    pub b_up: Option<Vec<f32>>,
    /// Down projection bias.
    pub b_down: Option<Vec<f32>>,
    /// RMSNorm on the feed-forward output (Gemma).
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// A model ready to run: configuration plus weights.
pub struct Model {
    /// The model's description.
    pub config: ModelConfig,
    /// The file or folder the weights come from.
    pub origin: PathBuf,
    /// Parameters: elements of every tensor the model holds.
    pub n_params: u64,
    /// Token embedding matrix (`vocab_size` rows of `n_embd`).
    pub token_embd: WeightMatrix,
    /// Final RMSNorm.
    pub output_norm: Vec<f32>,
    /// Output projection to the vocabulary (the embedding matrix when tied).
    pub output: WeightMatrix,
    /// Whether `output` is the token embedding matrix.
    pub tied_embeddings: bool,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights>,
    /// The merge of the weights into huge pages after loading, where one runs.
    huge_pages: Option<Arc<HugePageMerge>>,
}

/// Refuses a file that holds tensors the loader did not read: a tensor nobody reads is a
/// feature of the model this runtime would silently leave out, giving wrong answers.
fn refuse_unread_tensors(
    source: &dyn TensorSource,
    config: &ModelConfig,
    layers: &[LayerWeights],
    tied: bool,
) -> Result<(), ModelError> {
    let mut read: HashSet<String> = ["token_embd.weight", "output_norm.weight"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !tied {
        read.insert("output.weight".into());
    }
    if config.rope_freq_factors.is_some() {
        read.insert("rope_freqs.weight".into());
    }
    for (i, l) in layers.iter().enumerate() {
        let optional = [
            ("attn_q.bias", l.bq.is_some()),
            ("attn_k.bias", l.bk.is_some()),
            ("attn_v.bias", l.bv.is_some()),
            ("attn_output.bias", l.bo.is_some()),
            ("attn_q_norm.weight", l.q_norm.is_some()),
            ("attn_k_norm.weight", l.k_norm.is_some()),
            ("post_attention_norm.weight", l.post_attn_norm.is_some()),
            ("ffn_gate.bias", l.b_gate.is_some()),
            ("ffn_up.bias", l.b_up.is_some()),
            ("ffn_down.bias", l.b_down.is_some()),
            ("post_ffw_norm.weight", l.post_ffn_norm.is_some()),
        ];
        let required = [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
        let present = optional.iter().filter(|(_, p)| *p).map(|(n, _)| *n);
        for name in required.iter().copied().chain(present) {
            read.insert(format!("blk.{i}.{name}"));
        }
    }
    match source.names().into_iter().find(|name| !read.contains(name)) {
        Some(name) => Err(ModelError::unsupported(
            source.origin(),
            format!(
                "tensor {} is not used by kiln's {} implementation; refusing rather than ignoring it",
                source.describe(&name),
                config.architecture
            ),
        )),
        None => Ok(()),
    }
}

impl Model {
    /// Loads the model of a GGUF file, a kiln package (shards checked as
    /// [`crate::package::set_verify_on_open`] says), or a Hugging Face folder (`config.json`
    /// and safetensors weights, see [`crate::hf`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let path = path.as_ref();
        if crate::package::is_package(path) {
            let verify = crate::package::verify_on_open();
            return crate::package::load_model(path, verify).map(|(model, _)| model);
        }
        if path.is_dir() {
            return crate::hf::load_model(path);
        }
        crate::hf::refuse_weights_file(path)?;
        let file = Arc::new(GgufFile::open(path)?);
        Model::from_gguf(file)
    }

    /// Loads the model held by an open GGUF file.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Model, ModelError> {
        let config = arch::config_from_gguf(&file)?;
        Model::from_source(config, &GgufSource(file))
    }

    /// Builds a model of the given description from the tensors of `source`, which must hold
    /// exactly the tensors the description implies (a tensor left unread is refused).
    pub fn from_source(
        config: ModelConfig,
        source: &dyn TensorSource,
    ) -> Result<Model, ModelError> {
        let c = &config;
        let mut token_embd =
            WeightMatrix::load(source, "token_embd.weight", c.n_embd, c.vocab_size)?;
        let output_norm = load_vector(source, "output_norm.weight", c.n_embd)?;
        let mut output = if source.tensor("output.weight").is_some() {
            Some(WeightMatrix::load(
                source,
                "output.weight",
                c.n_embd,
                c.vocab_size,
            )?)
        } else {
            None
        };
        let tied_embeddings = output.is_none();
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            let matrix = |s: &str, cols: usize, rows: usize| {
                WeightMatrix::load(source, &name(s), cols, rows)
            };
            let vector = |s: &str, len: usize| load_vector(source, &name(s), len);
            let optional = |s: &str, len: usize| load_optional_vector(source, &name(s), len);
            let required_if = |cond: bool, s: &str, len: usize| -> Result<_, ModelError> {
                if cond {
                    vector(s, len).map(Some)
                } else {
                    optional(s, len)
                }
            };
            layers.push(LayerWeights {
                attn_norm: vector("attn_norm.weight", c.n_embd)?,
                wq: matrix("attn_q.weight", c.n_embd, c.q_dim())?,
                wk: matrix("attn_k.weight", c.n_embd, c.kv_dim())?,
                wv: matrix("attn_v.weight", c.n_embd, c.kv_dim())?,
                wo: matrix("attn_output.weight", c.q_dim(), c.n_embd)?,
                bq: required_if(c.qkv_bias, "attn_q.bias", c.q_dim())?,
                bk: required_if(c.qkv_bias, "attn_k.bias", c.kv_dim())?,
                bv: required_if(c.qkv_bias, "attn_v.bias", c.kv_dim())?,
                bo: optional("attn_output.bias", c.n_embd)?,
                q_norm: required_if(c.qk_norm, "attn_q_norm.weight", c.head_dim)?,
                k_norm: required_if(c.qk_norm, "attn_k_norm.weight", c.head_dim)?,
                post_attn_norm: required_if(c.post_norms, "post_attention_norm.weight", c.n_embd)?,
                ffn_norm: vector("ffn_norm.weight", c.n_embd)?,
                w_gate: matrix("ffn_gate.weight", c.n_embd, c.n_ff)?,
                w_up: matrix("ffn_up.weight", c.n_embd, c.n_ff)?,
                w_down: matrix("ffn_down.weight", c.n_ff, c.n_embd)?,
                b_gate: optional("ffn_gate.bias", c.n_ff)?,
                b_up: optional("ffn_up.bias", c.n_ff)?,
                b_down: optional("ffn_down.bias", c.n_embd)?,
                post_ffn_norm: required_if(c.post_norms, "post_ffw_norm.weight", c.n_embd)?,
            });
        }
        refuse_unread_tensors(source, &config, &layers, tied_embeddings)?;
        // Before the tied output is cloned from the embedding, so both share the rewrite.
        let mut matrices: Vec<&mut WeightMatrix> = vec![&mut token_embd];
        matrices.extend(output.as_mut());
        for l in &mut layers {
            matrices.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        let huge_pages = prepare_for_kernels(matrices);
        let output = output.unwrap_or_else(|| token_embd.clone());
        let n_params = source
            .names()
            .iter()
            .filter_map(|n| source.tensor(n))
            .map(|t| t.n_elements())
            .sum();
        Ok(Model {
            config,
            origin: source.origin().to_path_buf(),
            n_params,
            token_embd,
            output_norm,
            output,
            tied_embeddings,
            layers,
            huge_pages,
        })
    }

    /// Waits until the weights' merge into huge pages, which runs on a thread of its own after
    /// loading, has ended; `None` when none runs (`KILN_HUGEPAGES` set, weights read in place,
    /// a model smaller than a huge page). Measurements of the steady state wait for it.
    pub fn wait_for_huge_pages(&self) -> Option<HugePageOutcome> {
        self.huge_pages.as_ref().map(|m| m.wait())
    }

    /// Bytes of weights read to produce one token: every matrix once, plus one embedding row.
    pub fn bytes_per_token(&self) -> u64 {
        let mut total = 0u64;
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                total += m.n_bytes() as u64;
            }
        }
        total + self.output.n_bytes() as u64
    }
}
