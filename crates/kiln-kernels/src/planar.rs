//! The planar row layout of the 32-element ggml formats: each row's codes, fifth bits, scales
//! and minimums in separate runs, so a decode kernel loads four blocks' codes with one aligned
//! read and their scales with another, instead of picking them out of interleaved blocks.
//!
//! A GGUF row of `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` or `Q8_0` interleaves each block's f16 scale
//! (and minimum and fifth bits) with its codes, 18 to 34 bytes a block. Unpacking that costs the
//! AVX-512 kernels three word permutes per four blocks, and for `Q5_0` the kernel is bound by
//! that work rather than by memory (a Gemma 3 `Q5_0` matrix streamed at 20–22 GB/s where one
//! core reads 40 GB/s). The runtime therefore rewrites such matrices at load into this layout,
//! byte for byte as large as the GGUF rows (so resident memory does not grow), when
//! [`supported`] says the CPU's kernels read it. The kiln format `LUT4_B32` has a planar layout
//! of its own ([`lut4_b32`]).
//!
//! A planar row of `nb` blocks holds, in order:
//! - **codes**: for `Q8_0` the codes of every block in element order, plus 128 (unsigned). For
//!   the 4-bit formats (the low 4 bits of the codes) runs of 32 bytes that each hold two
//!   blocks, byte `j` element `j` of one block in its low nibble and element `j` of the other
//!   in its high nibble: per group of four blocks `4g..4g + 4`, the run of blocks `4g` (low)
//!   and `4g + 2` (high), then of `4g + 1` and `4g + 3`, so that one 64-byte read gives the
//!   group's first two blocks in its low nibbles and the last two in its high ones. The
//!   `nb mod 4` blocks after the last whole group follow as a run of two blocks (low, then
//!   high) if there are two or three, and a last single block as GGUF stores it (byte `j`:
//!   elements `j` and `j + 16`);
//! - **fifth bits** (`Q5_0`, `Q5_1`): each block's 32 bits as stored, block after block;
//! - **scales**: each block's f16 `d`, block after block;
//! - **minimums** (`Q4_1`, `Q5_1`): each block's f16 `m`, block after block.
//!
//! [`pack_rows`] and [`unpack_row`] convert exactly (a round trip returns the GGUF bytes), and
//! [`dot_block`] multiplies planar rows with activation rows as [`crate::dot_block`] does GGUF
//! rows, with the same results.

use std::ops::Range;

use kiln_format::ggml::{f16_to_f32, GgmlType};

use crate::activation::QuantizedRow;
use crate::gemm_i8::{format, Format};
use crate::Isa;

/// Elements per block of every planar format.
const QK: usize = 32;
/// Blocks per group of the code plane.
const GROUP: usize = 4;

/// Whether `isa` has kernels for planar rows of `cols` elements of `ty`: AVX-512 VNNI, a
/// 32-element format other than `IQ4_NL`, and whole blocks.
pub fn supported(isa: Isa, ty: GgmlType, cols: usize) -> bool {
    isa == Isa::Avx512Vnni && format(ty).is_some() && cols > 0 && cols.is_multiple_of(QK)
}

/// Whether `isa` is the level whose kernels read the planar rows of the kiln lookup-table
/// formats: AVX-512 VNNI with VBMI (their kernels take 16-bit table entries).
fn vbmi_level(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512Vnni && crate::x86::kiln_formats::has_vbmi()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Where the 4-bit codes of one block lie in a planar row's code plane.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The low nibbles of the 32-byte run at this offset.
    Low(usize),
    /// The high nibbles of the 32-byte run at this offset.
    High(usize),
    /// 16 bytes at this offset, as GGUF stores a block's codes.
    Whole(usize),
}

/// The slot of block `b` of a row of `nb` blocks (4-bit formats), and for a `Low` slot the
/// block in the same run's high nibbles.
pub(crate) fn slot(nb: usize, b: usize) -> (Slot, usize) {
    let whole = nb / GROUP * GROUP;
    if b < whole {
        let (g, k) = (b / GROUP, b % GROUP);
        let at = 64 * g + 32 * (k % 2);
        return if k < 2 {
            (Slot::Low(at), b + 2)
        } else {
            (Slot::High(at), b - 2)
        };
    }
    let (t, pair) = (b - whole, nb - whole >= 2);
    let at = 64 * (whole / GROUP);
    match (t, pair) {
        (0, true) => (Slot::Low(at), b + 1),
        (1, true) => (Slot::High(at), b - 1),
        _ => (Slot::Whole(at + if pair { 32 } else { 0 }), b),
    }
}

/// The planar layout's offsets within a row of `nb` blocks: (fifth bits, scales, minimums).
fn planes(f: Format, nb: usize) -> (usize, usize, usize) {
    let codes = nb * if eight_bit(f) { QK } else { QK / 2 };
    let qh = codes;
    let d = qh + if f.qh.is_some() { 4 * nb } else { 0 };
    (qh, d, d + 2 * nb)
}

/// Whether the format's codes are whole bytes (`Q8_0`), not nibbles.
fn eight_bit(f: Format) -> bool {
    f.bias == 128
}

