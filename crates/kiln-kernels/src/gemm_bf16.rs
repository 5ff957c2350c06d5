//! The panel GEMM of [`crate::gemm`] with weights and activations rounded to bf16.
//!
//! AVX-512 BF16's `vdpbf16ps` multiplies 32 pairs of bf16 values and adds them into 16 f32
//! lanes, twice the multiply-adds per instruction of an f32 FMA. Each lane takes two
//! consecutive bf16 values of each operand, so both sides are laid out in pairs along k:
//! the packed panel ([`pack_panel_bf16`]) holds, for each pair of columns `(2p, 2p + 1)`,
//! [`PANEL_ROWS`] 32-bit words (one per weight row) with column `2p` in the low half, and the
//! activations ([`convert_activations_bf16`]) are plain rows of bf16 whose words are
//! broadcast one pair at a time. Odd `k` is padded with a zero column.
//!
//! Products of two bf16 values are exact in f32 (8 + 8 significant bits), so the only
//! differences from the f32 GEMM are the rounding of both operands to bf16 (relative error
//! at most 2⁻⁹ each) and the order of the f32 additions. The scalar reference
//! ([`gemm_panel_bf16_reference`]) computes the same products and adds them in the order the
//! instruction is specified with (odd column first, then even, into one accumulator per
//! output), so the SIMD kernel agrees with it up to f32 summation rounding.
//!
//! As the instruction does, the conversion treats f32 subnormals as zero; the hardware also
//! flushes products and sums below f32's normal range (magnitude under 2⁻¹²⁶) to zero, which
//! the reference does not — a difference no model activation comes near.

use crate::aligned::AlignedVec;
use crate::gemm::PANEL_ROWS;

/// Whether [`gemm_panel_bf16`] runs the AVX-512 BF16 kernel on this CPU (otherwise it runs
/// the much slower scalar reference). Follows [`crate::detect`], so `KILN_ISA` below
/// `avx512` turns it off too.
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            crate::detect() == crate::Isa::Avx512Vnni
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v` rounded to the nearest bf16 (ties to even), subnormals flushed to a zero of the same
/// sign and NaNs kept quiet NaNs.
#[inline]
pub fn to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    // Adding just under half an ulp, plus the low kept bit, rounds ties to even; a carry
    // out of the mantissa correctly bumps the exponent (up to infinity). Wrapping only
    // matters for NaNs, which take the other branch.
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    // Selects rather than early returns keep the function branch-free, so loops over rows
    // vectorize.
    let r = if u & 0x7fff_ffff > 0x7f80_0000 {
        (u >> 16) | 0x0040
    } else if u & 0x7f80_0000 == 0 {
        // The instruction reads subnormal bf16 inputs as zero; flushing here keeps the
        // reference's products equal to the hardware's.
        (u >> 16) & 0x8000
    } else {
        rounded
    };
    r as u16
}

/// The f32 value of a bf16.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Column pairs of a `k`-long row: `k` rounded up to even, halved.
#[inline]
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Packs up to [`PANEL_ROWS`] rows of `k` floats (`rows[r * k..(r + 1) * k]`) into the bf16
/// panel layout: for each pair `p` in `0..pairs(k)`, `2 * PANEL_ROWS` values where
/// `out[p * 2 * PANEL_ROWS + 2 * r + j]` is row `r` at column `2p + j` (zero beyond `k` and
/// for rows past the last). `out` is resized to `pairs(k) * 2 * PANEL_ROWS`.
///
/// # Panics
/// If `rows.len()` is not a multiple of `k` or holds more than `PANEL_ROWS` rows.
pub fn pack_panel_bf16(rows: &[f32], k: usize, out: &mut AlignedVec<u16>) {
    assert!(
        k > 0 && rows.len().is_multiple_of(k),
        "pack_panel_bf16: rows are not whole"
    );
    let n = rows.len() / k;
    assert!(n <= PANEL_ROWS, "pack_panel_bf16: {n} rows exceed a panel");
    out.resize(pairs(k) * LINE, 0);
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: `bf16_available` checked AVX-512F and AVX-512 BF16; `rows` holds `n <=
        // PANEL_ROWS` whole rows of `k` and `out` was just sized to the panel.
        unsafe { x86::pack_panel_bf16_avx512(rows, k, out) };
        return;
    }
    pack_reference(rows, k, out);
}

/// [`pack_panel_bf16`] for rows already rounded to bf16: up to [`PANEL_ROWS`] rows of
/// `2 * pairs(k)` words each (`rows[r * 2 * pairs(k)..]`, the pad word of an odd `k` zero),
/// as [`crate::kiln_formats::dequantize_row_bf16`] gives them. The panel is the one
/// [`pack_panel_bf16`] makes of the f32 rows the words were rounded from: only the transpose
/// is left, from half the bytes.
///
/// # Panics
/// If `rows.len()` is not a multiple of the padded row length or holds more than
/// `PANEL_ROWS` rows.
pub fn pack_panel_bf16_words(rows: &[u16], k: usize, out: &mut AlignedVec<u16>) {
    let width = 2 * pairs(k);
    assert!(
        k > 0 && rows.len().is_multiple_of(width),
        "pack_panel_bf16_words: rows are not whole"
    );
    let n = rows.len() / width;
    assert!(
        n <= PANEL_ROWS,
        "pack_panel_bf16_words: {n} rows exceed a panel"
    );
    out.resize(pairs(k) * LINE, 0);
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: `bf16_available` checked AVX-512F; `rows` holds `n <= PANEL_ROWS` whole
        // padded rows and `out` was just sized to the panel.
        unsafe { x86::pack_panel_words_avx512(rows, k, out) };
        return;
    }
    pack_words_reference(rows, k, out);
}

