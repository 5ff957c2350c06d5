//! Parity of a converted model with its source: the quality gate a package passes before it
//! ships (`kiln validate`).
//!
//! Per prompt, both models read the prompt; their logits after its last token are compared
//! (cosine, KL divergence of the candidate from the source, top-1 agreement), then the
//! source's greedy continuation of N tokens is fed to both, one token at a time, and every
//! step's logits are compared the same way (teacher forcing: the candidate never drifts onto
//! its own path, so each step measures the same question). Perplexity on a text completes
//! the picture. Both models run through [`LogitsModel`], so an executor other than the CPU
//! runtime (Core ML) plugs in without changing any of this.

use crate::error::ModelError;
use crate::session::{Logits, Session};
use serde::Serialize;

/// A model that turns token ids into logits, keeping its context between calls.
pub trait LogitsModel {
    /// Width of a logits row.
    fn vocab_size(&self) -> usize;
    /// Positions the model can hold.
    fn context_length(&self) -> usize;
    /// Forgets every position.
    fn reset(&mut self);
    /// Appends `ids` to the context and returns the logits of every fed position, row-major
    /// `[ids.len(), vocab_size]`.
    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError>;
}

impl LogitsModel for Session<'_> {
    fn vocab_size(&self) -> usize {
        self.model().config.vocab_size
    }

    fn context_length(&self) -> usize {
        self.n_ctx()
    }

    fn reset(&mut self) {
        Session::reset(self);
    }

    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        Session::forward(self, ids, Logits::All)
    }
}

/// Prompts used when none are given: prose, code, a fact and a story, short enough to keep
/// a validation run to seconds.
pub const DEFAULT_PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
];

/// Default of `--min-cosine`: every compared logits row at least this close to the source's.
pub const DEFAULT_MIN_COSINE: f64 = 0.99;
/// Default of `--max-ppl-increase`, in percent.
pub const DEFAULT_MAX_PPL_INCREASE_PCT: f64 = 5.0;
/// Default teacher-forced continuation, in tokens.
pub const DEFAULT_CONTINUATION: usize = 16;

/// Cosine similarity in f64; 0 when either vector is all zeros, NaN when a value is not
/// finite.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if !(dot.is_finite() && na.is_finite() && nb.is_finite()) {
        return f64::NAN;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    // sqrt(na * nb) rather than sqrt(na) * sqrt(nb): identical vectors then give exactly 1.
    dot / (na * nb).sqrt()
}

/// `log softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| f64::from(v) - lse).collect()
}

/// KL(p‖q) of the softmax distributions of two logits rows, in nats, computed in f64.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| {
            if a > f64::NEG_INFINITY {
                a.exp() * (a - b)
            } else {
                0.0
            }
        })
        .sum()
}

/// Index of the largest value (the first of equals).
pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// The comparison of one pair of logits rows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RowMetrics {
    /// Cosine similarity of the logits.
    pub cosine: f64,
    /// KL(source‖candidate) of their softmax, nats.
    pub kl: f64,
    /// Whether both put the same token first.
    pub top1_agrees: bool,
}

impl RowMetrics {
    /// Compares a source row with a candidate row.
    pub fn of(source: &[f32], candidate: &[f32]) -> RowMetrics {
        RowMetrics {
            cosine: cosine(source, candidate),
            kl: kl_divergence(source, candidate),
            top1_agrees: argmax(source) == argmax(candidate),
        }
    }
}

/// One prompt's comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptResult {
    /// The prompt text.
    pub text: String,
    /// Its tokens.
    pub n_tokens: usize,
    /// The row after the prompt's last token.
    pub last: RowMetrics,
    /// The source's greedy continuation fed to both.
    pub continuation: Vec<u32>,
    /// Every compared row: the prompt's last, then one per continuation token.
    pub steps: Vec<RowMetrics>,
    /// Lowest cosine over the steps.
    pub min_cosine: f64,
    /// The step it occurs at (0: the prompt's last token).
    pub min_cosine_step: usize,
    /// Mean KL over the steps.
    pub mean_kl: f64,
    /// Largest KL over the steps.
    pub max_kl: f64,
    /// Steps whose top-1 tokens agree.
    pub top1_agreements: usize,
}

impl PromptResult {
    /// Fraction of steps whose top-1 tokens agree.
    pub fn top1_rate(&self) -> f64 {
        self.top1_agreements as f64 / self.steps.len().max(1) as f64
    }
}

