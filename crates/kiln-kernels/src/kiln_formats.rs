//! Dot-product kernels for the kiln package's own tensor formats
//! ([`kiln_format::kiln_types`]): `I8_CH`, `I4_B64`, the lookup tables `LUT{b}[_G{n}]` and
//! `LUT4_B32[_G{n}]`.
//!
//! - `I8_CH` and `I4_B64` multiply integer weight codes with int8 activations in 32-element
//!   blocks ([`ActivationFormat::Q8_1`]), exactly like the ggml kernels: integer sums per
//!   block, then the activation block's scale, then the weight's scale (per row for `I8_CH`,
//!   per 64-element block for `I4_B64`).
//! - `LUT4_B32` does the same with the weights looked up in the row's 7-bit table (its group's,
//!   or the tensor's; integers, so the
//!   block sums stay exact): per block the integer sum times the block's scale code and the
//!   activation scale, plus the offset code times the activation block sum; the row's units
//!   multiply the two totals at the end.
//! - Lookup tables multiply in integers against 14-bit activations
//!   ([`ActivationFormat::I16`]): each f16 table becomes, once per call, a table of 16-bit
//!   integers `u` with one f32 scale `s` ([`lut_table_i16`]); a weight is `s · u[index]`.
//!   AVX-512 looks the words up in registers and multiplies them with the codes by `vpdpwssd`,
//!   exactly, per activation block: `vpermi2b` over the byte planes of 256 entries (8 bits),
//!   `vpermi2w` over 64 (6 bits), and for 2 and 4 bits `vpermw` over the table repeated
//!   through one register, every row of a tile with its own table. AVX2 multiplies the 2- and
//!   4-bit tables in integers too (`vpshufb` over byte planes, `vpmaddwd`); for 6 and 8 bits,
//!   and on NEON, `s · u` meets the dequantized activations in f32. In f32 the 6- and 8-bit formats were
//!   bound by the lookups and conversions, at about 0.7 times the speed of `Q8_0` and `Q6_K`,
//!   and `LUT2_G16` decoded at 0.89 times `Q2_K`'s speed; int8 activations, one row per
//!   token, cost too much accuracy.
//!
//! [`dot_reference`] is the scalar meaning of every kernel (integer parts exact, the rest in
//! f64); every SIMD kernel (AVX-512, AVX2, NEON with and without the dot-product extension)
//! stays within [`error_bound`] of it. [`Isa::Scalar`] runs the reference.

use std::ops::Range;

use kiln_format::ggml::f16_to_f32;
use kiln_format::kiln_types::{
    self, KilnType, CHUNK, I4_BLOCK, I4_BLOCK_BYTES, LUT4_B32_BLOCK_BYTES, LUT4_B32_ROW_HEADER,
};

use crate::activation::{for_each_i16_block, i16_element, ActivationFormat, QuantizedRow};
use crate::aligned::AlignedVec;
use crate::Isa;

/// The activation format the kernels for `ty` multiply with.
pub fn activation_format(ty: KilnType) -> ActivationFormat {
    match ty {
        KilnType::I8Ch | KilnType::I4B64 | KilnType::Lut4B32 { .. } => ActivationFormat::Q8_1,
        KilnType::Lut { .. } => ActivationFormat::I16,
    }
}

/// The largest magnitude of an entry of a table from [`lut_table_i16`].
///
/// With activation codes of at most `I16_CODE_MAX` = 8191, the AVX-512 kernels' 32-bit sums
/// cannot overflow: `vpdpwssd` adds two products into each of 16 lanes, and a lane sees 2
/// products per 32 elements (the two words of its pair), so over a block of at most 256
/// elements at most 16 products: `16 · 16383 · 8191 = 2_147_057_680 < 2^31 − 1`.
pub const LUT_I16_ENTRY_MAX: i16 = 16383;

