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
    /// Peak resident memory after the model ran (before the bandwidth test's buffer), where
    /// the OS reports it.
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

/// Runs the prompt-processing and generation tests.
pub fn run(model: &Model, pool: &ThreadPool, cfg: &BenchConfig) -> Result<BenchResult, ModelError> {
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

    let mut pp_runs = Vec::new();
    let mut ttft = Vec::new();
    if cfg.prompt_tokens > 0 {
        for rep in 0..=cfg.reps {
            session.reset();
            let start = Instant::now();
            let logits = session.forward(&prompt, Logits::Last)?;
            let _first = crate::sampling::argmax(&logits);
            let secs = start.elapsed().as_secs_f64();
            if rep > 0 {
                pp_runs.push(cfg.prompt_tokens as f64 / secs);
                ttft.push(secs * 1000.0);
            }
        }
    }
    let mut tg_runs = Vec::new();
    if cfg.gen_tokens > 0 {
        for rep in 0..=cfg.reps {
            session.reset();
            let mut token = prompt.first().copied().unwrap_or(1) % vocab as u32;
            let start = Instant::now();
            for _ in 0..cfg.gen_tokens {
                let logits = session.forward(&[token], Logits::Last)?;
                token = crate::sampling::argmax(&logits) as u32;
            }
            let secs = start.elapsed().as_secs_f64();
            if rep > 0 {
                tg_runs.push(cfg.gen_tokens as f64 / secs);
            }
        }
    }
    let peak_rss_bytes = peak_rss_bytes();
    Ok(BenchResult {
        peak_rss_bytes,
        pp_tok_s: median(&pp_runs),
        tg_tok_s: median(&tg_runs),
        ttft_ms: median(&ttft),
        pp_runs,
        tg_runs,
        bytes_per_token: model.bytes_per_token(),
        bandwidth_bytes_s: measure_read_bandwidth(pool),
    })
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
