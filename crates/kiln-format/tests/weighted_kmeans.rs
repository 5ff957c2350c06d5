//! Weighted k-means and lookup tables learned with per-input-channel weights: the weighted
//! objective is what they lower, equal weights change nothing, integer weights act as
//! repetitions, and bad weights are refused.

use kiln_format::kiln_types::{
    dequantize_row, encode_lut, encode_lut_weighted, KilnType, LutOptions,
};
use kiln_format::quant::kmeans::{
    check_weights, kmeans_1d, kmeans_1d_weighted, KMeans, KMeansOptions, WeightError, EXACT_LIMIT,
};
use kiln_format::quant::{quantize_lut, quantize_lut_weighted, QuantMatrix};
use proptest::prelude::*;

/// Deterministic uniform deviates in [0, 1) (a 64-bit LCG).
fn uniforms(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        })
        .collect()
}

/// Heavy-tailed values (a Gaussian core with a Laplacian tail), like real weights.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let u = uniforms(2 * n, seed);
    (0..n)
        .map(|i| {
            let (a, b) = (u[2 * i], u[2 * i + 1]);
            let g = (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos();
            let tail = if a < 0.02 {
                (b - 0.5).signum() * -b.ln() * 3.0
            } else {
                0.0
            };
            (0.02 * (g + tail)) as f32
        })
        .collect()
}

/// `Σ w_i (v_i − nearest centroid)²`, computed point by point.
fn weighted_error(v: &[f32], w: &[f32], centroids: &[f64]) -> f64 {
    v.iter()
        .zip(w)
        .map(|(&x, &wt)| {
            let d = centroids
                .iter()
                .map(|c| (f64::from(x) - c).abs())
                .fold(f64::INFINITY, f64::min);
            f64::from(wt) * d * d
        })
        .sum()
}

fn opts() -> KMeansOptions {
    KMeansOptions {
        max_iterations: 10_000,
        track_distortion: true,
    }
}

/// At a converged weighted k-means, every centroid is the weighted mean of the values nearest
/// it (checked here without the library's sorted prefix sums).
fn assert_weighted_means(v: &[f32], w: &[f32], km: &KMeans) {
    let c = &km.centroids;
    let mut sums = vec![(0.0f64, 0.0f64); c.len()];
    for (&x, &wt) in v.iter().zip(w) {
        let x = f64::from(x);
        // Nearest centroid; exactly halfway goes to the upper one, as the library assigns.
        let mut j = 0;
        for (i, &ci) in c.iter().enumerate() {
            if (x - ci).abs() <= (x - c[j]).abs() {
                j = i;
            }
        }
        sums[j].0 += f64::from(wt) * x;
        sums[j].1 += f64::from(wt);
    }
    for (j, &(wx, ws)) in sums.iter().enumerate() {
        if ws > 0.0 {
            let mean = wx / ws;
            assert!(
                (mean - c[j]).abs() <= 1e-9 * mean.abs().max(1e-6),
                "centroid {j}: {} but its values' weighted mean is {mean}",
                c[j]
            );
        }
    }
}

#[test]
fn equal_weights_give_the_unweighted_result_exactly() {
    let v = values(30_000, 1);
    for k in [2, 16, 64] {
        let plain = kmeans_1d(&v, k, 7, opts());
        for wt in [1.0f32, 0.25, 8.0] {
            let w = vec![wt; v.len()];
            let weighted = kmeans_1d_weighted(&v, &w, k, 7, opts()).unwrap();
            assert_eq!(weighted.initial, plain.initial, "k {k}, weight {wt}");
            assert_eq!(weighted.centroids, plain.centroids, "k {k}, weight {wt}");
            assert_eq!(weighted.iterations, plain.iterations);
        }
    }
}

#[test]
fn equal_weights_give_the_unweighted_result_on_the_binned_path() {
    let n = EXACT_LIMIT + 5000;
    let v: Vec<f32> = (0..n)
        .map(|i| [-0.3f32, 0.01, 0.2, 0.9][i % 4] + (i % 101) as f32 * 1e-4)
        .collect();
    let plain = kmeans_1d(&v, 8, 3, KMeansOptions::default());
    let w = vec![2.0f32; n];
    let weighted = kmeans_1d_weighted(&v, &w, 8, 3, KMeansOptions::default()).unwrap();
    assert_eq!(weighted.centroids, plain.centroids);
}

