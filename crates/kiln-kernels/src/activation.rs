//! Activation rows quantized to int8 (or int16) for the integer dot products.

use kiln_format::ggml::GgmlType;

use crate::aligned::AlignedVec;
use crate::layout::{QK, QK_K};

/// How the activations of one row are stored for a given weight format.
///
/// Integer dot products need both operands as small integers: the activations are quantized
/// per block to int8 with one f32 scale `d = max|x| / 127`, so codes stay within ±127 (never
/// -128, which keeps the sign tricks of the SIMD kernels exact).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationFormat {
    /// 32-element blocks, each with its scale and `d * sum(codes)` (ggml's Q8_1 idea with an
    /// f32 scale). Every 32-element weight format uses it: the block sum turns a weight offset
    /// or minimum into one multiply per block, so the kernels can multiply unsigned weight
    /// codes with signed activations.
    Q8_1,
    /// 256-element super-blocks with one scale and the integer sum of every 16 codes (ggml's
    /// Q8_K): what the K-quants' per-sub-block minimums and offsets need. IQ4_XS uses it too:
    /// its sub-block scales are small integers, so a whole super-block is one integer sum.
    Q8_K,
    /// 16-bit codes for the lookup tables of the kiln package (`LUT2` to `LUT8`), which look
    /// their weights up as 16-bit integers and multiply them with `vpdpwssd`: blocks of
    /// [`I16_BLOCK`] elements (a row's last block may be shorter, any multiple of 32), each
    /// with one f32 scale `d = max|x| / I16_CODE_MAX` and codes `round_half_even(x / d)` in
    /// `-I16_CODE_MAX..=I16_CODE_MAX`. 14-bit codes are 64 times finer than int8 blocks, which
    /// with one row per token lose too much on these formats; the bound keeps the kernels'
    /// 32-bit sums exact (see `kiln_formats::LUT_I16_ENTRY_MAX`).
    ///
    /// Within a block the codes are stored in groups of 64 elements (32 for a row's last
    /// group when the row is an odd number of 32-element chunks), each group in the order in
    /// which the AVX-512 lookups produce their weights ([`i16_element`]), so the kernels
    /// multiply without shuffling.
    I16,
    /// Plain f32 copies, for the float weight formats.
    F32,
}

/// Elements per [`ActivationFormat::I16`] block (the last block of a row may be shorter).
pub const I16_BLOCK: usize = 256;
/// The largest magnitude of an [`ActivationFormat::I16`] code: 14 bits.
pub const I16_CODE_MAX: i16 = 8191;

/// The element (offset within its group) whose [`ActivationFormat::I16`] code is stored at
/// offset `p` of a group of `n` elements (64, or 32 for a row's last group).
///
/// Byte lookups put 64 weights in the 16 bytes of four 128-bit lanes and `vpunpcklbw` /
/// `vpunpckhbw` widen them to words lane by lane: the first half of the group's words holds
/// elements `16j .. 16j + 8` of every lane `j`, the second half elements `16j + 8 .. 16j + 16`.
/// The codes are stored in that order.
#[inline]
pub const fn i16_element(p: usize, n: usize) -> usize {
    let half = n / 2;
    let (h, q) = (p / half, p % half);
    16 * (q / 8) + 8 * h + q % 8
}

impl ActivationFormat {
    /// Elements per block (1 for [`ActivationFormat::F32`]).
    pub fn block_len(self) -> usize {
        match self {
            ActivationFormat::Q8_1 => QK,
            ActivationFormat::Q8_K => QK_K,
            ActivationFormat::I16 => I16_BLOCK,
            ActivationFormat::F32 => 1,
        }
    }

    /// What a row's length must be a multiple of: the block length, except for
    /// [`ActivationFormat::I16`], whose last block may be any multiple of 32 elements.
    pub fn row_multiple(self) -> usize {
        match self {
            ActivationFormat::I16 => 32,
            f => f.block_len(),
        }
    }
}