/// The scalar word packing, which the AVX-512 one reproduces (`out` already sized).
fn pack_words_reference(rows: &[u16], k: usize, out: &mut [u16]) {
    let width = 2 * pairs(k);
    let n = rows.len() / width;
    for (p, line) in out.chunks_exact_mut(LINE).enumerate() {
        for r in 0..PANEL_ROWS {
            let pair = if r < n {
                [rows[r * width + 2 * p], rows[r * width + 2 * p + 1]]
            } else {
                [0, 0]
            };
            line[2 * r..2 * r + 2].copy_from_slice(&pair);
        }
    }
}

/// Values per pair line of a packed panel: two columns of every panel row.
const LINE: usize = 2 * PANEL_ROWS;

/// The scalar packing, which the AVX-512 one reproduces bit for bit (`out` already sized).
fn pack_reference(rows: &[f32], k: usize, out: &mut [u16]) {
    let n = rows.len() / k;
    let kp = pairs(k);
    // Blocks of 16 pairs: each row contributes one f32 cache line per block, rounded in one
    // vectorizable pass, and the block's 16 panel lines (2 KiB) stay in L1 while they are
    // filled.
    const BLOCK: usize = 16;
    let mut buf = [0u16; 2 * BLOCK];
    let mut p0 = 0;
    while p0 < kp {
        let width = BLOCK.min(kp - p0);
        let c0 = 2 * p0;
        let cols = (2 * width).min(k - c0);
        for (r, row) in rows.chunks_exact(k).enumerate() {
            for (b, &v) in buf[..cols].iter_mut().zip(&row[c0..c0 + cols]) {
                *b = to_bf16(v);
            }
            buf[cols..].fill(0);
            for (j, pair) in buf[..2 * width].chunks_exact(2).enumerate() {
                let at = (p0 + j) * LINE + 2 * r;
                out[at..at + 2].copy_from_slice(pair);
            }
        }
        if n < PANEL_ROWS {
            for line in out[p0 * LINE..(p0 + width) * LINE].chunks_exact_mut(LINE) {
                line[2 * n..].fill(0);
            }
        }
        p0 += width;
    }
}

/// Rounds `n_tokens` rows of `k` activations (`x[t * k..(t + 1) * k]`) to bf16 rows of
/// `2 * pairs(k)` values (a zero appended when `k` is odd). `out` is resized to
/// `n_tokens * 2 * pairs(k)`.
///
/// Where [`bf16_available`], 32 values at a time go through `vcvtne2ps2bf16`, whose rounding
/// [`to_bf16`] specifies: the result is [`convert_activations_bf16_reference`]'s bit for bit.
///
/// # Panics
/// If `x` holds fewer than `n_tokens * k` values.
pub fn convert_activations_bf16(x: &[f32], n_tokens: usize, k: usize, out: &mut AlignedVec<u16>) {
    assert!(
        x.len() >= n_tokens * k,
        "convert_activations_bf16: activations too short"
    );
    let width = 2 * pairs(k);
    out.resize(n_tokens * width, 0);
    if k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: `bf16_available` checked AVX-512F/BW (through `detect`) and AVX-512 BF16;
        // `x` holds `n_tokens` rows of `k > 0` (asserted) and `out` was just sized to
        // `n_tokens` rows of `width`.
        unsafe { x86::convert_activations_bf16_avx512(x, n_tokens, k, out) };
        return;
    }
    convert_reference(&x[..n_tokens * k], k, out);
}

/// The scalar conversion, which the AVX-512 one reproduces bit for bit: whole rows of `k > 0`
/// values in `x`, `out` sized to as many rows of `2 * pairs(k)`.
fn convert_reference(x: &[f32], k: usize, out: &mut [u16]) {
    let width = 2 * pairs(k);
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(width)) {
        round_to_bf16(src, &mut dst[..k]);
        dst[k..].fill(0);
    }
}

/// `out[i] = to_bf16(values[i])`, one by one (a loop that vectorizes: [`to_bf16`] is
/// branch-free).
///
/// # Panics
/// If the slices differ in length.
pub fn round_to_bf16(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len(), "round_to_bf16: lengths differ");
    for (o, &v) in out.iter_mut().zip(values) {
        *o = to_bf16(v);
    }
}