/// Rewrites `src`, whole GGUF rows of `cols` elements of `ty`, into planar rows in `dst` (the
/// same length).
///
/// # Panics
/// If `ty` has no planar layout, `cols` is not a whole number of groups of four blocks, or the
/// buffers are not whole rows of the same length.
pub fn pack_rows(ty: GgmlType, cols: usize, src: &[u8], dst: &mut [u8]) {
    let (f, nb, row) = shape(ty, cols, "pack_rows");
    assert!(
        src.len() == dst.len() && src.len().is_multiple_of(row),
        "pack_rows: {} bytes into {} are not whole rows of {row}",
        src.len(),
        dst.len()
    );
    let (qh_at, d_at, m_at) = planes(f, nb);
    for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
        for (b, blk) in s.chunks_exact(f.bytes).enumerate() {
            d[d_at + 2 * b..d_at + 2 * b + 2].copy_from_slice(&blk[..2]);
            if let Some(m) = f.min {
                d[m_at + 2 * b..m_at + 2 * b + 2].copy_from_slice(&blk[m..m + 2]);
            }
            if let Some(h) = f.qh {
                d[qh_at + 4 * b..qh_at + 4 * b + 4].copy_from_slice(&blk[h..h + 4]);
            }
            if eight_bit(f) {
                let codes: &[u8; QK] = blk[f.qs..f.qs + QK].try_into().expect("32 codes");
                let out: &mut [u8; QK] = (&mut d[QK * b..QK * (b + 1)]).try_into().expect("32");
                for (o, &q) in out.iter_mut().zip(codes) {
                    *o = q ^ 0x80;
                }
            }
        }
        if eight_bit(f) {
            continue;
        }
        let qs = |b: usize| -> &[u8; 16] {
            let at = b * f.bytes + f.qs;
            s[at..at + 16].try_into().expect("16 code bytes")
        };
        pack_codes4(nb, qs, &mut d[..nb * QK / 2]);
    }
}

/// Writes the 4-bit code plane of a row of `nb` blocks into `plane` (`16 · nb` bytes), block
/// `b`'s 16 code bytes as GGUF stores them (byte `j`: elements `j` and `j + 16`) given by
/// `qs(b)`.
fn pack_codes4<'a>(nb: usize, qs: impl Fn(usize) -> &'a [u8; 16], plane: &mut [u8]) {
    for b in 0..nb {
        match slot(nb, b) {
            (Slot::Low(at), high) => {
                let (lo, hi) = (qs(b), qs(high));
                let (first, second) = plane[at..at + 32].split_at_mut(16);
                for j in 0..16 {
                    first[j] = (lo[j] & 0x0f) | (hi[j] << 4);
                    second[j] = (lo[j] >> 4) | (hi[j] & 0xf0);
                }
            }
            (Slot::High(_), _) => {}
            (Slot::Whole(at), _) => plane[at..at + 16].copy_from_slice(qs(b)),
        }
    }
}

/// Reads the 4-bit code plane of a row of `nb` blocks back: `out(b, q)` receives block `b`'s
/// 16 code bytes `q` as GGUF stores them.
fn unpack_codes4(nb: usize, plane: &[u8], mut out: impl FnMut(usize, [u8; 16])) {
    // Whole groups four blocks at a time (fixed-size runs, which the compiler vectorizes:
    // prompts rewrite every row of a matrix this way before packing it), then the rest.
    let groups = nb / GROUP;
    for g in 0..groups {
        let v: &[u8; 64] = plane[64 * g..64 * (g + 1)]
            .try_into()
            .expect("64 code bytes");
        for k in 0..GROUP {
            let run = 32 * (k % 2);
            let x: &[u8; 16] = v[run..run + 16].try_into().expect("16");
            let y: &[u8; 16] = v[run + 16..run + 32].try_into().expect("16");
            let mut q = [0u8; 16];
            if k < 2 {
                for j in 0..16 {
                    q[j] = (x[j] & 0x0f) | (y[j] << 4);
                }
            } else {
                for j in 0..16 {
                    q[j] = (x[j] >> 4) | (y[j] & 0xf0);
                }
            }
            out(GROUP * g + k, q);
        }
    }
    for b in groups * GROUP..nb {
        let (at, shift) = match slot(nb, b).0 {
            Slot::Whole(at) => {
                out(b, plane[at..at + 16].try_into().expect("16"));
                continue;
            }
            Slot::Low(at) => (at, 0),
            Slot::High(at) => (at, 4),
        };
        let (x, y) = (&plane[at..at + 16], &plane[at + 16..at + 32]);
        let mut q = [0u8; 16];
        for j in 0..16 {
            q[j] = ((x[j] >> shift) & 0x0f) | (((y[j] >> shift) & 0x0f) << 4);
        }
        out(b, q);
    }
}

/// Rewrites one planar row `src` of `cols` elements of `ty` back into its GGUF bytes in `dst`.
///
/// # Panics
/// As [`pack_rows`], for one row.
pub fn unpack_row(ty: GgmlType, cols: usize, src: &[u8], dst: &mut [u8]) {
    let (f, nb, row) = shape(ty, cols, "unpack_row");
    assert!(
        src.len() == row && dst.len() == row,
        "unpack_row: a row of {cols} elements is {row} bytes"
    );
    let (qh_at, d_at, m_at) = planes(f, nb);
    for (b, blk) in dst.chunks_exact_mut(f.bytes).enumerate() {
        blk[..2].copy_from_slice(&src[d_at + 2 * b..d_at + 2 * b + 2]);
        if let Some(m) = f.min {
            blk[m..m + 2].copy_from_slice(&src[m_at + 2 * b..m_at + 2 * b + 2]);
        }
        if let Some(h) = f.qh {
            blk[h..h + 4].copy_from_slice(&src[qh_at + 4 * b..qh_at + 4 * b + 4]);
        }
        if eight_bit(f) {
            let codes: &[u8; QK] = src[QK * b..QK * (b + 1)].try_into().expect("32 codes");
            let out: &mut [u8; QK] = (&mut blk[f.qs..f.qs + QK]).try_into().expect("32");
            for (o, &q) in out.iter_mut().zip(codes) {
                *o = q ^ 0x80;
            }
        }
    }
    if eight_bit(f) {
        return;
    }
    unpack_codes4(nb, &src[..nb * QK / 2], |b, q| {
        let at = b * f.bytes + f.qs;
        dst[at..at + 16].copy_from_slice(&q);
    });
}

