//! Tensor formats of the kiln package that no ggml block type represents: int8 with one scale
//! per output channel, int4 in blocks of 64, lookup tables (palettization) of 2, 4, 6 or
//! 8 bits per tensor or per group of output channels, and a 4-bit lookup table with a scale
//! and an offset per block of 32.
//!
//! A package tensor is either a ggml block type or one of these ([`TensorFormat`]). Every
//! layout here is row-major over `rows` output channels of `cols` input channels (ggml shape
//! `[cols, rows]`), and `cols` must be a multiple of 32 (64 for [`KilnType::I4B64`]) so a row
//! is a whole number of the 32-element activation blocks the integer kernels multiply with.
//!
//! Byte layouts (all little-endian; `docs/kiln-package.md` has the same with pictures):
//!
//! - `I8_CH` ([`KilnType::I8Ch`]): first the `cols` int8 codes `c` of every row, row after
//!   row; then the f32 scale `s` of every row, in row order; `w = s · c`. Keeping the scales out
//!   of the rows makes a row exactly `cols` bytes, so with `cols` a multiple of 64 every row
//!   starts on a cache line and the kernels' 64-byte loads never split one. (Package format
//!   version 1 stored each row as its scale then its codes; see
//!   [`crate::package::FORMAT_VERSION`].)
//! - `I4_B64` ([`KilnType::I4B64`]): each row is `cols / 64` blocks of 34 bytes: an f16 scale
//!   `d`, then 32 bytes where byte `j` holds element `j` in its low nibble and element `j + 32`
//!   in its high nibble; `w = d · (q − 8)`. (ggml's `Q4_0` with blocks of 64.)
//! - `LUT{b}` and `LUT{b}_G{n}` ([`KilnType::Lut`]): first the indices of every row, row after
//!   row, `cols · b / 8` bytes each; then the tables, `2^b` f16 values each, one per group of
//!   `n` consecutive rows (`LUT{b}`: one for the tensor). `w[r][c] = table[group(r)][index]`.
//!   Within a row, each 32-element chunk takes `4b` bytes:
//!   - `b = 8`: byte `j` is the index of element `j`;
//!   - `b = 4`: byte `j` (0..16) holds element `j` in its low nibble, `j + 16` in its high one;
//!   - `b = 2`: byte `j` (0..8) holds element `j + 8k` in bits `2k..2k+2` (k = 0..4);
//!   - `b = 6`: 16 bytes of low nibbles laid out as for `b = 4`, then 8 bytes of the top two
//!     bits laid out as for `b = 2`.
//!
//!   These orders put consecutive elements in consecutive SIMD lanes after one shift and mask,
//!   so a kernel needs no shuffle to line indices up with activations.
//! - `LUT4_B32` and `LUT4_B32_G{n}` ([`KilnType::Lut4B32`]): tables of 16 unsigned 7-bit
//!   entries `u` (0..=127, ascending), one per group of `n` consecutive rows (`LUT4_B32`: one
//!   for the tensor), and per block of 32 input channels an int8 scale `a` and an int8 offset
//!   `b`, in units of the row's f32 scale unit `S` and offset unit `M`:
//!   `w = S · a · u[group(r)][q] + M · b`. Each row is `S`, `M` (f32), then `cols / 32` blocks
//!   of 18 bytes: `a`, `b` (i8), 16 bytes of indices laid out as for `LUT4`. The tables, 16
//!   bytes each in group order, follow the last row. 4.5 bits per weight, as ggml's `Q4_0`
//!   (`_G{n}` adds 128 / (n · cols) bits).
//!
//!   Small integer entries let a kernel look weights up with a byte shuffle and multiply them
//!   with int8 activations exactly (`127 · 127 · 2` fits the 16-bit pair sums); the offset
//!   comes in through the activation block sums.

use std::fmt;

use crate::ggml::{f16_to_f32, f32_to_f16, GgmlType};
use crate::quant::feedback::Feedback;
use crate::quant::{self, QuantError};

/// Elements per activation block: every kiln format's row is a whole number of them.
pub const CHUNK: usize = 32;
/// Elements per `I4_B64` block.
pub const I4_BLOCK: usize = 64;
/// Bytes per `I4_B64` block: an f16 scale and 32 bytes of nibbles.
pub const I4_BLOCK_BYTES: usize = 2 + I4_BLOCK / 2;
/// Index widths a lookup-table format may use.
pub const LUT_BITS: [u8; 4] = [2, 4, 6, 8];
/// Bytes of a `LUT4_B32` row's header: the f32 scale and offset units.
pub const LUT4_B32_ROW_HEADER: usize = 8;
/// Bytes per `LUT4_B32` block: the int8 scale and offset, and 16 bytes of indices.
pub const LUT4_B32_BLOCK_BYTES: usize = 2 + CHUNK / 2;
/// Bytes of one `LUT4_B32` table: 16 entries of one byte.
pub const LUT4_B32_TABLE_BYTES: usize = 16;
/// The largest `LUT4_B32` table entry.
pub const LUT4_B32_ENTRY_MAX: u8 = 127;

/// A kiln-specific tensor format (see the module documentation for the byte layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KilnType {
    /// Symmetric int8 with one f32 scale per output channel.
    I8Ch,
    /// Symmetric int4 in blocks of 64 input channels with an f16 scale.
    I4B64,
    /// 4-bit indices into 7-bit tables, with an int8 scale and offset per block of 32 input
    /// channels against f32 units per row.
    Lut4B32 {
        /// Output channels sharing a table; `None`: one table for the whole tensor.
        group: Option<u32>,
    },
    /// `bits`-bit indices into f16 tables of `2^bits` entries.
    Lut {
        /// Bits per index: 2, 4, 6 or 8.
        bits: u8,
        /// Output channels sharing a table; `None`: one table for the whole tensor.
        group: Option<u32>,
    },
}

