//! Symmetric int8 with one scale per output channel.

use super::{check_input, par, QuantError, QuantMatrix, Scheme};

/// A `[rows, cols]` matrix as int8 codes with one f32 scale per row:
/// `w[r][c] = scales[r] * codes[r * cols + c]`.
///
/// Codes lie in −127..=127 (−128 is never produced, so negation is exact and the range is
/// symmetric); `codes` is row-major. The scale of row `r` is `max |w[r]| / 127`, so every
/// reconstructed weight is within `scales[r] / 2` of the original.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Channel {
    rows: usize,
    cols: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Channel {
    /// Rebuilds a matrix from stored parts, checking their sizes.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        codes: Vec<i8>,
        scales: Vec<f32>,
    ) -> Result<Self, QuantError> {
        if rows.checked_mul(cols) != Some(codes.len()) || scales.len() != rows {
            return Err(QuantError::new(format!(
                "int8-channel {rows}x{cols}: {} codes and {} scales, expected {} and {rows}",
                codes.len(),
                scales.len(),
                rows.saturating_mul(cols)
            )));
        }
        Ok(Int8Channel {
            rows,
            cols,
            codes,
            scales,
        })
    }

    /// Codes, row-major.
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// One scale per row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    fn row(&self, r: usize) -> &[i8] {
        &self.codes[r * self.cols..(r + 1) * self.cols]
    }
}

impl QuantMatrix for Int8Channel {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn scheme(&self) -> Scheme {
        Scheme::Int8Channel
    }
    fn byte_size(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "output row length");
        let s = self.scales[r];
        for (o, &q) in out.iter_mut().zip(self.row(r)) {
            *o = s * q as f32;
        }
    }

    fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        assert_eq!(x.len(), self.cols, "activation length");
        let sum: f32 = self.row(r).iter().zip(x).map(|(&q, &v)| q as f32 * v).sum();
        self.scales[r] * sum
    }
}

/// Quantizes `w` (`rows` × `cols`, row-major) to symmetric int8, one scale per row.
///
/// Errors: a shape that does not match `w.len()`, an empty matrix, a non-finite weight.
pub fn quantize_int8_channel(
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Int8Channel, QuantError> {
    check_input(w, rows, cols)?;
    let mut codes = vec![0i8; rows * cols];
    let mut scales = vec![0.0f32; rows];
    let rows_per_chunk = (65536 / cols).max(1);
    let mut pairs: Vec<(&mut [i8], &mut [f32])> = codes
        .chunks_mut(rows_per_chunk * cols)
        .zip(scales.chunks_mut(rows_per_chunk))
        .collect();
    par::for_chunks(&mut pairs, 1, |i, piece| {
        let (codes, scales) = &mut piece[0];
        let first = i * rows_per_chunk;
        for (k, (q, s)) in codes
            .chunks_exact_mut(cols)
            .zip(scales.iter_mut())
            .enumerate()
        {
            let row = &w[(first + k) * cols..(first + k + 1) * cols];
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            *s = scale;
            if scale > 0.0 {
                for (c, &v) in q.iter_mut().zip(row) {
                    *c = (v / scale).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
    });
    Ok(Int8Channel {
        rows,
        cols,
        codes,
        scales,
    })
}
