//! Turning a MIL function into an execution plan.
//!
//! Loading resolves every variable name to a slot or a constant, checks every op is one kiln
//! runs with parameters it knows, decodes literals and weight blobs, and expands `constexpr_*`
//! weight decompression once. What remains is a list of steps over numbered slots.

use crate::blob::BlobFile;
use crate::ops::{self, Args};
use crate::proto;
use crate::value::{decode_immediate, value_sig, Arr, TensorSig, ValueSig};
use crate::CoreMlError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

/// Where an op input comes from.
#[derive(Clone, Debug)]
pub(crate) enum Operand {
    /// A value computed while running (or a function input).
    Slot(usize),
    /// A constant known at load time.
    Const(Arr),
}

/// A runtime value: a tensor, or a reference to one of the executor's states.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    T(Arr),
    State(usize),
}

/// One declared output of a step.
#[derive(Clone, Debug)]
pub(crate) struct Output {
    pub slot: usize,
    pub name: String,
    pub sig: TensorSig,
}

/// One operation to run.
#[derive(Debug)]
pub(crate) struct Step {
    pub op_type: String,
    pub name: String,
    pub inputs: Vec<(String, Vec<Operand>)>,
    pub outputs: Vec<Output>,
    /// Slots whose last reader is this step, freed after it runs.
    pub release: Vec<usize>,
}

/// A function input (tensor or state).
#[derive(Clone, Debug)]
pub(crate) struct FnInput {
    pub name: String,
    pub slot: usize,
    pub sig: TensorSig,
}

/// The executable form of one function.
#[derive(Debug)]
pub(crate) struct Plan {
    pub function: String,
    pub opset: String,
    pub inputs: Vec<FnInput>,
    pub states: Vec<FnInput>,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, Operand, TensorSig)>,
    pub slots: usize,
    /// How many ops of each type the function holds (constants included).
    pub op_counts: BTreeMap<String, usize>,
    /// Every (weight file, metadata offset) the program reads.
    pub blob_refs: Vec<(String, u64)>,
}

/// The package's weight files, opened on first use.
pub(crate) struct BlobStore {
    package: String,
    model_dir: PathBuf,
    files: HashMap<String, BlobFile>,
}

impl BlobStore {
    pub fn new(package: &str, model_dir: &Path) -> BlobStore {
        BlobStore {
            package: package.to_string(),
            model_dir: model_dir.to_path_buf(),
            files: HashMap::new(),
        }
    }

    /// Resolves a program's file name (`@model_path/weights/weight.bin`) inside the package.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, String> {
        let rel = name
            .strip_prefix("@model_path/")
            .ok_or_else(|| format!("weight file {name:?} does not start with @model_path/"))?;
        let rel = Path::new(rel);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "weight file {name:?} must be a plain path inside the package"
            ));
        }
        Ok(self.model_dir.join(rel))
    }

    pub fn get(&mut self, name: &str) -> Result<&BlobFile, CoreMlError> {
        if !self.files.contains_key(name) {
            let path = self.resolve(name).map_err(|m| CoreMlError::Package {
                package: self.package.clone(),
                message: m,
            })?;
            let f = BlobFile::open(&self.package, name, &path)?;
            self.files.insert(name.to_string(), f);
        }
        Ok(&self.files[name])
    }

    pub fn opened(&self) -> impl Iterator<Item = (&String, &BlobFile)> {
        self.files.iter()
    }
}

