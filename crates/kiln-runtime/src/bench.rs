//! Throughput measurement: prompt processing and generation speed, time to first token, load
//! time, peak memory, and how close decode comes to the memory-bandwidth limit.
//!
//! Decode reads every weight once per token, so (bytes of weights read per token) / (memory
//! bandwidth) bounds its speed; kiln measures the bandwidth on the spot with the same threads.

use crate::error::ModelError;
use crate::kernels::Precision;
use crate::model::Model;
use crate::pool::{split_range, ThreadPool};
use crate::session::{Logits, Session};
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Prompt length of the prompt-processing test.
    pub prompt_tokens: usize,
    /// Tokens generated in the generation test.
    pub gen_tokens: usize,
    /// Measured repetitions of each test (after one warm-up run).
    pub reps: usize,
    /// Seed of the random prompt tokens.
    pub seed: u64,
    /// Activation precision of the matrix products.
    pub precision: Precision,
}

/// Medians over the repetitions.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    /// Prompt tokens per second (one batch of `prompt_tokens`).
    pub pp_tok_s: f64,
    /// Generated tokens per second (one token per step, from an empty context).
    pub tg_tok_s: f64,
    /// Time to first token: prefill of the prompt plus choosing the first token, in ms.
    pub ttft_ms: f64,
    /// Every repetition's prompt tokens per second.
    pub pp_runs: Vec<f64>,
    /// Every repetition's generation tokens per second.
    pub tg_runs: Vec<f64>,
    /// Bytes of weights read to generate one token.
    pub bytes_per_token: u64,
    /// Measured read bandwidth with the benchmark's threads, bytes per second.
    pub bandwidth_bytes_s: f64,
    /// Peak resident memory of the process after the model ran (both models' with
    /// [`compare`]), before the bandwidth test's buffer, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

impl BenchResult {
    /// Generation speed if decode were limited only by reading the weights once per token.
    pub fn roofline_tok_s(&self) -> f64 {
        self.bandwidth_bytes_s / self.bytes_per_token as f64
    }

    /// Measured generation speed as a percentage of the roofline.
    pub fn roofline_pct(&self) -> f64 {
        100.0 * self.tg_tok_s / self.roofline_tok_s()
    }
}

/// One model's session and prompt, measured one repetition at a time.
struct Runner<'m> {
    model: &'m Model,
    session: Session<'m>,
    prompt: Vec<u32>,
}