/// Compares `candidate` with `source` on one prompt (token ids) and a teacher-forced greedy
/// continuation of `continuation` tokens. Both models are reset first.
pub fn compare_prompt(
    source: &mut dyn LogitsModel,
    candidate: &mut dyn LogitsModel,
    text: &str,
    ids: &[u32],
    continuation: usize,
) -> Result<PromptResult, ModelError> {
    let vocab = source.vocab_size();
    if candidate.vocab_size() != vocab {
        return Err(ModelError::Request(format!(
            "the candidate's vocabulary has {} tokens, the source's {vocab}: their logits \
             cannot be compared",
            candidate.vocab_size()
        )));
    }
    if ids.is_empty() {
        return Err(ModelError::Request(format!(
            "prompt {text:?} has no tokens"
        )));
    }
    source.reset();
    candidate.reset();
    let last_row = |logits: Vec<f32>| logits[logits.len() - vocab..].to_vec();
    let mut s = last_row(source.forward(ids)?);
    let mut c = last_row(candidate.forward(ids)?);
    let mut steps = vec![RowMetrics::of(&s, &c)];
    let mut fed = Vec::with_capacity(continuation);
    for _ in 0..continuation {
        let next = argmax(&s) as u32;
        fed.push(next);
        s = last_row(source.forward(&[next])?);
        c = last_row(candidate.forward(&[next])?);
        steps.push(RowMetrics::of(&s, &c));
    }
    let (min_cosine_step, min_cosine) = steps
        .iter()
        .map(|m| m.cosine)
        .enumerate()
        // A NaN cosine (non-finite logits) is the worst of all.
        .fold((0, f64::INFINITY), |(bi, b), (i, v)| {
            if !b.is_nan() && (v.is_nan() || v < b) {
                (i, v)
            } else {
                (bi, b)
            }
        });
    let mean_kl = steps.iter().map(|m| m.kl).sum::<f64>() / steps.len() as f64;
    let max_kl = steps.iter().map(|m| m.kl).fold(0.0, f64::max);
    Ok(PromptResult {
        text: text.to_string(),
        n_tokens: ids.len(),
        last: steps[0],
        continuation: fed,
        top1_agreements: steps.iter().filter(|m| m.top1_agrees).count(),
        min_cosine,
        min_cosine_step,
        mean_kl,
        max_kl,
        steps,
    })
}

/// Perplexity of both models on the same text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerplexityComparison {
    /// The source's perplexity.
    pub source: f64,
    /// The candidate's.
    pub candidate: f64,
    /// `(candidate / source - 1) * 100`.
    pub increase_pct: f64,
    /// Tokens scored.
    pub scored_tokens: usize,
}

/// The thresholds a candidate must meet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Thresholds {
    /// Every compared row's cosine at least this.
    pub min_cosine: f64,
    /// Perplexity increase at most this, in percent (when perplexity is measured).
    pub max_ppl_increase_pct: f64,
    /// Every compared row's KL at most this, when set.
    pub max_kl: Option<f64>,
    /// Each prompt's top-1 agreement rate at least this, when set.
    pub min_top1_rate: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_cosine: DEFAULT_MIN_COSINE,
            max_ppl_increase_pct: DEFAULT_MAX_PPL_INCREASE_PCT,
            max_kl: None,
            min_top1_rate: None,
        }
    }
}

fn short(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// Every threshold the results miss, one sentence each naming the prompt (1-based), the
/// metric and the figures; empty when the candidate passes.
pub fn judge(
    prompts: &[PromptResult],
    perplexity: Option<&PerplexityComparison>,
    t: &Thresholds,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let which = format!("prompt {} {}", i + 1, short(&p.text));
        // NaN figures (non-finite logits) fail every bar.
        if p.min_cosine.is_nan() || p.min_cosine < t.min_cosine {
            failures.push(format!(
                "{which}: logits cosine {:.6} at step {} < --min-cosine {}",
                p.min_cosine, p.min_cosine_step, t.min_cosine
            ));
        }
        if let Some(max_kl) = t.max_kl {
            if p.max_kl.is_nan() || p.max_kl > max_kl {
                failures.push(format!(
                    "{which}: KL divergence {:.6} > --max-kl {max_kl}",
                    p.max_kl
                ));
            }
        }
        if let Some(min) = t.min_top1_rate {
            if p.top1_rate() < min {
                failures.push(format!(
                    "{which}: top-1 agreement {}/{} < --min-top1 {min}",
                    p.top1_agreements,
                    p.steps.len()
                ));
            }
        }
    }
    if let Some(ppl) = perplexity {
        if ppl.increase_pct.is_nan() || ppl.increase_pct > t.max_ppl_increase_pct {
            failures.push(format!(
                "perplexity {:.4} vs source {:.4}: +{:.2} % > --max-ppl-increase {} %",
                ppl.candidate, ppl.source, ppl.increase_pct, t.max_ppl_increase_pct
            ));
        }
    }
    failures
}