impl KilnType {
    /// The format's name in manifests: `I8_CH`, `I4_B64`, `LUT4`, `LUT4_G16`, `LUT4_B32`,
    /// `LUT4_B32_G16`, ….
    pub fn name(self) -> String {
        match self {
            KilnType::I8Ch => "I8_CH".into(),
            KilnType::I4B64 => "I4_B64".into(),
            KilnType::Lut4B32 { group: None } => "LUT4_B32".into(),
            KilnType::Lut4B32 { group: Some(g) } => format!("LUT4_B32_G{g}"),
            KilnType::Lut { bits, group: None } => format!("LUT{bits}"),
            KilnType::Lut {
                bits,
                group: Some(g),
            } => format!("LUT{bits}_G{g}"),
        }
    }

    /// The format named `name` (as [`KilnType::name`] spells it), or `None`.
    pub fn from_name(name: &str) -> Option<KilnType> {
        match name {
            "I8_CH" => return Some(KilnType::I8Ch),
            "I4_B64" => return Some(KilnType::I4B64),
            _ => {}
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        let group_size = |g: Option<&str>| -> Option<Option<u32>> {
            match g {
                None => Some(None),
                Some(g) if !digits(g) || g.starts_with('0') => None,
                Some(g) => Some(Some(g.parse::<u32>().ok().filter(|&g| g > 0)?)),
            }
        };
        if let Some(rest) = name.strip_prefix("LUT4_B32") {
            let group = match rest {
                "" => None,
                _ => Some(rest.strip_prefix("_G")?),
            };
            return Some(KilnType::Lut4B32 {
                group: group_size(group)?,
            });
        }
        let rest = name.strip_prefix("LUT")?;
        let (bits, group) = match rest.split_once("_G") {
            Some((b, g)) => (b, Some(g)),
            None => (rest, None),
        };
        if !digits(bits) {
            return None;
        }
        let bits: u8 = bits.parse().ok()?;
        let group = group_size(group)?;
        LUT_BITS
            .contains(&bits)
            .then_some(KilnType::Lut { bits, group })
    }

    /// Elements a row length must be a multiple of.
    pub fn row_multiple(self) -> usize {
        match self {
            KilnType::I4B64 => I4_BLOCK,
            _ => CHUNK,
        }
    }

    /// Bytes of one row's codes or indices (`I8_CH`'s scales and the tables follow the last
    /// row), or `None` if `cols` is not a whole number of [`KilnType::row_multiple`] or the
    /// size overflows.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if cols == 0 || cols % self.row_multiple() != 0 {
            return None;
        }
        match self {
            KilnType::I8Ch => Some(cols),
            KilnType::I4B64 => Some(cols / I4_BLOCK * I4_BLOCK_BYTES),
            KilnType::Lut4B32 { .. } => {
                Some(LUT4_B32_ROW_HEADER + cols / CHUNK * LUT4_B32_BLOCK_BYTES)
            }
            KilnType::Lut { bits, .. } => Some(cols / 8 * bits as usize),
        }
    }

    /// f16 tables of a `rows`-row tensor (0 for the formats without them, `LUT4_B32`'s byte
    /// tables included: see [`KilnType::lut4_b32_tables`]), or `None` when the group size
    /// does not divide `rows`.
    pub fn tables(self, rows: usize) -> Option<usize> {
        match self {
            KilnType::Lut { group, .. } => groups(group, rows),
            _ => Some(0),
        }
    }

    /// Byte tables of a `rows`-row `LUT4_B32` tensor (one per group of rows; 0 for the other
    /// formats), or `None` when the group size does not divide `rows`.
    pub fn lut4_b32_tables(self, rows: usize) -> Option<usize> {
        match self {
            KilnType::Lut4B32 { group } => groups(group, rows),
            _ => Some(0),
        }
    }

    /// Output channels sharing a table (`rows` for a tensor-wide table; `None` for the
    /// formats without tables).
    pub fn group_rows(self, rows: usize) -> Option<usize> {
        match self {
            KilnType::Lut { group, .. } | KilnType::Lut4B32 { group } => {
                Some(group.map_or(rows, |g| g as usize))
            }
            _ => None,
        }
    }

    /// Entries per f16 table (`2^bits`; 0 for the formats without them).
    pub fn table_len(self) -> usize {
        match self {
            KilnType::Lut { bits, .. } => 1 << bits,
            _ => 0,
        }
    }

    /// Bytes a `rows` × `cols` tensor takes, or `None` if the shape does not fit the format.
    pub fn data_length(self, cols: usize, rows: usize) -> Option<u64> {
        if rows == 0 {
            return None;
        }
        let row = self.row_bytes(cols)? as u64;
        let tables = match self {
            KilnType::Lut4B32 { .. } => (self.lut4_b32_tables(rows)? * LUT4_B32_TABLE_BYTES) as u64,
            KilnType::I8Ch => (rows as u64).checked_mul(I8_CH_SCALE_BYTES as u64)?,
            _ => (self.tables(rows)? * self.table_len() * 2) as u64,
        };
        row.checked_mul(rows as u64)?.checked_add(tables)
    }

    /// Byte offset of the tables (`I8_CH`: of the row scales), the end of the rows.
    pub fn tables_offset(self, cols: usize, rows: usize) -> Option<usize> {
        self.row_bytes(cols)?.checked_mul(rows)
    }
}

/// Tables of a `rows`-row tensor with `group` rows per table (`None`: one), or `None` when
/// `group` does not divide `rows`.
fn groups(group: Option<u32>, rows: usize) -> Option<usize> {
    match group {
        None => Some(1),
        Some(g) => {
            let g = g as usize;
            (rows % g == 0).then_some(rows / g)
        }
    }
}

impl fmt::Display for KilnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The format of a stored tensor: a ggml block type, or a kiln format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorFormat {
    /// A ggml block type, with exactly ggml's layout.
    Ggml(GgmlType),
    /// A kiln format (see [`KilnType`]).
    Kiln(KilnType),
}

impl From<GgmlType> for TensorFormat {
    fn from(t: GgmlType) -> Self {
        TensorFormat::Ggml(t)
    }
}

impl From<KilnType> for TensorFormat {
    fn from(t: KilnType) -> Self {
        TensorFormat::Kiln(t)
    }
}

