//! The subset of the Core ML model specification that kiln reads, as `prost` messages.
//!
//! Message and field names follow the public specification (`Model.proto`,
//! `FeatureTypes.proto` and `MIL.proto` of the Core ML format); the field numbers are the
//! specification's. Only the messages and fields kiln needs are declared: prost skips every
//! other field while decoding, so models carrying fields we do not model still decode, and
//! a message of ours that omits a field never rejects a file that sets it.
//!
//! Nested messages of the specification (`Value.ImmediateValue`, `Dimension.ConstantDimension`,
//! ...) are flattened to top-level structs named after their path.

#![allow(missing_docs)]

use std::collections::HashMap;

// ---------------------------------------------------------------------------------------------
// Model.proto
// ---------------------------------------------------------------------------------------------

/// `CoreML.Specification.Model`: the top-level message of `model.mlmodel`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Model {
    #[prost(int32, tag = "1")]
    pub specification_version: i32,
    #[prost(message, optional, tag = "2")]
    pub description: Option<ModelDescription>,
    #[prost(bool, tag = "10")]
    pub is_updatable: bool,
    /// The model's kind. Only the ML Program variant is modelled; any other kind decodes to
    /// `None` here, which the reader reports as "not an ML Program".
    #[prost(oneof = "ModelType", tags = "502")]
    pub r#type: Option<ModelType>,
}

/// The `Type` oneof of `Model`, reduced to the ML Program variant.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ModelType {
    #[prost(message, tag = "502")]
    MlProgram(Program),
}

/// `ModelDescription`: the model's interface.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelDescription {
    #[prost(message, repeated, tag = "1")]
    pub input: Vec<FeatureDescription>,
    #[prost(message, repeated, tag = "10")]
    pub output: Vec<FeatureDescription>,
    #[prost(string, tag = "11")]
    pub predicted_feature_name: String,
    #[prost(string, tag = "12")]
    pub predicted_probabilities_name: String,
    #[prost(message, repeated, tag = "13")]
    pub state: Vec<FeatureDescription>,
    #[prost(message, repeated, tag = "20")]
    pub functions: Vec<FunctionDescription>,
    #[prost(string, tag = "21")]
    pub default_function_name: String,
    #[prost(message, optional, tag = "100")]
    pub metadata: Option<Metadata>,
}

/// `FunctionDescription`: the interface of one function of a multi-function model.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FunctionDescription {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub input: Vec<FeatureDescription>,
    #[prost(message, repeated, tag = "3")]
    pub output: Vec<FeatureDescription>,
    #[prost(message, repeated, tag = "6")]
    pub state: Vec<FeatureDescription>,
}

/// `Metadata`: free-form facts about the model.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(string, tag = "1")]
    pub short_description: String,
    #[prost(string, tag = "2")]
    pub version_string: String,
    #[prost(string, tag = "3")]
    pub author: String,
    #[prost(string, tag = "4")]
    pub license: String,
    #[prost(map = "string, string", tag = "100")]
    pub user_defined: HashMap<String, String>,
}

/// `FeatureDescription`: one named input, output or state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FeatureDescription {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub short_description: String,
    #[prost(message, optional, tag = "3")]
    pub r#type: Option<FeatureType>,
}

// ---------------------------------------------------------------------------------------------
// FeatureTypes.proto
// ---------------------------------------------------------------------------------------------

/// `FeatureType`: the type of a feature.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FeatureType {
    #[prost(oneof = "FeatureTypeKind", tags = "1, 2, 3, 4, 5, 8")]
    pub r#type: Option<FeatureTypeKind>,
    #[prost(bool, tag = "1000")]
    pub is_optional: bool,
}

/// The `Type` oneof of `FeatureType` (dictionaries and sequences are not modelled).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum FeatureTypeKind {
    #[prost(message, tag = "1")]
    Int64Type(Empty),
    #[prost(message, tag = "2")]
    DoubleType(Empty),
    #[prost(message, tag = "3")]
    StringType(Empty),
    #[prost(message, tag = "4")]
    ImageType(ImageFeatureType),
    #[prost(message, tag = "5")]
    MultiArrayType(ArrayFeatureType),
    #[prost(message, tag = "8")]
    StateType(StateFeatureType),
}

