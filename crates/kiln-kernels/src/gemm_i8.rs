//! Prompt processing with int8 activations: a panel GEMM that multiplies the integer codes of
//! the 32-element ggml block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with int8 activations.
//!
//! The f32 and bf16 GEMMs ([`crate::gemm`], [`crate::gemm_bf16`]) dequantize every weight
//! first; this one keeps both operands as small integers, so `vpdpbusd` does 64 multiply-adds
//! per instruction where `vdpbf16ps` does 32, and no dequantization happens at all.
//!
//! # The computation
//!
//! Activations ([`QuantizedBatch`]) are quantized per token in 32-element blocks exactly as
//! [`crate::quantize_row`] does for [`crate::ActivationFormat::Q8_1`]: codes `x` in -127..=127
//! with one f32 scale `dx` per block. Weights are read as unsigned codes `u = w + bias`
//! (0..=255; the bias is 8 for Q4_0, 16 for Q5_0, 128 for Q8_0 and 0 for the formats with a
//! stored minimum), with one f32 scale `dw` per block and, for Q4_1/Q5_1, the block minimum
//! `m`. For token `t`, weight row `r` and block `b`, the integer
//!
//! `I = sum_k u[r, k] * x[t, k] - bias * sum_k x[t, k]`
//!
//! is exact (its magnitude stays below 2^21, so it is also exact in f32), and the output is
//! accumulated block by block in f32, in this order:
//!
//! ```text
//! acc = 0
//! for b in blocks: acc = fma(f32(I), dw[r, b] * dx[t, b], acc)
//!                  acc = fma(m[r, b], dx[t, b] * sum_k x[t, k], acc)   (Q4_1, Q5_1)
//! ```
//!
//! [`gemm_panel_i8_reference`] spells this out in scalar code; the SIMD kernels perform the
//! same operations per output lane, so they agree with it **bit for bit**. Against the exact
//! product of the dequantized weights and the dequantized activations, the result is within
//! [`error_bound`] (f32 rounding of the block scales and of the running sum only).
//!
//! # Layout
//!
//! A packed panel ([`pack_panel`]) holds [`PANEL_ROWS`] weight rows. For each block, the codes
//! come as 8 steps of 4 columns, each step `PANEL_ROWS` words of 4 bytes (one per row, the 4
//! columns of the step in order): one 512-bit load is the operand of `vpdpbusd` for 16 rows,
//! multiplied by 4 activation bytes broadcast to every lane. Then come the block's scales
//! (and minimums) as f32 lines of `PANEL_ROWS`. Panels are packed per call, from the weights
//! in their file layout, so resident memory does not grow; packing costs a few per cent of
//! the multiplication at prompt lengths.
//!
//! # Kernels
//!
//! - AVX-512 VNNI: 6 tokens × 32 rows per step, `vpdpbusd` with the activation word as an
//!   embedded broadcast; every format.
//! - AVX2: 2 tokens × 16 rows, `vpmaddubsw` (pairs of u8 × s8 into i16) then `vpmaddwd` by
//!   ones. The pair sums saturate at 2^15, so only weights whose unsigned codes stay below 64
//!   (the 4- and 5-bit formats) take it: 2 × 63 × 127 < 2^15.
//! - Scalar: [`gemm_panel_i8_reference`], the definition (and far slower).

use std::ops::Range;

use kiln_format::ggml::{f16_to_f32, GgmlType};

use crate::aligned::AlignedVec;
use crate::isa::{detect, Isa};
use crate::layout::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, QK};

/// Weight rows per packed panel (two AVX-512 vectors of 16 words).
pub const PANEL_ROWS: usize = 32;

/// Steps of 4 columns per 32-element block.
const STEPS: usize = QK / 4;

/// Code bytes of one packed block: 8 steps × 32 rows × 4 bytes.
const BLOCK_CODES: usize = STEPS * PANEL_ROWS * 4;

/// The facts of one weight format the packing needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Format {
    /// Bytes per 32-element block.
    pub(crate) bytes: usize,
    /// Offset of the f16 minimum, for the formats that store one.
    pub(crate) min: Option<usize>,
    /// Offset of the 4-byte high-bit field of the 5-bit formats.
    pub(crate) qh: Option<usize>,
    /// Offset of the codes (packed nibbles, or bytes for Q8_0).
    pub(crate) qs: usize,
    /// What is added to the weight value (in units of the scale) to make the code unsigned.
    pub(crate) bias: i32,
}

pub(crate) fn format(ty: GgmlType) -> Option<Format> {
    let f = |bytes, min, qh, qs, bias| {
        Some(Format {
            bytes,
            min,
            qh,
            qs,
            bias,
        })
    };
    match ty {
        GgmlType::Q4_0 => f(Q4_0_BYTES, None, None, 2, 8),
        GgmlType::Q4_1 => f(Q4_1_BYTES, Some(2), None, 4, 0),
        GgmlType::Q5_0 => f(Q5_0_BYTES, None, Some(2), 6, 16),
        GgmlType::Q5_1 => f(Q5_1_BYTES, Some(2), Some(4), 8, 0),
        GgmlType::Q8_0 => f(Q8_0_BYTES, None, None, 2, 128),
        _ => None,
    }
}

/// Whether the int8 GEMM knows weight type `ty` (the reference runs every type it knows).
pub fn supports(ty: GgmlType) -> bool {
    format(ty).is_some()
}

/// Whether [`gemm_panel_i8`] has a SIMD kernel for `ty` at [`detect`]'s level: the prompt path
/// takes the int8 GEMM only then.
pub fn available(ty: GgmlType) -> bool {
    has_kernel(detect(), ty)
}

/// Whether `isa` has a SIMD kernel for weights of type `ty`.
pub fn has_kernel(isa: Isa, ty: GgmlType) -> bool {
    match (isa, format(ty)) {
        (_, None) => false,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, Some(_)) => isa.is_available(),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Some(_)) => ty != GgmlType::Q8_0 && isa.is_available(),
        _ => false,
    }
}

/// Activation rows quantized for the int8 GEMM: `n_tokens` rows of `k` codes (32-element
/// blocks, as [`crate::quantize_row`] makes them for `Q8_1`), with per-block scales, the
/// integer correction `-bias * sum(codes)` of the weight format they were prepared for, and
/// `scale * sum(codes)`.
///
/// The buffers are reused: quantizing a batch no larger than an earlier one into the same
/// value does not allocate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedBatch {
    n_tokens: usize,
    k: usize,
    bias: i32,
    codes: AlignedVec<i8>,
    scales: AlignedVec<f32>,
    code_sums: AlignedVec<i32>,
    corrections: AlignedVec<i32>,
    sums: AlignedVec<f32>,
}

impl QuantizedBatch {
    /// An empty batch.
    pub fn new() -> QuantizedBatch {
        QuantizedBatch::default()
    }

    /// Rows.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Elements per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The codes, row after row.
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// One scale per block, row after row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Prepares the batch for weights of type `ty` (the integer corrections depend on the
    /// weight format's bias), without quantizing again.
    ///
    /// # Panics
    /// If `ty` is not a type the GEMM [`supports`].
    pub fn retarget(&mut self, ty: GgmlType) {
        let f = format(ty).unwrap_or_else(|| panic!("retarget: {ty} weights are not supported"));
        if f.bias == self.bias && self.corrections.len() == self.code_sums.len() {
            return;
        }
        self.bias = f.bias;
        self.corrections.clear();
        self.corrections
            .extend(self.code_sums.iter().map(|&s| -f.bias * s));
    }
}

/// Quantizes `n_tokens` rows of `k` values (`x`, row-major) for a product with weights of type
/// `ty`, reusing `out`'s buffers. The codes and scales are bit for bit those of
/// [`crate::quantize_row`] with [`crate::ActivationFormat::Q8_1`].
///
/// # Panics
/// If `ty` is not a type the GEMM [`supports`], if `k` is not a multiple of 32 or if `x` does
/// not hold `n_tokens * k` values.
pub fn quantize_batch(
    x: &[f32],
    n_tokens: usize,
    k: usize,
    ty: GgmlType,
    out: &mut QuantizedBatch,
) {
    assert!(
        supports(ty),
        "quantize_batch: {ty} weights are not supported"
    );
    assert!(
        k.is_multiple_of(QK),
        "quantize_batch: {k} columns are not whole blocks"
    );
    assert_eq!(x.len(), n_tokens * k, "quantize_batch: activation shape");
    let nb = n_tokens * k / QK;
    out.n_tokens = n_tokens;
    out.k = k;
    out.codes.resize(n_tokens * k, 0);
    out.scales.resize(nb, 0.0);
    out.code_sums.resize(nb, 0);
    out.sums.resize(nb, 0.0);
    quantize_blocks(x, &mut out.codes, &mut out.scales, &mut out.code_sums);
    for ((s, &d), &c) in out.sums.iter_mut().zip(&out.scales).zip(&out.code_sums) {
        // As `QuantizedRow`'s Q8_1 block sums.
        *s = d * c as f32;
    }
    // Force the corrections to be recomputed.
    out.corrections.clear();
    out.retarget(ty);
}