/// The activation format the kernels for `weights` multiply with.
pub fn activation_format(weights: GgmlType) -> ActivationFormat {
    match weights {
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q8_1
        | GgmlType::IQ4_NL => ActivationFormat::Q8_1,
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::Q8_K
        | GgmlType::IQ4_XS => ActivationFormat::Q8_K,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => ActivationFormat::F32,
    }
}

/// One row of activations in an [`ActivationFormat`].
///
/// The buffers are owned and reused: quantizing a row no longer than any earlier one into the
/// same `QuantizedRow` does not allocate, so a forward pass keeps one per activation row.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRow {
    pub(crate) format: ActivationFormat,
    pub(crate) len: usize,
    /// Q8_1 / Q8_K: the int8 codes (of a refined row: the high part, in units of 256 scales).
    pub(crate) codes: AlignedVec<i8>,
    /// A refined Q8_1 row's low part, in units of one scale; empty otherwise.
    pub(crate) low: AlignedVec<i8>,
    /// I16: the 16-bit codes, in the format's stored order.
    pub(crate) wide: AlignedVec<i16>,
    /// Q8_1 / Q8_K / I16: one scale per block.
    pub(crate) scales: AlignedVec<f32>,
    /// Q8_1: `scale * sum(codes)` per block.
    pub(crate) sums: AlignedVec<f32>,
    /// Q8_K: the sum of every 16 codes.
    pub(crate) group_sums: AlignedVec<i16>,
    /// F32: the values.
    pub(crate) values: AlignedVec<f32>,
}

impl Default for QuantizedRow {
    fn default() -> Self {
        QuantizedRow::new()
    }
}

impl QuantizedRow {
    /// An empty Q8_1 row; [`quantize_row`] sizes it.
    pub fn new() -> QuantizedRow {
        QuantizedRow {
            format: ActivationFormat::Q8_1,
            len: 0,
            codes: AlignedVec::new(),
            low: AlignedVec::new(),
            wide: AlignedVec::new(),
            scales: AlignedVec::new(),
            sums: AlignedVec::new(),
            group_sums: AlignedVec::new(),
            values: AlignedVec::new(),
        }
    }

    /// A row made from given codes and per-block scales, for callers that already hold int8
    /// activations (and for tests that need exact scales).
    ///
    /// # Panics
    /// If `format` is [`ActivationFormat::F32`] or [`ActivationFormat::I16`], if `codes.len()` is not
    /// `scales.len() * format.block_len()`, or if a code is -128.
    pub fn from_codes(format: ActivationFormat, codes: &[i8], scales: &[f32]) -> QuantizedRow {
        assert!(
            matches!(format, ActivationFormat::Q8_1 | ActivationFormat::Q8_K),
            "from_codes: {format:?} rows have no int8 codes"
        );
        assert_eq!(
            codes.len(),
            scales.len() * format.block_len(),
            "from_codes: {} codes do not fill {} blocks of {}",
            codes.len(),
            scales.len(),
            format.block_len()
        );
        assert!(
            codes.iter().all(|&q| q != i8::MIN),
            "from_codes: codes must lie in -127..=127"
        );
        let mut row = QuantizedRow::new();
        row.format = format;
        row.len = codes.len();
        row.codes.extend_from_slice(codes);
        row.scales.extend_from_slice(scales);
        row.fill_sums();
        row
    }