impl fmt::Display for TensorFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorFormat::Ggml(t) => f.write_str(t.name()),
            TensorFormat::Kiln(t) => f.write_str(&t.name()),
        }
    }
}

impl TensorFormat {
    /// The name in manifests: the ggml type name or the kiln format name.
    pub fn name(self) -> String {
        self.to_string()
    }

    /// The format named `name`: a ggml type name (case-insensitive) or a kiln format name.
    pub fn from_name(name: &str) -> Option<TensorFormat> {
        GgmlType::from_name(name)
            .map(TensorFormat::Ggml)
            .or_else(|| KilnType::from_name(name).map(TensorFormat::Kiln))
    }

    /// The ggml type, if it is one.
    pub fn ggml(self) -> Option<GgmlType> {
        match self {
            TensorFormat::Ggml(t) => Some(t),
            TensorFormat::Kiln(_) => None,
        }
    }

    /// The kiln format, if it is one.
    pub fn kiln(self) -> Option<KilnType> {
        match self {
            TensorFormat::Kiln(t) => Some(t),
            TensorFormat::Ggml(_) => None,
        }
    }

    /// Bytes a tensor of `shape` (ggml order: `shape[0]` is the row length) takes, or `None`
    /// if the shape does not fit the format (a kiln format needs a row length that is a
    /// whole number of its blocks, and a group size dividing the rows).
    pub fn data_length(self, shape: &[u64]) -> Option<u64> {
        let (&row, rest) = shape.split_first()?;
        if shape.contains(&0) {
            return None;
        }
        let rows = rest.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        let cols = usize::try_from(row).ok()?;
        match self {
            TensorFormat::Ggml(t) => (t.row_bytes(cols)? as u64).checked_mul(rows),
            TensorFormat::Kiln(t) => t.data_length(cols, usize::try_from(rows).ok()?),
        }
    }

    /// Average bits per weight of a `rows` × `cols` tensor (scales and tables included).
    pub fn bits_per_weight(self, cols: usize, rows: usize) -> Option<f64> {
        let bytes = self.data_length(&[cols as u64, rows as u64])?;
        Some(bytes as f64 * 8.0 / (cols as f64 * rows as f64))
    }
}

