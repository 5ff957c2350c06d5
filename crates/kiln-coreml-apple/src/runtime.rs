//! Core ML through objc2: compiling and loading a package, stateful predictions, and the
//! compute plan. Only built for Apple platforms.

use crate::{strided_offsets, ComputeUnits, Device, OpPlacement, ResidencyReport};
use block2::{RcBlock, StackBlock};
use kiln_coreml::{CoreMlError, CoremlSession, MlPackage, PackageRunner, Tensor, TensorData};
use objc2::rc::Retained;
use objc2::runtime::{AnyObject, NSObjectProtocol, ProtocolObject};
use objc2::{AnyThread, ClassType};
use objc2_core_ml::{
    MLCPUComputeDevice, MLComputeDeviceProtocol, MLComputePlan, MLComputeUnits,
    MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLGPUComputeDevice, MLModel,
    MLModelConfiguration, MLModelStructureProgramBlock, MLMultiArray, MLMultiArrayDataType,
    MLNeuralEngineComputeDevice, MLState,
};
use objc2_foundation::{NSArray, NSDictionary, NSError, NSNumber, NSString, NSURL};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::mpsc;

fn err(package: &str, message: impl Into<String>) -> CoreMlError {
    CoreMlError::Package {
        package: package.to_string(),
        message: message.into(),
    }
}

fn ns_error(e: &NSError) -> String {
    e.localizedDescription().to_string()
}

fn units(u: ComputeUnits) -> MLComputeUnits {
    match u {
        ComputeUnits::All => MLComputeUnits::All,
        ComputeUnits::CpuAndGpu => MLComputeUnits::CPUAndGPU,
        ComputeUnits::CpuAndNeuralEngine => MLComputeUnits::CPUAndNeuralEngine,
        ComputeUnits::CpuOnly => MLComputeUnits::CPUOnly,
    }
}

fn configuration(u: ComputeUnits) -> Retained<MLModelConfiguration> {
    // SAFETY: a fresh configuration object; setting its compute units has no preconditions.
    unsafe {
        let config = MLModelConfiguration::new();
        config.setComputeUnits(units(u));
        config
    }
}

fn file_url(package: &str, path: &Path) -> Result<Retained<NSURL>, CoreMlError> {
    NSURL::from_file_path(path).ok_or_else(|| {
        err(
            package,
            format!("{} cannot be made a file URL", path.display()),
        )
    })
}

/// Stateful models (`MLState`, `newState`, predictions using a state) need macOS 15 / iOS 18;
/// on older systems the selectors do not exist, so refuse before calling them.
fn require_states(package: &str) -> Result<(), CoreMlError> {
    if objc2::available!(
        macos = 15.0,
        ios = 18.0,
        tvos = 18.0,
        visionos = 2.0,
        watchos = 11.0
    ) {
        Ok(())
    } else {
        Err(err(
            package,
            "stateful Core ML models need macOS 15 / iOS 18 or later",
        ))
    }
}

/// A package compiled to a `.mlmodelc` folder in a temporary place, removed when dropped.
struct Compiled {
    path: PathBuf,
    url: Retained<NSURL>,
}

impl Drop for Compiled {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Compiles the package with `MLModel.compileModelAtURL(_:completionHandler:)`, waiting for
/// the handler.
fn compile(package: &str, path: &Path) -> Result<Compiled, CoreMlError> {
    let url = file_url(package, path)?;
    let (tx, rx) = mpsc::channel::<Result<PathBuf, String>>();
    // Only plain Rust values leave the handler, which Core ML may call on another thread.
    let handler = RcBlock::new(move |compiled: *mut NSURL, error: *mut NSError| {
        // SAFETY: Core ML passes a valid NSURL or null, and a valid NSError or null, both
        // alive for the duration of the call.
        let result = match unsafe { (compiled.as_ref(), error.as_ref()) } {
            (Some(u), _) => u
                .to_file_path()
                .ok_or_else(|| "Core ML returned a compiled model that is not a file".to_string()),
            (None, Some(e)) => Err(ns_error(e)),
            (None, None) => Err("Core ML failed without saying why".to_string()),
        };
        let _ = tx.send(result);
    });
    // SAFETY: the URL and handler are valid objects; the handler has the signature the
    // method declares.
    unsafe { MLModel::compileModelAtURL_completionHandler(&url, &handler) };
    let compiled = rx
        .recv()
        .map_err(|_| err(package, "Core ML never finished compiling"))?
        .map_err(|m| err(package, format!("Core ML cannot compile the package: {m}")))?;
    let url = file_url(package, &compiled)?;
    Ok(Compiled {
        path: compiled,
        url,
    })
}

/// Runs a package's calls with Core ML, its KV cache in an `MLState`.
pub struct CoreMlRunner {
    package: String,
    units: ComputeUnits,
    model: Retained<MLModel>,
    state: Retained<MLState>,
    // Kept for the model's lifetime: Core ML may read weights from it lazily.
    _compiled: Compiled,
}

impl CoreMlRunner {
    /// Compiles and loads the package at `path` for the given compute units.
    pub fn load(path: &Path, compute_units: ComputeUnits) -> Result<CoreMlRunner, CoreMlError> {
        let package = path.display().to_string();
        require_states(&package)?;
        let compiled = compile(&package, path)?;
        let config = configuration(compute_units);
        // SAFETY: a valid compiled-model URL and configuration.
        let model =
            unsafe { MLModel::modelWithContentsOfURL_configuration_error(&compiled.url, &config) }
                .map_err(|e| {
                    err(
                        &package,
                        format!("Core ML cannot load the package: {}", ns_error(&e)),
                    )
                })?;
        // SAFETY: `newState` allocates zeroed state buffers for the model's declared states
        // (an empty state for a stateless model).
        let state = unsafe { model.newState() };
        Ok(CoreMlRunner {
            package,
            units: compute_units,
            model,
            state,
            _compiled: compiled,
        })
    }