#[test]
fn integer_weights_act_as_repetitions() {
    let v = values(4000, 2);
    let w: Vec<f32> = (0..v.len()).map(|i| (1 + (i * 7) % 5) as f32).collect();
    let mut repeated = Vec::new();
    for (&x, &wt) in v.iter().zip(&w) {
        repeated.extend(std::iter::repeat_n(x, wt as usize));
    }
    for k in [4, 16] {
        let a = kmeans_1d_weighted(&v, &w, k, 11, opts()).unwrap();
        let b = kmeans_1d(&repeated, k, 11, opts());
        assert_eq!(a.centroids, b.centroids, "k {k}");
    }
}

#[test]
fn zero_weights_leave_their_values_out() {
    let v = values(5000, 3);
    let w: Vec<f32> = (0..v.len())
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
        .collect();
    let kept: Vec<f32> = v
        .iter()
        .zip(&w)
        .filter(|(_, &wt)| wt > 0.0)
        .map(|(&x, _)| x)
        .collect();
    let a = kmeans_1d_weighted(&v, &w, 16, 5, opts()).unwrap();
    let b = kmeans_1d_weighted(&kept, &vec![1.5; kept.len()], 16, 5, opts()).unwrap();
    assert_eq!(a.centroids, b.centroids);
}

#[test]
fn weighting_lowers_the_weighted_error_where_the_weights_are() {
    // Half the values are 100 times as important; plain k-means spends its entries on the
    // other half's wider spread.
    let n = 20_000;
    let mut v = values(n, 4);
    for x in v.iter_mut().skip(n / 2) {
        *x *= 5.0;
    }
    let w: Vec<f32> = (0..n)
        .map(|i| if i < n / 2 { 100.0 } else { 1.0 })
        .collect();
    for k in [4, 16] {
        let plain = kmeans_1d(&v, k, 9, opts());
        let weighted = kmeans_1d_weighted(&v, &w, k, 9, opts()).unwrap();
        let (ep, ew) = (
            weighted_error(&v, &w, &plain.centroids),
            weighted_error(&v, &w, &weighted.centroids),
        );
        assert!(
            ew < 0.5 * ep,
            "k {k}: weighted error {ew} against plain k-means' {ep}"
        );
        // And the library's own accounting agrees with the point-by-point error.
        let last = *weighted.distortion.last().unwrap();
        assert!((last - ew).abs() <= 1e-9 * ew, "{last} vs {ew}");
    }
}

