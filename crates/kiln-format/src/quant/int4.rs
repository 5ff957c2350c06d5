//! Block-wise int4 along the input dimension.

use half::f16;

use super::{bits, check_input, par, QuantError, QuantMatrix, Scheme};

/// A `[rows, cols]` matrix as 4-bit codes in blocks of `block` consecutive input channels,
/// each block with an f16 scale and, when asymmetric, an f16 offset:
/// `w = scale * (q - offset)` (`offset` = 0 when symmetric), as Core ML's
/// `constexpr_blockwise_shift_scale` computes it.
///
/// Layout:
/// - `codes`: the row-major element stream packed two per byte, element `2i` in the low nibble
///   of byte `i` and element `2i + 1` in the high nibble. Symmetric codes are two's-complement
///   int4 (−8..=7); asymmetric codes are unsigned (0..=15).
/// - `scales` and `offsets`: one per block, row-major (`r * (cols / block) + c / block`).
///
/// Symmetric blocks use all sixteen codes: the scale may be negative, so the side of zero with
/// the larger magnitude gets the eight-step half of the range. Its magnitude is the smallest
/// that keeps every weight within half a step of a code, and it is rounded *up* to f16, so
/// every reconstructed weight is within `|scale| / 2` of the original.
///
/// Asymmetric blocks cover `[min(w, 0), max(w, 0)]`: the range includes zero so the offset lies
/// in 0..=15, where f16 represents it to 2⁻⁸; the range is widened by 1% of a step at each end
/// so that the offset's rounding never pushes a weight outside it, and every reconstructed
/// weight is again within `scale / 2` of the original.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Block {
    rows: usize,
    cols: usize,
    block: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    offsets: Option<Vec<f16>>,
}

impl Int4Block {
    /// Rebuilds a matrix from stored parts, checking their sizes. `offsets: None` is the
    /// symmetric form.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        block: usize,
        codes: Vec<u8>,
        scales: Vec<f16>,
        offsets: Option<Vec<f16>>,
    ) -> Result<Self, QuantError> {
        check_block(cols, block)?;
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| QuantError::new(format!("int4 {rows}x{cols}: too many elements")))?;
        let blocks = n / block;
        let offsets_ok = offsets.as_ref().is_none_or(|o| o.len() == blocks);
        if codes.len() != n / 2 || scales.len() != blocks || !offsets_ok {
            return Err(QuantError::new(format!(
                "int4-block{block} {rows}x{cols}: {} code bytes, {} scales, {} offsets; \
                 expected {}, {blocks} and {}",
                codes.len(),
                scales.len(),
                offsets.as_ref().map_or(0, |o| o.len()),
                n / 2,
                if offsets.is_some() { blocks } else { 0 }
            )));
        }
        Ok(Int4Block {
            rows,
            cols,
            block,
            codes,
            scales,
            offsets,
        })
    }

    /// Input channels per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Whether the codes are signed with no offset.
    pub fn symmetric(&self) -> bool {
        self.offsets.is_none()
    }

    /// Packed codes (see the type's documentation for the nibble order).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One scale per block, row-major.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// One offset per block, row-major, in code units; `None` when symmetric.
    pub fn offsets(&self) -> Option<&[f16]> {
        self.offsets.as_deref()
    }

    /// The integer code of element `i` of the row-major stream, sign applied.
    #[inline]
    fn code(&self, i: usize) -> i32 {
        let nibble = bits::get(&self.codes, 4, i) as i32;
        if self.offsets.is_none() {
            (nibble ^ 8) - 8
        } else {
            nibble
        }
    }

    /// Scale and offset of block `b` (flat block index) as f32.
    #[inline]
    fn block_params(&self, b: usize) -> (f32, f32) {
        let offset = self.offsets.as_ref().map_or(0.0, |o| o[b].to_f32());
        (self.scales[b].to_f32(), offset)
    }
}

impl QuantMatrix for Int4Block {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn scheme(&self) -> Scheme {
        Scheme::Int4Block {
            block: self.block,
            symmetric: self.symmetric(),
        }
    }
    fn byte_size(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + self.offsets.as_ref().map_or(0, |o| 2 * o.len())
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "output row length");
        let per_row = self.cols / self.block;
        for (j, chunk) in out.chunks_exact_mut(self.block).enumerate() {
            let b = r * per_row + j;
            let (scale, offset) = self.block_params(b);
            let first = b * self.block;
            for (k, o) in chunk.iter_mut().enumerate() {
                *o = scale * (self.code(first + k) as f32 - offset);
            }
        }
    }

    /// Per block: `scale * (Σ q·x − offset · Σ x)`, the integer-code sum a kernel forms before
    /// applying the block's scale.
    fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(x.len(), self.cols, "activation length");
        let per_row = self.cols / self.block;
        let mut total = 0.0f32;
        for (j, xs) in x.chunks_exact(self.block).enumerate() {
            let b = r * per_row + j;
            let (scale, offset) = self.block_params(b);
            let first = b * self.block;
            let (mut qx, mut sx) = (0.0f32, 0.0f32);
            for (k, &v) in xs.iter().enumerate() {
                qx += self.code(first + k) as f32 * v;
                sx += v;
            }
            total += scale * (qx - offset * sx);
        }
        total
    }
}

fn check_block(cols: usize, block: usize) -> Result<(), QuantError> {
    if block == 0 || block % 2 != 0 || cols % block != 0 {
        return Err(QuantError::new(format!(
            "int4 block of {block} does not fit rows of {cols}: the block must be even, \
             positive and divide the number of columns"
        )));
    }
    Ok(())
}