/// The f16 table `table` (`2^bits` entries, little-endian) as integers `u` with a scale `s`:
/// `s = max|t| / LUT_I16_ENTRY_MAX` (0 for a table of zeros) and
/// `u[i] = round_half_even(t[i] · (LUT_I16_ENTRY_MAX / max|t|))` (a multiply, not a division:
/// the kernels convert a table per call), within `±LUT_I16_ENTRY_MAX`; returns `s`. Every kernel
/// for the lookup tables multiplies with these weights (`s · u[i]`, within `s / 2` of the
/// stored `t[i]` up to the f32 rounding of `s` and of the product, a few thousandths of `s`);
/// the values of a table with non-finite entries are unspecified.
///
/// # Panics
/// If `u` is shorter than the table.
pub fn lut_table_i16(table: &[u8], u: &mut [i16]) -> f32 {
    let n = table.len() / 2;
    let t = |i: usize| f16_to_f32(u16::from_le_bytes([table[2 * i], table[2 * i + 1]]));
    let amax = (0..n).fold(0.0f32, |m, i| m.max(t(i).abs()));
    let max = f32::from(LUT_I16_ENTRY_MAX);
    let s = amax / max;
    let inv = max / amax;
    for (i, u) in u[..n].iter_mut().enumerate() {
        let q = if s > 0.0 { t(i) * inv } else { 0.0 };
        // max and min drop NaN; the value is finite and within the bound here.
        #[allow(clippy::manual_clamp)]
        let q = q.round_ties_even().max(-max).min(max);
        *u = q as i16;
    }
    s
}

/// A whole tensor in a kiln format, its size checked against its shape: what the kernels
/// read. (Lookup-table rows need their table, which follows the last row, so the kernels
/// take the tensor rather than a row.)
#[derive(Clone, Copy, Debug)]
pub struct KilnMatrix<'a> {
    pub(crate) ty: KilnType,
    pub(crate) data: &'a [u8],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_bytes: usize,
    /// Rows per table of a lookup-table format (`rows` for a tensor-wide one; 1 otherwise):
    /// a kernel finds a row's table without going through the shape again.
    pub(crate) group_rows: u32,
    /// Whether the rows are planar ([`crate::planar::kiln`]) rather than as stored.
    pub(crate) planar: bool,
    /// Every table converted ahead ([`convert_row_tables`]), for the kernels that would
    /// convert them per call (the AVX-512 ones only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) row_tables: Option<&'a [u8]>,
}

impl<'a> KilnMatrix<'a> {
    /// The `rows` × `cols` tensor of format `ty` stored in `data`, or `None` if `data` is not
    /// exactly the size the shape takes in the format.
    pub fn new(ty: KilnType, data: &'a [u8], rows: usize, cols: usize) -> Option<Self> {
        (ty.data_length(cols, rows)? == data.len() as u64).then_some(KilnMatrix {
            ty,
            data,
            rows,
            cols,
            row_bytes: ty.row_bytes(cols)?,
            group_rows: u32::try_from(ty.group_rows(rows).unwrap_or(1)).ok()?,
            planar: false,
            row_tables: None,
        })
    }

    /// This tensor with every table converted ahead: `tables` as [`convert_row_tables`] gives
    /// them for it, or `None` if the format has none of those or `tables` is not their size.
    /// The kernels read the converted tables instead of converting them per call, with the
    /// same results.
    pub fn with_row_tables(self, tables: &'a [u8]) -> Option<Self> {
        (has_row_tables(self.ty) && tables.len() == self.row_tables_len()).then_some(KilnMatrix {
            row_tables: Some(tables),
            ..self
        })
    }

    /// Rows per table of a lookup-table tensor (at least one).
    pub(crate) fn rows_per_table(&self) -> usize {
        self.group_rows.max(1) as usize
    }

    /// Tables of a lookup-table tensor.
    fn table_count(&self) -> usize {
        self.rows.div_ceil(self.rows_per_table())
    }

    /// Bytes of this tensor's converted tables ([`convert_row_tables`]): the planes, then the
    /// scales.
    fn row_tables_len(&self) -> usize {
        self.table_count() * (converted_table_bytes(self.ty) + 4)
    }

