//! The Llama family: SmolLM2, Llama 2/3.x, Mistral, Qwen 2/3, as GGUF files or Hugging Face
//! folders.
//!
//! Pre-norm blocks with RMSNorm, SwiGLU feed-forward, rotary embedding, grouped-query
//! attention, optional q/k/v biases (Qwen 2) and q/k norms (Qwen 3), Llama 3 frequency factors
//! and linear rope scaling.
//!
//! Rotary pairs: Hugging Face checkpoints keep q/k rows in the rotate-half layout (pairs
//! `(i, i + d/2)`). llama.cpp's converter permutes the rows of `llama` models to adjacent pairs
//! `(2i, 2i + 1)` and leaves Qwen's alone, so GGUF `llama` files use interleaved rotary and
//! every Hugging Face folder split halves, with no weight permuted at load.

use super::{check_shapes, count_or, vocab_size, BaseSizes, HfKeys, HfRope, GGUF_NAMES, HF_NAMES};
use crate::config::{Activation, LayerConfig, ModelConfig, RopeStyle};
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;

/// Reads a Llama-family model description from GGUF metadata.
pub fn config(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch = file.architecture()?.to_string();
    let a = arch.as_str();
    let BaseSizes {
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
    } = BaseSizes::read(file, a)?;
    let context_length = count_or(file, a, "context_length", 1 << 24, 4096)?;
    let rope_dim = count_or(file, a, "rope.dimension_count", 1 << 16, head_dim)?;
    let rms_eps = file
        .get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let rope_base = file
        .get_f32(&format!("{a}.rope.freq_base"))?
        .unwrap_or(10_000.0);
    let rope_freq_scale = rope_scale(file, a)?;
    let rope_style = match a {
        "qwen2" | "qwen3" => RopeStyle::Neox,
        _ => RopeStyle::Interleaved,
    };
    let rope_freq_factors = match file.tensor("rope_freqs.weight") {
        Some(t) => {
            let v = file.tensor_f32(t)?;
            if v.len() != rope_dim / 2 {
                return Err(ModelError::bad(
                    file.path(),
                    format!(
                        "tensor 'rope_freqs.weight' has {} elements, expected {}",
                        v.len(),
                        rope_dim / 2
                    ),
                ));
            }
            Some(v)
        }
        None => None,
    };
    let layer = LayerConfig {
        sliding_window: None,
        rope_base,
        rope_freq_scale,
    };
    let config = ModelConfig {
        architecture: arch.clone(),
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
        vocab_size: vocab_size(file, a)?,
        context_length,
        rms_eps,
        rope_dim,
        rope_style,
        rope_freq_factors,
        layers: vec![layer; n_layers],
        embedding_scale: None,
        activation: Activation::Silu,
        qk_norm: file.tensor("blk.0.attn_q_norm.weight").is_some(),
        post_norms: false,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        final_logit_softcap: None,
        attn_logit_softcap: None,
        qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
        residual_rms_eps: None,
    };
    check_shapes(file.path(), &config, &GGUF_NAMES)?;
    Ok(config)
}

/// Linear rope scaling from `{arch}.rope.scaling.type` / `.factor` (or the older
/// `rope.scale_linear`); other scaling types are refused rather than silently ignored.
fn rope_scale(file: &GgufFile, a: &str) -> Result<f32, ModelError> {
    let kind = file.get_str(&format!("{a}.rope.scaling.type"))?;
    let factor = file.get_f32(&format!("{a}.rope.scaling.factor"))?;
    let legacy = file.get_f32(&format!("{a}.rope.scale_linear"))?;
    match (kind, factor, legacy) {
        (None | Some("none"), _, None) => Ok(1.0),
        (None | Some("none"), _, Some(f))
        | (Some("linear"), Some(f), _)
        | (Some("linear"), None, Some(f)) => {
            if f.is_finite() && f > 0.0 {
                Ok(1.0 / f)
            } else {
                Err(ModelError::bad(
                    file.path(),
                    format!("rope scaling factor {f} must be positive"),
                ))
            }
        }
        (Some("linear"), None, None) => Err(ModelError::bad(
            file.path(),
            format!("linear rope scaling without '{a}.rope.scaling.factor'"),
        )),
        // Llama 3 scaling is carried by the rope_freqs tensor; its metadata type is informative.
        (Some("llama3"), _, _) => Ok(1.0),
        (Some(other), _, _) => Err(ModelError::unsupported(
            file.path(),
            format!(
                "rope scaling type '{other}' is not supported (supported: none, linear, llama3)"
            ),
        )),
    }
}