    /// The activation format.
    pub fn format(&self) -> ActivationFormat {
        self.format
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the row has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The int8 codes (empty for F32 and I16 rows); of a refined row, the high parts.
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// Whether the row is refined ([`quantize_row_refined`]): every element is the 16-bit
    /// code `256 * codes[i] + low_codes()[i]` times its block's scale.
    pub fn is_refined(&self) -> bool {
        !self.low.is_empty()
    }

    /// A refined row's low parts (empty otherwise).
    pub fn low_codes(&self) -> &[i8] {
        &self.low
    }

    /// The integer code of element `i`: `256 * high + low` for a refined row.
    #[inline]
    pub(crate) fn code(&self, i: usize) -> i32 {
        match self.low.get(i) {
            Some(&l) => 256 * i32::from(self.codes[i]) + i32::from(l),
            None => i32::from(self.codes[i]),
        }
    }

    /// A refined row as the two plain Q8_1 rows whose sum it is: the high parts with 256
    /// times the scales, the low parts with the scales. Kernels without a refined path
    /// multiply both and add.
    pub(crate) fn split_refined(&self) -> [QuantizedRow; 2] {
        debug_assert!(self.is_refined());
        let high_scales: Vec<f32> = self.scales.iter().map(|&d| 256.0 * d).collect();
        [
            QuantizedRow::from_codes(self.format, &self.codes, &high_scales),
            QuantizedRow::from_codes(self.format, &self.low, &self.scales),
        ]
    }

    /// I16: the 16-bit codes in their stored order (empty otherwise).
    pub fn wide_codes(&self) -> &[i16] {
        &self.wide
    }

    /// One scale per block (empty for F32 rows).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Q8_1: `scale * sum(codes)` per 32-element block (empty otherwise).
    pub fn block_sums(&self) -> &[f32] {
        &self.sums
    }

    /// Q8_K: the integer sum of every 16 codes (empty otherwise).
    pub fn group_sums(&self) -> &[i16] {
        &self.group_sums
    }

    /// F32: the values (empty otherwise).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The values the row stands for: `scale * code`, or the f32 values.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        self.dequantize_into(&mut out);
        out
    }

    /// [`dequantize`](Self::dequantize) into `out` (the row's length), without allocating.
    ///
    /// # Panics
    /// If `out` is not the row's length.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        if self.format == ActivationFormat::F32 {
            out.copy_from_slice(&self.values);
            return;
        }
        if self.format == ActivationFormat::I16 {
            assert_eq!(out.len(), self.len, "dequantize_into: row length");
            for_each_i16_block(self.len, |b, block| {
                let d = self.scales[b];
                for_each_i16_run(block, |src, dst| {
                    for (o, &q) in out[dst..dst + 8].iter_mut().zip(&self.wide[src..src + 8]) {
                        *o = d * f32::from(q);
                    }
                });
            });
            return;
        }
        let bl = self.format.block_len();
        assert_eq!(out.len(), self.codes.len(), "dequantize_into: row length");
        if self.is_refined() {
            for (b, (o, &d)) in out.chunks_exact_mut(bl).zip(&self.scales).enumerate() {
                for (k, o) in o.iter_mut().enumerate() {
                    *o = d * self.code(b * bl + k) as f32;
                }
            }
            return;
        }
        for ((o, q), &d) in out
            .chunks_exact_mut(bl)
            .zip(self.codes.chunks_exact(bl))
            .zip(&self.scales)
        {
            o.iter_mut()
                .zip(q)
                .for_each(|(o, &q)| *o = d * f32::from(q));
        }
    }

    fn fill_sums(&mut self) {
        self.sums.clear();
        self.group_sums.clear();
        match self.format {
            ActivationFormat::Q8_1 if self.is_refined() => {
                for ((q, l), &d) in self
                    .codes
                    .chunks_exact(QK)
                    .zip(self.low.chunks_exact(QK))
                    .zip(&self.scales)
                {
                    let high: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    let low: i32 = l.iter().map(|&v| i32::from(v)).sum();
                    self.sums.push(d * (256 * high + low) as f32);
                }
            }
            ActivationFormat::Q8_1 => {
                for (q, &d) in self.codes.chunks_exact(QK).zip(&self.scales) {
                    let s: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    self.sums.push(d * s as f32);
                }
            }
            ActivationFormat::Q8_K => {
                for q in self.codes.chunks_exact(16) {
                    let s: i32 = q.iter().map(|&v| i32::from(v)).sum();
                    // 16 codes of at most 127 in magnitude: within i16.
                    self.group_sums.push(s as i16);
                }
            }
            ActivationFormat::I16 | ActivationFormat::F32 => {}
        }
    }

    /// This row's values as an F32 row in `out` (reusing its buffers), in element order.
    pub(crate) fn dequantize_to_f32(&self, out: &mut QuantizedRow) {
        out.reset(ActivationFormat::F32, self.len);
        out.values.resize(self.len, 0.0);
        self.dequantize_into(&mut out.values);
    }

    /// An empty row of `format` and `len` elements, every buffer cleared but kept for reuse.
    fn reset(&mut self, format: ActivationFormat, len: usize) {
        self.format = format;
        self.len = len;
        self.codes.clear();
        self.low.clear();
        self.wide.clear();
        self.scales.clear();
        self.sums.clear();
        self.group_sums.clear();
        self.values.clear();
    }
}

