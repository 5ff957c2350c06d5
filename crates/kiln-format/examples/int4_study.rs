//! Scale searches for symmetric int4 blocks, judged by perplexity.
//!
//! ```sh
//! cargo run --release -p kiln-format --example int4_study -- models/X.gguf [OUT.gguf]
//! ```
//!
//! Reconstructs every 2-D matrix (but the embedding unless `I4_EMBD=1`) as F32 after int4 in
//! blocks of `I4_BLOCK` (64) and prints the weight SNR; with `OUT.gguf`, writes the model so
//! reconstructed for `kiln perplexity OUT.gguf`. `I4_MODE=package` uses the `I4_B64` encoder
//! ([`kiln_types::quantize_int4_unclipped`]), `searched` the least-squares search of
//! `int4-block32` ([`kiln_types::quantize_int4_searched`]); otherwise the search here, which
//! tries the divisors `I4_LO`, `I4_LO + I4_STEP`, …, `I4_HI` (6.5, 0.25, 9.5) of the largest
//! magnitude, mapping it to the −8 side (`I4_SIGNS=2`: either side), each refitted `I4_REFIT`
//! (1) times by least squares, and keeps the least weighted squared error. Knobs:
//! - `I4_W`: the error weight of an element `x` in a block of mean square `σ²`: `one`, `x2`,
//!   `absx`, `sig` (`√(σ² + x²)`), `sigp` (`(I4_SK·σ² + x²)^I4_P`), `absp`
//!   (`(I4_SK·σ + |x|)^I4_P`); `I4_GAMMA=1` multiplies it by `|γ|^I4_GP` (2) of the RMSNorm
//!   before the matrix, per input channel; `I4_MAXW` multiplies the largest element's weight.
//! - Constraints on a candidate: `I4_CLIP` (largest rounding error of any element, in steps),
//!   `I4_SLACK` (how far beyond −8 … 7 steps any element may fall), `I4_MAXSLACK` (the same for
//!   the largest element only; also bounds the refits).
//! - `I4_TIES=1` rounds halfway cases to even (default: away from zero); `I4_UNSHRINK=1`
//!   replaces the chosen scale by `Σx² / Σqx` for its codes.

use kiln_format::ggml::{f16_to_f32, f32_to_f16, GgmlType};
use kiln_format::gguf::{GgufFile, GgufWriter};
use kiln_format::kiln_types;
use kiln_format::quant::snr_db;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[derive(Clone)]
struct Cfg {
    lo: f32,
    hi: f32,
    step: f32,
    refit: usize,
    signs: usize,
    weight: String,
}

fn codes_err(x: &[f32], w: &[f32], d: f32, q: &mut [f32]) -> f32 {
    let clip: f32 = env("I4_CLIP", 1e9);
    let slack: f32 = env("I4_SLACK", 1e9);
    let ties = env("I4_TIES", 0) == 1;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0;
    for ((c, &v), &wt) in q.iter_mut().zip(x).zip(w) {
        let k = if ties {
            ((v * inv + 12_582_912.0) - 12_582_912.0).clamp(-8.0, 7.0)
        } else {
            (v * inv).round().clamp(-8.0, 7.0)
        };
        if (v * inv - k).abs() > clip + 1e-4 || v * inv < -8.0 - slack || v * inv > 7.0 + slack {
            return f32::INFINITY;
        }
        *c = k;
        let e = v - d * k;
        err += wt * e * e;
    }
    err
}

fn search(x: &[f32], w: &[f32], cfg: &Cfg, out: &mut [f32]) {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    if max == 0.0 {
        out.fill(0.0);
        return;
    }
    let round = |d: f32| f16_to_f32(f32_to_f16(d));
    let mut q = vec![0.0f32; n];
    let maxslack: f32 = env("I4_MAXSLACK", 1e9);
    let (mut best_err, mut best_d) = (f32::INFINITY, 0.0f32);
    let mut best_q = vec![0.0f32; n];
    let steps = ((cfg.hi - cfg.lo) / cfg.step).round() as usize;
    for sign in [-1.0f32, 1.0].iter().take(cfg.signs) {
        for s in 0..=steps {
            let div = cfg.lo + s as f32 * cfg.step;
            let mut d = round(max / (sign * div));
            if max / d < -8.0 - maxslack || max / d > 7.0 + maxslack {
                continue;
            }
            for r in 0..=cfg.refit {
                let err = codes_err(x, w, d, &mut q);
                if err < best_err {
                    best_err = err;
                    best_d = d;
                    best_q.copy_from_slice(&q);
                }
                if r == cfg.refit {
                    break;
                }
                let (mut xq, mut qq) = (0.0f32, 0.0f32);
                for ((&c, &v), &wt) in q.iter().zip(x).zip(w) {
                    xq += wt * v * c;
                    qq += wt * c * c;
                }
                if qq == 0.0 {
                    break;
                }
                let nd = round(xq / qq);
                if nd == d || max / nd < -8.0 - maxslack || max / nd > 7.0 + maxslack {
                    break;
                }
                d = nd;
            }
        }
    }
    let unshrink: u32 = env("I4_UNSHRINK", 0);
    if unshrink == 1 {
        let (mut xx, mut qx) = (0.0f32, 0.0f32);
        for (&c, &v) in best_q.iter().zip(x) {
            xx += v * v;
            qx += c * v;
        }
        if qx != 0.0 {
            best_d = round(xx / qx);
        }
    }
    for (o, &c) in out.iter_mut().zip(&best_q) {
        *o = best_d * c;
    }
}