impl<'m> Runner<'m> {
    fn new(model: &'m Model, pool: &'m ThreadPool, cfg: &BenchConfig) -> Runner<'m> {
        let vocab = model.config.vocab_size as u64;
        let mut rng = crate::sampling::SplitMix64 {
            state: cfg.seed | 1,
        };
        let prompt: Vec<u32> = (0..cfg.prompt_tokens)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let n_ctx = cfg.prompt_tokens.max(cfg.gen_tokens).max(1);
        let mut session = Session::new(model, pool, n_ctx);
        session.set_precision(cfg.precision);
        Runner {
            model,
            session,
            prompt,
        }
    }

    /// One prefill of the prompt and the choice of the first token: (tok/s, ms).
    fn prompt_once(&mut self) -> Result<(f64, f64), ModelError> {
        self.session.reset();
        let start = Instant::now();
        let logits = self.session.forward(&self.prompt, Logits::Last)?;
        let _first = crate::sampling::argmax(&logits);
        let secs = start.elapsed().as_secs_f64();
        Ok((self.prompt.len() as f64 / secs, secs * 1000.0))
    }

    /// `n` tokens generated greedily from an empty context: tok/s.
    fn generate_once(&mut self, n: usize) -> Result<f64, ModelError> {
        self.session.reset();
        let vocab = self.model.config.vocab_size as u32;
        let mut token = self.prompt.first().copied().unwrap_or(1) % vocab;
        let start = Instant::now();
        for _ in 0..n {
            let logits = self.session.forward(&[token], Logits::Last)?;
            token = crate::sampling::argmax(&logits) as u32;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// The figures of `runs` (peak memory and bandwidth measured by the caller, once for every
    /// runner of the process).
    fn result(
        &self,
        runs: &Runs,
        peak_rss_bytes: Option<u64>,
        bandwidth_bytes_s: f64,
    ) -> BenchResult {
        BenchResult {
            peak_rss_bytes,
            pp_tok_s: median(&runs.pp),
            tg_tok_s: median(&runs.tg),
            ttft_ms: median(&runs.ttft),
            pp_runs: runs.pp.clone(),
            tg_runs: runs.tg.clone(),
            bytes_per_token: self.model.bytes_per_token(),
            bandwidth_bytes_s,
        }
    }
}

/// One runner's measured repetitions.
#[derive(Default)]
struct Runs {
    pp: Vec<f64>,
    ttft: Vec<f64>,
    tg: Vec<f64>,
}

/// The tests of [`BenchConfig`] on every runner in turns: each repetition of a test runs on
/// all of them, back to back, after one warm-up repetition; the order reverses from one
/// repetition to the next, so with two runners neither always goes first. Then each runner's
/// figures, with the peak memory taken before the bandwidth test's buffer exists.
fn measure<const N: usize>(
    mut runners: [Runner<'_>; N],
    pool: &ThreadPool,
    cfg: &BenchConfig,
) -> Result<[BenchResult; N], ModelError> {
    let mut runs: [Runs; N] = std::array::from_fn(|_| Runs::default());
    let order = |rep: usize| -> [usize; N] {
        std::array::from_fn(|k| if rep % 2 == 1 { k } else { N - 1 - k })
    };
    if cfg.prompt_tokens > 0 {
        for rep in 0..=cfg.reps {
            for i in order(rep) {
                let (tok_s, ms) = runners[i].prompt_once()?;
                if rep > 0 {
                    runs[i].pp.push(tok_s);
                    runs[i].ttft.push(ms);
                }
            }
        }
    }
    if cfg.gen_tokens > 0 {
        for rep in 0..=cfg.reps {
            for i in order(rep) {
                let tok_s = runners[i].generate_once(cfg.gen_tokens)?;
                if rep > 0 {
                    runs[i].tg.push(tok_s);
                }
            }
        }
    }
    let peak = peak_rss_bytes();
    let bandwidth = measure_read_bandwidth(pool);
    Ok(std::array::from_fn(|i| {
        runners[i].result(&runs[i], peak, bandwidth)
    }))
}

/// Runs the prompt-processing and generation tests.
pub fn run(model: &Model, pool: &ThreadPool, cfg: &BenchConfig) -> Result<BenchResult, ModelError> {
    let [r] = measure([Runner::new(model, pool, cfg)], pool, cfg)?;
    Ok(r)
}

/// Two models measured side by side in one process: [`compare`].
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The first model's figures.
    pub a: BenchResult,
    /// The second model's.
    pub b: BenchResult,
}

impl Comparison {
    /// Each repetition's prompt speed of `a` over `b`'s.
    pub fn pp_ratios(&self) -> Vec<f64> {
        ratios(&self.a.pp_runs, &self.b.pp_runs)
    }

    /// Each repetition's generation speed of `a` over `b`'s.
    pub fn tg_ratios(&self) -> Vec<f64> {
        ratios(&self.a.tg_runs, &self.b.tg_runs)
    }
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

/// Runs the tests of [`run`] on two models in turns: each repetition of a test runs on both,
/// back to back, the first of the pair alternating. A shared host's slow phases last seconds
/// and move whole processes; two models in separate processes, or one after the other, see
/// different phases and differ by more than the formats do (single runs of one file vary by
/// ±10 % here), while the two halves of a pair see the same. Each pair's ratio is what
/// [`Comparison::tg_ratios`] gives.
pub fn compare(
    a: &Model,
    b: &Model,
    pool: &ThreadPool,
    cfg: &BenchConfig,
) -> Result<Comparison, ModelError> {
    let [a, b] = measure(
        [Runner::new(a, pool, cfg), Runner::new(b, pool, cfg)],
        pool,
        cfg,
    )?;
    Ok(Comparison { a, b })
}

/// Median of `v` (0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Bytes the bandwidth test streams through: far larger than any cache.
const BANDWIDTH_BYTES: usize = 512 << 20;

/// Read bandwidth of main memory with the pool's threads: the best of a few passes that sum a
/// buffer much larger than the caches, each thread streaming its own contiguous part.
pub fn measure_read_bandwidth(pool: &ThreadPool) -> f64 {
    let n = BANDWIDTH_BYTES / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let parts = pool.n_threads();
    let mut best = 0.0f64;
    let sums: Vec<std::sync::Mutex<f32>> = (0..parts).map(|_| std::sync::Mutex::new(0.0)).collect();
    for _ in 0..4 {
        let start = Instant::now();
        pool.for_each(parts, |p| {
            let s = crate::kernels::sum_f32(&buf[split_range(n, parts, p)]);
            *sums[p].lock().unwrap_or_else(|e| e.into_inner()) += s;
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.max(BANDWIDTH_BYTES as f64 / secs);
    }
    // Keep the sums observable so the reads cannot be optimised away.
    let total: f32 = sums
        .iter()
        .map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
        .sum();
    std::hint::black_box(total);
    best
}

/// Peak resident memory of this process in bytes, where the OS reports it (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn bandwidth_is_plausible() {
        let bw = measure_read_bandwidth(&ThreadPool::new(1));
        // Anything from a slow board to a server: 0.5 GB/s .. 2 TB/s.
        assert!(bw > 0.5e9 && bw < 2e12, "{bw}");
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().expect("VmHWM");
            assert!(rss > 1 << 20);
        }
    }
}