/// Dequantizes one planar row `src` of `cols` elements of `ty` into `out`: exactly the values
/// (bit for bit) `kiln_format::ggml::dequantize` gives for the GGUF row, without rewriting it.
///
/// # Panics
/// As [`unpack_row`], and if `out` is not `cols` long.
pub fn dequantize_row(ty: GgmlType, cols: usize, src: &[u8], out: &mut [f32]) {
    let (f, nb, row) = shape(ty, cols, "dequantize_row");
    assert!(
        src.len() == row && out.len() == cols,
        "dequantize_row: a row of {cols} elements is {row} bytes"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::detect() == Isa::Avx512Vnni {
        // SAFETY: the CPU has the AVX-512 level's features (detected); `src` is one planar
        // row of `nb` blocks of `ty` (its length checked above) and `out` holds its elements.
        unsafe { crate::x86::avx512::planar::dequantize_row(ty, src.as_ptr(), nb, out) };
        return;
    }
    let (qh_at, d_at, m_at) = planes(f, nb);
    let bias = f.bias;
    let f16 = |at: usize| f16_to_f32(u16::from_le_bytes([src[at], src[at + 1]]));
    for (b, y) in out.chunks_exact_mut(QK).enumerate() {
        let mut u = [0u8; QK];
        if eight_bit(f) {
            u.copy_from_slice(&src[QK * b..QK * (b + 1)]);
        } else {
            let (at, shift) = match slot(nb, b).0 {
                Slot::Low(at) => (at, 0),
                Slot::High(at) => (at, 4),
                Slot::Whole(at) => {
                    let (low, high) = u.split_at_mut(QK / 2);
                    for ((l, h), &c) in low.iter_mut().zip(high).zip(&src[at..at + 16]) {
                        (*l, *h) = (c & 0x0f, c >> 4);
                    }
                    (at, 8)
                }
            };
            if shift < 8 {
                for (u, &c) in u.iter_mut().zip(&src[at..at + QK]) {
                    *u = (c >> shift) & 0x0f;
                }
            }
            if f.qh.is_some() {
                let h = &src[qh_at + 4 * b..qh_at + 4 * b + 4];
                let h = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                for (j, u) in u.iter_mut().enumerate() {
                    *u |= (((h >> j) & 1) as u8) << 4;
                }
            }
        }
        let d = f16(d_at + 2 * b);
        if f.min.is_some() {
            let m = f16(m_at + 2 * b);
            for (y, &u) in y.iter_mut().zip(&u) {
                *y = f32::from(u) * d + m;
            }
        } else {
            for (y, &u) in y.iter_mut().zip(&u) {
                *y = (i32::from(u) - bias) as f32 * d;
            }
        }
    }
}

/// Rows `rows` of the planar rows `w` (`row_bytes` each, of `ty`) rewritten to GGUF bytes:
/// what the levels without planar kernels multiply or pack.
///
/// # Panics
/// If `ty` has no planar layout, `row_bytes` is not whole blocks of it, or `w` does not hold
/// the rows.
pub(crate) fn gguf_rows(ty: GgmlType, w: &[u8], row_bytes: usize, rows: Range<usize>) -> Vec<u8> {
    let f = format(ty).unwrap_or_else(|| panic!("gguf_rows: {ty} has no planar layout"));
    let cols = row_bytes / f.bytes * QK;
    let mut gguf = vec![0u8; row_bytes * rows.len()];
    for (r, dst) in rows.zip(gguf.chunks_exact_mut(row_bytes.max(1))) {
        unpack_row(ty, cols, &w[r * row_bytes..(r + 1) * row_bytes], dst);
    }
    gguf
}

/// The format facts, blocks per row and bytes per row of rows of `cols` elements of `ty`.
fn shape(ty: GgmlType, cols: usize, what: &str) -> (Format, usize, usize) {
    let f = format(ty).unwrap_or_else(|| panic!("{what}: {ty} has no planar layout"));
    assert!(
        cols > 0 && cols.is_multiple_of(QK),
        "{what}: {cols} columns are not whole blocks"
    );
    (f, cols / QK, cols / QK * f.bytes)
}

/// `out[t * out_stride + i] = row (rows.start + i) · xq[t]` for planar rows `w` of `ty`
/// (`row_bytes` each, as [`crate::dot_block`] for GGUF rows, and with its results: the same
/// kernels read both layouts). Levels without planar kernels rewrite each row to GGUF bytes
/// and run their own kernel.
///
/// # Panics
/// As [`crate::dot_block_with`], and if `ty` and the row length have no planar layout.
#[allow(clippy::too_many_arguments)]
pub fn dot_block(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    let Some(first) = xq.first() else { return };
    let cols = first.len();
    let f = format(ty).expect("planar dot_block: a 32-element format");
    assert!(
        cols.is_multiple_of(QK) && row_bytes == cols / QK * f.bytes,
        "planar dot_block: rows of {row_bytes} bytes are not {cols} elements of {ty:?}"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        let Some(rows_w) =
            crate::checked_block(isa, ty, w, row_bytes, &rows, xq, out.len(), out_stride)
        else {
            return;
        };
        crate::refined_rows(xq);
        // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI, FMA and F16C (is_available, in
        // checked_block); `rows_w` holds the planar rows, each one row of every activation row
        // (whole blocks of `ty`, checked above and by check_shape), in `ty`'s activation
        // format; `out` has room for every (token, row) index (check_output).
        unsafe {
            crate::x86::avx512::planar::dot_block(
                ty,
                rows_w,
                row_bytes,
                rows.len(),
                xq,
                out,
                out_stride,
            )
        };
        return;
    }
    let gguf = gguf_rows(ty, w, row_bytes, rows.clone());
    crate::dot_block_with(
        isa,
        ty,
        &gguf,
        row_bytes,
        0..rows.end - rows.start,
        xq,
        out,
        out_stride,
    );
}

/// The planar layout of the kiln format `LUT4_B32` (and its grouped variants): each row's
/// 8-byte header of units as stored, then its blocks' 16 index bytes each, block after block
/// (byte `j` of a block: element `j` in its low nibble, `j + 16` in its high one, as stored),
/// then the parameter codes: per group of four blocks their four scale codes and then their
/// four offset codes, and for the `t` blocks after the last group their `t` scale codes and
/// then their `t` offset codes. The tables after the last row stay as they are.
///
/// A stored `LUT4_B32` block interleaves its two parameter codes with its indices (18 bytes),
/// which the AVX-512 kernel gathered with byte permutes; planar rows let it load four blocks'
/// indices with one read and their eight parameter codes with another. The indices keep the
/// stored order rather than the ggml formats' code plane: a 64-byte read then holds elements
/// 0..16 of four blocks in its low nibbles and 16..32 in its high ones, so both halves meet
/// the same four block scales and the kernel sums them as integers before scaling once.
pub mod lut4_b32 {
    use super::QK;
    use kiln_format::kiln_types::{KilnType, LUT4_B32_BLOCK_BYTES, LUT4_B32_ROW_HEADER};

    use crate::Isa;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements: `LUT4_B32` on
    /// AVX-512 VNNI with VBMI (its table lookups are `vpermb`).
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        super::vbmi_level(isa)
            && matches!(ty, KilnType::Lut4B32 { .. })
            && cols > 0
            && cols.is_multiple_of(QK)
    }

    /// Where the parameter codes of a planar row of `nb` blocks start.
    pub(crate) fn params(nb: usize) -> usize {
        LUT4_B32_ROW_HEADER + nb * QK / 2
    }

    /// The offsets of block `b`'s scale and offset codes from the parameter codes' start.
    pub(crate) fn param_slots(nb: usize, b: usize) -> (usize, usize) {
        let whole = nb / 4 * 4;
        if b < whole {
            (2 * (b & !3) + (b & 3), 2 * (b & !3) + 4 + (b & 3))
        } else {
            (
                2 * whole + (b - whole),
                2 * whole + (nb - whole) + (b - whole),
            )
        }
    }

    /// Blocks per row of `cols` elements, and the row's bytes (the same in both layouts).
    fn shape(cols: usize, what: &str) -> (usize, usize) {
        assert!(
            cols > 0 && cols.is_multiple_of(QK),
            "{what}: {cols} columns are not whole LUT4_B32 blocks"
        );
        let nb = cols / QK;
        (nb, LUT4_B32_ROW_HEADER + nb * LUT4_B32_BLOCK_BYTES)
    }

    /// Rewrites `src`, whole stored `LUT4_B32` rows of `cols` elements (no tables), into
    /// planar rows in `dst` (the same length).
    ///
    /// # Panics
    /// If `cols` is not whole blocks or the buffers are not whole rows of the same length.
    pub fn pack_rows(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "lut4_b32::pack_rows");
        assert!(
            src.len() == dst.len() && src.len().is_multiple_of(row),
            "lut4_b32::pack_rows: {} bytes into {} are not whole rows of {row}",
            src.len(),
            dst.len()
        );
        let params = params(nb);
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            d[..LUT4_B32_ROW_HEADER].copy_from_slice(&s[..LUT4_B32_ROW_HEADER]);
            let blocks = &s[LUT4_B32_ROW_HEADER..];
            for (b, blk) in blocks.chunks_exact(LUT4_B32_BLOCK_BYTES).enumerate() {
                let (a, o) = param_slots(nb, b);
                d[params + a] = blk[0];
                d[params + o] = blk[1];
            }
            let plane = &mut d[LUT4_B32_ROW_HEADER..params];
            for (blk, q) in blocks
                .chunks_exact(LUT4_B32_BLOCK_BYTES)
                .zip(plane.chunks_exact_mut(QK / 2))
            {
                q.copy_from_slice(&blk[2..]);
            }
        }
    }

    /// Rewrites one planar row `src` of `cols` elements back into its stored bytes in `dst`.
    ///
    /// # Panics
    /// As [`pack_rows`], for one row.
    pub fn unpack_row(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "lut4_b32::unpack_row");
        assert!(
            src.len() == row && dst.len() == row,
            "lut4_b32::unpack_row: a row of {cols} elements is {row} bytes"
        );
        let params = params(nb);
        dst[..LUT4_B32_ROW_HEADER].copy_from_slice(&src[..LUT4_B32_ROW_HEADER]);
        let blocks = &mut dst[LUT4_B32_ROW_HEADER..];
        for (b, blk) in blocks.chunks_exact_mut(LUT4_B32_BLOCK_BYTES).enumerate() {
            let (a, o) = param_slots(nb, b);
            blk[0] = src[params + a];
            blk[1] = src[params + o];
        }
        for (blk, q) in blocks
            .chunks_exact_mut(LUT4_B32_BLOCK_BYTES)
            .zip(src[LUT4_B32_ROW_HEADER..params].chunks_exact(QK / 2))
        {
            blk[2..].copy_from_slice(q);
        }
    }
}

