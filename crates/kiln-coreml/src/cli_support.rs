//! The logic of `kiln predict` and `kiln verify` for `.mlpackage` folders, kept here so the
//! binary only parses arguments and prints.
//!
//! A calls file is a JSON list of calls; each call maps input names to
//! `{"dtype": "int32" | "fp16" | "fp32", "shape": [...], "data": [...]}`. `data` is flat or
//! nested (it is flattened row-major) and may hold the strings `"-inf"`, `"inf"` and `"nan"`.

use crate::{CoreMlError, Executor, MlPackage, Tensor, VerifyReport};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A failed command: exit code 2 for bad input (the package, the calls file), 1 for an
/// internal failure such as an unwritable output folder.
#[derive(Debug)]
pub struct CliFailure {
    /// The process exit code.
    pub code: u8,
    /// The message for the user.
    pub message: String,
}

impl fmt::Display for CliFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<CoreMlError> for CliFailure {
    fn from(e: CoreMlError) -> CliFailure {
        CliFailure {
            code: 2,
            message: e.to_string(),
        }
    }
}

fn bad(message: String) -> CliFailure {
    CliFailure { code: 2, message }
}

/// Whether `path` is a Core ML package: a folder named `*.mlpackage`, or any folder holding
/// `Manifest.json` and `Data/com.apple.CoreML`.
pub fn is_mlpackage(path: &Path) -> bool {
    let named = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("mlpackage"));
    named || (path.join("Manifest.json").is_file() && path.join("Data/com.apple.CoreML").is_dir())
}

fn number(v: &Value, at: &str) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("{at}: {n} is not a number")),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
            "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
            "nan" => Ok(f64::NAN),
            other => other
                .parse::<f64>()
                .map_err(|_| format!("{at}: {s:?} is not a number")),
        },
        other => Err(format!("{at}: {other} is not a number")),
    }
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Parses one tensor description of a calls file.
fn parse_tensor(v: &Value, at: &str) -> Result<Tensor, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{at}: expected an object with dtype, shape and data"))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{at}: missing dtype"))?;
    let dt = crate::DataType::parse(dtype)
        .ok_or_else(|| format!("{at}: dtype {dtype:?} is not int32, fp16 or fp32"))?;
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{at}: missing shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| format!("{at}: shape entry {d} is not a size"))
        })
        .collect::<Result<_, _>>()?;
    let data = obj
        .get("data")
        .ok_or_else(|| format!("{at}: missing data"))?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let volume = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{at}: shape {shape:?} overflows"))?;
    if flat.len() != volume {
        return Err(format!(
            "{at}: shape {shape:?} holds {volume} elements but data has {}",
            flat.len()
        ));
    }
    let nums: Vec<f64> = flat
        .iter()
        .enumerate()
        .map(|(i, v)| number(v, &format!("{at}: data[{i}]")))
        .collect::<Result<_, _>>()?;
    let t = match dt {
        crate::DataType::I32 => {
            let ints: Vec<i32> = nums
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    if x.fract() == 0.0 && x >= i32::MIN as f64 && x <= i32::MAX as f64 {
                        Ok(x as i32)
                    } else {
                        Err(format!("{at}: data[{i}] = {x} is not an int32"))
                    }
                })
                .collect::<Result<_, _>>()?;
            Tensor::i32(shape, ints)
        }
        crate::DataType::F32 => Tensor::f32(shape, nums.iter().map(|&x| x as f32).collect()),
        crate::DataType::F16 => {
            let f: Vec<f32> = nums.iter().map(|&x| x as f32).collect();
            Tensor::f16_from_f32(shape, &f)
        }
    };
    t.map_err(|e| format!("{at}: {e}"))
}

/// Parses a calls file's text into one input map per call.
pub fn parse_calls(text: &str) -> Result<Vec<HashMap<String, Tensor>>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let calls = v.as_array().ok_or("expected a JSON list of calls")?;
    let mut out = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        let obj = c.as_object().ok_or_else(|| {
            format!("call {i}: expected an object mapping input names to tensors")
        })?;
        let mut inputs = HashMap::new();
        for (name, t) in obj {
            inputs.insert(
                name.clone(),
                parse_tensor(t, &format!("call {i}: input {name}"))?,
            );
        }
        out.push(inputs);
    }
    Ok(out)
}

/// One output written by [`predict`].
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenOutput {
    /// The output's name.
    pub name: String,
    /// Its element type as the model returned it.
    pub dtype: crate::DataType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The float32 little-endian file it was written to.
    pub file: PathBuf,
}

/// What [`predict`] did: per call, the outputs written (sorted by name).
#[derive(Clone, Debug, PartialEq)]
pub struct PredictReport {
    /// The package run.
    pub package: PathBuf,
    /// Per call, in order.
    pub calls: Vec<Vec<WrittenOutput>>,
}

