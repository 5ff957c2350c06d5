//! Lookup tables learned with calibration weights or with pinned extremes, judged by
//! perplexity.
//!
//! ```sh
//! CALIB=/usr/share/common-licenses/GPL-3 cargo run --release -p kiln-runtime \
//!     --example lut_calibration_study -- models/X.gguf OUT_DIR VARIANT...
//! ```
//!
//! Runs the source model over the first `CAL_TOKENS` (2048) tokens of `CALIB` in chunks of `CAL_CHUNK` (256)
//! ([`kiln_runtime::calibration`]) to measure the mean square of every matrix product's input
//! channels, then for each `VARIANT` writes `OUT_DIR/VARIANT.gguf`: the model with every
//! block matrix (not the embedding or output) reconstructed as F32 after 4-bit lookup tables,
//! for `kiln perplexity OUT_DIR/VARIANT.gguf --text-file T`. A variant is
//! `GROUP-WEIGHT[-EXTREME][-fb]`:
//! - `GROUP`: `t` (one table per tensor, `lut4`), `16` (`lut4-g16`), `1` (`lut4-g1`);
//! - `WEIGHT`: `one` (plain k-means, what `kiln convert` stores without calibration), `imp`
//!   (each weight's error counted by its input channel's mean square), `sqrt` (by its square
//!   root), `impx` (by its mean square times `√(σ² + x²)`, `x` the weight and `σ²` the mean
//!   square of its table's group, as llama.cpp weights its searches with an importance
//!   matrix);
//!   With `GROUP` `i4b64` (or another block size), symmetric int4 in blocks of that many input
//!   channels instead, each block's scale the one of least (weighted) squared error among
//!   those that leave its largest weight unclipped, as `int4-block64` chooses it.
//! - `EXTREME`: `pin` (the smallest and largest weight of each table's group given a weight
//!   that makes them table entries), or nothing.
//! - `fb`: indices chosen with error feedback on the inputs' second moments
//!   ([`kiln_format::quant::feedback`], as `kiln convert --calibration` does) instead of each
//!   weight's nearest entry.
//!
//! `SEED` offsets every table's k-means++ seed (0).
//!
//! Printed per variant: the weight SNR, the activation-weighted SNR (the error each matrix
//! product's output takes, under uncorrelated channels), and the tensor whose largest weight
//! was moved the most, as a fraction of that weight.

use kiln_format::ggml::{f16_to_f32, f32_to_f16, GgmlType};
use kiln_format::gguf::{GgufFile, GgufWriter};
use kiln_format::quant::feedback::{Feedback, DEFAULT_DAMPING};
use kiln_format::quant::kmeans::{kmeans_1d_weighted, KMeansOptions};
use kiln_runtime::calibration::{self, InputStats};
use kiln_runtime::{Model, ThreadPool};

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Variant {
    name: String,
    /// Symmetric int4 in blocks of this many input channels instead of a lookup table.
    int4_block: Option<usize>,
    group: Option<usize>,
    /// The power of the channel's mean square its weights' errors are counted by (0: plain).
    power: f32,
    /// Also count each error by `√(σ² + x²)` (`x` the weight, `σ²` its group's mean square).
    magnitude: bool,
    pin: bool,
    /// Assign with error feedback on the calibration's second moments.
    feedback: bool,
}

fn parse(v: &str) -> Variant {
    let parts: Vec<&str> = v.split('-').collect();
    assert!(parts.len() >= 2, "variant GROUP-WEIGHT[-EXTREME][-fb]: {v}");
    Variant {
        name: v.to_string(),
        int4_block: parts[0]
            .strip_prefix("i4b")
            .map(|b| b.parse().expect("block")),
        group: match parts[0] {
            "t" => None,
            g if g.starts_with("i4b") => None,
            g => Some(g.parse().expect("group")),
        },
        power: match parts[1] {
            "one" => 0.0,
            "imp" => 1.0,
            "sqrt" => 0.5,
            "impx" => 1.0,
            w => panic!("weight {w}"),
        },
        magnitude: parts[1] == "impx",
        pin: parts[2..].contains(&"pin"),
        feedback: parts[2..].contains(&"fb"),
    }
}

