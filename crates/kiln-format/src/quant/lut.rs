//! Palettization: weights as indices into small tables learned by k-means.

use super::kmeans::{check_weights, kmeans_1d, kmeans_1d_weighted, KMeansOptions, SplitMix64};
use super::{bits, check_input, par, QuantError, QuantMatrix, Scheme};

/// Index widths a [`Lut`] may use (those Core ML's `constexpr_lut_to_dense` accepts).
pub const LUT_BITS: [u8; 6] = [1, 2, 3, 4, 6, 8];

/// A `[rows, cols]` matrix as `bits`-bit indices into tables of `2^bits` f32 values, one table
/// per group of `group_channels` consecutive output channels (rows), or one for the whole
/// tensor: `w[r][c] = tables[group(r) * 2^bits + index(r, c)]`.
///
/// Layout:
/// - `indices`: the row-major element stream packed least significant bit first: element `i`
///   occupies bits `i*bits .. (i+1)*bits` of the stream, bit `j` of the stream being bit `j % 8`
///   of byte `j / 8` (Core ML's sub-byte order; for 4 bits, element `2i` is the low nibble of
///   byte `i`). A row starts on a byte boundary whenever `cols * bits` is a multiple of 8.
/// - `tables`: `groups × 2^bits` values, each table ascending. When a group has fewer distinct
///   weights than entries, the table repeats its last value.
#[derive(Debug, Clone, PartialEq)]
pub struct Lut {
    rows: usize,
    cols: usize,
    bits: u8,
    group_channels: Option<usize>,
    tables: Vec<f32>,
    indices: Vec<u8>,
}

impl Lut {
    /// Rebuilds a matrix from stored parts, checking their sizes.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        bits: u8,
        group_channels: Option<usize>,
        tables: Vec<f32>,
        indices: Vec<u8>,
    ) -> Result<Self, QuantError> {
        check_lut_args(rows, bits, group_channels)?;
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| QuantError::new(format!("lut {rows}x{cols}: too many elements")))?;
        let groups = group_channels.map_or(1, |g| rows / g);
        let entries = groups << bits;
        if tables.len() != entries || indices.len() != bits::packed_len(n, bits) {
            return Err(QuantError::new(format!(
                "lut{bits} {rows}x{cols}: {} table entries and {} index bytes, expected {entries} and {}",
                tables.len(),
                indices.len(),
                bits::packed_len(n, bits)
            )));
        }
        Ok(Lut {
            rows,
            cols,
            bits,
            group_channels,
            tables,
            indices,
        })
    }

    /// [`Lut::from_parts`] from one index per element (row-major, unpacked), which it packs.
    ///
    /// Errors: those of [`Lut::from_parts`]; not `rows × cols` indices; an index of more than
    /// `bits` bits.
    pub fn from_indices(
        rows: usize,
        cols: usize,
        bits: u8,
        group_channels: Option<usize>,
        tables: Vec<f32>,
        indices: &[u8],
    ) -> Result<Self, QuantError> {
        check_lut_args(rows, bits, group_channels)?;
        if Some(indices.len()) != rows.checked_mul(cols) {
            return Err(QuantError::new(format!(
                "lut{bits} {rows}x{cols}: {} indices",
                indices.len()
            )));
        }
        if let Some(&bad) = indices.iter().find(|&&i| u16::from(i) >> bits != 0) {
            return Err(QuantError::new(format!(
                "lut{bits}: index {bad} does not fit in {bits} bits"
            )));
        }
        Lut::from_parts(
            rows,
            cols,
            bits,
            group_channels,
            tables,
            bits::pack(indices, bits),
        )
    }

    /// Bits per index.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Output channels per table; `None` when one table serves the whole tensor.
    pub fn group_channels(&self) -> Option<usize> {
        self.group_channels
    }

    /// All tables, `2^bits` entries each, group after group.
    pub fn tables(&self) -> &[f32] {
        &self.tables
    }

    /// The table row `r` uses.
    pub fn table_for_row(&self, r: usize) -> &[f32] {
        let g = self.group_channels.map_or(0, |n| r / n);
        let e = 1usize << self.bits;
        &self.tables[g * e..(g + 1) * e]
    }

    /// Packed indices (see the type's documentation for the bit order).
    pub fn indices(&self) -> &[u8] {
        &self.indices
    }

    /// The table index of element `c` of row `r`.
    pub fn index(&self, r: usize, c: usize) -> u8 {
        bits::get(&self.indices, self.bits, r * self.cols + c)
    }
}

