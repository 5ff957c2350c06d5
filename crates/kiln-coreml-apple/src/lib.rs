//! kiln's Core ML packages run by Apple's Core ML framework, and where Core ML places their
//! ops.
//!
//! On Apple platforms (macOS 15 / iOS 18 and later, for stateful models):
//! - [`open_session`] compiles a package (`MLModel.compileModelAtURL`), loads it with the
//!   chosen [`ComputeUnits`] and returns a [`kiln_coreml::CoremlSession`] whose calls Core ML
//!   computes, with the KV cache in an `MLState` (`MLModel.newState`). The call protocol,
//!   prompt splitting, positions, sampling and generation are the same code that drives
//!   kiln's reference executor, so both backends are driven identically;
//! - [`residency`] asks Core ML's compute plan (`MLComputePlan`) which device each op of the
//!   program runs on and reports the share on the Neural Engine.
//!
//! Elsewhere the same functions exist and fail with [`AppleError::Unavailable`], so callers
//! need no platform conditions of their own.
//!
//! The Core ML code is type-checked for `aarch64-apple-darwin` by CI but has not been run on
//! Apple hardware.

#![warn(missing_docs)]

use serde_json::{json, Value};
use std::fmt;

#[cfg(target_vendor = "apple")]
mod runtime;
#[cfg(target_vendor = "apple")]
pub use runtime::CoreMlRunner;

use kiln_coreml::{CoreMlError, CoremlSession};
use std::path::Path;

/// Whether this build can use Core ML (an Apple platform).
pub const AVAILABLE: bool = cfg!(target_vendor = "apple");

/// Why Core ML could not serve a request.
#[derive(Debug)]
pub enum AppleError {
    /// This build is not for an Apple platform: Core ML does not exist here.
    Unavailable {
        /// What was asked for.
        what: String,
    },
    /// The package, or Core ML's handling of it.
    CoreMl(CoreMlError),
}

impl fmt::Display for AppleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppleError::Unavailable { what } => write!(
                f,
                "{what} needs Apple's Core ML framework (macOS 15 / iOS 18 or later); this kiln was built for {}",
                std::env::consts::OS
            ),
            AppleError::CoreMl(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AppleError {}

impl From<CoreMlError> for AppleError {
    fn from(e: CoreMlError) -> AppleError {
        AppleError::CoreMl(e)
    }
}

/// Opens the package at `path` as a session whose calls Core ML computes on the given
/// compute units: compiled, loaded, its KV cache in an `MLState`; the call protocol read
/// from the package as for kiln's reference executor. Fails with
/// [`AppleError::Unavailable`] off Apple platforms.
pub fn open_session(path: &Path, compute_units: ComputeUnits) -> Result<CoremlSession, AppleError> {
    #[cfg(target_vendor = "apple")]
    {
        Ok(runtime::open_session(path, compute_units)?)
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        let _ = (path, compute_units);
        Err(AppleError::Unavailable {
            what: "the Core ML backend".into(),
        })
    }
}

/// Where Core ML places each op of the package's main function for the given compute
/// units, from `MLComputePlan`. Fails with [`AppleError::Unavailable`] off Apple platforms.
pub fn residency(path: &Path, compute_units: ComputeUnits) -> Result<ResidencyReport, AppleError> {
    #[cfg(target_vendor = "apple")]
    {
        Ok(runtime::residency(path, compute_units)?)
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        let _ = (path, compute_units);
        Err(AppleError::Unavailable {
            what: "kiln residency (Core ML's compute plan)".into(),
        })
    }
}

/// The devices Core ML may use (`MLComputeUnits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeUnits {
    /// CPU, GPU and Neural Engine (`MLComputeUnitsAll`): a wish, not a promise.
    All,
    /// CPU and GPU (`MLComputeUnitsCPUAndGPU`).
    CpuAndGpu,
    /// CPU and Neural Engine (`MLComputeUnitsCPUAndNeuralEngine`).
    CpuAndNeuralEngine,
    /// CPU only (`MLComputeUnitsCPUOnly`).
    CpuOnly,
}