/// Calls `f(b, range)` for every [`ActivationFormat::I16`] block `b` of a `len`-element row.
#[inline]
pub(crate) fn for_each_i16_block(len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
    let mut b = 0;
    let mut start = 0;
    while start < len {
        let end = (start + I16_BLOCK).min(len);
        f(b, start..end);
        b += 1;
        start = end;
    }
}

/// Calls `f(stored, element)` for every run of 8 consecutive elements of the
/// [`ActivationFormat::I16`] block `block`: the run's codes are stored at `stored..stored + 8`
/// and stand for elements `element..element + 8` (see [`i16_element`]).
#[inline]
pub(crate) fn for_each_i16_run(block: std::ops::Range<usize>, mut f: impl FnMut(usize, usize)) {
    let mut g = block.start;
    while g < block.end {
        let n = if g + 64 <= block.end { 64 } else { 32 };
        for p in (0..n).step_by(8) {
            f(g + p, g + i16_element(p, n));
        }
        g += n;
    }
}

/// Quantizes `x` into `out` in format `fmt`, reusing `out`'s buffers.
///
/// Each block gets `d = max|x| / 127` and codes `round_half_even(x / d)`, so every element is
/// reproduced within `d / 2` (plus f32 rounding). A block of zeros gets `d = 0`. Non-finite
/// inputs give unspecified codes (never a panic, never -128).
///
/// [`ActivationFormat::I16`] works the same way with `d = max|x| / I16_CODE_MAX`.
///
/// # Panics
/// If `x.len()` is not a multiple of `fmt.row_multiple()`.
pub fn quantize_row(x: &[f32], fmt: ActivationFormat, out: &mut QuantizedRow) {
    let bl = fmt.block_len();
    let multiple = fmt.row_multiple();
    assert!(
        x.len().is_multiple_of(multiple),
        "quantize_row: {} elements are not a whole number of {multiple}-element blocks",
        x.len()
    );
    out.reset(fmt, x.len());
    match fmt {
        ActivationFormat::F32 => out.values.extend_from_slice(x),
        ActivationFormat::I16 => {
            out.wide.resize(x.len(), 0);
            for_each_i16_block(x.len(), |_, block| {
                let d = quantize_i16_block(
                    &x[block.clone()],
                    &mut out.wide[block.clone()],
                    block.start,
                );
                out.scales.push(d);
            });
        }
        ActivationFormat::Q8_1 | ActivationFormat::Q8_K => {
            out.codes.resize(x.len(), 0);
            quantize_blocks(x, bl, &mut out.codes, &mut out.scales);
            out.fill_sums();
        }
    }
}