/// [`convert_activations_bf16`] through the scalar [`to_bf16`] on every CPU: what the
/// dispatched conversion must equal bit for bit.
///
/// # Panics
/// If `x` holds fewer than `n_tokens * k` values.
pub fn convert_activations_bf16_reference(
    x: &[f32],
    n_tokens: usize,
    k: usize,
    out: &mut AlignedVec<u16>,
) {
    assert!(
        x.len() >= n_tokens * k,
        "convert_activations_bf16: activations too short"
    );
    out.resize(n_tokens * 2 * pairs(k), 0);
    if k > 0 {
        convert_reference(&x[..n_tokens * k], k, out);
    }
}

/// `out[t * out_stride + r] = sum_c x[t, c] * w[r, c]` over the bf16 values, for every token
/// `t` in `0..n_tokens` and panel row `r` in `0..n_rows`, where `panel` comes from
/// [`pack_panel_bf16`] and `x` from [`convert_activations_bf16`] with the same `k`.
///
/// Runs the AVX-512 BF16 kernel when [`bf16_available`], the reference otherwise.
///
/// # Panics
/// If the slices are too short for the shapes given or `n_rows > PANEL_ROWS`.
pub fn gemm_panel_bf16(
    panel: &[u16],
    k: usize,
    n_rows: usize,
    x: &[u16],
    n_tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check(panel, k, n_rows, x, n_tokens, out, out_stride);
    // SAFETY: `check` validated that `out` holds every index the product writes, and `out`
    // is borrowed exclusively.
    unsafe { gemm_panel_bf16_into(panel, k, n_rows, x, n_tokens, out.as_mut_ptr(), out_stride) }
}

/// [`gemm_panel_bf16`] writing straight into a larger output that other threads write
/// beside (each its own panel's columns of every token row), so a panel's results need no
/// copy from a tile: only `out[t * out_stride + r]` for `t < n_tokens` and `r < n_rows` is
/// written.
///
/// # Safety
/// `out` is valid for writes at every such index, and nothing else reads or writes those
/// elements during the call.
///
/// # Panics
/// If the panel or activations are too short for the shapes given, `n_rows > PANEL_ROWS` or
/// `out_stride < n_rows`.
pub unsafe fn gemm_panel_bf16_into(
    panel: &[u16],
    k: usize,
    n_rows: usize,
    x: &[u16],
    n_tokens: usize,
    out: *mut f32,
    out_stride: usize,
) {
    check_inputs(panel, k, n_rows, x, n_tokens, out_stride);
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: `bf16_available` checked AVX-512F and AVX-512 BF16; `check_inputs` validated
        // the shapes the kernel's pointer arithmetic relies on, and the caller the output.
        unsafe { x86::gemm_panel_bf16_avx512(panel, k, n_rows, x, n_tokens, out, out_stride) };
        return;
    }
    let mut tile = vec![0.0f32; n_tokens * n_rows];
    gemm_panel_bf16_reference(panel, k, n_rows, x, n_tokens, &mut tile, n_rows);
    for (t, row) in tile.chunks_exact(n_rows.max(1)).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            // SAFETY: index t * out_stride + r, which the caller guarantees writable.
            unsafe { *out.add(t * out_stride + r) = v };
        }
    }
}

/// The scalar reference of [`gemm_panel_bf16`]: the same exact bf16 products, added in f32 in
/// the instruction's order.
pub fn gemm_panel_bf16_reference(
    panel: &[u16],
    k: usize,
    n_rows: usize,
    x: &[u16],
    n_tokens: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check(panel, k, n_rows, x, n_tokens, out, out_stride);
    let kp = pairs(k);
    for t in 0..n_tokens {
        let xt = &x[t * 2 * kp..(t + 1) * 2 * kp];
        for r in 0..n_rows {
            let mut acc = 0.0f32;
            for p in 0..kp {
                let w = &panel[p * 2 * PANEL_ROWS + 2 * r..];
                acc += bf16_to_f32(w[1]) * bf16_to_f32(xt[2 * p + 1]);
                acc += bf16_to_f32(w[0]) * bf16_to_f32(xt[2 * p]);
            }
            out[t * out_stride + r] = acc;
        }
    }
}

fn check(
    panel: &[u16],
    k: usize,
    n_rows: usize,
    x: &[u16],
    n_tokens: usize,
    out: &[f32],
    out_stride: usize,
) {
    check_inputs(panel, k, n_rows, x, n_tokens, out_stride);
    if n_tokens > 0 {
        assert!(
            out.len() >= (n_tokens - 1) * out_stride + n_rows,
            "gemm_panel_bf16: output too short"
        );
    }
}

/// [`check`] but for the output's length.
fn check_inputs(
    panel: &[u16],
    k: usize,
    n_rows: usize,
    x: &[u16],
    n_tokens: usize,
    out_stride: usize,
) {
    let kp = pairs(k);
    assert!(
        n_rows <= PANEL_ROWS,
        "gemm_panel_bf16: {n_rows} rows exceed a panel"
    );
    assert!(
        panel.len() >= kp * 2 * PANEL_ROWS,
        "gemm_panel_bf16: panel too short"
    );
    assert!(
        x.len() >= n_tokens * 2 * kp,
        "gemm_panel_bf16: activations too short"
    );
    if n_tokens > 0 {
        assert!(
            out_stride >= n_rows,
            "gemm_panel_bf16: output stride below the row count"
        );
    }
}

