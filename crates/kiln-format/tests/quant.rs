//! Quantizers: error bounds, k-means properties, reference dot products, argument checking and
//! quality on the real models' weights (fetched by `scripts/fetch-models`; the real-model tests
//! fail, rather than skip, when they are absent).

use std::path::PathBuf;

use kiln_format::gguf::GgufFile;
use kiln_format::quant::kmeans::{kmeans_1d, KMeansOptions};
use kiln_format::quant::{
    cosine, quantize, quantize_int4_block, quantize_int8_channel, quantize_lut, snr_db, Int4Block,
    Int8Channel, Lut, QuantMatrix, Scheme,
};
use proptest::prelude::*;

/// Deterministic normal deviates (Box–Muller over a 64-bit LCG).
fn gaussian(n: usize, seed: u64, sigma: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * sigma
        })
        .collect()
}

/// Gaussian weights with a few outliers and rows of different scales, as real layers have.
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut w = gaussian(rows * cols, seed, 0.02);
    for (r, row) in w.chunks_mut(cols).enumerate() {
        let scale = 1.0 + (r % 5) as f32 * 0.5;
        row.iter_mut().for_each(|v| *v *= scale);
        row[(r * 7) % cols] *= 12.0;
    }
    w
}

fn check_int8_bound(w: &[f32], q: &Int8Channel) {
    let d = q.dequantize();
    for (i, (&a, &b)) in w.iter().zip(&d).enumerate() {
        let s = q.scales()[i / q.cols()];
        // Half a step, plus the f32 rounding of the value and of `code · scale` (a few ulps of
        // the value: far from zero they outweigh a relative margin on the step).
        assert!(
            (a - b).abs() <= s / 2.0 * (1.0 + 1e-5) + 4.0 * f32::EPSILON * a.abs(),
            "element {i}: {a} -> {b}, scale {s}"
        );
    }
}

fn check_int4_bound(w: &[f32], q: &Int4Block) {
    let d = q.dequantize();
    for (i, (&a, &b)) in w.iter().zip(&d).enumerate() {
        let s = q.scales()[i / q.block()].to_f32().abs();
        assert!(
            (a - b).abs() <= s / 2.0 * (1.0 + 1e-5) + 4.0 * f32::EPSILON * a.abs() + 1e-12,
            "element {i} (symmetric {}): {a} -> {b}, scale {s}",
            q.symmetric()
        );
    }
}

fn check_nearest(w: &[f32], q: &Lut) {
    for r in 0..q.rows() {
        let table = q.table_for_row(r);
        assert!(
            table.windows(2).all(|p| p[0] <= p[1]),
            "table not ascending"
        );
        for c in 0..q.cols() {
            let v = w[r * q.cols() + c] as f64;
            let got = (v - table[q.index(r, c) as usize] as f64).abs();
            let best = table
                .iter()
                .map(|&t| (v - t as f64).abs())
                .fold(f64::INFINITY, f64::min);
            assert!(
                got <= best,
                "row {r} col {c}: {v} took an entry {got} away, nearest is {best}"
            );
        }
    }
}

#[test]
fn int8_error_is_at_most_half_a_step() {
    let (rows, cols) = (48, 200);
    let w = weights(rows, cols, 1);
    let q = quantize_int8_channel(&w, rows, cols).unwrap();
    check_int8_bound(&w, &q);
    assert!(q.codes().iter().all(|&c| c != i8::MIN));
    // The largest weight of each row maps to ±127.
    for r in 0..rows {
        assert_eq!(
            q.codes()[r * cols..(r + 1) * cols]
                .iter()
                .map(|c| c.unsigned_abs())
                .max(),
            Some(127)
        );
    }
    assert_eq!(q.byte_size(), rows * cols + 4 * rows);
}

#[test]
fn int4_error_is_at_most_half_a_step_within_each_block() {
    let (rows, cols) = (32, 256);
    let w = weights(rows, cols, 2);
    for block in [32, 64] {
        for symmetric in [true, false] {
            let q = quantize_int4_block(&w, rows, cols, block, symmetric).unwrap();
            check_int4_bound(&w, &q);
            let blocks = rows * cols / block;
            let meta = if symmetric { 2 } else { 4 };
            assert_eq!(q.byte_size(), rows * cols / 2 + meta * blocks);
        }
    }
}

