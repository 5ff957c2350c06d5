//! Lookup tables with a scale per block of input channels, against block-wise int4.
//!
//! Every scheme here reconstructs a weight as `w = s_b · t[q] (+ m_b)`: `q` a 4-bit index, `t`
//! a 16-entry f16 table shared by a tensor (or a group of rows), `s_b` (and `m_b`) one per
//! block of `B` consecutive input channels. With `t = −8..7` and no `m` that is exactly
//! `int4-block{B}` (ggml `Q4_0` at `B = 32`); with `t = 0..15` and `m`, `int4-block{B}-offset`
//! (`Q4_1`). The learned schemes start there and alternate, each step lowering the squared
//! error: the best scale (and offset) of every block for the table, then the least-squares
//! table for those scales and indices.
//!
//! ```sh
//! cargo run --release -p kiln-format --example lut_block_study -- models/X.gguf [per-kind]
//! cargo run --release -p kiln-format --example lut_block_study -- models/X.gguf \
//!     --write SCHEME OUT.gguf     # every matrix but the embedding, reconstructed as F32
//! ```
//!
//! `kiln perplexity OUT.gguf` then judges a scheme without a package format for it. Scheme
//! names: `int4-b{32,64}[-off]` (uniform tables), `lut-b{32,64}[-off]`, `lut-b32-g16` (a table
//! per 16 rows), `-off8` (int8 scale and offset codes per block against per-row units), and
//! `LUT4_B32`, the package format's own encoder. Environment knobs for exploring: `LBS_ONLY`
//! (comma-separated schemes), `LBS_KIND` (tensor name part), `LBS_ROUNDS` (alternation
//! rounds), `LBS_STEPS` (scale candidates), `LBS_TABLES` (print the learned tables).

use kiln_format::ggml::{f16_to_f32, f32_to_f16, GgmlType};
use kiln_format::gguf::{GgufFile, GgufWriter};
use kiln_format::kiln_types;
use kiln_format::quant::snr_db;

#[derive(Clone, Copy, Debug)]
enum Store {
    /// f16 per block.
    F16,
    /// int8 codes per block in units of the row's largest (scale and offset alike), as
    /// `LUT4_B32` stores them.
    I8Row,
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    block: usize,
    affine: bool,
    /// Alternation rounds; 0 keeps the uniform table.
    rounds: usize,
    /// Rows sharing a table (`None`: the whole tensor).
    group_rows: Option<usize>,
    store: Store,
}

fn schemes() -> Vec<(&'static str, Cfg)> {
    let c = |block, affine, rounds, group_rows, store| Cfg {
        block,
        affine,
        rounds,
        group_rows,
        store,
    };
    vec![
        ("int4-b32", c(32, false, 0, None, Store::F16)),
        ("lut-b32", c(32, false, 24, None, Store::F16)),
        ("lut-b32-g16", c(32, false, 6, Some(16), Store::F16)),
        ("int4-b64", c(64, false, 0, None, Store::F16)),
        ("lut-b64", c(64, false, 24, None, Store::F16)),
        ("int4-b64-off", c(64, true, 0, None, Store::F16)),
        ("lut-b64-off", c(64, true, 24, None, Store::F16)),
        ("int4-b32-off8", c(32, true, 0, None, Store::I8Row)),
        ("lut-b32-off8", c(32, true, 24, None, Store::I8Row)),
        ("int4-b32-off", c(32, true, 0, None, Store::F16)),
        ("LUT4_B32", c(32, true, usize::MAX, None, Store::I8Row)),
    ]
}

fn bits_per_weight(cfg: &Cfg) -> f64 {
    let per_block = match (cfg.store, cfg.affine) {
        (Store::F16, false) => 16.0,
        (Store::F16, true) => 32.0,
        (Store::I8Row, false) => 8.0,
        (Store::I8Row, true) => 16.0,
    };
    4.0 + per_block / cfg.block as f64
}

fn f16r(v: f32) -> f32 {
    f16_to_f32(f32_to_f16(v))
}

/// Index of the entry of ascending `t` nearest to `v`.
fn nearest(t: &[f32; 16], v: f32) -> usize {
    let i = t.partition_point(|&e| e < v);
    if i == 0 {
        0
    } else if i == 16 || v - t[i - 1] <= t[i] - v {
        i - 1
    } else {
        i
    }
}

