//! aarch64 kernels: NEON, with the dot-product extension (`sdot`) or without it
//! (`smull` + `sadalp`).
//!
//! Unlike on x86, both multiplies here are signed by signed, so weight offsets are applied to
//! the codes themselves (Q4_0's nibbles minus 8, Q6_K's six bits minus 32, …) and only stored
//! minimums need the activation sums; the IQ4 types' nibbles become their signed table levels
//! through one `tbl`. Each kernel is written once, generic over `DOT`.
//!
//! `vdotq_s32` is not yet stable in Rust, so `sdot` is emitted with inline assembly (enabling
//! the extension for the assembler only; it runs only where the CPU reports `dotprod`).

use core::arch::aarch64::*;
use core::arch::asm;

pub(crate) mod kiln_formats;

use kiln_format::ggml::{bf16_to_f32, f16_to_f32, GgmlType, IQ4_NL_VALUES};

use crate::activation::QuantizedRow;
use crate::layout::*;

/// Row by row, activation row by activation row.
///
/// # Safety
/// The CPU has NEON, and the dot-product extension if `dotprod`; `w` holds `n_rows` rows of
/// `row_bytes` bytes, each one row of `xq[t].len()` elements of `weights`; every `xq[t]` is in
/// `activation_format(weights)`; `out` has `(xq.len() - 1) * out_stride + n_rows` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_block(
    dotprod: bool,
    weights: GgmlType,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    for r in 0..n_rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (t, x) in xq.iter().enumerate() {
            // SAFETY: `row` is one whole row for `x` (the caller's guarantee), and `dotprod`
            // is set only when the CPU has the extension.
            out[t * out_stride + r] = unsafe {
                if dotprod {
                    row_dot::<true>(weights, row, x)
                } else {
                    row_dot::<false>(weights, row, x)
                }
            };
        }
    }
}

/// # Safety
/// `row` is one row of `x.len()` elements of `weights`, `x` in its activation format; if
/// `DOT`, the CPU has the dot-product extension.
#[target_feature(enable = "neon")]
unsafe fn row_dot<const DOT: bool>(weights: GgmlType, row: &[u8], x: &QuantizedRow) -> f32 {
    let p = row.as_ptr();
    // SAFETY: forwarded from the caller.
    unsafe {
        match (weights, x.is_refined()) {
            (GgmlType::Q4_0, false) => legacy::<Q4_0_BYTES, 0, DOT, false>(p, x),
            (GgmlType::Q4_1, false) => legacy::<Q4_1_BYTES, 1, DOT, false>(p, x),
            (GgmlType::Q5_0, false) => legacy::<Q5_0_BYTES, 2, DOT, false>(p, x),
            (GgmlType::Q5_1, false) => legacy::<Q5_1_BYTES, 3, DOT, false>(p, x),
            (GgmlType::Q8_0, false) => legacy::<Q8_0_BYTES, 4, DOT, false>(p, x),
            (GgmlType::IQ4_NL, false) => legacy::<IQ4_NL_BYTES, 5, DOT, false>(p, x),
            (GgmlType::Q4_0, true) => legacy::<Q4_0_BYTES, 0, DOT, true>(p, x),
            (GgmlType::Q4_1, true) => legacy::<Q4_1_BYTES, 1, DOT, true>(p, x),
            (GgmlType::Q5_0, true) => legacy::<Q5_0_BYTES, 2, DOT, true>(p, x),
            (GgmlType::Q5_1, true) => legacy::<Q5_1_BYTES, 3, DOT, true>(p, x),
            (GgmlType::Q8_0, true) => legacy::<Q8_0_BYTES, 4, DOT, true>(p, x),
            (GgmlType::IQ4_NL, true) => legacy::<IQ4_NL_BYTES, 5, DOT, true>(p, x),
            (weights, _) => match weights {
                GgmlType::IQ4_XS => iq4_xs::<DOT>(p, x),
                GgmlType::Q2_K => q2_k::<DOT>(p, x),
                GgmlType::Q3_K => q3_k::<DOT>(p, x),
                GgmlType::Q4_K => q45_k::<false, DOT>(p, x),
                GgmlType::Q5_K => q45_k::<true, DOT>(p, x),
                GgmlType::Q6_K => q6_k::<DOT>(p, x),
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => float(weights, row, x),
                _ => crate::reference::fold(weights, row, x).0 as f32,
            },
        }
    }
}