/// The table of one group: weighted k-means, entries rounded to f16.
fn table(values: &[f32], weights: &[f32], pin: bool, seed: u64) -> Vec<f32> {
    let mut weights = weights.to_vec();
    if pin {
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let (mut lo, mut hi) = (0, 0);
        for (i, &v) in values.iter().enumerate() {
            if v < values[lo] {
                lo = i;
            }
            if v > values[hi] {
                hi = i;
            }
        }
        for i in [lo, hi] {
            weights[i] = (1e4 * total) as f32;
        }
    }
    let km = kmeans_1d_weighted(values, &weights, 16, seed, KMeansOptions::default())
        .expect("valid weights");
    let mut t: Vec<f32> = km
        .centroids
        .iter()
        .map(|&c| f16_to_f32(f32_to_f16(c as f32)))
        .collect();
    t.sort_by(f32::total_cmp);
    t
}

fn nearest(t: &[f32], v: f32) -> f32 {
    let i = t.partition_point(|&e| e < v);
    if i == 0 {
        t[0]
    } else if i == t.len() || v - t[i - 1] <= t[i] - v {
        t[i - 1]
    } else {
        t[i]
    }
}

/// Symmetric int4 of one block with the scale of least weighted squared error among those that
/// keep its largest weight unclipped (the candidates of `int4-block64`'s encoder).
fn int4_block(x: &[f32], c: &[f32], out: &mut [f32]) {
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        out.fill(0.0);
        return;
    }
    let mut best = (f64::INFINITY, 0.0f32);
    let divisors = (1..=5)
        .map(|k| k as f32)
        .chain((60..=80).map(|k| k as f32 / 10.0));
    for div in divisors {
        let d = f16_to_f32(f32_to_f16(max / -div));
        if d == 0.0 {
            continue;
        }
        let err: f64 = x
            .iter()
            .zip(c)
            .map(|(&v, &wt)| {
                let q = (v / d).round().clamp(-8.0, 7.0);
                f64::from(wt) * f64::from(v - d * q).powi(2)
            })
            .sum();
        if err < best.0 {
            best = (err, d);
        }
    }
    let d = best.1;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = d * (v / d).round().clamp(-8.0, 7.0);
    }
}

