//! Gemma 3: what the exporter requires of it. The program is [`super::decoder`]'s, driven by
//! the model description kiln's runtime uses: embeddings scaled by sqrt(hidden), RMSNorm
//! weights with Gemma's `1 + w` already applied by the loader, RMSNorm over each q and k head,
//! norms after attention and after the feed-forward block, GeGLU with tanh GELU, local layers
//! with their own rotary base and a sliding window (hidden by a mask computed in the program
//! from the positions, only when the caches hold more positions than the window), and a final
//! logit soft-cap when the model has one. The 262144-token vocabulary makes the LM head split
//! mandatory for the Neural Engine: `--lm-head-split auto` cuts it into 16 pieces.

use super::decoder::check_common;
use super::{ExportError, ExportOptions};
use kiln_runtime::config::{Activation, ModelConfig};

/// Refuses Gemma 3 configurations the exporter does not build, naming the feature.
pub fn check(c: &ModelConfig, opts: &ExportOptions) -> Result<(), ExportError> {
    if c.activation != Activation::GeluTanh {
        return Err(ExportError::Unsupported(format!(
            "{} model: expected the tanh GELU of Gemma 3",
            c.architecture
        )));
    }
    check_common(c, opts)
}