/// `acc + ` the sums of four products of each group of four lanes of `a * b`.
#[inline(always)]
fn dot16<const DOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if DOT {
        let mut acc = acc;
        // SAFETY: DOT kernels run only on CPUs with the dot-product extension (see
        // dot_block); sdot touches only the three vector registers named.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    } else {
        // SAFETY: NEON is part of the aarch64 baseline every kiln target enables. Products of
        // an int8 code and an activation (|x| ≤ 127) fit in int16.
        unsafe {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// Loads 16 bytes.
///
/// # Safety
/// `p..p + 16` is readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn ld(p: *const u8) -> uint8x16_t {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe { vld1q_u8(p) }
}

/// Loads 16 activation codes.
///
/// # Safety
/// `p..p + 16` is readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn ldx(p: *const i8) -> int8x16_t {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe { vld1q_s8(p) }
}

/// Byte `j` of the result is `value` where bit `j` of `bits` is set, else 0 (j < 16).
#[target_feature(enable = "neon")]
#[inline]
fn bits_to_bytes(bits: u32, value: u8) -> uint8x16_t {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let spread = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
    // SAFETY: BIT is 16 readable bytes.
    let bit = unsafe { vld1q_u8(BIT.as_ptr()) };
    vandq_u8(vtstq_u8(spread, bit), vdupq_n_u8(value))
}

/// `v >> shift` on every byte, for a shift known only at run time.
#[target_feature(enable = "neon")]
#[inline]
fn shr(v: uint8x16_t, shift: usize) -> uint8x16_t {
    vshlq_u8(v, vdupq_n_s8(-(shift as i8)))
}

/// The IQ4 levels of 16 nibbles (values 0..16).
#[target_feature(enable = "neon")]
#[inline]
fn iq4_levels(nibbles: uint8x16_t) -> int8x16_t {
    // SAFETY: IQ4_NL_VALUES is 16 readable bytes.
    let table = unsafe { vld1q_s8(IQ4_NL_VALUES.as_ptr()) };
    vqtbl1q_s8(table, nibbles)
}

/// Codes minus `off`, as signed bytes.
#[target_feature(enable = "neon")]
#[inline]
fn signed(v: uint8x16_t, off: u8) -> int8x16_t {
    vreinterpretq_s8_u8(vsubq_u8(v, vdupq_n_u8(off)))
}

// ---------------------------------------------------------------------------------------------
// 32-element formats. F: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0, 5 IQ4_NL.

/// `REFINED`: `x` is refined, its codes `256·high + low`; each block's integer sum over the
/// high parts is shifted left by 8 and the low parts' products added onto it, so the scales
/// apply once. Exact: a lane sums 8 products of magnitude ≤ 128 · 127 per block, so the
/// shifted sum and the low parts stay below 2^26.
///
/// # Safety
/// As [`row_dot`].
#[target_feature(enable = "neon")]
unsafe fn legacy<const BYTES: usize, const F: u8, const DOT: bool, const REFINED: bool>(
    p: *const u8,
    x: &QuantizedRow,
) -> f32 {
    let nb = x.len / QK;
    let mut acc = vdupq_n_f32(0.0);
    let mut mins = 0.0f32;
    for b in 0..nb {
        // SAFETY: block b exists in the row and in the activations.
        unsafe {
            let blk = p.add(b * BYTES);
            let xc = x.codes.as_ptr().add(b * QK);
            let (x0, x1) = (ldx(xc), ldx(xc.add(16)));
            let d = f16_to_f32(rd_u16(blk));
            let (w0, w1) = if F == 4 {
                (
                    vreinterpretq_s8_u8(ld(blk.add(2))),
                    vreinterpretq_s8_u8(ld(blk.add(18))),
                )
            } else if F == 5 {
                let qs = ld(blk.add(2));
                (
                    iq4_levels(vandq_u8(qs, vdupq_n_u8(0x0f))),
                    iq4_levels(vshrq_n_u8::<4>(qs)),
                )
            } else {
                let qs = ld(blk.add([2, 4, 6, 8][F as usize]));
                let mut lo = vandq_u8(qs, vdupq_n_u8(0x0f));
                let mut hi = vshrq_n_u8::<4>(qs);
                if F == 2 || F == 3 {
                    let qh = rd_u32(blk.add(if F == 2 { 2 } else { 4 }));
                    lo = vorrq_u8(lo, bits_to_bytes(qh, 16));
                    hi = vorrq_u8(hi, bits_to_bytes(qh >> 16, 16));
                }
                let off = [8, 0, 16, 0][F as usize];
                (signed(lo, off), signed(hi, off))
            };
            let mut i = dot16::<DOT>(dot16::<DOT>(vdupq_n_s32(0), w0, x0), w1, x1);
            if REFINED {
                let yc = x.low.as_ptr().add(b * QK);
                let (y0, y1) = (ldx(yc), ldx(yc.add(16)));
                i = dot16::<DOT>(dot16::<DOT>(vshlq_n_s32::<8>(i), w0, y0), w1, y1);
            }
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(i), d * x.scales[b]);
            if F == 1 || F == 3 {
                mins += f16_to_f32(rd_u16(blk.add(2))) * x.sums[b];
            }
        }
    }
    vaddvq_f32(acc) + mins
}

