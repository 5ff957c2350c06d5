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

/// Sums of squared inputs per input channel, per weight matrix (by GGUF tensor name), and
/// optionally the full second moment of every distinct input.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputStats {
    /// Per matrix: rows of input seen and the per-channel sums of squares.
    sums: BTreeMap<String, (u64, Vec<f64>)>,
    /// With [`InputStats::with_second_moments`].
    moments: Option<SecondMoments>,
}

/// Sums of `x xᵀ` per distinct input: matrices that read the same input (query, key and value;
/// gate and up) share one.
#[derive(Clone, Debug, Default, PartialEq)]
struct SecondMoments {
    /// Per distinct input: rows seen, width, and the upper triangle of `Σ x xᵀ`, packed by
    /// rows ([`packed_row`]).
    inputs: Vec<(u64, usize, Vec<f32>)>,
    /// Matrix name to its input's index.
    of_matrix: BTreeMap<String, usize>,
    /// The last input added and its index, to recognise the next matrix reading it.
    last: Option<(Vec<f32>, usize)>,
}

impl SecondMoments {
    fn add(&mut self, name: &str, x: &[f32], width: usize) {
        if let Some((last, index)) = &self.last {
            if last.as_slice() == x {
                self.of_matrix.entry(name.to_string()).or_insert(*index);
                return;
            }
        }
        let index = *self.of_matrix.entry(name.to_string()).or_insert_with(|| {
            self.inputs
                .push((0, width, vec![0.0; width * (width + 1) / 2]));
            self.inputs.len() - 1
        });
        let (rows, w, sums) = &mut self.inputs[index];
        debug_assert_eq!(*w, width, "{name}: input width changed");
        let t = x.len() / width;
        *rows += t as u64;
        add_gram(x, t, width, sums);
        self.last = Some((x.to_vec(), index));
    }
}

/// Where row `i` of an `n × n` upper triangle starts when packed by rows (its entry `(i, j)`,
/// `j >= i`, is `j − i` further).
fn packed_row(i: usize, n: usize) -> usize {
    i * (2 * n + 1 - i) / 2
}

/// Adds the upper triangle of `Xᵀ X` (`x`: `t` rows of `n`) to `sums` (packed by rows), with
/// the f32 panel kernel: channels play the kernel's tokens and positions its inner dimension.
fn add_gram(x: &[f32], t: usize, n: usize, sums: &mut [f32]) {
    use kiln_kernels::gemm::{gemm_panel, PANEL_ROWS};
    let mut xt = vec![0.0f32; n * t];
    for (p, row) in x.chunks_exact(n).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            xt[c * t + p] = v;
        }
    }
    let mut panel = vec![0.0f32; t * PANEL_ROWS];
    let mut block = vec![0.0f32; n * PANEL_ROWS];
    for j0 in (0..n).step_by(PANEL_ROWS) {
        let cols = PANEL_ROWS.min(n - j0);
        for (p, row) in x.chunks_exact(n).enumerate() {
            panel[p * PANEL_ROWS..p * PANEL_ROWS + cols].copy_from_slice(&row[j0..j0 + cols]);
        }
        // Rows up to the block's last column: the upper triangle's part of these columns.
        let upto = j0 + cols;
        gemm_panel(&panel, t, cols, &xt, upto, &mut block, PANEL_ROWS);
        for i in 0..upto {
            let from = i.saturating_sub(j0);
            let row = packed_row(i, n) + j0 - i;
            for r in from..cols {
                sums[row + r] += block[i * PANEL_ROWS + r];
            }
        }
    }
}

impl InputStats {
    /// No observations.
    pub fn new() -> Self {
        InputStats::default()
    }

    /// No observations; also gathers each input's full second moment `E[x xᵀ]`
    /// ([`InputStats::second_moment`]), for error feedback. That costs `n(n+1)/2` floats per
    /// distinct input of width `n`.
    pub fn with_second_moments() -> Self {
        InputStats {
            sums: BTreeMap::new(),
            moments: Some(SecondMoments::default()),
        }
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
        if let Some(m) = &mut self.moments {
            m.add(name, x, width);
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

    /// Which distinct input matrix `name` reads (matrices reading the same input share the
    /// index), when second moments are gathered and `name` was observed.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.moments.as_ref()?.of_matrix.get(name).copied()
    }

    /// `E[x xᵀ]` over the observed inputs of `name` (row-major, symmetric, width × width),
    /// when gathered ([`InputStats::with_second_moments`]) and `name` was observed.
    pub fn second_moment(&self, name: &str) -> Option<Vec<f32>> {
        let m = self.moments.as_ref()?;
        let &(rows, n, ref sums) = m.inputs.get(*m.of_matrix.get(name)?)?;
        if rows == 0 {
            return None;
        }
        let scale = 1.0 / rows as f64;
        let mut out = vec![0.0f32; n * n];
        for i in 0..n {
            let row = packed_row(i, n);
            for j in i..n {
                let v = (f64::from(sums[row + j - i]) * scale) as f32;
                out[i * n + j] = v;
                out[j * n + i] = v;
            }
        }
        Some(out)
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
    collect_into(model, pool, chunks, &mut stats)?;
    Ok(stats)
}

/// [`collect`] into `stats` (e.g. [`InputStats::with_second_moments`]).
pub fn collect_into(
    model: &Model,
    pool: &ThreadPool,
    chunks: &[Vec<u32>],
    stats: &mut InputStats,
) -> Result<(), ModelError> {
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
            Some(stats),
        )?;
    }
    Ok(())
}

/// Positions per calibration chunk: each chunk starts from an empty context, as perplexity's
/// chunks do (256 positions there too), so the statistics cover early and late positions alike.
pub const CHUNK_TOKENS: usize = 256;

/// Text tokens read from a calibration text by default, at most (the rest is ignored). The
/// per-channel means settle quickly (on SmolLM2, 763 tokens of one text and 2048 or 4096 of
/// another give plain weighted tables within about 2 % of each other in perplexity,
/// `docs/quantization.md`); error feedback, which uses the full second moments, gains from
/// more. The reference forward pass costs about 5 ms per token on SmolLM2.
pub const DEFAULT_TOKENS: usize = 2048;

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
