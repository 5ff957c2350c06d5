//! Core ML ML Program packages for kiln: reading, validating and executing them on the CPU.
//!
//! An `.mlpackage` is a folder: `Manifest.json` names the root model
//! (`Data/com.apple.CoreML/model.mlmodel`, a `Model` protobuf whose `mlProgram` holds the MIL
//! program) and its weights (`weights/weight.bin`, a blob storage file). This crate
//! - opens packages and describes their interface: [`MlPackage::open`],
//!   [`MlPackage::description`];
//! - validates them without running them: [`MlPackage::verify`];
//! - executes their main function on the CPU, with states carried across calls:
//!   [`Executor::new`], [`Executor::predict`], [`Executor::reset_states`];
//! - runs language-model packages token by token, with the call protocol read from their
//!   description, prompts split into calls and positions tracked: [`CoremlSession`], also
//!   over the packages of a model split over layers ([`chain`]);
//! - writes packages: [`export`] (weight files, package layout, a MIL program builder, weight
//!   compression as coremltools 9 writes it, and the Llama-family and Gemma 3 exporter).
//!
//! Execution computes in f32 with fp16 storage: weights, inputs, states and outputs the
//! program types as fp16 hold fp16 values ([`Fp16Rounding`] can also round every fp16
//! activation, as an fp16 device does). Weights compressed with `constexpr_*` ops are
//! expanded once at load. It is a reference executor for validating programs on machines
//! without Core ML, not a fast runtime.
//!
//! Every failure is a [`CoreMlError`] naming the package and, where it applies, the op or the
//! weight blob. Hostile input yields errors, never panics.

#![warn(missing_docs)]

mod blob;
pub mod chain;
pub mod cli_support;
mod error;
mod exec;
pub mod export;
mod ops;
mod package;
mod program;
#[path = "../proto/spec.rs"]
pub mod proto;
mod session;
mod tensor;
mod value;

pub use blob::{BlobInfo, BLOB_ALIGNMENT, BLOB_SENTINEL};
pub use error::CoreMlError;
pub use exec::{ExecOptions, Executor, Fp16Rounding};
pub use ops::supported_ops;
pub use package::{
    ArrayDataType, ArrayInfo, DimRange, FeatureInfo, FeatureType, MlPackage, ModelDescription,
    ShapeFlexibility, VerifyReport, WeightFileReport,
};
pub use session::{
    CallProtocol, CoremlSession, OutputKind, PackageInfo, PackageRunner, PlannedCall,
    PositionInput, PositionLayout, QueryLengths, POSITION_INPUTS, SIDECAR_FILE,
};
pub use tensor::{DataType, Tensor, TensorData};
