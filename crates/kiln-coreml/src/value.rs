//! Values inside the executor: MIL element types, dense arrays and literal decoding.
//!
//! Every floating value is held as f32 (fp16 values are f32 numbers that fp16 represents
//! exactly), every integer type as i32, so each op has one code path per kind of element.

use crate::proto;
use half::f16;
use std::fmt;
use std::sync::Arc;

/// A MIL element type (the `DataType` enum of `MIL.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DType {
    Bool,
    Str,
    F16,
    F32,
    F64,
    BF16,
    I4,
    I8,
    I16,
    I32,
    I64,
    U1,
    U2,
    U3,
    U4,
    U6,
    U8,
    U16,
    U32,
    U64,
    F8E4M3,
    F8E5M2,
}

/// How an element type is held in an [`Arr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Float,
    Int,
    Bool,
    Str,
}

impl DType {
    pub fn from_proto(code: i32) -> Option<DType> {
        use proto::DataType as P;
        Some(match P::try_from(code).ok()? {
            P::UnusedType => return None,
            P::Bool => DType::Bool,
            P::String => DType::Str,
            P::Float8e4m3fn => DType::F8E4M3,
            P::Float8e5m2 => DType::F8E5M2,
            P::Float16 => DType::F16,
            P::Float32 => DType::F32,
            P::Float64 => DType::F64,
            P::Bfloat16 => DType::BF16,
            P::Int8 => DType::I8,
            P::Int16 => DType::I16,
            P::Int32 => DType::I32,
            P::Int64 => DType::I64,
            P::Int4 => DType::I4,
            P::Uint8 => DType::U8,
            P::Uint16 => DType::U16,
            P::Uint32 => DType::U32,
            P::Uint64 => DType::U64,
            P::Uint4 => DType::U4,
            P::Uint2 => DType::U2,
            P::Uint1 => DType::U1,
            P::Uint6 => DType::U6,
            P::Uint3 => DType::U3,
        })
    }