impl PredictReport {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "package": self.package.display().to_string(),
            "calls": self.calls.iter().enumerate().map(|(i, outs)| json!({
                "call": i,
                "outputs": outs.iter().map(|o| json!({
                    "name": o.name,
                    "dtype": o.dtype.name(),
                    "shape": o.shape,
                    "file": o.file.display().to_string(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for PredictReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, outs) in self.calls.iter().enumerate() {
            for o in outs {
                writeln!(
                    f,
                    "call {i}: {} {} {:?} -> {}",
                    o.name,
                    o.dtype,
                    o.shape,
                    o.file.display()
                )?;
            }
        }
        Ok(())
    }
}

/// A file name part made only of characters safe on every file system.
fn file_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs every call of `calls_file` in order on one executor (states carried from call to
/// call) and writes each output as `out_dir/call<i>.<output>.f32`, float32 little-endian.
pub fn predict(
    package: &Path,
    calls_file: &Path,
    out_dir: &Path,
) -> Result<PredictReport, CliFailure> {
    let text = std::fs::read_to_string(calls_file).map_err(|e| {
        bad(format!(
            "{}: cannot read the calls file: {e}",
            calls_file.display()
        ))
    })?;
    let calls = parse_calls(&text).map_err(|m| bad(format!("{}: {m}", calls_file.display())))?;
    let pkg = MlPackage::open(package)?;
    let mut exec = Executor::new(&pkg)?;
    std::fs::create_dir_all(out_dir).map_err(|e| CliFailure {
        code: 1,
        message: format!(
            "{}: cannot create the output folder: {e}",
            out_dir.display()
        ),
    })?;
    let mut report = PredictReport {
        package: package.to_path_buf(),
        calls: Vec::new(),
    };
    for (i, inputs) in calls.iter().enumerate() {
        let outputs = exec
            .predict(inputs)
            .map_err(|e| bad(format!("call {i}: {e}")))?;
        let mut names: Vec<&String> = outputs.keys().collect();
        names.sort();
        let mut written = Vec::new();
        for name in names {
            let t = &outputs[name];
            let file = out_dir.join(format!("call{i}.{}.f32", file_part(name)));
            let bytes: Vec<u8> = t
                .to_f32_vec()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            std::fs::write(&file, bytes).map_err(|e| CliFailure {
                code: 1,
                message: format!("{}: cannot write: {e}", file.display()),
            })?;
            written.push(WrittenOutput {
                name: name.clone(),
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                file,
            });
        }
        report.calls.push(written);
    }
    Ok(report)
}

/// Opens and verifies a package.
pub fn verify(package: &Path) -> Result<(MlPackage, VerifyReport), CliFailure> {
    let pkg = MlPackage::open(package)?;
    let report = pkg.verify()?;
    Ok((pkg, report))
}

/// [`verify`] for every package `path` stands for (several for a model split over layers,
/// see [`crate::chain::resolve_packages`]); the weight file of each part of a split model is
/// also held to the sha256 its sidecar records, so a tampered or swapped part is named.
pub fn verify_all(path: &Path) -> Result<Vec<(MlPackage, VerifyReport)>, CliFailure> {
    let parts = crate::chain::resolve_packages(path)?;
    if parts.len() == 1 {
        return Ok(vec![verify(&parts[0])?]);
    }
    let sidecar = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(crate::SIDECAR_FILE);
    let doc: Value = std::fs::read(&sidecar)
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or(Value::Null);
    let recorded = |i: usize| {
        doc["packages"][i]["weight_sha256"]
            .as_str()
            .map(str::to_string)
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let (pkg, report) = verify(part)?;
        if let Some(want) = recorded(i) {
            let file = part.join("Data/com.apple.CoreML/weights/weight.bin");
            let got = kiln_format::package::sha256_file(&file).map_err(|e| bad(e.to_string()))?;
            if got != want {
                return Err(bad(format!(
                    "{}: sha256 {got}, but {} records {want} for package {} of {}: the weights were changed after export",
                    file.display(),
                    sidecar.display(),
                    i + 1,
                    parts.len()
                )));
            }
        }
        out.push((pkg, report));
    }
    Ok(out)
}

/// A verification report (with the package's interface) as JSON.
pub fn verify_json(pkg: &MlPackage, r: &VerifyReport) -> Value {
    let feats = |list: &[crate::FeatureInfo]| -> Vec<Value> {
        list.iter()
            .map(|f| json!({"name": f.name, "type": f.to_string()}))
            .collect()
    };
    let d = pkg.description();
    json!({
        "package": pkg.path().display().to_string(),
        "ok": true,
        "specification_version": r.specification_version,
        "required_specification_version": r.required_specification_version,
        "function": r.function,
        "opset": r.opset,
        "op_count": r.op_count,
        "op_types": r.op_types,
        "weight_files": r.weight_files.iter().map(|w| json!({
            "name": w.name, "bytes": w.bytes, "blobs": w.blobs,
        })).collect::<Vec<_>>(),
        "referenced_blobs": r.referenced_blobs,
        "inputs": feats(&d.inputs),
        "outputs": feats(&d.outputs),
        "states": feats(&d.states),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;

    #[test]
    fn calls_parse_with_infinities_and_nesting() {
        let calls = parse_calls(
            r#"[{"ids": {"dtype": "int32", "shape": [1, 2], "data": [[3, 4]]},
                 "mask": {"dtype": "fp16", "shape": [2], "data": [0, "-inf"]}}]"#,
        )
        .unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["ids"].data(), &TensorData::I32(vec![3, 4]));
        assert_eq!(calls[0]["mask"].to_f32_vec(), vec![0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn bad_calls_are_refused_with_the_place() {
        for (text, needle) in [
            ("{}", "list of calls"),
            ("[1]", "call 0"),
            (
                r#"[{"x": {"dtype": "int64", "shape": [1], "data": [1]}}]"#,
                "int64",
            ),
            (
                r#"[{"x": {"dtype": "int32", "shape": [2], "data": [1]}}]"#,
                "holds 2",
            ),
            (
                r#"[{"x": {"dtype": "int32", "shape": [1], "data": [1.5]}}]"#,
                "not an int32",
            ),
            (
                r#"[{"x": {"dtype": "fp32", "shape": [1], "data": ["x"]}}]"#,
                "data[0]",
            ),
            (
                r#"[{"x": {"dtype": "fp32", "shape": [-1], "data": []}}]"#,
                "shape entry",
            ),
        ] {
            let e = parse_calls(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn file_names_are_sanitized() {
        assert_eq!(file_part("logits"), "logits");
        assert_eq!(file_part("a/b c"), "a_b_c");
    }
}
