//! NEON kernels for the kiln formats (`I8_CH`, `I4_B64`, `LUT2` to `LUT8`, `LUT4_B32[_G{n}]`), row by
//! row like the ggml kernels of this architecture.
//!
//! - `I8_CH`: the codes are signed bytes already; `sdot` (or `smull` + `sadalp`) multiplies
//!   them with each activation block, the block's scale is applied per block and the row's
//!   scale once at the end.
//! - `I4_B64`: the nibbles minus 8, as signed bytes: low nibbles meet the first activation
//!   block of the 64, high nibbles the second.
//! - Lookup tables: the row's table widened to f32 and split into four byte planes (byte `k`
//!   of every entry), so `tbl` looks sixteen indices up at once in each plane (`tbl` over one
//!   register for 2 and 4 bits, four registers for 6 bits, four chained `tbx` over sixteen for
//!   8 bits) and two rounds of `zip` put the bytes back together as f32 in element order.
//!   Rows sharing a table (a tensor-wide table, the rows of a group) widen it once. Every
//!   table multiplies 16-bit activation codes: its integers (`lut_table_i16`) take the f16
//!   entries' place, the activations are dequantized to f32 once per call, and the table's
//!   scale applies to each dot product.
//! - `LUT4_B32`: `tbl` looks the nibbles up in the row's 16-byte table (the tensor's or its
//!   group's), giving 7-bit
//!   weights that are signed bytes as they stand, multiplied with each activation block as for
//!   `I8_CH`; per block the integer sum is scaled by the scale code times the activation scale
//!   and the offset code meets the activation block sum; the row's units apply at the end.

use core::arch::aarch64::*;
use std::ops::Range;

use kiln_format::ggml::f16_to_f32;
use kiln_format::kiln_types::{
    self, KilnType, CHUNK, I4_BLOCK, I4_BLOCK_BYTES, LUT4_B32_BLOCK_BYTES, LUT4_B32_ROW_HEADER,
};

use super::{dot16, ld, ldx, signed};
use crate::activation::QuantizedRow;
use crate::kiln_formats::KilnMatrix;
use crate::layout::rd_u16;
use crate::Isa;

/// Whether `isa` has a kernel for `ty` here (every kiln format, at both NEON levels).
pub(crate) fn has_kernel(isa: Isa, ty: KilnType) -> bool {
    matches!(isa, Isa::Neon | Isa::NeonDotprod)
        && matches!(
            ty,
            KilnType::I8Ch
                | KilnType::I4B64
                | KilnType::Lut4B32 { .. }
                | KilnType::Lut {
                    bits: 2 | 4 | 6 | 8,
                    ..
                }
        )
}

/// Byte planes of one widened table: plane `k` (at `k * PLANE`) holds byte `k` of every f32
/// entry; planes are at least 16 bytes so a 4-entry plane is one whole register.
struct Planes {
    bytes: [u8; 4 * 256],
    plane: usize,
}

impl Planes {
    /// The planes of a table of `n` f32 entries (`n` ≤ 256).
    fn of(entries: impl Iterator<Item = f32>, n: usize) -> Planes {
        let plane = n.max(16);
        let mut bytes = [0u8; 4 * 256];
        for (e, v) in entries.take(n).enumerate() {
            for (k, &b) in v.to_le_bytes().iter().enumerate() {
                bytes[k * plane + e] = b;
            }
        }
        Planes { bytes, plane }
    }
}

