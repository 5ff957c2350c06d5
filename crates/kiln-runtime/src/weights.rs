//! Weight tensors as the runtime sees them: matrices left in their file's block format,
//! read from the memory map, and small vectors dequantized to f32 at load.

use crate::error::ModelError;
use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::{GgufFile, TensorInfo};
use std::sync::Arc;

/// A 2-D weight matrix of `rows` output channels, each `cols` contiguous elements in a GGUF
/// block format, borrowed from the model file's memory map.
#[derive(Clone)]
pub struct WeightMatrix {
    file: Arc<GgufFile>,
    info: TensorInfo,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl WeightMatrix {
    /// Looks up tensor `name` and checks it is a matrix of `cols` × `rows` (GGUF order).
    pub fn load(
        file: &Arc<GgufFile>,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<WeightMatrix, ModelError> {
        let info = file.require_tensor(name)?.clone();
        let dims: Vec<u64> = info.dims.clone();
        let shape_ok = match dims.as_slice() {
            [c, r] => *c as usize == cols && *r as usize == rows,
            [c, r, 1] | [c, r, 1, 1] => *c as usize == cols && *r as usize == rows,
            _ => false,
        };
        if !shape_ok {
            return Err(ModelError::bad(
                file.path(),
                format!("tensor '{name}' has shape {dims:?}, expected [{cols}, {rows}]"),
            ));
        }
        let row_bytes = info.ty.row_bytes(cols).ok_or_else(|| {
            ModelError::bad(
                file.path(),
                format!(
                    "tensor '{name}': row of {cols} elements is not a whole number of {} blocks",
                    info.ty.name()
                ),
            )
        })?;
        Ok(WeightMatrix {
            file: Arc::clone(file),
            info,
            rows,
            cols,
            row_bytes,
        })
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input channels (elements per row).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format of the stored weights.
    pub fn format(&self) -> GgmlType {
        self.info.ty
    }

    /// Bytes of the stored weights.
    pub fn n_bytes(&self) -> usize {
        self.row_bytes * self.rows
    }

    /// The stored bytes of row `r`.
    #[inline]
    pub fn row_data(&self, r: usize) -> &[u8] {
        let data = self.file.tensor_data(&self.info);
        &data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantizes row `r` into `out` (`cols` elements), exactly as the format defines.
    #[inline]
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        // The row length was validated against the block size at load, so this cannot fail.
        ggml::dequantize(self.info.ty, self.row_data(r), out).expect("row size validated at load");
    }
}

/// Loads a 1-D f32 vector (norm weights, biases) of length `len`, dequantizing if needed.
pub fn load_vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let info = file.require_tensor(name)?;
    if info.n_elements != len as u64 || info.dims.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(ModelError::bad(
            file.path(),
            format!(
                "tensor '{name}' has shape {:?}, expected [{len}]",
                info.dims
            ),
        ));
    }
    Ok(file.tensor_f32(info)?)
}

/// Like [`load_vector`] but `Ok(None)` when the tensor is absent.
pub fn load_optional_vector(
    file: &GgufFile,
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    if file.tensor(name).is_none() {
        return Ok(None);
    }
    load_vector(file, name, len).map(Some)
}
