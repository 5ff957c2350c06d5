//! The MIL operations kiln executes, each written from the op's documented semantics.
//!
//! An op sees its inputs through [`Args`] and returns its outputs as [`Arr`]s; the executor
//! then checks each output against the type the program declares for it and rounds values
//! declared fp16. Errors are plain messages: the executor adds the package and the op.

mod constexpr;
mod elementwise;
mod linalg;
mod shape;

pub(crate) use constexpr::run_constexpr;

use crate::program::{Operand, Output, Val};
use crate::value::{Arr, DType, Kind};

/// What an op type accepts: its required and optional parameter names.
pub(crate) struct OpSpec {
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

const fn spec(required: &'static [&'static str], optional: &'static [&'static str]) -> OpSpec {
    OpSpec { required, optional }
}

const X: &[&str] = &["x"];
const XY: &[&str] = &["x", "y"];
const NONE: &[&str] = &[];

/// The parameter lists of every op kiln knows, or `None` for an op it cannot run.
pub(crate) fn op_spec(op_type: &str) -> Option<OpSpec> {
    Some(match op_type {
        "const" => spec(NONE, NONE),
        "constexpr_blockwise_shift_scale" => spec(&["data", "scale"], &["offset"]),
        "constexpr_lut_to_dense" => spec(&["indices", "lut"], &["vector_axis"]),
        "constexpr_affine_dequantize" => {
            spec(&["quantized_data", "zero_point", "scale", "axis"], NONE)
        }
        "constexpr_cast" => spec(&["source_val", "output_dtype"], NONE),
        "read_state" => spec(&["input"], NONE),
        "write_state" => spec(&["input", "data"], NONE),
        "coreml_update_state" => spec(&["state", "value"], NONE),
        "add" | "sub" | "mul" | "real_div" | "floor_div" | "mod" | "pow" | "maximum"
        | "minimum" | "equal" | "not_equal" | "less" | "less_equal" | "greater"
        | "greater_equal" | "logical_and" | "logical_or" | "logical_xor" => spec(XY, NONE),
        "abs" | "ceil" | "floor" | "round" | "sign" | "exp" | "exp2" | "sin" | "cos" | "tan"
        | "tanh" | "sqrt" | "square" | "erf" | "sigmoid" | "silu" | "relu" | "logical_not"
        | "identity" | "softplus" | "atan" | "asin" | "acos" | "sinh" | "cosh" => spec(X, NONE),
        "rsqrt" | "inverse" | "log" => spec(X, &["epsilon"]),
        "clip" => spec(&["x", "alpha", "beta"], NONE),
        "gelu" => spec(X, &["mode"]),
        "leaky_relu" => spec(&["x", "alpha"], NONE),
        "cast" => spec(&["x", "dtype"], NONE),
        "select" => spec(&["cond", "a", "b"], NONE),
        "linear" => spec(&["x", "weight"], &["bias"]),
        "matmul" => spec(XY, &["transpose_x", "transpose_y"]),
        "scaled_dot_product_attention" => spec(&["query", "key", "value"], &["attn_mask"]),
        "softmax" => spec(X, &["axis"]),
        "reduce_mean" | "reduce_sum" | "reduce_max" | "reduce_min" | "reduce_prod" => {
            spec(X, &["axes", "keep_dims"])
        }
        "reduce_argmax" | "reduce_argmin" => spec(X, &["axis", "keep_dims"]),
        "layer_norm" => spec(X, &["axes", "gamma", "beta", "epsilon"]),
        "gather" => spec(
            &["x", "indices"],
            &["axis", "batch_dims", "validate_indices"],
        ),
        "gather_along_axis" => spec(&["x", "indices"], &["axis", "validate_indices"]),
        "concat" => spec(&["values", "axis"], &["interleave"]),
        "stack" => spec(&["values", "axis"], NONE),
        "split" => spec(&["x", "axis"], &["num_splits", "split_sizes"]),
        "slice_by_index" => spec(
            &["x", "begin", "end"],
            &["stride", "begin_mask", "end_mask", "squeeze_mask"],
        ),
        "slice_by_size" => spec(&["x", "begin", "size"], NONE),
        "slice_update" => spec(
            &["x", "update", "begin", "end"],
            &["stride", "begin_mask", "end_mask", "squeeze_mask"],
        ),
        "reshape" => spec(&["x", "shape"], NONE),
        "transpose" => spec(&["x", "perm"], NONE),
        "expand_dims" => spec(&["x", "axes"], NONE),
        "squeeze" => spec(X, &["axes"]),
        "tile" => spec(&["x", "reps"], NONE),
        "shape" => spec(X, NONE),
        "range_1d" => spec(&["start", "end", "step"], NONE),
        "fill" => spec(&["shape"], &["value"]),
        "band_part" => spec(X, &["lower", "upper"]),
        _ => return None,
    })
}

