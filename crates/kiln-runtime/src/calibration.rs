//! Calibration statistics: how strongly a text drives each input channel of every weight
//! matrix, for quantizers that weight a weight's error by the size of what it multiplies.
//!
//! The error a matrix product `y = W x` takes from quantizing `W` is `ΔW x`; summed over
//! many inputs its expected square is `Σ_j ΔW_ij² · E[x_j²]` when the channels are
//! uncorrelated, so the mean of `x_j²` over calibration tokens is the weight of column `j`'s
//! error (llama.cpp's importance matrix measures the same quantity). The statistics come from
//! the reference forward pass of [`crate::fp16`] in f32, which materialises every matrix
//! product's input.

use crate::error::ModelError;
use crate::fp16::{forward_observed, GraphFix, RangeReport, Rounding};
use crate::model::Model;
use crate::pool::ThreadPool;
use std::collections::BTreeMap;

/// The name the output projection's inputs are recorded under (also when it is the tied
/// embedding matrix).
pub const OUTPUT_WEIGHT: &str = "output.weight";

/// Sums of squared inputs per input channel, per weight matrix (by GGUF tensor name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputStats {
    /// Per matrix: rows of input seen and the per-channel sums of squares.
    sums: BTreeMap<String, (u64, Vec<f64>)>,
}

impl InputStats {
    /// No observations.
    pub fn new() -> Self {
        InputStats::default()
    }

    /// Adds the rows of `x` (each `width` values: the matrix's input channels) as inputs of
    /// the matrix `name`.
    pub(crate) fn add(&mut self, name: &str, x: &[f32], width: usize) {
        let entry = self
            .sums
            .entry(name.to_string())
            .or_insert_with(|| (0, vec![0.0; width]));
        debug_assert_eq!(entry.1.len(), width, "{name}: input width changed");
        for row in x.chunks_exact(width) {
            for (s, &v) in entry.1.iter_mut().zip(row) {
                *s += f64::from(v) * f64::from(v);
            }
            entry.0 += 1;
        }
    }

    /// The matrices observed, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sums.keys().map(String::as_str)
    }

    /// Input rows (tokens) the matrix `name` was observed on.
    pub fn rows(&self, name: &str) -> u64 {
        self.sums.get(name).map_or(0, |e| e.0)
    }

    /// The mean of `x_j²` over the observed inputs of `name`, per input channel `j`; `None`
    /// when `name` was not observed.
    pub fn importance(&self, name: &str) -> Option<Vec<f32>> {
        let (n, sums) = self.sums.get(name)?;
        if *n == 0 {
            return None;
        }
        Some(sums.iter().map(|&s| (s / *n as f64) as f32).collect())
    }
}

/// Runs each chunk of token ids through `model` from an empty context (f32, the reference
/// forward pass) and returns the inputs' statistics of every matrix product: the query, key,
/// value, attention output, gate, up and down projections of every block, and the output
/// projection ([`OUTPUT_WEIGHT`]).
pub fn collect(
    model: &Model,
    pool: &ThreadPool,
    chunks: &[Vec<u32>],
) -> Result<InputStats, ModelError> {
    let mut stats = InputStats::new();
    let graph = GraphFix::default();
    let mut report = RangeReport::default();
    for chunk in chunks {
        forward_observed(
            model,
            pool,
            chunk,
            Rounding::None,
            &graph,
            &mut report,
            Some(&mut stats),
        )?;
    }
    Ok(stats)
}

/// Positions per calibration chunk: each chunk starts from an empty context, as perplexity's
/// chunks do (256 positions there too), so the statistics cover early and late positions alike.
pub const CHUNK_TOKENS: usize = 256;

/// Text tokens read from a calibration text at most (the rest is ignored). The per-channel
/// means settle quickly: on SmolLM2, 763 tokens of one text and 2048 or 4096 of another give
/// tables within about 2 % of each other in perplexity (`docs/quantization.md`), while the
/// reference forward pass costs about 5 ms per token there.
pub const MAX_TOKENS: usize = 2048;

/// Tokenizes `text` (without special tokens) and cuts its first `max_tokens` tokens into
/// chunks of at most `chunk` positions, each starting with BOS when the tokenizer adds one.
pub fn chunks(
    tokenizer: &kiln_tokenizer::Tokenizer,
    text: &str,
    max_tokens: usize,
    chunk: usize,
) -> Result<Vec<Vec<u32>>, kiln_tokenizer::TokenizerError> {
    let mut ids = tokenizer.encode(text, false, false)?;
    ids.truncate(max_tokens);
    let bos = if tokenizer.add_bos() {
        tokenizer.bos_id()
    } else {
        None
    };
    let per_chunk = chunk.saturating_sub(usize::from(bos.is_some())).max(1);
    Ok(ids
        .chunks(per_chunk)
        .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
        .collect())
}