/// A message without fields (`Int64FeatureType`, `DoubleFeatureType`, `StringFeatureType`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// `ImageFeatureType`, reduced to its fixed size.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFeatureType {
    #[prost(int64, tag = "1")]
    pub width: i64,
    #[prost(int64, tag = "2")]
    pub height: i64,
}

/// `SizeRange`: an inclusive range; a negative upper bound means unbounded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SizeRange {
    #[prost(uint64, tag = "1")]
    pub lower_bound: u64,
    #[prost(int64, tag = "2")]
    pub upper_bound: i64,
}

/// `ArrayFeatureType`: a multi-array's element type and shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayFeatureType {
    #[prost(int64, repeated, tag = "1")]
    pub shape: Vec<i64>,
    #[prost(enumeration = "ArrayDataType", tag = "2")]
    pub data_type: i32,
    #[prost(oneof = "ShapeFlexibility", tags = "21, 31")]
    pub shape_flexibility: Option<ShapeFlexibility>,
}

/// `ArrayFeatureType.ArrayDataType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ArrayDataType {
    InvalidArrayDataType = 0,
    Float32 = 65568,
    Double = 65600,
    Int32 = 131104,
    Int8 = 131080,
    Float16 = 65552,
}

/// The `ShapeFlexibility` oneof of `ArrayFeatureType`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ShapeFlexibility {
    #[prost(message, tag = "21")]
    EnumeratedShapes(EnumeratedShapes),
    #[prost(message, tag = "31")]
    ShapeRange(ShapeRange),
}

/// `ArrayFeatureType.Shape`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayShape {
    #[prost(int64, repeated, tag = "1")]
    pub shape: Vec<i64>,
}

/// `ArrayFeatureType.EnumeratedShapes`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnumeratedShapes {
    #[prost(message, repeated, tag = "1")]
    pub shapes: Vec<ArrayShape>,
}

/// `ArrayFeatureType.ShapeRange`: one size range per dimension.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShapeRange {
    #[prost(message, repeated, tag = "1")]
    pub size_ranges: Vec<SizeRange>,
}

/// `StateFeatureType`: a state wraps a multi-array.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateFeatureType {
    #[prost(oneof = "StateFeatureKind", tags = "1")]
    pub r#type: Option<StateFeatureKind>,
}

/// The `Type` oneof of `StateFeatureType`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum StateFeatureKind {
    #[prost(message, tag = "1")]
    ArrayType(ArrayFeatureType),
}

// ---------------------------------------------------------------------------------------------
// MIL.proto (package CoreML.Specification.MILSpec)
// ---------------------------------------------------------------------------------------------

/// `MILSpec.Program`: a set of named functions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Program {
    #[prost(int64, tag = "1")]
    pub version: i64,
    #[prost(map = "string, message", tag = "2")]
    pub functions: HashMap<String, Function>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
    #[prost(map = "string, message", tag = "4")]
    pub attributes: HashMap<String, Value>,
}

/// `MILSpec.Function`: typed inputs and one block per opset specialization.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(message, repeated, tag = "1")]
    pub inputs: Vec<NamedValueType>,
    #[prost(string, tag = "2")]
    pub opset: String,
    #[prost(map = "string, message", tag = "3")]
    pub block_specializations: HashMap<String, Block>,
    #[prost(map = "string, message", tag = "4")]
    pub attributes: HashMap<String, Value>,
}

/// `MILSpec.Block`: topologically sorted operations and the names it returns.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Block {
    #[prost(message, repeated, tag = "1")]
    pub inputs: Vec<NamedValueType>,
    #[prost(string, repeated, tag = "2")]
    pub outputs: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub operations: Vec<Operation>,
    #[prost(map = "string, message", tag = "4")]
    pub attributes: HashMap<String, Value>,
}