/// Whether prompts should multiply in bf16 rather than f32 on this CPU: where
/// [`bf16_available`], and `vdpbf16ps` does at least [`BF16_MIN_RATE_RATIO`] times the
/// multiply-adds per nanosecond of the f32 FMA ([`multiply_add_rates`], measured once).
///
/// Having the instruction does not make it fast. On AMD Zen 4 a `vdpbf16ps` issues as often
/// as an FMA and does twice its work; on the Intel Xeon cores measured here it issues once
/// every 2.2 cycles against two FMAs a cycle, so bf16 does under half the f32 rate, and the
/// f32 GEMM multiplies prompts about 1.4 times as fast (`examples/gemmbench`).
pub fn bf16_pays() -> bool {
    use std::sync::OnceLock;
    static PAYS: OnceLock<bool> = OnceLock::new();
    *PAYS.get_or_init(|| multiply_add_rates().is_some_and(|(bf16, f32)| bf16_wins(bf16, f32)))
}

/// The ratio of bf16 to f32 multiply-add rates from which [`bf16_pays`]: below 1, because
/// the bf16 panels are a quarter of the f32 ones' packing cost and half their memory (at
/// equal rates, the bf16 GEMM with its packing runs 1.1–1.4 times as fast at the models'
/// widths), and well clear of both kinds of core measured (0.46 and about 2).
pub const BF16_MIN_RATE_RATIO: f64 = 0.75;

/// The decision of [`bf16_pays`] for multiply-add rates `bf16` and `f32` (any common unit).
pub fn bf16_wins(bf16: f64, f32: f64) -> bool {
    bf16 >= BF16_MIN_RATE_RATIO * f32
}

