//! Weight matrices in the formats the exporter writes, as coremltools 9 writes them:
//!
//! - `fp16`: a `const` whose value is an fp16 blob;
//! - `int8-channel`: `constexpr_blockwise_shift_scale` with `data` int8 `[out, in]` and
//!   `scale` fp16 `[out, 1]` (no offset: symmetric codes);
//! - `int4-block32`: `constexpr_blockwise_shift_scale` with `data` int4 `[out, in]` (two per
//!   byte, low nibble first) and `scale` fp16 `[out, in / 32]`;
//! - `lut4`, `lut6`: `constexpr_lut_to_dense` with `indices` uint4/uint6 `[out, in]` (packed
//!   least significant bit first) and `lut` fp16 `[groups, 1, 2^bits, 1]`, one table per group
//!   of output channels (`groups = out / group_channels`) or one for the tensor (`[1, 1, ..]`);
//! - `lut4-block32` (kiln's `LUT4_B32`, `w = S·a·u[q] + M·b`): two ops chained, as
//!   coremltools 9 writes a quantized weight palettized further (joint compression):
//!   `constexpr_lut_to_dense` with `indices` uint4 `[out, in]` and the 7-bit tables as an int8
//!   `lut` `[groups, 1, 16, 1]` (one table per group of `out / groups` consecutive output
//!   channels: `[1, 1, 16, 1]` for `LUT4_B32`'s one, `out / n` groups for `LUT4_B32_G{n}`'s),
//!   giving int8 `[out, in]`, which is the `data` of a
//!   `constexpr_blockwise_shift_scale` with `scale` fp16 `[out, in / 32]` (`S·a`) and `offset`
//!   fp16 of the same shape (`−M·b / (S·a)`: `scale · (u − offset)` is the weight). A block
//!   whose scale code is 0 holds `M·b` throughout: its indices are written as 0, its scale as
//!   1 and its offset as `u[0] − M·b`.
//!
//! Each op's inputs are inline values referring to blobs (the second op of a chain also takes
//! the first's output), and its output is fp16 `[out, in]`, which `linear` and `gather` take
//! as they would a `const`. The quantizers are `kiln_format::quant`'s and `kiln_types`'.

use super::blob_writer::BlobType;
use super::mil::{Arg, ProgramBuilder, Var};
use super::ExportError;
use crate::proto::DataType;
use kiln_format::kiln_types::{
    self, KilnType, CHUNK, LUT4_B32_BLOCK_BYTES, LUT4_B32_ROW_HEADER, LUT4_B32_TABLE_BYTES,
};
use kiln_format::quant::{
    quantize_int4_block, quantize_int8_channel, quantize_lut, Lut, QuantMatrix,
};
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
    /// kiln's `LUT4_B32`: a 16-entry 7-bit table for the tensor, a scale and an offset per
    /// block of 32 input channels (fp16 here, int8 codes in a kiln package).
    Lut4Block32,
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
            WeightFormat::Lut4Block32 => {
                n / 2 + LUT4_B32_TABLE_BYTES as u64 + 2 * 2 * n / CHUNK as u64
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
            WeightFormat::Lut4Block32 if cols % CHUNK != 0 => Err(ExportError::Invalid(format!(
                "{what} has {cols} input channels, not a multiple of the lut4-block32 block of \
                 {CHUNK}"
            ))),
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
            WeightFormat::Lut4Block32 => write!(f, "lut4-block32"),
        }
    }
}

impl FromStr for WeightFormat {
    type Err = String;

    /// `fp16`, `int8-channel`, `int4-block32`, `lut4`, `lut6` (per-tensor tables; the group
    /// size is set separately) or `lut4-block32`.
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
            "lut4-block32" => WeightFormat::Lut4Block32,
            other => {
                return Err(format!(
                    "unknown weight format '{other}' (expected fp16, int8-channel, int4-block32, \
                     lut4, lut6 or lut4-block32)"
                ))
            }
        })
    }
}