/// The planar layout of the kiln format `LUT4` (a 4-bit lookup table per tensor, per group of
/// rows or per row): each row's indices in the same 4-bit code plane as the ggml formats (a
/// `LUT4` chunk of 32 indices is laid out as a ggml block's codes: byte `j` holds elements `j`
/// and `j + 16`). The tables after the last row stay as they are.
///
/// Stored rows gave the AVX-512 kernel a chunk's indices in an order it had to spread over
/// words with two byte permutes and two shifts per 64 indices; a 64-byte read of the code plane
/// gives 128 indices in element order with one shift, which `vpermb` looks up
/// in the table's byte planes directly.
pub mod lut4 {
    use super::{pack_codes4, unpack_codes4, QK};
    use kiln_format::kiln_types::KilnType;

    use crate::Isa;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements: 4-bit lookup
    /// tables on AVX-512 VNNI with VBMI (the level whose kernels take 16-bit table entries).
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        super::vbmi_level(isa)
            && matches!(ty, KilnType::Lut { bits: 4, .. })
            && cols > 0
            && cols.is_multiple_of(QK)
    }

    /// Chunks per row of `cols` elements, and the row's bytes (the same in both layouts).
    fn shape(cols: usize, what: &str) -> (usize, usize) {
        assert!(
            cols > 0 && cols.is_multiple_of(QK),
            "{what}: {cols} columns are not whole LUT4 chunks"
        );
        (cols / QK, cols / 2)
    }

    /// Rewrites `src`, whole stored `LUT4` rows of `cols` elements (no tables), into planar
    /// rows in `dst` (the same length).
    ///
    /// # Panics
    /// If `cols` is not whole chunks or the buffers are not whole rows of the same length.
    pub fn pack_rows(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "lut4::pack_rows");
        assert!(
            src.len() == dst.len() && src.len().is_multiple_of(row),
            "lut4::pack_rows: {} bytes into {} are not whole rows of {row}",
            src.len(),
            dst.len()
        );
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            let qs = |b: usize| -> &[u8; 16] { s[16 * b..16 * b + 16].try_into().expect("16") };
            pack_codes4(nb, qs, d);
        }
    }

    /// Rewrites one planar row `src` of `cols` elements back into its stored bytes in `dst`.
    ///
    /// # Panics
    /// As [`pack_rows`], for one row.
    pub fn unpack_row(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "lut4::unpack_row");
        assert!(
            src.len() == row && dst.len() == row,
            "lut4::unpack_row: a row of {cols} elements is {row} bytes"
        );
        unpack_codes4(nb, src, |b, q| dst[16 * b..16 * b + 16].copy_from_slice(&q));
    }
}

