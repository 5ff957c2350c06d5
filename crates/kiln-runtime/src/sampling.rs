//! Token sampling.
//!
//! The chain follows llama.cpp's common default order, so that a given
//! configuration means what a llama.cpp user expects it to mean:
//!
//! 1. **penalties** — repeat (llama.cpp rule: a positive logit is divided by
//!    the penalty, any other multiplied by it, once per distinct token), then
//!    frequency (`count * frequency_penalty`) and presence
//!    (`presence_penalty` once) subtracted, all over the last
//!    `penalty_last_n` tokens of the history;
//! 2. **top-k** — keep the `top_k` largest logits;
//! 3. **top-p** — keep the shortest prefix, in descending order, whose
//!    probability mass reaches `top_p`;
//! 4. **min-p** — drop tokens whose probability is below `min_p` times the
//!    probability of the most likely token;
//! 5. **temperature** — divide the surviving logits by `temperature`;
//! 6. **draw** — sample from the softmax of what is left with a seeded PRNG.
//!
//! As in llama.cpp, top-p and min-p look at the distribution *before*
//! temperature (softmax of the penalised logits restricted to the top-k set):
//! temperature only reshapes the distribution over the tokens that survived.
//! A temperature `<= 0` (or NaN) selects greedy decoding: the argmax of the
//! penalised logits, with no filter and no random draw.
//!
//! Ordering among equal logits is fixed (lower token id first), so every
//! filter is deterministic, and the PRNG (xoshiro256** seeded through
//! SplitMix64) is pure integer arithmetic, so a seed yields the same tokens
//! on every platform.
//!
//! NaN logits are treated as `-inf`; `-inf` logits are never sampled unless
//! every logit is `-inf` or NaN, in which case the result is [`argmax`] of
//! the row. `+inf` logits are treated as the largest finite `f32`.

use std::cmp::Ordering;

/// Seed used by [`SamplerConfig::default`] so that default runs are
/// reproducible; set [`SamplerConfig::seed`] explicitly for varied output.
pub const DEFAULT_SEED: u64 = 0x6b69_6c6e_5eed_0001;

/// Parameters of the sampling chain; the defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` or NaN means greedy decoding.
    pub temperature: f32,
    /// Keep only this many highest logits; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus threshold in `(0, 1)`; `>= 1` or NaN disables it, `<= 0`
    /// keeps only the most likely token.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token; `<= 0` or NaN
    /// disables it, `>= 1` keeps only the most likely token(s).
    pub min_p: f32,
    /// Repetition penalty; `1.0` disables it.
    pub repeat_penalty: f32,
    /// Subtracted once per occurrence of a token in the penalty window.
    pub frequency_penalty: f32,
    /// Subtracted once from every token present in the penalty window.
    pub presence_penalty: f32,
    /// How many of the most recent history tokens the penalties consider;
    /// `0` disables all penalties.
    pub penalty_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95,
    /// min-p 0.05, penalties off with a 64-token window), seeded with
    /// [`DEFAULT_SEED`] rather than a random seed.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplerConfig {
    /// Plain greedy decoding: argmax of the raw logits, every filter and
    /// penalty off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 0,
            seed: DEFAULT_SEED,
        }
    }

    /// Whether [`Sampler::sample`] returns the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    fn penalties_active(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// Index of the largest value.
///
/// Ties go to the lowest index, and a NaN is never chosen over a number
/// (including `-inf`); if every value is NaN the result is `0`.
///
/// # Panics
///
/// Panics if `values` is empty.
pub fn argmax(values: &[f32]) -> usize {
    assert!(!values.is_empty(), "argmax of an empty slice");
    // Two passes beat one branchy pass: the maximum vectorises, and the first
    // match then gives the lowest index among ties (-0 == +0 included).
    // An all-NaN row matches nothing and falls back to 0.
    let max = lane_max(values);
    values.iter().position(|&v| v == max).unwrap_or(0)
}

/// Largest non-NaN value, `-inf` if there is none.
fn lane_max(values: &[f32]) -> f32 {
    // Independent lanes let the compiler vectorise. A comparison is false
    // for NaN, so NaN never enters a lane; it also compiles to a plain
    // compare-and-blend, unlike `f32::max`'s NaN handling.
    fn keep_larger(m: f32, x: f32) -> f32 {
        if x > m {
            x
        } else {
            m
        }
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = values.chunks_exact(lanes.len());
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = keep_larger(*lane, x);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| keep_larger(m, x))
}

/// Penalty windows up to this length get their scratch space at
/// construction; longer ones grow it on demand until the window is full.
const PREALLOCATED_WINDOW: usize = 4096;

/// How many of the best tokens the top-k-less top-p search tries first;
/// only a nucleus wider than that makes it gather every eligible token.
const INITIAL_NUCLEUS: usize = 1024;

/// Below this many undecided candidates the nucleus search sorts them.
const NUCLEUS_SORT: usize = 64;

/// Tokens per block that [`gather`] screens with a single test.
const GATHER_CHUNK: usize = 32;

/// Draws a seeded sequence of tokens from logit rows.
///
/// Scratch buffers are sized on the first call for a given vocabulary size,
/// so later calls with the same vocabulary and configuration do not
/// allocate.
#[derive(Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Xoshiro256StarStar,
    /// Filtered tokens; `value` holds the logit, then the sampling weight.
    candidates: Vec<Candidate>,
    /// Sorted copy of the penalty window, for counting occurrences.
    window: Vec<u32>,
}

