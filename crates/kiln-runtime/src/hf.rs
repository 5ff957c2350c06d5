//! Hugging Face model folders: `config.json`, safetensors weights (`model.safetensors` or the
//! shards `model.safetensors.index.json` names) and, optionally, `tokenizer.json`.
//!
//! The model is the one the same checkpoint converted to GGUF describes, read without copying
//! or converting weights, with these differences met at load:
//!
//! - Names: module paths (`model.layers.3.mlp.up_proj.weight`) are mapped to the canonical GGUF
//!   names the architectures read (`blk.3.ffn_up.weight`); see [`canonical_name`].
//! - Layout: a row-major `[out, in]` safetensors matrix is, byte for byte, a ggml `[in, out]`
//!   tensor, so F32, F16 and BF16 weights are read in place from the map with their dimensions
//!   reversed. Other dtypes are refused.
//! - Rotary pairs: q/k rows are in the rotate-half layout, which the configuration from
//!   `config.json` declares ([`RopeStyle::Neox`](crate::config::RopeStyle::Neox)) rather
//!   than permuting weights as llama.cpp's converter does.
//! - Gemma norms: checkpoints store `w` and Gemma applies `x * (1 + w)`; the runtime applies
//!   `x * w` (GGUF files hold `1 + w`), so each Gemma norm is presented as a derived f32 tensor
//!   `1 + w` in owned memory. Norms are small vectors, so this costs almost nothing.

use crate::arch;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::model::Model;
use crate::weights::{TensorRef, TensorSource, WeightStorage};
use kiln_format::safetensors::{SafetensorsFile, ShardedSafetensors, TensorInfo};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model configuration file of a folder.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file of a folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The largest `config.json` accepted (real ones are a few kilobytes).
const MAX_CONFIG_LEN: u64 = 16 << 20;

/// Reads and parses `config.json` of the folder `dir`; returns it with its path.
pub fn read_config(dir: &Path) -> Result<(Value, PathBuf), ModelError> {
    let path = dir.join(CONFIG_FILE);
    let meta = std::fs::metadata(&path).map_err(|e| {
        ModelError::bad(
            &path,
            format!("cannot read the model configuration ({e}); a Hugging Face model folder holds {CONFIG_FILE}"),
        )
    })?;
    if meta.len() > MAX_CONFIG_LEN {
        return Err(ModelError::bad(
            &path,
            format!(
                "{} bytes, more than the {MAX_CONFIG_LEN} a configuration may take",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| ModelError::bad(&path, e.to_string()))?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::bad(&path, format!("malformed JSON: {e}")))?;
    if !json.is_object() {
        return Err(ModelError::bad(&path, "expected a JSON object"));
    }
    Ok((json, path))
}

/// The model description `config.json` of the folder `dir` gives.
pub fn config_from_dir(dir: &Path) -> Result<ModelConfig, ModelError> {
    let (json, path) = read_config(dir)?;
    config_from_json(&json, &path)
}

/// The model description of a parsed `config.json` (`origin` names it in errors). Quantized
/// checkpoints (`quantization_config`) are refused: their tensors are not plain weights.
pub fn config_from_json(json: &Value, origin: &Path) -> Result<ModelConfig, ModelError> {
    if let Some(q) = json.get("quantization_config").filter(|v| !v.is_null()) {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        return Err(ModelError::unsupported(
            origin,
            format!(
                "quantized checkpoints (quant_method '{method}') are not supported; use the \
                 float weights"
            ),
        ));
    }
    arch::config_from_hf(json, origin)
}

/// Whether the output projection is the embedding matrix: `tie_word_embeddings` (of
/// `text_config` first, for multimodal Gemma 3), defaulting as transformers' configuration
/// classes do: true for Gemma 3, false for the Llama family.
pub fn tie_word_embeddings(
    json: &Value,
    config: &ModelConfig,
    origin: &Path,
) -> Result<bool, ModelError> {
    let key = "tie_word_embeddings";
    let value = json
        .get("text_config")
        .and_then(|t| t.get(key))
        .filter(|v| !v.is_null())
        .or_else(|| json.get(key).filter(|v| !v.is_null()));
    match value {
        None => Ok(config.architecture == "gemma3"),
        Some(v) => v.as_bool().ok_or_else(|| {
            ModelError::bad(origin, format!("'{key}' is {v}, expected true or false"))
        }),
    }
}

/// Refuses a `.safetensors` file given where a model is expected, pointing to its folder:
/// the weights alone lack the configuration that says what they are.
pub fn refuse_weights_file(path: &Path) -> Result<(), ModelError> {
    if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
        return Err(ModelError::bad(
            path,
            "a safetensors file holds weights only; pass the Hugging Face folder that holds it \
             and its config.json",
        ));
    }
    Ok(())
}

/// Opens the model of a Hugging Face folder: its configuration and its weights.
pub fn load_model(dir: &Path) -> Result<Model, ModelError> {
    let (json, config_path) = read_config(dir)?;
    let config = config_from_json(&json, &config_path)?;
    let tied = tie_word_embeddings(&json, &config, &config_path)?;
    let weights = ShardedSafetensors::open_dir(dir)?;
    let source = HfSource::new(dir, &weights, &config, tied)?;
    Model::from_source(config, &source)
}

impl WeightStorage for SafetensorsFile {
    fn bytes(&self) -> &[u8] {
        SafetensorsFile::bytes(self)
    }
}

/// What a checkpoint tensor is to kiln.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// The tensor of this canonical (GGUF) name; `norm` for RMSNorm weights.
    Tensor {
        /// Canonical name.
        name: String,
        /// Whether it is an RMSNorm weight (Gemma stores those as `w` for `1 + w`).
        norm: bool,
    },
    /// Not a weight of the text model: recomputed from the configuration, or part of a
    /// vision tower a text-only run does not use.
    Ignored,
}

