//! Weight matrices in the formats the exporter writes, as coremltools 9 writes them:
//!
//! - `fp16`: a `const` whose value is an fp16 blob;
//! - `int8-channel`: `constexpr_blockwise_shift_scale` with `data` int8 `[out, in]` and
//!   `scale` fp16 `[out, 1]` (no offset: symmetric codes);
//! - `int4-block32`: `constexpr_blockwise_shift_scale` with `data` int4 `[out, in]` (two per
//!   byte, low nibble first) and `scale` fp16 `[out, in / 32]`;
//! - `lut4`, `lut6`: `constexpr_lut_to_dense` with `indices` uint4/uint6 `[out, in]` (packed
//!   least significant bit first) and `lut` fp16 `[groups, 1, 2^bits, 1]`, one table per group
//!   of output channels (`groups = out / group_channels`) or one for the tensor (`[1, 1, ..]`).
//!
//! Each op's inputs are inline values referring to blobs, and its output is fp16 `[out, in]`,
//! which `linear` and `gather` take as they would a `const`. The quantizers are
//! `kiln_format::quant`'s.

use super::blob_writer::BlobType;
use super::mil::{ProgramBuilder, Var};
use super::ExportError;
use crate::proto::DataType;
use kiln_format::quant::{quantize_int4_block, quantize_int8_channel, quantize_lut};
use std::fmt;
use std::str::FromStr;

/// Input channels per block of `int4-block32`.
pub const INT4_BLOCK: usize = 32;

/// Seed of the k-means palettization, fixed so an export is reproducible.
const LUT_SEED: u64 = 0x6b69_6c6e;

/// How the matrices of linear layers (and the embedding) are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// fp16 values.
    Fp16,
    /// Symmetric int8, one fp16 scale per output channel.
    Int8Channel,
    /// Symmetric int4 in blocks of 32 input channels, one fp16 scale per block.
    Int4Block32,
    /// A `2^bits`-entry fp16 table learned by k-means, and `bits`-bit indices.
    Lut {
        /// Bits per index: 4 or 6.
        bits: u8,
        /// Output channels sharing a table; `None`: one table per tensor.
        group_channels: Option<usize>,
    },
}

impl WeightFormat {
    /// Bytes the blobs of a `rows` × `cols` matrix take (without blob records).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match self {
            WeightFormat::Fp16 => 2 * n,
            WeightFormat::Int8Channel => n + 2 * rows as u64,
            WeightFormat::Int4Block32 => n / 2 + 2 * n / INT4_BLOCK as u64,
            WeightFormat::Lut {
                bits,
                group_channels,
            } => {
                let groups = group_channels.map_or(1, |g| rows / g.max(1)) as u64;
                (n * bits as u64).div_ceil(8) + groups * (2u64 << bits)
            }
        }
    }

    /// Checks that a `rows` × `cols` matrix can be stored in this format.
    pub fn check(self, what: &str, rows: usize, cols: usize) -> Result<(), ExportError> {
        match self {
            WeightFormat::Int4Block32 if cols % INT4_BLOCK != 0 => Err(ExportError::Invalid(
                format!(
                    "{what} has {cols} input channels, not a multiple of the int4 block of {INT4_BLOCK}"
                ),
            )),
            WeightFormat::Lut {
                group_channels: Some(g),
                ..
            } if g == 0 || rows % g != 0 => Err(ExportError::Invalid(format!(
                "{what} has {rows} output channels, which groups of {g} do not divide \
                 (--lut-group-channels)"
            ))),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Fp16 => write!(f, "fp16"),
            WeightFormat::Int8Channel => write!(f, "int8-channel"),
            WeightFormat::Int4Block32 => write!(f, "int4-block32"),
            WeightFormat::Lut {
                bits,
                group_channels: None,
            } => write!(f, "lut{bits}"),
            WeightFormat::Lut {
                bits,
                group_channels: Some(g),
            } => write!(f, "lut{bits}-g{g}"),
        }
    }
}

impl FromStr for WeightFormat {
    type Err = String;