/// Quantizes `x` into `out` as a refined Q8_1 row: per 32-element block the int8 codes `q` of
/// [`quantize_row`] with their scale `d`, then the residual `x - d·q` as int8 codes `l` in
/// steps of `d / 256`. The row stores the scale `d / 256` of the 16-bit code `256·q + l`, which
/// reproduces every element within `d / 512` (a step of the residual; `|x - d·q| ≤ d / 2`
/// keeps `l` within ±128, and the one value a clamp to ±127 can cost is `d / 256` at that
/// edge).
///
/// The fixed ratio of the two parts' scales is what lets a kernel multiply both in one
/// integer sum (`(Σ u·q) · 256 + Σ u·l`) and apply the block's scales once, so the refinement
/// costs two multiply-adds per weight vector rather than a second activation row.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_row_refined(x: &[f32], out: &mut QuantizedRow) {
    quantize_row(x, ActivationFormat::Q8_1, out);
    out.low.resize(x.len(), 0);
    const ROUND: f32 = 12_582_912.0;
    for (b, d) in out.scales.iter_mut().enumerate() {
        let range = b * QK..(b + 1) * QK;
        let step = *d / 256.0;
        if step > 0.0 && (1.0 / step).is_finite() {
            let inv = 1.0 / step;
            for i in range {
                let r = x[i] - *d * f32::from(out.codes[i]);
                out.low[i] = to_code((r * inv + ROUND) - ROUND);
            }
        } else {
            // A zero or subnormal block: its codes already carry everything representable.
            out.low[range].fill(0);
        }
        *d = step;
    }
    out.fill_sums();
}

/// Quantizes blocks of `bl` elements, appending their scales.
///
/// The same plain arithmetic is compiled twice on x86-64, the second time with AVX2 enabled
/// so that it vectorises; IEEE arithmetic makes both give identical codes.
pub(crate) fn quantize_blocks(
    x: &[f32],
    bl: usize,
    codes: &mut [i8],
    scales: &mut AlignedVec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx2.is_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { quantize_blocks_avx2(x, bl, codes, scales) };
        return;
    }
    quantize_blocks_plain(x, bl, codes, scales);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_blocks_avx2(x: &[f32], bl: usize, codes: &mut [i8], scales: &mut AlignedVec<f32>) {
    quantize_blocks_plain(x, bl, codes, scales);
}

#[inline(always)]
fn quantize_blocks_plain(x: &[f32], bl: usize, codes: &mut [i8], scales: &mut AlignedVec<f32>) {
    for (xs, qs) in x.chunks_exact(bl).zip(codes.chunks_exact_mut(bl)) {
        scales.push(quantize_block(xs, qs));
    }
}

/// A rounded value as a code in -127..=127 (NaN becomes -127).
#[inline(always)]
fn to_code(r: f32) -> i8 {
    // max and min return the other operand when one is NaN, so the value is finite and within
    // ±127 here; unlike `as` (which must saturate) this conversion vectorises.
    // Not `clamp`: it passes NaN through, which the conversion below must never see.
    #[allow(clippy::manual_clamp)]
    let r = r.max(-127.0).min(127.0);
    // SAFETY: r is finite and its integer part fits in i32.
    unsafe { r.to_int_unchecked::<i32>() as i8 }
}

/// Quantizes one [`ActivationFormat::I16`] block `x` (starting at element `start` of its row)
/// into `q` in the stored order; returns its scale. As for the int8 blocks, the plain
/// arithmetic is compiled a second time with AVX2 on x86-64 so that it vectorises (IEEE
/// arithmetic gives both the same codes).
fn quantize_i16_block(x: &[f32], q: &mut [i16], start: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx2.is_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { quantize_i16_block_avx2(x, q, start) };
    }
    quantize_i16_block_plain(x, q, start)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_i16_block_avx2(x: &[f32], q: &mut [i16], start: usize) -> f32 {
    quantize_i16_block_plain(x, q, start)
}