    /// Table `g`'s byte planes (the low bytes of its 16-bit integers, then their high bytes)
    /// and scale, from the tables converted ahead; `None` without them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn converted_table(&self, g: usize) -> Option<(&'a [u8], f32)> {
        let tables = self.row_tables?;
        let bytes = converted_table_bytes(self.ty);
        let n = self.table_count();
        let s = &tables[n * bytes + 4 * g..n * bytes + 4 * g + 4];
        Some((
            &tables[g * bytes..(g + 1) * bytes],
            f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        ))
    }

    /// As [`KilnMatrix::new`], for a tensor whose rows were rewritten into the planar layout
    /// ([`crate::planar::kiln::pack_rows`]; the tables after them as stored), or `None`
    /// if `ty` has no planar layout or `data` is not the shape's size.
    pub fn new_planar(ty: KilnType, data: &'a [u8], rows: usize, cols: usize) -> Option<Self> {
        let m = Self::new(ty, data, rows, cols)?;
        let block = match ty {
            KilnType::Lut4B32 { .. } | KilnType::Lut { bits: 4 | 6, .. } => CHUNK,
            // Whole I16 blocks, and the chunks after the last as stored.
            KilnType::Lut { bits: 2, .. } if cols >= crate::activation::I16_BLOCK => CHUNK,
            KilnType::I4B64 => I4_BLOCK,
            _ => return None,
        };
        (cols > 0 && cols.is_multiple_of(block)).then_some(KilnMatrix { planar: true, ..m })
    }

    /// Whether the rows are in the planar layout.
    pub fn is_planar(&self) -> bool {
        self.planar
    }

    /// Row `r` of a planar tensor as a one-row tensor in the stored layout (the row rewritten
    /// into `buf`, its table after it): what the code without planar kernels reads.
    fn stored_row<'b>(&self, r: usize, buf: &'b mut Vec<u8>) -> KilnMatrix<'b> {
        debug_assert!(self.planar);
        buf.clear();
        buf.resize(self.row_bytes, 0);
        crate::planar::kiln::unpack_row(self.ty, self.cols, self.row(r), buf);
        let ty = match self.ty {
            KilnType::Lut4B32 { .. } => {
                buf.extend_from_slice(self.lut4_b32_table(r));
                KilnType::Lut4B32 { group: None }
            }
            KilnType::Lut { bits, .. } => {
                // One row with one table: this row's.
                buf.extend_from_slice(self.table(r));
                KilnType::Lut { bits, group: None }
            }
            KilnType::I4B64 => KilnType::I4B64,
            KilnType::I8Ch => unreachable!("no planar layout for {}", self.ty),
        };
        KilnMatrix::new(ty, buf, 1, self.cols).expect("one stored row and its table")
    }

    /// The format.
    pub fn format(&self) -> KilnType {
        self.ty
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input channels.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes of row `r` (for lookup tables, its indices).
    pub(crate) fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The f16 table row `r` uses (lookup tables only).
    pub(crate) fn table(&self, r: usize) -> &'a [u8] {
        let (start, len) = kiln_types::lut_table_range(self.ty, self.rows, self.cols, r);
        &self.data[start..start + len]
    }

    /// The 7-bit table row `r` (< `rows`) uses (`LUT4_B32` only): the tables follow the last
    /// row, one per group of `group_rows` rows.
    #[inline]
    pub(crate) fn lut4_b32_table(&self, r: usize) -> &'a [u8; 16] {
        debug_assert!(matches!(self.ty, KilnType::Lut4B32 { .. }) && r < self.rows);
        // A 32-bit division: rows are far below 2^32 (the tables would not fit otherwise).
        self.lut4_b32_group_table((r as u32 / self.group_rows) as usize)
    }

    /// The 7-bit table of group `g` of a `LUT4_B32` tensor (rows `g · group_rows ..`).
    #[inline]
    pub(crate) fn lut4_b32_group_table(&self, g: usize) -> &'a [u8; 16] {
        let at = self.rows * self.row_bytes + g * 16;
        self.data[at..at + 16].try_into().expect("16 bytes")
    }
}