    fn err(&self, message: impl Into<String>) -> CoreMlError {
        err(&self.package, message)
    }
}

/// Copies a tensor into a new `MLMultiArray` of the matching element type.
fn to_multi_array(
    package: &str,
    name: &str,
    t: &Tensor,
) -> Result<Retained<MLMultiArray>, CoreMlError> {
    let dims: Vec<Retained<NSNumber>> = t
        .shape()
        .iter()
        .map(|&d| NSNumber::new_isize(d as isize))
        .collect();
    let shape = NSArray::from_retained_slice(&dims);
    let dtype = match t.data() {
        TensorData::F32(_) => MLMultiArrayDataType::Float32,
        TensorData::F16(_) => MLMultiArrayDataType::Float16,
        TensorData::I32(_) => MLMultiArrayDataType::Int32,
    };
    // SAFETY: a fresh allocation initialised with a valid shape and element type.
    let array =
        unsafe { MLMultiArray::initWithShape_dataType_error(MLMultiArray::alloc(), &shape, dtype) }
            .map_err(|e| err(package, format!("input {name}: {}", ns_error(&e))))?;
    let shape: Vec<usize> = t.shape().to_vec();
    let failed = std::cell::Cell::new(false);
    let write = StackBlock::new(
        |bytes: NonNull<c_void>, size: isize, strides: NonNull<NSArray<NSNumber>>| {
            // SAFETY: Core ML passes the strides array, valid during the call.
            let strides: Vec<usize> = unsafe { strides.as_ref() }
                .iter()
                .map(|n| n.as_isize().max(0) as usize)
                .collect();
            let Some(offsets) = strided_offsets(&shape, &strides) else {
                failed.set(true);
                return;
            };
            let elem = match t.data() {
                TensorData::F16(_) => 2,
                _ => 4,
            };
            let end = offsets.iter().max().map_or(0, |&m| (m + 1) * elem);
            if end > size.max(0) as usize {
                failed.set(true);
                return;
            }
            // SAFETY: every offset was checked to lie inside the `size` bytes Core ML handed
            // over for writing, and the element type matches the array's.
            unsafe {
                match t.data() {
                    TensorData::F32(v) => {
                        let p = bytes.cast::<f32>().as_ptr();
                        for (&o, &x) in offsets.iter().zip(v) {
                            p.add(o).write_unaligned(x);
                        }
                    }
                    TensorData::F16(v) => {
                        let p = bytes.cast::<u16>().as_ptr();
                        for (&o, x) in offsets.iter().zip(v) {
                            p.add(o).write_unaligned(x.to_bits());
                        }
                    }
                    TensorData::I32(v) => {
                        let p = bytes.cast::<i32>().as_ptr();
                        for (&o, &x) in offsets.iter().zip(v) {
                            p.add(o).write_unaligned(x);
                        }
                    }
                }
            }
        },
    );
    // SAFETY: the handler runs synchronously, within this call.
    unsafe { array.getMutableBytesWithHandler(&write) };
    if failed.get() {
        return Err(err(
            package,
            format!("input {name}: Core ML's buffer does not fit shape {shape:?}"),
        ));
    }
    Ok(array)
}

/// Copies an `MLMultiArray` out into a tensor (fp16 stays fp16, doubles become f32).
fn from_multi_array(package: &str, name: &str, a: &MLMultiArray) -> Result<Tensor, CoreMlError> {
    // SAFETY: reading the shape, strides and type of a valid array.
    let (shape, strides, dtype) = unsafe { (a.shape(), a.strides(), a.dataType()) };
    let shape: Vec<usize> = shape.iter().map(|n| n.as_isize().max(0) as usize).collect();
    let strides: Vec<usize> = strides
        .iter()
        .map(|n| n.as_isize().max(0) as usize)
        .collect();
    let offsets = strided_offsets(&shape, &strides).ok_or_else(|| {
        err(
            package,
            format!("output {name}: strides disagree with shape"),
        )
    })?;
    let elem = if dtype == MLMultiArrayDataType::Float16 {
        2
    } else if dtype == MLMultiArrayDataType::Double {
        8
    } else if dtype == MLMultiArrayDataType::Float32 || dtype == MLMultiArrayDataType::Int32 {
        4
    } else {
        return Err(err(
            package,
            format!("output {name}: element type {} is not supported", dtype.0),
        ));
    };
    let out: std::cell::RefCell<Option<TensorData>> = std::cell::RefCell::new(None);
    let read = StackBlock::new(|bytes: NonNull<c_void>, size: isize| {
        let end = offsets.iter().max().map_or(0, |&m| (m + 1) * elem);
        if end > size.max(0) as usize {
            return;
        }
        // SAFETY: every offset lies inside the `size` readable bytes Core ML handed over,
        // read with the array's own element type.
        let data = unsafe {
            if elem == 2 {
                let p = bytes.cast::<u16>().as_ptr();
                TensorData::F16(
                    offsets
                        .iter()
                        .map(|&o| half::f16::from_bits(p.add(o).read_unaligned()))
                        .collect(),
                )
            } else if elem == 8 {
                let p = bytes.cast::<f64>().as_ptr();
                TensorData::F32(
                    offsets
                        .iter()
                        .map(|&o| p.add(o).read_unaligned() as f32)
                        .collect(),
                )
            } else if dtype == MLMultiArrayDataType::Int32 {
                let p = bytes.cast::<i32>().as_ptr();
                TensorData::I32(offsets.iter().map(|&o| p.add(o).read_unaligned()).collect())
            } else {
                let p = bytes.cast::<f32>().as_ptr();
                TensorData::F32(offsets.iter().map(|&o| p.add(o).read_unaligned()).collect())
            }
        };
        *out.borrow_mut() = Some(data);
    });
    // SAFETY: the handler runs synchronously, within this call.
    unsafe { a.getBytesWithHandler(&read) };
    let data = out.into_inner().ok_or_else(|| {
        err(
            package,
            format!("output {name}: Core ML's buffer is smaller than its shape"),
        )
    })?;
    Tensor::new(shape, data)
}

impl PackageRunner for CoreMlRunner {
    fn predict(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, CoreMlError> {
        let mut keys = Vec::with_capacity(inputs.len());
        let mut values = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let array = to_multi_array(&self.package, name, t)?;
            keys.push(NSString::from_str(name));
            // SAFETY: wrapping a valid multi-array.
            values.push(unsafe { MLFeatureValue::featureValueWithMultiArray(&array) });
        }
        let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
        let value_refs: Vec<&AnyObject> = values.iter().map(|v| -> &AnyObject { v }).collect();
        let dict: Retained<NSDictionary<NSString, AnyObject>> =
            NSDictionary::from_slices(&key_refs, &value_refs);
        // SAFETY: a dictionary of feature values keyed by name, as the initializer expects.
        let provider = unsafe {
            MLDictionaryFeatureProvider::initWithDictionary_error(
                MLDictionaryFeatureProvider::alloc(),
                &dict,
            )
        }
        .map_err(|e| self.err(format!("inputs: {}", ns_error(&e))))?;
        let provider = ProtocolObject::<dyn MLFeatureProvider>::from_ref(&*provider);
        // SAFETY: a valid input provider and this model's own state; predictions on one state
        // are never concurrent (`&mut self`).
        let result = unsafe {
            self.model
                .predictionFromFeatures_usingState_error(provider, &self.state)
        }
        .map_err(|e| self.err(format!("Core ML prediction failed: {}", ns_error(&e))))?;
        let mut out = HashMap::new();
        // SAFETY: reading the names and values of a valid output provider.
        let names = unsafe { result.featureNames() };
        for name in names.iter() {
            let key = name.to_string();
            // SAFETY: `name` is one of the provider's own feature names.
            let value = unsafe { result.featureValueForName(&name) };
            // SAFETY: reading the multi-array of a valid feature value.
            let array = value
                .and_then(|v| unsafe { v.multiArrayValue() })
                .ok_or_else(|| self.err(format!("output {key} is not a multi-array")))?;
            out.insert(key.clone(), from_multi_array(&self.package, &key, &array)?);
        }
        Ok(out)
    }