fn reconstruct(x: &[f32], cols: usize, gamma: Option<&[f32]>, block: usize, cfg: &Cfg) -> Vec<f32> {
    let mode: String = env("I4_MODE", "search".to_string());
    let pw: f32 = env("I4_P", 0.5);
    let sk: f32 = env("I4_SK", 1.0);
    let mut back = vec![0.0f32; x.len()];
    let threads = 2;
    let rows = x.len() / cols;
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, dst) in back.chunks_mut(per * cols).enumerate() {
            let src = &x[t * per * cols..t * per * cols + dst.len()];
            let mode = &mode;
            let (pw, sk) = (pw, sk);
            let gp: f32 = env("I4_GP", 2.0);
            s.spawn(move || {
                let mut wts = vec![0.0f32; block];
                let mut codes = vec![0u8; block];
                for (bi, (xb, ob)) in src.chunks(block).zip(dst.chunks_mut(block)).enumerate() {
                    if mode == "package" || mode == "searched" {
                        let d = if mode == "package" {
                            kiln_types::quantize_int4_unclipped(xb, &mut codes)
                        } else {
                            kiln_types::quantize_int4_searched(xb, &mut codes)
                        };
                        for (o, &c) in ob.iter_mut().zip(&codes) {
                            *o = d * (c as f32 - 8.0);
                        }
                        continue;
                    }
                    let c0 = (bi * block) % cols;
                    let sigma2 = xb.iter().map(|v| v * v).sum::<f32>() / block as f32;
                    for (j, (wt, &v)) in wts.iter_mut().zip(xb).enumerate() {
                        let base = match cfg.weight.as_str() {
                            "x2" => v * v,
                            "absx" => v.abs(),
                            "sig" => (sigma2 + v * v).sqrt(),
                            "sigp" => (sigma2 * sk + v * v).powf(pw),
                            "absp" => (sigma2.sqrt() * sk + v.abs()).powf(pw),
                            _ => 1.0,
                        };
                        let g = gamma.map_or(1.0, |g| g[c0 + j].abs().powf(gp));
                        *wt = base * g;
                    }
                    let maxw: f32 = env("I4_MAXW", 1.0);
                    if maxw != 1.0 {
                        let mut im = 0;
                        for (j, v) in xb.iter().enumerate() {
                            if v.abs() > xb[im].abs() {
                                im = j;
                            }
                        }
                        wts[im] *= maxw;
                    }
                    search(xb, &wts, cfg, ob);
                }
            });
        }
    });
    back
}

fn norm_for(name: &str) -> Option<String> {
    let (blk, kind) = name.rsplit_once('.')?.0.rsplit_once('.')?;
    match kind {
        "attn_q" | "attn_k" | "attn_v" => Some(format!("{blk}.attn_norm.weight")),
        "ffn_gate" | "ffn_up" => Some(format!("{blk}.ffn_norm.weight")),
        _ => None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = GgufFile::open(&args[1]).expect("a GGUF file");
    let block: usize = env("I4_BLOCK", 64);
    let cfg = Cfg {
        lo: env("I4_LO", 6.5),
        hi: env("I4_HI", 9.5),
        step: env("I4_STEP", 0.25),
        refit: env("I4_REFIT", 1),
        signs: env("I4_SIGNS", 1),
        weight: env("I4_W", "one".to_string()),
    };
    let use_gamma: bool = env("I4_GAMMA", 0) == 1;
    let embd: bool = env("I4_EMBD", 0) == 1;
    let mut writer = GgufWriter::new();
    for (k, v) in file.metadata() {
        if k != "general.alignment" {
            writer.add_metadata(k.clone(), v.clone());
        }
    }
    let (mut snrs, mut err, mut pow) = (Vec::new(), 0.0f64, 0.0f64);
    let start = std::time::Instant::now();
    for t in file.tensors() {
        let cols = t.dims[0] as usize;
        let skip = !embd && (t.name == "token_embd.weight" || t.name == "output.weight");
        if t.dims.len() == 2 && !skip && cols % block == 0 {
            let w = file.tensor_f32(t).unwrap();
            let gamma = if use_gamma {
                norm_for(&t.name).map(|n| file.tensor_f32(file.tensor(&n).unwrap()).unwrap())
            } else {
                None
            };
            let back = reconstruct(&w, cols, gamma.as_deref(), block, &cfg);
            let snr = snr_db(&w, &back);
            snrs.push(snr);
            for (a, b) in w.iter().zip(&back) {
                err += ((a - b) as f64).powi(2);
                pow += (*a as f64).powi(2);
            }
            writer
                .add_tensor_f32(t.name.clone(), &t.dims, GgmlType::F32, &back)
                .unwrap();
        } else {
            writer
                .add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t).to_vec())
                .unwrap();
        }
    }
    let mean = snrs.iter().sum::<f64>() / snrs.len() as f64;
    let min = snrs.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{} tensors, SNR mean {mean:.3} min {min:.3} total {:.3} dB, {:.1} s",
        snrs.len(),
        10.0 * (pow / err).log10(),
        start.elapsed().as_secs_f64()
    );
    if let Some(out) = args.get(2) {
        writer.write(out).unwrap();
    }
}