/// The planar layout of the kiln format `LUT2` (a 2-bit lookup table per tensor, per group of
/// rows or per row): each whole I16 activation block of a row (256 elements) in 64 bytes as
/// 32 little-endian words of eight 2-bit fields, field `f` of word `k` the index of element
/// `64 (f / 2) + 16 (k / 8) + 8 (f % 2) + k % 8` of the block: the I16 codes' order
/// ([`crate::activation::i16_element`]) of the block's step `f / 2`, first half for even `f`.
/// The elements after the last whole block stay as stored, and so do the tables after the
/// last row.
///
/// Stored rows gave the AVX-512 kernel 64 indices per 16 bytes, spread to words with a byte
/// permute and a variable shift per 32 before each word lookup; planar rows give a field's 32
/// words to `vpermw` as read or after one shift per two fields.
pub mod lut2 {
    use kiln_format::kiln_types::{pack_chunk, unpack_chunk, KilnType, CHUNK};

    use crate::activation::I16_BLOCK;
    use crate::Isa;

    /// Bytes of a whole block's indices.
    const BLOCK_BYTES: usize = I16_BLOCK / 4;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements: 2-bit lookup
    /// tables on AVX-512 VNNI with VBMI (the level whose kernels take 16-bit table entries),
    /// rows of whole chunks with at least one whole I16 block.
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        super::vbmi_level(isa)
            && matches!(ty, KilnType::Lut { bits: 2, .. })
            && cols >= I16_BLOCK
            && cols.is_multiple_of(CHUNK)
    }

    /// The element of a whole block held by field `f` of word `k`.
    fn element(f: usize, k: usize) -> usize {
        64 * (f / 2) + 16 * (k / 8) + 8 * (f % 2) + k % 8
    }

    /// Row bytes of `cols` elements (the same in both layouts).
    fn shape(cols: usize, what: &str) -> usize {
        assert!(
            cols > 0 && cols.is_multiple_of(CHUNK),
            "{what}: {cols} columns are not whole LUT2 chunks"
        );
        cols / 4
    }

    /// The indices of a stored row's first `idx.len()` elements (whole chunks) into `idx`.
    fn indices(row: &[u8], idx: &mut [u8]) {
        for (c, out) in row.chunks_exact(8).zip(idx.chunks_exact_mut(CHUNK)) {
            unpack_chunk(2, c, out.try_into().expect("32 indices"));
        }
    }

    /// Rewrites `src`, whole stored `LUT2` rows of `cols` elements (no tables), into planar
    /// rows in `dst` (the same length).
    ///
    /// # Panics
    /// If `cols` is not whole chunks or the buffers are not whole rows of the same length.
    pub fn pack_rows(cols: usize, src: &[u8], dst: &mut [u8]) {
        let row = shape(cols, "lut2::pack_rows");
        assert!(
            src.len() == dst.len() && src.len().is_multiple_of(row),
            "lut2::pack_rows: {} bytes into {} are not whole rows of {row}",
            src.len(),
            dst.len()
        );
        let whole = cols / I16_BLOCK;
        // One buffer for every row's indices: a matrix is rewritten at load.
        let mut idx = vec![0u8; whole * I16_BLOCK];
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            indices(s, &mut idx);
            for (b, out) in d.chunks_exact_mut(BLOCK_BYTES).take(whole).enumerate() {
                let block = &idx[b * I16_BLOCK..(b + 1) * I16_BLOCK];
                for (k, word) in out.chunks_exact_mut(2).enumerate() {
                    let v =
                        (0..8).fold(0u16, |v, f| v | u16::from(block[element(f, k)]) << (2 * f));
                    word.copy_from_slice(&v.to_le_bytes());
                }
            }
            let tail = whole * BLOCK_BYTES;
            d[tail..].copy_from_slice(&s[tail..]);
        }
    }

    /// Rewrites one planar row `src` of `cols` elements back into its stored bytes in `dst`.
    ///
    /// # Panics
    /// As [`pack_rows`], for one row.
    pub fn unpack_row(cols: usize, src: &[u8], dst: &mut [u8]) {
        let row = shape(cols, "lut2::unpack_row");
        assert!(
            src.len() == row && dst.len() == row,
            "lut2::unpack_row: a row of {cols} elements is {row} bytes"
        );
        let whole = cols / I16_BLOCK;
        let mut block = [0u8; I16_BLOCK];
        for (b, out) in dst.chunks_exact_mut(BLOCK_BYTES).take(whole).enumerate() {
            let words = &src[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
            for (k, word) in words.chunks_exact(2).enumerate() {
                let v = u16::from_le_bytes([word[0], word[1]]);
                for f in 0..8 {
                    block[element(f, k)] = (v >> (2 * f)) as u8 & 3;
                }
            }
            for (c, idx) in out.chunks_exact_mut(8).zip(block.chunks_exact(CHUNK)) {
                pack_chunk(2, idx.try_into().expect("32 indices"), c);
            }
        }
        let tail = whole * BLOCK_BYTES;
        dst[tail..].copy_from_slice(&src[tail..]);
    }
}

