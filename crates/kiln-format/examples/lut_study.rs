//! How good are k-means lookup tables against block-wise int4, and why?
//!
//! For a sample of the matrices of a GGUF file, prints the weight SNR (dB) of:
//! - `int4-b32`: symmetric int4 in blocks of 32 with searched scales (what `--quant
//!   int4-block32` stores);
//! - `lut4-g16` with one k-means run, with the best of 8 runs, and with the optimal 16-entry
//!   table (exact 1-D k-means by dynamic programming), to measure what Lloyd leaves behind;
//! - `lut4-g1` (one table per row, about as many bits as int4-b32);
//! - `lut4-g16 + row scale` (rows divided by their RMS before the shared table, the scale
//!   stored per row) and `lut4 + block32 scale` (each block of 32 divided by its largest
//!   magnitude, one table for the tensor, the scale stored per block as int4-b32 does):
//!   what it takes for a table to beat block-wise int4.
//!
//! ```sh
//! cargo run --release -p kiln-format --example lut_study -- models/X.gguf [tensors per kind]
//! ```

use kiln_format::ggml::{self, f16_to_f32, f32_to_f16};
use kiln_format::gguf::GgufFile;
use kiln_format::kiln_types::{self, KilnType, LutOptions};
use kiln_format::quant::{kmeans, snr_db};

/// The optimal `k`-entry table for `x`: exact 1-D k-means by dynamic programming over the
/// sorted values (divide and conquer over the split points).
fn optimal_table(x: &[f32], k: usize) -> Vec<f32> {
    let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    v.sort_by(f64::total_cmp);
    // Merge equal values.
    let (mut xs, mut ws) = (Vec::new(), Vec::new());
    for a in v {
        if xs.last() == Some(&a) {
            *ws.last_mut().unwrap() += 1.0;
        } else {
            xs.push(a);
            ws.push(1.0);
        }
    }
    let m = xs.len();
    if m <= k {
        return xs.iter().map(|&a| a as f32).collect();
    }
    let (mut p0, mut p1, mut p2) = (vec![0.0; m + 1], vec![0.0; m + 1], vec![0.0; m + 1]);
    for i in 0..m {
        p0[i + 1] = p0[i] + ws[i];
        p1[i + 1] = p1[i] + ws[i] * xs[i];
        p2[i + 1] = p2[i] + ws[i] * xs[i] * xs[i];
    }
    let cost = |l: usize, r: usize| -> f64 {
        let w = p0[r] - p0[l];
        if w == 0.0 {
            return 0.0;
        }
        let s = p1[r] - p1[l];
        (p2[r] - p2[l] - s * s / w).max(0.0)
    };
    // dp[j][i]: best cost of the first i points in j clusters; arg for reconstruction.
    let mut prev: Vec<f64> = (0..=m).map(|i| cost(0, i)).collect();
    let mut args: Vec<Vec<usize>> = vec![vec![0; m + 1]];
    for _ in 1..k {
        let mut cur = vec![f64::INFINITY; m + 1];
        let mut arg = vec![0usize; m + 1];
        // solve(lo, hi, optlo, opthi)
        let mut stack = vec![(1usize, m, 0usize, m)];
        while let Some((lo, hi, ol, oh)) = stack.pop() {
            if lo > hi {
                continue;
            }
            let mid = (lo + hi) / 2;
            let (mut best, mut bi) = (f64::INFINITY, ol);
            for (s, &p) in prev.iter().enumerate().take(oh.min(mid) + 1).skip(ol) {
                let c = p + cost(s, mid);
                if c < best {
                    best = c;
                    bi = s;
                }
            }
            cur[mid] = best;
            arg[mid] = bi;
            if mid > lo {
                stack.push((lo, mid - 1, ol, bi));
            }
            stack.push((mid + 1, hi, bi, oh));
        }
        cur[0] = 0.0;
        prev = cur;
        args.push(arg);
    }
    let mut table = Vec::new();
    let mut r = m;
    for j in (0..k).rev() {
        let l = if j == 0 { 0 } else { args[j][r] };
        if r > l {
            table.push(((p1[r] - p1[l]) / (p0[r] - p0[l])) as f32);
        }
        r = l;
    }
    table.reverse();
    table
}

fn nearest(t: &[f32], v: f32) -> f32 {
    let mut best = t[0];
    for &c in t {
        if (c - v).abs() < (best - v).abs() {
            best = c;
        }
    }
    best
}

fn f16r(v: f32) -> f32 {
    f16_to_f32(f32_to_f16(v))
}

