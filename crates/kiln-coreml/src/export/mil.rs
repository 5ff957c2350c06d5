//! A small typed builder of MIL programs.
//!
//! Every value is a [`Var`] with an element type and a shape whose dimensions are fixed or
//! unknown until run time (`None`). Ops take named inputs and declare their outputs' types,
//! which the builder infers from the inputs. Literal parameters become `const` ops, as
//! coremltools writes them, so every op input binds a variable by name; weights become
//! `const` ops whose value lives in the package's weight file.
//!
//! Shape mistakes are programming errors of an exporter, not of the user's model; rather than
//! thread a `Result` through every op, the builder records the first one and
//! [`ProgramBuilder::finish`] returns it.

use super::blob_writer::{BlobType, BlobWriter};
use super::ExportError;
use crate::proto::{self, DataType};
use std::collections::{HashMap, HashSet};

/// The specification version the builder emits: iOS 18 / macOS 15, the first with states.
pub const SPECIFICATION_VERSION: i32 = 9;
/// The opset of the emitted function.
pub const OPSET: &str = "CoreML8";
/// The name programs use for the package's weight file.
pub const WEIGHT_FILE: &str = "@model_path/weights/weight.bin";

/// A value of the program: its variable name, element type and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Var {
    name: String,
    dtype: DataType,
    shape: Vec<Option<usize>>,
}

impl Var {
    /// The variable's name in the program.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its element type.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// Its shape; `None` marks a dimension known only at run time.
    pub fn shape(&self) -> &[Option<usize>] {
        &self.shape
    }

    /// Its rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// One dimension of a model input as the description presents it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputDim {
    /// Always this size.
    Fixed(usize),
    /// Any size in the inclusive range.
    Range(usize, usize),
}

/// An op input: one variable, several (`concat`'s `values`), or a value written into the op
/// itself (how coremltools passes the constant inputs of `constexpr_*` ops).
pub enum Arg<'a> {
    /// A single variable.
    One(&'a Var),
    /// A list of variables.
    Many(Vec<&'a Var>),
    /// An inline value.
    Value(proto::Value),
}

/// Builds one function (`main`) of an ML Program, and the model description around it.
pub struct ProgramBuilder {
    ops: Vec<proto::Operation>,
    inputs: Vec<(Var, Vec<InputDim>)>,
    states: Vec<Var>,
    names: HashSet<String>,
    weights: Option<BlobWriter>,
    error: Option<String>,
}

fn tensor_type(dtype: DataType, shape: &[Option<usize>]) -> proto::ValueType {
    proto::ValueType {
        r#type: Some(proto::ValueTypeKind::TensorType(proto::TensorType {
            data_type: dtype as i32,
            rank: shape.len() as i64,
            dimensions: shape
                .iter()
                .map(|d| proto::Dimension {
                    dimension: Some(match d {
                        Some(n) => proto::DimensionKind::Constant(proto::ConstantDimension {
                            size: *n as u64,
                        }),
                        None => proto::DimensionKind::Unknown(proto::UnknownDimension {
                            variadic: false,
                        }),
                    }),
                })
                .collect(),
            attributes: HashMap::new(),
        })),
    }
}

fn state_type(dtype: DataType, shape: &[Option<usize>]) -> proto::ValueType {
    proto::ValueType {
        r#type: Some(proto::ValueTypeKind::StateType(Box::new(
            proto::StateType {
                wrapped_type: Some(Box::new(tensor_type(dtype, shape))),
            },
        ))),
    }
}

fn immediate(dtype: DataType, shape: &[usize], v: proto::TensorValueKind) -> proto::Value {
    let shape: Vec<Option<usize>> = shape.iter().map(|&d| Some(d)).collect();
    proto::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dtype, &shape)),
        value: Some(proto::ValueKind::ImmediateValue(proto::ImmediateValue {
            value: Some(proto::ImmediateValueKind::Tensor(proto::TensorValue {
                value: Some(v),
            })),
        })),
    }
}

fn string_value(s: &str) -> proto::Value {
    immediate(
        DataType::String,
        &[],
        proto::TensorValueKind::Strings(proto::RepeatedStrings {
            values: vec![s.to_string()],
        }),
    )
}

/// The `dtype` string of `cast` for an element type.
fn cast_name(dt: DataType) -> Option<&'static str> {
    Some(match dt {
        DataType::Float16 => "fp16",
        DataType::Float32 => "fp32",
        DataType::Int32 => "int32",
        DataType::Int16 => "int16",
        DataType::Uint16 => "uint16",
        DataType::Int8 => "int8",
        DataType::Uint8 => "uint8",
        DataType::Bool => "bool",
        _ => return None,
    })
}

/// The description's array type for an element type.
fn array_type(dt: DataType) -> Option<proto::ArrayDataType> {
    Some(match dt {
        DataType::Float16 => proto::ArrayDataType::Float16,
        DataType::Float32 => proto::ArrayDataType::Float32,
        DataType::Int32 => proto::ArrayDataType::Int32,
        DataType::Float64 => proto::ArrayDataType::Double,
        DataType::Int8 => proto::ArrayDataType::Int8,
        _ => return None,
    })
}

fn fmt_shape(s: &[Option<usize>]) -> String {
    let d: Vec<String> = s
        .iter()
        .map(|d| d.map_or("?".to_string(), |n| n.to_string()))
        .collect();
    format!("[{}]", d.join(", "))
}

