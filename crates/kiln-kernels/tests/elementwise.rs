//! The element-wise kernels (exponential, gated activations, softmax) at every level this CPU
//! has, against f64 arithmetic: the accuracy bounds their documentation states, the edge
//! cases, and tails of every length.

use kiln_kernels::elementwise::*;
use kiln_kernels::{available_isas, Isa};
use proptest::prelude::*;

/// The SIMD levels this CPU has (the scalar level runs the C library's `expf`).
fn simd_isas() -> Vec<Isa> {
    available_isas()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .collect()
}

/// The error of `got` against the exact `want`, in units in the last place of `want` as an f32
/// (`want` a normal f32 in magnitude).
fn ulp_error(got: f32, want: f64) -> f64 {
    let exponent = ((want.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let ulp = 2f64.powi(exponent - 23);
    (f64::from(got) - want).abs() / ulp
}

/// Whether `got` is a correct f32 exponential of an input whose exact exponential is `want`:
/// within [`EXP_MAX_ULP`] ulp where `want` is a normal f32, within one subnormal step (2⁻¹⁴⁹)
/// below that, `+inf` where `want` rounds to infinity.
fn exp_ok(got: f32, want: f64) -> bool {
    let nearest = want as f32;
    if nearest.is_infinite() {
        got == f32::INFINITY
    } else if want < f64::from(f32::MIN_POSITIVE) {
        (f64::from(got) - want).abs() <= 2f64.powi(-149)
    } else {
        ulp_error(got, want) <= f64::from(EXP_MAX_ULP)
    }
}

/// Every `stride`-th f32 between -104 and 89 (where exponentials are neither 0 nor infinite
/// for sure), and both ends.
fn sweep(stride: u32) -> Vec<f32> {
    let pos = (0..=89f32.to_bits()).step_by(stride as usize);
    let neg = (0..=104f32.to_bits())
        .step_by(stride as usize)
        .map(|b| b | 0x8000_0000);
    pos.chain(neg)
        .map(f32::from_bits)
        .chain([89.0, -104.0])
        .collect()
}

#[test]
fn exp_holds_its_bound_over_a_sweep_of_inputs() {
    // About 4.7 million inputs spread evenly over the bit patterns (all 2.2 billion of them,
    // checked once, give at most 0.8915 ulp).
    let xs = sweep(479);
    for isa in simd_isas() {
        let mut got = xs.clone();
        exp_f32_with(isa, &mut got);
        let mut worst = 0.0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let want = f64::from(x).exp();
            assert!(
                exp_ok(g, want),
                "{isa:?}: exp({x:e}) = {g:e}, exact {want:e}"
            );
            if want >= f64::from(f32::MIN_POSITIVE) && !(want as f32).is_infinite() {
                worst = worst.max(ulp_error(g, want));
            }
        }
        // The bound is tight enough to mean something: the polynomial is not exact.
        assert!(worst > 0.5, "{isa:?}: worst {worst} ulp");
    }
}

#[test]
fn exp_edge_cases() {
    let cases: [(f32, f32); 11] = [
        (0.0, 1.0),
        (-0.0, 1.0),
        (f32::NEG_INFINITY, 0.0),
        (f32::INFINITY, f32::INFINITY),
        (-1000.0, 0.0),
        (-104.0, 0.0),
        (f32::MIN, 0.0),
        (1000.0, f32::INFINITY),
        (88.8, f32::INFINITY),
        (f32::MAX, f32::INFINITY),
        // exp(-103.5) = 0.80 · 2⁻¹⁴⁹ rounds to the smallest subnormal.
        (-103.5, f32::from_bits(1)),
    ];
    for isa in available_isas() {
        let mut xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
        exp_f32_with(isa, &mut xs);
        for (&(x, want), &got) in cases.iter().zip(&xs) {
            assert_eq!(got.to_bits(), want.to_bits(), "{isa:?}: exp({x}) = {got:e}");
        }
        let mut nan = [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), 1.0];
        exp_f32_with(isa, &mut nan);
        assert!(nan[..3].iter().all(|v| v.is_nan()), "{isa:?}: {nan:?}");
        // Just below ln(f32::MAX) stays finite; subnormal results are correctly rounded.
        let mut edge = [88.722_83f32, -87.5, -95.0, -100.0, -103.0, 1.0, -1.0];
        let inputs = edge;
        exp_f32_with(isa, &mut edge);
        for (&x, &g) in inputs.iter().zip(&edge) {
            assert!(g.is_finite() && g > 0.0, "{isa:?}: exp({x}) = {g:e}");
            assert!(exp_ok(g, f64::from(x).exp()), "{isa:?}: exp({x}) = {g:e}");
        }
    }
}

