//! Running a package's main function on the CPU.

use crate::ops::{self, Args};
use crate::package::{FeatureType, ModelDescription};
use crate::program::{conform, Operand, Plan, Step, Val};
use crate::tensor::{DataType, Tensor, TensorData};
use crate::value::{Arr, DType, Data, Kind};
use crate::{CoreMlError, MlPackage};
use std::collections::HashMap;
use std::sync::Arc;

/// Where an [`Executor`] rounds values the program types as fp16.
///
/// Every op computes in f32. Weights and inputs typed fp16 always hold fp16 values, and
/// outputs typed fp16 are returned as fp16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp16Rounding {
    /// States typed fp16 are stored as fp16 (as a device stores its KV cache); intermediate
    /// activations keep f32 precision. This matches how the packages are validated against
    /// their source models.
    #[default]
    Storage,
    /// Additionally every intermediate value typed fp16 is rounded to fp16 after the op that
    /// produces it, as a device computing in fp16 does (overflow then shows as infinity).
    EveryOp,
    /// States keep f32 precision too.
    Never,
}

/// How an [`Executor`] computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Where fp16-typed values are rounded.
    pub fp16: Fp16Rounding,
}

/// Runs a package's main function, keeping its states between calls.
pub struct Executor {
    package: String,
    plan: Plan,
    description: ModelDescription,
    states: Vec<Arr>,
    options: ExecOptions,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("package", &self.package)
            .finish_non_exhaustive()
    }
}

fn zeros(dt: DType, shape: &[usize]) -> Arr {
    let n: usize = shape.iter().product();
    match dt.kind() {
        Kind::Float => Arr::floats(dt, shape.to_vec(), vec![0.0; n]),
        Kind::Bool => Arr::bools(shape.to_vec(), vec![false; n]),
        _ => Arr::ints(dt, shape.to_vec(), vec![0; n]),
    }
}

impl Executor {
    /// Loads the main function: checks it against the description, reads and decompresses
    /// the weights, and starts every state at zero.
    pub fn new(pkg: &MlPackage) -> Result<Executor, CoreMlError> {
        Executor::with_options(pkg, ExecOptions::default())
    }

    /// Like [`Executor::new`] with explicit options.
    pub fn with_options(pkg: &MlPackage, options: ExecOptions) -> Result<Executor, CoreMlError> {
        let mut blobs = pkg.blob_store();
        let plan = pkg.plan(&mut blobs)?;
        pkg.check_interface(&plan)?;
        let states = plan
            .states
            .iter()
            .map(|s| zeros(s.sig.dt, &s.sig.fixed_shape().expect("checked at load")))
            .collect();
        Ok(Executor {
            package: pkg.label().to_string(),
            plan,
            description: pkg.description().clone(),
            states,
            options,
        })
    }

    /// Sets every state back to zero.
    pub fn reset_states(&mut self) {
        for (st, sig) in self.states.iter_mut().zip(&self.plan.states) {
            *st = zeros(sig.sig.dt, &st.shape);
        }
    }

