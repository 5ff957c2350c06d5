//! Error feedback: quantizing a matrix's weights one input channel at a time, each rounding
//! error compensated on the channels not yet quantized, so that the matrix product keeps what
//! its calibration inputs see rather than each weight on its own.
//!
//! For `y = W x` over inputs with second moment `H = E[x xᵀ]`, the error a row `w` takes is
//! `(w − q)ᵀ H (w − q)`. Quantizing channel `j` moves `w_j` by `e`; the change of the remaining
//! channels that best absorbs it, given `H`, is `−e · (H⁻¹)_{j,>j} / (H⁻¹)_{jj}` on the
//! Schur complement of the channels already fixed (the optimal-brain-surgeon update). With the
//! upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), the update of the remaining channels after
//! channel `j` is `−(e / U_jj) · U_{j,>j}`: one pass over the columns, one multiply-add per
//! pair, independent per row. This is the procedure of Frantar et al., "GPTQ: Accurate
//! Post-Training Quantization for Generative Pre-trained Transformers" (2022), with any
//! per-value quantizer in place of their uniform grid.
//!
//! Channels are processed from the most strongly driven to the least (largest `H_jj` first),
//! so the largest errors have the most channels left to absorb them; codes are stored in the
//! natural order whatever the processing order.

use super::QuantError;

/// The factor that drives error feedback for one matrix input: the processing order of the
/// input channels and the upper Cholesky factor of the (damped) inverse second moment in that
/// order.
#[derive(Clone, Debug)]
pub struct Feedback {
    n: usize,
    /// `order[k]`: the input channel processed `k`-th.
    order: Vec<usize>,
    /// Row-major `n × n`, upper triangle: `u[k * n + l]` for `l >= k`, in processing order.
    u: Vec<f32>,
}

/// The damping added to the second moment's diagonal, as a fraction of its mean diagonal: it
/// keeps the factorization stable when inputs are nearly collinear (GPTQ's default, 1 %).
pub const DEFAULT_DAMPING: f64 = 0.01;

impl Feedback {
    /// Factors the second moment `h` (`n × n`, row-major, symmetric; only the upper triangle
    /// is read) of a matrix's inputs. A channel never driven (`h_jj = 0`) takes no part: its
    /// weights are rounded on their own and push nothing onto others. `damping` (a fraction
    /// of the mean diagonal) is added to the diagonal and raised tenfold, up to four times,
    /// when the matrix is not numerically positive definite.
    ///
    /// Errors: `h` not `n × n`; a non-finite entry; no channel driven at all.
    pub fn new(h: &[f32], n: usize, damping: f64) -> Result<Feedback, QuantError> {
        if n == 0 || h.len() != n * n {
            return Err(QuantError::new(format!(
                "second moment of {} values is not {n} × {n}",
                h.len()
            )));
        }
        if let Some(bad) = h.iter().find(|v| !v.is_finite()) {
            return Err(QuantError::new(format!(
                "second moment holds a non-finite value ({bad})"
            )));
        }
        let diag: Vec<f64> = (0..n).map(|j| f64::from(h[j * n + j])).collect();
        let live = diag.iter().filter(|&&d| d > 0.0).count();
        if live == 0 {
            return Err(QuantError::new(
                "second moment is zero: the calibration never drove these inputs",
            ));
        }
        let mean = diag.iter().filter(|&&d| d > 0.0).sum::<f64>() / live as f64;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        let mut damp = damping.max(0.0) * mean;
        for _ in 0..5 {
            if let Some(u) = factor(h, n, &order, &diag, damp) {
                return Ok(Feedback { n, order, u });
            }
            damp = if damp > 0.0 { damp * 10.0 } else { 1e-6 * mean };
        }
        Err(QuantError::new(
            "second moment is not positive definite even with damping",
        ))
    }

    /// Input channels.
    pub fn channels(&self) -> usize {
        self.n
    }

