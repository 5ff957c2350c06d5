//! Weight quantization: the schemes kiln can store a linear layer's weights in, their
//! quantizers, a scalar reference for what a kernel computes with them, and quality metrics.
//!
//! Every scheme quantizes a row-major matrix of `rows` output channels by `cols` input
//! channels, the `[out, in]` layout of GGUF and safetensors, so row `r` is what a kernel dots
//! with the activations to produce output `r`.
//!
//! - [`Int8Channel`]: symmetric int8 with one f32 scale per output channel.
//! - [`Int4Block`]: int4 in blocks of `block` consecutive input channels, each with an f16
//!   scale, symmetric or with an f16 offset (zero point). The layout follows Core ML's
//!   `constexpr_blockwise_shift_scale`: `w = scale * (q - offset)`.
//! - [`Lut`]: palettization: each weight is a `bits`-bit index into a table of `2^bits` f32
//!   values learned by 1-D k-means, one table per tensor or per group of output channels
//!   (Core ML's `constexpr_lut_to_dense`).
//!
//! Each type implements [`QuantMatrix`]: `dequantize_row` and `dot_row` are the scalar
//! reference that optimized kernels are checked against, and [`QuantMatrix::report`] measures
//! the quality of a quantization against the original weights ([`snr_db`], [`cosine`]).
//!
//! The types hold their data in the byte layout a package stores and a kernel reads
//! (documented per type), and `from_parts` constructors rebuild them from stored data with
//! every size checked, so a damaged package is an error rather than a panic.

mod bits;
pub mod feedback;
mod int4;
mod int8;
pub mod kmeans;
mod lut;
pub mod lut_block;
mod metrics;
mod par;

use std::fmt;

pub use int4::{quantize_int4_block, Int4Block};
pub use int8::{quantize_int8_channel, Int8Channel};
pub use lut::{quantize_lut, quantize_lut_weighted, Lut, LUT_BITS};
pub use metrics::{cosine, snr_db};
pub(crate) use par::for_chunks as par_chunks;

/// A quantizer or constructor was given arguments it cannot honour.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(pub String);

impl QuantError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        QuantError(message.into())
    }
}

/// A quantization scheme with its parameters.
///
/// Its [`Display`](fmt::Display) form is the name used on the command line and in manifests:
/// `int8-channel`, `int4-block32`, `int4-block32-offset`, `lut4`, `lut4-g16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Symmetric int8, one scale per output channel.
    Int8Channel,
    /// Block-wise int4 along the input dimension.
    Int4Block {
        /// Input channels per block.
        block: usize,
        /// `true`: signed codes and a scale; `false`: unsigned codes, a scale and an offset.
        symmetric: bool,
    },
    /// Palettization by k-means.
    Lut {
        /// Bits per index: the table has `2^bits` entries.
        bits: u8,
        /// Output channels sharing a table; `None` for one table per tensor.
        group_channels: Option<usize>,
    },
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Scheme::Int8Channel => write!(f, "int8-channel"),
            Scheme::Int4Block { block, symmetric } => {
                write!(f, "int4-block{block}")?;
                if !symmetric {
                    write!(f, "-offset")?;
                }
                Ok(())
            }
            Scheme::Lut {
                bits,
                group_channels,
            } => {
                write!(f, "lut{bits}")?;
                if let Some(g) = group_channels {
                    write!(f, "-g{g}")?;
                }
                Ok(())
            }
        }
    }
}

/// The quality and size of one quantized tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantReport {
    /// The scheme the tensor was quantized with.
    pub scheme: Scheme,
    /// Signal-to-noise ratio of the reconstruction, in dB ([`snr_db`]).
    pub snr_db: f64,
    /// Cosine similarity of the reconstruction with the original ([`cosine`]).
    pub cosine: f64,
    /// Bytes the quantized tensor occupies (codes or indices, scales, offsets, tables).
    pub bytes: usize,
}