#[inline(always)]
fn quantize_i16_block_plain(x: &[f32], q: &mut [i16], start: usize) -> f32 {
    let mut lanes = [0.0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    let d = amax / f32::from(I16_CODE_MAX);
    if d == 0.0 {
        q.fill(0);
        return 0.0;
    }
    // Adding and subtracting 1.5 * 2^23 rounds to nearest-even for |v| < 2^22 (see
    // `quantize_block`); max and min drop NaN, so the value is finite and within the bound.
    const ROUND: f32 = 12_582_912.0;
    let max = f32::from(I16_CODE_MAX);
    let code = |r: f32| {
        #[allow(clippy::manual_clamp)]
        let r = (r.max(-max).min(max) + ROUND) - ROUND;
        // SAFETY: r is finite and within ±8191; unlike `as`, this conversion vectorises.
        unsafe { r.to_int_unchecked::<i32>() as i16 }
    };
    // The codes in element order first, in one loop that vectorises, then moved into the
    // stored order a run of 8 at a time: quantizing run by run in the stored order did not
    // vectorise and took 2 % of a lookup-table model's decode.
    let mut codes = [0i16; I16_BLOCK];
    let codes = &mut codes[..x.len()];
    let id = 1.0 / d;
    if id.is_finite() {
        codes
            .iter_mut()
            .zip(x)
            .for_each(|(q, &v)| *q = code(v * id));
    } else {
        // A subnormal scale has no finite reciprocal; divide instead.
        codes.iter_mut().zip(x).for_each(|(q, &v)| *q = code(v / d));
    }
    for_each_i16_run(start..start + x.len(), |stored, element| {
        q[stored - start..stored - start + 8]
            .copy_from_slice(&codes[element - start..element - start + 8]);
    });
    d
}

/// Quantizes one block (a multiple of 8 elements); returns its scale.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    // Eight running maxima vectorise; f32::max ignores NaN, so a NaN element cannot poison
    // the scale of its block.
    let mut lanes = [0.0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    if d == 0.0 {
        q.fill(0);
        return 0.0;
    }
    // Adding and subtracting 1.5 * 2^23 rounds to nearest-even for |v| < 2^22 in plain
    // arithmetic, which vectorises on every x86-64 (unlike a call to roundeven).
    const ROUND: f32 = 12_582_912.0;
    let id = 1.0 / d;
    if id.is_finite() {
        for (q, &v) in q.iter_mut().zip(x) {
            *q = to_code((v * id + ROUND) - ROUND);
        }
    } else {
        // A subnormal scale has no finite reciprocal; divide instead.
        for (q, &v) in q.iter_mut().zip(x) {
            *q = to_code((v / d + ROUND) - ROUND);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::ALIGN;

    #[test]
    fn quantized_rows_start_on_a_cache_line() {
        // The kernels load codes 64 bytes at a time: whatever the allocator hands out, each
        // buffer a format fills must start on a line.
        let x: Vec<f32> = (0..1536).map(|i| (i as f32 * 0.37).sin()).collect();
        let line = |p: *const u8| (p as usize).is_multiple_of(ALIGN);
        for fmt in [
            ActivationFormat::Q8_1,
            ActivationFormat::Q8_K,
            ActivationFormat::I16,
            ActivationFormat::F32,
        ] {
            // An allocation in between moves where the next ones land.
            let _noise = Box::new([0u8; 24]);
            let mut q = QuantizedRow::new();
            quantize_row(&x, fmt, &mut q);
            let filled: Vec<*const u8> = [
                (q.codes.as_ptr().cast(), q.codes.len()),
                (q.wide.as_ptr().cast(), q.wide.len()),
                (q.scales.as_ptr().cast(), q.scales.len()),
                (q.sums.as_ptr().cast(), q.sums.len()),
                (q.group_sums.as_ptr().cast(), q.group_sums.len()),
                (q.values.as_ptr().cast(), q.values.len()),
            ]
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(p, _)| p)
            .collect();
            assert!(!filled.is_empty(), "{fmt:?}");
            assert!(filled.into_iter().all(line), "{fmt:?}");
        }
        let mut refined = QuantizedRow::new();
        quantize_row_refined(&x, &mut refined);
        assert!(line(refined.codes.as_ptr().cast()) && line(refined.low.as_ptr().cast()));
    }
}
