//! The `.mlpackage` directory: manifest, model specification and interface description.

use crate::program::{self, BlobStore, Plan};
use crate::proto;
use crate::value::{DType, TensorSig};
use crate::CoreMlError;
use prost::Message;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The element type of a multi-array feature in the model description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrayDataType {
    /// fp32.
    Float32,
    /// fp64.
    Double,
    /// fp16.
    Float16,
    /// int32.
    Int32,
    /// int8.
    Int8,
}

impl ArrayDataType {
    fn from_proto(code: i32) -> Option<ArrayDataType> {
        use proto::ArrayDataType as P;
        Some(match P::try_from(code).ok()? {
            P::Float32 => ArrayDataType::Float32,
            P::Double => ArrayDataType::Double,
            P::Float16 => ArrayDataType::Float16,
            P::Int32 => ArrayDataType::Int32,
            P::Int8 => ArrayDataType::Int8,
            P::InvalidArrayDataType => return None,
        })
    }

    /// The matching MIL element type.
    pub(crate) fn mil(self) -> DType {
        match self {
            ArrayDataType::Float32 => DType::F32,
            ArrayDataType::Double => DType::F64,
            ArrayDataType::Float16 => DType::F16,
            ArrayDataType::Int32 => DType::I32,
            ArrayDataType::Int8 => DType::I8,
        }
    }

    /// The name used in messages: `fp32`, `fp64`, `fp16`, `int32`, `int8`.
    pub fn name(self) -> &'static str {
        self.mil().name()
    }
}

/// An inclusive range of sizes for one dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimRange {
    /// The smallest size.
    pub lower: usize,
    /// The largest size, `None` when unbounded.
    pub upper: Option<usize>,
}

/// Which shapes a multi-array feature accepts besides its default one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapeFlexibility {
    /// No shape is declared (typical of outputs whose size depends on the inputs).
    Unspecified,
    /// Only the default shape.
    Fixed,
    /// Any shape within a range per dimension.
    Ranges(Vec<DimRange>),
    /// One of a list of shapes.
    Enumerated(Vec<Vec<usize>>),
}

/// A multi-array (or state) feature's element type and shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayInfo {
    /// The element type.
    pub dtype: ArrayDataType,
    /// The default shape (empty when unspecified).
    pub shape: Vec<usize>,
    /// The other accepted shapes.
    pub flexibility: ShapeFlexibility,
}

impl ArrayInfo {
    /// Whether `shape` is one this feature accepts.
    pub fn accepts(&self, shape: &[usize]) -> bool {
        match &self.flexibility {
            ShapeFlexibility::Unspecified => true,
            ShapeFlexibility::Fixed => shape == self.shape.as_slice(),
            ShapeFlexibility::Ranges(r) => {
                r.len() == shape.len()
                    && r.iter()
                        .zip(shape)
                        .all(|(r, &s)| s >= r.lower && r.upper.is_none_or(|u| s <= u))
            }
            ShapeFlexibility::Enumerated(list) => list.iter().any(|l| l == shape),
        }
    }

    /// The rank the description implies, if it implies one.
    pub fn rank(&self) -> Option<usize> {
        match &self.flexibility {
            ShapeFlexibility::Unspecified => None,
            ShapeFlexibility::Fixed => Some(self.shape.len()),
            ShapeFlexibility::Ranges(r) => Some(r.len()),
            ShapeFlexibility::Enumerated(l) => l.first().map(|s| s.len()),
        }
    }
}

impl fmt::Display for ArrayInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dtype.name())?;
        match &self.flexibility {
            ShapeFlexibility::Unspecified => write!(f, " (shape unspecified)"),
            ShapeFlexibility::Fixed => write!(f, " {:?}", self.shape),
            ShapeFlexibility::Ranges(r) => {
                let parts: Vec<String> = r
                    .iter()
                    .map(|d| match d.upper {
                        Some(u) if u == d.lower => u.to_string(),
                        Some(u) => format!("{}..={u}", d.lower),
                        None => format!("{}..", d.lower),
                    })
                    .collect();
                write!(f, " [{}] (default {:?})", parts.join(", "), self.shape)
            }
            ShapeFlexibility::Enumerated(l) => {
                write!(f, " one of {l:?} (default {:?})", self.shape)
            }
        }
    }
}