impl Sampler {
    /// A sampler whose generator is seeded from `config.seed`.
    pub fn new(config: SamplerConfig) -> Self {
        let window_capacity = if config.penalties_active() {
            config.penalty_last_n.min(PREALLOCATED_WINDOW)
        } else {
            0
        };
        Self {
            rng: Xoshiro256StarStar::seed_from_u64(config.seed),
            config,
            candidates: Vec::new(),
            window: Vec::with_capacity(window_capacity),
        }
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Choose the next token.
    ///
    /// `logits` is the raw row over the vocabulary; the penalties are applied
    /// to it in place, the rest of the chain leaves it untouched. `history`
    /// is every token so far (prompt and generated); the penalties look at
    /// its last `penalty_last_n` entries and ignore ids outside the
    /// vocabulary.
    ///
    /// # Panics
    ///
    /// Panics if `logits` is empty or longer than the `u32` id space.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "cannot sample from an empty vocabulary");
        assert!(
            u32::try_from(logits.len() - 1).is_ok(),
            "vocabulary larger than the u32 token id space"
        );
        self.apply_penalties(logits, history);
        if self.config.is_greedy() {
            return argmax(logits) as u32;
        }
        match self.filter(logits) {
            Some(max) => self.draw(max),
            None => argmax(logits) as u32,
        }
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let config = &self.config;
        if !config.penalties_active() {
            return;
        }
        let recent = &history[history.len().saturating_sub(config.penalty_last_n)..];
        self.window.clear();
        self.window.extend_from_slice(recent);
        self.window.sort_unstable();
        for run in self.window.chunk_by(|a, b| a == b) {
            let Some(logit) = logits.get_mut(run[0] as usize) else {
                continue;
            };
            if config.repeat_penalty != 1.0 {
                if *logit > 0.0 {
                    *logit /= config.repeat_penalty;
                } else {
                    *logit *= config.repeat_penalty;
                }
            }
            *logit -= run.len() as f32 * config.frequency_penalty + config.presence_penalty;
        }
    }

    /// Leaves in `self.candidates` the tokens that survive top-k, top-p and
    /// min-p, with their (clamped) logits, and returns the largest logit, or
    /// `None` if no logit is above `-inf`.
    fn filter(&mut self, logits: &[f32]) -> Option<f32> {
        let config = &self.config;
        let n = logits.len();
        let top_p_active = config.top_p < 1.0;
        let candidates = &mut self.candidates;
        // Cleared before reserving: `reserve` counts from the current length.
        candidates.clear();

        if config.top_k > 0 && config.top_k < n {
            candidates.reserve(gather_capacity(config.top_k, n));
            // Not thinned by min-p: top-p renormalises over the whole top-k set.
            gather(candidates, logits, config.top_k, f32::NEG_INFINITY);
            if candidates.is_empty() {
                return None;
            }
            let max = candidates
                .iter()
                .fold(f32::NEG_INFINITY, |m, c| m.max(c.value));
            if top_p_active {
                let target = f64::from(config.top_p) * mass(candidates, max);
                let len = nucleus(candidates, max, target);
                candidates.truncate(len);
            }
            // top-p and min-p each keep a prefix of the ranking, so applying
            // min-p to the nucleus leaves the shorter of the two.
            let floor = min_p_floor(config.min_p, max);
            candidates.retain(|c| c.value >= floor);
            return Some(max);
        }

        let max = max_logit(logits)?;
        let floor = min_p_floor(config.min_p, max);
        // At worst the whole vocabulary survives.
        candidates.reserve(n);
        if !top_p_active {
            gather(candidates, logits, n, floor);
            return Some(max);
        }
        // min-p may thin the candidates but not the normaliser, which spans
        // the whole vocabulary.
        let total: f64 = logits
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| weight(x.min(f32::MAX), max))
            .sum();
        let target = f64::from(config.top_p) * total;
        // A peaked row's nucleus lies within its best few hundred tokens;
        // only a flat one needs every eligible token.
        let limit = INITIAL_NUCLEUS.min(n);
        gather(candidates, logits, limit, floor);
        if candidates.len() == limit && limit < n && mass(candidates, max) < target {
            gather(candidates, logits, n, floor);
        }
        let len = nucleus(candidates, max, target);
        candidates.truncate(len);
        Some(max)
    }

    /// Applies temperature to the candidates and draws one of them.
    fn draw(&mut self, max: f32) -> u32 {
        let temperature = self.config.temperature;
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            // Dividing (rather than multiplying by 1/T) keeps the maximum at
            // exactly exp(0) = 1 even when 1/T overflows, so the total is
            // never zero. The clamp stops a difference that overflowed to
            // -inf from turning into NaN when T is +inf.
            c.value = ((c.value - max).max(f32::MIN) / temperature).exp();
            total += f64::from(c.value);
        }
        let target = self.rng.next_f64() * total;
        let mut acc = 0.0f64;
        for c in &self.candidates {
            acc += f64::from(c.value);
            if acc > target {
                return c.id;
            }
        }
        // Only reachable when `target` rounded up to `total`.
        self.candidates
            .iter()
            .rev()
            .find(|c| c.value > 0.0)
            .map_or(self.candidates[0].id, |c| c.id)
    }
}