fn lut_snr(w: &[f32], rows: usize, cols: usize, group: usize, restarts: u32) -> f64 {
    let ty = KilnType::Lut {
        bits: 4,
        group: Some(group as u32),
    };
    let opts = LutOptions {
        restarts,
        ..LutOptions::default()
    };
    let data = kiln_types::encode_lut(ty, w, rows, cols, opts).unwrap();
    let mut back = vec![0.0; w.len()];
    for (r, row) in back.chunks_exact_mut(cols).enumerate() {
        kiln_types::dequantize_row(ty, &data, rows, cols, r, row);
    }
    snr_db(w, &back)
}

/// SNR of tables learned on normalized values: `norm` gives each piece's scale (pieces of
/// `piece` consecutive values), the table is shared by `group` values.
fn scaled_lut_snr(w: &[f32], piece: usize, group: usize, scale: impl Fn(&[f32]) -> f32) -> f64 {
    let mut back = vec![0.0f32; w.len()];
    for (g, (x, y)) in w.chunks(group).zip(back.chunks_mut(group)).enumerate() {
        let scales: Vec<f32> = x.chunks(piece).map(|p| f16r(scale(p))).collect();
        let norm: Vec<f32> = x
            .chunks(piece)
            .zip(&scales)
            .flat_map(|(p, &s)| p.iter().map(move |&v| if s != 0.0 { v / s } else { 0.0 }))
            .collect();
        let km = kmeans::kmeans_1d(&norm, 16, g as u64, kmeans::KMeansOptions::default());
        let table: Vec<f32> = km.centroids.iter().map(|&c| f16r(c as f32)).collect();
        for ((yp, np), &s) in y.chunks_mut(piece).zip(norm.chunks(piece)).zip(&scales) {
            for (o, &n) in yp.iter_mut().zip(np) {
                *o = s * nearest(&table, n);
            }
        }
    }
    snr_db(w, &back)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = GgufFile::open(&args[1]).expect("a GGUF file");
    let per_kind: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    println!(
        "{:<26} {:>6} | {:>8} | {:>8} {:>8} {:>8} | {:>8} | {:>10} {:>10}",
        "tensor",
        "type",
        "int4-b32",
        "g16 x1",
        "g16 x8",
        "g16 opt",
        "lut4-g1",
        "g16+row",
        "blk32+tab"
    );
    let mut seen = std::collections::HashMap::new();
    for t in file.tensors() {
        if t.dims.len() != 2 || t.dims[0] % 32 != 0 || t.dims[1] % 16 != 0 {
            continue;
        }
        let kind = t.name.rsplit('.').nth(1).unwrap_or("").to_string();
        let n = seen.entry(kind).or_insert(0usize);
        if *n >= per_kind || t.dims[1] > 8192 {
            continue;
        }
        *n += 1;
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let w = file.tensor_f32(t).unwrap();
        let q4 = kiln_format::ggml::dequantize;
        let mut back = vec![0.0; w.len()];
        let mut codes = [0u8; 32];
        let mut q4bytes = Vec::new();
        for x in w.chunks_exact(32) {
            let d = kiln_types::quantize_int4_searched(x, &mut codes);
            q4bytes.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            for j in 0..16 {
                q4bytes.push(codes[j] | (codes[j + 16] << 4));
            }
        }
        q4(ggml::GgmlType::Q4_0, &q4bytes, &mut back).unwrap();
        let int4 = snr_db(&w, &back);
        let g16 = lut_snr(&w, rows, cols, 16, 1);
        let g16x8 = lut_snr(&w, rows, cols, 16, 8);
        // Optimal tables for the 16-row groups.
        let gl = 16 * cols;
        let mut opt = vec![0.0f32; w.len()];
        for (x, y) in w.chunks(gl).zip(opt.chunks_mut(gl)) {
            let table: Vec<f32> = optimal_table(x, 16).into_iter().map(f16r).collect();
            for (o, &v) in y.iter_mut().zip(x) {
                *o = nearest(&table, v);
            }
        }
        let g16opt = snr_db(&w, &opt);
        let g1 = lut_snr(&w, rows, cols, 1, 1);
        let rms = |p: &[f32]| (p.iter().map(|v| v * v).sum::<f32>() / p.len() as f32).sqrt();
        let absmax = |p: &[f32]| p.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let row = scaled_lut_snr(&w, cols, gl, rms);
        let blk = scaled_lut_snr(&w, 32, w.len(), absmax);
        println!(
            "{:<26} {:>6} | {int4:>8.2} | {g16:>8.2} {g16x8:>8.2} {g16opt:>8.2} | {g1:>8.2} | {row:>10.2} {blk:>10.2}",
            t.name,
            t.ty.name()
        );
    }
}