/// The type of a feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureType {
    /// A multi-array.
    Array(ArrayInfo),
    /// A state holding a multi-array.
    State(ArrayInfo),
    /// Any other kind (image, string, dictionary, ...), named.
    Other(String),
}

/// One named input, output or state of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    /// The feature's name.
    pub name: String,
    /// Its type.
    pub ty: FeatureType,
    /// Whether it may be omitted.
    pub optional: bool,
}

impl FeatureInfo {
    /// The array description of an array or state feature.
    pub fn array(&self) -> Option<&ArrayInfo> {
        match &self.ty {
            FeatureType::Array(a) | FeatureType::State(a) => Some(a),
            FeatureType::Other(_) => None,
        }
    }
}

impl fmt::Display for FeatureInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ty {
            FeatureType::Array(a) => write!(f, "{}: {a}", self.name),
            FeatureType::State(a) => write!(f, "{}: state {a}", self.name),
            FeatureType::Other(k) => write!(f, "{}: {k}", self.name),
        }
    }
}

/// The model's interface as its description declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDescription {
    /// The Core ML specification version the model declares.
    pub specification_version: i32,
    /// The inputs.
    pub inputs: Vec<FeatureInfo>,
    /// The outputs.
    pub outputs: Vec<FeatureInfo>,
    /// The states (Core ML 8 / specification version 9 onwards).
    pub states: Vec<FeatureInfo>,
    /// Author, license, version and user-defined metadata.
    pub metadata: BTreeMap<String, String>,
}

impl fmt::Display for ModelDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "specification version {}", self.specification_version)?;
        for (what, list) in [
            ("input", &self.inputs),
            ("output", &self.outputs),
            ("state", &self.states),
        ] {
            for x in list {
                writeln!(f, "{what} {x}")?;
            }
        }
        Ok(())
    }
}

fn feature(package: &str, d: &proto::FeatureDescription) -> Result<FeatureInfo, CoreMlError> {
    let bad = |m: String| CoreMlError::Package {
        package: package.to_string(),
        message: format!("feature {}: {m}", d.name),
    };
    let array = |a: &proto::ArrayFeatureType| -> Result<ArrayInfo, CoreMlError> {
        let dtype = ArrayDataType::from_proto(a.data_type)
            .ok_or_else(|| bad(format!("unknown array data type {}", a.data_type)))?;
        let dims = |v: &[i64]| -> Result<Vec<usize>, CoreMlError> {
            v.iter()
                .map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}"))))
                .collect()
        };
        let shape = dims(&a.shape)?;
        let flexibility = match &a.shape_flexibility {
            None if shape.is_empty() => ShapeFlexibility::Unspecified,
            None => ShapeFlexibility::Fixed,
            Some(proto::ShapeFlexibility::ShapeRange(r)) => {
                let mut v = Vec::new();
                for s in &r.size_ranges {
                    let lower = usize::try_from(s.lower_bound)
                        .map_err(|_| bad("lower bound too large".into()))?;
                    let upper = if s.upper_bound < 0 {
                        None
                    } else {
                        Some(s.upper_bound as usize)
                    };
                    if upper.is_some_and(|u| u < lower) {
                        return Err(bad(format!(
                            "size range {}..={} is empty",
                            s.lower_bound, s.upper_bound
                        )));
                    }
                    v.push(DimRange { lower, upper });
                }
                ShapeFlexibility::Ranges(v)
            }
            Some(proto::ShapeFlexibility::EnumeratedShapes(e)) => ShapeFlexibility::Enumerated(
                e.shapes
                    .iter()
                    .map(|s| dims(&s.shape))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(ArrayInfo {
            dtype,
            shape,
            flexibility,
        })
    };
    let t = d.r#type.as_ref().ok_or_else(|| bad("no type".into()))?;
    let ty = match &t.r#type {
        Some(proto::FeatureTypeKind::MultiArrayType(a)) => FeatureType::Array(array(a)?),
        Some(proto::FeatureTypeKind::StateType(s)) => match &s.r#type {
            Some(proto::StateFeatureKind::ArrayType(a)) => FeatureType::State(array(a)?),
            None => return Err(bad("a state without an array type".into())),
        },
        Some(proto::FeatureTypeKind::Int64Type(_)) => FeatureType::Other("int64".into()),
        Some(proto::FeatureTypeKind::DoubleType(_)) => FeatureType::Other("double".into()),
        Some(proto::FeatureTypeKind::StringType(_)) => FeatureType::Other("string".into()),
        Some(proto::FeatureTypeKind::ImageType(i)) => {
            FeatureType::Other(format!("image {}x{}", i.width, i.height))
        }
        None => FeatureType::Other("unknown feature type".into()),
    };
    Ok(FeatureInfo {
        name: d.name.clone(),
        ty,
        optional: t.is_optional,
    })
}