/// `MILSpec.Argument`: one or more bindings (a name or a literal value).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Argument {
    #[prost(message, repeated, tag = "1")]
    pub arguments: Vec<Binding>,
}

/// `MILSpec.Argument.Binding`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Binding {
    #[prost(oneof = "BindingKind", tags = "1, 2")]
    pub binding: Option<BindingKind>,
}

/// The `binding` oneof of `Argument.Binding`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum BindingKind {
    #[prost(string, tag = "1")]
    Name(String),
    #[prost(message, tag = "2")]
    Value(Value),
}

/// `MILSpec.Operation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Operation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(map = "string, message", tag = "2")]
    pub inputs: HashMap<String, Argument>,
    #[prost(message, repeated, tag = "3")]
    pub outputs: Vec<NamedValueType>,
    #[prost(message, repeated, tag = "4")]
    pub blocks: Vec<Block>,
    #[prost(map = "string, message", tag = "5")]
    pub attributes: HashMap<String, Value>,
}

/// `MILSpec.NamedValueType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NamedValueType {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<ValueType>,
}

/// `MILSpec.ValueType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(oneof = "ValueTypeKind", tags = "1, 2, 3, 4, 5")]
    pub r#type: Option<ValueTypeKind>,
}

/// The `type` oneof of `ValueType`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueTypeKind {
    #[prost(message, tag = "1")]
    TensorType(TensorType),
    #[prost(message, tag = "2")]
    ListType(Box<ListType>),
    #[prost(message, tag = "3")]
    TupleType(TupleType),
    #[prost(message, tag = "4")]
    DictionaryType(Box<DictionaryType>),
    #[prost(message, tag = "5")]
    StateType(Box<StateType>),
}

/// `MILSpec.DataType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    UnusedType = 0,
    Bool = 1,
    String = 2,
    Float8e4m3fn = 40,
    Float8e5m2 = 41,
    Float16 = 10,
    Float32 = 11,
    Float64 = 12,
    Bfloat16 = 13,
    Int8 = 21,
    Int16 = 22,
    Int32 = 23,
    Int64 = 24,
    Int4 = 25,
    Uint8 = 31,
    Uint16 = 32,
    Uint32 = 33,
    Uint64 = 34,
    Uint4 = 35,
    Uint2 = 36,
    Uint1 = 37,
    Uint6 = 38,
    Uint3 = 39,
}

/// `MILSpec.TensorType`: element type, rank and dimensions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorType {
    #[prost(enumeration = "DataType", tag = "1")]
    pub data_type: i32,
    #[prost(int64, tag = "2")]
    pub rank: i64,
    #[prost(message, repeated, tag = "3")]
    pub dimensions: Vec<Dimension>,
    #[prost(map = "string, message", tag = "4")]
    pub attributes: HashMap<String, Value>,
}

/// `MILSpec.TupleType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TupleType {
    #[prost(message, repeated, tag = "1")]
    pub types: Vec<ValueType>,
}

/// `MILSpec.ListType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListType {
    #[prost(message, optional, boxed, tag = "1")]
    pub r#type: Option<Box<ValueType>>,
    #[prost(message, optional, tag = "2")]
    pub length: Option<Dimension>,
}

/// `MILSpec.DictionaryType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DictionaryType {
    #[prost(message, optional, boxed, tag = "1")]
    pub key_type: Option<Box<ValueType>>,
    #[prost(message, optional, boxed, tag = "2")]
    pub value_type: Option<Box<ValueType>>,
}

/// `MILSpec.StateType`: a state wraps a tensor type.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateType {
    #[prost(message, optional, boxed, tag = "1")]
    pub wrapped_type: Option<Box<ValueType>>,
}

/// `MILSpec.Dimension`: a constant size or an unknown one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dimension {
    #[prost(oneof = "DimensionKind", tags = "1, 2")]
    pub dimension: Option<DimensionKind>,
}

