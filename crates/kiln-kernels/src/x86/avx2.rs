//! AVX2 kernels (placeholder while the AVX-512 path is brought up).
use kiln_format::ggml::GgmlType;
use crate::activation::QuantizedRow;
use super::tiled_dot_block;
tiled_dot_block!(tile);
unsafe fn tile<const R: usize, const T: usize>(weights: GgmlType, w: *const u8, row_bytes: usize, xs: [&QuantizedRow; T]) -> [[f32; T]; R] {
    unsafe { crate::reference_tile::<R, T>(weights, w, row_bytes, xs) }
}