/// A quantized `[rows, cols]` weight matrix.
pub trait QuantMatrix {
    /// Output channels.
    fn rows(&self) -> usize;
    /// Input channels.
    fn cols(&self) -> usize;
    /// The scheme and its parameters.
    fn scheme(&self) -> Scheme;
    /// Bytes of stored data: codes or indices, scales, offsets and tables.
    fn byte_size(&self) -> usize;
    /// Writes row `r` as f32 into `out` (`out.len() == cols`).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    fn dequantize_row(&self, r: usize, out: &mut [f32]);
    /// The scalar reference dot product of row `r` with `x` (`x.len() == cols`), computed the
    /// way a kernel does (integer codes against `x`, scales applied per block or row).
    ///
    /// # Panics
    /// If `r >= rows` or `x.len() != cols`.
    fn dot_row(&self, r: usize, x: &[f32]) -> f32;

    /// The whole matrix as f32, row-major.
    fn dequantize(&self) -> Vec<f32> {
        let cols = self.cols();
        let mut out = vec![0.0f32; self.rows() * cols];
        if cols > 0 {
            for (r, row) in out.chunks_exact_mut(cols).enumerate() {
                self.dequantize_row(r, row);
            }
        }
        out
    }

    /// Measures the reconstruction against `original` (the weights that were quantized).
    ///
    /// # Panics
    /// If `original.len() != rows * cols`.
    fn report(&self, original: &[f32]) -> QuantReport {
        assert_eq!(
            original.len(),
            self.rows() * self.cols(),
            "original has the wrong number of elements"
        );
        let rec = self.dequantize();
        QuantReport {
            scheme: self.scheme(),
            snr_db: snr_db(original, &rec),
            cosine: cosine(original, &rec),
            bytes: self.byte_size(),
        }
    }
}

/// A matrix quantized with any [`Scheme`], as returned by [`quantize`].
#[derive(Debug, Clone, PartialEq)]
pub enum Quantized {
    /// See [`Int8Channel`].
    Int8Channel(Int8Channel),
    /// See [`Int4Block`].
    Int4Block(Int4Block),
    /// See [`Lut`].
    Lut(Lut),
}

impl Quantized {
    fn inner(&self) -> &dyn QuantMatrix {
        match self {
            Quantized::Int8Channel(q) => q,
            Quantized::Int4Block(q) => q,
            Quantized::Lut(q) => q,
        }
    }
}

impl QuantMatrix for Quantized {
    fn rows(&self) -> usize {
        self.inner().rows()
    }
    fn cols(&self) -> usize {
        self.inner().cols()
    }
    fn scheme(&self) -> Scheme {
        self.inner().scheme()
    }
    fn byte_size(&self) -> usize {
        self.inner().byte_size()
    }
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.inner().dequantize_row(r, out)
    }
    fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        self.inner().dot_row(r, x)
    }
}

/// Quantizes `w` (`rows` × `cols`, row-major) with `scheme`. `seed` makes k-means
/// deterministic and is ignored by the other schemes.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: Scheme,
    seed: u64,
) -> Result<Quantized, QuantError> {
    Ok(match scheme {
        Scheme::Int8Channel => Quantized::Int8Channel(quantize_int8_channel(w, rows, cols)?),
        Scheme::Int4Block { block, symmetric } => {
            Quantized::Int4Block(quantize_int4_block(w, rows, cols, block, symmetric)?)
        }
        Scheme::Lut {
            bits,
            group_channels,
        } => Quantized::Lut(quantize_lut(w, rows, cols, bits, group_channels, seed)?),
    })
}

/// Checks the shape and contents every quantizer requires.
fn check_input(w: &[f32], rows: usize, cols: usize) -> Result<(), QuantError> {
    if rows == 0 || cols == 0 {
        return Err(QuantError::new(format!(
            "matrix is {rows}x{cols}: both dimensions must be positive"
        )));
    }
    match rows.checked_mul(cols) {
        Some(n) if n == w.len() => {}
        _ => {
            return Err(QuantError::new(format!(
                "matrix is {rows}x{cols} but {} values were given",
                w.len()
            )))
        }
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::new(format!(
            "weight {i} (row {}, column {}) is {}: only finite weights can be quantized",
            i / cols,
            i % cols,
            w[i]
        )));
    }
    Ok(())
}