/// The planar layout of the kiln format `LUT6` (a 6-bit lookup table per tensor, per group of
/// rows or per row): each whole I16 activation block of a row (256 elements, 192 bytes) as two
/// nibble registers and a top-bits register of 64 bytes each. Byte `j` of nibble register
/// `h` holds the low four bits of element `128 h + j` in its low nibble and of element
/// `128 h + 64 + j` in its high one; byte `j` of the top-bits register holds the top two bits
/// of element `64 s + j` at bits `2 s .. 2 s + 2` (`s` = 0..4). The elements after the last
/// whole block follow in steps of `n` = 64 (and a last 32): `n / 2` nibble bytes (byte `j`:
/// element `j` low, `n / 2 + j` high), then `n / 4` top-bits bytes (byte `j`: element
/// `n q / 4 + j`'s top bits at `2 q`), as many bytes as the stored chunks. The tables after the
/// last row stay as they are.
///
/// Stored rows gave the AVX-512 kernel 64 indices in 48 bytes, gathered per 32 with a byte
/// permute, a variable shift and a bit select, then looked up with a two-register word permute.
/// Planar rows give each 64 indices as bytes in element order with one bit select (of a
/// nibble register, as read or shifted by four, and the top-bits register shifted to bits
/// 4..6), which `vpermb` looks up in the table's byte planes (64 entries fill a register)
/// before two byte interleaves make the words.
pub mod lut6 {
    use kiln_format::kiln_types::{pack_chunk, unpack_chunk, KilnType, CHUNK};

    use crate::activation::I16_BLOCK;
    use crate::Isa;