thread_local! {
    /// The I16 activation rows of a call dequantized to f32.
    static F32_ROWS: std::cell::RefCell<Vec<QuantizedRow>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The lookup tables against I16 activations: each table's integers
/// (`lut_table_i16`) as f32 planes, the activations dequantized once, the table's scale on
/// each result.
///
/// # Safety
/// As [`dot_block`], `w` a lookup-table tensor.
unsafe fn lut_i16_block(
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    let KilnType::Lut { bits, .. } = w.ty else {
        unreachable!("lookup-table tensors only")
    };
    let n = w.ty.table_len();
    F32_ROWS.with(|cell| {
        let mut xs = cell.borrow_mut();
        if xs.len() < xq.len() {
            xs.resize_with(xq.len(), QuantizedRow::new);
        }
        for (x, f) in xq.iter().zip(xs.iter_mut()) {
            x.dequantize_to_f32(f);
        }
        let mut planes: Option<(*const u8, f32, Planes)> = None;
        for (k, r) in rows.enumerate() {
            let table = w.table(r);
            if planes.as_ref().is_none_or(|(p, _, _)| *p != table.as_ptr()) {
                let mut u = [0i16; 256];
                let s = crate::kiln_formats::lut_table_i16(table, &mut u);
                let pl = Planes::of(u.iter().map(|&v| f32::from(v)), n);
                planes = Some((table.as_ptr(), s, pl));
            }
            let (_, s, pl) = planes.as_ref().expect("set above");
            let row = w.row(r);
            for (t, x) in xs[..xq.len()].iter().enumerate() {
                // SAFETY: `row` is one whole row of `w.cols` indices, `x` holds `w.cols` f32
                // values and `pl` is the row's table.
                out[t * out_stride + k] = s * unsafe {
                    match bits {
                        2 => lut::<2>(row, pl, x),
                        4 => lut::<4>(row, pl, x),
                        6 => lut::<6>(row, pl, x),
                        _ => lut::<8>(row, pl, x),
                    }
                };
            }
        }
    });
}

/// Row by row, activation row by activation row.
///
/// # Safety
/// The CPU has `isa` (NEON, and the dot-product extension for [`Isa::NeonDotprod`]);
/// `has_kernel(isa, w.ty)`; every `xq[t]` is in the activation format of `w.ty` and `w.cols`
/// long; `rows` lies within `w`; `out` holds `(xq.len() - 1) * out_stride + rows.len()`
/// values.
pub(crate) unsafe fn dot_block(
    isa: Isa,
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    let dotprod = isa == Isa::NeonDotprod;
    if let KilnType::Lut { .. } = w.ty {
        // SAFETY: the caller's guarantees.
        return unsafe { lut_i16_block(w, rows, xq, out, out_stride) };
    }
    for (k, r) in rows.enumerate() {
        let row = w.row(r);
        for (t, x) in xq.iter().enumerate() {
            // SAFETY: `row` is one whole row for `x` (the caller's guarantee), and `dotprod`
            // is set only when the CPU has the extension.
            out[t * out_stride + k] = unsafe {
                match (w.ty, dotprod) {
                    (KilnType::I8Ch, true) => i8ch::<true>(row, scale(w, r), x),
                    (KilnType::I8Ch, false) => i8ch::<false>(row, scale(w, r), x),
                    (KilnType::Lut4B32 { .. }, true) => {
                        lut4b32::<true>(row, w.lut4_b32_table(r), x)
                    }
                    (KilnType::Lut4B32 { .. }, false) => {
                        lut4b32::<false>(row, w.lut4_b32_table(r), x)
                    }
                    (_, true) => i4b64::<true>(row, x),
                    (_, false) => i4b64::<false>(row, x),
                }
            };
        }
    }
}

/// The scale of row `r` of the `I8_CH` tensor `w` (stored after every row's codes).
fn scale(w: &KilnMatrix, r: usize) -> f32 {
    kiln_types::i8_ch_scale(w.data, w.rows, w.cols, r)
}

/// # Safety
/// `row` holds the `x.len` codes of one `I8_CH` row whose scale is `s`, `x` in Q8_1; if
/// `DOT`, the CPU has the dot-product extension.
#[target_feature(enable = "neon")]
unsafe fn i8ch<const DOT: bool>(row: &[u8], s: f32, x: &QuantizedRow) -> f32 {
    let codes = row.as_ptr();
    let mut acc = [vdupq_n_f32(0.0); 2];
    for b in 0..x.len / CHUNK {
        // SAFETY: block b's 32 codes exist in the row and in the activations.
        unsafe {
            let wp = codes.add(b * CHUNK);
            let xc = x.codes.as_ptr().add(b * CHUNK);
            let w0 = vreinterpretq_s8_u8(ld(wp));
            let w1 = vreinterpretq_s8_u8(ld(wp.add(16)));
            let i = dot16::<DOT>(
                dot16::<DOT>(vdupq_n_s32(0), w0, ldx(xc)),
                w1,
                ldx(xc.add(16)),
            );
            let a = &mut acc[b % 2];
            *a = vfmaq_n_f32(*a, vcvtq_f32_s32(i), x.scales[b]);
        }
    }
    s * vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// # Safety
/// `row` is one `I4_B64` row of `x.len` elements, `x` in Q8_1; if `DOT`, the CPU has the
/// dot-product extension.
#[target_feature(enable = "neon")]
unsafe fn i4b64<const DOT: bool>(row: &[u8], x: &QuantizedRow) -> f32 {
    let p = row.as_ptr();
    let mut acc = [vdupq_n_f32(0.0); 2];
    for blk in 0..x.len / I4_BLOCK {
        let a = 2 * blk;
        // SAFETY: block blk (2-byte scale, 32 bytes of nibbles) lies in the row, and
        // activation blocks a and a + 1 in the activations.
        unsafe {
            let bp = p.add(blk * I4_BLOCK_BYTES);
            let d = f16_to_f32(rd_u16(bp));
            let (q0, q1) = (ld(bp.add(2)), ld(bp.add(18)));
            let low = vdupq_n_u8(0x0f);
            let xa = x.codes.as_ptr().add(a * CHUNK);
            let xb = xa.add(CHUNK);
            let ia = dot16::<DOT>(
                dot16::<DOT>(vdupq_n_s32(0), signed(vandq_u8(q0, low), 8), ldx(xa)),
                signed(vandq_u8(q1, low), 8),
                ldx(xa.add(16)),
            );
            let ib = dot16::<DOT>(
                dot16::<DOT>(vdupq_n_s32(0), signed(vshrq_n_u8::<4>(q0), 8), ldx(xb)),
                signed(vshrq_n_u8::<4>(q1), 8),
                ldx(xb.add(16)),
            );
            acc[0] = vfmaq_n_f32(acc[0], vcvtq_f32_s32(ia), d * x.scales[a]);
            acc[1] = vfmaq_n_f32(acc[1], vcvtq_f32_s32(ib), d * x.scales[a + 1]);
        }
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// # Safety
/// `row` is one `LUT4_B32` row of `x.len` elements, `table` its 16-byte table (entries
/// at most 127), `x` in Q8_1; if `DOT`, the CPU has the dot-product extension.
#[target_feature(enable = "neon")]
unsafe fn lut4b32<const DOT: bool>(row: &[u8], table: &[u8; 16], x: &QuantizedRow) -> f32 {
    let s = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
    let m = f32::from_le_bytes([row[4], row[5], row[6], row[7]]);
    let p = row[LUT4_B32_ROW_HEADER..].as_ptr();
    // SAFETY: the table is 16 bytes (the caller's guarantee).
    let t = unsafe { ld(table.as_ptr()) };
    let low = vdupq_n_u8(0x0f);
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut offs = [0.0f32; 2];
    for b in 0..x.len / CHUNK {
        // SAFETY: block b (scale and offset codes, 16 bytes of nibbles) lies in the row, and
        // activation block b in the activations.
        unsafe {
            let bp = p.add(b * LUT4_B32_BLOCK_BYTES);
            let (a, o) = (*bp as i8, *bp.add(1) as i8);
            let q = ld(bp.add(2));
            // Entries are at most 127: as signed bytes they are the same numbers.
            let w0 = vreinterpretq_s8_u8(vqtbl1q_u8(t, vandq_u8(q, low)));
            let w1 = vreinterpretq_s8_u8(vqtbl1q_u8(t, vshrq_n_u8::<4>(q)));
            let xc = x.codes.as_ptr().add(b * CHUNK);
            let i = dot16::<DOT>(
                dot16::<DOT>(vdupq_n_s32(0), w0, ldx(xc)),
                w1,
                ldx(xc.add(16)),
            );
            let k = b % 2;
            acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(i), f32::from(a) * x.scales[b]);
            offs[k] += f32::from(o) * x.sums[b];
        }
    }
    s * vaddvq_f32(vaddq_f32(acc[0], acc[1])) + m * (offs[0] + offs[1])
}

/// Four consecutive 16-byte registers at `p`.
///
/// # Safety
/// `p..p + 64` is readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn ld4(p: *const u8) -> uint8x16x4_t {
    // SAFETY: 64 readable bytes (the caller's guarantee).
    unsafe { uint8x16x4_t(ld(p), ld(p.add(16)), ld(p.add(32)), ld(p.add(48))) }
}

/// Bytes `idx` of one plane of `2^BITS` entries at `p` (every index below `2^BITS`).
///
/// # Safety
/// The plane (at least 16 bytes) is readable at `p`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn plane_lookup<const BITS: u8>(p: *const u8, idx: uint8x16_t) -> uint8x16_t {
    // SAFETY: the plane's bytes (the caller's guarantee).
    unsafe {
        match BITS {
            2 | 4 => vqtbl1q_u8(ld(p), idx),
            6 => vqtbl4q_u8(ld4(p), idx),
            _ => {
                // Out-of-range indices leave `tbx` lanes as they are: four 64-entry windows.
                let mut v = vqtbl4q_u8(ld4(p), idx);
                for k in 1..4 {
                    let i = vsubq_u8(idx, vdupq_n_u8(64 * k as u8));
                    v = vqtbx4q_u8(v, ld4(p.add(64 * k)), i);
                }
                v
            }
        }
    }
}

/// The f32 entries of 16 indices (elements in lane order), from the table's byte planes.
///
/// # Safety
/// `pl` holds a table of `2^BITS` entries and every index is below `2^BITS`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn lookup<const BITS: u8>(pl: &Planes, idx: uint8x16_t) -> [float32x4_t; 4] {
    let p = pl.bytes.as_ptr();
    // SAFETY: four planes of `pl.plane` bytes each.
    let [b0, b1, b2, b3] =
        unsafe { [0, 1, 2, 3].map(|k| plane_lookup::<BITS>(p.add(k * pl.plane), idx)) };
    // Bytes 0 and 1, and 2 and 3, into 16-bit halves; the halves into little-endian words.
    let lo01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1));
    let hi01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
    let lo23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3));
    let hi23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
    [
        vreinterpretq_f32_u16(vzip1q_u16(lo01, lo23)),
        vreinterpretq_f32_u16(vzip2q_u16(lo01, lo23)),
        vreinterpretq_f32_u16(vzip1q_u16(hi01, hi23)),
        vreinterpretq_f32_u16(vzip2q_u16(hi01, hi23)),
    ]
}