/// The canonical name of a checkpoint tensor of `architecture` (`llama`, `mistral`, `qwen2`,
/// `qwen3`, `gemma3`), or `None` when it is nothing kiln knows.
///
/// `post_attention_layernorm` differs by family: in the Llama family it is the norm before
/// the feed-forward block (GGUF `ffn_norm`); Gemma 3 normalizes the attention output with it
/// (GGUF `post_attention_norm`) and has `pre_feedforward_layernorm` before the feed-forward
/// block.
pub fn canonical_name(hf: &str, architecture: &str) -> Option<Mapped> {
    let gemma = architecture == "gemma3";
    let tensor = |name: &str, norm: bool| {
        Some(Mapped::Tensor {
            name: name.to_string(),
            norm,
        })
    };
    if gemma {
        // The multimodal model's vision tower and projector do not take part in text.
        let unprefixed = hf.strip_prefix("model.").unwrap_or(hf);
        if unprefixed.starts_with("vision_tower.")
            || unprefixed.starts_with("multi_modal_projector.")
        {
            return Some(Mapped::Ignored);
        }
    }
    if hf == "lm_head.weight" || (gemma && hf == "language_model.lm_head.weight") {
        return tensor("output.weight", false);
    }
    let prefixes: &[&str] = if gemma {
        // Gemma 3's multimodal model, saved by transformers before and after 4.52.
        &["model.language_model.", "language_model.model.", "model."]
    } else {
        &["model."]
    };
    let rest = prefixes.iter().find_map(|p| hf.strip_prefix(p))?;
    match rest {
        "embed_tokens.weight" => return tensor("token_embd.weight", false),
        "norm.weight" => return tensor("output_norm.weight", true),
        // Old checkpoints saved the rotary inverse frequencies, which the configuration
        // determines; they are recomputed, so the stored copy is not needed.
        "rotary_emb.inv_freq" => return Some(Mapped::Ignored),
        _ => {}
    }
    let (layer, sub) = rest.strip_prefix("layers.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = sub.rsplit_once('.')?;
    if !matches!(kind, "weight" | "bias") {
        return (sub == "self_attn.rotary_emb.inv_freq").then_some(Mapped::Ignored);
    }
    let (base, norm) = match (module, gemma) {
        ("self_attn.q_proj", _) => ("attn_q", false),
        ("self_attn.k_proj", _) => ("attn_k", false),
        ("self_attn.v_proj", _) => ("attn_v", false),
        ("self_attn.o_proj", _) => ("attn_output", false),
        ("mlp.gate_proj", _) => ("ffn_gate", false),
        ("mlp.up_proj", _) => ("ffn_up", false),
        ("mlp.down_proj", _) => ("ffn_down", false),
        ("input_layernorm", _) => ("attn_norm", true),
        ("self_attn.q_norm", _) => ("attn_q_norm", true),
        ("self_attn.k_norm", _) => ("attn_k_norm", true),
        ("post_attention_layernorm", false) => ("ffn_norm", true),
        ("post_attention_layernorm", true) => ("post_attention_norm", true),
        ("pre_feedforward_layernorm", true) => ("ffn_norm", true),
        ("post_feedforward_layernorm", true) => ("post_ffw_norm", true),
        _ => return None,
    };
    if norm && kind != "weight" {
        return None;
    }
    tensor(&format!("blk.{layer}.{base}.{kind}"), norm)
}

/// The transformers checkpoint name of the canonical (GGUF) tensor `name` of a model of
/// `architecture` (`llama` or `gemma3`), and whether it is an RMSNorm weight: the inverse of
/// [`canonical_name`], as transformers' `LlamaForCausalLM` and `Gemma3ForCausalLM` name them.
pub fn checkpoint_name(name: &str, architecture: &str) -> Option<(String, bool)> {
    let gemma = architecture == "gemma3";
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), false)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), true)),
        "output.weight" => return Some(("lm_head.weight".into(), false)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, sub) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (base, kind) = sub.rsplit_once('.')?;
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    let (module, norm) = match (base, gemma) {
        ("attn_q", _) => ("self_attn.q_proj", false),
        ("attn_k", _) => ("self_attn.k_proj", false),
        ("attn_v", _) => ("self_attn.v_proj", false),
        ("attn_output", _) => ("self_attn.o_proj", false),
        ("ffn_gate", _) => ("mlp.gate_proj", false),
        ("ffn_up", _) => ("mlp.up_proj", false),
        ("ffn_down", _) => ("mlp.down_proj", false),
        ("attn_norm", _) => ("input_layernorm", true),
        ("attn_q_norm", _) => ("self_attn.q_norm", true),
        ("attn_k_norm", _) => ("self_attn.k_norm", true),
        ("ffn_norm", false) => ("post_attention_layernorm", true),
        ("post_attention_norm", true) => ("post_attention_layernorm", true),
        ("ffn_norm", true) => ("pre_feedforward_layernorm", true),
        ("post_ffw_norm", true) => ("post_feedforward_layernorm", true),
        _ => return None,
    };
    if norm && kind != "weight" {
        return None;
    }
    Some((format!("model.layers.{layer}.{module}.{kind}"), norm))
}