/// Indices of `x` for `w = s·t[q] + m`, and the squared error.
fn assign(x: &[f32], t: &[f32; 16], s: f32, m: f32, q: &mut [u8]) -> f32 {
    let mut err = 0.0;
    if s == 0.0 {
        let k = nearest(t, 0.0);
        q.fill(k as u8);
        return x.iter().map(|&v| (v - m) * (v - m)).sum();
    }
    let inv = 1.0 / s;
    let mut mids = [0.0f32; 15];
    for (k, md) in mids.iter_mut().enumerate() {
        *md = 0.5 * (t[k] + t[k + 1]);
    }
    for (o, &v) in q.iter_mut().zip(x) {
        let u = (v - m) * inv;
        // The nearest entry: how many midpoints lie below (ties go to the lower entry).
        let k = mids.iter().map(|&md| usize::from(md < u)).sum::<usize>();
        *o = k as u8;
        let e = v - (s * t[k] + m);
        err += e * e;
    }
    err
}

/// Least-squares scale (and offset) of `x` for fixed indices.
fn refit(x: &[f32], t: &[f32; 16], q: &[u8], affine: bool) -> (f32, f32) {
    let n = x.len() as f64;
    let (mut st, mut stt, mut sx, mut sxt) = (0.0f64, 0.0, 0.0, 0.0);
    for (&v, &k) in x.iter().zip(q) {
        let tk = t[k as usize] as f64;
        st += tk;
        stt += tk * tk;
        sx += v as f64;
        sxt += v as f64 * tk;
    }
    if affine {
        let det = n * stt - st * st;
        if det.abs() < 1e-30 {
            return (0.0, (sx / n) as f32);
        }
        let s = (n * sxt - st * sx) / det;
        let m = (sx - s * st) / n;
        (s as f32, m as f32)
    } else if stt > 0.0 {
        ((sxt / stt) as f32, 0.0)
    } else {
        (0.0, 0.0)
    }
}