    /// Bytes of a stored 32-index chunk.
    const CHUNK_BYTES: usize = 24;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements: 6-bit lookup
    /// tables on AVX-512 VNNI with VBMI (the level whose kernels take 16-bit table entries),
    /// rows of whole chunks.
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        super::vbmi_level(isa)
            && matches!(ty, KilnType::Lut { bits: 6, .. })
            && cols > 0
            && cols.is_multiple_of(CHUNK)
    }

    /// Row bytes of `cols` elements (the same in both layouts).
    fn shape(cols: usize, what: &str) -> usize {
        assert!(
            cols > 0 && cols.is_multiple_of(CHUNK),
            "{what}: {cols} columns are not whole LUT6 chunks"
        );
        cols / CHUNK * CHUNK_BYTES
    }

    /// The parts of a row of `cols` elements: (first element, elements), whole blocks of
    /// 256, then steps of 64 and a last 32. A part's bytes start at `3 / 4` of its element.
    pub(crate) fn parts(cols: usize) -> impl Iterator<Item = (usize, usize)> {
        let whole = cols / I16_BLOCK * I16_BLOCK;
        let blocks = (0..whole / I16_BLOCK).map(|b| (I16_BLOCK * b, I16_BLOCK));
        let steps = (whole..cols)
            .step_by(64)
            .map(move |c| (c, (cols - c).min(64)));
        blocks.chain(steps)
    }

    /// Writes a part's `n` indices `idx` (element order) into its planar bytes `out`.
    fn pack_part(idx: &[u8], out: &mut [u8]) {
        let n = idx.len();
        if n == I16_BLOCK {
            let (nibbles, top) = out.split_at_mut(128);
            for h in 0..2 {
                for j in 0..64 {
                    let (lo, hi) = (idx[128 * h + j], idx[128 * h + 64 + j]);
                    nibbles[64 * h + j] = (lo & 0x0f) | (hi & 0x0f) << 4;
                }
            }
            for (j, t) in top.iter_mut().enumerate() {
                *t = (0..4).fold(0u8, |t, s| t | (idx[64 * s + j] >> 4 & 3) << (2 * s));
            }
            return;
        }
        let (nibbles, top) = out.split_at_mut(n / 2);
        for (j, b) in nibbles.iter_mut().enumerate() {
            *b = (idx[j] & 0x0f) | (idx[n / 2 + j] & 0x0f) << 4;
        }
        for (j, t) in top.iter_mut().enumerate() {
            *t = (0..4).fold(0u8, |t, q| t | (idx[n / 4 * q + j] >> 4 & 3) << (2 * q));
        }
    }

    /// The indices (element order) of a part's planar bytes `part` into `idx` (its `n`).
    fn unpack_part(part: &[u8], idx: &mut [u8]) {
        let n = idx.len();
        for (e, i) in idx.iter_mut().enumerate() {
            let (nibble, top) = if n == I16_BLOCK {
                let (h, k) = (e / 128, e % 128);
                let nibble = part[64 * h + k % 64] >> (4 * (k / 64));
                (nibble, part[128 + e % 64] >> (2 * (e / 64)))
            } else {
                let nibble = part[e % (n / 2)] >> (4 * (e / (n / 2)));
                (nibble, part[n / 2 + e % (n / 4)] >> (2 * (e / (n / 4))))
            };
            *i = (nibble & 0x0f) | (top & 3) << 4;
        }
    }

    /// Rewrites `src`, whole stored `LUT6` rows of `cols` elements (no tables), into planar
    /// rows in `dst` (the same length).
    ///
    /// # Panics
    /// If `cols` is not whole chunks or the buffers are not whole rows of the same length.
    pub fn pack_rows(cols: usize, src: &[u8], dst: &mut [u8]) {
        let row = shape(cols, "lut6::pack_rows");
        assert!(
            src.len() == dst.len() && src.len().is_multiple_of(row),
            "lut6::pack_rows: {} bytes into {} are not whole rows of {row}",
            src.len(),
            dst.len()
        );
        let mut idx = [0u8; I16_BLOCK];
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            for (start, n) in parts(cols) {
                let bytes = start / CHUNK * CHUNK_BYTES..(start + n) / CHUNK * CHUNK_BYTES;
                for (c, out) in s[bytes.clone()]
                    .chunks_exact(CHUNK_BYTES)
                    .zip(idx[..n].chunks_exact_mut(CHUNK))
                {
                    unpack_chunk(6, c, out.try_into().expect("32 indices"));
                }
                pack_part(&idx[..n], &mut d[bytes]);
            }
        }
    }

    /// Rewrites one planar row `src` of `cols` elements back into its stored bytes in `dst`.
    ///
    /// # Panics
    /// As [`pack_rows`], for one row.
    pub fn unpack_row(cols: usize, src: &[u8], dst: &mut [u8]) {
        let row = shape(cols, "lut6::unpack_row");
        assert!(
            src.len() == row && dst.len() == row,
            "lut6::unpack_row: a row of {cols} elements is {row} bytes"
        );
        let mut idx = [0u8; I16_BLOCK];
        for (start, n) in parts(cols) {
            let bytes = start / CHUNK * CHUNK_BYTES..(start + n) / CHUNK * CHUNK_BYTES;
            unpack_part(&src[bytes.clone()], &mut idx[..n]);
            for (c, i) in dst[bytes]
                .chunks_exact_mut(CHUNK_BYTES)
                .zip(idx[..n].chunks_exact(CHUNK))
            {
                pack_chunk(6, i.try_into().expect("32 indices"), c);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every part's planar bytes give its indices back, every byte of them counts, and the
        /// parts cover a row.
        #[test]
        fn parts_round_trip() {
            for n in [I16_BLOCK, 64, 32] {
                let idx: Vec<u8> = (0..n).map(|e| ((e * 37 + e / 64) % 64) as u8).collect();
                let mut planar = vec![0u8; n * 3 / 4];
                pack_part(&idx, &mut planar);
                let mut back = vec![0u8; n];
                unpack_part(&planar, &mut back);
                assert_eq!(back, idx, "{n}");
            }
            // Element 64 + 5 of a block: the high nibble of nibble byte 5, top bits at 2..4 of
            // top byte 5. Element 16 + 5 of a step of 64: the low nibble of byte 21, top bits
            // at 2..4 of top byte 5.
            for (n, e, want) in [
                (I16_BLOCK, 69, vec![(5, 0xf0), (128 + 5, 0x0c)]),
                (64, 21, vec![(21, 0x0f), (32 + 5, 0x0c)]),
                (32, 30, vec![(14, 0xf0), (16 + 6, 0xc0)]),
            ] {
                let mut one = vec![0u8; n];
                one[e] = 0x3f;
                let mut planar = vec![0u8; n * 3 / 4];
                pack_part(&one, &mut planar);
                let set: Vec<(usize, u8)> = planar
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|&(_, b)| b != 0)
                    .collect();
                assert_eq!(set, want, "{n}");
            }
            for cols in (32..=800).step_by(32) {
                let mut at = 0;
                for (start, n) in parts(cols) {
                    assert_eq!(start, at, "{cols}");
                    at += n;
                }
                assert_eq!(at, cols);
            }
        }
    }
}

/// The planar layout of the kiln format `I4_B64`: each row's code plane, then its scale plane
/// (every block's f16 scale, block after block). The code plane pairs blocks `2g` and
/// `2g + 1` in 64 bytes: byte `j` (0..32) holds element `j` of the first block in its low
/// nibble and of the second in its high one, byte `32 + j` element `32 + j` of each. A last
/// block without a pair follows as stored (byte `j`: elements `j` and `32 + j`).
///
/// A stored block puts its 2-byte scale before its 32 code bytes (34 bytes), so the AVX-512
/// kernel read two blocks' codes with two unaligned 32-byte loads and their scales one by
/// one, and rearranged the activation codes to meet them. Planar rows give a pair's codes in
/// one 64-byte read, in the activation blocks' order (the first block's elements in the low
/// nibbles, as `Q4_0`'s planar rows give four blocks), and their scales in one 4-byte read.
pub mod i4_b64 {
    use kiln_format::kiln_types::{KilnType, I4_BLOCK, I4_BLOCK_BYTES};

    use crate::Isa;