impl QuantMatrix for Lut {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn scheme(&self) -> Scheme {
        Scheme::Lut {
            bits: self.bits,
            group_channels: self.group_channels,
        }
    }
    fn byte_size(&self) -> usize {
        self.indices.len() + 4 * self.tables.len()
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "output row length");
        let table = self.table_for_row(r);
        for (c, o) in out.iter_mut().enumerate() {
            *o = table[self.index(r, c) as usize];
        }
    }

    fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(x.len(), self.cols, "activation length");
        let table = self.table_for_row(r);
        x.iter()
            .enumerate()
            .map(|(c, &v)| table[self.index(r, c) as usize] * v)
            .sum()
    }
}

fn check_lut_args(rows: usize, bits: u8, group_channels: Option<usize>) -> Result<(), QuantError> {
    if !LUT_BITS.contains(&bits) {
        return Err(QuantError::new(format!(
            "a lookup table of {bits} bits is not supported: use one of {LUT_BITS:?}"
        )));
    }
    if let Some(g) = group_channels {
        if g == 0 || rows % g != 0 {
            return Err(QuantError::new(format!(
                "groups of {g} output channels do not divide {rows} rows"
            )));
        }
    }
    Ok(())
}

/// Palettizes `w` (`rows` × `cols`, row-major) with `2^bits`-entry tables, one per group of
/// `group_channels` rows or one for the tensor (`None`), by k-means on each group's weights
/// (k-means++ seeding from `seed`, then Lloyd iterations until no assignment changes or
/// [`DEFAULT_MAX_ITERATIONS`](super::kmeans::DEFAULT_MAX_ITERATIONS)). Each weight then takes
/// the index of its nearest table entry. Groups are independent and run in parallel; the result
/// depends only on the arguments, not on the number of threads.
///
/// Errors: `bits` not in [`LUT_BITS`]; a group size of zero or not dividing `rows`; a shape
/// that does not match `w.len()`; a non-finite weight.
pub fn quantize_lut(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group_channels: Option<usize>,
    seed: u64,
) -> Result<Lut, QuantError> {
    quantize_lut_weighted(w, rows, cols, bits, group_channels, seed, None)
}

/// [`quantize_lut`] with each weight's squared error counted `column_weights[c]` times for its
/// input channel `c` (e.g. the mean square of that channel's activations): the tables minimise
/// `Σ column_weights[c] · (w[r][c] − t[q[r][c]])²` ([`kmeans_1d_weighted`]). Each weight still
/// takes its nearest entry, which is optimal whatever its weight. `None` is [`quantize_lut`].
///
/// Errors: those of [`quantize_lut`]; `column_weights` not `cols` long, or holding a negative
/// or non-finite value, or all zero ([`super::kmeans::check_weights`]).
pub fn quantize_lut_weighted(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group_channels: Option<usize>,
    seed: u64,
    column_weights: Option<&[f32]>,
) -> Result<Lut, QuantError> {
    check_input(w, rows, cols)?;
    check_lut_args(rows, bits, group_channels)?;
    let group_rows = group_channels.unwrap_or(rows);
    let groups = rows / group_rows;
    let entries = 1usize << bits;
    let group_len = group_rows * cols;
    if let Some(cw) = column_weights {
        check_weights(cw, cols).map_err(|e| QuantError::new(format!("column weights: {e}")))?;
    }
    // The weights of one group: the column weights repeated for each of its rows.
    let weights: Option<Vec<f32>> =
        column_weights.map(|cw| (0..group_rows).flat_map(|_| cw.iter().copied()).collect());
    let tables: Vec<Vec<f32>> = par::map_indices(groups, |g| {
        let group_seed =
            SplitMix64(seed ^ (g as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).next_u64();
        let values = &w[g * group_len..(g + 1) * group_len];
        let km = match &weights {
            None => kmeans_1d(values, entries, group_seed, KMeansOptions::default()),
            Some(weights) => kmeans_1d_weighted(
                values,
                weights,
                entries,
                group_seed,
                KMeansOptions::default(),
            )
            .expect("weights checked"),
        };
        let mut table: Vec<f32> = km.centroids.iter().map(|&c| c as f32).collect();
        let last = *table.last().expect("at least one centroid");
        table.resize(entries, last);
        table
    });
    // Decision thresholds between consecutive entries, in f64 where the midpoint of two f32 is
    // exact, so each weight gets the index of its nearest stored entry.
    let thresholds: Vec<Vec<f64>> = tables
        .iter()
        .map(|t| {
            t.windows(2)
                .map(|p| 0.5 * (p[0] as f64 + p[1] as f64))
                .collect()
        })
        .collect();
    let mut idx = vec![0u8; rows * cols];
    let rows_per_chunk = (65536 / cols).max(1);
    par::for_chunks(&mut idx, rows_per_chunk * cols, |start, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let flat = start + i;
            let th = &thresholds[flat / group_len];
            let v = w[flat] as f64;
            *o = th.partition_point(|&m| m <= v) as u8;
        }
    });
    Ok(Lut {
        rows,
        cols,
        bits,
        group_channels,
        tables: tables.concat(),
        indices: bits::pack(&idx, bits),
    })
}