/// Normalizes a possibly negative axis.
fn axis_of(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

impl ProgramBuilder {
    /// A builder whose weight constants go to `weights` (`None`: a program without weights).
    pub fn new(weights: Option<BlobWriter>) -> ProgramBuilder {
        ProgramBuilder {
            ops: Vec::new(),
            inputs: Vec::new(),
            states: Vec::new(),
            names: HashSet::new(),
            weights,
            error: None,
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    /// A fresh variable name based on `hint`.
    fn fresh(&mut self, hint: &str) -> String {
        let base: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let base = if base.is_empty() || base.starts_with(|c: char| c.is_ascii_digit()) {
            format!("v_{base}")
        } else {
            base
        };
        let mut name = base.clone();
        let mut n = 0;
        while self.names.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        self.names.insert(name.clone());
        name
    }

    /// Declares a tensor input of the function; the description presents `dims`.
    pub fn input(&mut self, name: &str, dtype: DataType, dims: &[InputDim]) -> Var {
        if !self.names.insert(name.to_string()) {
            self.fail(format!("input {name} is declared twice"));
        }
        let shape = dims
            .iter()
            .map(|d| match *d {
                InputDim::Fixed(n) => Some(n),
                InputDim::Range(lo, hi) if lo == hi => Some(lo),
                InputDim::Range(..) => None,
            })
            .collect();
        let v = Var {
            name: name.to_string(),
            dtype,
            shape,
        };
        self.inputs.push((v.clone(), dims.to_vec()));
        v
    }

    /// Declares a state of the function (fixed shape, zero at the start of a session).
    pub fn state(&mut self, name: &str, dtype: DataType, shape: &[usize]) -> Var {
        if !self.names.insert(name.to_string()) {
            self.fail(format!("state {name} is declared twice"));
        }
        let v = Var {
            name: name.to_string(),
            dtype,
            shape: shape.iter().map(|&d| Some(d)).collect(),
        };
        self.states.push(v.clone());
        v
    }

    fn push_op(
        &mut self,
        op_type: &str,
        op_name: String,
        inputs: &[(&str, Arg)],
        outputs: Vec<proto::NamedValueType>,
        mut attributes: HashMap<String, proto::Value>,
    ) {
        let inputs = inputs
            .iter()
            .map(|(k, a)| {
                let names: Vec<&Var> = match a {
                    Arg::One(v) => vec![v],
                    Arg::Many(vs) => vs.clone(),
                    Arg::Value(v) => {
                        let arguments = vec![proto::Binding {
                            binding: Some(proto::BindingKind::Value(v.clone())),
                        }];
                        return (k.to_string(), proto::Argument { arguments });
                    }
                };
                let arguments = names
                    .into_iter()
                    .map(|v| proto::Binding {
                        binding: Some(proto::BindingKind::Name(v.name.clone())),
                    })
                    .collect();
                (k.to_string(), proto::Argument { arguments })
            })
            .collect();
        attributes.insert("name".into(), string_value(&op_name));
        self.ops.push(proto::Operation {
            r#type: op_type.to_string(),
            inputs,
            outputs,
            blocks: Vec::new(),
            attributes,
        });
    }

    /// Appends an op of type `op_type` with one output of the given type; the caller vouches
    /// for the output type (the typed helpers below infer it).
    pub fn op(
        &mut self,
        op_type: &str,
        hint: &str,
        inputs: &[(&str, Arg)],
        dtype: DataType,
        shape: Vec<Option<usize>>,
    ) -> Var {
        let name = self.fresh(hint);
        let out = proto::NamedValueType {
            name: name.clone(),
            r#type: Some(tensor_type(dtype, &shape)),
        };
        self.push_op(op_type, name.clone(), inputs, vec![out], HashMap::new());
        Var { name, dtype, shape }
    }

    fn constant(&mut self, hint: &str, dtype: DataType, shape: &[usize], val: proto::Value) -> Var {
        let name = self.fresh(hint);
        let fixed: Vec<Option<usize>> = shape.iter().map(|&d| Some(d)).collect();
        let out = proto::NamedValueType {
            name: name.clone(),
            r#type: Some(tensor_type(dtype, &fixed)),
        };
        let attributes = [("val".to_string(), val)].into_iter().collect();
        self.push_op("const", name.clone(), &[], vec![out], attributes);
        Var {
            name,
            dtype,
            shape: fixed,
        }
    }

    fn check_len(&mut self, what: &str, shape: &[usize], len: usize) -> bool {
        let want: usize = shape.iter().product();
        if want != len {
            self.fail(format!(
                "{what}: {len} values for shape {shape:?} ({want} elements)"
            ));
        }
        want == len
    }

    /// An int32 constant of the given shape.
    pub fn const_i32(&mut self, hint: &str, shape: &[usize], values: &[i32]) -> Var {
        self.check_len(hint, shape, values.len());
        let v = immediate(
            DataType::Int32,
            shape,
            proto::TensorValueKind::Ints(proto::RepeatedInts {
                values: values.to_vec(),
            }),
        );
        self.constant(hint, DataType::Int32, shape, v)
    }

    /// A 1-D int32 constant.
    pub fn ints(&mut self, hint: &str, values: &[i32]) -> Var {
        self.const_i32(hint, &[values.len()], values)
    }

    /// A scalar int32 constant.
    pub fn int(&mut self, hint: &str, value: i32) -> Var {
        self.const_i32(hint, &[], &[value])
    }

    /// A 1-D bool constant.
    pub fn bools(&mut self, hint: &str, values: &[bool]) -> Var {
        let shape = [values.len()];
        let v = immediate(
            DataType::Bool,
            &shape,
            proto::TensorValueKind::Bools(proto::RepeatedBools {
                values: values.to_vec(),
            }),
        );
        self.constant(hint, DataType::Bool, &shape, v)
    }

    /// A scalar bool constant.
    pub fn boolean(&mut self, hint: &str, value: bool) -> Var {
        let v = immediate(
            DataType::Bool,
            &[],
            proto::TensorValueKind::Bools(proto::RepeatedBools {
                values: vec![value],
            }),
        );
        self.constant(hint, DataType::Bool, &[], v)
    }

    /// A scalar string constant (the `dtype` of `cast`, the `mode` of `gelu`).
    pub fn string(&mut self, hint: &str, value: &str) -> Var {
        self.constant(hint, DataType::String, &[], string_value(value))
    }

    /// A small fp32 constant held in the program itself.
    pub fn const_f32(&mut self, hint: &str, shape: &[usize], values: &[f32]) -> Var {
        self.check_len(hint, shape, values.len());
        let v = immediate(
            DataType::Float32,
            shape,
            proto::TensorValueKind::Floats(proto::RepeatedFloats {
                values: values.to_vec(),
            }),
        );
        self.constant(hint, DataType::Float32, shape, v)
    }

    /// A small fp16 constant held in the program itself (packed little-endian bytes).
    pub fn const_f16(&mut self, hint: &str, shape: &[usize], values: &[f32]) -> Var {
        self.check_len(hint, shape, values.len());
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for &x in values {
            bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        }
        let v = immediate(
            DataType::Float16,
            shape,
            proto::TensorValueKind::Bytes(proto::RepeatedBytes { values: bytes }),
        );
        self.constant(hint, DataType::Float16, shape, v)
    }

    /// A scalar float constant of type `dtype` (fp16 or fp32).
    pub fn scalar(&mut self, hint: &str, dtype: DataType, value: f32) -> Var {
        match dtype {
            DataType::Float16 => self.const_f16(hint, &[], &[value]),
            _ => self.const_f32(hint, &[], &[value]),
        }
    }

    /// A weight constant stored in the weight file, as fp16 (`dtype` Float16) or fp32.
    pub fn weight(&mut self, hint: &str, dtype: DataType, shape: &[usize], values: &[f32]) -> Var {
        if !self.check_len(hint, shape, values.len()) {
            return self.const_f32(hint, &[0], &[]);
        }
        let offset = match self.weights.as_mut() {
            None => Err(ExportError::Invalid(format!(
                "weight {hint}: the program has no weight file"
            ))),
            Some(w) => match dtype {
                DataType::Float16 => w.append_f16(values),
                DataType::Float32 => w.append_f32(values),
                other => Err(ExportError::Invalid(format!(
                    "weight {hint}: {other:?} weights are not supported"
                ))),
            },
        };
        let offset = match offset {
            Ok(o) => o,
            Err(e) => {
                self.fail(e.to_string());
                0
            }
        };
        let fixed: Vec<Option<usize>> = shape.iter().map(|&d| Some(d)).collect();
        let val = proto::Value {
            doc_string: String::new(),
            r#type: Some(tensor_type(dtype, &fixed)),
            value: Some(proto::ValueKind::BlobFileValue(proto::BlobFileValue {
                file_name: WEIGHT_FILE.to_string(),
                offset,
            })),
        };
        self.constant(hint, dtype, shape, val)
    }

    /// Writes `data` (`elements` values of `ty`, packed) to the weight file and returns the
    /// value referring to it, typed `dtype` of `shape`: the input of a `constexpr_*` op.
    pub fn blob_value(
        &mut self,
        hint: &str,
        ty: BlobType,
        dtype: DataType,
        shape: &[usize],
        data: &[u8],
    ) -> proto::Value {
        let elements: usize = shape.iter().product();
        let offset = match self.weights.as_mut() {
            None => Err(ExportError::Invalid(format!(
                "weight {hint}: the program has no weight file"
            ))),
            Some(w) => w.append_packed(ty, data, elements),
        };
        let offset = offset.unwrap_or_else(|e| {
            self.fail(format!("weight {hint}: {e}"));
            0
        });
        let fixed: Vec<Option<usize>> = shape.iter().map(|&d| Some(d)).collect();
        proto::Value {
            doc_string: String::new(),
            r#type: Some(tensor_type(dtype, &fixed)),
            value: Some(proto::ValueKind::BlobFileValue(proto::BlobFileValue {
                file_name: WEIGHT_FILE.to_string(),
                offset,
            })),
        }
    }

    /// A `constexpr_*` op (weights decompressed when the model loads) whose inputs are
    /// inline values, with one output of `dtype` and `shape`.
    pub fn constexpr(
        &mut self,
        op_type: &str,
        hint: &str,
        inputs: Vec<(&str, proto::Value)>,
        dtype: DataType,
        shape: &[usize],
    ) -> Var {
        let args: Vec<(&str, Arg)> = inputs
            .into_iter()
            .map(|(k, v)| (k, Arg::Value(v)))
            .collect();
        self.op(
            op_type,
            hint,
            &args,
            dtype,
            shape.iter().map(|&d| Some(d)).collect(),
        )
    }

    // -----------------------------------------------------------------------------------------
    // Typed ops
    // -----------------------------------------------------------------------------------------

    fn broadcast(&mut self, what: &str, a: &Var, b: &Var) -> Vec<Option<usize>> {
        let rank = a.rank().max(b.rank());
        let dim = |v: &Var, i: usize| -> Option<Option<usize>> {
            let off = rank - v.rank();
            (i >= off).then(|| v.shape[i - off])
        };
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let d = match (dim(a, i), dim(b, i)) {
                (None, Some(d)) | (Some(d), None) => d,
                (Some(Some(1)), Some(d)) | (Some(d), Some(Some(1))) => d,
                (Some(Some(x)), Some(Some(y))) if x == y => Some(x),
                (Some(Some(x)), Some(Some(y))) => {
                    self.fail(format!(
                        "{what}: shapes {} and {} do not broadcast ({x} vs {y})",
                        fmt_shape(&a.shape),
                        fmt_shape(&b.shape)
                    ));
                    Some(x)
                }
                (Some(Some(x)), Some(None)) | (Some(None), Some(Some(x))) => Some(x),
                _ => None,
            };
            out.push(d);
        }
        out
    }

    /// An element-wise binary op (`add`, `sub`, `mul`, `real_div`, `pow`, ...), numpy
    /// broadcasting.
    pub fn binary(&mut self, op_type: &str, hint: &str, x: &Var, y: &Var) -> Var {
        if x.dtype != y.dtype {
            self.fail(format!(
                "{op_type} {hint}: x is {:?} but y is {:?}",
                x.dtype, y.dtype
            ));
        }
        let shape = self.broadcast(hint, x, y);
        self.op(
            op_type,
            hint,
            &[("x", Arg::One(x)), ("y", Arg::One(y))],
            x.dtype,
            shape,
        )
    }

    /// `x + y`.
    pub fn add(&mut self, hint: &str, x: &Var, y: &Var) -> Var {
        self.binary("add", hint, x, y)
    }

    /// `x - y`.
    pub fn sub(&mut self, hint: &str, x: &Var, y: &Var) -> Var {
        self.binary("sub", hint, x, y)
    }

    /// `x * y`.
    pub fn mul(&mut self, hint: &str, x: &Var, y: &Var) -> Var {
        self.binary("mul", hint, x, y)
    }

    /// An element-wise unary op (`sin`, `cos`, `silu`, `exp`, ...).
    pub fn unary(&mut self, op_type: &str, hint: &str, x: &Var) -> Var {
        self.op(
            op_type,
            hint,
            &[("x", Arg::One(x))],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// `1 / sqrt(x + epsilon)`.
    pub fn rsqrt(&mut self, hint: &str, x: &Var, epsilon: f32) -> Var {
        let eps = self.scalar(&format!("{hint}_epsilon"), x.dtype, epsilon);
        self.op(
            "rsqrt",
            hint,
            &[("x", Arg::One(x)), ("epsilon", Arg::One(&eps))],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// Converts `x` to `dtype`.
    pub fn cast(&mut self, hint: &str, x: &Var, dtype: DataType) -> Var {
        let Some(name) = cast_name(dtype) else {
            self.fail(format!("cast {hint}: cannot cast to {dtype:?}"));
            return x.clone();
        };
        let d = self.string(&format!("{hint}_dtype"), name);
        self.op(
            "cast",
            hint,
            &[("x", Arg::One(x)), ("dtype", Arg::One(&d))],
            dtype,
            x.shape.clone(),
        )
    }

    /// `x · weightᵀ (+ bias)`, `weight` of shape `[out, in]`.
    pub fn linear(&mut self, hint: &str, x: &Var, weight: &Var, bias: Option<&Var>) -> Var {
        let (out, inn) = match weight.shape.as_slice() {
            [Some(o), Some(i)] => (*o, *i),
            _ => {
                self.fail(format!(
                    "linear {hint}: weight shape {} is not a fixed matrix",
                    fmt_shape(&weight.shape)
                ));
                (0, 0)
            }
        };
        match x.shape.last() {
            Some(Some(d)) if *d == inn => {}
            Some(None) => {}
            _ => self.fail(format!(
                "linear {hint}: x {} does not end in {inn}",
                fmt_shape(&x.shape)
            )),
        }
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = Some(out);
        }
        let mut inputs = vec![("x", Arg::One(x)), ("weight", Arg::One(weight))];
        if let Some(b) = bias {
            inputs.push(("bias", Arg::One(b)));
        }
        self.op("linear", hint, &inputs, x.dtype, shape)
    }

    /// Batched matrix product with optional transposes of the last two axes.
    pub fn matmul(&mut self, hint: &str, x: &Var, y: &Var, tx: bool, ty: bool) -> Var {
        if x.rank() < 2 || y.rank() < 2 {
            self.fail(format!("matmul {hint}: operands must have rank 2 or more"));
            return x.clone();
        }
        let last2 = |v: &Var, t: bool| {
            let (a, b) = (v.shape[v.rank() - 2], v.shape[v.rank() - 1]);
            if t {
                (b, a)
            } else {
                (a, b)
            }
        };
        let (m, kx) = last2(x, tx);
        let (ky, n) = last2(y, ty);
        if let (Some(a), Some(b)) = (kx, ky) {
            if a != b {
                self.fail(format!("matmul {hint}: inner sizes {a} and {b} differ"));
            }
        }
        let bx = Var {
            shape: x.shape[..x.rank() - 2].to_vec(),
            ..x.clone()
        };
        let by = Var {
            shape: y.shape[..y.rank() - 2].to_vec(),
            ..y.clone()
        };
        let mut shape = self.broadcast(hint, &bx, &by);
        shape.push(m);
        shape.push(n);
        let tx = self.boolean(&format!("{hint}_transpose_x"), tx);
        let ty = self.boolean(&format!("{hint}_transpose_y"), ty);
        self.op(
            "matmul",
            hint,
            &[
                ("x", Arg::One(x)),
                ("y", Arg::One(y)),
                ("transpose_x", Arg::One(&tx)),
                ("transpose_y", Arg::One(&ty)),
            ],
            x.dtype,
            shape,
        )
    }

    /// Reshapes to `shape` (at most one `-1`, inferred).
    pub fn reshape(&mut self, hint: &str, x: &Var, shape: &[i64]) -> Var {
        let known: Option<usize> = x.shape.iter().copied().product();
        let rest: usize = shape
            .iter()
            .filter(|&&d| d > 0)
            .map(|&d| d as usize)
            .product();
        let unknown = shape.iter().filter(|&&d| d < 0).count();
        if unknown > 1 || shape.contains(&0) {
            self.fail(format!("reshape {hint}: shape {shape:?} is not supported"));
        }
        let out: Vec<Option<usize>> = shape
            .iter()
            .map(|&d| {
                if d > 0 {
                    Some(d as usize)
                } else {
                    known.and_then(|k| (rest > 0 && k % rest == 0).then(|| k / rest))
                }
            })
            .collect();
        if let (Some(k), 0) = (known, unknown) {
            if k != rest {
                self.fail(format!(
                    "reshape {hint}: {} cannot become {shape:?}",
                    fmt_shape(&x.shape)
                ));
            }
        }
        let s = self.ints(
            &format!("{hint}_shape"),
            &shape.iter().map(|&d| d as i32).collect::<Vec<_>>(),
        );
        self.op(
            "reshape",
            hint,
            &[("x", Arg::One(x)), ("shape", Arg::One(&s))],
            x.dtype,
            out,
        )
    }

    /// Permutes the axes.
    pub fn transpose(&mut self, hint: &str, x: &Var, perm: &[usize]) -> Var {
        let mut sorted = perm.to_vec();
        sorted.sort_unstable();
        if sorted != (0..x.rank()).collect::<Vec<_>>() {
            self.fail(format!(
                "transpose {hint}: {perm:?} is not a permutation of rank {}",
                x.rank()
            ));
            return x.clone();
        }
        let shape = perm.iter().map(|&p| x.shape[p]).collect();
        let p = self.ints(
            &format!("{hint}_perm"),
            &perm.iter().map(|&d| d as i32).collect::<Vec<_>>(),
        );
        self.op(
            "transpose",
            hint,
            &[("x", Arg::One(x)), ("perm", Arg::One(&p))],
            x.dtype,
            shape,
        )
    }

    /// Inserts a unit axis at `axis` (of the output).
    pub fn expand_dims(&mut self, hint: &str, x: &Var, axis: i64) -> Var {
        let Some(a) = axis_of(axis, x.rank() + 1) else {
            self.fail(format!("expand_dims {hint}: axis {axis} out of range"));
            return x.clone();
        };
        let mut shape = x.shape.clone();
        shape.insert(a, Some(1));
        let axes = self.ints(&format!("{hint}_axes"), &[axis as i32]);
        self.op(
            "expand_dims",
            hint,
            &[("x", Arg::One(x)), ("axes", Arg::One(&axes))],
            x.dtype,
            shape,
        )
    }

    /// Joins `values` along `axis`.
    pub fn concat(&mut self, hint: &str, values: &[&Var], axis: i64) -> Var {
        let Some(first) = values.first() else {
            self.fail(format!("concat {hint}: nothing to join"));
            return self.const_f32(hint, &[0], &[]);
        };
        let rank = first.rank();
        let Some(a) = axis_of(axis, rank) else {
            self.fail(format!("concat {hint}: axis {axis} out of range"));
            return (*first).clone();
        };
        let mut shape = first.shape.clone();
        shape[a] = Some(0);
        for v in values {
            if v.rank() != rank || v.dtype != first.dtype {
                self.fail(format!("concat {hint}: operands differ in rank or type"));
            }
            for i in 0..rank.min(v.rank()) {
                if i == a {
                    shape[a] = match (shape[a], v.shape[a]) {
                        (Some(x), Some(y)) => Some(x + y),
                        _ => None,
                    };
                } else if shape[i].is_none() {
                    shape[i] = v.shape[i];
                }
            }
        }
        let ax = self.int(&format!("{hint}_axis"), axis as i32);
        let il = self.boolean(&format!("{hint}_interleave"), false);
        self.op(
            "concat",
            hint,
            &[
                ("values", Arg::Many(values.to_vec())),
                ("axis", Arg::One(&ax)),
                ("interleave", Arg::One(&il)),
            ],
            first.dtype,
            shape,
        )
    }

    /// Picks slices of `x` along `axis` at `indices`.
    pub fn gather(&mut self, hint: &str, x: &Var, indices: &Var, axis: i64) -> Var {
        let Some(a) = axis_of(axis, x.rank()) else {
            self.fail(format!("gather {hint}: axis {axis} out of range"));
            return x.clone();
        };
        let mut shape = x.shape[..a].to_vec();
        shape.extend_from_slice(&indices.shape);
        shape.extend_from_slice(&x.shape[a + 1..]);
        let ax = self.int(&format!("{hint}_axis"), axis as i32);
        self.op(
            "gather",
            hint,
            &[
                ("x", Arg::One(x)),
                ("indices", Arg::One(indices)),
                ("axis", Arg::One(&ax)),
            ],
            x.dtype,
            shape,
        )
    }

    /// Softmax along `axis`.
    pub fn softmax(&mut self, hint: &str, x: &Var, axis: i64) -> Var {
        let ax = self.int(&format!("{hint}_axis"), axis as i32);
        self.op(
            "softmax",
            hint,
            &[("x", Arg::One(x)), ("axis", Arg::One(&ax))],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// `x >= y` element-wise (numpy broadcasting), a bool tensor.
    pub fn greater_equal(&mut self, hint: &str, x: &Var, y: &Var) -> Var {
        if x.dtype != y.dtype {
            self.fail(format!("greater_equal {hint}: operand types differ"));
        }
        let shape = self.broadcast(hint, x, y);
        self.op(
            "greater_equal",
            hint,
            &[("x", Arg::One(x)), ("y", Arg::One(y))],
            DataType::Bool,
            shape,
        )
    }

    /// `a` where `cond` holds, else `b` (numpy broadcasting of all three).
    pub fn select(&mut self, hint: &str, cond: &Var, a: &Var, b: &Var) -> Var {
        if a.dtype != b.dtype || cond.dtype != DataType::Bool {
            self.fail(format!("select {hint}: operand types do not fit"));
        }
        let ab = self.broadcast(hint, a, b);
        let ab = Var {
            shape: ab,
            ..a.clone()
        };
        let shape = self.broadcast(hint, cond, &ab);
        self.op(
            "select",
            hint,
            &[
                ("cond", Arg::One(cond)),
                ("a", Arg::One(a)),
                ("b", Arg::One(b)),
            ],
            a.dtype,
            shape,
        )
    }

    /// GELU; `mode` is `EXACT`, `TANH_APPROXIMATION` or `SIGMOID_APPROXIMATION`.
    pub fn gelu(&mut self, hint: &str, x: &Var, mode: &str) -> Var {
        let m = self.string(&format!("{hint}_mode"), mode);
        self.op(
            "gelu",
            hint,
            &[("x", Arg::One(x)), ("mode", Arg::One(&m))],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// Index of the largest value along the last axis (int32, the axis dropped).
    pub fn argmax_last(&mut self, hint: &str, x: &Var) -> Var {
        let axis = self.int(&format!("{hint}_axis"), -1);
        let keep = self.boolean(&format!("{hint}_keep_dims"), false);
        let mut shape = x.shape.clone();
        shape.pop();
        self.op(
            "reduce_argmax",
            hint,
            &[
                ("x", Arg::One(x)),
                ("axis", Arg::One(&axis)),
                ("keep_dims", Arg::One(&keep)),
            ],
            DataType::Int32,
            shape,
        )
    }

    /// Mean over the last axis, kept as a unit axis.
    pub fn mean_last(&mut self, hint: &str, x: &Var) -> Var {
        self.reduce_last("reduce_mean", hint, x)
    }

    /// A `reduce_*` op (`reduce_mean`, `reduce_max`, …) over the last axis, keeping it.
    pub fn reduce_last(&mut self, op_type: &str, hint: &str, x: &Var) -> Var {
        let axes = self.ints(&format!("{hint}_axes"), &[-1]);
        let keep = self.boolean(&format!("{hint}_keep_dims"), true);
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = Some(1);
        }
        self.op(
            op_type,
            hint,
            &[
                ("x", Arg::One(x)),
                ("axes", Arg::One(&axes)),
                ("keep_dims", Arg::One(&keep)),
            ],
            x.dtype,
            shape,
        )
    }

    /// The shape of `x` as an int32 vector.
    pub fn shape_of(&mut self, hint: &str, x: &Var) -> Var {
        let r = x.rank();
        self.op(
            "shape",
            hint,
            &[("x", Arg::One(x))],
            DataType::Int32,
            vec![Some(r)],
        )
    }

    /// `start, start + step, ...` below `end` (int32 scalars).
    pub fn range_1d(&mut self, hint: &str, start: &Var, end: &Var, step: &Var) -> Var {
        self.op(
            "range_1d",
            hint,
            &[
                ("start", Arg::One(start)),
                ("end", Arg::One(end)),
                ("step", Arg::One(step)),
            ],
            start.dtype,
            vec![None],
        )
    }

    /// Repeats `x` `reps[i]` times along each axis.
    pub fn tile(&mut self, hint: &str, x: &Var, reps: &[usize]) -> Var {
        if reps.len() != x.rank() {
            self.fail(format!(
                "tile {hint}: {} reps for rank {}",
                reps.len(),
                x.rank()
            ));
            return x.clone();
        }
        let shape = x
            .shape
            .iter()
            .zip(reps)
            .map(|(d, &r)| d.map(|d| d * r))
            .collect();
        let r = self.ints(
            &format!("{hint}_reps"),
            &reps.iter().map(|&d| d as i32).collect::<Vec<_>>(),
        );
        self.op(
            "tile",
            hint,
            &[("x", Arg::One(x)), ("reps", Arg::One(&r))],
            x.dtype,
            shape,
        )
    }

    /// `x[begin:end]` with constant bounds; `end_mask[i]` takes axis `i` to its end,
    /// `squeeze[i]` drops axis `i` (which must then be one element wide).
    pub fn slice(
        &mut self,
        hint: &str,
        x: &Var,
        begin: &[i64],
        end: &[i64],
        end_mask: &[bool],
    ) -> Var {
        let r = x.rank();
        if begin.len() != r || end.len() != r || end_mask.len() != r {
            self.fail(format!("slice {hint}: bounds do not match rank {r}"));
            return x.clone();
        }
        let mut shape = Vec::with_capacity(r);
        for i in 0..r {
            let d = x.shape[i];
            let resolve = |v: i64| -> Option<usize> {
                if v < 0 {
                    d.map(|d| (d as i64 + v).max(0) as usize)
                } else {
                    Some(v as usize)
                }
            };
            let b = resolve(begin[i]);
            let e = if end_mask[i] { d } else { resolve(end[i]) };
            shape.push(match (b, e, d) {
                (Some(b), Some(e), Some(d)) => Some(e.min(d).saturating_sub(b)),
                (Some(b), Some(e), None) if !end_mask[i] => Some(e.saturating_sub(b)),
                _ => None,
            });
        }
        let b = self.ints(
            &format!("{hint}_begin"),
            &begin.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        );
        let e = self.ints(
            &format!("{hint}_end"),
            &end.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        );
        let m = self.bools(&format!("{hint}_end_mask"), end_mask);
        self.op(
            "slice_by_index",
            hint,
            &[
                ("x", Arg::One(x)),
                ("begin", Arg::One(&b)),
                ("end", Arg::One(&e)),
                ("end_mask", Arg::One(&m)),
            ],
            x.dtype,
            shape,
        )
    }

    /// `x[begin:end]` with bounds computed at run time; the caller gives the output shape
    /// (after dropping the axes `squeeze` marks).
    pub fn slice_dynamic(
        &mut self,
        hint: &str,
        x: &Var,
        begin: &Var,
        end: &Var,
        squeeze: &[bool],
        shape: Vec<Option<usize>>,
    ) -> Var {
        let kept = squeeze.iter().filter(|&&s| !s).count();
        if squeeze.len() != x.rank() || kept != shape.len() {
            self.fail(format!("slice {hint}: squeeze mask or shape does not fit"));
        }
        let m = self.bools(&format!("{hint}_squeeze_mask"), squeeze);
        self.op(
            "slice_by_index",
            hint,
            &[
                ("x", Arg::One(x)),
                ("begin", Arg::One(begin)),
                ("end", Arg::One(end)),
                ("squeeze_mask", Arg::One(&m)),
            ],
            x.dtype,
            shape,
        )
    }

    /// `x` with `x[begin:end] = update`.
    pub fn slice_update(
        &mut self,
        hint: &str,
        x: &Var,
        update: &Var,
        begin: &Var,
        end: &Var,
    ) -> Var {
        if x.dtype != update.dtype || x.rank() != update.rank() {
            self.fail(format!("slice_update {hint}: update does not match x"));
        }
        self.op(
            "slice_update",
            hint,
            &[
                ("x", Arg::One(x)),
                ("update", Arg::One(update)),
                ("begin", Arg::One(begin)),
                ("end", Arg::One(end)),
            ],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// The current value of a state.
    pub fn read_state(&mut self, hint: &str, state: &Var) -> Var {
        if !self.states.iter().any(|s| s.name == state.name) {
            self.fail(format!("read_state {hint}: {} is not a state", state.name));
        }
        self.op(
            "read_state",
            hint,
            &[("input", Arg::One(state))],
            state.dtype,
            state.shape.clone(),
        )
    }

    /// Stores `data` into a state.
    pub fn write_state(&mut self, hint: &str, state: &Var, data: &Var) {
        if !self.states.iter().any(|s| s.name == state.name) {
            self.fail(format!("write_state {hint}: {} is not a state", state.name));
        }
        if data.dtype != state.dtype || data.shape != state.shape {
            self.fail(format!(
                "write_state {hint}: {} data does not fit state {}",
                fmt_shape(&data.shape),
                fmt_shape(&state.shape)
            ));
        }
        let name = self.fresh(hint);
        self.push_op(
            "write_state",
            name,
            &[("input", Arg::One(state)), ("data", Arg::One(data))],
            Vec::new(),
            HashMap::new(),
        );
    }

    // -----------------------------------------------------------------------------------------
    // Assembly
    // -----------------------------------------------------------------------------------------

    /// Finishes the program: `outputs` become the function's results (named as their
    /// variables) and the model description is derived from the function signature, so the
    /// two always agree. Returns the model and the weight writer (to be finished by the
    /// caller), or the first error any op recorded.
    pub fn finish(
        mut self,
        outputs: &[&Var],
        metadata: proto::Metadata,
    ) -> Result<(proto::Model, Option<BlobWriter>), ExportError> {
        for o in outputs {
            if cast_name(o.dtype).is_none() || array_type(o.dtype).is_none() {
                self.fail(format!("output {} has no description type", o.name));
            }
        }
        if let Some(e) = self.error.take() {
            return Err(ExportError::Build(e));
        }
        let array_feature = |dt: DataType,
                             shape: Vec<i64>,
                             flex: Option<proto::ShapeFlexibility>|
         -> proto::FeatureType {
            proto::FeatureType {
                r#type: Some(proto::FeatureTypeKind::MultiArrayType(
                    proto::ArrayFeatureType {
                        shape,
                        data_type: array_type(dt).map_or(0, |a| a as i32),
                        shape_flexibility: flex,
                    },
                )),
                is_optional: false,
            }
        };
        let mut inputs = Vec::new();
        let mut fn_inputs = Vec::new();
        for (v, dims) in &self.inputs {
            let shape = dims
                .iter()
                .map(|d| match *d {
                    InputDim::Fixed(n) | InputDim::Range(n, _) => n as i64,
                })
                .collect();
            let flex = dims
                .iter()
                .any(|d| matches!(d, InputDim::Range(..)))
                .then(|| {
                    proto::ShapeFlexibility::ShapeRange(proto::ShapeRange {
                        size_ranges: dims
                            .iter()
                            .map(|d| match *d {
                                InputDim::Fixed(n) => proto::SizeRange {
                                    lower_bound: n as u64,
                                    upper_bound: n as i64,
                                },
                                InputDim::Range(lo, hi) => proto::SizeRange {
                                    lower_bound: lo as u64,
                                    upper_bound: hi as i64,
                                },
                            })
                            .collect(),
                    })
                });
            inputs.push(proto::FeatureDescription {
                name: v.name.clone(),
                short_description: String::new(),
                r#type: Some(array_feature(v.dtype, shape, flex)),
            });
            fn_inputs.push(proto::NamedValueType {
                name: v.name.clone(),
                r#type: Some(tensor_type(v.dtype, &v.shape)),
            });
        }
        let mut states = Vec::new();
        for s in &self.states {
            let shape: Vec<i64> = s.shape.iter().map(|d| d.unwrap_or(0) as i64).collect();
            states.push(proto::FeatureDescription {
                name: s.name.clone(),
                short_description: String::new(),
                r#type: Some(proto::FeatureType {
                    r#type: Some(proto::FeatureTypeKind::StateType(proto::StateFeatureType {
                        r#type: Some(proto::StateFeatureKind::ArrayType(
                            proto::ArrayFeatureType {
                                shape,
                                data_type: array_type(s.dtype).map_or(0, |a| a as i32),
                                shape_flexibility: None,
                            },
                        )),
                    })),
                    is_optional: false,
                }),
            });
            fn_inputs.push(proto::NamedValueType {
                name: s.name.clone(),
                r#type: Some(state_type(s.dtype, &s.shape)),
            });
        }
        let out_desc = outputs
            .iter()
            .map(|o| {
                // Outputs whose size depends on the inputs leave the shape to the runtime.
                let shape = o
                    .shape
                    .iter()
                    .map(|d| d.map(|n| n as i64))
                    .collect::<Option<Vec<i64>>>()
                    .unwrap_or_default();
                proto::FeatureDescription {
                    name: o.name.clone(),
                    short_description: String::new(),
                    r#type: Some(array_feature(o.dtype, shape, None)),
                }
            })
            .collect();
        let block = proto::Block {
            inputs: Vec::new(),
            outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            operations: std::mem::take(&mut self.ops),
            attributes: HashMap::new(),
        };
        let function = proto::Function {
            inputs: fn_inputs,
            opset: OPSET.to_string(),
            block_specializations: [(OPSET.to_string(), block)].into_iter().collect(),
            attributes: HashMap::new(),
        };
        let model = proto::Model {
            specification_version: SPECIFICATION_VERSION,
            description: Some(proto::ModelDescription {
                input: inputs,
                output: out_desc,
                state: states,
                metadata: Some(metadata),
                ..Default::default()
            }),
            is_updatable: false,
            r#type: Some(proto::ModelType::MlProgram(proto::Program {
                version: 1,
                functions: [("main".to_string(), function)].into_iter().collect(),
                doc_string: String::new(),
                attributes: HashMap::new(),
            })),
        };
        Ok((model, self.weights))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> proto::Metadata {
        proto::Metadata {
            short_description: String::new(),
            version_string: String::new(),
            author: String::new(),
            license: String::new(),
            user_defined: HashMap::new(),
        }
    }

    #[test]
    fn shapes_are_inferred_through_broadcasts_and_dynamic_dims() {
        let mut b = ProgramBuilder::new(None);
        let x = b.input(
            "x",
            DataType::Float16,
            &[
                InputDim::Fixed(1),
                InputDim::Range(1, 8),
                InputDim::Fixed(4),
            ],
        );
        let w = b.const_f16("w", &[6, 4], &[0.0; 24]);
        let y = b.linear("y", &x, &w, None);
        assert_eq!(y.shape(), &[Some(1), None, Some(6)]);
        let r = b.reshape("r", &y, &[1, -1, 2, 3]);
        assert_eq!(r.shape(), &[Some(1), None, Some(2), Some(3)]);
        let t = b.transpose("t", &r, &[0, 2, 1, 3]);
        let s = b.matmul("s", &t, &t, false, true);
        assert_eq!(s.shape(), &[Some(1), Some(2), None, None]);
        let h = b.slice(
            "h",
            &t,
            &[0, 0, 0, 1],
            &[1, 2, 0, 3],
            &[true, true, true, false],
        );
        assert_eq!(h.shape(), &[Some(1), Some(2), None, Some(2)]);
        let (model, _) = b.finish(&[&s], meta()).unwrap();
        assert_eq!(model.specification_version, SPECIFICATION_VERSION);
        let d = model.description.unwrap();
        assert_eq!(d.input.len(), 1);
        assert_eq!(d.output[0].name, "s");
    }

    #[test]
    fn the_first_inconsistency_is_reported_by_finish() {
        let mut b = ProgramBuilder::new(None);
        let x = b.input("x", DataType::Float32, &[InputDim::Fixed(3)]);
        let y = b.const_f32("y", &[4], &[0.0; 4]);
        let z = b.add("z", &x, &y);
        let h = b.const_f16("h", &[3], &[0.0; 3]);
        let _ = b.mul("m", &x, &h);
        let e = b.finish(&[&z], meta()).unwrap_err().to_string();
        assert!(e.contains("do not broadcast"), "{e}");
        let mut b = ProgramBuilder::new(None);
        let _ = b.weight("w", DataType::Float16, &[2], &[1.0, 2.0]);
        let e = b.finish(&[], meta()).unwrap_err().to_string();
        assert!(e.contains("no weight file"), "{e}");
    }
}