    /// The spelling used by the MIL text format and by `cast`'s `dtype` parameter.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Str => "string",
            DType::F16 => "fp16",
            DType::F32 => "fp32",
            DType::F64 => "fp64",
            DType::BF16 => "bf16",
            DType::I4 => "int4",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U1 => "uint1",
            DType::U2 => "uint2",
            DType::U3 => "uint3",
            DType::U4 => "uint4",
            DType::U6 => "uint6",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F8E4M3 => "fp8e4m3fn",
            DType::F8E5M2 => "fp8e5m2",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "bool" => DType::Bool,
            "fp16" => DType::F16,
            "fp32" => DType::F32,
            "fp64" => DType::F64,
            "int8" => DType::I8,
            "int16" => DType::I16,
            "int32" => DType::I32,
            "int64" => DType::I64,
            "uint8" => DType::U8,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            _ => return None,
        })
    }

    pub fn kind(self) -> Kind {
        match self {
            DType::Bool => Kind::Bool,
            DType::Str => Kind::Str,
            DType::F16 | DType::F32 | DType::F64 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => {
                Kind::Float
            }
            _ => Kind::Int,
        }
    }

    /// Bits per element of the packed sub-byte types.
    pub fn sub_byte_bits(self) -> Option<u32> {
        match self {
            DType::U1 => Some(1),
            DType::U2 => Some(2),
            DType::U3 => Some(3),
            DType::I4 | DType::U4 => Some(4),
            DType::U6 => Some(6),
            _ => None,
        }
    }

    /// The inclusive range of an integer type, as far as i32 holds it.
    pub fn int_range(self) -> Option<(i64, i64)> {
        Some(match self {
            DType::I4 => (-8, 7),
            DType::I8 => (-128, 127),
            DType::I16 => (-32768, 32767),
            DType::I32 | DType::I64 => (i32::MIN as i64, i32::MAX as i64),
            DType::U1 => (0, 1),
            DType::U2 => (0, 3),
            DType::U3 => (0, 7),
            DType::U4 => (0, 15),
            DType::U6 => (0, 63),
            DType::U8 => (0, 255),
            DType::U16 => (0, 65535),
            DType::U32 | DType::U64 => (0, i32::MAX as i64),
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of an [`Arr`], shared so that constants and state snapshots cost no copy.
#[derive(Clone, Debug)]
pub(crate) enum Data {
    F(Arc<Vec<f32>>),
    I(Arc<Vec<i32>>),
    B(Arc<Vec<bool>>),
    S(Arc<Vec<String>>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F(v) => v.len(),
            Data::I(v) => v.len(),
            Data::B(v) => v.len(),
            Data::S(v) => v.len(),
        }
    }
}

/// A dense row-major array with its MIL element type.
#[derive(Clone, Debug)]
pub(crate) struct Arr {
    pub dt: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Rounds to the nearest fp16 value (ties to even), keeping the f32 representation.
#[inline]
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

pub(crate) fn volume(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

impl Arr {
    pub fn floats(dt: DType, shape: Vec<usize>, v: Vec<f32>) -> Arr {
        debug_assert_eq!(volume(&shape), Some(v.len()));
        Arr {
            dt,
            shape,
            data: Data::F(Arc::new(v)),
        }
    }

    pub fn ints(dt: DType, shape: Vec<usize>, v: Vec<i32>) -> Arr {
        debug_assert_eq!(volume(&shape), Some(v.len()));
        Arr {
            dt,
            shape,
            data: Data::I(Arc::new(v)),
        }
    }

    pub fn bools(shape: Vec<usize>, v: Vec<bool>) -> Arr {
        debug_assert_eq!(volume(&shape), Some(v.len()));
        Arr {
            dt: DType::Bool,
            shape,
            data: Data::B(Arc::new(v)),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn kind(&self) -> Kind {
        self.dt.kind()
    }

    /// A description for messages, e.g. `fp16[1, 5, 64]`.
    pub fn describe(&self) -> String {
        format!("{}{:?}", self.dt, self.shape)
    }

    pub fn as_f(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_b(&self) -> Option<&[bool]> {
        match &self.data {
            Data::B(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_s(&self) -> Option<&[String]> {
        match &self.data {
            Data::S(v) => Some(v),
            _ => None,
        }
    }

    /// The same elements under another shape of equal volume.
    pub fn reshaped(&self, shape: Vec<usize>) -> Arr {
        Arr {
            dt: self.dt,
            shape,
            data: self.data.clone(),
        }
    }

    /// Rounds float data to fp16 where the element type says fp16.
    pub fn round_to_dtype(self) -> Arr {
        if self.dt != DType::F16 {
            return self;
        }
        match self.data {
            Data::F(mut v) => {
                let needs = v.iter().any(|&x| round_f16(x).to_bits() != x.to_bits());
                if needs {
                    for x in Arc::make_mut(&mut v).iter_mut() {
                        *x = round_f16(*x);
                    }
                }
                Arr {
                    dt: self.dt,
                    shape: self.shape,
                    data: Data::F(v),
                }
            }
            other => Arr {
                dt: self.dt,
                shape: self.shape,
                data: other,
            },
        }
    }
}

/// Unpacks `count` sub-byte elements of `bits` each, least significant bits first (the
/// packing of the blob storage format), sign-extending when `signed`.
pub(crate) fn unpack_sub_byte(bytes: &[u8], bits: u32, count: usize, signed: bool) -> Vec<i32> {
    let mut out = Vec::with_capacity(count);
    let mask = (1u32 << bits) - 1;
    for i in 0..count {
        let bit = i * bits as usize;
        let byte = bit / 8;
        let shift = (bit % 8) as u32;
        let lo = bytes.get(byte).copied().unwrap_or(0) as u32;
        let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u32;
        let raw = ((lo | (hi << 8)) >> shift) & mask;
        let v = if signed && raw & (1 << (bits - 1)) != 0 {
            raw as i32 - (1 << bits)
        } else {
            raw as i32
        };
        out.push(v);
    }
    out
}

fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0xF) as i32;
    let man = (b & 7) as f32;
    if exp == 0xF && b & 7 == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

fn f8e5m2_to_f32(b: u8) -> f32 {
    // E5M2 is the upper byte of an fp16.
    f16::from_bits((b as u16) << 8).to_f32()
}

/// Decodes packed little-endian element bytes (blob data or a `bytes` literal) of type `dt`.
pub(crate) fn decode_bytes(dt: DType, bytes: &[u8], count: usize) -> Result<Data, String> {
    let need = |width: usize| -> Result<(), String> {
        if count.checked_mul(width) != Some(bytes.len()) {
            Err(format!(
                "{count} elements of {dt} need {} bytes, found {}",
                count.saturating_mul(width),
                bytes.len()
            ))
        } else {
            Ok(())
        }
    };
    Ok(match dt {
        DType::F16 => {
            need(2)?;
            Data::F(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ))
        }
        DType::BF16 => {
            need(2)?;
            Data::F(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
            ))
        }
        DType::F32 => {
            need(4)?;
            Data::F(Arc::new(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ))
        }
        DType::F8E4M3 => {
            need(1)?;
            Data::F(Arc::new(bytes.iter().map(|&b| f8e4m3_to_f32(b)).collect()))
        }
        DType::F8E5M2 => {
            need(1)?;
            Data::F(Arc::new(bytes.iter().map(|&b| f8e5m2_to_f32(b)).collect()))
        }
        DType::I8 => {
            need(1)?;
            Data::I(Arc::new(bytes.iter().map(|&b| b as i8 as i32).collect()))
        }
        DType::U8 => {
            need(1)?;
            Data::I(Arc::new(bytes.iter().map(|&b| b as i32).collect()))
        }
        DType::Bool => {
            need(1)?;
            Data::B(Arc::new(bytes.iter().map(|&b| b != 0).collect()))
        }
        DType::I16 => {
            need(2)?;
            Data::I(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as i32)
                    .collect(),
            ))
        }
        DType::U16 => {
            need(2)?;
            Data::I(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as i32)
                    .collect(),
            ))
        }
        DType::I32 => {
            need(4)?;
            Data::I(Arc::new(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ))
        }
        DType::U32 => {
            need(4)?;
            let mut v = Vec::with_capacity(count);
            for c in bytes.chunks_exact(4) {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                v.push(i32::try_from(x).map_err(|_| format!("uint32 value {x} exceeds int32"))?);
            }
            Data::I(Arc::new(v))
        }
        _ => {
            let Some(bits) = dt.sub_byte_bits() else {
                return Err(format!(
                    "elements of type {dt} cannot be decoded from bytes"
                ));
            };
            let need_bytes = (count as u128 * bits as u128).div_ceil(8);
            if need_bytes != bytes.len() as u128 {
                return Err(format!(
                    "{count} elements of {dt} need {need_bytes} bytes, found {}",
                    bytes.len()
                ));
            }
            Data::I(Arc::new(unpack_sub_byte(
                bytes,
                bits,
                count,
                dt == DType::I4,
            )))
        }
    })
}

/// The element type and static dimensions (`None` where unknown) of a MIL tensor type.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorSig {
    pub dt: DType,
    pub dims: Vec<Option<usize>>,
}

impl TensorSig {
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
            .collect();
        format!("{}[{}]", self.dt, dims.join(", "))
    }

    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.dims.iter().copied().collect()
    }

    /// Whether a concrete array fits this signature.
    pub fn accepts(&self, a: &Arr) -> bool {
        a.dt == self.dt
            && a.shape.len() == self.dims.len()
            && a.shape
                .iter()
                .zip(&self.dims)
                .all(|(&s, d)| d.is_none_or(|d| d == s))
    }
}