/// Codes, scales and code sums of 32-element blocks, as [`crate::quantize_row`] makes them.
fn quantize_blocks(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if detect() == Isa::Avx512Vnni {
        // SAFETY: AVX-512F/BW are part of the level; the slices hold the same number of
        // blocks (the caller sized them).
        unsafe { x86::quantize_avx512(x, codes, scales, sums) };
        return;
    }
    quantize_blocks_reference(x, codes, scales, sums);
}

fn quantize_blocks_reference(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    for (((xs, qs), d), s) in x
        .chunks_exact(QK)
        .zip(codes.chunks_exact_mut(QK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
    {
        *d = crate::activation::quantize_block(xs, qs);
        *s = qs.iter().map(|&v| i32::from(v)).sum();
    }
}

/// Up to [`PANEL_ROWS`] weight rows packed for [`gemm_panel_i8`] (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedPanel {
    ty: Option<GgmlType>,
    k: usize,
    n_rows: usize,
    /// Per block: `STEPS` lines of `PANEL_ROWS` words.
    codes: AlignedVec<u8>,
    /// Per block: `PANEL_ROWS` scales.
    scales: AlignedVec<f32>,
    /// Per block: `PANEL_ROWS` minimums (formats with minimums only).
    mins: AlignedVec<f32>,
}

impl PackedPanel {
    /// An empty panel.
    pub fn new() -> PackedPanel {
        PackedPanel::default()
    }

    /// Weight rows held (the rest of the `PANEL_ROWS` are zero).
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Columns.
    pub fn k(&self) -> usize {
        self.k
    }

    fn blocks(&self) -> usize {
        self.k / QK
    }

    fn has_mins(&self) -> bool {
        !self.mins.is_empty()
    }

    /// The weight at row `r`, column `c` as the panel encodes it:
    /// `dw * (u - bias) (+ m)`, in f32 as ggml dequantizes it.
    pub fn weight(&self, r: usize, c: usize) -> f32 {
        assert!(
            r < self.n_rows && c < self.k,
            "weight: ({r}, {c}) is outside the panel"
        );
        let f = format(self.ty.expect("a packed panel")).expect("supported");
        let (b, j) = (c / QK, c % QK);
        let u = self.codes[b * BLOCK_CODES + (j / 4) * PANEL_ROWS * 4 + r * 4 + j % 4];
        let q = (i32::from(u) - f.bias) as f32;
        let d = self.scales[b * PANEL_ROWS + r];
        if self.has_mins() {
            q * d + self.mins[b * PANEL_ROWS + r]
        } else {
            q * d
        }
    }
}

/// Packs weight rows `rows` of `w` (rows of `row_bytes` bytes of type `ty`, `k` elements each)
/// into `out`, reusing its buffers.
///
/// # Panics
/// If `ty` is not [`supports`]ed, `row_bytes` is not one row of a whole number of blocks,
/// `rows` holds more than [`PANEL_ROWS`] rows or reaches past the end of `w`.
pub fn pack_panel(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    out: &mut PackedPanel,
) {
    pack_panel_with(detect(), ty, w, row_bytes, rows, out)
}

/// [`pack_panel`] with the packing of a given level (the reference where it has none).
///
/// # Panics
/// As [`pack_panel`], and if the CPU does not have `isa`.
pub fn pack_panel_with(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    out: &mut PackedPanel,
) {
    assert!(
        isa.is_available(),
        "pack_panel: this CPU cannot run {isa:?} kernels"
    );
    let simd = cfg!(target_arch = "x86_64")
        && matches!(isa, Isa::Avx512Vnni | Isa::Avx2)
        && format(ty).is_some_and(|f| f.qh.is_none())
        && PANEL_ROWS * row_bytes <= i32::MAX as usize;
    // The SIMD packings write every byte of the panel, padding included.
    let f = prepare(ty, w, row_bytes, &rows, out, !simd);
    #[cfg(target_arch = "x86_64")]
    if simd {
        match isa {
            // SAFETY: the level's features are present (asserted above); `prepare` checked
            // that `rows` lies within `w` and each row is whole blocks of `f`, and sized `out`;
            // a panel's bytes fit in an i32 (checked above).
            Isa::Avx512Vnni => unsafe {
                return x86::pack_avx512(f, w, row_bytes, rows.start, out);
            },
            // SAFETY: as above (AVX2 and F16C).
            Isa::Avx2 => unsafe {
                return x86::pack_avx2(f, w, row_bytes, rows.start, out);
            },
            _ => {}
        }
    }
    pack_codes_reference(f, w, row_bytes, rows.start, out);
    pack_scales(f, w, row_bytes, rows.start, out);
}

/// [`pack_panel`] for rows in the planar layout ([`crate::planar`]): the same panel, bit for
/// bit, read straight from the planar rows on AVX-512 for the formats without fifth bits;
/// elsewhere the rows are rewritten to GGUF blocks first.
///
/// # Panics
/// As [`pack_panel`].
pub fn pack_panel_planar(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    out: &mut PackedPanel,
) {
    let isa = detect();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni
        && format(ty).is_some_and(|f| f.qh.is_none())
        && PANEL_ROWS * row_bytes <= i32::MAX as usize
    {
        let f = prepare(ty, w, row_bytes, &rows, out, false);
        // SAFETY: AVX-512 F/BW are present (the level was detected); `prepare` checked that
        // `rows` lies within `w` and each row is whole blocks of `f`, and sized `out`; a
        // panel's bytes fit in an i32 (checked above); the rows are planar (the caller's
        // promise, which only decides which bytes are read, never where).
        unsafe { x86::pack_avx512_planar(f, w, row_bytes, rows.start, out) };
        return;
    }
    let gguf = crate::planar::gguf_rows(ty, w, row_bytes, rows.clone());
    pack_panel_with(isa, ty, &gguf, row_bytes, 0..rows.len(), out);
}

/// Asks the CPU to bring rows `rows` of `w` (rows of `row_bytes` bytes) into its L2 cache: a
/// hint given one panel ahead, so that packing does not wait on memory for each of the 32 row
/// streams it reads (the hardware prefetchers follow only a few). Rows past the end of `w` are
/// ignored; on CPUs without such hints it does nothing.
pub fn prefetch_rows(w: &[u8], row_bytes: usize, rows: Range<usize>) {
    let start = rows.start.saturating_mul(row_bytes).min(w.len());
    let end = rows.end.saturating_mul(row_bytes).min(w.len());
    prefetch(&w[start..end]);
}

/// Prefetch hints for every cache line of `bytes`.
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..bytes.len()).step_by(64) {
        // SAFETY: `at` is inside `bytes`; a prefetch never faults and changes no state a
        // program can observe.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                bytes.as_ptr().add(at).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// The scalar packing, which every faster one reproduces bit for bit (but for NaN scales,
/// which the hardware conversions may return quieted).
///
/// # Panics
/// As [`pack_panel`].
pub fn pack_panel_reference(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    out: &mut PackedPanel,
) {
    let f = prepare(ty, w, row_bytes, &rows, out, true);
    pack_codes_reference(f, w, row_bytes, rows.start, out);
    pack_scales(f, w, row_bytes, rows.start, out);
}

/// Checks the shapes and sizes `out` for rows `rows` of `w`, with every value zero if `zero`.
fn prepare(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: &Range<usize>,
    out: &mut PackedPanel,
    zero: bool,
) -> Format {
    let f = format(ty).unwrap_or_else(|| panic!("pack_panel: {ty} weights are not supported"));
    assert!(
        row_bytes > 0 && row_bytes.is_multiple_of(f.bytes),
        "pack_panel: {row_bytes} bytes are not whole {ty} blocks"
    );
    assert!(
        rows.start <= rows.end && rows.len() <= PANEL_ROWS,
        "pack_panel: rows {rows:?} do not fit a panel of {PANEL_ROWS}"
    );
    assert!(
        rows.end
            .checked_mul(row_bytes)
            .is_some_and(|end| end <= w.len()),
        "pack_panel: {} bytes do not hold rows {rows:?} of {row_bytes} bytes",
        w.len()
    );
    let nb = row_bytes / f.bytes;
    out.ty = Some(ty);
    out.k = nb * QK;
    out.n_rows = rows.len();
    if zero {
        out.codes.clear();
        out.scales.clear();
        out.mins.clear();
    }
    out.codes.resize(nb * BLOCK_CODES, 0);
    out.scales.resize(nb * PANEL_ROWS, 0.0);
    out.mins
        .resize(if f.min.is_some() { nb * PANEL_ROWS } else { 0 }, 0.0);
    f
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The unsigned codes of one block, in column order.
fn block_codes(f: Format, blk: &[u8]) -> [u8; QK] {
    let mut u = [0u8; QK];
    if f.bias == 128 {
        // Q8_0: flipping the sign bit of a two's-complement byte adds 128.
        for (u, &b) in u.iter_mut().zip(&blk[f.qs..f.qs + QK]) {
            *u = b ^ 0x80;
        }
        return u;
    }
    let qh = f.qh.map_or(0, |at| {
        u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
    });
    for j in 0..QK / 2 {
        let b = blk[f.qs + j];
        u[j] = (b & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        u[j + QK / 2] = (b >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
    }
    u
}

fn pack_codes_reference(
    f: Format,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    out: &mut PackedPanel,
) {
    let nb = out.blocks();
    for r in 0..out.n_rows {
        let row = &w[(first + r) * row_bytes..(first + r + 1) * row_bytes];
        for (b, blk) in row.chunks_exact(f.bytes).enumerate().take(nb) {
            let u = block_codes(f, blk);
            for (j, &v) in u.iter().enumerate() {
                out.codes[b * BLOCK_CODES + (j / 4) * PANEL_ROWS * 4 + r * 4 + j % 4] = v;
            }
        }
    }
}

fn pack_scales(f: Format, w: &[u8], row_bytes: usize, first: usize, out: &mut PackedPanel) {
    for r in 0..out.n_rows {
        let row = &w[(first + r) * row_bytes..(first + r + 1) * row_bytes];
        for (b, blk) in row.chunks_exact(f.bytes).enumerate() {
            out.scales[b * PANEL_ROWS + r] = f16_at(blk, 0);
            if let Some(at) = f.min {
                out.mins[b * PANEL_ROWS + r] = f16_at(blk, at);
            }
        }
    }
}

/// `out[t * out_stride + r]` = row `r` of `panel` times token `t` of `x`, for every `t` in
/// `0..x.n_tokens()` and `r` in `0..panel.n_rows()`, with the kernel of [`detect`]'s level when
/// it has one for the panel's type and the reference otherwise. Bit for bit what
/// [`gemm_panel_i8_reference`] gives.
///
/// # Panics
/// If `x` was not quantized for the panel's weight type or differs in `k`, or `out` is too
/// short (`out_stride` must be at least the panel's rows when there is more than one token).
pub fn gemm_panel_i8(panel: &PackedPanel, x: &QuantizedBatch, out: &mut [f32], out_stride: usize) {
    gemm_panel_i8_with(detect(), panel, x, out, out_stride)
}

/// [`gemm_panel_i8`], bringing `ahead` (the weight rows the next panel will be packed from)
/// into the L2 cache a slice at a time meanwhile, so that packing it does not wait on memory
/// for each of the row streams it reads: a few lines of hints between groups of tokens keep
/// the memory system busy without flooding it, where one burst of hints is mostly dropped.
///
/// # Panics
/// As [`gemm_panel_i8`].
pub fn gemm_panel_i8_ahead(
    panel: &PackedPanel,
    x: &QuantizedBatch,
    out: &mut [f32],
    out_stride: usize,
    ahead: &[u8],
) {
    const TOKENS: usize = 8;
    let isa = detect();
    let ty = check(panel, x, out, out_stride);
    let groups = x.n_tokens.div_ceil(TOKENS).max(1);
    let lines = ahead.len().div_ceil(64);
    for g in 0..groups {
        let tokens = g * TOKENS..((g + 1) * TOKENS).min(x.n_tokens);
        run(isa, ty, panel, x, tokens, out, out_stride);
        let (from, to) = (lines * g / groups, lines * (g + 1) / groups);
        prefetch(&ahead[(from * 64).min(ahead.len())..(to * 64).min(ahead.len())]);
    }
}

/// [`gemm_panel_i8`] with the kernel of a given level (the reference where it has none).
///
/// # Panics
/// As [`gemm_panel_i8`], and if the CPU does not have `isa`.
pub fn gemm_panel_i8_with(
    isa: Isa,
    panel: &PackedPanel,
    x: &QuantizedBatch,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        isa.is_available(),
        "gemm_panel_i8: this CPU cannot run {isa:?} kernels"
    );
    let ty = check(panel, x, out, out_stride);
    run(isa, ty, panel, x, 0..x.n_tokens, out, out_stride);
}

/// Tokens `tokens` of the product, with the kernel of `isa` (available, shapes checked).
fn run(
    isa: Isa,
    ty: GgmlType,
    panel: &PackedPanel,
    x: &QuantizedBatch,
    tokens: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    if tokens.is_empty() || panel.n_rows == 0 {
        return;
    }
    // Only the x86 levels have kernels that depend on the weight type.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ty;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI and FMA (`is_available`); `check` validated
        // the shapes the kernel's pointer arithmetic relies on.
        Isa::Avx512Vnni => unsafe { x86::gemm_avx512(panel, x, tokens, out, out_stride) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA; the codes stay below 64 (`has_kernel`), and `check`
        // validated the shapes.
        Isa::Avx2 if has_kernel(Isa::Avx2, ty) => unsafe {
            x86::gemm_avx2(panel, x, tokens, out, out_stride)
        },
        _ => reference_tokens(panel, x, tokens, out, out_stride),
    }
}

/// The definition of [`gemm_panel_i8`] (see the module docs), in scalar code.
///
/// # Panics
/// As [`gemm_panel_i8`].
pub fn gemm_panel_i8_reference(
    panel: &PackedPanel,
    x: &QuantizedBatch,
    out: &mut [f32],
    out_stride: usize,
) {
    check(panel, x, out, out_stride);
    reference_tokens(panel, x, 0..x.n_tokens, out, out_stride);
}

fn reference_tokens(
    panel: &PackedPanel,
    x: &QuantizedBatch,
    tokens: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let nb = panel.blocks();
    for t in tokens {
        for r in 0..panel.n_rows {
            let mut acc = 0.0f32;
            for b in 0..nb {
                let mut i = x.corrections[t * nb + b];
                for j in 0..QK {
                    let u = panel.codes[b * BLOCK_CODES + (j / 4) * PANEL_ROWS * 4 + r * 4 + j % 4];
                    i += i32::from(u) * i32::from(x.codes[t * x.k + b * QK + j]);
                }
                let s = panel.scales[b * PANEL_ROWS + r] * x.scales[t * nb + b];
                acc = (i as f32).mul_add(s, acc);
                if panel.has_mins() {
                    acc = panel.mins[b * PANEL_ROWS + r].mul_add(x.sums[t * nb + b], acc);
                }
            }
            out[t * out_stride + r] = acc;
        }
    }
}

/// A bound on `|gemm_panel_i8_reference - exact|` for row `r` and token `t`, where `exact` is
/// the product (in real numbers) of the weights as the panel holds them ([`PackedPanel::weight`])
/// with the activations as the batch holds them (`code * scale`): `(blocks + 2) * f32::EPSILON *
/// M` with `M = sum_b (|I| |dw dx| + |m| |dx sum(x)|)`, which covers the rounding of each
/// block's `dw * dx` and of every `fma` into the running sum. The integer parts are exact.
///
/// # Panics
/// As [`gemm_panel_i8`], and if `t` or `r` is out of range.
pub fn error_bound(panel: &PackedPanel, x: &QuantizedBatch, t: usize, r: usize) -> f64 {
    assert!(
        t < x.n_tokens && r < panel.n_rows,
        "error_bound: ({t}, {r}) out of range"
    );
    let nb = panel.blocks();
    let mut m = 0.0f64;
    for b in 0..nb {
        let mut i = i64::from(x.corrections[t * nb + b]);
        for j in 0..QK {
            let u = panel.codes[b * BLOCK_CODES + (j / 4) * PANEL_ROWS * 4 + r * 4 + j % 4];
            i += i64::from(u) * i64::from(x.codes[t * x.k + b * QK + j]);
        }
        let s = f64::from(panel.scales[b * PANEL_ROWS + r]) * f64::from(x.scales[t * nb + b]);
        m += (i as f64 * s).abs();
        if panel.has_mins() {
            m += (f64::from(panel.mins[b * PANEL_ROWS + r]) * f64::from(x.sums[t * nb + b])).abs();
        }
    }
    (nb + 2) as f64 * f64::from(f32::EPSILON) * m
}

/// Checks that `x` fits `panel` and `out` holds every output; returns the weight type.
fn check(panel: &PackedPanel, x: &QuantizedBatch, out: &[f32], out_stride: usize) -> GgmlType {
    let ty = panel.ty.expect("gemm_panel_i8: the panel was never packed");
    let f = format(ty).expect("packed types are supported");
    assert_eq!(
        x.k, panel.k,
        "gemm_panel_i8: activations of {} columns for weights of {}",
        x.k, panel.k
    );
    assert_eq!(
        x.bias, f.bias,
        "gemm_panel_i8: activations were quantized for another weight type than {ty}"
    );
    assert_eq!(
        x.codes.len(),
        x.n_tokens * x.k,
        "gemm_panel_i8: batch shape"
    );
    if x.n_tokens > 0 && panel.n_rows > 0 {
        crate::check_output(panel.n_rows, x.n_tokens, out.len(), out_stride);
    }
    ty
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Format, PackedPanel, QuantizedBatch, BLOCK_CODES, PANEL_ROWS, STEPS};
    use crate::layout::QK;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Stands in for the rows past the last of a partial panel: codes that pack to zero
    /// (Q8_0's are flipped on the way, hence 0x80), read at the same offsets as a real block.
    static PAD: [u8; 64] = [0; 64];
    static PAD_Q8: [u8; 64] = [0x80; 64];

    /// Where the packing reads and writes, shared by both levels.
    struct Packing {
        /// Each panel row's first code byte, and the step from block to block (zero for the
        /// padding rows, which read the same 32 bytes of `PAD` every time).
        rows: [(*const u8, usize); PANEL_ROWS],
        /// The first row's first byte, and each row's offset from it (for the scale gathers).
        base: *const u8,
        row_bytes: usize,
        n: usize,
        nb: usize,
        codes: *mut u8,
        scales: *mut f32,
        mins: *mut f32,
    }

    impl Packing {
        /// # Safety
        /// Rows `first..first + out.n_rows` of `row_bytes` bytes lie within `w`, each whole
        /// blocks of `f`, and `out` was sized for them.
        unsafe fn new(
            f: Format,
            w: &[u8],
            row_bytes: usize,
            first: usize,
            out: &mut PackedPanel,
        ) -> Self {
            let pad = if f.bias == 128 { &PAD_Q8 } else { &PAD };
            // SAFETY: row `first` starts within `w` (or at its end when the panel is empty).
            let base = unsafe { w.as_ptr().add(first * row_bytes) };
            let rows = std::array::from_fn(|r| {
                if r < out.n_rows {
                    // SAFETY: row first + r lies within `w`; its codes start f.qs bytes in.
                    (unsafe { base.add(r * row_bytes + f.qs) }, f.bytes)
                } else {
                    (pad.as_ptr(), 0)
                }
            });
            Packing {
                rows,
                base,
                row_bytes,
                n: out.n_rows,
                nb: out.blocks(),
                codes: out.codes.as_mut_ptr(),
                scales: out.scales.as_mut_ptr(),
                mins: out.mins.as_mut_ptr(),
            }
        }

        /// The 16 code bytes at `16 * half` of block `b` of panel row `r`.
        ///
        /// # Safety
        /// `r < PANEL_ROWS`, `b < nb`, `half` 0 (or 1 for Q8_0).
        #[inline(always)]
        unsafe fn codes16(&self, r: usize, b: usize, half: usize) -> __m128i {
            let (at, step) = self.rows[r];
            // SAFETY: a real row holds block b whole, whose codes end at most 32 bytes past
            // `at + b * step`; padding rows read the first 32 bytes of a 64-byte pattern.
            unsafe { _mm_loadu_si128(at.add(b * step + 16 * half).cast()) }
        }

        /// Offsets of the 32-bit words holding the scale (and, after it, the minimum) of
        /// block 0 of rows `r0..r0 + 16` from `base`.
        fn scale_offsets(&self, r0: usize) -> [i32; 16] {
            // Fits: `pack_panel` sends panels larger than i32::MAX bytes to the reference.
            std::array::from_fn(|i| ((r0 + i) * self.row_bytes) as i32)
        }

        /// Mask of the real rows among `r0..r0 + 16`.
        fn real(&self, r0: usize) -> u16 {
            let n = self.n.saturating_sub(r0).min(16);
            ((1u32 << n) - 1) as u16
        }
    }

    /// Packs rows `first..first + out.n_rows` sixteen rows at a time: row `i + 4j`'s 16 code
    /// bytes of a block go into 128-bit lane `j` of register `i`, and a 4×4 transpose of
    /// 32-bit words inside the lanes turns the four registers into four 16-row lines of the
    /// panel. One gather fetches the scales (and minimums) of 16 rows.
    ///
    /// Every row of the panel is written, the padding rows with zeros.
    ///
    /// # Safety
    /// AVX-512F/BW; rows `first..first + out.n_rows` of `row_bytes` bytes lie within `w`, each
    /// whole blocks of `f` (no 5-bit high field), `PANEL_ROWS * row_bytes` fits in an `i32`,
    /// and `out` was sized for them (`prepare`).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_avx512(
        f: Format,
        w: &[u8],
        row_bytes: usize,
        first: usize,
        out: &mut PackedPanel,
    ) {
        // SAFETY: the caller's bounds.
        let p = unsafe { Packing::new(f, w, row_bytes, first, out) };
        for r0 in (0..PANEL_ROWS).step_by(16) {
            if r0 + 16 <= p.n {
                // Whole groups: row r0 + i is `i * row_bytes` past row r0, block after block.
                // SAFETY: rows r0..r0 + 16 are real, so every address is inside a block.
                let first_codes = p.rows[r0].0;
                let offsets: [usize; 16] = std::array::from_fn(|i| i * row_bytes);
                unsafe {
                    pack_group16(&p, f, r0, ScaleAt::gguf(f), |i, b, half| {
                        _mm_loadu_si128(
                            first_codes.add(offsets[i] + b * f.bytes + 16 * half).cast(),
                        )
                    })
                }
            } else {
                // SAFETY: `codes16` reads padding rows from the pattern.
                unsafe {
                    pack_group16(&p, f, r0, ScaleAt::gguf(f), |i, b, half| {
                        p.codes16(r0 + i, b, half)
                    })
                }
            }
        }
    }

    /// Where the 32-bit words holding the block scales (and minimums) of a row lie, from the
    /// row's first byte: block `b`'s at `d + b · step` (`m + b · step`), in the word's high
    /// half if `high`; with `m` `None` the minimum is the high half of the scale's word.
    #[derive(Clone, Copy)]
    struct ScaleAt {
        d: i32,
        m: Option<i32>,
        step: i32,
        high: bool,
    }

    impl ScaleAt {
        /// GGUF blocks: the scale opens each block, the minimum (if any) follows it.
        fn gguf(f: Format) -> ScaleAt {
            ScaleAt {
                d: 0,
                m: None,
                step: f.bytes as i32,
                high: false,
            }
        }
    }

    /// [`pack_avx512`] for planar rows ([`crate::planar`]): each row's 16 code bytes of a
    /// block rebuilt in GGUF's order from its planar runs (the 4-bit formats) or flipped
    /// back (Q8_0, stored plus 128), and the scales gathered from their planes (each word
    /// read ending at the scale, so no read passes the row's end).
    ///
    /// # Safety
    /// As [`pack_avx512`], the rows planar, of a format without fifth bits.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_avx512_planar(
        f: Format,
        w: &[u8],
        row_bytes: usize,
        first: usize,
        out: &mut PackedPanel,
    ) {
        use crate::planar::Slot;
        // SAFETY: the caller's bounds.
        let p = unsafe { Packing::new(f, w, row_bytes, first, out) };
        let nb = p.nb;
        let q8 = f.bias == 128;
        let code_bytes = if q8 { QK } else { QK / 2 };
        // The planes after the codes: scales, then minimums, each 2 bytes per block.
        let d_at = (nb * code_bytes) as i32;
        let scales = ScaleAt {
            d: d_at - 2,
            m: f.min.map(|_| d_at + 2 * nb as i32 - 2),
            step: 2,
            high: true,
        };
        let slots: Vec<Slot> = (0..nb).map(|b| crate::planar::slot(nb, b).0).collect();
        let low = _mm_set1_epi8(0x0f);
        let high = _mm_set1_epi8(-16);
        let flip = _mm_set1_epi8(-128);
        for r0 in (0..PANEL_ROWS).step_by(16) {
            let load = |i: usize, b: usize, half: usize| {
                let r = r0 + i;
                if r >= p.n {
                    // SAFETY: padding rows read the pattern, as in `pack_avx512`.
                    return unsafe { p.codes16(r, b, half) };
                }
                // SAFETY: row r is real; block b's codes (32 bytes at `32 b` for Q8_0, one
                // 32-byte run or 16 bytes at its slot otherwise) lie within the row.
                unsafe {
                    let row = p.base.add(r * row_bytes);
                    if q8 {
                        let v = _mm_loadu_si128(row.add(QK * b + 16 * half).cast());
                        return _mm_xor_si128(v, flip);
                    }
                    let (at, high_half) = match slots[b] {
                        Slot::Whole(at) => return _mm_loadu_si128(row.add(at).cast()),
                        Slot::Low(at) => (at, false),
                        Slot::High(at) => (at, true),
                    };
                    let x = _mm_loadu_si128(row.add(at).cast());
                    let y = _mm_loadu_si128(row.add(at + 16).cast());
                    if high_half {
                        _mm_or_si128(
                            _mm_and_si128(_mm_srli_epi16::<4>(x), low),
                            _mm_and_si128(y, high),
                        )
                    } else {
                        _mm_or_si128(
                            _mm_and_si128(x, low),
                            _mm_and_si128(_mm_slli_epi16::<4>(y), high),
                        )
                    }
                }
            };
            // SAFETY: the loads above are sound for every row, block and half; the scale
            // words end at each block's scale (or minimum), inside the row.
            unsafe { pack_group16(&p, f, r0, scales, load) };
        }
    }

    /// Rows `r0..r0 + 16` of [`pack_avx512`], `load(i, b, half)` giving row `r0 + i`'s code
    /// bytes `16 * half..` of block `b`.
    ///
    /// # Safety
    /// AVX-512F/BW; `r0 + 16 <= PANEL_ROWS`; `load` is sound for `i < 16`, `b < nb` and the
    /// halves of `f`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn pack_group16(
        p: &Packing,
        f: Format,
        r0: usize,
        scales: ScaleAt,
        load: impl Fn(usize, usize, usize) -> __m128i,
    ) {
        let low = _mm512_set1_epi8(0x0f);
        let flip = _mm512_set1_epi8(-128);
        let q8 = f.bias == 128;
        let offsets = p.scale_offsets(r0);
        // SAFETY: `offsets` holds 16 words.
        let rows_at = unsafe { _mm512_loadu_si512(offsets.as_ptr().cast()) };
        let mut idx = _mm512_add_epi32(rows_at, _mm512_set1_epi32(scales.d));
        let mut min_idx = _mm512_add_epi32(rows_at, _mm512_set1_epi32(scales.m.unwrap_or(0)));
        let block_step = _mm512_set1_epi32(scales.step);
        let real = p.real(r0);
        for b in 0..p.nb {
            for half in 0..if q8 { 2 } else { 1 } {
                let mut a = [_mm512_setzero_si512(); 4];
                for (i, ai) in a.iter_mut().enumerate() {
                    let v = _mm512_castsi128_si512(load(i, b, half));
                    let v = _mm512_inserti32x4::<1>(v, load(i + 4, b, half));
                    let v = _mm512_inserti32x4::<2>(v, load(i + 8, b, half));
                    *ai = _mm512_inserti32x4::<3>(v, load(i + 12, b, half));
                }
                let t0 = _mm512_unpacklo_epi32(a[0], a[1]);
                let t1 = _mm512_unpackhi_epi32(a[0], a[1]);
                let t2 = _mm512_unpacklo_epi32(a[2], a[3]);
                let t3 = _mm512_unpackhi_epi32(a[2], a[3]);
                let line = [
                    _mm512_unpacklo_epi64(t0, t2),
                    _mm512_unpackhi_epi64(t0, t2),
                    _mm512_unpacklo_epi64(t1, t3),
                    _mm512_unpackhi_epi64(t1, t3),
                ];
                // SAFETY: b < nb and r0 + 16 <= PANEL_ROWS: every store is one 64-byte line of
                // 16 rows inside block b's codes.
                let at = |step: usize| unsafe {
                    p.codes
                        .add(b * BLOCK_CODES + step * PANEL_ROWS * 4 + r0 * 4)
                        .cast()
                };
                for (m, &v) in line.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe {
                        if q8 {
                            _mm512_storeu_si512(at(4 * half + m), _mm512_xor_si512(v, flip));
                        } else {
                            _mm512_storeu_si512(at(m), _mm512_and_si512(v, low));
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                            _mm512_storeu_si512(at(m + 4), hi);
                        }
                    }
                }
            }
            // SAFETY: the gather reads, for each real row only (masked), the 4 bytes at the
            // start of its block b: the f16 scale and the next two bytes, which lie inside the
            // block. The scale lines of block b hold PANEL_ROWS floats.
            unsafe {
                let gather = |at| {
                    let w = _mm512_mask_i32gather_epi32::<1>(
                        _mm512_setzero_si512(),
                        real,
                        at,
                        p.base.cast(),
                    );
                    if scales.high {
                        _mm512_srli_epi32::<16>(w)
                    } else {
                        w
                    }
                };
                let words = gather(idx);
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
                _mm512_storeu_ps(p.scales.add(b * PANEL_ROWS + r0), d);
                if f.min.is_some() {
                    // GGUF's Q4_1 and Q5_1 keep their minimum right after the scale.
                    let m_words = match scales.m {
                        None => _mm512_srli_epi32::<16>(words),
                        Some(_) => gather(min_idx),
                    };
                    let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(m_words));
                    _mm512_storeu_ps(p.mins.add(b * PANEL_ROWS + r0), m);
                }
            }
            idx = _mm512_add_epi32(idx, block_step);
            min_idx = _mm512_add_epi32(min_idx, block_step);
        }
    }

    /// [`pack_avx512`] eight rows at a time (two lanes per register).
    ///
    /// # Safety
    /// AVX2 and F16C; as [`pack_avx512`] otherwise.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack_avx2(
        f: Format,
        w: &[u8],
        row_bytes: usize,
        first: usize,
        out: &mut PackedPanel,
    ) {
        // SAFETY: the caller's bounds.
        let p = unsafe { Packing::new(f, w, row_bytes, first, out) };
        let low = _mm256_set1_epi8(0x0f);
        let flip = _mm256_set1_epi8(-128);
        let q8 = f.bias == 128;
        let block_step = _mm256_set1_epi32(f.bytes as i32);
        // Every row, the padding rows too: the panel's buffers are not cleared beforehand.
        for r0 in (0..PANEL_ROWS).step_by(8) {
            let offsets = p.scale_offsets(r0);
            // SAFETY: `offsets` holds 16 words, of which these are the first 8.
            let mut idx = unsafe { _mm256_loadu_si256(offsets.as_ptr().cast()) };
            let real = p.real(r0);
            let mask = _mm256_set_epi32(
                -i32::from(real & 0x80 != 0),
                -i32::from(real & 0x40 != 0),
                -i32::from(real & 0x20 != 0),
                -i32::from(real & 0x10 != 0),
                -i32::from(real & 0x08 != 0),
                -i32::from(real & 0x04 != 0),
                -i32::from(real & 0x02 != 0),
                -i32::from(real & 0x01 != 0),
            );
            for b in 0..p.nb {
                for half in 0..if q8 { 2 } else { 1 } {
                    // SAFETY: as in `pack_avx512`, with 32-byte lines of 8 rows.
                    unsafe {
                        let mut a = [_mm256_setzero_si256(); 4];
                        for (i, ai) in a.iter_mut().enumerate() {
                            *ai = _mm256_set_m128i(
                                p.codes16(r0 + i + 4, b, half),
                                p.codes16(r0 + i, b, half),
                            );
                        }
                        let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
                        let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
                        let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
                        let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
                        let line = [
                            _mm256_unpacklo_epi64(t0, t2),
                            _mm256_unpackhi_epi64(t0, t2),
                            _mm256_unpacklo_epi64(t1, t3),
                            _mm256_unpackhi_epi64(t1, t3),
                        ];
                        let at = |step: usize| {
                            p.codes
                                .add(b * BLOCK_CODES + step * PANEL_ROWS * 4 + r0 * 4)
                                .cast()
                        };
                        for (m, &v) in line.iter().enumerate() {
                            if q8 {
                                _mm256_storeu_si256(at(4 * half + m), _mm256_xor_si256(v, flip));
                            } else {
                                _mm256_storeu_si256(at(m), _mm256_and_si256(v, low));
                                _mm256_storeu_si256(
                                    at(m + 4),
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                                );
                            }
                        }
                    }
                }
                // SAFETY: as in `pack_avx512` (masked gather of the real rows' first words).
                unsafe {
                    let words = _mm256_mask_i32gather_epi32::<1>(
                        _mm256_setzero_si256(),
                        p.base.cast(),
                        idx,
                        mask,
                    );
                    // The low halves of the eight words, in order.
                    let halves = |v: __m256i| {
                        let packed = _mm256_packus_epi32(
                            _mm256_and_si256(v, _mm256_set1_epi32(0xffff)),
                            _mm256_setzero_si256(),
                        );
                        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
                    };
                    _mm256_storeu_ps(
                        p.scales.add(b * PANEL_ROWS + r0),
                        _mm256_cvtph_ps(halves(words)),
                    );
                    if f.min.is_some() {
                        let m = _mm256_cvtph_ps(halves(_mm256_srli_epi32::<16>(words)));
                        _mm256_storeu_ps(p.mins.add(b * PANEL_ROWS + r0), m);
                    }
                }
                idx = _mm256_add_epi32(idx, block_step);
            }
        }
    }

    /// [`super::quantize_blocks_reference`] with AVX-512: sixteen blocks at a time, their
    /// maxima found 32 values at a time, then their scales and reciprocals in one vector
    /// division each (IEEE division rounds as the scalar one does), then the codes by
    /// `vcvtps2dq`'s round-to-nearest-even, which is what the reference's
    /// `(v + 1.5·2^23) - 1.5·2^23` computes at these magnitudes. NaN converts to `i32::MIN`
    /// and clamps to -127, as the reference's `max`/`min` give. Blocks whose scale has no finite
    /// reciprocal go to the reference.
    ///
    /// # Safety
    /// AVX-512F/BW; `codes` holds `x.len()` values and `scales`, `sums` one per 32.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_avx512(
        x: &[f32],
        codes: &mut [i8],
        scales: &mut [f32],
        sums: &mut [i32],
    ) {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        const CHUNK: usize = 16 * QK;
        for (((xc, qc), dc), sc) in x
            .chunks(CHUNK)
            .zip(codes.chunks_mut(CHUNK))
            .zip(scales.chunks_mut(16))
            .zip(sums.chunks_mut(16))
        {
            let n = dc.len();
            let mut amax = [0.0f32; 16];
            for (m, xs) in amax.iter_mut().zip(xc.chunks_exact(QK)) {
                // SAFETY: `xs` holds 32 floats.
                unsafe {
                    let v0 = _mm512_loadu_ps(xs.as_ptr());
                    let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
                    let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs));
                    let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs));
                    // `max` returns its second operand when the first is NaN: NaNs are
                    // skipped, as the reference's f32::max skips them.
                    *m = _mm512_reduce_max_ps(_mm512_max_ps(
                        a1,
                        _mm512_max_ps(a0, _mm512_setzero_ps()),
                    ));
                }
            }
            let (mut d, mut id) = ([0.0f32; 16], [0.0f32; 16]);
            // SAFETY: the arrays hold 16 floats.
            unsafe {
                let dv = _mm512_div_ps(_mm512_loadu_ps(amax.as_ptr()), _mm512_set1_ps(127.0));
                _mm512_storeu_ps(d.as_mut_ptr(), dv);
                _mm512_storeu_ps(id.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), dv));
            }
            for j in 0..n {
                let (xs, qs) = (&xc[j * QK..(j + 1) * QK], &mut qc[j * QK..(j + 1) * QK]);
                if d[j] == 0.0 {
                    qs.fill(0);
                    (dc[j], sc[j]) = (0.0, 0);
                    continue;
                }
                if !id[j].is_finite() {
                    dc[j] = crate::activation::quantize_block(xs, qs);
                    sc[j] = qs.iter().map(|&v| i32::from(v)).sum();
                    continue;
                }
                // SAFETY: `xs` holds 32 floats and `qs` 32 bytes.
                unsafe {
                    let idv = _mm512_set1_ps(id[j]);
                    let v0 = _mm512_loadu_ps(xs.as_ptr());
                    let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
                    let c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv));
                    let c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
                    let c0 = _mm512_min_epi32(_mm512_max_epi32(c0, lo), hi);
                    let c1 = _mm512_min_epi32(_mm512_max_epi32(c1, lo), hi);
                    _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(c0));
                    _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(c1));
                    dc[j] = d[j];
                    sc[j] = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
                }
            }
        }
    }

    /// Pointers and strides of one call, shared by the tiles.
    struct Shape {
        codes: *const u8,
        scales: *const f32,
        mins: *const f32,
        nb: usize,
        x: *const i8,
        k: usize,
        xd: *const f32,
        xc: *const i32,
        xs: *const f32,
    }

    impl Shape {
        fn new(panel: &PackedPanel, x: &QuantizedBatch) -> Shape {
            Shape {
                codes: panel.codes.as_ptr(),
                scales: panel.scales.as_ptr(),
                mins: panel.mins.as_ptr(),
                nb: panel.blocks(),
                x: x.codes.as_ptr(),
                k: x.k,
                xd: x.scales.as_ptr(),
                xc: x.corrections.as_ptr(),
                xs: x.sums.as_ptr(),
            }
        }
    }

    /// Tokens per AVX-512 tile: 2 × MR vectors of int32 sums and as many f32 accumulators,
    /// with room left for the two weight vectors, a broadcast activation word and the block
    /// scales.
    const MR512: usize = 4;

    /// # Safety
    /// AVX-512 F/BW/VNNI and FMA; shapes as `super::check` validated them.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn gemm_avx512(
        panel: &PackedPanel,
        x: &QuantizedBatch,
        tokens: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let s = Shape::new(panel, x);
        let mins = panel.has_mins();
        let n_rows = panel.n_rows;
        let mut t = tokens.start;
        while t < tokens.end {
            let mr = (tokens.end - t).min(MR512);
            // Tokens t..t + mr write rows (t + i) * stride..+ n_rows, inside `out` (`check`).
            let o = &mut out[t * stride..];
            // SAFETY: tokens t..t + mr exist; the features are the caller's.
            unsafe {
                match (mr, mins) {
                    (4, false) => tile512::<4, false>(&s, t, o, stride, n_rows),
                    (4, true) => tile512::<4, true>(&s, t, o, stride, n_rows),
                    (3, false) => tile512::<3, false>(&s, t, o, stride, n_rows),
                    (3, true) => tile512::<3, true>(&s, t, o, stride, n_rows),
                    (2, false) => tile512::<2, false>(&s, t, o, stride, n_rows),
                    (2, true) => tile512::<2, true>(&s, t, o, stride, n_rows),
                    (1, false) => tile512::<1, false>(&s, t, o, stride, n_rows),
                    _ => tile512::<1, true>(&s, t, o, stride, n_rows),
                }
            }
            t += mr;
        }
    }

    /// Tokens `t0..t0 + MR` against the whole panel, into `out[i * stride + r]`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI and FMA; tokens `t0..t0 + MR` exist in the batch `s` points into.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn tile512<const MR: usize, const MINS: bool>(
        s: &Shape,
        t0: usize,
        out: &mut [f32],
        stride: usize,
        n_rows: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: every offset below stays inside the panel (b < nb blocks of BLOCK_CODES
        // bytes and PANEL_ROWS scales) or the batch (tokens t0..t0 + MR of k codes and nb
        // blocks), the caller's bounds.
        unsafe {
            let mut codes = s.codes;
            for b in 0..s.nb {
                let mut sums = [[_mm512_setzero_si512(); 2]; MR];
                for (i, sm) in sums.iter_mut().enumerate() {
                    let c = _mm512_set1_epi32(*s.xc.add((t0 + i) * s.nb + b));
                    *sm = [c, c];
                }
                let xb = s.x.add(t0 * s.k + b * QK);
                for step in 0..STEPS {
                    let w0 = _mm512_loadu_si512(codes.add(step * PANEL_ROWS * 4).cast());
                    let w1 = _mm512_loadu_si512(codes.add(step * PANEL_ROWS * 4 + 64).cast());
                    for (i, sm) in sums.iter_mut().enumerate() {
                        let word = xb.add(i * s.k + 4 * step).cast::<i32>().read_unaligned();
                        let xv = _mm512_set1_epi32(word);
                        sm[0] = _mm512_dpbusd_epi32(sm[0], w0, xv);
                        sm[1] = _mm512_dpbusd_epi32(sm[1], w1, xv);
                    }
                }
                codes = codes.add(BLOCK_CODES);
                let d0 = _mm512_loadu_ps(s.scales.add(b * PANEL_ROWS));
                let d1 = _mm512_loadu_ps(s.scales.add(b * PANEL_ROWS + 16));
                for (i, (a, sm)) in acc.iter_mut().zip(&sums).enumerate() {
                    let dx = _mm512_set1_ps(*s.xd.add((t0 + i) * s.nb + b));
                    a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sm[0]), _mm512_mul_ps(d0, dx), a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sm[1]), _mm512_mul_ps(d1, dx), a[1]);
                }
                if MINS {
                    let m0 = _mm512_loadu_ps(s.mins.add(b * PANEL_ROWS));
                    let m1 = _mm512_loadu_ps(s.mins.add(b * PANEL_ROWS + 16));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sx = _mm512_set1_ps(*s.xs.add((t0 + i) * s.nb + b));
                        a[0] = _mm512_fmadd_ps(m0, sx, a[0]);
                        a[1] = _mm512_fmadd_ps(m1, sx, a[1]);
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let dst = &mut out[i * stride..i * stride + n_rows];
            if n_rows == PANEL_ROWS {
                // SAFETY: `dst` holds two vectors of 16 floats.
                unsafe {
                    _mm512_storeu_ps(dst.as_mut_ptr(), a[0]);
                    _mm512_storeu_ps(dst.as_mut_ptr().add(16), a[1]);
                }
                continue;
            }
            let mut lanes = [0.0f32; PANEL_ROWS];
            // SAFETY: `lanes` holds two vectors of 16 floats.
            unsafe {
                _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16), a[1]);
            }
            dst.copy_from_slice(&lanes[..n_rows]);
        }
    }

    /// # Safety
    /// AVX2 and FMA; every code of the panel below 64; shapes as `super::check` validated them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_avx2(
        panel: &PackedPanel,
        x: &QuantizedBatch,
        tokens: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let s = Shape::new(panel, x);
        let mins = panel.has_mins();
        for half in 0..PANEL_ROWS.div_ceil(16) {
            let r0 = 16 * half;
            if r0 >= panel.n_rows {
                break;
            }
            let n = (panel.n_rows - r0).min(16);
            let mut t = tokens.start;
            while t < tokens.end {
                let mr = (tokens.end - t).min(2);
                // SAFETY: tokens t..t + mr exist and rows r0..r0 + 16 are inside the panel;
                // the features are the caller's.
                let acc = unsafe {
                    match (mr, mins) {
                        (2, false) => tile256::<2, false>(&s, t, r0),
                        (2, true) => tile256::<2, true>(&s, t, r0),
                        (_, false) => {
                            let a = tile256::<1, false>(&s, t, r0);
                            [a[0], a[0]]
                        }
                        _ => {
                            let a = tile256::<1, true>(&s, t, r0);
                            [a[0], a[0]]
                        }
                    }
                };
                for (i, a) in acc.iter().enumerate().take(mr) {
                    let mut lanes = [0.0f32; 16];
                    // SAFETY: `lanes` holds two vectors of 8 floats.
                    unsafe {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
                    }
                    let row = (t + i) * stride + r0;
                    out[row..row + n].copy_from_slice(&lanes[..n]);
                }
                t += mr;
            }
        }
    }

    /// Tokens `t0..t0 + MR` against panel rows `r0..r0 + 16`.
    ///
    /// # Safety
    /// AVX2 and FMA; codes below 64; tokens `t0..t0 + MR` exist and `r0 + 16 <= PANEL_ROWS`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const MR: usize, const MINS: bool>(
        s: &Shape,
        t0: usize,
        r0: usize,
    ) -> [[__m256; 2]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let ones = _mm256_set1_epi16(1);
        // SAFETY: as in `tile512`, with rows r0..r0 + 16 of the panel's PANEL_ROWS.
        unsafe {
            for b in 0..s.nb {
                let mut sums = [[_mm256_setzero_si256(); 2]; MR];
                for (i, sm) in sums.iter_mut().enumerate() {
                    let c = _mm256_set1_epi32(*s.xc.add((t0 + i) * s.nb + b));
                    *sm = [c, c];
                }
                let codes = s.codes.add(b * BLOCK_CODES + r0 * 4);
                for step in 0..STEPS {
                    let w0 = _mm256_loadu_si256(codes.add(step * PANEL_ROWS * 4).cast());
                    let w1 = _mm256_loadu_si256(codes.add(step * PANEL_ROWS * 4 + 32).cast());
                    for (i, sm) in sums.iter_mut().enumerate() {
                        let word =
                            s.x.add((t0 + i) * s.k + b * QK + 4 * step)
                                .cast::<i32>()
                                .read_unaligned();
                        let xv = _mm256_set1_epi32(word);
                        // Codes below 64 times |x| <= 127, two per pair: below 2^15, so the
                        // saturating pair sums are exact.
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xv), ones);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xv), ones);
                        sm[0] = _mm256_add_epi32(sm[0], p0);
                        sm[1] = _mm256_add_epi32(sm[1], p1);
                    }
                }
                let d0 = _mm256_loadu_ps(s.scales.add(b * PANEL_ROWS + r0));
                let d1 = _mm256_loadu_ps(s.scales.add(b * PANEL_ROWS + r0 + 8));
                for (i, (a, sm)) in acc.iter_mut().zip(&sums).enumerate() {
                    let dx = _mm256_set1_ps(*s.xd.add((t0 + i) * s.nb + b));
                    a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sm[0]), _mm256_mul_ps(d0, dx), a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sm[1]), _mm256_mul_ps(d1, dx), a[1]);
                }
                if MINS {
                    let m0 = _mm256_loadu_ps(s.mins.add(b * PANEL_ROWS + r0));
                    let m1 = _mm256_loadu_ps(s.mins.add(b * PANEL_ROWS + r0 + 8));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sx = _mm256_set1_ps(*s.xs.add((t0 + i) * s.nb + b));
                        a[0] = _mm256_fmadd_ps(m0, sx, a[0]);
                        a[1] = _mm256_fmadd_ps(m1, sx, a[1]);
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{available_isas, quantize_row, ActivationFormat, QuantizedRow};
    use kiln_format::ggml;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Panels packed from planar rows are the panels of the GGUF rows, bit for bit: every
        /// format, rows of any whole number of blocks, full and partial panels.
        #[test]
        fn planar_rows_pack_the_same_panels(
            t in 0usize..TYPES.len(),
            blocks in 1usize..=13,
            n in 1usize..=PANEL_ROWS,
            seed in any::<u32>(),
        ) {
            let ty = TYPES[t];
            let k = blocks * QK;
            let w = ggml::quantize(ty, &values(n * k, seed)).unwrap();
            let row_bytes = w.len() / n;
            let mut planar = vec![0u8; w.len()];
            crate::planar::pack_rows(ty, k, &w, &mut planar);
            let (mut want, mut got) = (PackedPanel::new(), PackedPanel::new());
            pack_panel(ty, &w, row_bytes, 0..n, &mut want);
            pack_panel_planar(ty, &planar, row_bytes, 0..n, &mut got);
            prop_assert_eq!(got, want);
        }
    }

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Activations with a few channels hundreds of times larger than the rest, as residual
    /// streams have, and some all-zero blocks.
    fn activations(n: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut x = values(n * k, seed);
        for (i, v) in x.iter_mut().enumerate() {
            let c = i % k;
            if c % 97 == 5 {
                *v *= 600.0;
            }
            if (i / QK) % 11 == 7 {
                *v = 0.0;
            }
        }
        x
    }

    fn weights(ty: GgmlType, rows: usize, k: usize, seed: u32) -> Vec<u8> {
        ggml::quantize(ty, &values(rows * k, seed)).unwrap()
    }

    #[test]
    fn packed_weights_are_the_dequantized_weights() {
        for ty in TYPES {
            let (rows, k) = (45, 96);
            let w = weights(ty, rows, k, 3);
            let row_bytes = ty.row_bytes(k).unwrap();
            let mut panel = PackedPanel::new();
            for range in [0..32, 32..45, 7..8] {
                pack_panel(ty, &w, row_bytes, range.clone(), &mut panel);
                assert_eq!((panel.n_rows(), panel.k()), (range.len(), k));
                for (r, row) in range.clone().enumerate() {
                    let mut want = vec![0.0; k];
                    ggml::dequantize(ty, &w[row * row_bytes..(row + 1) * row_bytes], &mut want)
                        .unwrap();
                    for (c, &v) in want.iter().enumerate() {
                        assert_eq!(panel.weight(r, c).to_bits(), v.to_bits(), "{ty} ({r}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn every_packing_matches_the_reference_bit_for_bit() {
        // One panel per level, reused throughout: what an earlier, larger or full panel left
        // behind must not leak into the next.
        let mut panels: Vec<PackedPanel> = available_isas()
            .iter()
            .map(|_| PackedPanel::new())
            .collect();
        for ty in TYPES {
            for (rows, k) in [
                (32, 32),
                (17, 64),
                (32, 576),
                (3, 160),
                (1, 32),
                (16, 64),
                (31, 96),
            ] {
                // Arbitrary bytes: every code pattern, including Q8_0's -128.
                let row_bytes = ty.row_bytes(k).unwrap();
                let w: Vec<u8> = (0..rows * row_bytes)
                    .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                let mut reference = PackedPanel::new();
                pack_panel_reference(ty, &w, row_bytes, 0..rows, &mut reference);
                for (isa, fast) in available_isas().into_iter().zip(panels.iter_mut()) {
                    pack_panel_with(isa, ty, &w, row_bytes, 0..rows, fast);
                    assert!(fast.codes == reference.codes, "{isa:?} {ty} {rows}x{k}");
                    // Bit for bit, except that the hardware conversion quiets signalling NaNs.
                    let bits = |v: &[f32]| {
                        v.iter()
                            .map(|f| if f.is_nan() { u32::MAX } else { f.to_bits() })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&fast.scales), bits(&reference.scales), "{isa:?} {ty}");
                    assert_eq!(bits(&fast.mins), bits(&reference.mins), "{isa:?} {ty}");
                    assert_eq!((fast.n_rows, fast.k), (reference.n_rows, reference.k));
                }
            }
        }
    }

    #[test]
    fn batch_codes_are_those_of_quantize_row() {
        let (n, k) = (3, 256);
        let mut x = activations(n, k, 9);
        // Specials in some blocks: NaN, infinities, a block whose scale is subnormal (no finite
        // reciprocal), one whose scale underflows to zero, halfway values.
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN];
        for (i, &v) in specials.iter().enumerate() {
            x[64 + 40 * i] = v;
        }
        x[k + 32..k + 64].iter_mut().for_each(|v| *v *= 1e-37);
        x[k + 64..k + 96].iter_mut().for_each(|v| *v *= 1e-44);
        for (j, v) in x[2 * k..2 * k + 32].iter_mut().enumerate() {
            *v = j as f32 - 15.5;
        }
        x[2 * k + 31] = 127.0;
        let mut batch = QuantizedBatch::new();
        quantize_batch(&x, n, k, GgmlType::Q4_0, &mut batch);
        for t in 0..n {
            let mut row = QuantizedRow::new();
            quantize_row(&x[t * k..(t + 1) * k], ActivationFormat::Q8_1, &mut row);
            let nb = k / QK;
            assert_eq!(&batch.codes()[t * k..(t + 1) * k], row.codes(), "token {t}");
            assert_eq!(&batch.scales()[t * nb..(t + 1) * nb], row.scales());
            assert_eq!(&batch.sums[t * nb..(t + 1) * nb], row.block_sums());
            for (b, q) in row.codes().chunks_exact(QK).enumerate() {
                let s: i32 = q.iter().map(|&v| i32::from(v)).sum();
                assert_eq!(batch.corrections[t * nb + b], -8 * s);
            }
        }
    }

    #[test]
    #[should_panic(expected = "another weight type")]
    fn batch_for_another_type_is_refused() {
        let w = weights(GgmlType::Q4_0, 2, 32, 1);
        let mut panel = PackedPanel::new();
        pack_panel(GgmlType::Q4_0, &w, 18, 0..2, &mut panel);
        let mut batch = QuantizedBatch::new();
        quantize_batch(&values(32, 2), 1, 32, GgmlType::Q8_0, &mut batch);
        gemm_panel_i8(&panel, &batch, &mut [0.0; 2], 2);
    }

    /// The reference against the product, in f64, of the weights and activations it stands for.
    #[test]
    fn reference_is_the_product_within_the_bound() {
        for ty in TYPES {
            let (rows, k, n) = (29, 192, 5);
            let w = weights(ty, rows, k, 11);
            let x = activations(n, k, 12);
            let mut panel = PackedPanel::new();
            pack_panel_reference(ty, &w, ty.row_bytes(k).unwrap(), 0..rows, &mut panel);
            let mut batch = QuantizedBatch::new();
            quantize_batch(&x, n, k, ty, &mut batch);
            let mut out = vec![0.0f32; n * rows];
            gemm_panel_i8_reference(&panel, &batch, &mut out, rows);
            let mut worst = 0.0f64;
            for t in 0..n {
                let mut xq = QuantizedRow::new();
                quantize_row(&x[t * k..(t + 1) * k], ActivationFormat::Q8_1, &mut xq);
                let xd = xq.dequantize();
                for r in 0..rows {
                    let exact: f64 = (0..k)
                        .map(|c| f64::from(panel.weight(r, c)) * f64::from(xd[c]))
                        .sum();
                    let bound = error_bound(&panel, &batch, t, r);
                    let err = (f64::from(out[t * rows + r]) - exact).abs();
                    assert!(err <= bound, "{ty} t {t} r {r}: {err} > {bound}");
                    worst = worst.max(err / bound.max(f64::MIN_POSITIVE));
                }
            }
            // The bound is not vacuous: some output comes within a few hundred times of it.
            assert!(worst > 1e-3, "{ty}: worst error is {worst} of the bound");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(120))]
        #[test]
        fn every_kernel_matches_the_reference_bit_for_bit(
            type_index in 0usize..5,
            blocks in 1usize..8,
            n_rows in 1usize..=PANEL_ROWS,
            n_tokens in 0usize..21,
            pad in 0usize..4,
            seed in any::<u32>(),
        ) {
            let ty = TYPES[type_index];
            let k = blocks * QK;
            let w = weights(ty, n_rows, k, seed);
            let x = activations(n_tokens, k, seed ^ 0x5555);
            let mut panel = PackedPanel::new();
            pack_panel(ty, &w, ty.row_bytes(k).unwrap(), 0..n_rows, &mut panel);
            let mut batch = QuantizedBatch::new();
            quantize_batch(&x, n_tokens, k, ty, &mut batch);
            let stride = n_rows + pad;
            let len = n_tokens * stride;
            let mut reference = vec![7.0f32; len];
            gemm_panel_i8_reference(&panel, &batch, &mut reference, stride);
            // Token groups with prefetching in between change nothing.
            let mut ahead = vec![7.0f32; len];
            gemm_panel_i8_ahead(&panel, &batch, &mut ahead, stride, &w);
            for i in 0..len {
                prop_assert_eq!(ahead[i].to_bits(), reference[i].to_bits());
            }
            for isa in available_isas() {
                if !has_kernel(isa, ty) {
                    continue;
                }
                let mut fast = vec![7.0f32; len];
                gemm_panel_i8_with(isa, &panel, &batch, &mut fast, stride);
                for i in 0..len {
                    prop_assert_eq!(
                        fast[i].to_bits(),
                        reference[i].to_bits(),
                        "{:?} {} t {} r {}: {} vs {}",
                        isa, ty, i / stride, i % stride, fast[i], reference[i]
                    );
                }
            }
        }
    }
}