/// The tensors of a Hugging Face checkpoint under canonical names, as the architectures read
/// them (see the module documentation for what is translated).
pub struct HfSource {
    origin: PathBuf,
    tensors: HashMap<String, (TensorRef, String)>,
    names: Vec<String>,
}

impl HfSource {
    /// Maps every tensor of `weights` to its canonical name for a model of `config`.
    ///
    /// Refused: a tensor kiln knows nothing of (rather than leaving a feature of the model
    /// out), a dtype other than F32, F16 and BF16, two tensors with one meaning, and an untied
    /// model without `lm_head.weight`. With `tied`, a stored `lm_head.weight` is ignored, as
    /// transformers ties it to the embeddings after loading.
    pub fn new(
        dir: &Path,
        weights: &ShardedSafetensors,
        config: &ModelConfig,
        tied: bool,
    ) -> Result<HfSource, ModelError> {
        let arch = config.architecture.as_str();
        let gemma = arch == "gemma3";
        let mut tensors: HashMap<String, (TensorRef, String)> = HashMap::new();
        let mut names = Vec::new();
        for (file, t) in weights.tensors() {
            let shard = file_name(file.path());
            let (name, norm) = match canonical_name(&t.name, arch) {
                Some(Mapped::Tensor { name, norm }) => (name, norm),
                Some(Mapped::Ignored) => continue,
                None => {
                    return Err(ModelError::unsupported(
                        dir,
                        format!(
                            "tensor '{}' (in {shard}) means nothing to kiln's {arch} \
                             implementation; refusing rather than ignoring it",
                            t.name
                        ),
                    ))
                }
            };
            if tied && name == "output.weight" {
                continue;
            }
            let tref = if gemma && norm {
                one_plus(file, t, dir)?
            } else {
                in_place(file, t, dir)?
            };
            if let Some((_, other)) = tensors.get(&name) {
                return Err(ModelError::bad(
                    dir,
                    format!("tensors '{other}' and '{}' both hold {name}", t.name),
                ));
            }
            names.push(name.clone());
            tensors.insert(name, (tref, t.name.clone()));
        }
        if !tied && !tensors.contains_key("output.weight") {
            return Err(ModelError::bad(
                dir,
                "config.json sets tie_word_embeddings to false, but the weights hold no \
                 lm_head.weight",
            ));
        }
        Ok(HfSource {
            origin: dir.to_path_buf(),
            tensors,
            names,
        })
    }