impl std::fmt::Debug for Sampler {
    // The scratch buffers can span the whole vocabulary; they carry no state.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("config", &self.config)
            .field("rng", &self.rng)
            .finish_non_exhaustive()
    }
}

/// A token and a value attached to it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    value: f32,
}

/// Descending value, then ascending id: a strict total order, so partial
/// selection and unstable sorts give the same result on every run.
fn rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.value
        .partial_cmp(&a.value)
        .unwrap_or(Ordering::Equal)
        .then(a.id.cmp(&b.id))
}

/// Unnormalised probability at temperature 1, relative to the maximum.
fn weight(logit: f32, max: f32) -> f64 {
    f64::from((logit - max).exp())
}

/// Largest logit, ignoring NaN and with `+inf` clamped to `f32::MAX`;
/// `None` if no logit is above `-inf`.
fn max_logit(logits: &[f32]) -> Option<f32> {
    let max = lane_max(logits);
    (max > f32::NEG_INFINITY).then_some(max.min(f32::MAX))
}

/// min-p as a logit threshold: `p_i >= min_p * p_max` exactly when
/// `l_i >= max + ln(min_p)`. Capped at `max` so that `min_p > 1` still keeps
/// the most likely token.
fn min_p_floor(min_p: f32, max: f32) -> f32 {
    if min_p > 0.0 {
        (max + min_p.ln()).min(max)
    } else {
        f32::NEG_INFINITY
    }
}

/// Total temperature-1 weight of `candidates`.
fn mass(candidates: &[Candidate], max: f32) -> f64 {
    candidates.iter().map(|c| weight(c.value, max)).sum()
}

/// Buffer size for [`gather`]: the slack beyond `limit` spreads each partial
/// selection over at least `max(limit, 64)` admissions.
fn gather_capacity(limit: usize, n: usize) -> usize {
    limit.saturating_mul(2).max(limit.saturating_add(64)).min(n)
}

/// Fills `out` with the `limit` best tokens (by [`rank`]) among those with a
/// logit `>= floor` and above `-inf`, in no particular order.
///
/// Streams over the row keeping a buffer of at most
/// [`gather_capacity`] entries: whenever it fills, a partial selection cuts
/// it back to `limit` and raises the admission bar to the worst survivor, so
/// most of a large vocabulary is rejected by a single comparison.
fn gather(out: &mut Vec<Candidate>, logits: &[f32], limit: usize, floor: f32) {
    out.clear();
    if limit == 0 {
        return;
    }
    let capacity = gather_capacity(limit, logits.len());
    // Later tokens lose ties to earlier ones, so equality with the worst
    // survivor is rightly a rejection.
    let mut bar = f32::NEG_INFINITY;
    for (block, chunk) in logits.chunks(GATHER_CHUNK).enumerate() {
        // Once the bar has risen, most blocks of a large row hold nothing
        // above it; a branch-free screen skips them.
        if !chunk
            .iter()
            .fold(false, |hit, &x| hit | ((x > bar) & (x >= floor)))
        {
            continue;
        }
        let base = block * GATHER_CHUNK;
        for (j, &x) in chunk.iter().enumerate() {
            if x > bar && x >= floor {
                out.push(Candidate {
                    id: (base + j) as u32,
                    value: x.min(f32::MAX),
                });
                if out.len() == capacity && capacity > limit {
                    out.select_nth_unstable_by(limit - 1, rank);
                    out.truncate(limit);
                    bar = out[limit - 1].value;
                }
            }
        }
    }
    if out.len() > limit {
        out.select_nth_unstable_by(limit - 1, rank);
        out.truncate(limit);
    }
}

/// Reorders `candidates` so that its first `len` entries are the shortest
/// prefix of the ranking whose temperature-1 mass reaches `target`, and
/// returns `len` (all of them if even their total falls short, which only
/// rounding can cause).
///
/// Bisects with partial selection rather than sorting: each step splits the
/// undecided range at its midpoint and weighs the better half, so the
/// expected cost is linear and only a short final range is sorted.
fn nucleus(candidates: &mut [Candidate], max: f32, target: f64) -> usize {
    // Invariant: `candidates[..lo]` are the `lo` best, their mass `before`
    // falls short of the target, and the answer lies in `lo + 1..=hi`.
    let (mut lo, mut hi, mut before) = (0, candidates.len(), 0.0);
    while hi - lo > NUCLEUS_SORT {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, rank);
        let upto_mid = before + mass(&candidates[lo..mid], max);
        if upto_mid >= target {
            hi = mid;
        } else {
            lo = mid;
            before = upto_mid;
        }
    }
    candidates[lo..hi].sort_unstable_by(rank);
    let mut acc = before;
    for (i, c) in candidates[lo..hi].iter().enumerate() {
        acc += weight(c.value, max);
        if acc >= target {
            return lo + i + 1;
        }
    }
    hi
}

