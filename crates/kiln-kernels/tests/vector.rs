//! The f32 vector kernels at every level this CPU has, against their scalar references.

use kiln_kernels::vector::*;
use kiln_kernels::{available_isas, Isa};
use proptest::prelude::*;

/// `|got - want| <= 1e-5 * scale` (at least 1e-5), `scale` being the sum of magnitudes.
fn close(got: f32, want: f32, scale: f32) -> bool {
    (got - want).abs() <= 1e-5 * scale.max(1.0)
}

proptest! {
    #[test]
    fn dot_matches_reference(v in prop::collection::vec((-4.0f32..4.0, -4.0f32..4.0), 0..300)) {
        let a: Vec<f32> = v.iter().map(|p| p.0).collect();
        let b: Vec<f32> = v.iter().map(|p| p.1).collect();
        let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        let want = dot_f32_reference(&a, &b);
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        prop_assert!((f64::from(want) - exact).abs() <= 1e-5 * f64::from(scale.max(1.0)));
        for isa in available_isas() {
            let got = dot_f32_with(isa, &a, &b);
            prop_assert!(close(got, want, scale), "{isa:?}: {got} vs reference {want}");
        }
    }

    #[test]
    fn sum_matches_reference(x in prop::collection::vec(-4.0f32..4.0, 0..300)) {
        let scale: f32 = x.iter().map(|v| v.abs()).sum();
        let want = sum_f32_reference(&x);
        let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
        prop_assert!((f64::from(want) - exact).abs() <= 1e-5 * f64::from(scale.max(1.0)));
        for isa in available_isas() {
            let got = sum_f32_with(isa, &x);
            prop_assert!(close(got, want, scale), "{isa:?}: {got} vs reference {want}");
        }
    }

    #[test]
    fn axpy_matches_reference(a in -3.0f32..3.0, v in prop::collection::vec((-4.0f32..4.0, -4.0f32..4.0), 0..100)) {
        let x: Vec<f32> = v.iter().map(|p| p.0).collect();
        let y0: Vec<f32> = v.iter().map(|p| p.1).collect();
        let mut want = y0.clone();
        axpy_f32_reference(a, &x, &mut want);
        for isa in available_isas() {
            let mut y = y0.clone();
            axpy_f32_with(isa, a, &x, &mut y);
            for ((g, w), (xi, yi)) in y.iter().zip(&want).zip(x.iter().zip(&y0)) {
                // A fused multiply-add rounds once where the reference rounds twice: they
                // differ by at most an ulp of the terms.
                let scale = yi.abs() + (a * xi).abs();
                prop_assert!((g - w).abs() <= 2.0 * f32::EPSILON * scale, "{isa:?}: {g} vs {w}");
            }
        }
    }
}

proptest! {
    /// The row-batched forms are the single-row kernels bit for bit, at every level, but for
    /// the AVX-512 scores of whole blocks of sixteen rows, which sum in another order: those
    /// stay within `d · ε · Σ|q·k|` of the reference (the rows after the last block are the
    /// AVX2 kernel's, bit for bit).
    #[test]
    fn row_batches_match_single_rows_bit_for_bit(
        d in 1usize..300,
        n in 0usize..40,
        seed in any::<u32>(),
    ) {
        let val = |i: usize| {
            let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed;
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        let q: Vec<f32> = (0..d).map(val).collect();
        let rows: Vec<f32> = (0..n * d).map(|i| val(i + 1000)).collect();
        let p: Vec<f32> = (0..n).map(|i| val(i + 5000)).collect();
        let y0: Vec<f32> = (0..d).map(|i| val(i + 7000)).collect();
        for isa in available_isas() {
            let mut scores = vec![0.0f32; n];
            dot_rows_f32_with(isa, &q, &rows, &mut scores);
            let mut y = y0.clone();
            axpy_rows_f32_with(isa, &p, &rows, &mut y);
            let mut y_one = y0.clone();
            for (j, row) in rows.chunks_exact(d).enumerate() {
                let one = dot_f32_with(isa, &q, row);
                if isa == Isa::Avx512Vnni && j < n / 16 * 16 {
                    let magnitude: f32 = q.iter().zip(row).map(|(a, b)| (a * b).abs()).sum();
                    let bound = d as f32 * f32::EPSILON * magnitude;
                    let want = dot_f32_reference(&q, row);
                    prop_assert!(
                        (scores[j] - want).abs() <= bound,
                        "row {j} of {d}: {} against {want} (bound {bound})",
                        scores[j]
                    );
                } else {
                    prop_assert_eq!(scores[j].to_bits(), one.to_bits(), "{:?} row {}", isa, j);
                }
                axpy_f32_with(isa, p[j], row, &mut y_one);
            }
            for (a, b) in y.iter().zip(&y_one) {
                prop_assert_eq!(a.to_bits(), b.to_bits(), "{:?}", isa);
            }
        }
    }
}

#[test]
#[should_panic(expected = "lengths differ")]
fn dot_of_unequal_lengths_panics() {
    dot_f32(&[1.0, 2.0], &[1.0]);
}

#[test]
fn known_values() {
    let a: Vec<f32> = (1..=37).map(|i| i as f32).collect();
    assert_eq!(
        dot_f32(&a, &a),
        (1..=37).map(|i| (i * i) as f32).sum::<f32>()
    );
    assert_eq!(sum_f32(&a), 703.0);
    let mut y = vec![1.0f32; 37];
    axpy_f32(2.0, &a, &mut y);
    assert_eq!(y[36], 75.0);
}