    /// The checkpoint's name of the tensor a canonical name stands for.
    pub fn hf_name(&self, canonical: &str) -> Option<&str> {
        self.tensors.get(canonical).map(|(_, n)| n.as_str())
    }
}

impl TensorSource for HfSource {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn tensor(&self, name: &str) -> Option<TensorRef> {
        self.tensors.get(name).map(|(t, _)| t.clone())
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn describe(&self, name: &str) -> String {
        match self.hf_name(name) {
            Some(hf) => format!("'{hf}' (kiln's {name}, dimensions innermost first)"),
            None => format!("'{name}'"),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// The ggml view of a tensor: same bytes, dimensions reversed.
fn ggml_dims(t: &TensorInfo) -> Vec<u64> {
    if t.shape.is_empty() {
        vec![1]
    } else {
        t.shape.iter().rev().copied().collect()
    }
}

fn unsupported_dtype(dir: &Path, file: &SafetensorsFile, t: &TensorInfo) -> ModelError {
    ModelError::unsupported(
        dir,
        format!(
            "tensor '{}' (in {}) is stored as {}; kiln runs F32, F16 and BF16 safetensors \
             weights",
            t.name,
            file_name(file.path()),
            t.dtype
        ),
    )
}

fn in_place(
    file: &Arc<SafetensorsFile>,
    t: &TensorInfo,
    dir: &Path,
) -> Result<TensorRef, ModelError> {
    let format = t
        .dtype
        .ggml_type()
        .ok_or_else(|| unsupported_dtype(dir, file, t))?;
    let offset = usize::try_from(file.tensor_file_offset(t)).map_err(|_| {
        ModelError::bad(
            dir,
            format!("tensor '{}' lies beyond the address space", t.name),
        )
    })?;
    Ok(TensorRef {
        storage: Arc::clone(file) as Arc<dyn WeightStorage>,
        offset,
        dims: ggml_dims(t),
        format: format.into(),
    })
}

/// A Gemma norm weight as the runtime applies it: `1 + w`, in f32, computed as transformers'
/// Gemma RMSNorm does (`1.0 + weight.float()`).
fn one_plus(
    file: &Arc<SafetensorsFile>,
    t: &TensorInfo,
    dir: &Path,
) -> Result<TensorRef, ModelError> {
    if t.dtype.ggml_type().is_none() {
        return Err(unsupported_dtype(dir, file, t));
    }
    let bytes: Vec<u8> = file
        .tensor_f32(t)?
        .into_iter()
        .flat_map(|w| (1.0 + w).to_le_bytes())
        .collect();
    Ok(TensorRef {
        storage: Arc::new(bytes),
        offset: 0,
        dims: ggml_dims(t),
        format: kiln_format::ggml::GgmlType::F32.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(hf: &str, arch: &str) -> Option<String> {
        match canonical_name(hf, arch)? {
            Mapped::Tensor { name, .. } => Some(name),
            Mapped::Ignored => Some("-".into()),
        }
    }

    #[test]
    fn llama_and_gemma_name_the_feed_forward_norm_differently() {
        let n = "model.layers.7.post_attention_layernorm.weight";
        assert_eq!(name(n, "llama").as_deref(), Some("blk.7.ffn_norm.weight"));
        assert_eq!(
            name(n, "gemma3").as_deref(),
            Some("blk.7.post_attention_norm.weight")
        );
        let n = "model.layers.7.pre_feedforward_layernorm.weight";
        assert_eq!(name(n, "gemma3").as_deref(), Some("blk.7.ffn_norm.weight"));
        assert_eq!(name(n, "llama"), None);
    }

    #[test]
    fn checkpoint_names_invert_canonical_names() {
        let canonical = [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "blk.3.attn_q.weight",
            "blk.3.attn_k.weight",
            "blk.3.attn_v.weight",
            "blk.3.attn_output.weight",
            "blk.3.ffn_gate.weight",
            "blk.3.ffn_up.weight",
            "blk.3.ffn_down.weight",
            "blk.3.attn_norm.weight",
            "blk.3.ffn_norm.weight",
        ];
        let gemma_only = [
            "blk.11.attn_q_norm.weight",
            "blk.11.attn_k_norm.weight",
            "blk.11.post_attention_norm.weight",
            "blk.11.post_ffw_norm.weight",
        ];
        for arch in ["llama", "gemma3"] {
            let names = canonical.iter().chain(if arch == "gemma3" {
                &gemma_only[..]
            } else {
                &[]
            });
            for &n in names {
                let (hf, norm) = checkpoint_name(n, arch).unwrap_or_else(|| panic!("{n}"));
                assert_eq!(
                    canonical_name(&hf, arch),
                    Some(Mapped::Tensor {
                        name: n.to_string(),
                        norm
                    }),
                    "{arch} {n} -> {hf}"
                );
            }
        }
        assert_eq!(checkpoint_name("blk.1.post_ffw_norm.weight", "llama"), None);
        assert_eq!(checkpoint_name("rope_freqs.weight", "llama"), None);
    }

    #[test]
    fn names_of_every_kind() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
            (
                "model.layers.12.self_attn.o_proj.weight",
                "blk.12.attn_output.weight",
            ),
            (
                "model.layers.1.self_attn.k_norm.weight",
                "blk.1.attn_k_norm.weight",
            ),
            ("model.layers.3.mlp.down_proj.bias", "blk.3.ffn_down.bias"),
            ("model.layers.3.self_attn.rotary_emb.inv_freq", "-"),
        ];
        for (hf, want) in cases {
            assert_eq!(name(hf, "qwen2").as_deref(), Some(want), "{hf}");
        }
        for hf in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.scales",
            "model.layers.0.input_layernorm.bias",
            "model.layers..mlp.up_proj.weight",
            "transformer.h.0.attn.weight",
            "language_model.model.norm.weight",
        ] {
            assert_eq!(name(hf, "llama"), None, "{hf}");
        }
        for (hf, want) in [
            (
                "language_model.model.layers.2.mlp.up_proj.weight",
                "blk.2.ffn_up.weight",
            ),
            (
                "model.language_model.embed_tokens.weight",
                "token_embd.weight",
            ),
            ("language_model.lm_head.weight", "output.weight"),
            (
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "-",
            ),
            (
                "model.multi_modal_projector.mm_input_projection_weight",
                "-",
            ),
        ] {
            assert_eq!(name(hf, "gemma3").as_deref(), Some(want), "{hf}");
        }
    }
}