impl fmt::Display for ComputeUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComputeUnits::All => "all",
            ComputeUnits::CpuAndGpu => "cpu-gpu",
            ComputeUnits::CpuAndNeuralEngine => "cpu-ne",
            ComputeUnits::CpuOnly => "cpu",
        })
    }
}

/// A compute device as Core ML's compute plan names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// The Apple Neural Engine.
    NeuralEngine,
    /// The GPU.
    Gpu,
    /// The CPU.
    Cpu,
    /// A device class this crate does not know.
    Other,
}

impl Device {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Device::NeuralEngine => "Neural Engine",
            Device::Gpu => "GPU",
            Device::Cpu => "CPU",
            Device::Other => "other",
        }
    }
}

/// Where Core ML runs one op of the program.
#[derive(Clone, Debug, PartialEq)]
pub struct OpPlacement {
    /// The op's first output (MIL ops are named by what they produce).
    pub name: String,
    /// The op's type, e.g. `linear`.
    pub op_type: String,
    /// The device Core ML prefers for it.
    pub device: Device,
    /// Every device that could run it.
    pub supported: Vec<Device>,
    /// Core ML's estimate of the op's share of the program's cost (0 to 1), when given.
    pub cost: Option<f64>,
}

/// Where Core ML places the ops of a package: [`residency`] on Apple platforms.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidencyReport {
    /// The package.
    pub package: String,
    /// The compute units the plan was made for.
    pub compute_units: ComputeUnits,
    /// The function planned (`main`).
    pub function: String,
    /// The ops that run on a device (constants are placed nowhere and not listed), in program
    /// order.
    pub ops: Vec<OpPlacement>,
}

impl ResidencyReport {
    /// Ops on `device`, and their share of the listed ops (0 to 1).
    pub fn count_share(&self, device: Device) -> (usize, f64) {
        let n = self.ops.iter().filter(|o| o.device == device).count();
        let share = if self.ops.is_empty() {
            0.0
        } else {
            n as f64 / self.ops.len() as f64
        };
        (n, share)
    }

    /// The share of Core ML's estimated cost that runs on `device`, when every op has an
    /// estimate.
    pub fn cost_share(&self, device: Device) -> Option<f64> {
        let costs: Option<Vec<(Device, f64)>> = self
            .ops
            .iter()
            .map(|o| o.cost.map(|c| (o.device, c)))
            .collect();
        let costs = costs?;
        let total: f64 = costs.iter().map(|c| c.1).sum();
        (total > 0.0).then(|| {
            costs
                .iter()
                .filter(|c| c.0 == device)
                .map(|c| c.1)
                .sum::<f64>()
                / total
        })
    }