    /// Code bytes of a block.
    const CODE_BYTES: usize = I4_BLOCK / 2;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements: `I4_B64` on
    /// AVX-512 VNNI.
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            isa == Isa::Avx512Vnni
                && matches!(ty, KilnType::I4B64)
                && cols > 0
                && cols.is_multiple_of(I4_BLOCK)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, ty, cols);
            false
        }
    }

    /// Where the scale plane of a planar row of `nb` blocks starts.
    pub(crate) fn scales(nb: usize) -> usize {
        nb * CODE_BYTES
    }

    /// Blocks per row of `cols` elements, and the row's bytes (the same in both layouts).
    fn shape(cols: usize, what: &str) -> (usize, usize) {
        assert!(
            cols > 0 && cols.is_multiple_of(I4_BLOCK),
            "{what}: {cols} columns are not whole I4_B64 blocks"
        );
        let nb = cols / I4_BLOCK;
        (nb, nb * I4_BLOCK_BYTES)
    }

    /// Rewrites `src`, whole stored `I4_B64` rows of `cols` elements, into planar rows in `dst`
    /// (the same length).
    ///
    /// # Panics
    /// If `cols` is not whole blocks or the buffers are not whole rows of the same length.
    pub fn pack_rows(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "i4_b64::pack_rows");
        assert!(
            src.len() == dst.len() && src.len().is_multiple_of(row),
            "i4_b64::pack_rows: {} bytes into {} are not whole rows of {row}",
            src.len(),
            dst.len()
        );
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            let (codes, scales) = d.split_at_mut(scales(nb));
            let block = |b: usize| &s[b * I4_BLOCK_BYTES..(b + 1) * I4_BLOCK_BYTES];
            for (b, sc) in scales.chunks_exact_mut(2).enumerate() {
                sc.copy_from_slice(&block(b)[..2]);
            }
            for (g, pair) in codes.chunks_exact_mut(2 * CODE_BYTES).enumerate() {
                let (first, second) = (&block(2 * g)[2..], &block(2 * g + 1)[2..]);
                for j in 0..CODE_BYTES {
                    pair[j] = (first[j] & 0x0f) | (second[j] << 4);
                    pair[CODE_BYTES + j] = (first[j] >> 4) | (second[j] & 0xf0);
                }
            }
            if nb % 2 == 1 {
                let at = (nb - 1) * CODE_BYTES;
                codes[at..at + CODE_BYTES].copy_from_slice(&block(nb - 1)[2..]);
            }
        }
    }

    /// Rewrites one planar row `src` of `cols` elements back into its stored bytes in `dst`.
    ///
    /// # Panics
    /// As [`pack_rows`], for one row.
    pub fn unpack_row(cols: usize, src: &[u8], dst: &mut [u8]) {
        let (nb, row) = shape(cols, "i4_b64::unpack_row");
        assert!(
            src.len() == row && dst.len() == row,
            "i4_b64::unpack_row: a row of {cols} elements is {row} bytes"
        );
        let (codes, scales) = src.split_at(scales(nb));
        for (b, (blk, sc)) in dst
            .chunks_exact_mut(I4_BLOCK_BYTES)
            .zip(scales.chunks_exact(2))
            .enumerate()
        {
            blk[..2].copy_from_slice(sc);
            let (g, high) = (b / 2, b % 2 == 1);
            if b == nb - 1 && nb % 2 == 1 {
                let at = b * CODE_BYTES;
                blk[2..].copy_from_slice(&codes[at..at + CODE_BYTES]);
                continue;
            }
            let pair = &codes[g * 2 * CODE_BYTES..(g + 1) * 2 * CODE_BYTES];
            for j in 0..CODE_BYTES {
                let (lo, hi) = (pair[j], pair[CODE_BYTES + j]);
                blk[2 + j] = if high {
                    (lo >> 4) | (hi & 0xf0)
                } else {
                    (lo & 0x0f) | (hi << 4)
                };
            }
        }
    }
}

/// The kiln formats with a planar layout ([`lut4_b32`], [`lut4`], [`lut2`], [`i4_b64`]), by
/// type.
pub mod kiln {
    use kiln_format::kiln_types::KilnType;

    use crate::Isa;

    /// Whether `isa` has kernels for planar rows of `ty` with `cols` elements.
    pub fn supported(isa: Isa, ty: KilnType, cols: usize) -> bool {
        super::lut4_b32::supported(isa, ty, cols)
            || super::lut4::supported(isa, ty, cols)
            || super::lut2::supported(isa, ty, cols)
            || super::lut6::supported(isa, ty, cols)
            || super::i4_b64::supported(isa, ty, cols)
    }

    /// Rewrites whole stored rows of `ty` (no tables) into planar rows.
    ///
    /// # Panics
    /// If `ty` has no planar layout, or as the format's `pack_rows`.
    pub fn pack_rows(ty: KilnType, cols: usize, src: &[u8], dst: &mut [u8]) {
        match ty {
            KilnType::Lut4B32 { .. } => super::lut4_b32::pack_rows(cols, src, dst),
            KilnType::Lut { bits: 4, .. } => super::lut4::pack_rows(cols, src, dst),
            KilnType::Lut { bits: 2, .. } => super::lut2::pack_rows(cols, src, dst),
            KilnType::Lut { bits: 6, .. } => super::lut6::pack_rows(cols, src, dst),
            KilnType::I4B64 => super::i4_b64::pack_rows(cols, src, dst),
            _ => panic!("planar::kiln::pack_rows: no planar layout for {ty}"),
        }
    }

    /// Rewrites one planar row of `ty` back into its stored bytes.
    ///
    /// # Panics
    /// If `ty` has no planar layout, or as the format's `unpack_row`.
    pub fn unpack_row(ty: KilnType, cols: usize, src: &[u8], dst: &mut [u8]) {
        match ty {
            KilnType::Lut4B32 { .. } => super::lut4_b32::unpack_row(cols, src, dst),
            KilnType::Lut { bits: 4, .. } => super::lut4::unpack_row(cols, src, dst),
            KilnType::Lut { bits: 2, .. } => super::lut2::unpack_row(cols, src, dst),
            KilnType::Lut { bits: 6, .. } => super::lut6::unpack_row(cols, src, dst),
            KilnType::I4B64 => super::i4_b64::unpack_row(cols, src, dst),
            _ => panic!("planar::kiln::unpack_row: no planar layout for {ty}"),
        }
    }
}
