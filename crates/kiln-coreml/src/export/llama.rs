//! The Llama family (SmolLM2, Llama 2/3, Mistral, Qwen 2 without its extras): what the
//! exporter requires of it. The program itself is [`super::decoder`]'s; GGUF files whose
//! converter interleaved the rotary pairs of q and k are reordered there to split halves.

use super::decoder::check_common;
use super::{ExportError, ExportOptions};
use kiln_runtime::config::{Activation, ModelConfig};

/// Refuses Llama-family configurations the exporter does not build, naming the feature.
pub fn check(c: &ModelConfig, opts: &ExportOptions) -> Result<(), ExportError> {
    let unsupported = |what: &str| {
        Err(ExportError::Unsupported(format!(
            "{} model: {what} is not supported by the Core ML exporter yet",
            c.architecture
        )))
    };
    if c.activation != Activation::Silu {
        return unsupported("a feed-forward activation other than SiLU");
    }
    if c.qk_norm {
        return unsupported("per-head q/k RMSNorm");
    }
    if c.post_norms {
        return unsupported("post-attention / post-feed-forward norms");
    }
    if c.embedding_scale.is_some() {
        return unsupported("an embedding scale");
    }
    if c.final_logit_softcap.is_some() {
        return unsupported("logit soft-capping");
    }
    if c.layers.iter().any(|l| l.sliding_window.is_some()) {
        return unsupported("sliding-window attention");
    }
    check_common(c, opts)
}
