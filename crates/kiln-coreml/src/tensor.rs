//! The tensors that cross the public interface: model inputs, outputs and states.

use crate::CoreMlError;
use half::f16;
use std::fmt;

/// The element type of a [`Tensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// 32-bit signed integer.
    I32,
}

impl DataType {
    /// The name used in call files and messages: `fp32`, `fp16`, `int32`.
    pub fn name(self) -> &'static str {
        match self {
            DataType::F32 => "fp32",
            DataType::F16 => "fp16",
            DataType::I32 => "int32",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of a [`Tensor`], row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Single-precision elements.
    F32(Vec<f32>),
    /// Half-precision elements.
    F16(Vec<f16>),
    /// 32-bit integer elements.
    I32(Vec<i32>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I32(v) => v.len(),
        }
    }
}

/// A dense row-major tensor: an element type, a shape and exactly `shape.iter().product()`
/// elements (one for a scalar, whose shape is empty).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// A tensor from a shape and elements; refuses data whose length is not the shape's volume.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, CoreMlError> {
        let volume = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| CoreMlError::Tensor(format!("shape {shape:?} overflows")))?;
        if volume != data.len() {
            return Err(CoreMlError::Tensor(format!(
                "shape {shape:?} holds {volume} elements but {} were given",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// A single-precision tensor.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, CoreMlError> {
        Tensor::new(shape, TensorData::F32(data))
    }

    /// A half-precision tensor, rounding each value to the nearest fp16.
    pub fn f16_from_f32(shape: Vec<usize>, data: &[f32]) -> Result<Tensor, CoreMlError> {
        Tensor::new(
            shape,
            TensorData::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
        )
    }

    /// A 32-bit integer tensor.
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Result<Tensor, CoreMlError> {
        Tensor::new(shape, TensorData::I32(data))
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        match self.data {
            TensorData::F32(_) => DataType::F32,
            TensorData::F16(_) => DataType::F16,
            TensorData::I32(_) => DataType::I32,
        }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements (some dimension is zero).
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// The elements converted to f32 (exactly for fp16, and for integers up to 2^24).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}
