//! Perplexity over a token stream, chunk by chunk.
//!
//! The method matches the reference files': the text is tokenized once without special tokens
//! and cut into consecutive chunks; for models that add BOS, each chunk holds `ctx - 1` text
//! tokens after a BOS, otherwise `ctx` text tokens; every text token of a chunk after its first
//! is scored given the chunk's prefix; PPL = exp(mean NLL). A shorter final chunk is scored too.

use crate::error::ModelError;
use crate::kernels::Precision;
use crate::model::Model;
use crate::pool::ThreadPool;
use crate::session::Session;
use crate::validate::LogitsModel;

/// The outcome of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Text tokens in the input.
    pub n_tokens: usize,
    /// Tokens that were scored.
    pub scored_tokens: usize,
    /// Chunks evaluated.
    pub n_chunks: usize,
    /// Sum of negative log-likelihoods (natural log).
    pub nll_sum: f64,
}

/// Computes the perplexity of `tokens` in chunks of `ctx` positions, prepending `bos` to each
/// chunk when given.
pub fn perplexity(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    precision: Precision,
) -> Result<Perplexity, ModelError> {
    // Checked before the session allocates its cache.
    check_ctx(ctx, model.config.context_length)?;
    let mut session = Session::new(model, pool, ctx);
    session.set_precision(precision);
    perplexity_of(&mut session, tokens, ctx, bos)
}

/// [`perplexity`] of any [`LogitsModel`] (which must hold `ctx` positions).
pub fn perplexity_of(
    model: &mut dyn LogitsModel,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
) -> Result<Perplexity, ModelError> {
    let text_per_chunk = ctx.saturating_sub(usize::from(bos.is_some()));
    if text_per_chunk < 2 {
        return Err(ModelError::Request(format!(
            "--ctx {ctx} is too small: a chunk must hold at least two text tokens"
        )));
    }
    check_ctx(ctx, model.context_length())?;
    if tokens.len() < 2 {
        return Err(ModelError::Request(
            "the text is too short: it must tokenize to at least two tokens".into(),
        ));
    }
    let vocab = model.vocab_size();
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    let mut n_chunks = 0usize;
    let mut input = Vec::with_capacity(ctx);
    for chunk in tokens.chunks(text_per_chunk) {
        n_chunks += 1;
        if chunk.len() < 2 {
            continue;
        }
        input.clear();
        input.extend(bos);
        input.extend_from_slice(chunk);
        model.reset();
        let logits = model.forward(&input)?;
        let offset = usize::from(bos.is_some());
        // Logits row r predicts input[r + 1]; text token i of the chunk sits at offset + i.
        for i in 1..chunk.len() {
            let row = &logits[(offset + i - 1) * vocab..(offset + i) * vocab];
            nll_sum += negative_log_likelihood(row, chunk[i] as usize);
            scored += 1;
        }
    }
    Ok(Perplexity {
        ppl: (nll_sum / scored as f64).exp(),
        n_tokens: tokens.len(),
        scored_tokens: scored,
        n_chunks,
        nll_sum,
    })
}

fn check_ctx(ctx: usize, context_length: usize) -> Result<(), ModelError> {
    if ctx > context_length {
        return Err(ModelError::Request(format!(
            "--ctx {ctx} exceeds the model's context length {context_length}"
        )));
    }
    Ok(())
}

/// `-log softmax(row)[target]`, computed in f64.
pub fn negative_log_likelihood(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_row_is_log_vocab() {
        let row = vec![0.5f32; 1000];
        assert!((negative_log_likelihood(&row, 7) - (1000f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn nll_known_value() {
        let row = [1.0f32, 2.0, 3.0];
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((negative_log_likelihood(&row, 0) - (lse - 1.0)).abs() < 1e-9);
    }
}
