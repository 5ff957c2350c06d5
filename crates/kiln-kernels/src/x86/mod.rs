//! x86-64 kernels: AVX2 (`vpmaddubsw`) and AVX-512 VNNI (`vpdpbusd`, `vpdpwssd`).

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod dequant_out;
pub(crate) mod kiln_formats;
pub(crate) mod kquant_dequant;

/// Rows per tile: four weight rows are read side by side, so one pass keeps four streams of
/// weights in flight and every activation block loaded is used four times.
pub(crate) const TILE_ROWS: usize = 4;

/// How far ahead of a weight being read to prefetch: at the same place in the next tile's
/// rows, or 8 KiB when tiles are smaller than that.
///
/// Hardware prefetchers lose track of the interleaved row streams of a tile; one tile ahead is
/// both beyond what is being read and far enough to cover memory latency, so one thread
/// streams weights faster than a plain sequential read loop does. (Measured: 1-4 KiB ahead
/// left the kernels waiting on memory.)
#[inline(always)]
pub(crate) fn prefetch_distance(row_bytes: usize) -> usize {
    (TILE_ROWS * row_bytes).max(8192)
}

/// How many [`prefetch_distance`]s ahead the second, L2 prefetch of a weight stream reaches.
///
/// A `T0` prefetch holds one of the core's few L1 fill buffers until its line arrives, so
/// those alone keep too few lines in flight to stream from memory; a `T2` prefetch further on
/// has the line on its way to L2 by the time the `T0` one asks for it. Measured (`kilnbench
/// --runtime --mb 128 --k 1536 --tokens 1`, ns per weight, interleaved runs): `LUT8` 0.089 →
/// 0.072 and `Q8_0` 0.087 → 0.082 at four distances; two and eight read slower than four.
pub(crate) const FAR_PREFETCH: usize = 4;

/// Prefetches the weight bytes `ahead` past `p` into L1 and those [`FAR_PREFETCH`] times as
/// far into L2: the line a stream reads soon, and the one it reads later.
#[inline(always)]
pub(crate) fn prefetch_weights(p: *const u8, ahead: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T2};
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast());
        _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(FAR_PREFETCH * ahead).cast());
    }
}

/// [`prefetch_weights`], and the same line into L2 again two and three times as far on, for
/// the one stream whose kernel does the least work per byte: `I8_CH` a row at a time (one
/// `vpdpbusd` pair per 64 weights, no unpacking). With one L2 prefetch per line it read its
/// weights slower in the models than `Q8_0`'s kernel, which covers each line about 1.5 times
/// (its three prefetches per four 34-byte blocks overlap) and does more work per byte. One
/// token's products alone (`decode_matmuls`, the same package twice in one process, with and
/// without): SmolLM2 10–15 % faster, Gemma 3 5–8 %, two threads 5 %. The tiled kernels and
/// `Q8_0`'s lose 2–10 % with the extra prefetches, so they keep [`prefetch_weights`].
#[inline(always)]
pub(crate) fn prefetch_weights_deep(p: *const u8, ahead: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
    prefetch_weights(p, ahead);
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(2 * FAR_PREFETCH * ahead).cast());
        _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(3 * FAR_PREFETCH * ahead).cast());
    }
}

/// The row/token tiling shared by both x86 levels; `tile` is the level's kernel for a tile of
/// `R` rows by `T` activation rows, `row_at_a_time(weights)` whether one activation row
/// (decode) reads the weights a row at a time, which `rows(weights, w, row_bytes, n_rows, x,
/// out)` then does.
macro_rules! tiled_dot_block {
    ($tile:ident, $row_at_a_time:expr, $rows:expr) => {
        /// Tiles rows by 4 (then 1) and activation rows by 2 (then 1), rows outermost so a
        /// tile's weights stay in L1 while every activation row passes over them; with one
        /// activation row and a format `row_at_a_time` names, a row at a time.
        ///
        /// # Safety
        /// The CPU has this module's target features; `w` holds `n_rows` rows of `row_bytes`
        /// bytes, each exactly one row of `xq[t].len()` elements of `weights`; every `xq[t]`
        /// is in `activation_format(weights)`; `out` has `(xq.len() - 1) * out_stride +
        /// n_rows` elements.
        pub(crate) unsafe fn dot_block(
            weights: GgmlType,
            w: &[u8],
            row_bytes: usize,
            n_rows: usize,
            xq: &[QuantizedRow],
            out: &mut [f32],
            out_stride: usize,
        ) {
            let mut r = 0;
            if xq.len() == 1 && $row_at_a_time(weights) {
                // SAFETY: the caller's guarantees, for the one activation row.
                unsafe { $rows(weights, w, row_bytes, n_rows, &xq[0], out) };
                return;
            }
            while r + super::TILE_ROWS <= n_rows {
                // SAFETY: rows r..r + TILE_ROWS lie within `w`; the rest is the caller's.
                unsafe {
                    row_tile::<{ super::TILE_ROWS }>(weights, w, row_bytes, r, xq, out, out_stride)
                };
                r += super::TILE_ROWS;
            }
            while r < n_rows {
                // SAFETY: row r lies within `w`; the rest is the caller's.
                unsafe { row_tile::<1>(weights, w, row_bytes, r, xq, out, out_stride) };
                r += 1;
            }
        }

        /// # Safety
        /// As [`dot_block`], with rows `r0..r0 + R` within `w`.
        #[inline(always)]
        unsafe fn row_tile<const R: usize>(
            weights: GgmlType,
            w: &[u8],
            row_bytes: usize,
            r0: usize,
            xq: &[QuantizedRow],
            out: &mut [f32],
            out_stride: usize,
        ) {
            let p = w[r0 * row_bytes..].as_ptr();
            let mut t = 0;
            while t + 2 <= xq.len() {
                // SAFETY: `p` starts R rows of `row_bytes` within `w`; target features and
                // activation shapes are the caller's guarantee.
                let res = unsafe { $tile::<R, 2>(weights, p, row_bytes, [&xq[t], &xq[t + 1]]) };
                for (i, vals) in res.iter().enumerate() {
                    for (j, &v) in vals.iter().enumerate() {
                        out[(t + j) * out_stride + r0 + i] = v;
                    }
                }
                t += 2;
            }
            if t < xq.len() {
                // SAFETY: as above.
                let res = unsafe { $tile::<R, 1>(weights, p, row_bytes, [&xq[t]]) };
                for (i, vals) in res.iter().enumerate() {
                    out[t * out_stride + r0 + i] = vals[0];
                }
            }
        }
    };
}