fn string_attr(op: &proto::Operation, key: &str) -> Option<String> {
    let v = op.attributes.get(key)?;
    match &v.value {
        Some(proto::ValueKind::ImmediateValue(iv)) => match &iv.value {
            Some(proto::ImmediateValueKind::Tensor(t)) => match &t.value {
                Some(proto::TensorValueKind::Strings(s)) => s.values.first().cloned(),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// The op's name for messages: its `name` attribute and, where it differs, the variable it
/// defines (the name a reader of the program looks for); else its index.
pub(crate) fn op_name(op: &proto::Operation, index: usize) -> String {
    let out = op.outputs.first().map(|o| o.name.clone());
    match (string_attr(op, "name"), out) {
        (Some(n), Some(o)) if n != o => format!("{n} [output {o}]"),
        (Some(n), _) => n,
        (None, Some(o)) => o,
        (None, None) => format!("#{index}"),
    }
}

/// Picks the block of a function: the one for its opset, or its only one.
pub(crate) fn function_block(f: &proto::Function) -> Result<&proto::Block, String> {
    if let Some(b) = f.block_specializations.get(&f.opset) {
        return Ok(b);
    }
    match f.block_specializations.len() {
        1 => Ok(f.block_specializations.values().next().unwrap()),
        0 => Err("the function has no block".into()),
        _ => Err(format!(
            "the function has no block for its opset {:?}",
            f.opset
        )),
    }
}

struct Builder<'a> {
    package: &'a str,
    blobs: &'a mut BlobStore,
    names: HashMap<String, (Operand, ValueSig)>,
    slots: usize,
    blob_refs: Vec<(String, u64)>,
}

impl Builder<'_> {
    fn new_slot(&mut self) -> usize {
        self.slots += 1;
        self.slots - 1
    }

    /// Decodes a literal or blob value read by op `op` of type `op_type`.
    fn value(&mut self, v: &proto::Value, op: &str, op_type: &str) -> Result<Arr, CoreMlError> {
        let err = |m: String| CoreMlError::Op {
            package: self.package.to_string(),
            op: op.to_string(),
            op_type: op_type.to_string(),
            message: m,
        };
        let sig = match value_sig(v.r#type.as_ref()).map_err(|m| err(format!("literal: {m}")))? {
            ValueSig::Tensor(t) => t,
            ValueSig::State(_) => return Err(err("a literal cannot be a state".into())),
        };
        match &v.value {
            Some(proto::ValueKind::ImmediateValue(iv)) => match &iv.value {
                Some(proto::ImmediateValueKind::Tensor(t)) => {
                    decode_immediate(&sig, t).map_err(|m| err(format!("literal: {m}")))
                }
                _ => Err(err(
                    "only tensor literals are supported (not tuples, lists or dictionaries)".into(),
                )),
            },
            Some(proto::ValueKind::BlobFileValue(b)) => {
                self.blob_refs.push((b.file_name.clone(), b.offset));
                let file = self.blobs.get(&b.file_name)?;
                file.read(b.offset, &sig).map_err(|e| match e {
                    CoreMlError::Blob {
                        package,
                        file,
                        offset,
                        message,
                    } => CoreMlError::Blob {
                        package,
                        file,
                        offset,
                        message: format!("{message} (read by op {op} ({op_type}))"),
                    },
                    other => other,
                })
            }
            None => Err(err("a value without contents".into())),
        }
    }
}

/// Checks a computed value against the type the program declares for it.
pub(crate) fn conform(a: Arr, sig: &TensorSig, round_f16: bool) -> Result<Arr, String> {
    if a.kind() != sig.dt.kind() {
        return Err(format!(
            "produced {} where the program declares {}",
            a.describe(),
            sig.describe()
        ));
    }
    if a.shape.len() != sig.dims.len()
        || a.shape
            .iter()
            .zip(&sig.dims)
            .any(|(&s, d)| d.is_some_and(|d| d != s))
    {
        return Err(format!(
            "produced shape {:?} where the program declares {}",
            a.shape,
            sig.describe()
        ));
    }
    let a = Arr { dt: sig.dt, ..a };
    Ok(if round_f16 { a.round_to_dtype() } else { a })
}

/// Builds the plan of function `function` of `program`.
pub(crate) fn build(
    package: &str,
    program: &proto::Program,
    function: &str,
    blobs: &mut BlobStore,
) -> Result<Plan, CoreMlError> {
    let pkg_err = |m: String| CoreMlError::Package {
        package: package.to_string(),
        message: m,
    };
    let f = program.functions.get(function).ok_or_else(|| {
        let mut names: Vec<&String> = program.functions.keys().collect();
        names.sort();
        pkg_err(format!(
            "the program has no function {function:?} (it has {names:?})"
        ))
    })?;
    let block = function_block(f).map_err(|m| pkg_err(format!("function {function}: {m}")))?;
    let mut b = Builder {
        package,
        blobs,
        names: HashMap::new(),
        slots: 0,
        blob_refs: Vec::new(),
    };
    let mut inputs = Vec::new();
    let mut states = Vec::new();
    for inp in &f.inputs {
        let sig = value_sig(inp.r#type.as_ref())
            .map_err(|m| pkg_err(format!("function input {}: {m}", inp.name)))?;
        if b.names.contains_key(&inp.name) {
            return Err(pkg_err(format!(
                "function input {} is declared twice",
                inp.name
            )));
        }
        let slot = b.new_slot();
        let (ValueSig::Tensor(t) | ValueSig::State(t)) = &sig;
        let entry = FnInput {
            name: inp.name.clone(),
            slot,
            sig: t.clone(),
        };
        match &sig {
            ValueSig::Tensor(_) => inputs.push(entry),
            ValueSig::State(t) => {
                match t.fixed_shape() {
                    None => {
                        return Err(pkg_err(format!(
                            "state {} has no fixed shape ({})",
                            inp.name,
                            t.describe()
                        )))
                    }
                    Some(shape) => ops::check_elements(&shape)
                        .map_err(|m| pkg_err(format!("state {}: {m}", inp.name)))?,
                }
                states.push(entry)
            }
        }
        b.names.insert(inp.name.clone(), (Operand::Slot(slot), sig));
    }
    let mut steps = Vec::new();
    let mut op_counts = BTreeMap::new();
    for (index, op) in block.operations.iter().enumerate() {
        let name = op_name(op, index);
        let op_type = op.r#type.clone();
        let err = |m: String| CoreMlError::Op {
            package: package.to_string(),
            op: name.clone(),
            op_type: op_type.clone(),
            message: m,
        };
        *op_counts.entry(op_type.clone()).or_insert(0usize) += 1;
        let spec = ops::op_spec(&op_type).ok_or_else(|| {
            err(format!(
                "op type {op_type:?} is not one kiln can run (kiln_coreml::supported_ops lists those)"
            ))
        })?;
        if !op.blocks.is_empty() {
            return Err(err(
                "ops with nested blocks (control flow) are not supported".into(),
            ));
        }
        // Inputs, in a stable order.
        let mut params: Vec<&String> = op.inputs.keys().collect();
        params.sort();
        let mut resolved: Vec<(String, Vec<Operand>)> = Vec::new();
        for p in params {
            if !spec.required.contains(&p.as_str()) && !spec.optional.contains(&p.as_str()) {
                return Err(err(format!("unknown input {p:?}")));
            }
            let arg = &op.inputs[p];
            if arg.arguments.is_empty() {
                return Err(err(format!("input {p} binds nothing")));
            }
            let mut operands = Vec::with_capacity(arg.arguments.len());
            for binding in &arg.arguments {
                operands.push(match &binding.binding {
                    Some(proto::BindingKind::Name(n)) => match b.names.get(n) {
                        Some((o, _)) => o.clone(),
                        None => {
                            return Err(err(format!(
                                "input {p} refers to undefined variable {n:?}"
                            )))
                        }
                    },
                    Some(proto::BindingKind::Value(v)) => {
                        Operand::Const(b.value(v, &name, &op_type)?)
                    }
                    None => return Err(err(format!("input {p} has an empty binding"))),
                });
            }
            resolved.push((p.clone(), operands));
        }
        for r in spec.required {
            if !resolved.iter().any(|(n, _)| n == r) {
                return Err(err(format!("missing required input {r:?}")));
            }
        }
        // Outputs.
        let mut outputs = Vec::with_capacity(op.outputs.len());
        for o in &op.outputs {
            let sig = match value_sig(o.r#type.as_ref())
                .map_err(|m| err(format!("output {}: {m}", o.name)))?
            {
                ValueSig::Tensor(t) => t,
                ValueSig::State(_) => {
                    return Err(err(format!("output {} cannot be a state", o.name)))
                }
            };
            if b.names.contains_key(&o.name) || outputs.iter().any(|x: &Output| x.name == o.name) {
                return Err(err(format!("variable {:?} is defined twice", o.name)));
            }
            outputs.push(Output {
                slot: usize::MAX,
                name: o.name.clone(),
                sig,
            });
        }
        let state_op = matches!(
            op_type.as_str(),
            "read_state" | "write_state" | "coreml_update_state"
        );
        let want_outputs = match op_type.as_str() {
            "write_state" => 0,
            "split" => outputs.len().max(1),
            _ => 1,
        };
        if outputs.len() != want_outputs {
            return Err(err(format!(
                "declares {} outputs, expected {want_outputs}",
                outputs.len()
            )));
        }
        if state_op {
            let key = if op_type == "coreml_update_state" {
                "state"
            } else {
                "input"
            };
            let target = &resolved.iter().find(|(n, _)| n == key).unwrap().1;
            let is_state = matches!(target.as_slice(), [Operand::Slot(s)]
                if states.iter().any(|st| st.slot == *s));
            if !is_state {
                return Err(err(format!(
                    "input {key} must name a state of the function"
                )));
            }
        }
        if op_type == "const" || op_type.starts_with("constexpr_") {
            let value = if op_type == "const" {
                let v = op
                    .attributes
                    .get("val")
                    .ok_or_else(|| err("const without a val attribute".into()))?;
                b.value(v, &name, &op_type)?
            } else {
                let mut consts = Vec::new();
                for (n, os) in &resolved {
                    match os.as_slice() {
                        [Operand::Const(_)] => consts.push((n.clone(), os.clone())),
                        _ => return Err(err(format!("input {n} must be a constant"))),
                    }
                }
                let args = Args {
                    inputs: &consts,
                    env: &[],
                    outputs: &outputs,
                };
                ops::run_constexpr(&op_type, &args).map_err(&err)?
            };
            let out = &outputs[0];
            let value = conform(value, &out.sig, true)
                .map_err(|m| err(format!("output {}: {m}", out.name)))?;
            b.names.insert(
                out.name.clone(),
                (Operand::Const(value), ValueSig::Tensor(out.sig.clone())),
            );
            continue;
        }
        for o in outputs.iter_mut() {
            o.slot = b.new_slot();
            b.names.insert(
                o.name.clone(),
                (Operand::Slot(o.slot), ValueSig::Tensor(o.sig.clone())),
            );
        }
        steps.push(Step {
            op_type,
            name,
            inputs: resolved,
            outputs,
            release: Vec::new(),
        });
    }
    let mut outputs = Vec::new();
    for o in &block.outputs {
        match b.names.get(o) {
            Some((operand, ValueSig::Tensor(sig))) => {
                outputs.push((o.clone(), operand.clone(), sig.clone()))
            }
            Some((_, ValueSig::State(_))) => {
                return Err(pkg_err(format!("block output {o} is a state")))
            }
            None => {
                return Err(pkg_err(format!(
                    "block output {o:?} is an undefined variable"
                )))
            }
        }
    }
    // Free each slot after its last reader so large intermediates do not pile up.
    let mut last = vec![None; b.slots];
    for (i, s) in steps.iter().enumerate() {
        for (_, os) in &s.inputs {
            for o in os {
                if let Operand::Slot(x) = o {
                    last[*x] = Some(i);
                }
            }
        }
    }
    for (_, o, _) in &outputs {
        if let Operand::Slot(x) = o {
            last[*x] = None;
        }
    }
    for st in &states {
        last[st.slot] = None;
    }
    for (slot, l) in last.into_iter().enumerate() {
        if let Some(i) = l {
            steps[i].release.push(slot);
        }
    }
    Ok(Plan {
        function: function.to_string(),
        opset: f.opset.clone(),
        inputs,
        states,
        steps,
        outputs,
        slots: b.slots,
        op_counts,
        blob_refs: b.blob_refs,
    })
}