/// Whether a tensor of `ty` can carry converted tables ([`convert_row_tables`]): 4-bit tables
/// one per row, and 6- and 8-bit tables however many rows share one.
fn has_row_tables(ty: KilnType) -> bool {
    matches!(
        ty,
        KilnType::Lut {
            bits: 4,
            group: Some(1)
        } | KilnType::Lut { bits: 6 | 8, .. }
    )
}

/// Whether `isa`'s kernel for `ty` reads tables converted ahead
/// ([`KilnMatrix::with_row_tables`]): on AVX-512 with VBMI, 4-bit tables one per row (converting
/// each per token took 15 % of SmolLM2's decode) and the 6- and 8-bit tables (3 % of
/// `lut6-g16`'s, 1 % of `lut8`'s).
pub fn uses_row_tables(isa: Isa, ty: KilnType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512Vnni && crate::x86::kiln_formats::has_vbmi() && has_row_tables(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, ty);
        false
    }
}

/// Bytes of one converted table of `ty`: its 16-bit integers as two byte planes.
fn converted_table_bytes(ty: KilnType) -> usize {
    2 * ty.table_len()
}

/// Every table of `w` converted by [`lut_table_i16`], for [`KilnMatrix::with_row_tables`]:
/// per table the low bytes of its 16-bit integers, then their high bytes (the planes the
/// kernels look up), table after table (one per row for 4 bits), then the tables' f32
/// scales; `None` unless `w`'s format has them ([`uses_row_tables`]). The planes start on a
/// cache line, as the kernels load them 64 bytes at a time.
pub fn convert_row_tables(w: &KilnMatrix) -> Option<AlignedVec<u8>> {
    if !has_row_tables(w.ty) {
        return None;
    }
    let (bytes, n, group) = (
        converted_table_bytes(w.ty),
        w.table_count(),
        w.rows_per_table(),
    );
    let mut out = AlignedVec::filled(w.row_tables_len(), 0u8);
    let (tables, scales) = out.split_at_mut(n * bytes);
    let mut u = vec![0i16; w.ty.table_len()];
    for ((g, t), s) in (0..n)
        .zip(tables.chunks_exact_mut(bytes))
        .zip(scales.chunks_exact_mut(4))
    {
        s.copy_from_slice(&lut_table_i16(w.table(g * group), &mut u).to_le_bytes());
        let (lo, hi) = t.split_at_mut(bytes / 2);
        for ((l, h), u) in lo.iter_mut().zip(hi.iter_mut()).zip(&u) {
            [*l, *h] = u.to_le_bytes();
        }
    }
    Some(out)
}

/// Panics unless every activation row fits `w`.
fn check_activations(w: &KilnMatrix, xq: &[QuantizedRow]) {
    let want = activation_format(w.ty);
    for x in xq {
        assert_eq!(
            x.format(),
            want,
            "dot: {} weights need {want:?} activations, got {:?}",
            w.ty,
            x.format()
        );
        assert_eq!(
            x.len(),
            w.cols,
            "dot: activation rows of {} elements for {} columns",
            x.len(),
            w.cols
        );
    }
}

/// Dot products of weight rows `rows` of `w` with every activation row: for every `t` and
/// `r`, `out[t * out_stride + (r - rows.start)] = dot(row r, xq[t])`, with the kernels of
/// [`crate::detect`]'s level. Each value is what [`dot_reference`] gives within
/// [`error_bound`], and the same for every tiling (prefill and decode agree exactly).
///
/// # Panics
/// If an activation row is not in `activation_format(w.format())` or not `w.cols()` long,
/// if `rows` reaches past `w.rows()`, or if `out` is too short (`out_stride` must be at least
/// `rows.len()` when there is more than one activation row).
pub fn dot_block(
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    dot_block_with(crate::detect(), w, rows, xq, out, out_stride)
}