/// The largest divisor `g` of `rows` such that every row `r` not at a multiple of `g` uses
/// the same table as row `r - 1` (`same(r)`): rows `k·g..(k + 1)·g` then share one table.
fn lut_group(rows: usize, same: impl Fn(usize) -> bool) -> usize {
    // Row r starts a new table where it differs from its predecessor; a group size works when
    // every such row is a multiple of it.
    let starts: Vec<usize> = (1..rows).filter(|&r| !same(r)).collect();
    (1..=rows)
        .rev()
        .find(|g| rows % g == 0 && starts.iter().all(|s| s % g == 0))
        .unwrap_or(1)
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
            let q = quantize_lut(w, rows, cols, bits, group_channels, LUT_SEED).map_err(quant)?;
            lut(b, hint, &q)?
        }
        WeightFormat::Lut4Block32 => {
            let ty = KilnType::Lut4B32 { group: None };
            let data = kiln_types::encode_lut4_b32(ty, w, rows, cols).map_err(quant)?;
            lut4_block32(b, hint, ty, rows, cols, &data)?
        }
    })
}

/// Emits the palettized matrix `q` (4- or 6-bit indices) as `constexpr_lut_to_dense`; returns
/// the fp16 variable.
fn lut(b: &mut ProgramBuilder, hint: &str, q: &Lut) -> Result<Var, ExportError> {
    let (rows, cols, bits) = (q.rows(), q.cols(), q.bits());
    let (ty, dt) = match bits {
        4 => (BlobType::U4, DataType::Uint4),
        6 => (BlobType::U6, DataType::Uint6),
        other => {
            return Err(ExportError::Invalid(format!(
                "{hint}: lookup tables of {other} bits are not exported (4 or 6)"
            )))
        }
    };
    let f16 = DataType::Float16;
    let indices = b.blob_value(
        &format!("{hint}_indices"),
        ty,
        dt,
        &[rows, cols],
        q.indices(),
    );
    let groups = q.group_channels().map_or(1, |g| rows / g);
    let lut_bytes = f16_bytes(q.tables().iter().copied());
    let lut = b.blob_value(
        &format!("{hint}_lut"),
        BlobType::F16,
        f16,
        &[groups, 1, 1 << bits, 1],
        &lut_bytes,
    );
    Ok(b.constexpr(
        "constexpr_lut_to_dense",
        hint,
        vec![("indices", indices), ("lut", lut)],
        f16,
        &[rows, cols],
    ))
}

/// Emits a `rows` × `cols` matrix given as `bits`-bit indices (`indices`, one per element,
/// row-major) into per-row tables (`tables[r]`, `2^bits` entries each, as a kiln package stores
/// them) as `constexpr_lut_to_dense`, with as few tables as the rows allow: the largest groups of
/// consecutive rows, dividing `rows`, whose rows share a table. Returns the fp16 variable.
pub fn lut_stored(
    b: &mut ProgramBuilder,
    hint: &str,
    bits: u8,
    rows: usize,
    cols: usize,
    indices: &[u8],
    tables: &[Vec<f32>],
) -> Result<Var, ExportError> {
    WeightFormat::Lut {
        bits,
        group_channels: None,
    }
    .check(hint, rows, cols)?;
    if tables.len() != rows || tables.iter().any(|t| t.len() != 1 << bits) {
        return Err(ExportError::Invalid(format!(
            "{hint}: expected {rows} tables of {} entries",
            1 << bits
        )));
    }
    let group = lut_group(rows, |r| tables[r] == tables[r - 1]);
    let flat: Vec<f32> = tables.iter().step_by(group).flatten().copied().collect();
    let group_channels = (group < rows).then_some(group);
    let q = Lut::from_indices(rows, cols, bits, group_channels, flat, indices)
        .map_err(|e| ExportError::Invalid(format!("{hint}: {e}")))?;
    lut(b, hint, &q)
}