#[test]
fn simd_levels_agree_bit_for_bit() {
    // Same operations in the same order at every level: exponentials, gated products and
    // softmax elements are identical (only the softmax's sum may be added in another order).
    let n = 1000;
    let xs: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.618_034).sin() * 60.0)
        .collect();
    let ups: Vec<f32> = (0..n).map(|i| (i as f32 * 0.377).cos() * 3.0).collect();
    let run = |isa: Isa| {
        let mut e = xs.clone();
        exp_f32_with(isa, &mut e);
        let mut s = xs.clone();
        silu_mul_with(isa, &mut s, &ups);
        let mut g = xs.clone();
        gelu_tanh_mul_with(isa, &mut g, &ups);
        let mut p = xs.clone();
        softmax_exp_with(isa, &mut p, 60.0);
        [e, s, g, p].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    let isas = simd_isas();
    if let Some((&first, rest)) = isas.split_first() {
        let want = run(first);
        for &isa in rest {
            assert!(run(isa) == want, "{isa:?} differs from {first:?}");
        }
    }
}

/// The exact `x / (1 + exp(-x)) * up` of the f32 inputs.
fn silu_exact(x: f32, up: f32) -> f64 {
    let x = f64::from(x);
    x / (1.0 + (-x).exp()) * f64::from(up)
}

/// `2u` of the tanh form of GELU, exactly, for the f32 constants the kernels use.
fn gelu_two_u(x: f32) -> f64 {
    let x = f64::from(x);
    f64::from(2.0 * 0.797_884_6f32) * (x + f64::from(0.044_715f32) * x * x * x)
}

/// The exact `x / (1 + exp(-2u)) * up` of the f32 inputs, for the f32 constants.
fn gelu_exact(x: f32, up: f32) -> f64 {
    f64::from(x) / (1.0 + (-gelu_two_u(x)).exp()) * f64::from(up)
}

/// `|got - want| <= rel · 2⁻²³ · |want|`, or within a few smallest normals of `want` where it
/// is that small (the kernels flush such results to zero).
fn within(got: f32, want: f64, rel: f64) -> bool {
    let tiny = 4.0 * f64::from(f32::MIN_POSITIVE);
    let err = (f64::from(got) - want).abs();
    if want.abs() < tiny {
        err <= tiny
    } else {
        err <= rel * f64::from(f32::EPSILON) * want.abs()
    }
}

/// [`silu_mul`]'s documented bound, as a relative error in units of 2⁻²³.
const SILU_REL: f64 = EXP_MAX_ULP as f64 + 2.0;

/// [`gelu_tanh_mul`]'s documented bound at input `x`, relative, in units of 2⁻²³.
fn gelu_rel(x: f32) -> f64 {
    let t = gelu_two_u(x);
    let one_minus_sigmoid = 1.0 / (1.0 + t.exp());
    EXP_MAX_ULP as f64 + 3.0 + 3.0 * t.abs() * one_minus_sigmoid
}