    fn reset_states(&mut self) {
        // SAFETY: a new state from the model, zero-initialised by Core ML.
        self.state = unsafe { self.model.newState() };
    }

    fn describe(&self) -> String {
        format!("Core ML, compute units {}", self.units)
    }
}

/// See [`crate::open_session`].
pub(crate) fn open_session(
    path: &Path,
    compute_units: ComputeUnits,
) -> Result<CoremlSession, CoreMlError> {
    CoremlSession::open_with(path, |pkg| {
        Ok(Box::new(CoreMlRunner::load(pkg.path(), compute_units)?))
    })
}

fn device_of(d: &ProtocolObject<dyn MLComputeDeviceProtocol>) -> Device {
    if d.isKindOfClass(MLNeuralEngineComputeDevice::class()) {
        Device::NeuralEngine
    } else if d.isKindOfClass(MLGPUComputeDevice::class()) {
        Device::Gpu
    } else if d.isKindOfClass(MLCPUComputeDevice::class()) {
        Device::Cpu
    } else {
        Device::Other
    }
}

/// Lists the ops of `block` (and of the blocks nested in them) with their placement.
fn place_block(
    plan: &MLComputePlan,
    block: &MLModelStructureProgramBlock,
    out: &mut Vec<OpPlacement>,
) {
    // SAFETY: reading the structure of a valid compute plan, on the thread that received it.
    unsafe {
        for op in block.operations().iter() {
            if let Some(usage) = plan.computeDeviceUsageForMLProgramOperation(&op) {
                let name = op
                    .outputs()
                    .iter()
                    .next()
                    .map(|o| o.name().to_string())
                    .unwrap_or_default();
                out.push(OpPlacement {
                    name,
                    op_type: op.operatorName().to_string(),
                    device: device_of(&usage.preferredComputeDevice()),
                    supported: usage
                        .supportedComputeDevices()
                        .iter()
                        .map(|d| device_of(&d))
                        .collect(),
                    cost: plan
                        .estimatedCostOfMLProgramOperation(&op)
                        .map(|c| c.weight()),
                });
            }
            for inner in op.blocks().iter() {
                place_block(plan, &inner, out);
            }
        }
    }
}

/// See [`crate::residency`]; the package is compiled first.
pub(crate) fn residency(
    path: &Path,
    compute_units: ComputeUnits,
) -> Result<ResidencyReport, CoreMlError> {
    let package = path.display().to_string();
    // MLComputePlan arrived with macOS 14.4 / iOS 17.4.
    if !objc2::available!(
        macos = 14.4,
        ios = 17.4,
        tvos = 17.4,
        visionos = 1.1,
        watchos = 10.4
    ) {
        return Err(err(
            &package,
            "Core ML's compute plan needs macOS 14.4 / iOS 17.4 or later",
        ));
    }
    let pkg = MlPackage::open(path)?;
    let function = pkg.main_function();
    let compiled = compile(&package, path)?;
    let config = configuration(compute_units);
    let (tx, rx) = mpsc::channel::<Result<Vec<OpPlacement>, String>>();
    let wanted = function.clone();
    // The plan is read inside the handler: only plain Rust values cross threads.
    let handler = RcBlock::new(move |plan: *mut MLComputePlan, error: *mut NSError| {
        // SAFETY: Core ML passes a valid plan or null, and a valid error or null, alive for
        // the duration of the call.
        let result = match unsafe { (plan.as_ref(), error.as_ref()) } {
            (Some(plan), _) => {
                // SAFETY: reading the structure of a valid plan.
                let program = unsafe { plan.modelStructure().program() };
                match program {
                    None => Err("the model is not an ML Program".to_string()),
                    Some(program) => {
                        // SAFETY: reading the functions of a valid program structure.
                        let functions = unsafe { program.functions() };
                        match functions.objectForKey(&NSString::from_str(&wanted)) {
                            None => Err(format!("the compute plan has no function {wanted}")),
                            Some(f) => {
                                let mut ops = Vec::new();
                                // SAFETY: the function's block, from a valid structure.
                                let block = unsafe { f.block() };
                                place_block(plan, &block, &mut ops);
                                Ok(ops)
                            }
                        }
                    }
                }
            }
            (None, Some(e)) => Err(ns_error(e)),
            (None, None) => Err("Core ML failed without saying why".to_string()),
        };
        let _ = tx.send(result);
    });
    // SAFETY: a valid compiled-model URL, configuration and handler of the declared type.
    unsafe {
        MLComputePlan::loadContentsOfURL_configuration_completionHandler(
            &compiled.url,
            &config,
            &handler,
        )
    };
    let ops = rx
        .recv()
        .map_err(|_| err(&package, "Core ML never delivered the compute plan"))?
        .map_err(|m| err(&package, format!("Core ML's compute plan: {m}")))?;
    Ok(ResidencyReport {
        package,
        compute_units,
        function,
        ops,
    })
}