#[test]
fn int4_handles_one_signed_blocks_and_zero_blocks() {
    // All-positive, all-negative, all-zero and constant blocks.
    let mut w = vec![0.0f32; 4 * 32];
    for i in 0..32 {
        w[i] = 1.0 + i as f32 * 0.01;
        w[32 + i] = -2.0 - i as f32 * 0.3;
        w[96 + i] = 0.75;
    }
    for symmetric in [true, false] {
        let q = quantize_int4_block(&w, 1, 128, 32, symmetric).unwrap();
        check_int4_bound(&w, &q);
        assert!(q.dequantize()[64..96].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn symmetric_int4_uses_the_long_side_for_the_larger_magnitude() {
    // Positive-heavy block: the scale turns negative so +8 steps reach the largest weight.
    let mut w: Vec<f32> = (0..32).map(|i| (i as f32 - 8.0) * 0.1).collect();
    let q = quantize_int4_block(&w, 1, 32, 32, true).unwrap();
    assert!(q.scales()[0].to_f32() < 0.0);
    check_int4_bound(&w, &q);
    w.iter_mut().for_each(|v| *v = -*v);
    let q = quantize_int4_block(&w, 1, 32, 32, true).unwrap();
    assert!(q.scales()[0].to_f32() > 0.0);
    check_int4_bound(&w, &q);
}

#[test]
fn lut_assigns_every_weight_its_nearest_entry() {
    let (rows, cols) = (64, 96);
    let w = weights(rows, cols, 3);
    for bits in [1, 2, 3, 4, 6, 8] {
        for group in [None, Some(8), Some(64)] {
            let q = quantize_lut(&w, rows, cols, bits, group, 7).unwrap();
            check_nearest(&w, &q);
            let groups = group.map_or(1, |g| rows / g);
            assert_eq!(q.tables().len(), groups << bits);
            assert_eq!(
                q.byte_size(),
                (rows * cols * bits as usize).div_ceil(8) + 4 * (groups << bits)
            );
        }
    }
}

#[test]
fn lut_centroids_are_the_means_of_their_weights_at_convergence() {
    let w = weights(16, 256, 4);
    let q = quantize_lut(&w, 16, 256, 4, None, 3).unwrap();
    let table = q.table_for_row(0);
    let mut sums = vec![(0.0f64, 0usize); table.len()];
    for r in 0..16 {
        for c in 0..256 {
            let s = &mut sums[q.index(r, c) as usize];
            s.0 += w[r * 256 + c] as f64;
            s.1 += 1;
        }
    }
    for (j, &(sum, n)) in sums.iter().enumerate() {
        assert!(n > 0, "entry {j} unused");
        let mean = sum / n as f64;
        assert!(
            (mean - table[j] as f64).abs() <= 1e-6 * mean.abs().max(1e-3),
            "entry {j}: {} vs mean {mean}",
            table[j]
        );
    }
}

#[test]
fn lut_of_few_distinct_values_is_exact() {
    let w: Vec<f32> = (0..64).map(|i| [0.5f32, -1.25, 3.0][i % 3]).collect();
    let q = quantize_lut(&w, 4, 16, 2, None, 0).unwrap();
    assert_eq!(q.dequantize(), w);
    assert_eq!(snr_db(&w, &q.dequantize()), f64::INFINITY);
}

#[test]
fn kmeans_plus_plus_is_deterministic_for_a_seed() {
    let v = gaussian(20000, 5, 1.0);
    let opts = KMeansOptions::default();
    let a = kmeans_1d(&v, 16, 42, opts);
    let b = kmeans_1d(&v, 16, 42, opts);
    assert_eq!(a, b);
    assert_eq!(a.initial.len(), 16);
    assert!(a.initial.windows(2).all(|p| p[0] < p[1]));
    // Every starting centroid is one of the values.
    assert!(a.initial.iter().all(|&c| v.iter().any(|&x| x as f64 == c)));
    let c = kmeans_1d(&v, 16, 43, opts);
    assert_ne!(a.initial, c.initial, "another seed should start elsewhere");
    // Whole-matrix quantization is deterministic too, whatever the thread scheduling.
    let w = weights(64, 128, 6);
    assert_eq!(
        quantize_lut(&w, 64, 128, 4, Some(4), 9).unwrap(),
        quantize_lut(&w, 64, 128, 4, Some(4), 9).unwrap()
    );
}

#[test]
fn lloyd_never_increases_distortion_and_converges() {
    for (seed, k) in [(1u64, 4usize), (2, 16), (3, 64), (4, 256)] {
        let v = weights(8, 4096, seed);
        let km = kmeans_1d(
            &v,
            k,
            seed,
            KMeansOptions {
                max_iterations: 10_000,
                track_distortion: true,
            },
        );
        assert!(
            km.converged,
            "k {k}: not converged after {} iterations",
            km.iterations
        );
        assert_eq!(km.distortion.len(), km.iterations + 1);
        for (i, p) in km.distortion.windows(2).enumerate() {
            assert!(
                p[1] <= p[0] * (1.0 + 1e-12),
                "k {k}: distortion rose at iteration {}: {} -> {}",
                i + 1,
                p[0],
                p[1]
            );
        }
        assert!(
            km.distortion.last() < km.distortion.first(),
            "k {k}: Lloyd did not improve the start"
        );
    }
}

#[test]
fn lloyd_relocates_empty_clusters() {
    // Two tight, distant clusters and k = 6: several centroids compete for the same values.
    let mut v = gaussian(3000, 8, 0.01);
    v.extend(gaussian(3000, 9, 0.01).iter().map(|x| x + 100.0));
    for seed in 0..20 {
        let km = kmeans_1d(
            &v,
            6,
            seed,
            KMeansOptions {
                max_iterations: 10_000,
                track_distortion: true,
            },
        );
        assert_eq!(km.centroids.len(), 6);
        assert!(km.centroids.windows(2).all(|p| p[0] < p[1]));
        assert!(km.converged);
        assert!(km
            .distortion
            .windows(2)
            .all(|p| p[1] <= p[0] * (1.0 + 1e-12)));
    }
}

fn all_schemes() -> Vec<Scheme> {
    let mut s = vec![Scheme::Int8Channel];
    for block in [32, 64] {
        for symmetric in [true, false] {
            s.push(Scheme::Int4Block { block, symmetric });
        }
    }
    for bits in [2, 4, 6, 8] {
        for group_channels in [None, Some(16)] {
            s.push(Scheme::Lut {
                bits,
                group_channels,
            });
        }
    }
    s
}

#[test]
fn reference_dot_equals_dequantize_then_dot() {
    let (rows, cols) = (32, 192);
    let w = weights(rows, cols, 10);
    let x = gaussian(cols, 11, 1.0);
    for scheme in all_schemes() {
        let q = quantize(&w, rows, cols, scheme, 1).unwrap();
        assert_eq!(q.scheme(), scheme);
        let d = q.dequantize();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            q.dequantize_row(r, &mut row);
            assert_eq!(row, d[r * cols..(r + 1) * cols]);
            let want: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = q.dot_row(r, &x) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * mag.max(want.abs()),
                "{scheme} row {r}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let w = weights(16, 96, 12);
    assert!(
        quantize_int4_block(&w, 16, 96, 64, true).is_err(),
        "64 does not divide 96"
    );
    assert!(quantize_int4_block(&w, 16, 96, 0, false).is_err());
    assert!(quantize_int4_block(&w, 16, 96, 3, false).is_err());
    for bits in [0, 5, 7, 9, 255] {
        assert!(
            quantize_lut(&w, 16, 96, bits, None, 0).is_err(),
            "bits {bits}"
        );
    }
    assert!(
        quantize_lut(&w, 16, 96, 4, Some(5), 0).is_err(),
        "5 does not divide 16"
    );
    assert!(quantize_lut(&w, 16, 96, 4, Some(0), 0).is_err());
    assert!(quantize_int8_channel(&w, 16, 95).is_err(), "shape mismatch");
    assert!(quantize_int8_channel(&w, 0, 96).is_err());
    assert!(quantize_int8_channel(&[], 0, 0).is_err());
    let mut bad = w.clone();
    bad[100] = f32::NAN;
    let e = quantize_lut(&bad, 16, 96, 4, None, 0).unwrap_err();
    assert!(e.to_string().contains("row 1, column 4"), "{e}");
    bad[100] = f32::INFINITY;
    assert!(quantize_int4_block(&bad, 16, 96, 32, true).is_err());
    // A block whose scale exceeds f16.
    let huge = vec![1e9f32; 32];
    assert!(quantize_int4_block(&huge, 1, 32, 32, true).is_err());
    // Parts of the wrong size.
    assert!(Int8Channel::from_parts(2, 3, vec![0; 6], vec![1.0]).is_err());
    assert!(Int4Block::from_parts(
        2,
        64,
        32,
        vec![0; 64],
        vec![half::f16::ONE; 4],
        Some(vec![])
    )
    .is_err());
    assert!(Lut::from_parts(4, 8, 4, Some(2), vec![0.0; 16], vec![0; 16]).is_err());
    // Unpacked indices: one per element, each within its bits.
    assert!(Lut::from_indices(2, 4, 4, None, vec![0.0; 16], &[0; 7]).is_err());
    assert!(Lut::from_indices(2, 4, 4, None, vec![0.0; 16], &[0, 0, 0, 16, 0, 0, 0, 0]).is_err());
    assert!(Lut::from_indices(2, 4, 2, None, vec![0.0; 4], &[3; 8]).is_ok());
}

/// A matrix rebuilt from its unpacked indices is the matrix (6 bits: fields straddle bytes).
#[test]
fn indices_round_trip() {
    let w = weights(8, 64, 17);
    for bits in [2u8, 4, 6] {
        let q = quantize_lut(&w, 8, 64, bits, Some(2), 3).unwrap();
        let idx: Vec<u8> = (0..8)
            .flat_map(|r| (0..64).map(move |c| (r, c)))
            .map(|(r, c)| q.index(r, c))
            .collect();
        let back = Lut::from_indices(8, 64, bits, Some(2), q.tables().to_vec(), &idx).unwrap();
        assert_eq!(back, q, "{bits} bits");
    }
}

#[test]
fn parts_round_trip() {
    let w = weights(16, 64, 13);
    let a = quantize_int8_channel(&w, 16, 64).unwrap();
    assert_eq!(
        Int8Channel::from_parts(16, 64, a.codes().to_vec(), a.scales().to_vec()).unwrap(),
        a
    );
    let b = quantize_int4_block(&w, 16, 64, 32, false).unwrap();
    let b2 = Int4Block::from_parts(
        16,
        64,
        32,
        b.codes().to_vec(),
        b.scales().to_vec(),
        b.offsets().map(|o| o.to_vec()),
    );
    assert_eq!(b2.unwrap(), b);
    let c = quantize_lut(&w, 16, 64, 6, Some(4), 1).unwrap();
    assert_eq!(
        Lut::from_parts(
            16,
            64,
            6,
            Some(4),
            c.tables().to_vec(),
            c.indices().to_vec()
        )
        .unwrap(),
        c
    );
}

#[test]
fn scheme_names() {
    let names: Vec<String> = all_schemes().iter().map(|s| s.to_string()).collect();
    assert_eq!(
        names,
        [
            "int8-channel",
            "int4-block32",
            "int4-block32-offset",
            "int4-block64",
            "int4-block64-offset",
            "lut2",
            "lut2-g16",
            "lut4",
            "lut4-g16",
            "lut6",
            "lut6-g16",
            "lut8",
            "lut8-g16",
        ]
    );
}

#[test]
fn metrics() {
    let a = [1.0f32, -2.0, 3.0];
    assert_eq!(snr_db(&a, &a), f64::INFINITY);
    assert!((cosine(&a, &a) - 1.0).abs() < 1e-12);
    let neg: Vec<f32> = a.iter().map(|v| -v).collect();
    assert!((cosine(&a, &neg) + 1.0).abs() < 1e-12);
    // Noise of 1% of the signal's power is 20 dB.
    let b = [1.1f32, -2.0, 3.0];
    let want = 10.0 * (14.0f64 / (0.1f32 as f64 - 0.0).powi(2)).log10();
    assert!((snr_db(&a, &b) - want).abs() < 1e-3);
    assert_eq!(cosine(&[0.0; 3], &[0.0; 3]), 1.0);
    assert_eq!(cosine(&[0.0; 3], &a), 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bounds_hold_for_arbitrary_weights(
        rows in 1usize..6,
        blocks in 1usize..4,
        values in prop::collection::vec(-1e3f32..1e3, 6 * 3 * 32),
        scale_exp in -20i32..4,
    ) {
        let cols = blocks * 32;
        let scale = 2f32.powi(scale_exp);
        let w: Vec<f32> = values[..rows * cols].iter().map(|v| v * scale).collect();
        check_int8_bound(&w, &quantize_int8_channel(&w, rows, cols).unwrap());
        check_int4_bound(&w, &quantize_int4_block(&w, rows, cols, 32, true).unwrap());
        check_int4_bound(&w, &quantize_int4_block(&w, rows, cols, 32, false).unwrap());
        check_nearest(&w, &quantize_lut(&w, rows, cols, 3, None, 5).unwrap());
    }
}

/// Optimal (Lloyd–Max) quantizers of the unit normal: mean squared error for 2, 4, 8 and 16
/// levels, from Max (1960), "Quantizing for minimum distortion".
const LLOYD_MAX_MSE: [(u8, f64); 4] = [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)];

#[test]
fn lut_reaches_the_lloyd_max_optimum_on_gaussians() {
    let n = 1 << 20;
    let w = gaussian(n, 21, 1.0);
    for (bits, mse) in LLOYD_MAX_MSE {
        let q = quantize_lut(&w, 1024, 1024, bits, None, 1).unwrap();
        let snr = snr_db(&w, &q.dequantize());
        let want = -10.0 * mse.log10();
        assert!(
            (snr - want).abs() < 0.05,
            "lut{bits}: {snr:.3} dB, Lloyd-Max {want:.3} dB"
        );
    }
    // Block-wise int4 beats the best single 16-entry table here: its per-block scales (half a
    // bit per weight) adapt to each block's range, which no shared table can.
    let int4 = quantize_int4_block(&w, 1024, 1024, 32, true).unwrap();
    assert!(snr_db(&w, &int4.dequantize()) > 21.0);
}

// Real weights.

fn model(name: &str) -> GgufFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    assert!(
        path.exists(),
        "model file {} is missing: run scripts/fetch-models first",
        path.display()
    );
    GgufFile::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A 2-D tensor as `(weights, rows, cols)` in `[out, in]` order.
fn tensor(f: &GgufFile, name: &str) -> (Vec<f32>, usize, usize) {
    let t = f.require_tensor(name).unwrap();
    assert_eq!(t.dims.len(), 2, "{name}");
    (
        f.tensor_f32(t).unwrap(),
        t.n_rows() as usize,
        t.row_len() as usize,
    )
}

#[test]
fn real_weights_quality_ordering() {
    let smol = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let gemma = model("gemma-3-270m-q4_k_m.gguf");
    let cases = [
        (&smol, "blk.0.ffn_up.weight"),
        (&smol, "blk.10.attn_q.weight"),
        (&gemma, "blk.0.ffn_gate.weight"),
    ];
    for (f, name) in cases {
        let q4_1 = f.require_tensor(name).unwrap().ty == kiln_format::ggml::GgmlType::Q4_1;
        let (w, rows, cols) = tensor(f, name);
        let snr = |scheme: Scheme| {
            let q = quantize(&w, rows, cols, scheme, 1).unwrap();
            let rep = q.report(&w);
            eprintln!(
                "{name} [{rows}x{cols}] {:<20} snr {:6.2} dB  cosine {:.6}  {} bytes",
                rep.scheme.to_string(),
                rep.snr_db,
                rep.cosine,
                rep.bytes
            );
            assert!(rep.cosine > 0.8, "{name} {scheme}: cosine {}", rep.cosine);
            rep.snr_db
        };
        let int8 = snr(Scheme::Int8Channel);
        let int4 = snr(Scheme::Int4Block {
            block: 32,
            symmetric: true,
        });
        let int4_offset = snr(Scheme::Int4Block {
            block: 32,
            symmetric: false,
        });
        let int4_64 = snr(Scheme::Int4Block {
            block: 64,
            symmetric: true,
        });
        let lut8 = snr(Scheme::Lut {
            bits: 8,
            group_channels: Some(16),
        });
        let lut6 = snr(Scheme::Lut {
            bits: 6,
            group_channels: Some(16),
        });
        let lut4 = snr(Scheme::Lut {
            bits: 4,
            group_channels: Some(16),
        });
        let lut4_tensor = snr(Scheme::Lut {
            bits: 4,
            group_channels: None,
        });
        let lut2 = snr(Scheme::Lut {
            bits: 2,
            group_channels: Some(16),
        });
        assert!(
            int8 > int4 && int4 > lut2,
            "{name}: int8 {int8}, int4 {int4}, lut2 {lut2}"
        );
        assert!(
            lut8 > lut6 && lut6 > lut4 && lut4 > lut2,
            "{name}: lut8 {lut8} lut6 {lut6} lut4 {lut4} lut2 {lut2}"
        );
        assert!(
            int4 >= int4_64,
            "{name}: smaller blocks should not lose: {int4} vs {int4_64}"
        );
        if q4_1 {
            // Q4_1 is 4-bit affine in blocks of 32: the offset form lands on the source's grid.
            assert!(
                int4_offset > 45.0,
                "{name}: int4-block32-offset {int4_offset} dB on a Q4_1 source"
            );
        }
        assert!(
            int4_offset > int4 - 1.0,
            "{name}: offset {int4_offset} vs symmetric {int4}"
        );
        // LUT4 is not asserted to beat int4-block32: at 4.06 against 4.5 bits per weight it does
        // not, here or on Gaussian weights (see lut_reaches_the_lloyd_max_optimum_on_gaussians).
        assert!(
            lut4 > lut2 && lut4 >= lut4_tensor,
            "{name}: per-group tables should not lose to one table: {lut4} vs {lut4_tensor}"
        );
    }
}