    /// The dimensions the program declares for an output (`None` where a dimension depends
    /// on the inputs), or `None` when the function has no such output. Descriptions often
    /// leave output shapes unspecified; the program's own types are more precise.
    pub fn output_dims(&self, name: &str) -> Option<Vec<Option<usize>>> {
        self.plan
            .outputs
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, sig)| sig.dims.clone())
    }

    /// The current value of a state, by name.
    pub fn state(&self, name: &str) -> Option<Tensor> {
        let i = self.plan.states.iter().position(|s| s.name == name)?;
        to_tensor(&self.states[i]).ok()
    }

    fn input_err(&self, input: &str, message: String) -> CoreMlError {
        CoreMlError::Input {
            package: self.package.clone(),
            input: input.to_string(),
            message,
        }
    }

    /// Runs the main function once on `inputs` (by name), returning every output by name.
    /// States carry over from the previous call.
    pub fn predict(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, CoreMlError> {
        for name in inputs.keys() {
            if !self.plan.inputs.iter().any(|i| &i.name == name) {
                let known: Vec<&str> = self.plan.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(self.input_err(
                    name,
                    format!(
                        "the model has no such input (it takes {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        let mut env: Vec<Option<Val>> = vec![None; self.plan.slots];
        for inp in &self.plan.inputs {
            let t = inputs
                .get(&inp.name)
                .ok_or_else(|| self.input_err(&inp.name, "missing".into()))?;
            let arr = from_tensor(t, inp.sig.dt).map_err(|m| self.input_err(&inp.name, m))?;
            if !inp.sig.accepts(&arr) {
                return Err(self.input_err(
                    &inp.name,
                    format!(
                        "got {} {:?}, the function takes {}",
                        t.dtype(),
                        t.shape(),
                        inp.sig.describe()
                    ),
                ));
            }
            let described = self.description.inputs.iter().find(|f| f.name == inp.name);
            if let Some(FeatureType::Array(info)) = described.map(|f| &f.ty) {
                if !info.accepts(&arr.shape) {
                    return Err(self.input_err(
                        &inp.name,
                        format!(
                            "shape {:?} is not one the model accepts ({info})",
                            arr.shape
                        ),
                    ));
                }
            }
            env[inp.slot] = Some(Val::T(arr));
        }
        for (i, st) in self.plan.states.iter().enumerate() {
            env[st.slot] = Some(Val::State(i));
        }
        let round_ops = self.options.fp16 == Fp16Rounding::EveryOp;
        let round_states = self.options.fp16 != Fp16Rounding::Never;
        let package = self.package.as_str();
        for step in &self.plan.steps {
            let results = match step.op_type.as_str() {
                "read_state" | "write_state" | "coreml_update_state" => state_op(
                    package,
                    &self.plan,
                    &mut self.states,
                    round_states,
                    step,
                    &env,
                )?,
                _ => {
                    let args = Args {
                        inputs: &step.inputs,
                        env: &env,
                        outputs: &step.outputs,
                    };
                    ops::run(&step.op_type, &args).map_err(|m| op_err(package, step, m))?
                }
            };
            if results.len() != step.outputs.len() {
                return Err(op_err(
                    package,
                    step,
                    format!(
                        "produced {} values, the program declares {}",
                        results.len(),
                        step.outputs.len()
                    ),
                ));
            }
            for (r, o) in results.into_iter().zip(&step.outputs) {
                let r = conform(r, &o.sig, round_ops)
                    .map_err(|m| op_err(package, step, format!("output {}: {m}", o.name)))?;
                env[o.slot] = Some(Val::T(r));
            }
            for &s in &step.release {
                env[s] = None;
            }
        }
        let mut out = HashMap::new();
        for (name, operand, _) in &self.plan.outputs {
            let arr = match operand {
                Operand::Const(a) => a.clone(),
                Operand::Slot(s) => match env[*s].take() {
                    Some(Val::T(a)) => a,
                    _ => {
                        return Err(CoreMlError::Package {
                            package: self.package.clone(),
                            message: format!("output {name} was not computed"),
                        })
                    }
                },
            };
            let t = to_tensor(&arr).map_err(|m| CoreMlError::Package {
                package: self.package.clone(),
                message: format!("output {name}: {m}"),
            })?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

fn op_err(package: &str, step: &Step, message: String) -> CoreMlError {
    CoreMlError::Op {
        package: package.to_string(),
        op: step.name.clone(),
        op_type: step.op_type.clone(),
        message,
    }
}

/// Runs `read_state`, `write_state` or `coreml_update_state` against the executor's states.
fn state_op(
    package: &str,
    plan: &Plan,
    states: &mut [Arr],
    round: bool,
    step: &Step,
    env: &[Option<Val>],
) -> Result<Vec<Arr>, CoreMlError> {
    let (key, value_key) = match step.op_type.as_str() {
        "read_state" => ("input", None),
        "write_state" => ("input", Some("data")),
        _ => ("state", Some("value")),
    };
    let operand = step
        .inputs
        .iter()
        .find(|(n, _)| n == key)
        .and_then(|(_, v)| v.first());
    let i = match operand {
        Some(Operand::Slot(s)) => match env.get(*s).and_then(|v| v.as_ref()) {
            Some(Val::State(i)) => *i,
            _ => return Err(op_err(package, step, format!("input {key} is not a state"))),
        },
        _ => return Err(op_err(package, step, format!("input {key} is not a state"))),
    };
    if let Some(vk) = value_key {
        let args = Args {
            inputs: &step.inputs,
            env,
            outputs: &step.outputs,
        };
        let v = args.arr(vk).map_err(|m| op_err(package, step, m))?;
        let st = &plan.states[i];
        if v.kind() != st.sig.dt.kind() || v.shape != states[i].shape {
            return Err(op_err(
                package,
                step,
                format!(
                    "writes {} to state {}, which is {}",
                    v.describe(),
                    st.name,
                    st.sig.describe()
                ),
            ));
        }
        let stored = Arr {
            dt: st.sig.dt,
            ..v.clone()
        };
        states[i] = if round {
            stored.round_to_dtype()
        } else {
            stored
        };
    }
    Ok(match step.op_type.as_str() {
        "write_state" => Vec::new(),
        _ => vec![states[i].clone()],
    })
}

/// Converts a caller's tensor to the element type a function input declares.
fn from_tensor(t: &Tensor, want: DType) -> Result<Arr, String> {
    let shape = t.shape().to_vec();
    match (want, t.data()) {
        (DType::F16 | DType::F32, TensorData::F32(v)) => {
            Ok(Arr::floats(want, shape, v.clone()).round_to_dtype())
        }
        (DType::F16 | DType::F32, TensorData::F16(v)) => Ok(Arr::floats(
            want,
            shape,
            v.iter().map(|x| x.to_f32()).collect(),
        )),
        (DType::I32, TensorData::I32(v)) => Ok(Arr::ints(want, shape, v.clone())),
        (want, _) => Err(format!("got {} data, the function takes {want}", t.dtype())),
    }
}

/// Converts an executor value to the public tensor type.
fn to_tensor(a: &Arr) -> Result<Tensor, String> {
    let shape = a.shape.clone();
    let r = match (&a.data, a.dt) {
        (Data::F(v), DType::F16) => Tensor::new(
            shape,
            TensorData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        ),
        (Data::F(v), _) => Tensor::new(shape, TensorData::F32(Arc::unwrap_or_clone(v.clone()))),
        (Data::I(v), _) => Tensor::new(shape, TensorData::I32(v.as_ref().clone())),
        (Data::B(v), _) => Tensor::new(
            shape,
            TensorData::I32(v.iter().map(|&b| b as i32).collect()),
        ),
        (Data::S(_), _) => return Err("string values cannot be returned".into()),
    };
    r.map_err(|e| e.to_string())
}

impl DataType {
    /// Parses `fp32`, `fp16` or `int32` (also `float32`, `float16`).
    pub fn parse(s: &str) -> Option<DataType> {
        Some(match s {
            "fp32" | "float32" => DataType::F32,
            "fp16" | "float16" => DataType::F16,
            "int32" => DataType::I32,
            _ => return None,
        })
    }
}