/// Every op type kiln can run, sorted.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = ALL_OPS
        .iter()
        .copied()
        .filter(|o| op_spec(o).is_some())
        .collect();
    v.sort_unstable();
    v
}

const ALL_OPS: &[&str] = &[
    "const",
    "constexpr_blockwise_shift_scale",
    "constexpr_lut_to_dense",
    "constexpr_affine_dequantize",
    "constexpr_cast",
    "read_state",
    "write_state",
    "coreml_update_state",
    "add",
    "sub",
    "mul",
    "real_div",
    "floor_div",
    "mod",
    "pow",
    "maximum",
    "minimum",
    "equal",
    "not_equal",
    "less",
    "less_equal",
    "greater",
    "greater_equal",
    "logical_and",
    "logical_or",
    "logical_xor",
    "abs",
    "ceil",
    "floor",
    "round",
    "sign",
    "exp",
    "exp2",
    "sin",
    "cos",
    "tan",
    "tanh",
    "sqrt",
    "square",
    "erf",
    "sigmoid",
    "silu",
    "relu",
    "logical_not",
    "identity",
    "softplus",
    "atan",
    "asin",
    "acos",
    "sinh",
    "cosh",
    "rsqrt",
    "inverse",
    "log",
    "clip",
    "gelu",
    "leaky_relu",
    "cast",
    "select",
    "linear",
    "matmul",
    "scaled_dot_product_attention",
    "softmax",
    "reduce_mean",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_argmax",
    "reduce_argmin",
    "layer_norm",
    "gather",
    "gather_along_axis",
    "concat",
    "stack",
    "split",
    "slice_by_index",
    "slice_by_size",
    "slice_update",
    "reshape",
    "transpose",
    "expand_dims",
    "squeeze",
    "tile",
    "shape",
    "range_1d",
    "fill",
    "band_part",
];

/// The resolved inputs of one op execution.
pub(crate) struct Args<'a> {
    pub inputs: &'a [(String, Vec<Operand>)],
    pub env: &'a [Option<Val>],
    pub outputs: &'a [Output],
}

pub(crate) type OpResult = Result<Vec<Arr>, String>;