// ---------------------------------------------------------------------------------------------
// K-quants: per 16 elements, an integer dot product scaled by the sub-block's integer scale;
// one float multiply per super-block.

/// `sum_s m[s] * (activation sum of group s)` for per-16 multipliers `m`.
fn group_dot(m: &[i32; 16], sums: &[i16]) -> i32 {
    m.iter().zip(sums).map(|(&a, &b)| a * i32::from(b)).sum()
}

/// # Safety
/// As [`row_dot`], for Q4_K (`FIVE` false) or Q5_K.
#[target_feature(enable = "neon")]
unsafe fn q45_k<const FIVE: bool, const DOT: bool>(p: *const u8, x: &QuantizedRow) -> f32 {
    let bytes = if FIVE { Q5_K_BYTES } else { Q4_K_BYTES };
    let qs_at = if FIVE { Q5_K_QS } else { Q4_K_QS };
    let mut acc = vdupq_n_f32(0.0);
    let mut mins = 0.0f32;
    for sb in 0..x.len / QK_K {
        // SAFETY: super-block sb exists in the row and in the activations.
        unsafe {
            let blk = p.add(sb * bytes);
            let xc = x.codes.as_ptr().add(sb * QK_K);
            let (sc, mn) = k4_scales_mins(
                rd_u32(blk.add(Q4_K_SCALES)),
                rd_u32(blk.add(Q4_K_SCALES + 4)),
                rd_u32(blk.add(Q4_K_SCALES + 8)),
            );
            let mut isum = vdupq_n_s32(0);
            for g in 0..4 {
                let q = [
                    ld(blk.add(qs_at + 32 * g)),
                    ld(blk.add(qs_at + 32 * g + 16)),
                ];
                for h in 0..2 {
                    let j = 2 * g + h;
                    let mut d = vdupq_n_s32(0);
                    for (half, &qv) in q.iter().enumerate() {
                        let mut u = if h == 0 {
                            vandq_u8(qv, vdupq_n_u8(0x0f))
                        } else {
                            vshrq_n_u8::<4>(qv)
                        };
                        if FIVE {
                            let qh = ld(blk.add(Q5_K_QH + 16 * half));
                            let bit = vtstq_u8(qh, vdupq_n_u8(1 << j));
                            u = vorrq_u8(u, vandq_u8(bit, vdupq_n_u8(16)));
                        }
                        d = dot16::<DOT>(
                            d,
                            vreinterpretq_s8_u8(u),
                            ldx(xc.add(32 * j + 16 * half)),
                        );
                    }
                    isum = vmlaq_n_s32(isum, d, ((sc >> (8 * j)) & 0xff) as i32);
                }
            }
            let dx = x.scales[sb];
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), f16_to_f32(rd_u16(blk)) * dx);
            let mut m = [0i32; 16];
            for (s, v) in m.iter_mut().enumerate() {
                *v = ((mn >> (8 * (s / 2))) & 0xff) as i32;
            }
            let gs = &x.group_sums[sb * 16..sb * 16 + 16];
            mins -= f16_to_f32(rd_u16(blk.add(2))) * dx * group_dot(&m, gs) as f32;
        }
    }
    vaddvq_f32(acc) + mins
}