/// The two bits of elements `j + 8k` kept at bits `2k` of byte `j` (the 2-bit layout of 8
/// bytes at `p`): elements 0..16, then 16..32.
///
/// # Safety
/// `p..p + 8` is readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn two_bits(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    const SHIFT_LO: [i8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, -2, -2, -2, -2, -2, -2, -2, -2];
    const SHIFT_HI: [i8; 16] = [
        -4, -4, -4, -4, -4, -4, -4, -4, -6, -6, -6, -6, -6, -6, -6, -6,
    ];
    // SAFETY: 8 readable bytes (the caller's guarantee); the shift tables are 16 bytes.
    unsafe {
        let h = vld1_u8(p);
        let hh = vcombine_u8(h, h);
        let three = vdupq_n_u8(3);
        (
            vandq_u8(vshlq_u8(hh, vld1q_s8(SHIFT_LO.as_ptr())), three),
            vandq_u8(vshlq_u8(hh, vld1q_s8(SHIFT_HI.as_ptr())), three),
        )
    }
}

/// The indices of one 32-element chunk (`4 * BITS` bytes at `p`): elements 0..16, 16..32.
///
/// # Safety
/// `p..p + 4 * BITS` is readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn indices<const BITS: u8>(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the chunk's bytes (the caller's guarantee).
    unsafe {
        match BITS {
            8 => (ld(p), ld(p.add(16))),
            2 => two_bits(p),
            _ => {
                let b = ld(p);
                let lo = vandq_u8(b, vdupq_n_u8(0x0f));
                let hi = vshrq_n_u8::<4>(b);
                if BITS == 4 {
                    (lo, hi)
                } else {
                    let (t0, t1) = two_bits(p.add(16));
                    (
                        vorrq_u8(lo, vshlq_n_u8::<4>(t0)),
                        vorrq_u8(hi, vshlq_n_u8::<4>(t1)),
                    )
                }
            }
        }
    }
}

/// # Safety
/// `row` is one `BITS`-bit lookup-table row of `x.len` elements, `pl` its table, `x` in F32.
#[target_feature(enable = "neon")]
unsafe fn lut<const BITS: u8>(row: &[u8], pl: &Planes, x: &QuantizedRow) -> f32 {
    let p = row.as_ptr();
    let chunk_bytes = 4 * BITS as usize;
    let mut acc = [vdupq_n_f32(0.0); 4];
    for c in 0..x.len / CHUNK {
        // SAFETY: chunk c of the row and values c * 32 .. c * 32 + 32 of the activations;
        // unpacked indices are below 2^BITS.
        unsafe {
            let (i0, i1) = indices::<BITS>(p.add(c * chunk_bytes));
            let xs = x.values.as_ptr().add(c * CHUNK);
            for (h, idx) in [i0, i1].into_iter().enumerate() {
                let wv = lookup::<BITS>(pl, idx);
                for (k, wk) in wv.into_iter().enumerate() {
                    acc[k] = vfmaq_f32(acc[k], wk, vld1q_f32(xs.add(16 * h + 4 * k)));
                }
            }
        }
    }
    vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ))
}
