//! Gemma 3 (text): local sliding-window layers interleaved with global layers, each kind with
//! its own rotary base, RMSNorm on q and k heads, norms before and after both sub-blocks,
//! GeGLU feed-forward, token embeddings scaled by sqrt(hidden), tied output.
//!
//! GGUF conventions, as llama.cpp's converter writes them: norm weights are stored with Gemma's
//! `1 + w` already applied, so a plain `x * w` RMSNorm is right; rotary pairs are split halves.
//! Hugging Face checkpoints store `w` itself; [`crate::hf`] presents `1 + w` to the model, so
//! both sources describe the same network.

use super::{check_shapes, count_or, vocab_size, BaseSizes, HfKeys, HfRope, GGUF_NAMES, HF_NAMES};
use crate::config::{Activation, LayerConfig, ModelConfig, RopeStyle};
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;

/// Every `SLIDING_WINDOW_PATTERN`-th layer is global; the others are local (Gemma 3 config
/// `sliding_window_pattern`).
const SLIDING_WINDOW_PATTERN: usize = 6;
/// Rotary base of the local layers (Gemma 3 config `rope_local_base_freq`); the global layers
/// use `gemma3.rope.freq_base`.
const LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Reads a Gemma 3 model description from GGUF metadata.
pub fn config(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let a = "gemma3";
    let BaseSizes {
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
    } = BaseSizes::read(file, a)?;
    let context_length = count_or(file, a, "context_length", 1 << 24, 32_768)?;
    let window = count_or(file, a, "attention.sliding_window", 1 << 24, 4096)?;
    let rms_eps = file
        .get_f32("gemma3.attention.layer_norm_rms_epsilon")?
        .unwrap_or(1e-6);
    let global_base = file
        .get_f32("gemma3.rope.freq_base")?
        .unwrap_or(1_000_000.0);
    let global_scale = match file.get_f32("gemma3.rope.scaling.factor")? {
        Some(f) if f.is_finite() && f > 0.0 => 1.0 / f,
        Some(f) => {
            return Err(ModelError::bad(
                file.path(),
                format!("gemma3.rope.scaling.factor {f} must be positive"),
            ))
        }
        None => 1.0,
    };
    let layers = (0..n_layers)
        .map(|i| {
            if is_global(i) {
                LayerConfig {
                    sliding_window: None,
                    rope_base: global_base,
                    rope_freq_scale: global_scale,
                }
            } else {
                LayerConfig {
                    sliding_window: Some(window),
                    rope_base: LOCAL_ROPE_BASE,
                    rope_freq_scale: 1.0,
                }
            }
        })
        .collect();
    let config = ModelConfig {
        architecture: a.to_string(),
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
        vocab_size: vocab_size(file, a)?,
        context_length,
        rms_eps,
        rope_dim: head_dim,
        rope_style: RopeStyle::Neox,
        rope_freq_factors: None,
        layers,
        embedding_scale: Some((n_embd as f32).sqrt()),
        activation: Activation::GeluTanh,
        qk_norm: true,
        post_norms: true,
        attn_scale: 1.0
            / (query_pre_attn_scalar(n_layers, n_embd, n_heads, head_dim) as f32).sqrt(),
        final_logit_softcap: None,
        attn_logit_softcap: None,
        qkv_bias: false,
        residual_rms_eps: None,
    };
    check_shapes(file.path(), &config, &GGUF_NAMES)?;
    Ok(config)
}

/// Gemma 3's `query_pre_attn_scalar`, which GGUF does not store: the head size for every
/// published size except the 27B model (62 layers), which uses hidden / heads.
fn query_pre_attn_scalar(n_layers: usize, n_embd: usize, n_heads: usize, head_dim: usize) -> usize {
    if n_layers == 62 {
        n_embd / n_heads
    } else {
        head_dim
    }
}