/// Writes row `r` of a `rows` × `cols` tensor of format `ty`, whose bytes are `data`, as f32
/// into `out` (`cols` elements).
///
/// # Panics
/// If `data` is not `ty.data_length(cols, rows)` bytes, `r >= rows` or `out.len() != cols`;
/// callers check the shape when they load the tensor.
pub fn dequantize_row(
    ty: KilnType,
    data: &[u8],
    rows: usize,
    cols: usize,
    r: usize,
    out: &mut [f32],
) {
    assert_eq!(
        Some(data.len() as u64),
        ty.data_length(cols, rows),
        "{ty}: {} bytes are not a {rows}x{cols} tensor",
        data.len()
    );
    assert!(r < rows && out.len() == cols, "{ty}: row {r} of {rows}");
    let row_bytes = ty.row_bytes(cols).expect("checked above");
    let row = &data[r * row_bytes..(r + 1) * row_bytes];
    match ty {
        KilnType::I8Ch => {
            let s = i8_ch_scale(data, rows, cols, r);
            for (o, &c) in out.iter_mut().zip(row) {
                *o = s * f32::from(c as i8);
            }
        }
        KilnType::I4B64 => {
            for (o, b) in out
                .chunks_exact_mut(I4_BLOCK)
                .zip(row.chunks_exact(I4_BLOCK_BYTES))
            {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                let (lo, hi) = o.split_at_mut(I4_BLOCK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..]) {
                    *l = d * (f32::from(q & 0x0f) - 8.0);
                    *h = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        KilnType::Lut4B32 { .. } => {
            let u = lut4_b32_table(ty, data, rows, cols, r).map(f64::from);
            let s = f64::from(f32::from_le_bytes([row[0], row[1], row[2], row[3]]));
            let m = f64::from(f32::from_le_bytes([row[4], row[5], row[6], row[7]]));
            for (o, blk) in out
                .chunks_exact_mut(CHUNK)
                .zip(row[LUT4_B32_ROW_HEADER..].chunks_exact(LUT4_B32_BLOCK_BYTES))
            {
                // In f64, so each weight is rounded once even where the offset cancels most
                // of the scaled entry; a block's weights take 16 values, computed once.
                let a = s * f64::from(blk[0] as i8);
                let b = m * f64::from(blk[1] as i8);
                let v: [f32; 16] = std::array::from_fn(|k| (a * u[k] + b) as f32);
                let (lo, hi) = o.split_at_mut(CHUNK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[2..]) {
                    *l = v[usize::from(q & 0x0f)];
                    *h = v[usize::from(q >> 4)];
                }
            }
        }
        KilnType::Lut { bits, .. } => {
            let table = lut_table(ty, data, rows, cols, r);
            let mut idx = [0u8; CHUNK];
            let chunk_bytes = 4 * bits as usize;
            for (o, c) in out
                .chunks_exact_mut(CHUNK)
                .zip(row.chunks_exact(chunk_bytes))
            {
                unpack_chunk(bits, c, &mut idx);
                for (v, &i) in o.iter_mut().zip(&idx) {
                    *v = table[i as usize];
                }
            }
        }
    }
}

/// Checks what the size alone cannot: that `data` (a `rows` × `cols` tensor of `ty`, of the
/// right length) holds values the format allows — every `LUT4_B32` table's entries are at
/// most [`LUT4_B32_ENTRY_MAX`], which the kernels rely on.
pub fn check_data(ty: KilnType, data: &[u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    if ty.data_length(cols, rows) != Some(data.len() as u64) {
        return Err(QuantError(format!(
            "{ty}: {} bytes are not a {rows}x{cols} tensor",
            data.len()
        )));
    }
    if let KilnType::Lut4B32 { .. } = ty {
        let tables = lut4_b32_tables(ty, data, rows, cols);
        for (g, table) in tables.chunks_exact(LUT4_B32_TABLE_BYTES).enumerate() {
            if let Some(k) = table.iter().position(|&e| e > LUT4_B32_ENTRY_MAX) {
                return Err(QuantError(format!(
                    "{ty}: entry {k} of table {g} is {}, the format allows \
                     0..={LUT4_B32_ENTRY_MAX}",
                    table[k]
                )));
            }
        }
    }
    Ok(())
}

/// Every table of a `LUT4_B32` tensor `data` (`rows` × `cols`, of the right length): 16 bytes
/// per group of rows, in group order, after the last row.
///
/// # Panics
/// If `ty` is not `LUT4_B32` or `data` is not a `rows` × `cols` tensor of it.
pub fn lut4_b32_tables(ty: KilnType, data: &[u8], rows: usize, cols: usize) -> &[u8] {
    let n = ty.lut4_b32_tables(rows).expect("shape checked");
    assert!(
        matches!(ty, KilnType::Lut4B32 { .. }) && n > 0,
        "{ty} has no byte tables"
    );
    let start = ty.tables_offset(cols, rows).expect("shape checked");
    &data[start..start + n * LUT4_B32_TABLE_BYTES]
}

/// The table row `r` of a `LUT4_B32` tensor `data` (`rows` × `cols`) uses: its group's.
///
/// # Panics
/// As [`lut4_b32_tables`], and if `r >= rows`.
pub fn lut4_b32_table(
    ty: KilnType,
    data: &[u8],
    rows: usize,
    cols: usize,
    r: usize,
) -> &[u8; LUT4_B32_TABLE_BYTES] {
    assert!(r < rows, "row {r} of {rows}");
    let g = r / ty.group_rows(rows).expect("a table format");
    lut4_b32_tables(ty, data, rows, cols)[g * LUT4_B32_TABLE_BYTES..][..LUT4_B32_TABLE_BYTES]
        .try_into()
        .expect("16 bytes")
}

/// The table of row `r` of a lookup-table tensor, as f32.
fn lut_table(ty: KilnType, data: &[u8], rows: usize, cols: usize, r: usize) -> Vec<f32> {
    let (start, len) = lut_table_range(ty, rows, cols, r);
    data[start..start + len]
        .chunks_exact(2)
        .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// Byte range (start, length) of the f16 table that row `r` of a lookup-table tensor uses.
///
/// # Panics
/// If `ty` is not a lookup-table format or the shape does not fit it.
pub fn lut_table_range(ty: KilnType, rows: usize, cols: usize, r: usize) -> (usize, usize) {
    let KilnType::Lut { group, .. } = ty else {
        panic!("{ty} has no tables");
    };
    let g = group.map_or(0, |g| r / g as usize);
    let len = ty.table_len() * 2;
    let start = ty.tables_offset(cols, rows).expect("shape checked") + g * len;
    (start, len)
}

/// The 32 indices of one chunk of a `bits`-bit lookup-table row (`4 * bits` bytes).
pub fn unpack_chunk(bits: u8, chunk: &[u8], idx: &mut [u8; CHUNK]) {
    match bits {
        8 => idx.copy_from_slice(&chunk[..CHUNK]),
        4 => {
            for j in 0..16 {
                idx[j] = chunk[j] & 0x0f;
                idx[j + 16] = chunk[j] >> 4;
            }
        }
        2 => {
            for j in 0..8 {
                for k in 0..4 {
                    idx[j + 8 * k] = (chunk[j] >> (2 * k)) & 3;
                }
            }
        }
        6 => {
            for j in 0..16 {
                idx[j] = chunk[j] & 0x0f;
                idx[j + 16] = chunk[j] >> 4;
            }
            for j in 0..8 {
                for k in 0..4 {
                    idx[j + 8 * k] |= ((chunk[16 + j] >> (2 * k)) & 3) << 4;
                }
            }
        }
        _ => panic!("no {bits}-bit lookup tables"),
    }
}

/// Packs the 32 indices of one chunk (each below `2^bits`) into `4 * bits` bytes.
pub fn pack_chunk(bits: u8, idx: &[u8; CHUNK], out: &mut [u8]) {
    let out = &mut out[..4 * bits as usize];
    out.fill(0);
    match bits {
        8 => out.copy_from_slice(idx),
        4 => {
            for j in 0..16 {
                out[j] = (idx[j] & 0x0f) | (idx[j + 16] << 4);
            }
        }
        2 => {
            for j in 0..8 {
                for k in 0..4 {
                    out[j] |= (idx[j + 8 * k] & 3) << (2 * k);
                }
            }
        }
        6 => {
            for j in 0..16 {
                out[j] = (idx[j] & 0x0f) | ((idx[j + 16] & 0x0f) << 4);
            }
            for j in 0..8 {
                for k in 0..4 {
                    out[16 + j] |= ((idx[j + 8 * k] >> 4) & 3) << (2 * k);
                }
            }
        }
        _ => panic!("no {bits}-bit lookup tables"),
    }
}

/// Checks a `rows` × `cols` matrix `w` fits `ty` and holds only finite values.
fn check_matrix(ty: KilnType, w: &[f32], rows: usize, cols: usize) -> Result<(), QuantError> {
    if rows.checked_mul(cols) != Some(w.len()) {
        return Err(QuantError(format!(
            "{ty}: a {rows}x{cols} matrix needs {} values, got {}",
            rows.saturating_mul(cols),
            w.len()
        )));
    }
    if ty.data_length(cols, rows).is_none() {
        return Err(QuantError(format!(
            "{ty} does not fit a {rows}x{cols} matrix: rows must be a multiple of {} elements{}",
            ty.row_multiple(),
            match ty {
                KilnType::Lut { group: Some(g), .. } | KilnType::Lut4B32 { group: Some(g) } => {
                    format!(" and {g} must divide {rows}")
                }
                _ => String::new(),
            }
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError(format!(
            "weight {i} (row {}, column {}) is {}: only finite weights can be quantized",
            i / cols,
            i % cols,
            w[i]
        )));
    }
    Ok(())
}

/// Bytes of an `I8_CH` row scale (an f32).
pub const I8_CH_SCALE_BYTES: usize = 4;

/// The f32 scale of row `r` of the `I8_CH` tensor `data` (`rows` × `cols`), stored after the
/// codes of every row.
///
/// # Panics
/// If `data` is shorter than the tensor, or `r >= rows`.
// Inline across crates: the decode kernels read a tile's scales through it, and as a call per
// row it took 2 % of SmolLM2's decode samples.
#[inline]
pub fn i8_ch_scale(data: &[u8], rows: usize, cols: usize, r: usize) -> f32 {
    assert!(r < rows, "I8_CH: row {r} of {rows}");
    let at = rows * cols + r * I8_CH_SCALE_BYTES;
    let b = &data[at..at + I8_CH_SCALE_BYTES];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Encodes `w` (`rows` × `cols`, row-major) as `I8_CH`: per row the f32 scale
/// `max |w| / 127` and codes rounded to nearest (every weight within half a step); the codes
/// of every row first, then the scales.
pub fn encode_i8_channel(w: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    check_matrix(KilnType::I8Ch, w, rows, cols)?;
    let q = quant::quantize_int8_channel(w, rows, cols)?;
    let mut out = Vec::with_capacity(rows * (cols + I8_CH_SCALE_BYTES));
    out.extend(q.codes().iter().map(|&c| c as u8));
    for s in q.scales() {
        out.extend_from_slice(&s.to_le_bytes());
    }
    Ok(out)
}

/// Encodes `w` (`rows` × `cols`, row-major) as `I4_B64`, each block's scale searched for the
/// least squared error among those that leave its largest weight unclipped
/// ([`quantize_int4_unclipped`]).
pub fn encode_i4_b64(w: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    check_matrix(KilnType::I4B64, w, rows, cols)?;
    let blocks = w.len() / I4_BLOCK;
    let mut out = vec![0u8; blocks * I4_BLOCK_BYTES];
    quant::par_chunks(&mut out, 1024 * I4_BLOCK_BYTES, |start, dst| {
        let first = start / I4_BLOCK_BYTES;
        for (k, y) in dst.chunks_exact_mut(I4_BLOCK_BYTES).enumerate() {
            let b = first + k;
            let x = &w[b * I4_BLOCK..(b + 1) * I4_BLOCK];
            let mut codes = [8u8; I4_BLOCK];
            let d = quantize_int4_unclipped(x, &mut codes);
            y[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
            for j in 0..I4_BLOCK / 2 {
                y[2 + j] = codes[j] | (codes[j + I4_BLOCK / 2] << 4);
            }
        }
    });
    Ok(out)
}

/// Codes of `x` for scale `d` (`q` in 0..=15 for `d · (q − 8)`), and the squared error.
/// Halfway cases round to even, or away from zero with `ties_away`.
fn int4_codes(x: &[f32], d: f32, codes: &mut [u8], ties_away: bool) -> f32 {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0f32;
    for (c, &v) in codes.iter_mut().zip(x) {
        // Adding and removing 1.5 * 2^23 rounds to nearest (|v * inv| is far below 2^22)
        // without a library call, so the loop vectorises.
        let t = v * inv;
        let mut q = (t + 12_582_912.0) - 12_582_912.0;
        if ties_away && (t - q).abs() == 0.5 && q.abs() < t.abs() {
            q += 1.0f32.copysign(t);
        }
        let q = q.clamp(-8.0, 7.0);
        *c = (q + 8.0) as u8;
        let e = v - d * q;
        err += e * e;
    }
    err
}

/// Symmetric int4 of one block (any length up to 256): fills `codes` (0..=15, for
/// `w = d · (q − 8)`) and returns `d`, exactly representable in f16, chosen by a small search
/// for the least squared error rather than from the largest weight alone.
///
/// The reference scale maps the weight of largest magnitude to −8; smaller divisors clip it,
/// larger ones spend fewer steps on it. Each candidate is tried as f16 stores it, then refitted
/// by least squares for its codes.
pub fn quantize_int4_searched(x: &[f32], codes: &mut [u8]) -> f32 {
    let Some(mut search) = Int4Search::new(x, codes, false) else {
        return 0.0;
    };
    let round = |d: f32| f16_to_f32(f32_to_f16(d));
    for step in 0..=12 {
        let divisor = -(6.5 + step as f32 * 0.25);
        let trial = search.consider(round(search.max / divisor));
        let (mut xq, mut qq) = (0.0f32, 0.0f32);
        for (&c, &v) in trial.iter().zip(x) {
            let q = c as f32 - 8.0;
            xq += v * q;
            qq += q * q;
        }
        if qq > 0.0 {
            search.consider(round(xq / qq));
        }
    }
    search.finish(codes)
}

/// The scale search shared by the int4 block encoders: the block's weight of largest magnitude
/// (sign kept), and the codes and scale of least squared error among those considered.
struct Int4Search<'a> {
    x: &'a [f32],
    ties_away: bool,
    max: f32,
    best_err: f32,
    best_d: f32,
    best: [u8; 256],
    trial: [u8; 256],
}

impl<'a> Int4Search<'a> {
    /// A search over `x` (at most 256 weights, as long as `codes`), or `None` for a block of
    /// zeros, whose codes are then all 8 (the zero code).
    fn new(x: &'a [f32], codes: &mut [u8], ties_away: bool) -> Option<Self> {
        let n = x.len();
        assert!(n <= 256 && codes.len() == n, "block of {n} elements");
        let mut max = 0.0f32;
        for &v in x {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        codes.fill(8);
        (max != 0.0).then_some(Int4Search {
            x,
            ties_away,
            max,
            best_err: f32::INFINITY,
            best_d: 0.0,
            best: [8; 256],
            trial: [0; 256],
        })
    }

    /// Codes `x` with scale `d`, keeps them if their error is the least so far, and returns
    /// them.
    fn consider(&mut self, d: f32) -> &[u8] {
        let n = self.x.len();
        let err = int4_codes(self.x, d, &mut self.trial[..n], self.ties_away);
        if err < self.best_err {
            self.best_err = err;
            self.best_d = d;
            self.best[..n].copy_from_slice(&self.trial[..n]);
        }
        &self.trial[..n]
    }

    /// Writes the best codes into `codes` and returns their scale.
    fn finish(self, codes: &mut [u8]) -> f32 {
        codes.copy_from_slice(&self.best[..self.x.len()]);
        self.best_d
    }
}

/// Symmetric int4 of one block (any length up to 256) that never clips its largest weight:
/// fills `codes` (0..=15, for `w = d · (q − 8)`) and returns `d`, exactly representable in
/// f16, the one of least squared error among the scales that map the weight of largest
/// magnitude to −1 … −8 steps (rounded, not clamped). Halfway cases round away from zero.
///
/// Why not [`quantize_int4_searched`]: in blocks of 64 its least-squares optimum usually
/// clips the largest weight by a step or more to refine the many small ones; that raises the
/// weight SNR by 0.6 dB but costs far more perplexity (SmolLM2 24.67 against 21.98 with this
/// search, Gemma 3 33.61 against 29.25; `docs/quantization.md`). Rounding halfway cases away
/// from zero rather than to even (source values on a `Q4_K` grid often fall exactly halfway)
/// keeps large weights from shrinking too.
///
/// The candidates are the divisors 1, 2, …, 5 (so a block already on a symmetric grid with
/// few levels is kept exactly) and 6.0, 6.1, …, 8.0; the last is the rule of ggml's `Q4_0`,
/// so the error is never larger than that rule's.
pub fn quantize_int4_unclipped(x: &[f32], codes: &mut [u8]) -> f32 {
    let Some(mut search) = Int4Search::new(x, codes, true) else {
        return 0.0;
    };
    let divisors = (1..=5)
        .map(|k| k as f32)
        .chain((60..=80).map(|k| k as f32 / 10.0));
    for divisor in divisors {
        search.consider(f16_to_f32(f32_to_f16(search.max / -divisor)));
    }
    search.finish(codes)
}

/// How a lookup-table encoding is learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LutOptions {
    /// Seed of the k-means++ draws.
    pub seed: u64,
    /// k-means runs from different seeds per table; the one of least error is kept.
    pub restarts: u32,
}

impl Default for LutOptions {
    fn default() -> Self {
        LutOptions {
            seed: 0x6b69_6c6e,
            restarts: 1,
        }
    }
}

/// Encodes `w` (`rows` × `cols`, row-major) as a lookup-table format `ty`: each table learned
/// by 1-D k-means over its group's weights ([`quant::quantize_lut`]: k-means++ seeding, Lloyd
/// iterations to convergence), its entries rounded to f16, and each weight given the index
/// of its nearest stored entry.
pub fn encode_lut(
    ty: KilnType,
    w: &[f32],
    rows: usize,
    cols: usize,
    options: LutOptions,
) -> Result<Vec<u8>, QuantError> {
    encode_lut_weighted(ty, w, rows, cols, options, None)
}

/// [`encode_lut`] with each weight's squared error counted `column_weights[c]` times for its
/// input channel `c` when learning the tables ([`quant::quantize_lut_weighted`]) and choosing
/// among restarts. The stored format is the same.
pub fn encode_lut_weighted(
    ty: KilnType,
    w: &[f32],
    rows: usize,
    cols: usize,
    options: LutOptions,
    column_weights: Option<&[f32]>,
) -> Result<Vec<u8>, QuantError> {
    encode_lut_calibrated(ty, w, rows, cols, options, column_weights, None)
}

/// [`encode_lut_weighted`], and with `feedback` (the factor of the matrix's calibration
/// inputs) each weight's index chosen with error feedback ([`Feedback::quantize_rows`]): the
/// index of the entry nearest the weight after the rounding errors of the input channels
/// quantized before it have been compensated on it. The tables are the same; the product with
/// the calibration inputs, not each weight, is kept as close as the tables allow.
///
/// Errors: those of [`encode_lut_weighted`]; a factor not of `cols` channels.
pub fn encode_lut_calibrated(
    ty: KilnType,
    w: &[f32],
    rows: usize,
    cols: usize,
    options: LutOptions,
    column_weights: Option<&[f32]>,
    feedback: Option<&Feedback>,
) -> Result<Vec<u8>, QuantError> {
    if let Some(f) = feedback {
        if f.channels() != cols {
            return Err(QuantError(format!(
                "error feedback for {} input channels given a matrix of {cols}",
                f.channels()
            )));
        }
    }
    let KilnType::Lut { bits, group } = ty else {
        return Err(QuantError(format!("{ty} is not a lookup-table format")));
    };
    check_matrix(ty, w, rows, cols)?;
    let group_rows = group.map_or(rows, |g| g as usize);
    let entries = 1usize << bits;
    // Per group: the best of `restarts` k-means runs, by squared error of its f16 table.
    let mut tables: Vec<Vec<u16>> = Vec::new();
    let mut best_err: Vec<f64> = Vec::new();
    for run in 0..options.restarts.max(1) {
        let seed = options
            .seed
            .wrapping_add(u64::from(run).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let lut = quant::quantize_lut_weighted(
            w,
            rows,
            cols,
            bits,
            Some(group_rows),
            seed,
            column_weights,
        )?;
        for (g, t) in lut.tables().chunks_exact(entries).enumerate() {
            let mut t16: Vec<u16> = t.iter().map(|&v| f32_to_f16(v)).collect();
            // f16 rounding keeps the order (it is monotone) and may merge entries.
            t16.sort_by(|a, b| f16_to_f32(*a).total_cmp(&f16_to_f32(*b)));
            let group_w = &w[g * group_rows * cols..(g + 1) * group_rows * cols];
            let err = table_error(&t16, group_w, cols, column_weights);
            if run == 0 {
                tables.push(t16);
                best_err.push(err);
            } else if err < best_err[g] {
                tables[g] = t16;
                best_err[g] = err;
            }
        }
    }
    let row_bytes = ty.row_bytes(cols).expect("checked");
    let mut out = vec![0u8; ty.data_length(cols, rows).expect("checked") as usize];
    let (index_part, table_part) = out.split_at_mut(rows * row_bytes);
    let tables_f32: Vec<Vec<f32>> = tables
        .iter()
        .map(|t| t.iter().map(|&h| f16_to_f32(h)).collect())
        .collect();
    let fed: Option<Vec<u8>> = feedback.map(|f| {
        let mut codes = vec![0u8; rows * cols];
        f.quantize_rows(w, &mut codes, |r, v| {
            let table = &tables_f32[r / group_rows];
            let i = nearest(table, v);
            (i, table[i as usize])
        });
        codes
    });
    let rows_per_piece = (65536 / cols).max(1);
    quant::par_chunks(index_part, rows_per_piece * row_bytes, |start, dst| {
        let first = start / row_bytes;
        let mut idx = [0u8; CHUNK];
        for (k, row_out) in dst.chunks_exact_mut(row_bytes).enumerate() {
            let r = first + k;
            let table = &tables_f32[r / group_rows];
            let row = &w[r * cols..(r + 1) * cols];
            let fed_row = fed.as_ref().map(|c| &c[r * cols..(r + 1) * cols]);
            for (c, o) in row_out.chunks_exact_mut(4 * bits as usize).enumerate() {
                let span = c * CHUNK..(c + 1) * CHUNK;
                match fed_row {
                    Some(codes) => idx.copy_from_slice(&codes[span]),
                    None => {
                        for (i, &v) in idx.iter_mut().zip(&row[span]) {
                            *i = nearest(table, v);
                        }
                    }
                }
                pack_chunk(bits, &idx, o);
            }
        }
    });
    for (dst, t) in table_part.chunks_exact_mut(2 * entries).zip(&tables) {
        for (d, &h) in dst.chunks_exact_mut(2).zip(t) {
            d.copy_from_slice(&h.to_le_bytes());
        }
    }
    Ok(out)
}

/// Encodes `w` (`rows` × `cols`, row-major) as `LUT4_B32` or `LUT4_B32_G{n}` (`ty`).
///
/// The tensor's table is learned with the blocks' scales and offsets by alternating least
/// squares ([`quant::lut_block::learn_table`]); with groups, each group's table is refined
/// from it on the group's weights ([`quant::lut_block::refine_tables`]). Each table is put on
/// the 7-bit grid (its first entry 0, its last 127: the blocks' scales and offsets absorb any
/// affine map). Then, per row, every block's scale and offset are fitted to the row's table,
/// the row's units set so the largest magnitudes are ±127, and every block fitted again with
/// its scale and offset rounded to the units, so the stored parameters are the ones searched
/// for.
pub fn encode_lut4_b32(
    ty: KilnType,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, QuantError> {
    let KilnType::Lut4B32 { group } = ty else {
        return Err(QuantError(format!("{ty} is not LUT4_B32")));
    };
    check_matrix(ty, w, rows, cols)?;
    let learned = quant::lut_block::learn_table(w, rows, cols, CHUNK);
    let group_rows = ty.group_rows(rows).expect("a table format");
    let tables: Vec<[u8; LUT4_B32_TABLE_BYTES]> = match group {
        None => vec![lut4_b32_grid(&learned)],
        Some(_) => quant::lut_block::refine_tables(w, rows, cols, CHUNK, group_rows, learned)
            .iter()
            .map(lut4_b32_grid)
            .collect(),
    };
    let tables_f32: Vec<[f32; 16]> = tables
        .iter()
        .map(|t| std::array::from_fn(|k| f32::from(t[k])))
        .collect();
    let max = f32::from(LUT4_B32_ENTRY_MAX);
    let row_bytes = ty.row_bytes(cols).expect("checked");
    let mut out = vec![0u8; ty.data_length(cols, rows).expect("checked") as usize];
    let (row_part, table_part) = out.split_at_mut(rows * row_bytes);
    for (dst, t) in table_part
        .chunks_exact_mut(LUT4_B32_TABLE_BYTES)
        .zip(&tables)
    {
        dst.copy_from_slice(t);
    }
    let nb = cols / CHUNK;
    let rows_per_piece = (16384 / cols).max(1);
    quant::par_chunks(row_part, rows_per_piece * row_bytes, |start, dst| {
        let first = start / row_bytes;
        let mut sm = vec![(0.0f32, 0.0f32); nb];
        let mut q = [0u8; CHUNK];
        for (k, row_out) in dst.chunks_exact_mut(row_bytes).enumerate() {
            let r = first + k;
            let row = &w[r * cols..(r + 1) * cols];
            let t = &tables_f32[r / group_rows];
            let exact = |a: f32, b: f32| (a, b);
            for (p, x) in sm.iter_mut().zip(row.chunks_exact(CHUNK)) {
                let (_, a, b) = quant::lut_block::fit_block(x, t, &exact, &mut q);
                *p = (a, b);
            }
            let unit = |f: fn(&(f32, f32)) -> f32| {
                sm.iter().fold(0.0f32, |acc, p| acc.max(f(p).abs())) / max
            };
            let (su, mu) = (unit(|p| p.0), unit(|p| p.1));
            let to_code = |v: f32, u: f32| {
                if u > 0.0 {
                    (v / u).round().clamp(-max, max)
                } else {
                    0.0
                }
            };
            let round = |a: f32, b: f32| (to_code(a, su) * su, to_code(b, mu) * mu);
            row_out[..4].copy_from_slice(&su.to_le_bytes());
            row_out[4..8].copy_from_slice(&mu.to_le_bytes());
            for (x, blk) in row
                .chunks_exact(CHUNK)
                .zip(row_out[LUT4_B32_ROW_HEADER..].chunks_exact_mut(LUT4_B32_BLOCK_BYTES))
            {
                let (_, a, b) = quant::lut_block::fit_block(x, t, &round, &mut q);
                blk[0] = to_code(a, su) as i8 as u8;
                blk[1] = to_code(b, mu) as i8 as u8;
                pack_chunk(4, &q, &mut blk[2..]);
            }
        }
    });
    Ok(out)
}

/// A learned `LUT4_B32` table (ascending) on the 7-bit grid: its first entry 0, its last at
/// most 127, the span chosen where the entries fall closest to integers, so a uniform table
/// (an affine source, such as ggml's Q4_1) stays exactly uniform.
fn lut4_b32_grid(learned: &[f32; 16]) -> [u8; LUT4_B32_TABLE_BYTES] {
    let (lo, hi) = (learned[0], learned[15]);
    let max = f32::from(LUT4_B32_ENTRY_MAX);
    let rel: [f32; 16] = std::array::from_fn(|k| {
        if hi > lo {
            (learned[k] - lo) / (hi - lo)
        } else {
            k as f32 / 15.0
        }
    });
    let misfit = |span: f32| -> f32 {
        rel.iter()
            .map(|&v| {
                let e = (v * span - (v * span).round()) / span;
                e * e
            })
            .sum()
    };
    let span = (64..=u16::from(LUT4_B32_ENTRY_MAX))
        .rev()
        .map(f32::from)
        .fold((f32::INFINITY, max), |best, sp| {
            let e = misfit(sp);
            if e < best.0 {
                (e, sp)
            } else {
                best
            }
        })
        .1;
    std::array::from_fn(|k| (rel[k] * span).round().clamp(0.0, max) as u8)
}

/// Index of the entry of the ascending `table` nearest to `v` (the lower one on a tie).
fn nearest(table: &[f32], v: f32) -> u8 {
    let i = table.partition_point(|&t| t < v);
    if i == 0 {
        return 0;
    }
    if i == table.len() {
        return (i - 1) as u8;
    }
    if v - table[i - 1] <= table[i] - v {
        (i - 1) as u8
    } else {
        i as u8
    }
}

/// Squared error of `w` against the nearest entries of the f16 table `t16`.
fn table_error(t16: &[u16], w: &[f32], cols: usize, column_weights: Option<&[f32]>) -> f64 {
    let table: Vec<f32> = t16.iter().map(|&h| f16_to_f32(h)).collect();
    w.iter()
        .enumerate()
        .map(|(i, &v)| {
            let e = f64::from(v - table[nearest(&table, v) as usize]);
            let weight = column_weights.map_or(1.0, |cw| f64::from(cw[i % cols]));
            weight * e * e
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for ty in [
            KilnType::I8Ch,
            KilnType::I4B64,
            KilnType::Lut4B32 { group: None },
            KilnType::Lut4B32 { group: Some(16) },
            KilnType::Lut {
                bits: 4,
                group: None,
            },
            KilnType::Lut {
                bits: 6,
                group: Some(16),
            },
        ] {
            assert_eq!(KilnType::from_name(&ty.name()), Some(ty));
            assert_eq!(
                TensorFormat::from_name(&ty.name()),
                Some(TensorFormat::Kiln(ty))
            );
        }
        for bad in [
            "LUT3",
            "LUT4_G0",
            "LUT4_G",
            "LUT4_G01",
            "LUT",
            "I8",
            "LUT4_G-1",
            "LUT4_B32_G0",
            "LUT4_B32_G",
            "LUT4_B32_16",
            "LUT4_B32G16",
            "LUT4_B32_G16_G2",
            "LUT4_B64",
        ] {
            assert_eq!(KilnType::from_name(bad), None, "{bad}");
        }
        assert_eq!(
            TensorFormat::from_name("q4_0"),
            Some(TensorFormat::Ggml(GgmlType::Q4_0))
        );
    }

    #[test]
    fn chunk_packing_round_trips() {
        for bits in LUT_BITS {
            let mut idx = [0u8; CHUNK];
            for (i, v) in idx.iter_mut().enumerate() {
                *v = ((i * 37 + 11) % (1 << bits)) as u8;
            }
            let mut packed = vec![0u8; 4 * bits as usize];
            pack_chunk(bits, &idx, &mut packed);
            let mut back = [0u8; CHUNK];
            unpack_chunk(bits, &packed, &mut back);
            assert_eq!(back, idx, "{bits} bits");
        }
        // The documented order for 4 and 2 bits.
        let idx: [u8; CHUNK] = std::array::from_fn(|i| (i % 4) as u8);
        let mut p = [0u8; 16];
        pack_chunk(4, &idx, &mut p);
        assert_eq!(p[1], 0x11);
        pack_chunk(2, &idx, &mut p);
        assert_eq!(p[0], 0x00);
        assert_eq!(p[3], 0xff);
    }

    #[test]
    fn sizes() {
        let l = KilnType::Lut {
            bits: 4,
            group: Some(2),
        };
        assert_eq!(l.data_length(64, 4), Some(4 * 32 + 2 * 16 * 2));
        assert_eq!(l.data_length(64, 3), None);
        assert_eq!(l.data_length(48, 4), None);
        assert_eq!(KilnType::I8Ch.data_length(64, 3), Some(3 * 68));
        assert_eq!(KilnType::I8Ch.row_bytes(64), Some(64));
        assert_eq!(KilnType::I8Ch.tables_offset(64, 3), Some(3 * 64));
        assert_eq!(KilnType::I4B64.data_length(128, 2), Some(2 * 68));
        assert_eq!(KilnType::I4B64.data_length(96, 2), None);
        let b32 = KilnType::Lut4B32 { group: None };
        assert_eq!(b32.name(), "LUT4_B32");
        assert_eq!(b32.data_length(64, 3), Some(3 * (8 + 36) + 16));
        assert_eq!(b32.data_length(48, 3), None);
        let g2 = KilnType::Lut4B32 { group: Some(2) };
        assert_eq!(g2.name(), "LUT4_B32_G2");
        assert_eq!(g2.data_length(64, 4), Some(4 * (8 + 36) + 2 * 16));
        assert_eq!(g2.data_length(64, 3), None);
        assert_eq!(g2.tables(4), Some(0));
        assert_eq!(g2.lut4_b32_tables(4), Some(2));
        assert_eq!(b32.lut4_b32_tables(3), Some(1));
    }
}