#[test]
fn bad_weights_are_refused() {
    let v = values(100, 5);
    let mut w = vec![1.0f32; 100];
    let run = |w: &[f32]| kmeans_1d_weighted(&v, w, 4, 1, KMeansOptions::default()).unwrap_err();
    assert_eq!(
        run(&w[..99]),
        WeightError::Length {
            weights: 99,
            values: 100
        }
    );
    for bad in [-1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        w[37] = bad;
        match run(&w) {
            WeightError::Invalid { index: 37, value } => {
                assert!(value.is_nan() == bad.is_nan() && (bad.is_nan() || value == bad))
            }
            e => panic!("{bad}: {e:?}"),
        }
    }
    assert_eq!(run(&[0.0; 100]), WeightError::AllZero);
    assert!(run(&[-0.0; 100])
        .to_string()
        .contains("every weight is zero"));
    assert_eq!(check_weights(&[0.0, 2.0], 2), Ok(()));

    // The quantizers name what is wrong.
    let m = values(8 * 32, 6);
    let e = quantize_lut_weighted(&m, 8, 32, 4, None, 0, Some(&[1.0; 31])).unwrap_err();
    assert!(e.to_string().contains("31 weights for 32 values"), "{e}");
    let mut cw = vec![1.0f32; 32];
    cw[5] = f32::NAN;
    let e = quantize_lut_weighted(&m, 8, 32, 4, Some(4), 0, Some(&cw)).unwrap_err();
    assert!(e.to_string().contains("weight 5 is NaN"), "{e}");
    let e = encode_lut_weighted(
        KilnType::Lut {
            bits: 4,
            group: None,
        },
        &m,
        8,
        32,
        LutOptions::default(),
        Some(&[0.0; 32]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("every weight is zero"), "{e}");
}

/// Importance that varies by input channel over four orders of magnitude, as activations do.
fn column_weights(cols: usize, seed: u64) -> Vec<f32> {
    uniforms(cols, seed)
        .iter()
        .map(|&u| (10f64.powf(4.0 * u - 2.0)) as f32)
        .collect()
}

fn column_weighted_error(w: &[f32], back: &[f32], cols: usize, cw: &[f32]) -> f64 {
    w.iter()
        .zip(back)
        .enumerate()
        .map(|(i, (a, b))| f64::from(cw[i % cols]) * f64::from(a - b).powi(2))
        .sum()
}

#[test]
fn column_weighted_tables_lower_the_weighted_error_of_every_grouping() {
    let (rows, cols) = (64, 256);
    let w = values(rows * cols, 7);
    let cw = column_weights(cols, 8);
    for group in [None, Some(16), Some(1)] {
        let plain = quantize_lut(&w, rows, cols, 4, group, 3).unwrap();
        let weighted = quantize_lut_weighted(&w, rows, cols, 4, group, 3, Some(&cw)).unwrap();
        let ep = column_weighted_error(&w, &plain.dequantize(), cols, &cw);
        let ew = column_weighted_error(&w, &weighted.dequantize(), cols, &cw);
        assert!(ew < 0.9 * ep, "{group:?}: {ew} against {ep}");
        // Equal weights: the same tables and indices.
        let same = quantize_lut_weighted(&w, rows, cols, 4, group, 3, Some(&[0.5; 256])).unwrap();
        assert_eq!(same, plain, "{group:?}");
    }
    // The stored format too (f16 tables, best of restarts by the weighted error).
    let ty = KilnType::Lut {
        bits: 4,
        group: Some(16),
    };
    let restarts = LutOptions {
        restarts: 3,
        ..LutOptions::default()
    };
    let plain = encode_lut(ty, &w, rows, cols, restarts).unwrap();
    let same = encode_lut_weighted(ty, &w, rows, cols, restarts, Some(&[4.0; 256])).unwrap();
    assert_eq!(plain, same);
    let weighted = encode_lut_weighted(ty, &w, rows, cols, restarts, Some(&cw)).unwrap();
    let decode = |data: &[u8]| {
        let mut out = vec![0.0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            dequantize_row(ty, data, rows, cols, r, row);
        }
        out
    };
    let ep = column_weighted_error(&w, &decode(&plain), cols, &cw);
    let ew = column_weighted_error(&w, &decode(&weighted), cols, &cw);
    assert!(ew < 0.9 * ep, "stored: {ew} against {ep}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Lloyd's steps never raise the weighted error, and at convergence every centroid is the
    /// weighted mean of its values.
    #[test]
    fn weighted_lloyd_is_monotone_and_ends_at_weighted_means(
        seed in 0u64..1_000_000,
        n in 2usize..3000,
        k in 1usize..40,
        spread in 0.0f64..6.0,
    ) {
        let v = values(n, seed);
        let w: Vec<f32> = uniforms(n, seed ^ 0xabcd)
            .iter()
            .map(|&u| if u < 0.05 { 0.0 } else { 10f64.powf(spread * (u - 0.5)) as f32 })
            .collect();
        prop_assume!(w.iter().any(|&x| x > 0.0));
        let km = kmeans_1d_weighted(&v, &w, k, seed, opts()).unwrap();
        prop_assert!(km.converged);
        prop_assert!(km.centroids.len() <= k);
        prop_assert!(km.centroids.windows(2).all(|p| p[0] < p[1]));
        for p in km.distortion.windows(2) {
            prop_assert!(p[1] <= p[0] * (1.0 + 1e-12) + 1e-30, "{} -> {}", p[0], p[1]);
        }
        assert_weighted_means(&v, &w, &km);
        let last = *km.distortion.last().unwrap();
        let direct = weighted_error(&v, &w, &km.centroids);
        prop_assert!((last - direct).abs() <= 1e-9 * direct.max(1e-30), "{last} vs {direct}");
    }
}
