//! GGUF metadata values.

/// GGUF metadata value type ids, as stored in the file.
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// The name kiln uses for a value type id in messages.
    pub fn name(id: u32) -> &'static str {
        match id {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            BOOL => "bool",
            STRING => "string",
            ARRAY => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
            _ => "unknown",
        }
    }
}

/// A GGUF metadata value. Arrays hold values of one type each and may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    /// `UINT8` (type 0).
    U8(u8),
    /// `INT8` (type 1).
    I8(i8),
    /// `UINT16` (type 2).
    U16(u16),
    /// `INT16` (type 3).
    I16(i16),
    /// `UINT32` (type 4).
    U32(u32),
    /// `INT32` (type 5).
    I32(i32),
    /// `UINT64` (type 10).
    U64(u64),
    /// `INT64` (type 11).
    I64(i64),
    /// `FLOAT32` (type 6).
    F32(f32),
    /// `FLOAT64` (type 12).
    F64(f64),
    /// `BOOL` (type 7), stored as one byte that must be 0 or 1.
    Bool(bool),
    /// `STRING` (type 8): UTF-8 with a u64 byte length.
    String(String),
    /// `ARRAY` (type 9): an element type, a u64 count, then the elements.
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The value as a u64, if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an i64, if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => i64::try_from(v).ok(),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an f64, if it is a float or an integer (large 64-bit integers round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::U64(v) => Some(v as f64),
            MetadataValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The name of the value's type, for messages: `"u32"`, `"string"`, `"array"`, ….
    pub fn type_name(&self) -> &'static str {
        type_id::name(self.type_id())
    }

    /// The GGUF value type id.
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => type_id::U8,
            MetadataValue::I8(_) => type_id::I8,
            MetadataValue::U16(_) => type_id::U16,
            MetadataValue::I16(_) => type_id::I16,
            MetadataValue::U32(_) => type_id::U32,
            MetadataValue::I32(_) => type_id::I32,
            MetadataValue::U64(_) => type_id::U64,
            MetadataValue::I64(_) => type_id::I64,
            MetadataValue::F32(_) => type_id::F32,
            MetadataValue::F64(_) => type_id::F64,
            MetadataValue::Bool(_) => type_id::BOOL,
            MetadataValue::String(_) => type_id::STRING,
            MetadataValue::Array(_) => type_id::ARRAY,
        }
    }

    /// A short rendering for messages: the value itself for scalars, a summary for long
    /// strings and arrays.
    pub(crate) fn describe(&self) -> String {
        match self {
            MetadataValue::String(s) if s.len() > 40 => {
                let cut = (0..=40).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                format!("string {:?}…", &s[..cut])
            }
            MetadataValue::String(s) => format!("string {s:?}"),
            MetadataValue::Array(a) => format!("array of {} elements", a.len()),
            MetadataValue::U8(v) => format!("u8 {v}"),
            MetadataValue::I8(v) => format!("i8 {v}"),
            MetadataValue::U16(v) => format!("u16 {v}"),
            MetadataValue::I16(v) => format!("i16 {v}"),
            MetadataValue::U32(v) => format!("u32 {v}"),
            MetadataValue::I32(v) => format!("i32 {v}"),
            MetadataValue::U64(v) => format!("u64 {v}"),
            MetadataValue::I64(v) => format!("i64 {v}"),
            MetadataValue::F32(v) => format!("f32 {v}"),
            MetadataValue::F64(v) => format!("f64 {v}"),
            MetadataValue::Bool(v) => format!("bool {v}"),
        }
    }
}

impl From<u8> for MetadataValue {
    fn from(v: u8) -> Self {
        MetadataValue::U8(v)
    }
}
impl From<i8> for MetadataValue {
    fn from(v: i8) -> Self {
        MetadataValue::I8(v)
    }
}
impl From<u16> for MetadataValue {
    fn from(v: u16) -> Self {
        MetadataValue::U16(v)
    }
}
impl From<i16> for MetadataValue {
    fn from(v: i16) -> Self {
        MetadataValue::I16(v)
    }
}
impl From<u32> for MetadataValue {
    fn from(v: u32) -> Self {
        MetadataValue::U32(v)
    }
}
impl From<i32> for MetadataValue {
    fn from(v: i32) -> Self {
        MetadataValue::I32(v)
    }
}
impl From<u64> for MetadataValue {
    fn from(v: u64) -> Self {
        MetadataValue::U64(v)
    }
}
impl From<i64> for MetadataValue {
    fn from(v: i64) -> Self {
        MetadataValue::I64(v)
    }
}
impl From<f32> for MetadataValue {
    fn from(v: f32) -> Self {
        MetadataValue::F32(v)
    }
}
impl From<f64> for MetadataValue {
    fn from(v: f64) -> Self {
        MetadataValue::F64(v)
    }
}
impl From<bool> for MetadataValue {
    fn from(v: bool) -> Self {
        MetadataValue::Bool(v)
    }
}
impl From<String> for MetadataValue {
    fn from(v: String) -> Self {
        MetadataValue::String(v)
    }
}
impl From<&str> for MetadataValue {
    fn from(v: &str) -> Self {
        MetadataValue::String(v.to_owned())
    }
}
impl<T: Into<MetadataValue>> From<Vec<T>> for MetadataValue {
    fn from(v: Vec<T>) -> Self {
        MetadataValue::Array(v.into_iter().map(Into::into).collect())
    }
}