pub(crate) use tiled_dot_block;

/// Format ids of the 32-element kernels (const generic parameters).
pub(crate) mod leg {
    pub(crate) const Q4_0: u8 = 0;
    pub(crate) const Q4_1: u8 = 1;
    pub(crate) const Q5_0: u8 = 2;
    pub(crate) const Q5_1: u8 = 3;
    pub(crate) const Q8_0: u8 = 4;
    /// Q4_0's layout, with each nibble indexing the IQ4 table.
    pub(crate) const IQ4_NL: u8 = 5;

    use crate::layout::*;

    pub(crate) const fn bytes(f: u8) -> usize {
        match f {
            Q4_0 => Q4_0_BYTES,
            Q4_1 => Q4_1_BYTES,
            Q5_0 => Q5_0_BYTES,
            Q5_1 => Q5_1_BYTES,
            IQ4_NL => IQ4_NL_BYTES,
            _ => Q8_0_BYTES,
        }
    }

    /// Offset of the packed codes.
    pub(crate) const fn qs(f: u8) -> usize {
        match f {
            Q4_0 => 2,
            Q4_1 => 4,
            Q5_0 => 6,
            Q5_1 => 8,
            _ => 2,
        }
    }

    /// Whether the codes are signed bytes (Q8_0's, or IQ4_NL's table levels).
    pub(crate) const fn is_signed(f: u8) -> bool {
        matches!(f, Q8_0 | IQ4_NL)
    }

    /// Offset of the fifth bits (Q5_0 / Q5_1).
    pub(crate) const fn qh(f: u8) -> usize {
        if f == Q5_0 {
            2
        } else {
            4
        }
    }

    pub(crate) const fn has_min(f: u8) -> bool {
        matches!(f, Q4_1 | Q5_1)
    }

    pub(crate) const fn is_q5(f: u8) -> bool {
        matches!(f, Q5_0 | Q5_1)
    }

    /// The weight offset in units of the block scale, for the types without a stored minimum
    /// (the signed types' codes taken as unsigned, i.e. plus 128).
    pub(crate) const fn offset(f: u8) -> f32 {
        match f {
            Q4_0 => -8.0,
            Q5_0 => -16.0,
            Q8_0 | IQ4_NL => -128.0,
            _ => 0.0,
        }
    }
}

/// `vpshufb` tables of the IQ4 levels, repeated in every 128-bit lane (`vpshufb` looks up
/// within lanes): signed, and plus 128 (unsigned bytes for `vpdpbusd`).
pub(crate) mod iq4 {
    use kiln_format::ggml::IQ4_NL_VALUES;

    const fn table<const N: usize>(bias: i16) -> [u8; N] {
        let mut a = [0u8; N];
        let mut i = 0;
        while i < N {
            a[i] = (IQ4_NL_VALUES[i % 16] as i16 + bias) as u8;
            i += 1;
        }
        a
    }

    pub(crate) const SIGNED_32: [u8; 32] = table(0);
    pub(crate) const SIGNED_64: [u8; 64] = table(0);
    pub(crate) const UNSIGNED_64: [u8; 64] = table(128);
}

/// Format ids of the K-quant kernels.
pub(crate) mod kq {
    pub(crate) const Q2_K: u8 = 0;
    pub(crate) const Q3_K: u8 = 1;
    pub(crate) const Q4_K: u8 = 2;
    pub(crate) const Q5_K: u8 = 3;
    pub(crate) const Q6_K: u8 = 4;

    use crate::layout::*;

    pub(crate) const fn bytes(f: u8) -> usize {
        match f {
            Q2_K => Q2_K_BYTES,
            Q3_K => Q3_K_BYTES,
            Q4_K => Q4_K_BYTES,
            Q5_K => Q5_K_BYTES,
            _ => Q6_K_BYTES,
        }
    }
}
