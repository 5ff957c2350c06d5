//! Gemma 3 (text): local sliding-window layers interleaved with global layers, each kind with
//! its own rotary base, RMSNorm on q and k heads, norms before and after both sub-blocks,
//! GeGLU feed-forward, token embeddings scaled by sqrt(hidden), tied output.
//!
//! GGUF conventions, as llama.cpp's converter writes them: norm weights are stored with Gemma's
//! `1 + w` already applied, so a plain `x * w` RMSNorm is right; rotary pairs are split halves.

use super::{check_shapes, count_or, vocab_size, BaseSizes};
use crate::config::{Activation, LayerConfig, ModelConfig, RopeStyle};
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;

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
    };
    check_shapes(file, &config)?;
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