/// The type of a MIL value: a tensor, or a state wrapping one.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ValueSig {
    Tensor(TensorSig),
    State(TensorSig),
}

fn tensor_sig(t: &proto::TensorType) -> Result<TensorSig, String> {
    let dt = DType::from_proto(t.data_type)
        .ok_or_else(|| format!("unknown element type code {}", t.data_type))?;
    if t.rank < 0 {
        return Err(format!("variadic rank (rank {}) is not supported", t.rank));
    }
    if t.rank as usize != t.dimensions.len() {
        return Err(format!(
            "rank {} but {} dimensions",
            t.rank,
            t.dimensions.len()
        ));
    }
    let mut dims = Vec::with_capacity(t.dimensions.len());
    for d in &t.dimensions {
        dims.push(match &d.dimension {
            Some(proto::DimensionKind::Constant(c)) => Some(
                usize::try_from(c.size)
                    .ok()
                    .filter(|&s| s <= i32::MAX as usize)
                    .ok_or_else(|| format!("dimension {} is too large", c.size))?,
            ),
            Some(proto::DimensionKind::Unknown(u)) if u.variadic => {
                return Err("variadic dimensions are not supported".into())
            }
            _ => None,
        });
    }
    Ok(TensorSig { dt, dims })
}

/// Reads a MIL `ValueType` into a signature; lists, tuples and dictionaries are refused.
pub(crate) fn value_sig(t: Option<&proto::ValueType>) -> Result<ValueSig, String> {
    match t.and_then(|t| t.r#type.as_ref()) {
        Some(proto::ValueTypeKind::TensorType(t)) => Ok(ValueSig::Tensor(tensor_sig(t)?)),
        Some(proto::ValueTypeKind::StateType(s)) => {
            match s.wrapped_type.as_deref().and_then(|t| t.r#type.as_ref()) {
                Some(proto::ValueTypeKind::TensorType(t)) => Ok(ValueSig::State(tensor_sig(t)?)),
                _ => Err("a state must wrap a tensor type".into()),
            }
        }
        Some(proto::ValueTypeKind::ListType(_)) => Err("list values are not supported".into()),
        Some(proto::ValueTypeKind::TupleType(_)) => Err("tuple values are not supported".into()),
        Some(proto::ValueTypeKind::DictionaryType(_)) => {
            Err("dictionary values are not supported".into())
        }
        None => Err("the value has no type".into()),
    }
}