/// # Safety
/// As [`row_dot`], for IQ4_XS.
#[target_feature(enable = "neon")]
unsafe fn iq4_xs<const DOT: bool>(p: *const u8, x: &QuantizedRow) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for sb in 0..x.len / QK_K {
        // SAFETY: super-block sb exists in the row and in the activations.
        unsafe {
            let blk = p.add(sb * IQ4_XS_BYTES);
            let xc = x.codes.as_ptr().add(sb * QK_K);
            let scales = iq4xs_scales(
                rd_u16(blk.add(IQ4_XS_SCALES_H)),
                rd_u32(blk.add(IQ4_XS_SCALES_L)),
            );
            let mut isum = vdupq_n_s32(0);
            for ib in 0..8 {
                let q = ld(blk.add(IQ4_XS_QS + 16 * ib));
                let lo = iq4_levels(vandq_u8(q, vdupq_n_u8(0x0f)));
                let hi = iq4_levels(vshrq_n_u8::<4>(q));
                let d = dot16::<DOT>(vdupq_n_s32(0), lo, ldx(xc.add(32 * ib)));
                let d = dot16::<DOT>(d, hi, ldx(xc.add(32 * ib + 16)));
                isum = vmlaq_n_s32(isum, d, ((scales >> (8 * ib)) & 0xff) as i32 - 32);
            }
            let d = f16_to_f32(rd_u16(blk));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * x.scales[sb]);
        }
    }
    vaddvq_f32(acc)
}

/// # Safety
/// As [`row_dot`], for Q6_K.
#[target_feature(enable = "neon")]
unsafe fn q6_k<const DOT: bool>(p: *const u8, x: &QuantizedRow) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for sb in 0..x.len / QK_K {
        // SAFETY: super-block sb exists in the row and in the activations.
        unsafe {
            let blk = p.add(sb * Q6_K_BYTES);
            let xc = x.codes.as_ptr().add(sb * QK_K);
            let mut isum = vdupq_n_s32(0);
            for n in 0..2 {
                for k in 0..4 {
                    for half in 0..2 {
                        let ql = ld(blk.add(64 * n + 32 * (k % 2) + 16 * half));
                        let lo = vandq_u8(shr(ql, 4 * (k / 2)), vdupq_n_u8(0x0f));
                        let qh = ld(blk.add(Q6_K_QH + 32 * n + 16 * half));
                        let hi = vshlq_n_u8::<4>(vandq_u8(shr(qh, 2 * k), vdupq_n_u8(3)));
                        let u = signed(vorrq_u8(lo, hi), 32);
                        let e = 128 * n + 32 * k + 16 * half;
                        let d = dot16::<DOT>(vdupq_n_s32(0), u, ldx(xc.add(e)));
                        let sc = *blk.add(Q6_K_SCALES + e / 16) as i8;
                        isum = vmlaq_n_s32(isum, d, i32::from(sc));
                    }
                }
            }
            let d = f16_to_f32(rd_u16(blk.add(Q6_K_D)));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * x.scales[sb]);
        }
    }
    vaddvq_f32(acc)
}

/// # Safety
/// As [`row_dot`], for Q3_K.
#[target_feature(enable = "neon")]
unsafe fn q3_k<const DOT: bool>(p: *const u8, x: &QuantizedRow) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for sb in 0..x.len / QK_K {
        // SAFETY: super-block sb exists in the row and in the activations.
        unsafe {
            let blk = p.add(sb * Q3_K_BYTES);
            let xc = x.codes.as_ptr().add(sb * QK_K);
            let (lo, hi) = q3k_scales(
                rd_u64(blk.add(Q3_K_SCALES)),
                rd_u32(blk.add(Q3_K_SCALES + 8)),
            );
            let scales = |s: usize| {
                let v = if s < 8 {
                    lo >> (8 * s)
                } else {
                    hi >> (8 * (s - 8))
                };
                (v & 0xff) as i32 - 32
            };
            let mut isum = vdupq_n_s32(0);
            for n in 0..2 {
                for j in 0..4 {
                    for half in 0..2 {
                        let q = ld(blk.add(Q3_K_QS + 32 * n + 16 * half));
                        let low = vandq_u8(shr(q, 2 * j), vdupq_n_u8(3));
                        let hm = ld(blk.add(16 * half));
                        let high =
                            vandq_u8(vtstq_u8(hm, vdupq_n_u8(1 << (4 * n + j))), vdupq_n_u8(4));
                        let u = signed(vorrq_u8(low, high), 4);
                        let e = 128 * n + 32 * j + 16 * half;
                        let d = dot16::<DOT>(vdupq_n_s32(0), u, ldx(xc.add(e)));
                        isum = vmlaq_n_s32(isum, d, scales(e / 16));
                    }
                }
            }
            let d = f16_to_f32(rd_u16(blk.add(Q3_K_D)));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * x.scales[sb]);
        }
    }
    vaddvq_f32(acc)
}

