//! The Llama family: SmolLM2, Llama 2/3.x, Mistral, Qwen 2/3 GGUF files.
//!
//! Pre-norm blocks with RMSNorm, SwiGLU feed-forward, rotary embedding (interleaved pairs for
//! `llama`, whose q/k weights the GGUF converter permuted; split halves for Qwen), grouped-query
//! attention, optional q/k/v biases (Qwen 2) and q/k norms (Qwen 3), Llama 3 frequency factors
//! (`rope_freqs.weight`) and linear rope scaling.

use super::{check_shapes, count_or, vocab_size, BaseSizes};
use crate::config::{Activation, LayerConfig, ModelConfig, RopeStyle};
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;

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
    };
    check_shapes(file, &config)?;
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
