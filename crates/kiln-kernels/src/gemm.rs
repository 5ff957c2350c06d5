//! f32 matrix products for many activation rows at once (prompt processing).
//!
//! With a batch of tokens every weight is used many times, so it pays to dequantize a panel of
//! [`PANEL_ROWS`] weight rows once, store it k-major ([`pack_panel`]), and stream the tokens
//! through a register-blocked microkernel ([`gemm_panel`]): each step of the inner loop loads
//! the panel's weights at one k into vector registers, broadcasts one activation per token, and
//! issues one fused multiply-add per (token, vector) pair into accumulators that stay in
//! registers for the whole k loop. The arithmetic is plain f32, so the result is the exact
//! product of the dequantized weights up to summation order.

use crate::aligned::AlignedVec;
use crate::isa::detect;
#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;

/// Weight rows per packed panel (two AVX-512 vectors, four AVX2 vectors).
pub const PANEL_ROWS: usize = 32;

/// Packs up to [`PANEL_ROWS`] rows of `k` floats (`rows[r * k..(r + 1) * k]`) into the panel
/// layout: for each `kk` in `0..k`, `PANEL_ROWS` consecutive floats holding rows `0..n` at
/// `kk`, zero-padded. `out` is resized to `k * PANEL_ROWS`.
///
/// # Panics
/// If `rows.len()` is not a multiple of `k` or holds more than `PANEL_ROWS` rows.
pub fn pack_panel(rows: &[f32], k: usize, out: &mut AlignedVec<f32>) {
    assert!(
        k > 0 && rows.len().is_multiple_of(k),
        "pack_panel: rows are not whole"
    );
    let n = rows.len() / k;
    assert!(n <= PANEL_ROWS, "pack_panel: {n} rows exceed a panel");
    out.resize(k * PANEL_ROWS, 0.0);
    #[cfg(target_arch = "x86_64")]
    if detect() == Isa::Avx512Vnni {
        // SAFETY: `detect` reports AVX-512 only when the CPU has AVX-512F; `rows` holds `n <=
        // PANEL_ROWS` whole rows of `k` and `out` was just sized to the panel.
        unsafe { crate::gemm_bf16::x86::pack_panel_f32_avx512(rows, k, out) };
        return;
    }
    pack_reference(rows, k, out);
}

/// The scalar packing, which the AVX-512 one reproduces bit for bit (`out` already sized).
fn pack_reference(rows: &[f32], k: usize, out: &mut [f32]) {
    let n = rows.len() / k;
    // Blocks of 16 columns: each row contributes one cache line per block, and the block's
    // 16 panel lines (2 KiB) stay in L1 while they are filled.
    const BLOCK: usize = 16;
    let mut kk0 = 0;
    while kk0 < k {
        let width = BLOCK.min(k - kk0);
        for (r, row) in rows.chunks_exact(k).enumerate() {
            for (j, &v) in row[kk0..kk0 + width].iter().enumerate() {
                out[(kk0 + j) * PANEL_ROWS + r] = v;
            }
        }
        if n < PANEL_ROWS {
            for line in
                out[kk0 * PANEL_ROWS..(kk0 + width) * PANEL_ROWS].chunks_exact_mut(PANEL_ROWS)
            {
                line[n..].fill(0.0);
            }
        }
        kk0 += width;
    }
}

/// `out[t * out_stride + r] = sum_kk x[t * k + kk] * panel[kk * PANEL_ROWS + r]` for every
/// token `t` in `0..n_tokens` and panel row `r` in `0..n_rows`.
///
/// # Panics
/// If the slices are too short for the shapes given or `n_rows > PANEL_ROWS`.
pub fn gemm_panel(
    panel: &[f32],
    k: usize,
    n_rows: usize,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check(panel, k, n_rows, x, n_tokens, out, out_stride);
    match detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` reports AVX-512 only when the CPU has AVX-512F (it requires more),
        // and the shapes were checked above.
        Isa::Avx512Vnni => unsafe {
            x86::gemm_panel_avx512(panel, k, n_rows, x, n_tokens, out, out_stride)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` reports AVX2 only when the CPU has AVX2 and FMA; shapes checked.
        Isa::Avx2 => unsafe {
            x86::gemm_panel_avx2(panel, k, n_rows, x, n_tokens, out, out_stride)
        },
        _ => gemm_panel_reference(panel, k, n_rows, x, n_tokens, out, out_stride),
    }
}