/// # Safety
/// As [`row_dot`], for Q2_K.
#[target_feature(enable = "neon")]
unsafe fn q2_k<const DOT: bool>(p: *const u8, x: &QuantizedRow) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    let mut mins = 0.0f32;
    for sb in 0..x.len / QK_K {
        // SAFETY: super-block sb exists in the row and in the activations.
        unsafe {
            let blk = p.add(sb * Q2_K_BYTES);
            let xc = x.codes.as_ptr().add(sb * QK_K);
            let mut isum = vdupq_n_s32(0);
            for n in 0..2 {
                for j in 0..4 {
                    for half in 0..2 {
                        let q = ld(blk.add(Q2_K_QS + 32 * n + 16 * half));
                        let u = vreinterpretq_s8_u8(vandq_u8(shr(q, 2 * j), vdupq_n_u8(3)));
                        let e = 128 * n + 32 * j + 16 * half;
                        let d = dot16::<DOT>(vdupq_n_s32(0), u, ldx(xc.add(e)));
                        isum = vmlaq_n_s32(isum, d, i32::from(*blk.add(e / 16) & 0x0f));
                    }
                }
            }
            let dx = x.scales[sb];
            let d = f16_to_f32(rd_u16(blk.add(Q2_K_D)));
            let dmin = f16_to_f32(rd_u16(blk.add(Q2_K_D + 2)));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * dx);
            let mut m = [0i32; 16];
            for (s, v) in m.iter_mut().enumerate() {
                *v = i32::from(*blk.add(s) >> 4);
            }
            let gs = &x.group_sums[sb * 16..sb * 16 + 16];
            mins -= dmin * dx * group_dot(&m, gs) as f32;
        }
    }
    vaddvq_f32(acc) + mins
}

// ---------------------------------------------------------------------------------------------
// Float formats

/// Four f16 values to f32, exactly: moved into f32 position and multiplied by 2^112 to rebias
/// the exponent (which also normalises subnormals); infinities and NaNs get an all-ones
/// exponent instead.
#[target_feature(enable = "neon")]
#[inline]
fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
    let h = vmovl_u16(h);
    let magnitude = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
    let scaled = vmulq_f32(
        vreinterpretq_f32_u32(magnitude),
        vdupq_n_f32(f32::from_bits(0x7780_0000)),
    );
    let is_special = vceqq_u32(vandq_u32(h, vdupq_n_u32(0x7c00)), vdupq_n_u32(0x7c00));
    let special = vorrq_u32(magnitude, vdupq_n_u32(0x7f80_0000));
    let bits = vbslq_u32(is_special, special, vreinterpretq_u32_f32(scaled));
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    vreinterpretq_f32_u32(vorrq_u32(bits, sign))
}

/// # Safety
/// As [`row_dot`], for F32, F16 or BF16.
#[target_feature(enable = "neon")]
unsafe fn float(weights: GgmlType, row: &[u8], x: &QuantizedRow) -> f32 {
    let n = x.len;
    let p = row.as_ptr();
    let xs = x.values.as_ptr();
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: elements i..i + 4 are within the row and the activations.
        unsafe {
            let wv = match weights {
                GgmlType::F32 => vld1q_f32(p.add(4 * i).cast()),
                GgmlType::F16 => f16x4_to_f32(vld1_u16(p.add(2 * i).cast())),
                _ => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.add(2 * i).cast()))),
            };
            let a = &mut acc[(i / 4) % 2];
            *a = vfmaq_f32(*a, wv, vld1q_f32(xs.add(i)));
        }
        i += 4;
    }
    let mut tail = 0.0f32;
    for e in i..n {
        let v = match weights {
            GgmlType::F32 => {
                f32::from_le_bytes([row[4 * e], row[4 * e + 1], row[4 * e + 2], row[4 * e + 3]])
            }
            GgmlType::F16 => f16_to_f32(u16::from_le_bytes([row[2 * e], row[2 * e + 1]])),
            _ => bf16_to_f32(u16::from_le_bytes([row[2 * e], row[2 * e + 1]])),
        };
        tail += v * x.values[e];
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1])) + tail
}