/// Reads a Gemma 3 model description from a Hugging Face `config.json`: `model_type`
/// `gemma3_text`, or `gemma3` (the multimodal model, whose text settings are in
/// `text_config`); `origin` is the file, for messages.
///
/// Keys absent from the file take the defaults of transformers' `Gemma3TextConfig` (the
/// multimodal configs leave most of them out). Rotary parameters come from
/// `rope_parameters.{full_attention, sliding_attention}` (transformers 5), or `rope_theta`,
/// `rope_scaling` (global layers only) and `rope_local_base_freq`; which layers are local from
/// `layer_types`, else `sliding_window_pattern`.
pub fn config_from_hf(json: &Value, origin: &Path) -> Result<ModelConfig, ModelError> {
    let top = HfKeys::new(json, origin);
    let k = match top.str_or("model_type", "")? {
        "gemma3_text" => top,
        "gemma3" => top
            .object("text_config")?
            .unwrap_or_else(|| HfKeys::new(&Value::Null, origin)),
        other => return Err(top.bad(format!("model_type '{other}' is not Gemma 3"))),
    };
    let n_layers = k.count_or("num_hidden_layers", 4096, 26)?;
    let n_embd = k.count_or("hidden_size", 1 << 20, 2304)?;
    let n_heads = k.count_or("num_attention_heads", 4096, 8)?;
    let n_kv_heads = k.count_or("num_key_value_heads", 4096, 4)?;
    let head_dim = k.count_or("head_dim", 1 << 16, 256)?;
    let n_ff = k.count_or("intermediate_size", 1 << 24, 9216)?;
    let vocab_size = k.count_or("vocab_size", 1 << 24, 262_208)?;
    let context_length = k.count_or("max_position_embeddings", 1 << 24, 131_072)?;
    let rms_eps = k.f32_or("rms_norm_eps", 1e-6)?;
    let act = k.str_or("hidden_activation", "gelu_pytorch_tanh")?;
    if act != "gelu_pytorch_tanh" {
        return Err(ModelError::unsupported(
            origin,
            format!("hidden_activation '{act}' is not supported (supported: gelu_pytorch_tanh)"),
        ));
    }
    if k.bool_or("use_bidirectional_attention", false)? {
        return Err(ModelError::unsupported(
            origin,
            "bidirectional attention (embedding models) is not supported",
        ));
    }
    let window = k.count_or("sliding_window", 1 << 24, 4096)?;
    let scalar = k.f32_or("query_pre_attn_scalar", 256.0)?;
    if scalar <= 0.0 {
        return Err(k.bad(format!("query_pre_attn_scalar {scalar} must be positive")));
    }

    let (global, local) = match k.object("rope_parameters")? {
        Some(p) => (
            HfRope::read(
                p.object("full_attention")?.as_ref(),
                "rope_parameters.full_attention",
            )?,
            HfRope::read(
                p.object("sliding_attention")?.as_ref(),
                "rope_parameters.sliding_attention",
            )?,
        ),
        None => (
            HfRope::read(k.object("rope_scaling")?.as_ref(), "rope_scaling")?,
            HfRope::read(None, "")?,
        ),
    };
    if global.llama3.is_some() || local.llama3.is_some() {
        return Err(ModelError::unsupported(
            origin,
            "llama3 rope scaling is not supported for Gemma 3 (supported: default, linear)",
        ));
    }
    let global_base = match global.theta {
        Some(t) => t,
        None => k.f32_or("rope_theta", 1_000_000.0)?,
    };
    let local_base = match local.theta {
        Some(t) => t,
        None => k.f32_or("rope_local_base_freq", LOCAL_ROPE_BASE)?,
    };

    let local_layers: Vec<bool> = match k.sliding_layer_types(n_layers)? {
        Some(types) => types,
        None => {
            let pattern = k.count_or("sliding_window_pattern", 4096, SLIDING_WINDOW_PATTERN)?;
            (0..n_layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let layers = local_layers
        .iter()
        .map(|&local_layer| {
            if local_layer {
                LayerConfig {
                    sliding_window: Some(window),
                    rope_base: local_base,
                    rope_freq_scale: local.freq_scale,
                }
            } else {
                LayerConfig {
                    sliding_window: None,
                    rope_base: global_base,
                    rope_freq_scale: global.freq_scale,
                }
            }
        })
        .collect();
    let softcap = |key: &str| -> Result<Option<f32>, ModelError> {
        match k.f32_opt(key)? {
            Some(c) if c <= 0.0 => Err(k.bad(format!("{key} {c} must be positive"))),
            c => Ok(c),
        }
    };
    let config = ModelConfig {
        architecture: "gemma3".to_string(),
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
        vocab_size,
        context_length,
        rms_eps,
        rope_dim: head_dim,
        rope_style: RopeStyle::Neox,
        rope_freq_factors: None,
        layers,
        embedding_scale: Some((n_embd as f32).sqrt()),
        activation: Activation::GeluTanh,
        qk_norm: true,
        post_norms: true,
        attn_scale: 1.0 / scalar.sqrt(),
        final_logit_softcap: softcap("final_logit_softcapping")?,
        attn_logit_softcap: softcap("attn_logit_softcapping")?,
        qkv_bias: k.bool_or("attention_bias", false)?,
        residual_rms_eps: None,
    };
    check_shapes(origin, &config, &HF_NAMES)?;
    Ok(config)
}

fn is_global(layer: usize) -> bool {
    (layer + 1) % SLIDING_WINDOW_PATTERN == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let globals: Vec<usize> = (0..18).filter(|&i| is_global(i)).collect();
        assert_eq!(globals, vec![5, 11, 17]);
    }
}