impl<'a> Args<'a> {
    fn operands(&self, name: &str) -> Option<&'a [Operand]> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn resolve(&self, name: &str, o: &'a Operand) -> Result<&'a Arr, String> {
        match o {
            Operand::Const(a) => Ok(a),
            Operand::Slot(s) => match self.env.get(*s).and_then(|v| v.as_ref()) {
                Some(Val::T(a)) => Ok(a),
                Some(Val::State(_)) => Err(format!("input {name} is a state, expected a tensor")),
                None => Err(format!("input {name} has no value (used after release)")),
            },
        }
    }

    /// An optional single-tensor input.
    pub fn opt(&self, name: &str) -> Result<Option<&'a Arr>, String> {
        match self.operands(name) {
            None => Ok(None),
            Some([one]) => self.resolve(name, one).map(Some),
            Some(v) => Err(format!(
                "input {name} binds {} values, expected one",
                v.len()
            )),
        }
    }

    /// A required single-tensor input.
    pub fn arr(&self, name: &str) -> Result<&'a Arr, String> {
        self.opt(name)?
            .ok_or_else(|| format!("missing input {name}"))
    }

    /// A float tensor input.
    pub fn float(&self, name: &str) -> Result<(&'a Arr, &'a [f32]), String> {
        let a = self.arr(name)?;
        let v = a
            .as_f()
            .ok_or_else(|| format!("input {name} is {}, expected fp16 or fp32", a.describe()))?;
        Ok((a, v))
    }

    /// A variadic input (e.g. `concat`'s `values`).
    pub fn list(&self, name: &str) -> Result<Vec<&'a Arr>, String> {
        let ops = self
            .operands(name)
            .ok_or_else(|| format!("missing input {name}"))?;
        ops.iter().map(|o| self.resolve(name, o)).collect()
    }

    /// The integers of an int tensor input (any rank).
    pub fn ints(&self, name: &str) -> Result<Vec<i64>, String> {
        let a = self.arr(name)?;
        match a.as_i() {
            Some(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            None => Err(format!(
                "input {name} is {}, expected integers",
                a.describe()
            )),
        }
    }

    pub fn opt_ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        match self.opt(name)? {
            None => Ok(None),
            Some(_) => self.ints(name).map(Some),
        }
    }

    /// A scalar (or one-element) integer input.
    pub fn int(&self, name: &str) -> Result<i64, String> {
        let v = self.ints(name)?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(format!(
                "input {name} holds {} integers, expected a scalar",
                v.len()
            )),
        }
    }

    pub fn opt_int(&self, name: &str, default: i64) -> Result<i64, String> {
        match self.opt(name)? {
            None => Ok(default),
            Some(_) => self.int(name),
        }
    }

    /// A scalar float input (integers are accepted and converted).
    pub fn opt_f32(&self, name: &str, default: f32) -> Result<f32, String> {
        let Some(a) = self.opt(name)? else {
            return Ok(default);
        };
        if a.len() != 1 {
            return Err(format!(
                "input {name} is {}, expected a scalar",
                a.describe()
            ));
        }
        match (&a.as_f(), &a.as_i()) {
            (Some(v), _) => Ok(v[0]),
            (_, Some(v)) => Ok(v[0] as f32),
            _ => Err(format!(
                "input {name} is {}, expected a number",
                a.describe()
            )),
        }
    }

    pub fn bools(&self, name: &str) -> Result<Option<Vec<bool>>, String> {
        let Some(a) = self.opt(name)? else {
            return Ok(None);
        };
        match a.as_b() {
            Some(v) => Ok(Some(v.to_vec())),
            None => Err(format!("input {name} is {}, expected bool", a.describe())),
        }
    }

    pub fn opt_bool(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.bools(name)? {
            None => Ok(default),
            Some(v) if v.len() == 1 => Ok(v[0]),
            Some(v) => Err(format!(
                "input {name} holds {} booleans, expected a scalar",
                v.len()
            )),
        }
    }

    pub fn string(&self, name: &str) -> Result<&'a str, String> {
        let a = self.arr(name)?;
        match a.as_s() {
            Some([s]) => Ok(s),
            _ => Err(format!(
                "input {name} is {}, expected a string",
                a.describe()
            )),
        }
    }

    pub fn opt_string(&self, name: &str) -> Result<Option<&'a str>, String> {
        match self.opt(name)? {
            None => Ok(None),
            Some(_) => self.string(name).map(Some),
        }
    }

    /// The element type the program declares for output `i`.
    pub fn out_dt(&self, i: usize) -> DType {
        self.outputs.get(i).map_or(DType::F32, |o| o.sig.dt)
    }
}