/// [`dot_block`] with the kernels of a given level.
///
/// # Panics
/// As [`dot_block`], and if the CPU does not have `isa`.
pub fn dot_block_with(
    isa: Isa,
    w: &KilnMatrix,
    rows: Range<usize>,
    xq: &[QuantizedRow],
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        isa.is_available(),
        "dot: this CPU cannot run {isa:?} kernels"
    );
    assert!(
        rows.start <= rows.end && rows.end <= w.rows,
        "dot_block: rows {rows:?} of {}",
        w.rows
    );
    check_activations(w, xq);
    let n_rows = rows.len();
    if n_rows == 0 || xq.is_empty() {
        return;
    }
    crate::check_output(n_rows, xq.len(), out.len(), out_stride);
    if w.planar && !crate::planar::kiln::supported(isa, w.ty, w.cols) {
        // Only the AVX-512 kernel reads planar rows: the others take each row rewritten.
        let mut buf = Vec::new();
        for (k, r) in rows.enumerate() {
            let one = w.stored_row(r, &mut buf);
            dot_block_with(isa, &one, 0..1, xq, &mut out[k..], out_stride);
        }
        return;
    }
    if crate::refined_rows(xq) && !fuses_refined(isa, w.ty) {
        crate::split_refined_block(xq, n_rows, out, out_stride, |split, scratch, stride| {
            dot_block_with(isa, w, rows, split, scratch, stride)
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::x86::kiln_formats::has_kernel(isa, w.ty) {
        // SAFETY: the CPU has `isa` (asserted above); `w` is a checked tensor, every
        // activation row is in its activation format and `w.cols` long (checked above),
        // rows lie within `w` and `out` has room for every (token, row) index (asserted).
        unsafe { crate::x86::kiln_formats::dot_block(isa, w, rows, xq, out, out_stride) };
        return;
    }
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    if crate::arm::kiln_formats::has_kernel(isa, w.ty) {
        // SAFETY: as above, for NEON (and the dot-product extension at NeonDotprod).
        unsafe { crate::arm::kiln_formats::dot_block(isa, w, rows, xq, out, out_stride) };
        return;
    }
    for (t, x) in xq.iter().enumerate() {
        for (k, r) in rows.clone().enumerate() {
            out[t * out_stride + k] = fold(w, r, x).0 as f32;
        }
    }
}

/// Whether `isa`'s kernel for `ty` multiplies refined activation rows
/// ([`crate::quantize_row_refined`]) in one pass: the integer formats on AVX-512. Elsewhere a
/// refined row costs what its two plain rows cost.
pub fn fuses_refined(isa: Isa, ty: KilnType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::kiln_formats::has_kernel(isa, ty) {
        return crate::x86::kiln_formats::fuses_refined(isa, ty);
    }
    let _ = (isa, ty);
    false
}

/// Row `r` of `w` dequantized into `out` (`w.cols()` values): exactly the values of
/// [`kiln_types::dequantize_row`], with the kernels of [`crate::detect`]'s level where there
/// are any (`LUT4_B32` on AVX-512 and AVX2, whose scalar loop of table lookups made prompt
/// processing, which dequantizes every weight once per batch, 2.4 times slower than for
/// `Q4_0`).
///
/// # Panics
/// If `r >= w.rows()` or `out.len() != w.cols()`.
pub fn dequantize_row(w: &KilnMatrix, r: usize, out: &mut [f32]) {
    dequantize_row_with(crate::detect(), w, r, out)
}

/// [`dequantize_row`] with the kernels of a given level.
///
/// # Panics
/// As [`dequantize_row`], and if the CPU does not have `isa`.
pub fn dequantize_row_with(isa: Isa, w: &KilnMatrix, r: usize, out: &mut [f32]) {
    assert!(
        isa.is_available(),
        "dequantize: this CPU cannot run {isa:?} kernels"
    );
    assert!(
        r < w.rows && out.len() == w.cols,
        "dequantize_row: row {r} of {} into {} values for {} columns",
        w.rows,
        out.len(),
        w.cols
    );
    if w.planar && !crate::planar::kiln::supported(isa, w.ty, w.cols) {
        let mut buf = Vec::new();
        let one = w.stored_row(r, &mut buf);
        return dequantize_row_with(isa, &one, 0, out);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::x86::kiln_formats::has_dequantize(isa, w.ty) {
        // SAFETY: the CPU has `isa` (asserted above), `w` is a checked tensor, row `r` lies
        // within it and `out` holds one row (asserted above).
        unsafe { crate::x86::kiln_formats::dequantize_row(isa, w, r, out) };
        return;
    }
    kiln_types::dequantize_row(w.ty, w.data, w.rows, w.cols, r, out);
}

/// Rows `rows` of `w` dequantized one after another into `out` (`rows.len() * w.cols()`
/// values), each exactly as [`dequantize_row`] gives it: what a panel of the prompt GEMM
/// dequantizes, with what consecutive rows share (an 8-bit table's byte planes) made once.
///
/// # Panics
/// If `rows` reaches past `w.rows()` or `out.len()` is not `rows.len() * w.cols()`.
pub fn dequantize_rows(w: &KilnMatrix, rows: Range<usize>, out: &mut [f32]) {
    assert!(
        rows.start <= rows.end && rows.end <= w.rows && out.len() == rows.len() * w.cols,
        "dequantize_rows: rows {rows:?} of {} by {} into {} values",
        w.rows,
        w.cols,
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    {
        let isa = crate::detect();
        if crate::x86::kiln_formats::has_dequantize(isa, w.ty)
            && (!w.planar || crate::planar::kiln::supported(isa, w.ty, w.cols))
        {
            // SAFETY: `detect` reports a level this CPU has, with a kernel for the format and
            // planar rows only where that level reads them; the rows and `out` fit `w`
            // (asserted above).
            unsafe {
                crate::x86::kiln_formats::dequantize_rows(
                    isa,
                    w,
                    rows.start,
                    rows.len(),
                    out.as_mut_ptr(),
                    w.cols,
                )
            };
            return;
        }
    }
    for (r, row) in rows.zip(out.chunks_exact_mut(w.cols.max(1))) {
        dequantize_row(w, r, row);
    }
}

/// Whether [`dequantize_row_bf16`] has a kernel for `w` on this CPU (where it has none, it
/// rounds [`dequantize_row`]'s values one by one): AVX-512 with BF16, as the bf16 GEMM
/// ([`crate::gemm_bf16`]) needs, for every format with an AVX-512 dequantization.
pub fn has_bf16_dequantize(w: &KilnMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::gemm_bf16::bf16_available()
            && crate::x86::kiln_formats::has_dequantize(Isa::Avx512Vnni, w.ty)
            && (!w.planar || crate::planar::kiln::supported(Isa::Avx512Vnni, w.ty, w.cols))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = w;
        false
    }
}

/// Row `r` of `w` dequantized and rounded to bf16 into `out` (`w.cols()` values): each is
/// [`crate::gemm_bf16::to_bf16`] of [`dequantize_row`]'s value, which is what the bf16 GEMM's
/// packing makes of that row. With a kernel ([`has_bf16_dequantize`]) the f32 row is never
/// written: lookup tables are rounded once per table rather than per weight.
///
/// # Panics
/// If `r >= w.rows()` or `out.len() != w.cols()`.
pub fn dequantize_row_bf16(w: &KilnMatrix, r: usize, out: &mut [u16]) {
    dequantize_rows_bf16(w, r..r + 1, out, w.cols)
}

/// Rows `rows` of `w` as [`dequantize_row_bf16`] gives them, row `i` of the range at
/// `out[i * stride..i * stride + w.cols()]`, the words after it up to `stride` set to zero
/// (the bf16 GEMM's pair padding). What a panel of the GEMM packs: a lookup table that
/// consecutive rows share is prepared once.
///
/// # Panics
/// If `rows` reaches past `w.rows()`, `stride < w.cols()`, or `out.len()` is not
/// `rows.len() * stride`.
pub fn dequantize_rows_bf16(w: &KilnMatrix, rows: Range<usize>, out: &mut [u16], stride: usize) {
    assert!(
        rows.start <= rows.end
            && rows.end <= w.rows
            && stride >= w.cols
            && out.len() == rows.len() * stride,
        "dequantize_rows_bf16: rows {rows:?} of {} by {} into {} words, {stride} a row",
        w.rows,
        w.cols,
        out.len()
    );
    for row in out.chunks_exact_mut(stride) {
        row[w.cols..].fill(0);
    }
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dequantize(w) {
        // SAFETY: `has_bf16_dequantize` checked AVX-512 BF16 on the AVX-512 VNNI level, a
        // kernel for the format, and planar rows only where their kernels read them; `w` is a
        // checked tensor and the rows and `out` fit it (asserted above).
        unsafe {
            crate::x86::kiln_formats::dequantize_rows_bf16(w, rows.start, rows.len(), out, stride)
        };
        return;
    }
    let mut values = vec![0.0f32; w.cols];
    for (r, row) in rows.zip(out.chunks_exact_mut(stride)) {
        dequantize_row(w, r, &mut values);
        crate::gemm_bf16::round_to_bf16(&values, &mut row[..w.cols]);
    }
}

/// The scalar reference: `sum_i w[r][i] * x[i]` for row `r` of `w`, with integer parts exact
/// and the rest in f64.
///
/// # Panics
/// If `xq` does not fit `w` (format, length) or `r >= w.rows()`.
pub fn dot_reference(w: &KilnMatrix, r: usize, xq: &QuantizedRow) -> f32 {
    check_activations(w, std::slice::from_ref(xq));
    assert!(r < w.rows, "row {r} of {}", w.rows);
    fold(w, r, xq).0 as f32
}

/// The largest difference guaranteed between a SIMD kernel and [`dot_reference`]:
/// `(cols / 16 + 64) * f32::EPSILON * M`, where `M` bounds every partial sum a kernel forms:
/// `sum_i |w_i x_i|` for lookup tables (with `w = s · u` and `x = d · q`); for the integer formats the same over the codes as the
/// kernels offset them (`|s| (|c| + 128) |x|` for `I8_CH`, `|d| (q + 8) |x|` for `I4_B64`;
/// for `LUT4_B32`, `|S a| u |x|` plus `|M b Σx|` per block).
///
/// # Panics
/// As [`dot_reference`].
pub fn error_bound(w: &KilnMatrix, r: usize, xq: &QuantizedRow) -> f64 {
    check_activations(w, std::slice::from_ref(xq));
    assert!(r < w.rows, "row {r} of {}", w.rows);
    (w.cols / 16 + 64) as f64 * f64::from(f32::EPSILON) * fold(w, r, xq).1
}

/// (dot product, magnitude) of row `r` with `x`, both already checked.
pub(crate) fn fold(w: &KilnMatrix, r: usize, x: &QuantizedRow) -> (f64, f64) {
    if x.is_refined() {
        let [high, low] = x.split_refined();
        let ((s0, m0), (s1, m1)) = (fold(w, r, &high), fold(w, r, &low));
        return (s0 + s1, m0 + m1);
    }
    if w.planar {
        let mut buf = Vec::new();
        return fold(&w.stored_row(r, &mut buf), 0, x);
    }
    let row = w.row(r);
    match w.ty {
        KilnType::I8Ch => {
            let s = f64::from(kiln_types::i8_ch_scale(w.data, w.rows, w.cols, r));
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            for ((c, q), &dx) in row
                .chunks_exact(CHUNK)
                .zip(x.codes.chunks_exact(CHUNK))
                .zip(&x.scales)
            {
                let (mut cq, mut m) = (0i64, 0i64);
                for (&c, &q) in c.iter().zip(q) {
                    let (c, q) = (i64::from(c as i8), i64::from(q));
                    cq += c * q;
                    m += (c.abs() + 128) * q.abs();
                }
                let d = s * f64::from(dx);
                sum += d * cq as f64;
                mag += d.abs() * m as f64;
            }
            (sum, mag)
        }
        KilnType::I4B64 => {
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            for (b, blk) in row.chunks_exact(I4_BLOCK_BYTES).enumerate() {
                let d = f64::from(f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])));
                for half in 0..2 {
                    let a = 2 * b + half;
                    let codes = &x.codes[a * CHUNK..(a + 1) * CHUNK];
                    let (mut qx, mut sx, mut m) = (0i64, 0i64, 0i64);
                    for (&byte, &xc) in blk[2..].iter().zip(codes) {
                        let q = i64::from(if half == 0 { byte & 0x0f } else { byte >> 4 });
                        let xc = i64::from(xc);
                        qx += q * xc;
                        sx += xc;
                        m += (q + 8) * xc.abs();
                    }
                    let dd = d * f64::from(x.scales[a]);
                    sum += dd * (qx - 8 * sx) as f64;
                    mag += dd.abs() * m as f64;
                }
            }
            debug_assert_eq!(row.len() / I4_BLOCK_BYTES * I4_BLOCK, w.cols);
            (sum, mag)
        }
        KilnType::Lut4B32 { .. } => {
            let u = w.lut4_b32_table(r);
            let s = f64::from(f32::from_le_bytes([row[0], row[1], row[2], row[3]]));
            let m = f64::from(f32::from_le_bytes([row[4], row[5], row[6], row[7]]));
            let mut idx = [0u8; CHUNK];
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            for (b, blk) in row[LUT4_B32_ROW_HEADER..]
                .chunks_exact(LUT4_B32_BLOCK_BYTES)
                .enumerate()
            {
                kiln_types::unpack_chunk(4, &blk[2..], &mut idx);
                let (mut ux, mut um) = (0i64, 0i64);
                for (&i, &xc) in idx.iter().zip(&x.codes[b * CHUNK..(b + 1) * CHUNK]) {
                    let (uv, xc) = (i64::from(u[i as usize]), i64::from(xc));
                    ux += uv * xc;
                    um += uv * xc.abs();
                }
                let a = s * f64::from(blk[0] as i8) * f64::from(x.scales[b]);
                let off = m * f64::from(blk[1] as i8) * f64::from(x.sums[b]);
                sum += a * ux as f64 + off;
                mag += a.abs() * um as f64 + off.abs();
            }
            (sum, mag)
        }
        KilnType::Lut { bits, .. } => {
            let mut u = [0i16; 256];
            let s = f64::from(lut_table_i16(w.table(r), &mut u));
            let mut idx = vec![0u8; w.cols];
            for (c, out) in row
                .chunks_exact(4 * bits as usize)
                .zip(idx.chunks_exact_mut(CHUNK))
            {
                kiln_types::unpack_chunk(bits, c, out.try_into().expect("32 indices"));
            }
            let (mut sum, mut mag) = (0.0f64, 0.0f64);
            for_each_i16_block(w.cols, |b, block| {
                let (mut ux, mut um) = (0i64, 0i64);
                let mut g = block.start;
                while g < block.end {
                    let n = if g + 64 <= block.end { 64 } else { 32 };
                    for p in 0..n {
                        let uv = i64::from(u[idx[g + i16_element(p, n)] as usize]);
                        let xc = i64::from(x.wide[g + p]);
                        ux += uv * xc;
                        um += (uv * xc).abs();
                    }
                    g += n;
                }
                let d = s * f64::from(x.scales[b]);
                sum += d * ux as f64;
                mag += d.abs() * um as f64;
            });
            (sum, mag)
        }
    }
}