    /// Quantizes the rows of `w` (`rows` × [`channels`](Self::channels), row-major) with
    /// error feedback: `quantize(row, value)` returns the code and the value it stands for,
    /// and is given each weight after the feedback of the channels before it. `codes[r * n +
    /// c]` receives the code of row `r`, channel `c`. Rows are independent and run in
    /// parallel; the result does not depend on the number of threads.
    ///
    /// # Panics
    /// If `w` or `codes` is not `rows × channels` long.
    pub fn quantize_rows<C: Copy + Send>(
        &self,
        w: &[f32],
        codes: &mut [C],
        quantize: impl Fn(usize, f32) -> (C, f32) + Sync,
    ) {
        let n = self.n;
        assert!(
            w.len() % n == 0 && codes.len() == w.len(),
            "error feedback: {} weights and {} codes are not rows of {n}",
            w.len(),
            codes.len()
        );
        // Rows go in batches so each row of the factor is read once per batch, from cache.
        const BATCH: usize = 8;
        super::par::for_chunks(codes, BATCH * n, |start, out| {
            let first = start / n;
            let batch = out.len() / n;
            let mut work: Vec<f32> = Vec::with_capacity(batch * n);
            for b in 0..batch {
                let row = &w[(first + b) * n..(first + b + 1) * n];
                work.extend(self.order.iter().map(|&c| row[c]));
            }
            for k in 0..n {
                let u_row = &self.u[k * n + k..(k + 1) * n];
                let (pivot, rest) = u_row.split_first().expect("k < n");
                for b in 0..batch {
                    let wr = &mut work[b * n + k..(b + 1) * n];
                    let (code, q) = quantize(first + b, wr[0]);
                    out[b * n + self.order[k]] = code;
                    let e = (wr[0] - q) / pivot;
                    for (v, &f) in wr[1..].iter_mut().zip(rest) {
                        *v -= e * f;
                    }
                }
            }
        });
    }
}

/// The upper Cholesky factor of the inverse of `h + damp·I` (with undriven channels
/// decoupled) in the order `order`, or `None` when a pivot is not positive.
///
/// With `J` the order reversal, `J A J = L Lᵀ` gives `A = R Rᵀ` with `R = J L J` upper, so
/// `A⁻¹ = (R⁻¹)ᵀ R⁻¹`: the wanted factor is `R⁻¹ = J L⁻¹ J`. One Cholesky and one triangular
/// inverse, both with contiguous inner products.
fn factor(h: &[f32], n: usize, order: &[usize], diag: &[f64], damp: f64) -> Option<Vec<f32>> {
    // a[i][j] = A[p(n-1-i)][p(n-1-j)]: the permuted matrix, reversed.
    let at = |i: usize, j: usize| -> f64 {
        let (a, b) = (order[n - 1 - i], order[n - 1 - j]);
        if diag[a] <= 0.0 || diag[b] <= 0.0 {
            return if a == b { 1.0 } else { 0.0 };
        }
        let v = f64::from(if a <= b { h[a * n + b] } else { h[b * n + a] });
        if a == b {
            v + damp
        } else {
            v
        }
    };
    // Lower Cholesky factor, row-major.
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot = dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let s = at(i, j) - dot;
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    // Columns of L⁻¹ by forward substitution, independent of one another (so in parallel);
    // column c is stored as row c of `inv_t`.
    let mut inv_t = vec![0.0f64; n * n];
    super::par::for_chunks(&mut inv_t, 16 * n, |start, piece| {
        for (k, x) in piece.chunks_exact_mut(n).enumerate() {
            let c = start / n + k;
            x[c] = 1.0 / l[c * n + c];
            for i in c + 1..n {
                let dot = dot(&l[i * n + c..i * n + i], &x[c..i]);
                x[i] = -dot / l[i * n + i];
            }
        }
    });
    // U[k][m] = L⁻¹[n-1-k][n-1-m] = inv_t[n-1-m][n-1-k], nonzero for m >= k.
    let mut u = vec![0.0f32; n * n];
    for k in 0..n {
        for m in k..n {
            u[k * n + m] = inv_t[(n - 1 - m) * n + (n - 1 - k)] as f32;
        }
    }
    Some(u)
}