/// Runs one (non-state, non-constexpr) op.
pub(crate) fn run(op_type: &str, a: &Args) -> OpResult {
    match op_type {
        "add" | "sub" | "mul" | "real_div" | "floor_div" | "mod" | "pow" | "maximum"
        | "minimum" | "equal" | "not_equal" | "less" | "less_equal" | "greater"
        | "greater_equal" | "logical_and" | "logical_or" | "logical_xor" => {
            elementwise::binary(op_type, a)
        }
        "abs" | "ceil" | "floor" | "round" | "sign" | "exp" | "exp2" | "sin" | "cos" | "tan"
        | "tanh" | "sqrt" | "square" | "erf" | "sigmoid" | "silu" | "relu" | "softplus"
        | "atan" | "asin" | "acos" | "sinh" | "cosh" | "rsqrt" | "inverse" | "log" | "clip"
        | "gelu" | "leaky_relu" => elementwise::unary_float(op_type, a),
        "logical_not" => elementwise::logical_not(a),
        "identity" => Ok(vec![a.arr("x")?.clone()]),
        "cast" => elementwise::cast(a),
        "select" => elementwise::select(a),
        "linear" => linalg::linear(a),
        "matmul" => linalg::matmul(a),
        "scaled_dot_product_attention" => linalg::sdpa(a),
        "softmax" => linalg::softmax(a),
        "reduce_mean" | "reduce_sum" | "reduce_max" | "reduce_min" | "reduce_prod" => {
            linalg::reduce(op_type, a)
        }
        "reduce_argmax" | "reduce_argmin" => linalg::arg_reduce(op_type, a),
        "layer_norm" => linalg::layer_norm(a),
        "gather" => shape::gather(a),
        "gather_along_axis" => shape::gather_along_axis(a),
        "concat" => shape::concat(a),
        "stack" => shape::stack(a),
        "split" => shape::split(a),
        "slice_by_index" => shape::slice_by_index(a),
        "slice_by_size" => shape::slice_by_size(a),
        "slice_update" => shape::slice_update(a),
        "reshape" => shape::reshape(a),
        "transpose" => shape::transpose(a),
        "expand_dims" => shape::expand_dims(a),
        "squeeze" => shape::squeeze(a),
        "tile" => shape::tile(a),
        "shape" => shape::shape(a),
        "range_1d" => shape::range_1d(a),
        "fill" => shape::fill(a),
        "band_part" => shape::band_part(a),
        other => Err(format!("op type {other} is not supported by kiln")),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Row-major strides of a shape.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Resolves a possibly negative axis against `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize, what: &str) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("{what} {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// The most elements one op may produce: a guard against programs that would exhaust memory.
pub(crate) const MAX_ELEMENTS: usize = 1 << 31;

/// Refuses a result of `n` elements beyond [`MAX_ELEMENTS`].
pub(crate) fn check_elements(shape: &[usize]) -> Result<(), String> {
    match crate::value::volume(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => Err(format!(
            "the result {shape:?} would exceed {MAX_ELEMENTS} elements"
        )),
    }
}

/// Numpy broadcasting of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    check_elements(&out)?;
    Ok(out)
}

/// Strides of `shape` read as broadcast to `out` (zero along broadcast dimensions).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let st = strides(shape);
    let r = out.len();
    let mut s = vec![0isize; r];
    for i in 0..shape.len() {
        let o = r - shape.len() + i;
        if shape[i] != 1 || out[o] == 1 {
            s[o] = if shape[i] == 1 { 0 } else { st[i] as isize };
        }
    }
    s
}

/// Copies the elements at `base + Σ idx[d] * strides[d]` for every index of `out_shape`.
pub(crate) fn strided_copy<T: Copy>(
    src: &[T],
    base: isize,
    strides: &[isize],
    out_shape: &[usize],
) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let r = out_shape.len();
    if r == 0 {
        out.push(src[base as usize]);
        return out;
    }
    let inner = out_shape[r - 1];
    let is = strides[r - 1];
    let mut idx = vec![0usize; r - 1];
    let mut off = base;
    loop {
        if is == 1 {
            let s = off as usize;
            out.extend_from_slice(&src[s..s + inner]);
        } else {
            let mut p = off;
            for _ in 0..inner {
                out.push(src[p as usize]);
                p += is;
            }
        }
        // Advance the outer index like an odometer.
        let mut d = r - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            off += strides[d];
            if idx[d] < out_shape[d] {
                break;
            }
            off -= strides[d] * idx[d] as isize;
            idx[d] = 0;
        }
    }
}

/// The element offsets `base + Σ idx[d] * strides[d]` for every index of `shape`.
pub(crate) fn strided_offsets(base: isize, strides: &[isize], shape: &[usize]) -> Vec<usize> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n);
    let r = shape.len();
    let mut idx = vec![0usize; r];
    let mut off = base;
    loop {
        out.push(off as usize);
        let mut d = r;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * idx[d] as isize;
            idx[d] = 0;
        }
    }
}

/// Reads an array's elements broadcast to `out`.
pub(crate) fn broadcast_to<T: Copy>(v: &[T], shape: &[usize], out: &[usize]) -> Vec<T> {
    if shape == out {
        return v.to_vec();
    }
    strided_copy(v, 0, &broadcast_strides(shape, out), out)
}

pub(crate) fn same_kind(a: &Arr, b: &Arr, what: &str) -> Result<Kind, String> {
    if a.kind() != b.kind() {
        return Err(format!(
            "{what}: {} and {} have different element kinds",
            a.describe(),
            b.describe()
        ));
    }
    Ok(a.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting() {
        assert_eq!(
            broadcast_shape(&[1, 5, 1], &[4, 1, 3]).unwrap(),
            vec![4, 5, 3]
        );
        assert_eq!(broadcast_shape(&[], &[2]).unwrap(), vec![2]);
        assert!(broadcast_shape(&[2], &[3]).is_err());
        let v = broadcast_to(&[1, 2], &[2, 1], &[2, 3]);
        assert_eq!(v, vec![1, 1, 1, 2, 2, 2]);
    }

    #[test]
    fn strided_copy_transposes() {
        // [2,3] -> transpose -> [3,2]
        let v = strided_copy(&[1, 2, 3, 4, 5, 6], 0, &[1, 3], &[3, 2]);
        assert_eq!(v, vec![1, 4, 2, 5, 3, 6]);
        assert_eq!(strided_offsets(0, &[1, 3], &[3, 2]), vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn every_listed_op_has_a_spec() {
        assert_eq!(supported_ops().len(), ALL_OPS.len());
        assert!(op_spec("no_such_op").is_none());
    }
}