/// The `dimension` oneof of `Dimension`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum DimensionKind {
    #[prost(message, tag = "1")]
    Constant(ConstantDimension),
    #[prost(message, tag = "2")]
    Unknown(UnknownDimension),
}

/// `Dimension.ConstantDimension`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConstantDimension {
    #[prost(uint64, tag = "1")]
    pub size: u64,
}

/// `Dimension.UnknownDimension`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnknownDimension {
    #[prost(bool, tag = "1")]
    pub variadic: bool,
}

/// `MILSpec.Value`: a typed literal, held in the program or in a weight blob file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub doc_string: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<ValueType>,
    #[prost(oneof = "ValueKind", tags = "3, 5")]
    pub value: Option<ValueKind>,
}

/// The `value` oneof of `Value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(message, tag = "3")]
    ImmediateValue(ImmediateValue),
    #[prost(message, tag = "5")]
    BlobFileValue(BlobFileValue),
}

/// `Value.ImmediateValue`: a literal inside the program.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImmediateValue {
    #[prost(oneof = "ImmediateValueKind", tags = "1, 2, 3, 4")]
    pub value: Option<ImmediateValueKind>,
}

/// The `value` oneof of `Value.ImmediateValue`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ImmediateValueKind {
    #[prost(message, tag = "1")]
    Tensor(TensorValue),
    #[prost(message, tag = "2")]
    Tuple(TupleValue),
    #[prost(message, tag = "3")]
    List(ListValue),
    #[prost(message, tag = "4")]
    Dictionary(DictionaryValue),
}

/// `Value.BlobFileValue`: where a literal lives in a weight file. `offset` is the offset of
/// the blob's metadata record, not of its data.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobFileValue {
    #[prost(string, tag = "1")]
    pub file_name: String,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
}

/// `MILSpec.TensorValue`: literal elements, in one of several encodings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorValue {
    #[prost(oneof = "TensorValueKind", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub value: Option<TensorValueKind>,
}

/// The `value` oneof of `TensorValue`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum TensorValueKind {
    #[prost(message, tag = "1")]
    Floats(RepeatedFloats),
    #[prost(message, tag = "2")]
    Ints(RepeatedInts),
    #[prost(message, tag = "3")]
    Bools(RepeatedBools),
    #[prost(message, tag = "4")]
    Strings(RepeatedStrings),
    #[prost(message, tag = "5")]
    LongInts(RepeatedLongInts),
    #[prost(message, tag = "6")]
    Doubles(RepeatedDoubles),
    #[prost(message, tag = "7")]
    Bytes(RepeatedBytes),
}

/// `TensorValue.RepeatedFloats`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedFloats {
    #[prost(float, repeated, tag = "1")]
    pub values: Vec<f32>,
}

/// `TensorValue.RepeatedDoubles`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedDoubles {
    #[prost(double, repeated, tag = "1")]
    pub values: Vec<f64>,
}

/// `TensorValue.RepeatedInts`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedInts {
    #[prost(int32, repeated, tag = "1")]
    pub values: Vec<i32>,
}

/// `TensorValue.RepeatedLongInts`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedLongInts {
    #[prost(int64, repeated, tag = "1")]
    pub values: Vec<i64>,
}

/// `TensorValue.RepeatedBools`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedBools {
    #[prost(bool, repeated, tag = "1")]
    pub values: Vec<bool>,
}

/// `TensorValue.RepeatedStrings`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedStrings {
    #[prost(string, repeated, tag = "1")]
    pub values: Vec<String>,
}

/// `TensorValue.RepeatedBytes`: packed element bytes (used for fp16 and 8-bit literals).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RepeatedBytes {
    #[prost(bytes = "vec", tag = "1")]
    pub values: Vec<u8>,
}

/// `MILSpec.TupleValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TupleValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

/// `MILSpec.ListValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

/// `MILSpec.DictionaryValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DictionaryValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<KeyValuePair>,
}

/// `DictionaryValue.KeyValuePair`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValuePair {
    #[prost(message, optional, tag = "1")]
    pub key: Option<Value>,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Value>,
}