/// `Σ a_i b_i` with eight partial sums, so the compiler can keep them in vector lanes (one
/// running sum would wait on each addition's latency).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second moment of `t` random inputs of `n` channels with correlated channels.
    fn moment(n: usize, t: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut h = vec![0.0f32; n * n];
        for _ in 0..t {
            let base = rnd();
            let x: Vec<f32> = (0..n)
                .map(|j| (rnd() + 0.8 * base) * (1.0 + j as f32 % 3.0))
                .collect();
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[i] * x[j] / t as f32;
                }
            }
        }
        h
    }

    fn quad(h: &[f32], n: usize, d: &[f32]) -> f64 {
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..n {
                s += f64::from(d[i]) * f64::from(h[i * n + j]) * f64::from(d[j]);
            }
        }
        s
    }

    #[test]
    fn factor_inverts_the_damped_moment() {
        let n = 7;
        let h = moment(n, 50, 3);
        let f = Feedback::new(&h, n, 0.0).unwrap();
        // Uᵀ U (in processing order) times H (permuted) is the identity.
        let p = &f.order;
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0f64;
                for k in 0..n {
                    let mut inv = 0.0f64;
                    for m in 0..n {
                        inv += f64::from(f.u[m * n + i]) * f64::from(f.u[m * n + k]);
                    }
                    s += inv * f64::from(h[p[k] * n + p[j]]);
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-3, "({i},{j}): {s}");
            }
        }
    }

    #[test]
    fn feedback_lowers_the_output_error_of_rounding() {
        let (n, rows) = (24, 10);
        let h = moment(n, 200, 11);
        let f = Feedback::new(&h, n, DEFAULT_DAMPING).unwrap();
        let w: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let step = 0.25f32;
        let round = |_: usize, v: f32| {
            let q = (v / step).round();
            (q as i32, q * step)
        };
        let mut codes = vec![0i32; rows * n];
        f.quantize_rows(&w, &mut codes, round);
        let (mut with, mut without) = (0.0, 0.0);
        for r in 0..rows {
            let row = &w[r * n..(r + 1) * n];
            let d_fb: Vec<f32> = (0..n)
                .map(|c| row[c] - codes[r * n + c] as f32 * step)
                .collect();
            let d_rtn: Vec<f32> = row.iter().map(|&v| v - round(r, v).1).collect();
            with += quad(&h, n, &d_fb);
            without += quad(&h, n, &d_rtn);
        }
        assert!(
            with < 0.8 * without,
            "feedback {with} against rounding {without}"
        );
    }

    #[test]
    fn undriven_channels_round_on_their_own() {
        let n = 5;
        let mut h = moment(n, 40, 5);
        for j in 0..n {
            h[2 * n + j] = 0.0;
            h[j * n + 2] = 0.0;
        }
        let f = Feedback::new(&h, n, DEFAULT_DAMPING).unwrap();
        let w = vec![0.3f32, -0.7, 0.6, 0.1, 0.9];
        let mut codes = vec![0.0f32; n];
        f.quantize_rows(&w, &mut codes, |_, v| {
            ((v * 2.0).round(), (v * 2.0).round() / 2.0)
        });
        assert_eq!(codes[2], 1.0, "channel 2 keeps its own rounding");
        assert!(Feedback::new(&[0.0; 9], 3, 0.01).is_err());
        assert!(Feedback::new(&[1.0, f32::NAN, 0.0, 1.0], 2, 0.01).is_err());
        assert!(Feedback::new(&[1.0; 3], 2, 0.01).is_err());
    }
}