    /// `fp16`, `int8-channel`, `int4-block32`, `lut4` or `lut6` (per-tensor tables; the group
    /// size is set separately).
    fn from_str(s: &str) -> Result<WeightFormat, String> {
        Ok(match s {
            "fp16" => WeightFormat::Fp16,
            "int8-channel" => WeightFormat::Int8Channel,
            "int4-block32" => WeightFormat::Int4Block32,
            "lut4" => WeightFormat::Lut {
                bits: 4,
                group_channels: None,
            },
            "lut6" => WeightFormat::Lut {
                bits: 6,
                group_channels: None,
            },
            other => {
                return Err(format!(
                    "unknown weight format '{other}' (expected fp16, int8-channel, int4-block32, lut4 or lut6)"
                ))
            }
        })
    }
}

fn f16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values
        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// Emits the `[rows, cols]` row-major matrix `w` in `format`; returns the fp16 variable that
/// holds it when the program runs.
pub fn matrix(
    b: &mut ProgramBuilder,
    hint: &str,
    format: WeightFormat,
    rows: usize,
    cols: usize,
    w: &[f32],
) -> Result<Var, ExportError> {
    format.check(hint, rows, cols)?;
    let quant = |e: kiln_format::quant::QuantError| ExportError::Invalid(format!("{hint}: {e}"));
    let f16 = DataType::Float16;
    Ok(match format {
        WeightFormat::Fp16 => b.weight(hint, f16, &[rows, cols], w),
        WeightFormat::Int8Channel => {
            let q = quantize_int8_channel(w, rows, cols).map_err(quant)?;
            let codes: Vec<u8> = q.codes().iter().map(|&c| c as u8).collect();
            let data = b.blob_value(
                &format!("{hint}_data"),
                BlobType::I8,
                DataType::Int8,
                &[rows, cols],
                &codes,
            );
            let scale_bytes = f16_bytes(q.scales().iter().copied());
            let scale = b.blob_value(
                &format!("{hint}_scale"),
                BlobType::F16,
                f16,
                &[rows, 1],
                &scale_bytes,
            );
            b.constexpr(
                "constexpr_blockwise_shift_scale",
                hint,
                vec![("data", data), ("scale", scale)],
                f16,
                &[rows, cols],
            )
        }
        WeightFormat::Int4Block32 => {
            let q = quantize_int4_block(w, rows, cols, INT4_BLOCK, true).map_err(quant)?;
            let data = b.blob_value(
                &format!("{hint}_data"),
                BlobType::I4,
                DataType::Int4,
                &[rows, cols],
                q.codes(),
            );
            let scale_bytes: Vec<u8> = q.scales().iter().flat_map(|s| s.to_le_bytes()).collect();
            let scale = b.blob_value(
                &format!("{hint}_scale"),
                BlobType::F16,
                f16,
                &[rows, cols / INT4_BLOCK],
                &scale_bytes,
            );
            b.constexpr(
                "constexpr_blockwise_shift_scale",
                hint,
                vec![("data", data), ("scale", scale)],
                f16,
                &[rows, cols],
            )
        }
        WeightFormat::Lut {
            bits,
            group_channels,
        } => {
            let (ty, dt) = match bits {
                4 => (BlobType::U4, DataType::Uint4),
                6 => (BlobType::U6, DataType::Uint6),
                other => {
                    return Err(ExportError::Invalid(format!(
                        "{hint}: lookup tables of {other} bits are not exported (4 or 6)"
                    )))
                }
            };
            let q = quantize_lut(w, rows, cols, bits, group_channels, LUT_SEED).map_err(quant)?;
            let indices = b.blob_value(
                &format!("{hint}_indices"),
                ty,
                dt,
                &[rows, cols],
                q.indices(),
            );
            let groups = group_channels.map_or(1, |g| rows / g);
            let lut_bytes = f16_bytes(q.tables().iter().copied());
            let lut = b.blob_value(
                &format!("{hint}_lut"),
                BlobType::F16,
                f16,
                &[groups, 1, 1 << bits, 1],
                &lut_bytes,
            );
            b.constexpr(
                "constexpr_lut_to_dense",
                hint,
                vec![("indices", indices), ("lut", lut)],
                f16,
                &[rows, cols],
            )
        }
    })
}