/// The best (s, m) of one block for table `t`, each candidate rounded by `round`.
fn fit_block(
    x: &[f32],
    t: &[f32; 16],
    affine: bool,
    round: &dyn Fn(f32, f32) -> (f32, f32),
    q: &mut [u8],
) -> (f32, f32, f32) {
    let mut trial = vec![0u8; x.len()];
    let mut best = (f32::INFINITY, 0.0f32, 0.0f32);
    let mut consider = |s: f32, m: f32, best: &mut (f32, f32, f32), q: &mut [u8]| {
        let (s, m) = round(s, m);
        let e = assign(x, t, s, m, &mut trial);
        if e < best.0 {
            *best = (e, s, m);
            q.copy_from_slice(&trial);
        }
        // One least-squares refit for these indices.
        let (s2, m2) = refit(x, t, &trial, affine);
        let (s2, m2) = round(s2, m2);
        let e2 = assign(x, t, s2, m2, &mut trial);
        if e2 < best.0 {
            *best = (e2, s2, m2);
            q.copy_from_slice(&trial);
        }
    };
    let (lo, hi) = (t[0], t[15]);
    if affine {
        let (mn, mx) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if hi > lo {
            for f in [1.0f32, 0.95, 0.9, 0.85, 0.8, 1.05] {
                // Both orientations: the table need not be symmetric.
                let s = (mx - mn) / (hi - lo) * f;
                let mid = 0.5 * (mx + mn);
                let tmid = 0.5 * (hi + lo);
                consider(s, mid - s * tmid, &mut best, q);
                consider(-s, mid + s * tmid, &mut best, q);
            }
        }
    } else {
        let mut amax = 0.0f32;
        for &v in x {
            if v.abs() > amax.abs() {
                amax = v;
            }
        }
        if amax == 0.0 {
            q.fill(nearest(t, 0.0) as u8);
            return (0.0, 0.0, 0.0);
        }
        for e in [lo, hi] {
            if e == 0.0 {
                continue;
            }
            let steps: usize = std::env::var("LBS_STEPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(12);
            for step in 0..=steps {
                let f = 0.8125 + step as f32 * 0.375 / steps as f32;
                consider(amax / e * f, 0.0, &mut best, q);
            }
        }
    }
    best
}

/// Reconstruction of `w` under `cfg`. A tensor-wide table is learned on a sample of rows
/// (a table of 16 entries needs far fewer than a tensor's weights), then every block is fitted.
fn reconstruct(w: &[f32], rows: usize, cols: usize, cfg: &Cfg) -> Vec<f32> {
    if cfg.rounds == usize::MAX {
        // The stored format, as `kiln convert --quant lut4-block32` writes it.
        let ty = kiln_types::KilnType::Lut4B32 { group: None };
        let data = kiln_types::encode_lut4_b32(ty, w, rows, cols).unwrap();
        let mut back = vec![0.0f32; w.len()];
        for (r, row) in back.chunks_exact_mut(cols).enumerate() {
            kiln_types::dequantize_row(ty, &data, rows, cols, r, row);
        }
        return back;
    }
    let rounds = if cfg.rounds > 0 {
        std::env::var("LBS_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cfg.rounds)
    } else {
        0
    };
    let stride = (rows * cols / 65536).max(1);
    if rounds > 0 && cfg.group_rows.is_none() && stride > 1 {
        let sample: Vec<f32> = w
            .chunks_exact(cols)
            .step_by(stride)
            .flatten()
            .copied()
            .collect();
        let (_, tables) = fit(&sample, sample.len() / cols, cols, cfg, rounds, None);
        return fit(w, rows, cols, cfg, 0, Some(tables)).0;
    }
    fit(w, rows, cols, cfg, rounds, None).0
}

/// `rounds` of alternation from `init` (or the uniform table), then the reconstruction and
/// tables.
fn fit(
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &Cfg,
    rounds: usize,
    init: Option<Vec<[f32; 16]>>,
) -> (Vec<f32>, Vec<[f32; 16]>) {
    let b = cfg.block;
    let nb = cols / b;
    let group_rows = cfg.group_rows.unwrap_or(rows);
    let groups = rows / group_rows;
    let uniform: [f32; 16] = if cfg.affine {
        std::array::from_fn(|i| i as f32)
    } else {
        std::array::from_fn(|i| i as f32 - 8.0)
    };
    let mut tables = init.unwrap_or_else(|| vec![uniform; groups]);
    let mut s = vec![0.0f32; rows * nb];
    let mut m = vec![0.0f32; rows * nb];
    let mut q = vec![0u8; rows * cols];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for round in 0..=rounds {
        // Scales (and offsets) for the current tables, stored as f16.
        let rows_per = rows.div_ceil(threads);
        std::thread::scope(|sc| {
            for (ci, ((sq, mq), qq)) in s
                .chunks_mut(rows_per * nb)
                .zip(m.chunks_mut(rows_per * nb))
                .zip(q.chunks_mut(rows_per * cols))
                .enumerate()
            {
                let tables = &tables;
                sc.spawn(move || {
                    let f16round = |a: f32, b: f32| (f16r(a), f16r(b));
                    for (k, ((sv, mv), qb)) in sq
                        .iter_mut()
                        .zip(mq.iter_mut())
                        .zip(qq.chunks_mut(b))
                        .enumerate()
                    {
                        let blk = ci * rows_per * nb + k;
                        let r = blk / nb;
                        let x = &w[blk * b..(blk + 1) * b];
                        let (_, s1, m1) =
                            fit_block(x, &tables[r / group_rows], cfg.affine, &f16round, qb);
                        *sv = s1;
                        *mv = m1;
                    }
                });
            }
        });
        if let Store::I8Row = cfg.store {
            // 8-bit scales and offsets against each row's largest: requantize and refit.
            for r in 0..rows {
                let smax = s[r * nb..(r + 1) * nb]
                    .iter()
                    .fold(0.0f32, |a, v| a.max(v.abs()));
                let mmax = m[r * nb..(r + 1) * nb]
                    .iter()
                    .fold(0.0f32, |a, v| a.max(v.abs()));
                let round = |a: f32, bb: f32| {
                    let qs = if smax > 0.0 {
                        (a / smax * 127.0).round().clamp(-127.0, 127.0) * smax / 127.0
                    } else {
                        0.0
                    };
                    let qm = if mmax > 0.0 {
                        (bb / mmax * 127.0).round().clamp(-127.0, 127.0) * mmax / 127.0
                    } else {
                        0.0
                    };
                    (qs, qm)
                };
                for k in 0..nb {
                    let blk = r * nb + k;
                    let x = &w[blk * b..(blk + 1) * b];
                    let t = &tables[r / group_rows];
                    let (_, s1, m1) = fit_block(x, t, cfg.affine, &round, &mut q[blk * b..][..b]);
                    s[blk] = s1;
                    m[blk] = m1;
                }
            }
        }
        if round == rounds {
            break;
        }
        // Least-squares tables for these scales and indices.
        for (g, table) in tables.iter_mut().enumerate() {
            let (mut num, mut den) = ([0.0f64; 16], [0.0f64; 16]);
            for blk in g * group_rows * nb..(g + 1) * group_rows * nb {
                let (sv, mv) = (s[blk] as f64, m[blk] as f64);
                for (&v, &k) in w[blk * b..(blk + 1) * b]
                    .iter()
                    .zip(&q[blk * b..(blk + 1) * b])
                {
                    num[k as usize] += sv * (v as f64 - mv);
                    den[k as usize] += sv * sv;
                }
            }
            for k in 0..16 {
                if den[k] > 0.0 {
                    table[k] = f16r((num[k] / den[k]) as f32);
                }
            }
            table.sort_by(f32::total_cmp);
        }
    }
    let mut back = vec![0.0f32; w.len()];
    for blk in 0..rows * nb {
        let t = &tables[(blk / nb) / group_rows];
        for i in blk * b..(blk + 1) * b {
            back[i] = s[blk] * t[q[i] as usize] + m[blk];
        }
    }
    if std::env::var("LBS_TABLES").is_ok() {
        eprintln!("tables {tables:?}");
    }
    (back, tables)
}

fn kept(name: &str) -> bool {
    name == "token_embd.weight" || name == "output.weight"
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = GgufFile::open(&args[1]).expect("a GGUF file");
    if args.get(2).map(String::as_str) == Some("--write") {
        let (name, out) = (&args[3], &args[4]);
        let cfg = schemes()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("a scheme name")
            .1;
        let mut writer = GgufWriter::new();
        for (k, v) in file.metadata() {
            if k != "general.alignment" {
                writer.add_metadata(k.clone(), v.clone());
            }
        }
        let (mut snrs, mut wsum) = (Vec::new(), 0.0f64);
        for t in file.tensors() {
            let cols = t.dims[0] as usize;
            if t.dims.len() == 2 && !kept(&t.name) && cols % cfg.block == 0 {
                let rows = t.dims[1] as usize;
                let w = file.tensor_f32(t).unwrap();
                let back = reconstruct(&w, rows, cols, &cfg);
                let snr = snr_db(&w, &back);
                eprintln!("{:<28} {:>6} {snr:7.2}", t.name, t.ty.name());
                snrs.push(snr);
                wsum += w.len() as f64;
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
            "{name}: {} tensors, {:.1} M weights, SNR mean {mean:.2} min {min:.2} dB, {:.3} b/w",
            snrs.len(),
            wsum / 1e6,
            bits_per_weight(&cfg)
        );
        writer.write(out).unwrap();
        return;
    }
    let per_kind: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1);
    let only: Vec<String> = std::env::var("LBS_ONLY")
        .map(|v| v.split(',').map(String::from).collect())
        .unwrap_or_default();
    let list: Vec<_> = schemes()
        .into_iter()
        .filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n))
        .collect();
    print!("{:<26} {:>5} |", "tensor", "type");
    for (n, c) in &list {
        print!(" {:>13}", format!("{n} {:.2}", bits_per_weight(c)));
    }
    println!();
    let mut seen = std::collections::HashMap::new();
    for t in file.tensors() {
        if t.dims.len() != 2 || t.dims[0] % 64 != 0 || t.dims[1] % 16 != 0 || kept(&t.name) {
            continue;
        }
        let kind = t.name.rsplit('.').nth(1).unwrap_or("").to_string();
        let n = seen.entry(kind).or_insert(0usize);
        if *n >= per_kind || std::env::var("LBS_KIND").is_ok_and(|k| !t.name.contains(&k)) {
            continue;
        }
        *n += 1;
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let w = file.tensor_f32(t).unwrap();
        print!("{:<26} {:>5} |", t.name, t.ty.name());
        for (_, c) in &list {
            let back = reconstruct(&w, rows, cols, c);
            print!(" {:>13.2}", snr_db(&w, &back));
        }
        println!();
    }
}
