//! Text generation: batched prefill, then token-by-token decode with sampling, stop tokens,
//! stop strings and a streaming callback that only ever sees whole UTF-8 characters.

use crate::error::ModelError;
use crate::sampling::{Sampler, SamplerConfig};
use crate::session::{Logits, Session};
use kiln_tokenizer::{StreamDecoder, Tokenizer};
use std::time::Instant;

/// What to generate and when to stop.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// The sampling chain.
    pub sampler: SamplerConfig,
    /// Tokens that end generation (EOS, end-of-turn); ignored with `ignore_eos`.
    pub stop_ids: Vec<u32>,
    /// Strings that end generation; the text is cut before the first one found.
    pub stop_strings: Vec<String>,
    /// Keep going past stop tokens (benchmarks, reference comparisons).
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// The token limit.
    Length,
}

impl FinishReason {
    /// The name used in JSON output (OpenAI's vocabulary).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Wall-clock figures of one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens processed in the prefill pass.
    pub prefill_tokens: usize,
    /// Prefill time in milliseconds.
    pub prefill_ms: f64,
    /// Tokens produced by decode steps (the first generated token comes from the prefill).
    pub decode_tokens: usize,
    /// Decode time in milliseconds.
    pub decode_ms: f64,
    /// Time from the start of the prefill to the first generated token, in milliseconds.
    pub ttft_ms: f64,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_ms)
    }

    /// Generated tokens per second over the decode steps.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_ms)
    }
}

fn rate(tokens: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        tokens as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The prompt as token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids (a stop token that ended generation is included).
    pub token_ids: Vec<u32>,
    /// Generated text, without the stop string or stop token that ended it.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Wall-clock figures.
    pub timings: Timings,
}

/// What generation drives: a model that takes token ids a batch at a time, keeps the
/// positions it has seen (a key/value cache, or a Core ML package's states), and returns the
/// logits after the last token. kiln's CPU [`Session`] is one; a Core ML package run by
/// `kiln-coreml` is another, so sampling, stop conditions and streaming exist once.
pub trait TokenModel {
    /// Positions processed so far.
    fn n_past(&self) -> usize;
    /// Positions the model can hold.
    fn n_ctx(&self) -> usize;
    /// Runs `tokens` after the positions already processed and returns the logits after the
    /// last of them (one value per vocabulary entry).
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError>;
    /// Forgets every position.
    fn reset(&mut self);
}

impl TokenModel for Session<'_> {
    fn n_past(&self) -> usize {
        Session::n_past(self)
    }

    fn n_ctx(&self) -> usize {
        Session::n_ctx(self)
    }

    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.forward(tokens, Logits::Last)
    }

    fn reset(&mut self) {
        Session::reset(self)
    }
}

/// Generates a continuation of `prompt` in `session` (which must be empty or hold a prefix
/// the caller wants kept), calling `on_text` with each piece of new text as it becomes final.
pub fn generate<M: TokenModel + ?Sized>(
    session: &mut M,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Request(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    let needed = session.n_past() + prompt.len() + options.max_tokens;
    if needed > session.n_ctx() {
        return Err(ModelError::Request(format!(
            "the prompt ({} tokens) plus {} tokens to generate need {} positions, but the context holds {}",
            prompt.len(),
            options.max_tokens,
            needed,
            session.n_ctx()
        )));
    }
    let mut sampler = Sampler::new(options.sampler.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    // A continuation keeps its leading space (SentencePiece vocabularies with a space prefix).
    let mut decoder = StreamDecoder::continuation(tokenizer, true);
    let mut stops = StopMatcher::new(&options.stop_strings);
    let mut timings = Timings {
        prefill_tokens: prompt.len(),
        ..Timings::default()
    };
    let mut generated = Vec::new();
    let mut finish = FinishReason::Length;

    let start = Instant::now();
    let mut logits = session.forward_last(prompt)?;
    timings.prefill_ms = ms_since(start);
    let decode_start = Instant::now();
    let mut steps = 0usize;
    while generated.len() < options.max_tokens {
        let token = sampler.sample(&mut logits, &history);
        if generated.is_empty() {
            timings.ttft_ms = ms_since(start);
        }
        generated.push(token);
        history.push(token);
        if !options.ignore_eos && options.stop_ids.contains(&token) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = decoder.push(token);
        if stops.push(&piece, &mut on_text) {
            finish = FinishReason::Stop;
            break;
        }
        if generated.len() == options.max_tokens {
            break;
        }
        logits = session.forward_last(&[token])?;
        steps += 1;
    }
    timings.decode_tokens = steps;
    timings.decode_ms = if steps > 0 {
        ms_since(decode_start)
    } else {
        0.0
    };
    if finish == FinishReason::Length {
        let tail = decoder.finish();
        if !stops.push(&tail, &mut on_text) {
            stops.flush(&mut on_text);
        } else {
            finish = FinishReason::Stop;
        }
    }
    Ok(Generation {
        prompt_token_ids: prompt.to_vec(),
        token_ids: generated,
        text: stops.into_text(),
        finish_reason: finish,
        timings,
    })
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Streams text while watching for stop strings: text that could still turn out to be the
/// start of a stop string is held back until it is known not to be.
pub struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl<'a> StopMatcher<'a> {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &'a [String]) -> StopMatcher<'a> {
        StopMatcher {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds `piece`; emits what is final. Returns true when a stop string was found (the text
    /// is then cut before it and everything before it has been emitted).
    pub fn push(&mut self, piece: &str, emit: &mut impl FnMut(&str)) -> bool {
        self.text.push_str(piece);
        // A stop string may straddle the previous piece: search from just before new text.
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut search_from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(cut) = found {
            self.text.truncate(cut);
            self.flush(emit);
            return true;
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in self.stops.iter().filter(|s| !s.is_empty()) {
            for (k, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..k]) {
                    hold = hold.max(k);
                }
            }
        }
        let safe = self.text.len() - hold;
        if safe > self.emitted {
            emit(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        false
    }

    /// Emits everything held back.
    pub fn flush(&mut self, emit: &mut impl FnMut(&str)) {
        if self.text.len() > self.emitted {
            emit(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }

    /// The whole text so far.
    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut stopped = false;
        for p in pieces {
            if m.push(p, &mut |s| out.push_str(s)) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            m.flush(&mut |s| out.push_str(s));
        }
        (out, m.into_text(), stopped)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut() {
        let (out, text, stopped) = run(&["\nUser:"], &["Hello", " there\nUs", "er: hi"]);
        assert!(stopped);
        assert_eq!(out, "Hello there");
        assert_eq!(text, "Hello there");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        let stops = vec!["STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        assert!(!m.push("abcST", &mut |s| out.push_str(s)));
        assert_eq!(out, "abc");
        assert!(!m.push("x", &mut |s| out.push_str(s)));
        assert_eq!(out, "abcSTx");
    }

    #[test]
    fn no_stops_streams_everything() {
        let (out, text, stopped) = run(&[], &["a", "é", "漢"]);
        assert!(!stopped);
        assert_eq!(out, "aé漢");
        assert_eq!(text, out);
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, _, stopped) = run(&["world", "lo"], &["hello world"]);
        assert!(stopped);
        assert_eq!(out, "hel");
    }
}