fn reconstruct(
    w: &[f32],
    rows: usize,
    cols: usize,
    imp: &[f32],
    v: &Variant,
    h: Option<&[f32]>,
) -> Vec<f32> {
    let seed0: u64 = env("SEED", 0);
    if let Some(b) = v.int4_block {
        let col_w: Vec<f32> = imp.iter().map(|&c| c.powf(v.power)).collect();
        let mut out = vec![0.0f32; w.len()];
        for (src, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            for ((x, o), c) in src.chunks(b).zip(dst.chunks_mut(b)).zip(col_w.chunks(b)) {
                int4_block(x, c, o);
            }
        }
        return out;
    }
    let group_rows = v.group.unwrap_or(rows);
    let groups = rows / group_rows;
    let len = group_rows * cols;
    let col_w: Vec<f32> = imp.iter().map(|&c| c.powf(v.power)).collect();
    let weights: Vec<f32> = (0..group_rows)
        .flat_map(|_| col_w.iter().copied())
        .collect();
    let mut out = vec![0.0f32; w.len()];
    let mut tables: Vec<Vec<f32>> = vec![Vec::new(); groups];
    let threads = 2.min(groups);
    let per = groups.div_ceil(threads);
    std::thread::scope(|s| {
        for (ti, (dst, tabs)) in out
            .chunks_mut(per * len)
            .zip(tables.chunks_mut(per))
            .enumerate()
        {
            let weights = &weights;
            s.spawn(move || {
                for (k, d) in dst.chunks_mut(len).enumerate() {
                    let g = ti * per + k;
                    let src = &w[g * len..(g + 1) * len];
                    let t = if v.magnitude {
                        let s2 = src.iter().map(|&x| x * x).sum::<f32>() / src.len() as f32;
                        let wm: Vec<f32> = src
                            .iter()
                            .zip(weights.iter())
                            .map(|(&x, &c)| c * (s2 + x * x).sqrt())
                            .collect();
                        table(src, &wm, v.pin, seed0 + g as u64 + 1)
                    } else {
                        table(src, weights, v.pin, seed0 + g as u64 + 1)
                    };
                    for (o, &x) in d.iter_mut().zip(src) {
                        *o = nearest(&t, x);
                    }
                    tabs[k] = t;
                }
            });
        }
    });
    if v.feedback {
        let h = h.expect("second moments");
        let f = Feedback::new(h, cols, DEFAULT_DAMPING).expect("factor");
        f.quantize_rows(w, &mut out, |r, x| {
            let q = nearest(&tables[r / group_rows], x);
            (q, q)
        });
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let src = &args[1];
    let out_dir = std::path::Path::new(&args[2]);
    std::fs::create_dir_all(out_dir).unwrap();
    let variants: Vec<Variant> = args[3..].iter().map(|v| parse(v)).collect();
    let file = GgufFile::open(src).expect("a GGUF file");

    let calib_path = std::env::var("CALIB").expect("CALIB=text file");
    let text = std::fs::read_to_string(&calib_path).unwrap();
    let tokenizer = kiln_tokenizer::Tokenizer::from_gguf(&file).unwrap();
    let chunks = calibration::chunks(
        &tokenizer,
        &text,
        env("CAL_TOKENS", calibration::DEFAULT_TOKENS),
        env("CAL_CHUNK", calibration::CHUNK_TOKENS),
    )
    .unwrap();
    let model = Model::load(src).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = ThreadPool::new(threads);
    let start = std::time::Instant::now();
    let mut stats = if variants.iter().any(|v| v.feedback) {
        InputStats::with_second_moments()
    } else {
        InputStats::new()
    };
    calibration::collect_into(&model, &pool, &chunks, &mut stats).unwrap();
    println!(
        "calibration: {} chunks, {} positions, {} matrices, {:.1} s",
        chunks.len(),
        chunks.iter().map(Vec::len).sum::<usize>(),
        stats.names().count(),
        start.elapsed().as_secs_f64()
    );
    drop(model);
    // How unequal the channels are: per matrix, the largest channel mean square over the
    // median one.
    let mut ratios: Vec<(f64, String)> = stats
        .names()
        .map(|n| {
            let mut imp = stats.importance(n).expect("observed");
            imp.sort_by(f32::total_cmp);
            let median = f64::from(imp[imp.len() / 2]);
            (f64::from(imp[imp.len() - 1]) / median, n.to_string())
        })
        .collect();
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!(
        "largest / median channel mean square: median over matrices {:.0}, largest {:.0} ({})",
        ratios[ratios.len() / 2].0,
        ratios[ratios.len() - 1].0,
        ratios[ratios.len() - 1].1
    );

    for v in &variants {
        let start = std::time::Instant::now();
        let mut writer = GgufWriter::new();
        for (k, val) in file.metadata() {
            if k != "general.alignment" {
                writer.add_metadata(k.clone(), val.clone());
            }
        }
        let (mut err, mut pow, mut werr, mut wpow) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let mut worst = (0.0f64, String::new());
        for t in file.tensors() {
            let skip = t.name == "token_embd.weight" || t.name == "output.weight";
            if t.dims.len() != 2 || skip {
                writer
                    .add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t).to_vec())
                    .unwrap();
                continue;
            }
            let cols = t.dims[0] as usize;
            let rows = t.dims[1] as usize;
            let w = file.tensor_f32(t).unwrap();
            let imp = stats
                .importance(&t.name)
                .unwrap_or_else(|| panic!("no statistics for {}", t.name));
            let mean = imp.iter().map(|&x| f64::from(x)).sum::<f64>() / cols as f64;
            // A channel never driven still gets a little weight, so its weights keep a say.
            let imp: Vec<f32> = imp.iter().map(|&x| x.max((1e-6 * mean) as f32)).collect();
            let h = v
                .feedback
                .then(|| stats.second_moment(&t.name).expect("second moment"));
            let back = reconstruct(&w, rows, cols, &imp, v, h.as_deref());
            let (mut imax, mut amax) = (0, 0.0f32);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let e = f64::from(a - b).powi(2);
                let p = f64::from(*a).powi(2);
                let c = f64::from(imp[i % cols]);
                err += e;
                pow += p;
                werr += c * e;
                wpow += c * p;
                if a.abs() > amax {
                    amax = a.abs();
                    imax = i;
                }
            }
            let moved = f64::from((w[imax] - back[imax]).abs() / amax);
            if moved > worst.0 {
                worst = (moved, format!("{} ({} → {})", t.name, w[imax], back[imax]));
            }
            writer
                .add_tensor_f32(t.name.clone(), &t.dims, GgmlType::F32, &back)
                .unwrap();
        }
        println!(
            "{}: SNR {:.3} dB, activation-weighted SNR {:.3} dB, largest weight moved most: {:.1} % in {}, {:.1} s",
            v.name,
            10.0 * (pow / err).log10(),
            10.0 * (wpow / werr).log10(),
            100.0 * worst.0,
            worst.1,
            start.elapsed().as_secs_f64()
        );
        writer
            .write(out_dir.join(format!("{}.gguf", v.name)))
            .unwrap();
    }
}