/// Multiply-adds per nanosecond of `vdpbf16ps` and of the f32 FMA on this core, from short
/// loops of independent instructions (the best of a few runs, under a millisecond in all);
/// `None` where [`bf16_available`] is false.
pub fn multiply_add_rates() -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(0.0f64, f64::max);
        // SAFETY: `bf16_available` checked AVX-512F and AVX-512 BF16.
        let bf16 = best(&|| unsafe { x86::bf16_multiply_add_rate() });
        // SAFETY: as above (AVX-512F).
        let f32 = best(&|| unsafe { x86::f32_multiply_add_rate() });
        return Some((bf16, f32));
    }
    None
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{pairs, LINE, PANEL_ROWS};
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// Loop trips of the rate probes: 64 Ki instructions each, some tens of microseconds.
    const PROBE_TRIPS: usize = 8192;

    /// Multiply-adds per nanosecond of `vdpbf16ps` (32 per instruction).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_multiply_add_rate() -> f64 {
        // Pairs of bf16 0.001 (0x3a83): the sums stay finite and normal.
        let a = as_bh(black_box(_mm512_set1_epi32(0x3a83_3a83)));
        let b = as_bh(black_box(_mm512_set1_epi32(0x3a83_3a83)));
        multiply_add_rate(32, _mm512_setzero_ps(), |v| _mm512_dpbf16_ps(v, a, b))
    }

    /// Multiply-adds per nanosecond of the f32 FMA (16 per instruction).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_multiply_add_rate() -> f64 {
        let a = black_box(_mm512_set1_ps(1.0e-3));
        let b = black_box(_mm512_set1_ps(1.0e-3));
        multiply_add_rate(16, _mm512_setzero_ps(), |v| _mm512_fmadd_ps(a, b, v))
    }

    /// Multiply-adds per nanosecond of `step`, an instruction doing `per` of them into its
    /// accumulator: [`PROBE_TRIPS`] rounds over eight independent accumulators from `zero`,
    /// so that its latency does not count. Inlined into each probe, so `step` compiles with
    /// the probe's features.
    #[inline(always)]
    fn multiply_add_rate(per: usize, zero: __m512, step: impl Fn(__m512) -> __m512) -> f64 {
        let mut acc = [zero; 8];
        let start = Instant::now();
        for _ in 0..PROBE_TRIPS {
            for v in acc.iter_mut() {
                *v = step(*v);
            }
        }
        let ns = start.elapsed().as_nanos().max(1) as f64;
        black_box(acc);
        (PROBE_TRIPS * 8 * per) as f64 / ns
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `rows` holds at most `PANEL_ROWS` whole
    /// rows of `k > 0` and `out` holds `pairs(k) * LINE` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_panel_bf16_avx512(rows: &[f32], k: usize, out: &mut [u16]) {
        debug_assert!(out.len() >= pairs(k) * LINE);
        let n = rows.len() / k;
        let src = rows.as_ptr();
        // Each row's 32 columns of the block round to one vector of 16 pair words.
        let load = |r: usize, p0: usize, width: usize| {
            let c0 = 2 * p0;
            let cols = (2 * width).min(k - c0);
            let lo_mask: __mmask16 = if cols >= 16 { !0 } else { (1 << cols) - 1 };
            let hi_mask: __mmask16 = if cols >= 32 {
                !0
            } else if cols > 16 {
                (1 << (cols - 16)) - 1
            } else {
                0
            };
            // SAFETY: columns c0..c0 + cols of row r < n are inside `rows`, and the masks keep
            // the loads to those columns.
            let (lo, hi) = unsafe {
                let at = src.add(r * k + c0);
                (
                    _mm512_maskz_loadu_ps(lo_mask, at),
                    _mm512_maskz_loadu_ps(hi_mask, at.add(16)),
                )
            };
            bh_as_i(_mm512_cvtne2ps_pbh(hi, lo))
        };
        // SAFETY: `out` holds the panel, `pairs(k)` lines of PANEL_ROWS words; `load` reads
        // only rows below n.
        unsafe { pack_word_lines(pairs(k), n, out.as_mut_ptr().cast(), load) }
    }

    /// [`super::pack_panel_bf16_words`]: each row's 16 pair words of a block in one load.
    ///
    /// # Safety
    /// AVX-512 F; `rows` holds `n <= PANEL_ROWS` rows of `2 * pairs(k)` words and `out` is
    /// `pairs(k) * LINE` long.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_panel_words_avx512(rows: &[u16], k: usize, out: &mut [u16]) {
        let kp = pairs(k);
        debug_assert!(out.len() >= kp * LINE);
        let n = rows.len() / (2 * kp);
        let src = rows.as_ptr().cast::<u32>();
        let load = |r: usize, p0: usize, width: usize| {
            let mask: __mmask16 = if width == 16 { !0 } else { (1 << width) - 1 };
            // SAFETY: pairs p0..p0 + width of row r < n are inside `rows` (a row is kp pair
            // words), and the mask keeps the load to them.
            unsafe { _mm512_maskz_loadu_epi32(mask, src.add(r * kp + p0).cast()) }
        };
        // SAFETY: `out` holds the panel, `kp` lines of PANEL_ROWS words; `load` reads only
        // rows below n.
        unsafe { pack_word_lines(kp, n, out.as_mut_ptr().cast(), load) }
    }

    /// The f32 panel of [`crate::gemm::pack_panel`]: `n <= PANEL_ROWS` rows of `k` floats,
    /// transposed as 32-bit words by [`pack_word_lines`] (a line per column).
    ///
    /// # Safety
    /// AVX-512 F; `rows` holds `n` whole rows of `k` and `out` `k * PANEL_ROWS` values.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pack_panel_f32_avx512(rows: &[f32], k: usize, out: &mut [f32]) {
        debug_assert!(out.len() >= k * PANEL_ROWS);
        let n = rows.len() / k;
        let src = rows.as_ptr();
        let load = |r: usize, c0: usize, width: usize| {
            let mask: __mmask16 = if width == 16 { !0 } else { (1 << width) - 1 };
            // SAFETY: columns c0..c0 + width of row r < n are inside `rows`, and the mask
            // keeps the load to them.
            unsafe { _mm512_maskz_loadu_epi32(mask, src.add(r * k + c0).cast()) }
        };
        // SAFETY: `out` holds the panel's k lines; `load` reads only rows below n.
        unsafe { pack_word_lines(k, n, out.as_mut_ptr().cast(), load) }
    }

    /// Lines of [`PANEL_ROWS`] 32-bit words at `dst`, one per column of `n <= PANEL_ROWS`
    /// rows of `cols` words, in blocks of 16 columns by 16 rows: `load(r, c0, width)` gives
    /// row `r`'s words `c0..c0 + width` (the rest zero), and a 16×16 transpose turns a block
    /// into 16 half lines, one store each. Rows `n..PANEL_ROWS` are zero.
    ///
    /// # Safety
    /// AVX-512 F; `dst` is valid for `cols * PANEL_ROWS` words; `load` is sound for rows below
    /// `n`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pack_word_lines(
        cols: usize,
        n: usize,
        dst: *mut u32,
        load: impl Fn(usize, usize, usize) -> __m512i,
    ) {
        debug_assert!(n <= PANEL_ROWS);
        let mut c0 = 0;
        while c0 < cols {
            let width = 16.min(cols - c0);
            for half in 0..2 {
                let mut v = [_mm512_setzero_si512(); 16];
                for (i, vi) in v.iter_mut().enumerate() {
                    let r = 16 * half + i;
                    if r >= n {
                        break;
                    }
                    *vi = load(r, c0, width);
                }
                let t = transpose16(v);
                for (j, tj) in t.iter().enumerate().take(width) {
                    // SAFETY: column c0 + j < cols, so its line of PANEL_ROWS words, and the
                    // half line of 16 words at offset 16 * half, are inside `dst`.
                    unsafe {
                        _mm512_storeu_si512(dst.add((c0 + j) * PANEL_ROWS + 16 * half).cast(), *tj)
                    };
                }
            }
            c0 += width;
        }
    }

    /// Rounds `n_tokens` rows of `k` floats to bf16 rows of `2 * pairs(k)` values, 32 at a
    /// time with `vcvtne2ps2bf16`, which rounds exactly as `to_bf16` does (nearest even,
    /// subnormals to a signed zero, NaNs quieted by setting bit 6 of the upper half). The odd
    /// `k`'s padding column comes from a zero the masked load reads in.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 BF16; `x` holds `n_tokens * k`
    /// values (`k > 0`) and `out` `n_tokens * 2 * pairs(k)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn convert_activations_bf16_avx512(
        x: &[f32],
        n_tokens: usize,
        k: usize,
        out: &mut [u16],
    ) {
        let width = 2 * pairs(k);
        for t in 0..n_tokens {
            // SAFETY: row t's k values start at t * k within `x`, its width values at
            // t * width within `out` (the caller's sizes); full vectors cover columns
            // c..c + 32 <= k, and the tail's masks keep loads below k and stores below width.
            unsafe {
                let src = x.as_ptr().add(t * k);
                let dst = out.as_mut_ptr().add(t * width);
                let mut c = 0;
                while c + 32 <= k {
                    let lo = _mm512_loadu_ps(src.add(c));
                    let hi = _mm512_loadu_ps(src.add(c + 16));
                    _mm512_storeu_si512(dst.add(c).cast(), bh_as_i(_mm512_cvtne2ps_pbh(hi, lo)));
                    c += 32;
                }
                if c < width {
                    let cols = k - c;
                    let lo_mask: __mmask16 = if cols >= 16 { !0 } else { (1 << cols) - 1 };
                    let hi_mask: __mmask16 = if cols > 16 { (1 << (cols - 16)) - 1 } else { 0 };
                    let lo = _mm512_maskz_loadu_ps(lo_mask, src.add(c));
                    // Without a high half the address may lie past the row: never dereferenced.
                    let hi = _mm512_maskz_loadu_ps(hi_mask, src.add(c).wrapping_add(16));
                    let words = bh_as_i(_mm512_cvtne2ps_pbh(hi, lo));
                    let store: __mmask32 = if width - c >= 32 {
                        !0
                    } else {
                        (1 << (width - c)) - 1
                    };
                    _mm512_mask_storeu_epi16(dst.add(c).cast(), store, words);
                }
            }
        }
    }

    /// Transposes a 16×16 matrix of 32-bit words (`v[i]` lane `j` goes to `out[j]` lane
    /// `i`): words interleaved, then 64-bit pairs, then 128-bit lanes twice.
    #[target_feature(enable = "avx512f")]
    fn transpose16(mut r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // Now each 128-bit lane of r[4g + c] holds rows 4g..4g + 4 of one column.
        for b in [0, 4, 8, 12] {
            r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        for b in [0, 8] {
            for c in 0..4 {
                t[b + c] = _mm512_shuffle_i32x4::<0x88>(r[b + c], r[b + 4 + c]);
                t[b + 4 + c] = _mm512_shuffle_i32x4::<0xdd>(r[b + c], r[b + 4 + c]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
            r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
        }
        r
    }

    /// The instruction's bf16 vector type as plain words.
    #[inline(always)]
    fn bh_as_i(v: __m512bh) -> __m512i {
        // SAFETY: both are plain 64-byte vectors with no invalid bit patterns.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
    }

    /// Tokens per microkernel step: 8 tokens × 2 vectors = 16 accumulators, as in the f32
    /// kernel; each step covers two columns instead of one.
    const MR: usize = 8;

    /// Reinterprets 16 words of bf16 pairs as the instruction's operand type.
    #[inline(always)]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are plain 64-byte vectors with no invalid bit patterns.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// One step of `MR_` tokens over all pairs.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16; `p` points to `kp * 2 * PANEL_ROWS` readable values and
    /// `xs` to `mr` rows of `2 * kp` readable values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block<const MR_: usize>(
        p: *const u16,
        kp: usize,
        xs: *const u16,
        mr: usize,
    ) -> [[__m512; 2]; MR_] {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR_];
        // SAFETY: pair q < kp keeps panel offsets below kp * 2 * PANEL_ROWS and activation
        // offsets below mr * 2 * kp (rows i < mr), the caller's bounds.
        unsafe {
            for q in 0..kp {
                let w0 = as_bh(_mm512_loadu_si512(p.add(q * 2 * PANEL_ROWS).cast()));
                let w1 = as_bh(_mm512_loadu_si512(
                    p.add(q * 2 * PANEL_ROWS + PANEL_ROWS).cast(),
                ));
                for (i, a) in acc.iter_mut().enumerate().take(mr) {
                    let pair = xs.add(i * 2 * kp + 2 * q).cast::<i32>().read_unaligned();
                    let xv = as_bh(_mm512_set1_epi32(pair));
                    a[0] = _mm512_dpbf16_ps(a[0], w0, xv);
                    a[1] = _mm512_dpbf16_ps(a[1], w1, xv);
                }
            }
        }
        acc
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; the caller checked the shapes
    /// (`check_inputs`) and that `out` is writable at `t * out_stride + r` for every token
    /// `t` and row `r < n_rows`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn gemm_panel_bf16_avx512(
        panel: &[u16],
        k: usize,
        n_rows: usize,
        x: &[u16],
        n_tokens: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let kp = pairs(k);
        // The panel's rows as two masks of sixteen lanes.
        let low: __mmask16 = if n_rows >= 16 { !0 } else { (1 << n_rows) - 1 };
        let high: __mmask16 = if n_rows >= 32 {
            !0
        } else if n_rows > 16 {
            (1 << (n_rows - 16)) - 1
        } else {
            0
        };
        let mut t = 0;
        while t < n_tokens {
            let mr = (n_tokens - t).min(MR);
            // SAFETY: the panel holds kp * 2 * PANEL_ROWS values and x holds n_tokens rows of
            // 2 * kp (`check`), so rows t..t + mr are in bounds; features are the caller's.
            let acc = unsafe {
                let xs = x.as_ptr().add(t * 2 * kp);
                if mr == MR {
                    // A constant trip count lets the token loop unroll fully.
                    block::<MR>(panel.as_ptr(), kp, xs, MR)
                } else {
                    block::<MR>(panel.as_ptr(), kp, xs, mr)
                }
            };
            for (i, a) in acc.iter().enumerate().take(mr) {
                // SAFETY: rows 0..n_rows of token t + i are writable (the caller's guarantee);
                // the masks keep the stores to them.
                unsafe {
                    let row = out.add((t + i) * out_stride);
                    _mm512_mask_storeu_ps(row, low, a[0]);
                    _mm512_mask_storeu_ps(row.wrapping_add(16), high, a[1]);
                }
            }
            t += mr;
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

    /// The probes measure real rates where the CPU has AVX-512 BF16 (between a tenth of a
    /// multiply-add and a few hundred per nanosecond), and the decision follows them.
    #[test]
    fn multiply_add_rates_decide_the_prompt_gemm() {
        match multiply_add_rates() {
            Some((bf16, f32)) => {
                for rate in [bf16, f32] {
                    assert!((0.1..1000.0).contains(&rate), "{bf16} / {f32} per ns");
                }
                eprintln!("multiply-adds per ns: bf16 {bf16:.1}, f32 {f32:.1}");
                // Measured again, the rates land on the same side of the ratio unless they
                // are close to it.
                if (bf16 / f32 / BF16_MIN_RATE_RATIO - 1.0).abs() > 0.2 {
                    assert_eq!(bf16_pays(), bf16_wins(bf16, f32));
                }
            }
            None => assert!(!bf16_available() && !bf16_pays()),
        }
        // Zen 4 (bf16 twice the f32 rate) and the Intel cores measured (0.46 of it).
        assert!(bf16_wins(128.0, 64.0));
        assert!(!bf16_wins(14.7, 32.0));
        assert!(bf16_wins(0.75, 1.0) && !bf16_wins(0.74, 1.0));
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::MAX), 0x7f80);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(bf16_to_f32(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::from_bits(1)), 0);
        assert_eq!(to_bf16(-f32::from_bits(0x007f_ffff)), 0x8000);
        assert_eq!(bf16_to_f32(to_bf16(f32::MIN_POSITIVE)), f32::MIN_POSITIVE);
    }

    #[test]
    fn layout_pairs_columns_per_row() {
        let (k, n) = (5, 3);
        let rows: Vec<f32> = (0..n * k).map(|v| v as f32).collect();
        let mut panel = AlignedVec::new();
        pack_panel_bf16(&rows, k, &mut panel);
        assert_eq!(panel.len(), 3 * 2 * PANEL_ROWS);
        for p in 0..3 {
            for r in 0..PANEL_ROWS {
                for j in 0..2 {
                    let c = 2 * p + j;
                    let want = if r < n && c < k { rows[r * k + c] } else { 0.0 };
                    assert_eq!(bf16_to_f32(panel[p * 2 * PANEL_ROWS + 2 * r + j]), want);
                }
            }
        }
        let mut xb = AlignedVec::new();
        convert_activations_bf16(&rows, n, k, &mut xb);
        assert_eq!(xb.len(), n * 6);
        for t in 0..n {
            assert_eq!(xb[t * 6 + 5], 0);
            for c in 0..k {
                assert_eq!(bf16_to_f32(xb[t * 6 + c]), rows[t * k + c]);
            }
        }
    }

    /// Packing rows rounded to bf16 beforehand gives the panel of the f32 rows, on the
    /// dispatched level and the reference alike, for every panel height and odd `k`.
    #[test]
    fn word_packing_equals_packing_the_f32_rows() {
        for k in [1, 2, 3, 31, 32, 33, 64, 100, 576] {
            let width = 2 * pairs(k);
            for n in [1, 5, 16, 17, 31, 32] {
                let rows = values(n * k, (k * 31 + n) as u32);
                let mut words = vec![0u16; n * width];
                for (w, r) in words.chunks_exact_mut(width).zip(rows.chunks_exact(k)) {
                    for (o, &v) in w.iter_mut().zip(r) {
                        *o = to_bf16(v * 1e3);
                    }
                }
                let scaled: Vec<f32> = rows.iter().map(|v| v * 1e3).collect();
                let (mut want, mut got) = (AlignedVec::new(), AlignedVec::filled(3, 0xffff));
                pack_panel_bf16(&scaled, k, &mut want);
                pack_panel_bf16_words(&words, k, &mut got);
                assert_eq!(got, want, "k {k}, {n} rows");
                let mut reference = vec![0xffff; want.len()];
                pack_words_reference(&words, k, &mut reference);
                assert_eq!(reference, &want[..], "reference, k {k}, {n} rows");
            }
        }
    }

    #[test]
    fn dispatched_packing_matches_reference_bit_for_bit() {
        // Ordinary values, ties, subnormals, infinities and NaNs, in every column position.
        let specials = [
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::from_bits(1),
            -f32::from_bits(0x0040_0000),
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
        ];
        for k in [1, 2, 3, 15, 16, 17, 31, 32, 33, 47, 64, 100] {
            for n in [1, 5, 16, 17, 31, 32] {
                let mut rows = values(n * k, (k * 100 + n) as u32);
                for (i, v) in rows.iter_mut().enumerate() {
                    if i % 7 == 3 {
                        *v = specials[(i / 7) % specials.len()];
                    } else {
                        *v *= 1e3;
                    }
                }
                let mut fast = AlignedVec::filled(3, 0xdead);
                pack_panel_bf16(&rows, k, &mut fast);
                let mut reference = vec![0xbeef; fast.len()];
                pack_reference(&rows, k, &mut reference);
                assert_eq!(&fast[..], reference, "k {k} n {n}");
            }
        }
    }

    /// f32 bit patterns that stress the rounding: anything, exact ties and their neighbours,
    /// subnormals and zeros, infinities and NaNs (quiet and signalling, any payload), values
    /// that round up to infinity.
    fn activation_bits() -> impl Strategy<Value = u32> {
        prop_oneof![
            4 => any::<u32>(),
            2 => any::<u32>().prop_map(|u| (u & 0xffff_0000) | 0x8000),
            1 => any::<u32>().prop_map(|u| (u & 0xffff_0000) | 0x7fff),
            1 => any::<u32>().prop_map(|u| (u & 0xffff_0000) | 0x8001),
            2 => any::<u32>().prop_map(|u| u & 0x807f_ffff),
            2 => any::<u32>().prop_map(|u| u | 0x7f80_0000),
            1 => any::<u32>().prop_map(|u| (u & 0x8000_ffff) | 0x7f7f_8000),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// The dispatched conversion (AVX-512 BF16 where the CPU has it) is the scalar
        /// `to_bf16` bit for bit, padding included, for every row length.
        #[test]
        fn converted_activations_match_reference_bit_for_bit(
            (k, n_tokens, bits) in (0usize..100, 0usize..5).prop_flat_map(|(k, n)| {
                (Just(k), Just(n), prop::collection::vec(activation_bits(), n * k + 3))
            }),
        ) {
            let x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
            let width = 2 * pairs(k);
            let mut fast = AlignedVec::filled(n_tokens * width + 7, 0xdead);
            convert_activations_bf16(&x, n_tokens, k, &mut fast);
            let mut reference = AlignedVec::filled(2, 0xbeef);
            convert_activations_bf16_reference(&x, n_tokens, k, &mut reference);
            prop_assert_eq!(fast.len(), n_tokens * width);
            prop_assert_eq!(&fast, &reference);
            for (t, row) in reference.chunks_exact(width.max(1)).enumerate().take(n_tokens) {
                for (c, &b) in row.iter().enumerate() {
                    let want = if c < k { to_bf16(x[t * k + c]) } else { 0 };
                    prop_assert_eq!(b, want, "t {} c {}", t, c);
                }
            }
        }
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
            let (mut panel, mut xb) = (AlignedVec::new(), AlignedVec::new());
            pack_panel_bf16(&rows, k, &mut panel);
            convert_activations_bf16(&x, n_tokens, k, &mut xb);
            let stride = n_rows + pad;
            let len = n_tokens * stride;
            let mut fast = vec![7.0f32; len];
            let mut reference = vec![7.0f32; len];
            gemm_panel_bf16(&panel, k, n_rows, &xb, n_tokens, &mut fast, stride);
            gemm_panel_bf16_reference(&panel, k, n_rows, &xb, n_tokens, &mut reference, stride);
            for t in 0..n_tokens {
                for r in 0..stride {
                    let (f, e) = (fast[t * stride + r], reference[t * stride + r]);
                    if r >= n_rows {
                        // Padding between rows is never written.
                        prop_assert_eq!(f, 7.0);
                        continue;
                    }
                    // Same exact products, each below 0.25 in magnitude: only the rounding
                    // of the f32 additions can differ.
                    let bound = 1e-6 * k as f32;
                    prop_assert!((f - e).abs() <= bound, "t {} r {}: {} vs {}", t, r, f, e);
                    // And both are the f32 product of the operands up to bf16 rounding:
                    // each term moves by at most (2^-8 + 2^-16) of its 0.25 magnitude.
                    let exact: f32 = (0..k).map(|c| x[t * k + c] * rows[r * k + c]).sum();
                    prop_assert!((e - exact).abs() <= k as f32 * 0.25 / 250.0 + bound);
                }
            }
        }
    }
}