/// The f16 nearest `v` (> 0) that is not smaller than it; `None` if `v` exceeds the f16 range.
fn f16_at_least(v: f32) -> Option<f16> {
    let mut h = f16::from_f32(v);
    if h.to_f32() < v {
        h = f16::from_bits(h.to_bits() + 1);
    }
    h.is_finite().then_some(h)
}

/// Widening of the asymmetric range, in steps, on each side (see [`Int4Block`]).
const SLACK: f32 = 0.01;

/// Quantizes `w` (`rows` × `cols`, row-major) to int4 in blocks of `block` input channels,
/// symmetric (signed codes, a scale per block) or not (unsigned codes, a scale and an offset
/// per block). Blocks of 32 or 64 are what the kernels and Core ML expect; any even block
/// dividing `cols` is accepted.
///
/// Errors: a block that is odd, zero or does not divide `cols`; a shape that does not match
/// `w.len()`; a non-finite weight; a block whose scale exceeds the f16 range.
pub fn quantize_int4_block(
    w: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
    symmetric: bool,
) -> Result<Int4Block, QuantError> {
    check_input(w, rows, cols)?;
    check_block(cols, block)?;
    let n = rows * cols;
    let blocks = n / block;
    let mut codes = vec![0u8; n / 2];
    let mut scales = vec![f16::ZERO; blocks];
    let mut offsets = vec![f16::ZERO; if symmetric { 0 } else { blocks }];
    // One piece of work is a run of whole blocks; offsets ride along empty when symmetric.
    let blocks_per_piece = (65536 / block).max(1);
    let mut offset_pieces: Vec<&mut [f16]> = if symmetric {
        (0..blocks.div_ceil(blocks_per_piece))
            .map(|_| &mut [][..])
            .collect()
    } else {
        offsets.chunks_mut(blocks_per_piece).collect()
    };
    let mut pieces: Vec<(&mut [u8], &mut [f16], &mut [f16])> = codes
        .chunks_mut(blocks_per_piece * block / 2)
        .zip(scales.chunks_mut(blocks_per_piece))
        .zip(offset_pieces.iter_mut())
        .map(|((c, s), o)| (c, s, std::mem::take(o)))
        .collect();
    let failed = std::sync::Mutex::new(None);
    par::for_chunks(&mut pieces, 1, |i, piece| {
        let (codes, scales, offsets) = &mut piece[0];
        let first_block = i * blocks_per_piece;
        for (k, (q, s)) in codes
            .chunks_exact_mut(block / 2)
            .zip(scales.iter_mut())
            .enumerate()
        {
            let b = first_block + k;
            let vals = &w[b * block..(b + 1) * block];
            let result = if symmetric {
                quantize_block_symmetric(vals, q)
            } else {
                quantize_block_offset(vals, q).map(|(s, o)| {
                    offsets[k] = o;
                    s
                })
            };
            match result {
                Some(scale) => *s = scale,
                None => {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    f.get_or_insert(b);
                }
            }
        }
    });
    if let Some(b) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let per_row = cols / block;
        return Err(QuantError::new(format!(
            "int4 block {} of row {}: its scale exceeds the f16 range",
            b % per_row,
            b / per_row
        )));
    }
    Ok(Int4Block {
        rows,
        cols,
        block,
        codes,
        scales,
        offsets: (!symmetric).then_some(offsets),
    })
}

/// Writes the packed codes of one symmetric block and returns its scale.
fn quantize_block_symmetric(vals: &[f32], packed: &mut [u8]) -> Option<f16> {
    let pos = vals.iter().fold(0.0f32, |m, &v| m.max(v));
    let neg = vals.iter().fold(0.0f32, |m, &v| m.max(-v));
    // Codes −8..=7 cover [−8.5, 7.5] steps with error ≤ half a step; a negative scale mirrors
    // that, giving the eight-step side to positive weights.
    let plus = (pos / 7.5).max(neg / 8.5);
    let minus = (pos / 8.5).max(neg / 7.5);
    let (mag, sign) = if plus <= minus {
        (plus, 1.0)
    } else {
        (minus, -1.0)
    };
    if mag == 0.0 {
        packed.fill(0);
        return Some(f16::ZERO);
    }
    let mag = f16_at_least(mag)?;
    let scale = sign * mag.to_f32();
    for (o, pair) in packed.iter_mut().zip(vals.chunks_exact(2)) {
        let q = |v: f32| ((v / scale).round().clamp(-8.0, 7.0) as i32 & 0x0f) as u8;
        *o = q(pair[0]) | q(pair[1]) << 4;
    }
    Some(if sign < 0.0 { -mag } else { mag })
}

/// Writes the packed codes of one asymmetric block and returns its scale and offset.
fn quantize_block_offset(vals: &[f32], packed: &mut [u8]) -> Option<(f16, f16)> {
    let lo = vals.iter().fold(0.0f32, |m, &v| m.min(v));
    let hi = vals.iter().fold(0.0f32, |m, &v| m.max(v));
    if hi == lo {
        packed.fill(0);
        return Some((f16::ZERO, f16::ZERO));
    }
    let scale = f16_at_least((hi - lo) / (15.0 - 2.0 * SLACK))?;
    let s = scale.to_f32();
    let offset = f16::from_f32(-lo / s + SLACK);
    let o = offset.to_f32();
    for (out, pair) in packed.iter_mut().zip(vals.chunks_exact(2)) {
        let q = |v: f32| (v / s + o).round().clamp(0.0, 15.0) as u8;
        *out = q(pair[0]) | q(pair[1]) << 4;
    }
    Some((scale, offset))
}