/// Reads a Llama-family model description (`model_type` llama, mistral, qwen2 or qwen3) from
/// a Hugging Face `config.json`; `origin` is the file, for messages.
///
/// Keys absent from the file take the defaults of transformers' configuration classes.
/// Rotary parameters come from `rope_parameters` (transformers 5) or `rope_theta` and
/// `rope_scaling` (earlier versions); sliding windows from `layer_types`, Mistral's
/// `sliding_window` or Qwen's `use_sliding_window` / `max_window_layers`.
pub fn config_from_hf(json: &Value, origin: &Path) -> Result<ModelConfig, ModelError> {
    let k = HfKeys::new(json, origin);
    let model_type = k.str_or("model_type", "")?;
    if !matches!(model_type, "llama" | "mistral" | "qwen2" | "qwen3") {
        return Err(k.bad(format!(
            "model_type '{model_type}' is not a Llama-family model"
        )));
    }
    let n_layers = k.count("num_hidden_layers", 4096)?;
    let n_embd = k.count("hidden_size", 1 << 20)?;
    let n_heads = k.count("num_attention_heads", 4096)?;
    let n_kv_heads = k.count_or("num_key_value_heads", 4096, n_heads)?;
    let head_dim = k.count_or("head_dim", 1 << 16, n_embd / n_heads)?;
    let n_ff = k.count("intermediate_size", 1 << 24)?;
    let vocab_size = k.count("vocab_size", 1 << 24)?;
    let default_context = match model_type {
        "llama" => 2048,
        _ => 32_768,
    };
    let context_length = k.count_or("max_position_embeddings", 1 << 24, default_context)?;
    let rms_eps = k.f32_or("rms_norm_eps", 1e-6)?;
    let act = k.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(ModelError::unsupported(
            origin,
            format!("hidden_act '{act}' is not supported for {model_type} (supported: silu)"),
        ));
    }

    let params = match k.object("rope_parameters")? {
        Some(p) => Some(p),
        None => k.object("rope_scaling")?,
    };
    let rope = HfRope::read(params.as_ref(), "rope parameters")?;
    let rope_base = match rope.theta {
        Some(t) => t,
        None => k.f32_or("rope_theta", 10_000.0)?,
    };
    let partial = match params
        .as_ref()
        .filter(|p| p.get("partial_rotary_factor").is_some())
    {
        Some(p) => p.f32_or("partial_rotary_factor", 1.0)?,
        None => k.f32_or("partial_rotary_factor", 1.0)?,
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(k.bad(format!("partial_rotary_factor {partial} must be in (0, 1]")));
    }
    let rope_dim = (head_dim as f64 * f64::from(partial)) as usize;
    let rope_freq_factors = rope.llama3.map(|l3| l3.divisors(rope_base, rope_dim));

    // Mistral and Qwen default to a 4096-position window when the key is absent (Qwen uses it
    // only with use_sliding_window); an explicit null switches it off.
    let window = match (k.has("sliding_window"), model_type) {
        (false, "mistral" | "qwen2" | "qwen3") => 4096,
        _ => k.count_or("sliding_window", 1 << 24, 0)?,
    };
    let sliding = sliding_layers(&k, model_type, n_layers, window)?;
    let layers = sliding
        .into_iter()
        .map(|s| LayerConfig {
            sliding_window: s.then_some(window),
            rope_base,
            rope_freq_scale: rope.freq_scale,
        })
        .collect();
    let config = ModelConfig {
        architecture: model_type.to_string(),
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
        vocab_size,
        context_length,
        rms_eps,
        rope_dim,
        rope_style: RopeStyle::Neox,
        rope_freq_factors,
        layers,
        embedding_scale: None,
        activation: Activation::Silu,
        qk_norm: model_type == "qwen3",
        post_norms: false,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        final_logit_softcap: None,
        attn_logit_softcap: None,
        // Qwen 2's q/k/v projections always carry biases; the others follow attention_bias.
        qkv_bias: model_type == "qwen2" || k.bool_or("attention_bias", false)?,
        residual_rms_eps: None,
    };
    check_shapes(origin, &config, &HF_NAMES)?;
    Ok(config)
}

/// Which layers attend through a sliding window, as transformers decides: `layer_types` when
/// given; else Mistral windows every layer when `sliding_window` is set, Qwen the layers from
/// `max_window_layers` on when `use_sliding_window` is true, and Llama none.
fn sliding_layers(
    k: &HfKeys<'_>,
    model_type: &str,
    n_layers: usize,
    window: usize,
) -> Result<Vec<bool>, ModelError> {
    let sliding = if let Some(types) = k.sliding_layer_types(n_layers)? {
        types
    } else {
        match model_type {
            "mistral" => vec![window > 0; n_layers],
            "qwen2" | "qwen3" if k.bool_or("use_sliding_window", false)? && window > 0 => {
                let first = k.count_or("max_window_layers", 1 << 16, 28)?;
                (0..n_layers).map(|i| i >= first).collect()
            }
            _ => vec![false; n_layers],
        }
    };
    if window == 0 && sliding.contains(&true) {
        return Err(k.bad("sliding-window layers without a positive 'sliding_window'"));
    }
    Ok(sliding)
}