    /// The devices in use, Neural Engine first.
    fn devices(&self) -> Vec<Device> {
        let mut d: Vec<Device> = self.ops.iter().map(|o| o.device).collect();
        d.sort();
        d.dedup();
        d
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let summary: Vec<Value> = self
            .devices()
            .into_iter()
            .map(|d| {
                let (n, share) = self.count_share(d);
                json!({
                    "device": d.name(),
                    "ops": n,
                    "op_share": share,
                    "cost_share": self.cost_share(d),
                })
            })
            .collect();
        json!({
            "package": self.package,
            "compute_units": self.compute_units.to_string(),
            "function": self.function,
            "neural_engine_op_share": self.count_share(Device::NeuralEngine).1,
            "neural_engine_cost_share": self.cost_share(Device::NeuralEngine),
            "devices": summary,
            "ops": self.ops.iter().map(|o| json!({
                "name": o.name,
                "type": o.op_type,
                "device": o.device.name(),
                "supported": o.supported.iter().map(|d| d.name()).collect::<Vec<_>>(),
                "cost": o.cost,
            })).collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for ResidencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: function {}, compute units {} (Core ML's compute plan)",
            self.package, self.function, self.compute_units
        )?;
        writeln!(
            f,
            "{:<40} {:<24} {:<14} {:<28} {:>8}",
            "op", "type", "device", "supported", "cost"
        )?;
        for o in &self.ops {
            let supported: Vec<&str> = o.supported.iter().map(|d| d.name()).collect();
            let cost = o.cost.map_or("-".to_string(), |c| format!("{c:.4}"));
            writeln!(
                f,
                "{:<40} {:<24} {:<14} {:<28} {:>8}",
                o.name,
                o.op_type,
                o.device.name(),
                supported.join(", "),
                cost
            )?;
        }
        for d in self.devices() {
            let (n, share) = self.count_share(d);
            write!(
                f,
                "{}: {n} of {} ops ({:.1} %)",
                d.name(),
                self.ops.len(),
                share * 100.0
            )?;
            match self.cost_share(d) {
                Some(c) => writeln!(f, ", {:.1} % of the estimated cost", c * 100.0)?,
                None => writeln!(f)?,
            }
        }
        let (_, ne) = self.count_share(Device::NeuralEngine);
        writeln!(f, "share on the Neural Engine: {:.1} % of ops", ne * 100.0)
    }
}

/// Offsets (in elements) of every element of a `shape` array stored with `strides`, in
/// row-major order of the logical indices: how values are copied into and out of
/// `MLMultiArray`s, whose buffers may be padded. `None` when a shape and strides disagree in
/// rank.
pub fn strided_offsets(shape: &[usize], strides: &[usize]) -> Option<Vec<usize>> {
    if shape.len() != strides.len() {
        return None;
    }
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(index.iter().zip(strides).map(|(i, s)| i * s).sum());
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(device: Device, cost: Option<f64>) -> OpPlacement {
        OpPlacement {
            name: "x".into(),
            op_type: "linear".into(),
            device,
            supported: vec![Device::NeuralEngine, Device::Cpu],
            cost,
        }
    }

    #[test]
    fn shares_count_ops_and_weigh_costs() {
        let r = ResidencyReport {
            package: "p".into(),
            compute_units: ComputeUnits::All,
            function: "main".into(),
            ops: vec![
                op(Device::NeuralEngine, Some(0.6)),
                op(Device::NeuralEngine, Some(0.2)),
                op(Device::Cpu, Some(0.1)),
                op(Device::Gpu, Some(0.1)),
            ],
        };
        assert_eq!(r.count_share(Device::NeuralEngine), (2, 0.5));
        assert!((r.cost_share(Device::NeuralEngine).unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(
            r.devices(),
            [Device::NeuralEngine, Device::Gpu, Device::Cpu]
        );
        let text = r.to_string();
        assert!(text.contains("Neural Engine: 2 of 4 ops (50.0 %), 80.0 % of the estimated cost"));
        assert_eq!(r.to_json()["neural_engine_op_share"], 0.5);

        let partial = ResidencyReport {
            ops: vec![op(Device::Cpu, None), op(Device::NeuralEngine, Some(1.0))],
            ..r
        };
        assert_eq!(partial.cost_share(Device::Cpu), None);
    }

    #[cfg(not(target_vendor = "apple"))]
    #[test]
    fn without_core_ml_requests_are_refused_by_name() {
        const { assert!(!AVAILABLE) };
        let p = Path::new("model.mlpackage");
        let e = open_session(p, ComputeUnits::All).unwrap_err().to_string();
        assert!(
            e.contains("the Core ML backend needs Apple's Core ML framework"),
            "{e}"
        );
        let e = residency(p, ComputeUnits::CpuAndNeuralEngine)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("kiln residency"), "{e}");
        assert!(e.contains(std::env::consts::OS), "{e}");
    }

    #[test]
    fn strided_offsets_follow_padded_rows() {
        // A [2, 3] array whose rows are padded to 4 elements.
        assert_eq!(
            strided_offsets(&[2, 3], &[4, 1]).unwrap(),
            [0, 1, 2, 4, 5, 6]
        );
        // Column-major storage of a [2, 2] array.
        assert_eq!(strided_offsets(&[2, 2], &[1, 2]).unwrap(), [0, 2, 1, 3]);
        assert_eq!(strided_offsets(&[], &[]).unwrap(), [0]);
        assert_eq!(strided_offsets(&[2], &[1, 1]), None);
    }
}