/// The scalar reference of [`gemm_panel`].
pub fn gemm_panel_reference(
    panel: &[f32],
    k: usize,
    n_rows: usize,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check(panel, k, n_rows, x, n_tokens, out, out_stride);
    for t in 0..n_tokens {
        for r in 0..n_rows {
            let mut acc = 0.0f32;
            for kk in 0..k {
                acc += x[t * k + kk] * panel[kk * PANEL_ROWS + r];
            }
            out[t * out_stride + r] = acc;
        }
    }
}

fn check(
    panel: &[f32],
    k: usize,
    n_rows: usize,
    x: &[f32],
    n_tokens: usize,
    out: &[f32],
    out_stride: usize,
) {
    assert!(
        n_rows <= PANEL_ROWS,
        "gemm_panel: {n_rows} rows exceed a panel"
    );
    assert!(panel.len() >= k * PANEL_ROWS, "gemm_panel: panel too short");
    assert!(x.len() >= n_tokens * k, "gemm_panel: activations too short");
    if n_tokens > 0 {
        assert!(
            out_stride >= n_rows,
            "gemm_panel: output stride below the row count"
        );
        assert!(
            out.len() >= (n_tokens - 1) * out_stride + n_rows,
            "gemm_panel: output too short"
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PANEL_ROWS;
    use std::arch::x86_64::*;

    /// Tokens per AVX-512 microkernel step: 8 tokens × 2 vectors = 16 accumulators.
    const MR_512: usize = 8;
    /// Tokens per AVX2 microkernel step: 3 tokens × 4 vectors = 12 accumulators.
    const MR_256: usize = 3;

    /// # Safety
    /// The CPU must have AVX-512F; the caller checked the shapes (`check`).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemm_panel_avx512(
        panel: &[f32],
        k: usize,
        n_rows: usize,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        // SAFETY: every pointer offset below is bounded by the shapes `check` validated (see
        // the notes on the loads), and the caller guarantees the target features.
        unsafe {
            let mut t = 0;
            while t < n_tokens {
                let mr = (n_tokens - t).min(MR_512);
                let mut acc = [[_mm512_setzero_ps(); 2]; MR_512];
                let xs = x.as_ptr().add(t * k);
                let p = panel.as_ptr();
                // SAFETY (all loads): kk < k, so panel offsets stay below k * PANEL_ROWS and
                // activation offsets below (t + mr) * k <= n_tokens * k, both checked lengths.
                if mr == MR_512 {
                    for kk in 0..k {
                        let w0 = _mm512_loadu_ps(p.add(kk * PANEL_ROWS));
                        let w1 = _mm512_loadu_ps(p.add(kk * PANEL_ROWS + 16));
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xv = _mm512_set1_ps(*xs.add(i * k + kk));
                            a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                            a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                        }
                    }
                } else {
                    for kk in 0..k {
                        let w0 = _mm512_loadu_ps(p.add(kk * PANEL_ROWS));
                        let w1 = _mm512_loadu_ps(p.add(kk * PANEL_ROWS + 16));
                        for (i, a) in acc.iter_mut().enumerate().take(mr) {
                            let xv = _mm512_set1_ps(*xs.add(i * k + kk));
                            a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                            a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(mr) {
                    let mut lanes = [0.0f32; PANEL_ROWS];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
                    _mm512_storeu_ps(lanes.as_mut_ptr().add(16), a[1]);
                    let row = (t + i) * out_stride;
                    out[row..row + n_rows].copy_from_slice(&lanes[..n_rows]);
                }
                t += mr;
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; the caller checked the shapes (`check`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_panel_avx2(
        panel: &[f32],
        k: usize,
        n_rows: usize,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        // SAFETY: every pointer offset below is bounded by the shapes `check` validated (see
        // the notes on the loads), and the caller guarantees the target features.
        unsafe {
            let mut t = 0;
            while t < n_tokens {
                let mr = (n_tokens - t).min(MR_256);
                let mut acc = [[_mm256_setzero_ps(); 4]; MR_256];
                let xs = x.as_ptr().add(t * k);
                let p = panel.as_ptr();
                // SAFETY (all loads): as in the AVX-512 kernel.
                for kk in 0..k {
                    let w = [
                        _mm256_loadu_ps(p.add(kk * PANEL_ROWS)),
                        _mm256_loadu_ps(p.add(kk * PANEL_ROWS + 8)),
                        _mm256_loadu_ps(p.add(kk * PANEL_ROWS + 16)),
                        _mm256_loadu_ps(p.add(kk * PANEL_ROWS + 24)),
                    ];
                    for (i, a) in acc.iter_mut().enumerate().take(mr) {
                        let xv = _mm256_set1_ps(*xs.add(i * k + kk));
                        for (v, wv) in a.iter_mut().zip(w) {
                            *v = _mm256_fmadd_ps(xv, wv, *v);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(mr) {
                    let mut lanes = [0.0f32; PANEL_ROWS];
                    for (j, v) in a.iter().enumerate() {
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * j), *v);
                    }
                    let row = (t + i) * out_stride;
                    out[row..row + n_rows].copy_from_slice(&lanes[..n_rows]);
                }
                t += mr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn dispatched_kernel_matches_reference(
            k in 1usize..300,
            n_rows in 1usize..=PANEL_ROWS,
            n_tokens in 0usize..20,
            pad in 0usize..5,
            seed in any::<u32>(),
        ) {
            let rows = values(n_rows * k, seed);
            let x = values(n_tokens * k, seed ^ 0x5555);
            let mut panel = AlignedVec::new();
            pack_panel(&rows, k, &mut panel);
            let stride = n_rows + pad;
            let len = n_tokens * stride;
            let mut fast = vec![7.0f32; len];
            let mut reference = vec![7.0f32; len];
            gemm_panel(&panel, k, n_rows, &x, n_tokens, &mut fast, stride);
            gemm_panel_reference(&panel, k, n_rows, &x, n_tokens, &mut reference, stride);
            for t in 0..n_tokens {
                for r in 0..stride {
                    let (f, e) = (fast[t * stride + r], reference[t * stride + r]);
                    if r >= n_rows {
                        // Padding between rows is never written.
                        prop_assert_eq!(f, 7.0);
                        continue;
                    }
                    // Each term is below 0.25 in magnitude: the sums differ by rounding only.
                    let bound = 1e-6 * k as f32;
                    prop_assert!((f - e).abs() <= bound, "t {} r {}: {} vs {}", t, r, f, e);
                }
            }
        }
    }

    #[test]
    fn reference_is_the_plain_product() {
        let (k, n_rows, n_tokens) = (5, 3, 2);
        let rows: Vec<f32> = (0..n_rows * k).map(|v| v as f32).collect();
        let x: Vec<f32> = (0..n_tokens * k).map(|v| (v as f32) * 0.5).collect();
        let mut panel = AlignedVec::new();
        pack_panel(&rows, k, &mut panel);
        let mut out = vec![0.0; n_tokens * n_rows];
        gemm_panel_reference(&panel, k, n_rows, &x, n_tokens, &mut out, n_rows);
        for t in 0..n_tokens {
            for r in 0..n_rows {
                let want: f32 = (0..k).map(|kk| x[t * k + kk] * rows[r * k + kk]).sum();
                assert_eq!(out[t * n_rows + r], want);
            }
        }
    }

    proptest! {
        /// Every level packs as the scalar code does, bit for bit, over every row count, odd
        /// widths and reused panels holding older values.
        #[test]
        fn packing_matches_the_reference(
            n in 1..=PANEL_ROWS,
            k in 1usize..80,
            seed in any::<u32>(),
        ) {
            let rows: Vec<f32> = (0..n * k)
                .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761) ^ seed))
                .collect();
            let mut got = AlignedVec::filled(3 * k * PANEL_ROWS, f32::NAN);
            pack_panel(&rows, k, &mut got);
            let mut want = vec![f32::NAN; k * PANEL_ROWS];
            pack_reference(&rows, k, &mut want);
            prop_assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert_eq!(g.to_bits(), w.to_bits(), "value {} (line {})", i, i / PANEL_ROWS);
            }
            for (r, row) in rows.chunks_exact(k).enumerate() {
                for (c, v) in row.iter().enumerate() {
                    prop_assert_eq!(got[c * PANEL_ROWS + r].to_bits(), v.to_bits());
                }
            }
        }
    }
}