/// A gate value: mostly where models put them, sometimes far out, sometimes special.
fn gate() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -8.0f32..8.0,
        3 => -120.0f32..120.0,
        1 => prop_oneof![Just(0.0f32), Just(-0.0), Just(1e-30), Just(-1e-30), Just(-88.5), Just(-89.0)],
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn exp_of_any_input_is_accurate_and_position_independent(
        bits in prop::collection::vec(any::<u32>(), 0..70),
        ranged in prop::collection::vec(-105.0f32..90.0, 0..70),
    ) {
        let xs: Vec<f32> = bits.into_iter().map(f32::from_bits).chain(ranged).collect();
        for isa in available_isas() {
            let mut got = xs.clone();
            exp_f32_with(isa, &mut got);
            for (i, (&x, &g)) in xs.iter().zip(&got).enumerate() {
                if x.is_nan() {
                    prop_assert!(g.is_nan(), "{:?}: exp(NaN) = {}", isa, g);
                    continue;
                }
                let want = f64::from(x).exp();
                prop_assert!(exp_ok(g, want), "{:?}: exp({:e}) = {:e}, exact {:e}", isa, x, g, want);
                // Alone, or at another offset (a tail of another length), the same bits.
                let mut one = [x];
                exp_f32_with(isa, &mut one);
                prop_assert_eq!(one[0].to_bits(), g.to_bits(), "{:?}: element {}", isa, i);
            }
        }
    }

    #[test]
    fn silu_mul_holds_its_bound(
        v in prop::collection::vec((gate(), -10.0f32..10.0), 0..70),
    ) {
        let gates: Vec<f32> = v.iter().map(|p| p.0).collect();
        let ups: Vec<f32> = v.iter().map(|p| p.1).collect();
        for isa in available_isas() {
            let mut got = gates.clone();
            silu_mul_with(isa, &mut got, &ups);
            for ((&x, &u), &g) in gates.iter().zip(&ups).zip(&got) {
                let want = silu_exact(x, u);
                // Where exp(-x) overflows f32 the result is a zero (|exact| < 2⁻¹²⁰).
                let flushed = g == 0.0 && -f64::from(x) > 88.6;
                prop_assert!(flushed || within(g, want, SILU_REL), "{:?}: silu({:e}) * {:e} = {:e}, exact {:e}", isa, x, u, g, want);
            }
        }
    }

    #[test]
    fn gelu_tanh_mul_holds_its_bound(
        v in prop::collection::vec((gate(), -10.0f32..10.0), 0..70),
    ) {
        let gates: Vec<f32> = v.iter().map(|p| p.0).collect();
        let ups: Vec<f32> = v.iter().map(|p| p.1).collect();
        for isa in available_isas() {
            let mut got = gates.clone();
            gelu_tanh_mul_with(isa, &mut got, &ups);
            for ((&x, &u), &g) in gates.iter().zip(&ups).zip(&got) {
                let want = gelu_exact(x, u);
                let flushed = g == 0.0 && -gelu_two_u(x) > 88.6;
                prop_assert!(flushed || within(g, want, gelu_rel(x)), "{:?}: gelu({:e}) * {:e} = {:e}, exact {:e}", isa, x, u, g, want);
            }
        }
    }

    #[test]
    fn softmax_exp_holds_its_bound(
        v in prop::collection::vec(-30.0f32..30.0, 1..300),
        shift in -2.0f32..2.0,
    ) {
        // Usually the maximum, sometimes above it or below (results above 1).
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) + shift;
        for isa in available_isas() {
            let mut got = v.clone();
            let sum = softmax_exp_with(isa, &mut got, m);
            let mut exact_sum = 0.0f64;
            for (&x, &g) in v.iter().zip(&got) {
                let want = f64::from(x - m).exp();
                exact_sum += want;
                prop_assert!(exp_ok(g, want), "{:?}: exp({:e} - {:e}) = {:e}, exact {:e}", isa, x, m, g, want);
            }
            // Positive terms: the sum's rounding is at most n·2⁻²⁴ of it, plus each term's own.
            let n = v.len() as f64;
            let bound = (n * 0.5 + f64::from(EXP_MAX_ULP)) * f64::from(f32::EPSILON) * exact_sum;
            prop_assert!((f64::from(sum) - exact_sum).abs() <= bound, "{:?}: sum {} vs {}", isa, sum, exact_sum);
        }
    }
}

#[test]
fn gated_edge_cases() {
    for isa in available_isas() {
        // silu: 0 -> 0, huge negative gates -> zero, huge positive -> the gate, NaN -> NaN.
        let mut g = [0.0, -1000.0, 1000.0, f32::NAN, f32::INFINITY, 1.0];
        silu_mul_with(isa, &mut g, &[1.0, 2.0, 0.5, 1.0, 1.0, 2.0]);
        assert_eq!(&g[..3], &[0.0, 0.0, 500.0], "{isa:?}");
        assert!(g[3].is_nan(), "{isa:?}");
        assert_eq!(g[4], f32::INFINITY, "{isa:?}");
        assert!((g[5] - 2.0 * 0.731_058_6).abs() < 1e-6, "{isa:?}");
        // gelu: the same limits; gelu_tanh(1) = 0.8411920, gelu_tanh(-2) = -0.0454023.
        let mut g = [0.0, -1000.0, 1000.0, f32::NAN, 1.0, -2.0];
        gelu_tanh_mul_with(isa, &mut g, &[1.0, 2.0, 0.5, 1.0, 1.0, 1.0]);
        assert_eq!(&g[..3], &[0.0, 0.0, 500.0], "{isa:?}");
        assert!(g[3].is_nan(), "{isa:?}");
        assert!((g[4] - 0.841_192).abs() < 1e-6, "{isa:?}: {}", g[4]);
        assert!((g[5] + 0.045_402_3).abs() < 1e-6, "{isa:?}: {}", g[5]);
        // softmax: the maximum gives exactly 1; -inf scores (masked keys) give 0.
        let mut s = [3.0, f32::NEG_INFINITY, 3.0];
        assert_eq!(softmax_exp_with(isa, &mut s, 3.0), 2.0, "{isa:?}");
        assert_eq!(s, [1.0, 0.0, 1.0], "{isa:?}");
        assert_eq!(softmax_exp_with(isa, &mut [], 0.0), 0.0, "{isa:?}");
    }
}

#[test]
#[should_panic(expected = "lengths differ")]
fn gated_of_unequal_lengths_panics() {
    silu_mul(&mut [1.0, 2.0], &[1.0]);
}
