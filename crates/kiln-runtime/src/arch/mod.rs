//! Architecture builders: one file per model family, each turning a GGUF file's metadata into
//! a [`ModelConfig`](crate::config::ModelConfig).

pub mod gemma3;
pub mod llama;

use crate::config::ModelConfig;
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;

/// Architectures this runtime runs, by their GGUF `general.architecture` name.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3"];

/// Reads the model description of any supported architecture.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch = file.architecture()?;
    match arch {
        "llama" | "mistral" | "qwen2" | "qwen3" => llama::config(file),
        "gemma3" => gemma3::config(file),
        other => Err(ModelError::unsupported(
            file.path(),
            format!(
                "architecture '{other}' is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        )),
    }
}

/// The sizes every transformer file states the same way, under its architecture's prefix.
pub(crate) struct BaseSizes {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
}

impl BaseSizes {
    /// Reads the block count, widths and head counts; the key/value head size defaults to
    /// hidden / heads, and a value head size unlike the key head size is refused.
    pub fn read(file: &GgufFile, a: &str) -> Result<BaseSizes, ModelError> {
        let n_layers = count(file, a, "block_count", 4096)?;
        let n_embd = count(file, a, "embedding_length", 1 << 20)?;
        let n_heads = count(file, a, "attention.head_count", 4096)?;
        let n_kv_heads = count_or(file, a, "attention.head_count_kv", 4096, n_heads)?;
        let head_dim = count_or(file, a, "attention.key_length", 1 << 16, n_embd / n_heads)?;
        let value_dim = count_or(file, a, "attention.value_length", 1 << 16, head_dim)?;
        if value_dim != head_dim {
            return Err(ModelError::unsupported(
                file.path(),
                format!("value head size {value_dim} differs from key head size {head_dim}"),
            ));
        }
        let n_ff = count(file, a, "feed_forward_length", 1 << 24)?;
        Ok(BaseSizes {
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff,
        })
    }
}

/// Reads `{arch}.{suffix}` as a positive count no larger than `max`.
pub(crate) fn count(
    file: &GgufFile,
    arch: &str,
    suffix: &str,
    max: u64,
) -> Result<usize, ModelError> {
    let key = format!("{arch}.{suffix}");
    let v = file.require_u64(&key)?;
    if v == 0 || v > max {
        return Err(ModelError::bad(
            file.path(),
            format!("metadata '{key}' = {v} is out of range (expected 1..={max})"),
        ));
    }
    Ok(v as usize)
}

/// Like [`count`] but with a default when the key is absent.
pub(crate) fn count_or(
    file: &GgufFile,
    arch: &str,
    suffix: &str,
    max: u64,
    default: usize,
) -> Result<usize, ModelError> {
    if file.get(&format!("{arch}.{suffix}")).is_none() {
        return Ok(default);
    }
    count(file, arch, suffix, max)
}

/// Checks the relations between the basic sizes every architecture shares.
pub(crate) fn check_shapes(file: &GgufFile, c: &ModelConfig) -> Result<(), ModelError> {
    if c.head_dim == 0 {
        return Err(ModelError::bad(
            file.path(),
            format!(
                "head size is 0 (embedding_length {} over head_count {})",
                c.n_embd, c.n_heads
            ),
        ));
    }
    if c.n_heads % c.n_kv_heads != 0 {
        return Err(ModelError::bad(
            file.path(),
            format!(
                "head_count {} is not a multiple of head_count_kv {}",
                c.n_heads, c.n_kv_heads
            ),
        ));
    }
    if c.rope_dim > c.head_dim || c.rope_dim % 2 != 0 {
        return Err(ModelError::bad(
            file.path(),
            format!(
                "rope dimension {} must be even and at most the head size {}",
                c.rope_dim, c.head_dim
            ),
        ));
    }
    if !(c.rms_eps.is_finite() && c.rms_eps >= 0.0) {
        return Err(ModelError::bad(
            file.path(),
            format!(
                "layer_norm_rms_epsilon {} is not a finite non-negative number",
                c.rms_eps
            ),
        ));
    }
    for (i, l) in c.layers.iter().enumerate() {
        if !(l.rope_base.is_finite() && l.rope_base > 0.0) {
            return Err(ModelError::bad(
                file.path(),
                format!("layer {i}: rope base {} must be positive", l.rope_base),
            ));
        }
    }
    Ok(())
}

/// Vocabulary size: `{arch}.vocab_size` when present, else the token list's length, else the
/// embedding matrix's row count.
pub(crate) fn vocab_size(file: &GgufFile, arch: &str) -> Result<usize, ModelError> {
    if let Some(v) = file.get_u64(&format!("{arch}.vocab_size"))? {
        return Ok(v as usize);
    }
    if let Some(tokens) = file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        return Ok(tokens.len());
    }
    let embd = file.require_tensor("token_embd.weight")?;
    Ok(embd.dims.get(1).copied().unwrap_or(0) as usize)
}