/// Reads a prompts file: a JSON list of strings when it starts with `[`, otherwise one prompt
/// per line (blank lines skipped). Errors say what was expected.
pub fn parse_prompts(text: &str) -> Result<Vec<String>, String> {
    let prompts: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| format!("expected a JSON list of strings: {e}"))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    if prompts.is_empty() {
        return Err("no prompts (one per line, or a JSON list of strings)".into());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(format!("prompt {} is empty", i + 1));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose logits are a fixed function of the last token and the position, with an
    /// optional perturbation: enough to check the bookkeeping of teacher forcing.
    struct Toy {
        pos: usize,
        noise: f32,
    }

    impl LogitsModel for Toy {
        fn vocab_size(&self) -> usize {
            8
        }
        fn context_length(&self) -> usize {
            64
        }
        fn reset(&mut self) {
            self.pos = 0;
        }
        fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
            let mut out = Vec::new();
            for &id in ids {
                self.pos += 1;
                for v in 0..8u32 {
                    let hit = (id + 1 + self.pos as u32) % 8 == v;
                    let noise = if v == 3 { self.noise } else { 0.0 };
                    out.push(if hit { 5.0 } else { v as f32 * 0.1 } + noise);
                }
            }
            Ok(out)
        }
    }

    #[test]
    fn identical_models_agree_exactly() {
        let (mut a, mut b) = (Toy { pos: 0, noise: 0.0 }, Toy { pos: 0, noise: 0.0 });
        let r = compare_prompt(&mut a, &mut b, "x", &[1, 2, 3], 5).unwrap();
        assert_eq!(r.steps.len(), 6);
        assert_eq!(r.continuation.len(), 5);
        assert_eq!(r.min_cosine, 1.0);
        assert_eq!(r.mean_kl, 0.0);
        assert_eq!(r.top1_agreements, 6);
        assert!(judge(&[r], None, &Thresholds::default()).is_empty());
    }

    #[test]
    fn a_perturbed_candidate_is_measured_and_judged() {
        let (mut a, mut b) = (Toy { pos: 0, noise: 0.0 }, Toy { pos: 0, noise: 6.0 });
        let r = compare_prompt(&mut a, &mut b, "x", &[1], 3).unwrap();
        // Token 3 now wins everywhere except where the source's winner is 3 too.
        assert!(r.top1_agreements < r.steps.len());
        assert!(r.min_cosine < 0.9 && r.mean_kl > 0.1, "{r:?}");
        let failures = judge(&[r], None, &Thresholds::default());
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("prompt 1") && failures[0].contains("--min-cosine"));
    }

    #[test]
    fn kl_and_cosine_known_values() {
        // p = softmax(0, ln 3) = (1/4, 3/4), q = uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
        let kl = kl_divergence(&[0.0, 3f32.ln()], &[1.0, 1.0]);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
        assert!(cosine(&[f32::INFINITY], &[1.0]).is_nan());
    }

    #[test]
    fn perplexity_threshold_and_nan_fail() {
        let ppl = PerplexityComparison {
            source: 10.0,
            candidate: 11.0,
            increase_pct: 10.0,
            scored_tokens: 100,
        };
        let f = judge(&[], Some(&ppl), &Thresholds::default());
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("+10.00 %"), "{f:?}");
        let nan = PromptResult {
            text: "p".into(),
            n_tokens: 1,
            last: RowMetrics {
                cosine: f64::NAN,
                kl: f64::NAN,
                top1_agrees: false,
            },
            continuation: vec![],
            steps: vec![],
            min_cosine: f64::NAN,
            min_cosine_step: 0,
            mean_kl: f64::NAN,
            max_kl: f64::NAN,
            top1_agreements: 0,
        };
        assert_eq!(judge(&[nan], None, &Thresholds::default()).len(), 1);
    }

    #[test]
    fn prompts_files() {
        assert_eq!(parse_prompts("a\n\n b \n").unwrap(), vec!["a", " b "]);
        assert_eq!(
            parse_prompts(r#"["one\ntwo", "three"]"#).unwrap(),
            vec!["one\ntwo", "three"]
        );
        assert!(parse_prompts("\n \n").is_err());
        assert!(parse_prompts("[1, 2]").is_err());
        assert!(parse_prompts(r#"["ok", ""]"#)
            .unwrap_err()
            .contains("prompt 2"));
    }
}