fn checked_ints<T: Copy + Into<i64>>(dt: DType, vals: &[T]) -> Result<Vec<i32>, String> {
    let (lo, hi) = dt
        .int_range()
        .ok_or_else(|| format!("integer literal for a {dt} value"))?;
    vals.iter()
        .map(|&v| {
            let v: i64 = v.into();
            if v < lo || v > hi {
                Err(format!("literal {v} is out of range for {dt}"))
            } else {
                Ok(v as i32)
            }
        })
        .collect()
}

/// Decodes an immediate (in-program) tensor literal of signature `sig`.
pub(crate) fn decode_immediate(sig: &TensorSig, tv: &proto::TensorValue) -> Result<Arr, String> {
    let shape = sig
        .fixed_shape()
        .ok_or_else(|| format!("a literal needs a fixed shape, found {}", sig.describe()))?;
    let count = volume(&shape).ok_or("the literal's shape overflows")?;
    let dt = sig.dt;
    let mismatch = |what: &str| format!("{what} literal for a {dt} value");
    use proto::TensorValueKind as K;
    let data = match &tv.value {
        Some(K::Floats(f)) => match dt.kind() {
            Kind::Float => Data::F(Arc::new(f.values.clone())),
            _ => return Err(mismatch("float")),
        },
        Some(K::Doubles(f)) => match dt.kind() {
            Kind::Float => Data::F(Arc::new(f.values.iter().map(|&x| x as f32).collect())),
            _ => return Err(mismatch("double")),
        },
        Some(K::Ints(v)) => match dt.kind() {
            Kind::Int => Data::I(Arc::new(checked_ints(dt, &v.values)?)),
            Kind::Float => Data::F(Arc::new(v.values.iter().map(|&x| x as f32).collect())),
            Kind::Bool => Data::B(Arc::new(v.values.iter().map(|&x| x != 0).collect())),
            Kind::Str => return Err(mismatch("int")),
        },
        Some(K::LongInts(v)) => match dt.kind() {
            Kind::Int => Data::I(Arc::new(checked_ints(dt, &v.values)?)),
            _ => return Err(mismatch("int64")),
        },
        Some(K::Bools(v)) => match dt.kind() {
            Kind::Bool => Data::B(Arc::new(v.values.clone())),
            _ => return Err(mismatch("bool")),
        },
        Some(K::Strings(v)) => match dt.kind() {
            Kind::Str => Data::S(Arc::new(v.values.clone())),
            _ => return Err(mismatch("string")),
        },
        Some(K::Bytes(b)) => decode_bytes(dt, &b.values, count)?,
        None => return Err("the literal holds no elements".into()),
    };
    if data.len() != count {
        return Err(format!(
            "literal of shape {shape:?} holds {} elements, expected {count}",
            data.len()
        ));
    }
    let arr = Arr { dt, shape, data };
    Ok(arr.round_to_dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_unpacking_is_lsb_first_and_sign_extends_int4() {
        // Two int4 values per byte: low nibble first.
        let v = unpack_sub_byte(&[0x7F, 0x08], 4, 4, true);
        assert_eq!(v, vec![-1, 7, -8, 0]);
        let v = unpack_sub_byte(&[0x7F, 0x08], 4, 4, false);
        assert_eq!(v, vec![15, 7, 8, 0]);
        // Three-bit values straddle bytes.
        let packed: u32 = 5 | (3 << 3) | (7 << 6) | (1 << 9);
        let bytes = packed.to_le_bytes();
        assert_eq!(unpack_sub_byte(&bytes[..2], 3, 4, false), vec![5, 3, 7, 1]);
    }

    #[test]
    fn decode_bytes_checks_lengths() {
        assert!(decode_bytes(DType::F16, &[0, 60, 0], 2).is_err());
        let d = decode_bytes(DType::F16, &[0, 60, 0, 188], 2).unwrap();
        match d {
            Data::F(v) => assert_eq!(*v, vec![1.0, -1.0]),
            _ => panic!(),
        }
        assert!(decode_bytes(DType::U4, &[0xFF], 3).is_err());
        assert!(decode_bytes(DType::U4, &[0xFF, 0x0F], 3).is_ok());
    }

    #[test]
    fn fp8_decoding() {
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e5m2_to_f32(0x3C), 1.0);
        assert!(f8e4m3_to_f32(0x7F).is_nan());
    }
}