/// Emits a `rows` × `cols` tensor stored as kiln's `LUT4_B32` or `LUT4_B32_G{n}` (`ty`;
/// `data`, its bytes as a kiln package holds them) as the two chained ops of `lut4-block32`;
/// returns the fp16 variable. The values are the tensor's own, rounded to fp16 in the scale
/// and offset only. The `lut` has as few tables as the rows allow: the largest groups of
/// consecutive rows, dividing `rows`, whose rows all use the same table.
pub fn lut4_block32(
    b: &mut ProgramBuilder,
    hint: &str,
    ty: KilnType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> Result<Var, ExportError> {
    if !matches!(ty, KilnType::Lut4B32 { .. }) || ty.data_length(cols, rows).is_none() {
        return Err(ExportError::Invalid(format!(
            "{hint}: a {rows}x{cols} matrix is not stored as {ty}"
        )));
    }
    kiln_types::check_data(ty, data, rows, cols)
        .map_err(|e| ExportError::Invalid(format!("{hint}: {e}")))?;
    WeightFormat::Lut4Block32.check(hint, rows, cols)?;
    let f16 = DataType::Float16;
    let table = |r: usize| kiln_types::lut4_b32_table(ty, data, rows, cols, r);
    let group = lut_group(rows, |r| table(r) == table(r - 1));
    let luts: Vec<u8> = (0..rows).step_by(group).flat_map(|r| *table(r)).collect();
    let row_bytes = ty.row_bytes(cols).expect("checked");
    let nb = cols / CHUNK;
    // Indices two per byte in element order, low nibble first (the blob's uint4 order).
    let mut indices = vec![0u8; rows * cols / 2];
    let (mut scale, mut offset) = (Vec::with_capacity(rows * nb), Vec::with_capacity(rows * nb));
    for (r, (row, out)) in data[..rows * row_bytes]
        .chunks_exact(row_bytes)
        .zip(indices.chunks_exact_mut(cols / 2))
        .enumerate()
    {
        let u = table(r);
        let unit = |k: usize| f64::from(f32::from_le_bytes(row[k..k + 4].try_into().unwrap()));
        let (s, m) = (unit(0), unit(4));
        for (blk, dst) in row[LUT4_B32_ROW_HEADER..]
            .chunks_exact(LUT4_B32_BLOCK_BYTES)
            .zip(out.chunks_exact_mut(CHUNK / 2))
        {
            let (a, o) = (f64::from(blk[0] as i8), f64::from(blk[1] as i8));
            let mut idx = [0u8; CHUNK];
            if a != 0.0 {
                kiln_types::unpack_chunk(4, &blk[2..], &mut idx);
                scale.push(s * a);
                offset.push(-m * o / (s * a));
            } else {
                // Every weight of the block is M·b whatever its indices say.
                scale.push(1.0);
                offset.push(f64::from(u[0]) - m * o);
            }
            for (d, pair) in dst.iter_mut().zip(idx.chunks_exact(2)) {
                *d = pair[0] | (pair[1] << 4);
            }
        }
    }
    let indices = b.blob_value(
        &format!("{hint}_indices"),
        BlobType::U4,
        DataType::Uint4,
        &[rows, cols],
        &indices,
    );
    let lut = b.blob_value(
        &format!("{hint}_lut"),
        BlobType::I8,
        DataType::Int8,
        &[rows / group, 1, 16, 1],
        &luts,
    );
    let codes = b.constexpr(
        "constexpr_lut_to_dense",
        &format!("{hint}_codes"),
        vec![("indices", indices), ("lut", lut)],
        DataType::Int8,
        &[rows, cols],
    );
    let scale_bytes = f16_bytes(scale.into_iter().map(|v| v as f32));
    let offset_bytes = f16_bytes(offset.into_iter().map(|v| v as f32));
    let scale = b.blob_value(
        &format!("{hint}_scale"),
        BlobType::F16,
        f16,
        &[rows, nb],
        &scale_bytes,
    );
    let offset = b.blob_value(
        &format!("{hint}_offset"),
        BlobType::F16,
        f16,
        &[rows, nb],
        &offset_bytes,
    );
    Ok(b.op(
        "constexpr_blockwise_shift_scale",
        hint,
        &[
            ("data", Arg::One(&codes)),
            ("scale", Arg::Value(scale)),
            ("offset", Arg::Value(offset)),
        ],
        f16,
        vec![Some(rows), Some(cols)],
    ))
}