/// An opened Core ML ML Program package.
pub struct MlPackage {
    path: PathBuf,
    label: String,
    model_dir: PathBuf,
    model: proto::Model,
    description: ModelDescription,
}

impl fmt::Debug for MlPackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlPackage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Refuses absolute paths and `..` so a hostile manifest cannot point outside the package.
fn inside(package: &str, base: &Path, rel: &str) -> Result<PathBuf, CoreMlError> {
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(CoreMlError::Package {
            package: package.to_string(),
            message: format!("Manifest.json: path {rel:?} must be a plain relative path"),
        });
    }
    Ok(base.join(p))
}

/// The largest model specification kiln reads; protobufs of ML Programs are small (weights
/// live in blob files), so anything bigger is refused rather than read into memory.
const MAX_MODEL_BYTES: u64 = 1 << 30;

impl MlPackage {
    /// Opens a package: reads `Manifest.json`, finds the root model and decodes its
    /// specification and interface. Weights are read later, by [`MlPackage::verify`] and
    /// [`crate::Executor::new`].
    pub fn open(path: impl AsRef<Path>) -> Result<MlPackage, CoreMlError> {
        let path = path.as_ref().to_path_buf();
        let label = path.display().to_string();
        let pkg_err = |m: String| CoreMlError::Package {
            package: label.clone(),
            message: m,
        };
        if !path.is_dir() {
            return Err(pkg_err(
                "not a package directory (an .mlpackage is a folder with Manifest.json)".into(),
            ));
        }
        let manifest_path = path.join("Manifest.json");
        let text = std::fs::read(&manifest_path).map_err(|e| CoreMlError::Io {
            path: manifest_path.clone(),
            source: e,
        })?;
        let manifest: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| pkg_err(format!("Manifest.json is not valid JSON: {e}")))?;
        let root = manifest
            .get("rootModelIdentifier")
            .and_then(|v| v.as_str())
            .ok_or_else(|| pkg_err("Manifest.json has no rootModelIdentifier".into()))?;
        let entry = manifest
            .get("itemInfoEntries")
            .and_then(|e| e.get(root))
            .ok_or_else(|| {
                pkg_err(format!(
                    "Manifest.json: itemInfoEntries has no entry {root:?} (the root model)"
                ))
            })?;
        let rel = entry
            .get("path")
            .and_then(|v| v.as_str())
            .ok_or_else(|| pkg_err(format!("Manifest.json: entry {root} has no path")))?;
        let model_path = inside(&label, &path.join("Data"), rel)?;
        let model_dir = model_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| path.join("Data"));
        let io = |e| CoreMlError::Io {
            path: model_path.clone(),
            source: e,
        };
        let len = std::fs::metadata(&model_path).map_err(io)?.len();
        if len > MAX_MODEL_BYTES {
            return Err(pkg_err(format!(
                "{rel}: the model specification is {len} bytes, more than kiln reads"
            )));
        }
        let bytes = std::fs::read(&model_path).map_err(io)?;
        let model = proto::Model::decode(bytes.as_slice())
            .map_err(|e| pkg_err(format!("{rel} is not a valid Core ML model protobuf: {e}")))?;
        let desc = model
            .description
            .as_ref()
            .ok_or_else(|| pkg_err(format!("{rel}: the model has no description")))?;
        let feats = |list: &[proto::FeatureDescription]| -> Result<Vec<FeatureInfo>, CoreMlError> {
            list.iter().map(|d| feature(&label, d)).collect()
        };
        let mut metadata = BTreeMap::new();
        if let Some(m) = &desc.metadata {
            for (k, v) in [
                ("shortDescription", &m.short_description),
                ("versionString", &m.version_string),
                ("author", &m.author),
                ("license", &m.license),
            ] {
                if !v.is_empty() {
                    metadata.insert(k.to_string(), v.clone());
                }
            }
            for (k, v) in &m.user_defined {
                metadata.insert(k.clone(), v.clone());
            }
        }
        let description = ModelDescription {
            specification_version: model.specification_version,
            inputs: feats(&desc.input)?,
            outputs: feats(&desc.output)?,
            states: feats(&desc.state)?,
            metadata,
        };
        Ok(MlPackage {
            path,
            label,
            model_dir,
            model,
            description,
        })
    }

    /// The package's path, as given to [`MlPackage::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The interface the model declares: inputs, outputs and states with types and shapes.
    pub fn description(&self) -> &ModelDescription {
        &self.description
    }

    /// The decoded model specification.
    pub fn model(&self) -> &proto::Model {
        &self.model
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn err(&self, m: String) -> CoreMlError {
        CoreMlError::Package {
            package: self.label.clone(),
            message: m,
        }
    }

    /// The ML Program, or an error when the model is another kind.
    pub fn program(&self) -> Result<&proto::Program, CoreMlError> {
        match &self.model.r#type {
            Some(proto::ModelType::MlProgram(p)) => Ok(p),
            None => Err(self.err(
                "the model is not an ML Program (neural networks, pipelines and other model kinds are not supported)".into(),
            )),
        }
    }

    /// The function predictions run: the description's default function, else `main`.
    pub fn main_function(&self) -> String {
        self.model
            .description
            .as_ref()
            .map(|d| d.default_function_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "main".to_string())
    }

    /// Builds the execution plan of the main function, reading every weight it uses.
    pub(crate) fn plan(&self, blobs: &mut BlobStore) -> Result<Plan, CoreMlError> {
        program::build(&self.label, self.program()?, &self.main_function(), blobs)
    }

    pub(crate) fn blob_store(&self) -> BlobStore {
        BlobStore::new(&self.label, &self.model_dir)
    }

    /// Checks the description against the function the plan was built from.
    pub(crate) fn check_interface(&self, plan: &Plan) -> Result<(), CoreMlError> {
        let d = &self.description;
        let mismatch = |what: &str, name: &str, m: String| {
            self.err(format!(
                "the description disagrees with function {}: {what} {name}: {m}",
                plan.function
            ))
        };
        let check_array = |what: &str,
                           name: &str,
                           info: &ArrayInfo,
                           sig: &TensorSig|
         -> Result<(), CoreMlError> {
            if info.dtype.mil() != sig.dt {
                return Err(mismatch(
                    what,
                    name,
                    format!(
                        "described as {} but the function has {}",
                        info.dtype.name(),
                        sig.describe()
                    ),
                ));
            }
            if let Some(r) = info.rank() {
                if r != sig.dims.len() {
                    return Err(mismatch(
                        what,
                        name,
                        format!(
                            "described with rank {r} but the function has {}",
                            sig.describe()
                        ),
                    ));
                }
                for (i, dim) in sig.dims.iter().enumerate() {
                    let Some(dim) = dim else { continue };
                    let ok = match &info.flexibility {
                        ShapeFlexibility::Ranges(rs) => {
                            rs[i].lower == *dim && rs[i].upper == Some(*dim)
                        }
                        ShapeFlexibility::Enumerated(l) => l.iter().all(|s| s[i] == *dim),
                        _ => info.shape.get(i) == Some(dim),
                    };
                    if !ok {
                        return Err(mismatch(
                                what,
                                name,
                                format!(
                                    "described as {info} but dimension {i} of the function's {} is fixed",
                                    sig.describe()
                                ),
                            ));
                    }
                }
                if !info.shape.is_empty() && !info.accepts(&info.shape) {
                    return Err(mismatch(
                        what,
                        name,
                        format!(
                            "the default shape {:?} is outside its own range",
                            info.shape
                        ),
                    ));
                }
            }
            Ok(())
        };
        for f in &d.inputs {
            let Some(inp) = plan.inputs.iter().find(|i| i.name == f.name) else {
                return Err(mismatch(
                    "input",
                    &f.name,
                    "the function has no such input".into(),
                ));
            };
            match &f.ty {
                FeatureType::Array(a) => check_array("input", &f.name, a, &inp.sig)?,
                other => {
                    return Err(mismatch(
                        "input",
                        &f.name,
                        format!("{other:?} is not supported"),
                    ))
                }
            }
        }
        for i in &plan.inputs {
            if !d.inputs.iter().any(|f| f.name == i.name) {
                return Err(mismatch(
                    "input",
                    &i.name,
                    "missing from the description".into(),
                ));
            }
        }
        for f in &d.states {
            let Some(st) = plan.states.iter().find(|s| s.name == f.name) else {
                return Err(mismatch(
                    "state",
                    &f.name,
                    "the function has no such state".into(),
                ));
            };
            match &f.ty {
                FeatureType::State(a) => {
                    check_array("state", &f.name, a, &st.sig)?;
                    if st.sig.fixed_shape().as_deref() != Some(a.shape.as_slice()) {
                        return Err(mismatch(
                            "state",
                            &f.name,
                            format!(
                                "described as {a} but the function has {}",
                                st.sig.describe()
                            ),
                        ));
                    }
                }
                other => {
                    return Err(mismatch(
                        "state",
                        &f.name,
                        format!("{other:?} is not a state type"),
                    ))
                }
            }
        }
        for s in &plan.states {
            if !d.states.iter().any(|f| f.name == s.name) {
                return Err(mismatch(
                    "state",
                    &s.name,
                    "missing from the description".into(),
                ));
            }
        }
        for f in &d.outputs {
            let Some((_, _, sig)) = plan.outputs.iter().find(|o| o.0 == f.name) else {
                return Err(mismatch(
                    "output",
                    &f.name,
                    "the function returns no such value".into(),
                ));
            };
            match &f.ty {
                FeatureType::Array(a) => check_array("output", &f.name, a, sig)?,
                other => {
                    return Err(mismatch(
                        "output",
                        &f.name,
                        format!("{other:?} is not supported"),
                    ))
                }
            }
        }
        for (name, _, _) in &plan.outputs {
            if !d.outputs.iter().any(|f| &f.name == name) {
                return Err(mismatch(
                    "output",
                    name,
                    "missing from the description".into(),
                ));
            }
        }
        Ok(())
    }

    /// Validates the whole package without running it: structure, every op known and
    /// well-formed, every variable defined before use, every weight blob in bounds with a
    /// valid sentinel, the description agreeing with the function signature, and a
    /// specification version high enough for the features used.
    pub fn verify(&self) -> Result<VerifyReport, CoreMlError> {
        let mut blobs = self.blob_store();
        let plan = self.plan(&mut blobs)?;
        self.check_interface(&plan)?;
        // Every blob of every weight file the program reads, not only the referenced ones.
        let mut files = Vec::new();
        for (name, f) in blobs.opened() {
            let infos = f.walk()?;
            files.push(WeightFileReport {
                name: name.clone(),
                bytes: f.len(),
                blobs: infos.len(),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let required = required_version(&plan, !self.description.states.is_empty());
        let (need, why) = required;
        if self.model.specification_version < need {
            return Err(self.err(format!(
                "specification version {} is too old: {why} needs version {need} or later",
                self.model.specification_version
            )));
        }
        Ok(VerifyReport {
            specification_version: self.model.specification_version,
            required_specification_version: need,
            function: plan.function.clone(),
            opset: plan.opset.clone(),
            op_count: plan.op_counts.values().sum(),
            op_types: plan.op_counts.clone(),
            weight_files: files,
            referenced_blobs: plan.blob_refs.len(),
            inputs: plan.inputs.iter().map(|i| i.name.clone()).collect(),
            outputs: plan.outputs.iter().map(|o| o.0.clone()).collect(),
            states: plan.states.iter().map(|s| s.name.clone()).collect(),
        })
    }
}

/// The lowest specification version a plan's features need, and the feature that needs it.
fn required_version(plan: &Plan, described_states: bool) -> (i32, String) {
    // ML Programs arrived with iOS 15 (version 6); opset CoreML<n> is specification n + 1.
    let mut need = (6, "an ML Program".to_string());
    let mut raise = |v: i32, why: String| {
        if v > need.0 {
            need = (v, why);
        }
    };
    if !plan.states.is_empty() || described_states {
        raise(9, "a model with states".into());
    }
    if let Some(n) = plan
        .opset
        .strip_prefix("CoreML")
        .and_then(|n| n.parse::<i32>().ok())
    {
        raise(n + 1, format!("opset {}", plan.opset));
    }
    for op in plan.op_counts.keys() {
        let v = match op.as_str() {
            "read_state" | "write_state" | "coreml_update_state" => 9,
            "constexpr_blockwise_shift_scale"
            | "constexpr_lut_to_dense"
            | "scaled_dot_product_attention" => 9,
            "constexpr_affine_dequantize" | "constexpr_cast" => 7,
            _ => 0,
        };
        raise(v, format!("op {op}"));
    }
    need
}

/// One weight file checked by [`MlPackage::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFileReport {
    /// The name the program uses, e.g. `@model_path/weights/weight.bin`.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// How many blobs its header announces (all were checked).
    pub blobs: usize,
}

/// What [`MlPackage::verify`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// The version the model declares.
    pub specification_version: i32,
    /// The lowest version its features need.
    pub required_specification_version: i32,
    /// The function checked.
    pub function: String,
    /// Its opset, e.g. `CoreML8`.
    pub opset: String,
    /// Operations in the function, constants included.
    pub op_count: usize,
    /// Operations by type.
    pub op_types: BTreeMap<String, usize>,
    /// The weight files read.
    pub weight_files: Vec<WeightFileReport>,
    /// Blob references in the program (each read and checked against its declared type).
    pub referenced_blobs: usize,
    /// Input names.
    pub inputs: Vec<String>,
    /// Output names.
    pub outputs: Vec<String>,
    /// State names.
    pub states: Vec<String>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "specification version {} (features need {}), function {} ({})",
            self.specification_version,
            self.required_specification_version,
            self.function,
            self.opset
        )?;
        writeln!(f, "{} ops:", self.op_count)?;
        for (t, n) in &self.op_types {
            writeln!(f, "  {t}: {n}")?;
        }
        for w in &self.weight_files {
            writeln!(
                f,
                "weights {}: {} bytes, {} blobs",
                w.name, w.bytes, w.blobs
            )?;
        }
        writeln!(f, "inputs: {}", self.inputs.join(", "))?;
        writeln!(f, "outputs: {}", self.outputs.join(", "))?;
        write!(f, "states: {}", self.states.join(", "))
    }
}