/// SplitMix64 (Steele, Lea & Flood), used only to expand a 64-bit seed into
/// xoshiro's 256-bit state, as its authors recommend.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64 {
    pub(crate) state: u64,
}

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// xoshiro256** 1.0 (Blackman & Vigna): small, fast, and specified bit for
/// bit, so token streams are reproducible across platforms.
#[derive(Clone, Debug)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    /// SplitMix64 is a bijection of its counter, so four consecutive outputs
    /// are never all zero, the one state xoshiro must avoid.
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = SplitMix64 { state: seed };
        Self {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of resolution.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic filler for test rows, independent of the sampler's own
    /// generator state.
    fn random_row(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    fn config(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            ..SamplerConfig::greedy()
        }
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        let mut row = logits.to_vec();
        for _ in 0..draws {
            row.copy_from_slice(logits);
            counts[sampler.sample(&mut row, &[]) as usize] += 1;
        }
        counts
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let w: Vec<f64> = logits
            .iter()
            .map(|&x| ((f64::from(x) - max) / temperature).exp())
            .collect();
        let z: f64 = w.iter().sum();
        w.iter().map(|x| x / z).collect()
    }

    /// Pearson chi-square of observed counts against expected probabilities
    /// (cells with zero expectation must have zero count).
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                if p == 0.0 {
                    assert_eq!(c, 0, "token with zero probability was drawn");
                    0.0
                } else {
                    let e = p * n as f64;
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    fn support(counts: &[usize]) -> Vec<usize> {
        (0..counts.len()).filter(|&i| counts[i] > 0).collect()
    }

    #[test]
    fn splitmix64_matches_published_reference() {
        // First outputs of the reference splitmix64.c for a zero seed
        // (0xe220a8397b1dcdaf, ...), as quoted by many independent ports.
        let mut sm = SplitMix64 { state: 0 };
        let got: Vec<u64> = (0..4).map(|_| sm.next_u64()).collect();
        assert_eq!(
            got,
            [
                16294208416658607535,
                7960286522194355700,
                487617019471545679,
                17909611376780542444
            ]
        );
    }

    #[test]
    fn xoshiro256starstar_matches_published_reference() {
        // Outputs of the reference xoshiro256starstar.c from state {1, 2, 3, 4}.
        let mut rng = Xoshiro256StarStar { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..10).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                11520,
                0,
                1509978240,
                1215971899390074240,
                1216172134540287360,
                607988272756665600,
                16172922978634559625,
                8476171486693032832,
                10595114339597558777,
                2904607092377533576
            ]
        );
    }

    #[test]
    fn seed_zero_stream_matches_published_values() {
        // xoshiro256** whose state is four SplitMix64(0) outputs: values
        // quoted by several independent implementations of this composition
        // (0x99ec5f36cb75f2b4, ...), and pinned so the token stream of a seed
        // cannot drift.
        let mut rng = Xoshiro256StarStar::seed_from_u64(0);
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                0x99ec_5f36_cb75_f2b4,
                0xbf6e_1f78_4956_452a,
                0x1a5f_849d_4933_e6e0,
                0x6aa5_94f1_262d_2d2c
            ]
        );
    }

    #[test]
    fn unit_draws_are_in_range_and_uniform() {
        let mut rng = Xoshiro256StarStar::seed_from_u64(7);
        let mut bins = [0usize; 10];
        let n = 100_000;
        for _ in 0..n {
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        // 9 degrees of freedom; 27.88 is the 0.001 upper quantile.
        let chi = chi_square(&bins, &[0.1; 10]);
        assert!(chi < 27.88, "chi-square {chi}");
    }

    #[test]
    fn argmax_rules() {
        assert_eq!(argmax(&[1.0]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[3.0, 1.0, 3.0]), 0, "ties go to the lowest index");
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 2.0]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[2.0, f32::NAN, 1.0]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::INFINITY]), 1);
        assert_eq!(argmax(&[-0.0, 0.0]), 0, "-0 and +0 tie");
    }

    #[test]
    #[should_panic(expected = "empty")]
    fn argmax_of_empty_panics() {
        argmax(&[]);
    }

    #[test]
    fn config_defaults_follow_llama_cpp() {
        let d = SamplerConfig::default();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        assert_eq!(
            (d.repeat_penalty, d.frequency_penalty, d.presence_penalty),
            (1.0, 0.0, 0.0)
        );
        assert_eq!((d.penalty_last_n, d.seed), (64, DEFAULT_SEED));
        assert!(!d.is_greedy());
        assert!(SamplerConfig::greedy().is_greedy());
        for t in [0.0, -1.0, f32::NAN] {
            assert!(config(t, 0, 1.0, 0.0).is_greedy(), "{t}");
        }
        assert!(!config(1e-30, 0, 1.0, 0.0).is_greedy());
        let s = Sampler::new(d.clone());
        assert_eq!(s.config(), &d);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        for seed in 0..200 {
            let row = random_row(1000, seed, 10.0);
            let mut work = row.clone();
            assert_eq!(sampler.sample(&mut work, &[1, 2, 3]) as usize, argmax(&row));
            assert_eq!(work, row, "greedy without penalties leaves logits alone");
        }
    }

    #[test]
    fn greedy_applies_penalties_first() {
        let cfg = SamplerConfig {
            repeat_penalty: 2.0,
            penalty_last_n: 8,
            ..SamplerConfig::greedy()
        };
        let mut sampler = Sampler::new(cfg);
        let mut row = vec![3.0, 2.0, 1.0];
        assert_eq!(sampler.sample(&mut row, &[0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let cfg = SamplerConfig {
            seed: 1234,
            ..SamplerConfig::default()
        };
        let mut a = Sampler::new(cfg.clone());
        let mut b = Sampler::new(cfg.clone());
        let mut c = Sampler::new(SamplerConfig { seed: 1235, ..cfg });
        let (mut ta, mut tb, mut tc) = (Vec::new(), Vec::new(), Vec::new());
        for step in 0..2000u64 {
            let row = random_row(500, step, 1.0);
            let history: Vec<u32> = ta.clone();
            ta.push(a.sample(&mut row.clone(), &history));
            tb.push(b.sample(&mut row.clone(), &history));
            tc.push(c.sample(&mut row.clone(), &history));
        }
        assert_eq!(ta, tb);
        let differing = ta.iter().zip(&tc).filter(|(x, y)| x != y).count();
        // With ~40 near-equally likely tokens, agreement is rare.
        assert!(differing > 1500, "only {differing} of 2000 tokens differ");
    }

    #[test]
    fn frequencies_match_tempered_softmax() {
        let logits = [1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 2.5, 1.5];
        let temperature = 0.7;
        let mut sampler = Sampler::new(SamplerConfig {
            seed: 99,
            ..config(temperature, 0, 1.0, 0.0)
        });
        let draws = 20_000;
        let counts = counts(&mut sampler, &logits, draws);
        let probs = softmax(&logits, f64::from(temperature));
        // 7 degrees of freedom; 24.32 is the 0.001 upper quantile.
        let chi = chi_square(&counts, &probs);
        assert!(chi < 24.32, "chi-square {chi}, counts {counts:?}");
        // Standard error is at most sqrt(0.25 / 20000) = 0.0035.
        for (c, p) in counts.iter().zip(&probs) {
            let freq = *c as f64 / draws as f64;
            assert!((freq - p).abs() < 0.015, "freq {freq} vs p {p}");
        }
        // Sanity check of the test's power: temperature 1 must be rejected.
        let wrong = softmax(&logits, 1.0);
        assert!(chi_square(&counts, &wrong) > 100.0);
    }

    #[test]
    fn filters_then_temperature_renormalise_over_survivors() {
        let logits = [0.0, 2.0, 1.0, 1.5, -0.5, 0.5];
        let temperature = 1.6;
        let mut sampler = Sampler::new(SamplerConfig {
            seed: 5,
            ..config(temperature, 3, 1.0, 0.0)
        });
        let counts = counts(&mut sampler, &logits, 20_000);
        // Tokens 1, 3, 2 survive top-3.
        let kept = [
            f32::NEG_INFINITY,
            2.0,
            1.0,
            1.5,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        let probs = softmax(&kept, f64::from(temperature));
        // 2 degrees of freedom; 13.82 is the 0.001 upper quantile.
        let chi = chi_square(&counts, &probs);
        assert!(chi < 13.82, "chi-square {chi}, counts {counts:?}");
    }

    #[test]
    fn top_k_one_is_argmax() {
        let mut sampler = Sampler::new(config(5.0, 1, 1.0, 0.0));
        for seed in 0..200 {
            let row = random_row(3000, seed, 1.0);
            assert_eq!(sampler.sample(&mut row.clone(), &[]) as usize, argmax(&row));
        }
    }

    #[test]
    fn top_k_support_is_exactly_the_k_largest() {
        let n = 1000;
        // A fixed permutation of evenly spaced, distinct logits.
        let mut row: Vec<f32> = (0..n).map(|i| ((i * 389) % n) as f32 * 0.01).collect();
        row[17] = f32::NAN;
        row[18] = f32::NEG_INFINITY;
        let mut order: Vec<usize> = (0..n).filter(|&i| !row[i].is_nan()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for k in [2, 5, 40] {
            let mut sampler = Sampler::new(config(1.0, k, 1.0, 0.0));
            let counts = counts(&mut sampler, &row, 200 * k);
            let mut expected = order[..k].to_vec();
            expected.sort_unstable();
            assert_eq!(support(&counts), expected, "k = {k}");
        }
    }

    #[test]
    fn top_k_keeps_lowest_ids_among_ties() {
        let row = vec![0.0f32; 5000];
        let mut sampler = Sampler::new(config(1.0, 3, 1.0, 0.0));
        let counts = counts(&mut sampler, &row, 3000);
        assert_eq!(support(&counts), [0, 1, 2]);
    }

    #[test]
    fn top_k_beyond_vocabulary_keeps_everything() {
        let logits = [0.3, -0.2, 0.1, 0.0];
        let mut sampler = Sampler::new(config(1.0, 100, 1.0, 0.0));
        let counts = counts(&mut sampler, &logits, 20_000);
        let chi = chi_square(&counts, &softmax(&logits, 1.0));
        // 3 degrees of freedom; 16.27 is the 0.001 upper quantile.
        assert!(chi < 16.27, "chi-square {chi}");
    }

    /// Probabilities 1/2, 1/4, 1/8, ... at temperature 1.
    fn halving(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect()
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let logits = halving(10);
        // Cumulative mass: 0.5, 0.75, 0.875, 0.9375, ...
        for (top_p, kept) in [(0.4, 1), (0.6, 2), (0.8, 3), (0.9, 4), (0.95, 5)] {
            for top_k in [0, 8] {
                let mut sampler = Sampler::new(config(1.0, top_k, top_p, 0.0));
                let counts = counts(&mut sampler, &logits, 20_000);
                assert_eq!(
                    support(&counts),
                    (0..kept).collect::<Vec<_>>(),
                    "top_p {top_p}, top_k {top_k}"
                );
            }
        }
        // Within the nucleus the draw follows the renormalised distribution.
        let mut sampler = Sampler::new(config(1.0, 0, 0.8, 0.0));
        let counts = counts(&mut sampler, &logits, 20_000);
        let chi = chi_square(
            &counts,
            &softmax(&[0.0, -1.0, -2.0].map(|x| x * std::f32::consts::LN_2), 1.0),
        );
        assert!(chi < 13.82, "chi-square {chi}");
    }

    #[test]
    fn top_p_is_measured_before_temperature() {
        // At temperature 1 the two leaders hold 0.5 and 0.25 (nucleus 0.7 keeps
        // both); at temperature 0.25 the leader alone would exceed 0.9.
        let logits = halving(6);
        let mut sampler = Sampler::new(config(0.25, 0, 0.7, 0.0));
        let counts = counts(&mut sampler, &logits, 20_000);
        assert_eq!(support(&counts), [0, 1]);
    }

    #[test]
    fn top_p_renormalises_after_top_k() {
        // Over the top-2 set the leader has 2/3 of the mass, so 0.6 keeps it
        // alone, while over the full row (0.5) it would need two tokens.
        let logits = halving(6);
        let mut sampler = Sampler::new(config(1.0, 2, 0.6, 0.0));
        assert_eq!(support(&counts(&mut sampler, &logits, 5000)), [0]);
        let mut sampler = Sampler::new(config(1.0, 0, 0.6, 0.0));
        assert_eq!(support(&counts(&mut sampler, &logits, 5000)), [0, 1]);
    }

    #[test]
    fn degenerate_top_p_keeps_one_token() {
        let logits = [0.2, 1.0, 0.9, 0.95];
        for top_p in [0.0, -1.0, 1e-9] {
            let mut sampler = Sampler::new(config(3.0, 0, top_p, 0.0));
            assert_eq!(support(&counts(&mut sampler, &logits, 2000)), [1]);
        }
        for top_p in [1.0, 1.5, f32::NAN] {
            let mut sampler = Sampler::new(config(3.0, 0, top_p, 0.0));
            assert_eq!(support(&counts(&mut sampler, &logits, 2000)), [0, 1, 2, 3]);
        }
    }

    #[test]
    fn wide_nucleus_on_large_vocabulary_without_top_k() {
        // A flat row makes the nucleus exactly half the vocabulary, far beyond
        // the first candidate batch, so the widening path must run.
        let n = 20_000;
        let row = vec![0.5f32; n];
        let mut sampler = Sampler::new(config(1.0, 0, 0.5, 0.0));
        let counts = counts(&mut sampler, &row, 20_000);
        let support = support(&counts);
        assert!(*support.last().unwrap() < n / 2);
        assert!(*support.last().unwrap() > 9000);
        assert!(support.len() > 8000);
    }

    #[test]
    fn nucleus_bisection_matches_a_full_sort() {
        for (case, n) in [65, 300, 5000, 40_000].into_iter().enumerate() {
            for scale in [0.3f32, 4.0] {
                // Quantised values, so the ranking has many ties.
                let row: Vec<f32> = random_row(n, case as u64, scale)
                    .into_iter()
                    .map(|x| (x * 8.0).round() / 8.0)
                    .collect();
                let all: Vec<Candidate> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &value)| Candidate {
                        id: i as u32,
                        value,
                    })
                    .collect();
                let max = lane_max(&row);
                let mut sorted = all.clone();
                sorted.sort_by(rank);
                let total = mass(&all, max);
                for top_p in [0.0f32, 0.1, 0.5, 0.9, 0.99] {
                    let target = f64::from(top_p) * total;
                    let mut acc = 0.0;
                    let want = sorted
                        .iter()
                        .position(|c| {
                            acc += weight(c.value, max);
                            acc >= target
                        })
                        .unwrap()
                        + 1;
                    let mut work = all.clone();
                    let len = nucleus(&mut work, max, target);
                    assert_eq!(len, want, "n {n}, scale {scale}, top_p {top_p}");
                    let mut got: Vec<u32> = work[..len].iter().map(|c| c.id).collect();
                    let mut expected: Vec<u32> = sorted[..len].iter().map(|c| c.id).collect();
                    got.sort_unstable();
                    expected.sort_unstable();
                    assert_eq!(got, expected, "n {n}, scale {scale}, top_p {top_p}");
                }
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_fraction_of_the_best() {
        let logits = halving(8);
        // Relative to p_max: 1, 1/2, 1/4, 1/8, 1/16, ...
        for (min_p, kept) in [(0.3, 2), (0.2, 3), (0.1, 4), (0.05, 5)] {
            for (top_k, top_p) in [(0, 1.0), (6, 1.0), (0, 0.999), (7, 0.999)] {
                let mut sampler = Sampler::new(config(2.0, top_k, top_p, min_p));
                let counts = counts(&mut sampler, &logits, 20_000);
                assert_eq!(
                    support(&counts),
                    (0..kept).collect::<Vec<_>>(),
                    "min_p {min_p}, top_k {top_k}, top_p {top_p}"
                );
            }
        }
    }

    #[test]
    fn min_p_above_one_keeps_the_best_tokens() {
        let logits = [0.0, 1.0, 1.0, 0.5];
        let mut sampler = Sampler::new(config(1.0, 0, 1.0, 2.0));
        assert_eq!(support(&counts(&mut sampler, &logits, 2000)), [1, 2]);
    }

    #[test]
    fn penalties_change_exactly_the_expected_logits() {
        let cfg = SamplerConfig {
            repeat_penalty: 1.5,
            frequency_penalty: 0.25,
            presence_penalty: 0.5,
            penalty_last_n: 6,
            ..SamplerConfig::greedy()
        };
        let mut sampler = Sampler::new(cfg);
        let original = [2.0f32, -2.0, 0.0, 1.0, 3.0, f32::NEG_INFINITY, 4.0];
        let mut row = original;
        // Tokens 4 and 1 fall outside the 6-token window; 99 is outside the
        // vocabulary; in the window 0 and 5 appear twice, 2 once.
        let history = [4, 0, 1, 0, 99, 2, 5, 0, 5].map(|t| t as u32);
        sampler.sample(&mut row, &history[..]);
        let window: &[u32] = &history[3..];
        assert_eq!(window, [0, 99, 2, 5, 0, 5]);
        let expected = [
            2.0 / 1.5 - 2.0 * 0.25 - 0.5, // positive: divided, once
            -2.0,                         // not in the window
            0.0 * 1.5 - 0.25 - 0.5,       // zero: multiplied
            1.0,
            3.0,
            f32::NEG_INFINITY,
            4.0,
        ];
        for (i, (&got, &want)) in row.iter().zip(&expected).enumerate() {
            assert!(
                got == want || (got - want).abs() < 1e-6,
                "token {i}: got {got}, want {want}"
            );
        }

        let mut row = original;
        sampler.sample(&mut row, &[1, 1]);
        let want = -2.0 * 1.5 - 2.0 * 0.25 - 0.5; // negative: multiplied
        assert!((row[1] - want).abs() < 1e-6, "got {}", row[1]);
        assert_eq!(&row[2..], &original[2..]);
        assert_eq!(row[0], original[0]);
    }

    #[test]
    fn penalties_each_apply_alone() {
        let history = [0u32, 0, 1];
        let run = |cfg: SamplerConfig| {
            let mut row = [1.0f32, -1.0, 0.5];
            Sampler::new(cfg).sample(&mut row, &history);
            row
        };
        let base = SamplerConfig {
            penalty_last_n: 64,
            ..SamplerConfig::greedy()
        };
        let repeat = run(SamplerConfig {
            repeat_penalty: 2.0,
            ..base.clone()
        });
        assert_eq!(repeat, [0.5, -2.0, 0.5]);
        let freq = run(SamplerConfig {
            frequency_penalty: 0.5,
            ..base.clone()
        });
        assert_eq!(freq, [0.0, -1.5, 0.5]);
        let presence = run(SamplerConfig {
            presence_penalty: 0.5,
            ..base.clone()
        });
        assert_eq!(presence, [0.5, -1.5, 0.5]);
        let disabled = run(SamplerConfig {
            repeat_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.5,
            penalty_last_n: 0,
            ..base
        });
        assert_eq!(disabled, [1.0, -1.0, 0.5]);
    }

    #[test]
    fn non_finite_logits_are_handled() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let logits = [nan, 0.0, ninf, -1.0, nan, 0.5, ninf];
        for (top_k, top_p, min_p) in [
            (0, 1.0, 0.0),
            (3, 1.0, 0.0),
            (0, 0.9, 0.0),
            (0, 1.0, 0.01),
            (4, 0.99, 0.01),
        ] {
            let mut sampler = Sampler::new(config(1.0, top_k, top_p, min_p));
            let counts = counts(&mut sampler, &logits, 5000);
            assert_eq!(support(&counts), [1, 3, 5], "{top_k} {top_p} {min_p}");
        }
        // +inf dominates every finite logit.
        let mut sampler = Sampler::new(config(1.0, 0, 1.0, 0.0));
        let with_inf = [1e30, f32::INFINITY, 0.0, f32::INFINITY];
        assert_eq!(support(&counts(&mut sampler, &with_inf, 2000)), [1, 3]);
        // Nothing finite: no panic, argmax semantics.
        for row in [[nan, nan, nan], [nan, ninf, ninf], [ninf, ninf, ninf]] {
            let mut sampler = Sampler::new(SamplerConfig::default());
            assert_eq!(sampler.sample(&mut row.clone(), &[]) as usize, argmax(&row));
        }
    }

    #[test]
    fn tiny_temperatures_pick_the_best() {
        let logits = [0.5, 1.0, 0.999, -3.0];
        for t in [1e-5, 1e-10, 1e-30, f32::MIN_POSITIVE, 1e-45] {
            let mut sampler = Sampler::new(config(t, 0, 1.0, 0.0));
            assert_eq!(support(&counts(&mut sampler, &logits, 500)), [1], "{t}");
        }
        // Tied leaders stay equally likely however cold the temperature.
        let mut sampler = Sampler::new(config(1e-30, 0, 1.0, 0.0));
        let tally = counts(&mut sampler, &[1.0, 0.0, 1.0], 4000);
        assert_eq!(support(&tally), [0, 2]);
        assert!(tally[0].abs_diff(tally[2]) < 400, "{tally:?}");
        // A huge temperature flattens to uniform without overflow, even
        // across the whole f32 range.
        let mut sampler = Sampler::new(config(f32::INFINITY, 0, 1.0, 0.0));
        assert_eq!(support(&counts(&mut sampler, &logits, 2000)), [0, 1, 2, 3]);
        let extremes = [f32::MAX, -f32::MAX, 0.0];
        let tally = counts(&mut sampler, &extremes, 3000);
        assert!(tally.iter().all(|&c| c > 800), "{tally:?}");
    }

    #[test]
    #[should_panic(expected = "empty vocabulary")]
    fn empty_vocabulary_panics() {
        Sampler::new(SamplerConfig::default()).sample(&mut [], &[]);
    }

    #[test]
    fn large_vocabulary_reuses_scratch_space() {
        let n = 262_144;
        for cfg in [
            SamplerConfig {
                repeat_penalty: 1.1,
                ..SamplerConfig::default()
            },
            SamplerConfig {
                top_k: 0,
                min_p: 0.0,
                ..SamplerConfig::default()
            },
            SamplerConfig {
                top_k: 0,
                top_p: 1.0,
                ..SamplerConfig::default()
            },
        ] {
            let mut sampler = Sampler::new(cfg.clone());
            let mut history: Vec<u32> = (0..5).collect();
            let mut capacities = None;
            for step in 0..100 {
                // Alternate peaked and flat rows so different code paths
                // (narrow and wide nuclei) are exercised.
                let scale = if step % 2 == 0 { 12.0 } else { 0.5 };
                let mut row = random_row(n, step, scale);
                let token = sampler.sample(&mut row, &history);
                assert!((token as usize) < n);
                history.push(token);
                let now = (sampler.candidates.capacity(), sampler.window.capacity());
                match capacities {
                    None => capacities = Some(now),
                    Some(first) => assert_eq!(now, first, "{cfg:?}, step {step}"),
                }
            }
            let (candidates, _) = capacities.unwrap();
            if cfg.top_k == 40 {
                assert!(candidates <= 2 * 40 + 64, "top-k scratch {candidates}");
            }
        }
    }

    /// Tokens the chain may return for `logits` (already penalised), computed
    /// by a full sort. The top-p and min-p bounds get a little slack so that
    /// summation-order rounding cannot make a legal token look illegal.
    fn allowed(logits: &[f32], cfg: &SamplerConfig) -> Vec<bool> {
        let n = logits.len();
        let mut allowed = vec![false; n];
        if cfg.is_greedy() {
            allowed[argmax(logits)] = true;
            return allowed;
        }
        let mut order: Vec<(usize, f64)> = (0..n)
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .map(|i| (i, f64::from(logits[i].min(f32::MAX))))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if cfg.top_k > 0 {
            order.truncate(cfg.top_k);
        }
        let max = order[0].1;
        let mut keep = order.len();
        if cfg.top_p < 1.0 {
            let w: Vec<f64> = order.iter().map(|&(_, l)| (l - max).exp()).collect();
            let z: f64 = w.iter().sum();
            let target = (f64::from(cfg.top_p) + 1e-4) * z;
            let mut acc = 0.0;
            keep = w
                .iter()
                .position(|x| {
                    acc += x;
                    acc >= target
                })
                .map_or(order.len(), |i| i + 1);
        }
        for &(i, l) in &order[..keep] {
            if cfg.min_p.is_nan()
                || cfg.min_p <= 0.0
                || l >= max + f64::from(cfg.min_p).ln() - 1e-4
                || l == max
            {
                allowed[i] = true;
            }
        }
        allowed
    }

    fn logit_strategy() -> impl Strategy<Value = f32> {
        prop_oneof![
            12 => -8.0f32..8.0,
            2 => (-4i32..4).prop_map(|x| x as f32),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
        ]
    }

    fn config_strategy() -> impl Strategy<Value = SamplerConfig> {
        (
            prop_oneof![Just(0.0f32), Just(1e-30), 0.05f32..3.0],
            prop_oneof![Just(0usize), 1usize..12],
            prop_oneof![Just(1.0f32), 0.0f32..1.0, Just(0.0)],
            prop_oneof![Just(0.0f32), 0.0f32..1.0, Just(1.5)],
            (0.5f32..2.0, -1.0f32..1.0, -1.0f32..1.0, 0usize..16),
            any::<u64>(),
        )
            .prop_map(|(temperature, top_k, top_p, min_p, penalties, seed)| {
                let (repeat_penalty, frequency_penalty, presence_penalty, penalty_last_n) =
                    penalties;
                SamplerConfig {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty,
                    frequency_penalty,
                    presence_penalty,
                    penalty_last_n,
                    seed,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn chosen_token_is_always_in_the_filtered_support(
            logits in proptest::collection::vec(logit_strategy(), 1..48),
            cfg in config_strategy(),
            history in proptest::collection::vec(0u32..56, 0..40),
        ) {
            let mut sampler = Sampler::new(cfg.clone());
            for _ in 0..4 {
                let mut row = logits.clone();
                let token = sampler.sample(&mut row, &history) as usize;
                prop_assert!(token < row.len());
                if row.iter().all(|x| x.is_nan() || *x == f32::NEG_INFINITY) {
                    prop_assert_eq!(token, argmax(&row));
                    continue;
                }
                prop_assert!(row[token] > f32::NEG_INFINITY, "picked {}", row[token]);
                prop_assert!(allowed(&row, &cfg)[token], "token {} of {:?}", token, row);
            }
        }
    }
}
