//! Models split over several packages, run as one: [`resolve_packages`] finds the packages a
//! path stands for, [`ChainRunner`] calls them in order.
//!
//! `kiln export coreml --max-chunk-mb` cuts a model whose weights exceed the limit into
//! packages over layer ranges (`<stem>-part1.mlpackage`, `-part2`, …) and lists them, in
//! calling order, in the sidecar `kiln.json` beside them. The first package takes the token
//! ids; each later one takes the previous one's single output (`hidden_out`) as its one
//! input that the caller does not provide (`hidden_in`); the last one returns the logits or
//! the next token. Inputs the caller provides (the causal mask, positions) go to every
//! package that declares them, by name. Each package keeps its own states.

use crate::package::{FeatureType, ModelDescription};
use crate::session::{PackageRunner, SIDECAR_FILE};
use crate::tensor::Tensor;
use crate::{CoreMlError, MlPackage};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The packages `path` stands for, in calling order: `path` alone, or, when the sidecar
/// `kiln.json` beside it lists several packages (a model split over layers), all of them.
/// A chain is found from any of its packages, or from the name the model was exported to
/// (`OUT.mlpackage`, which does not exist when the export was split into
/// `OUT-part<i>.mlpackage`).
pub fn resolve_packages(path: &Path) -> Result<Vec<PathBuf>, CoreMlError> {
    let single = || Ok(vec![path.to_path_buf()]);
    let Some(dir) = path.parent() else {
        return single();
    };
    let sidecar = dir.join(SIDECAR_FILE);
    // A sidecar inside the package describes that package alone.
    if !sidecar.is_file() || path.join(SIDECAR_FILE).is_file() {
        return single();
    }
    let listed = listed_packages(&sidecar)?;
    if listed.len() < 2 {
        return single();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_part = listed.contains(&name);
    let is_export_name = !path.exists()
        && listed
            .iter()
            .enumerate()
            .all(|(i, p)| *p == format!("{stem}-part{}.mlpackage", i + 1));
    if !is_part && !is_export_name {
        return single();
    }
    listed
        .iter()
        .map(|p| {
            let rel = Path::new(p);
            if rel.components().count() != 1 || p.contains(['/', '\\']) || p == ".." {
                return Err(CoreMlError::Package {
                    package: sidecar.display().to_string(),
                    message: format!(
                        "packages: {p:?} must be the name of a package beside {SIDECAR_FILE}"
                    ),
                });
            }
            Ok(dir.join(rel))
        })
        .collect()
}

/// The `path` of every entry of the sidecar's `packages` list.
fn listed_packages(sidecar: &Path) -> Result<Vec<String>, CoreMlError> {
    let bad = |m: String| CoreMlError::Package {
        package: sidecar.display().to_string(),
        message: m,
    };
    let text = std::fs::read(sidecar).map_err(|e| CoreMlError::Io {
        path: sidecar.to_path_buf(),
        source: e,
    })?;
    let doc: Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(list) = doc.get("packages") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| bad(format!("packages = {list} is not a list")))?;
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            p.get("path")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("packages[{i}] has no \"path\" string")))
        })
        .collect()
}

/// One package of a chain.
struct Stage {
    label: String,
    runner: Box<dyn PackageRunner>,
    /// Every input the package declares.
    inputs: Vec<String>,
    /// The input fed with the previous package's output (none in the first package).
    carried_in: Option<String>,
    /// The output handed to the next package (none in the last package).
    carried_out: Option<String>,
}

/// Packages run one after the other as one model: a [`PackageRunner`] over the runners of
/// the packages of a split model (see the module documentation for how they connect).
pub struct ChainRunner {
    stages: Vec<Stage>,
}

impl ChainRunner {
    /// Connects the packages (in calling order, each with its runner) and returns the
    /// description of the whole: the inputs the caller provides, the last package's outputs
    /// and every package's states (named `part<i>.<state>`). Refuses, naming the package,
    /// packages that do not connect.
    pub fn new(
        packages: Vec<(MlPackage, Box<dyn PackageRunner>)>,
    ) -> Result<(ChainRunner, ModelDescription), CoreMlError> {
        let n = packages.len();
        let first = packages.first().ok_or_else(|| CoreMlError::Package {
            package: String::new(),
            message: "a chain needs at least one package".into(),
        })?;
        let mut whole = ModelDescription {
            specification_version: first.0.description().specification_version,
            inputs: first.0.description().inputs.clone(),
            outputs: Vec::new(),
            states: Vec::new(),
            metadata: first.0.description().metadata.clone(),
        };
        let mut stages = Vec::with_capacity(n);
        for (i, (pkg, runner)) in packages.into_iter().enumerate() {
            let desc = pkg.description();
            let label = pkg.label().to_string();
            let bad = |m: String| CoreMlError::Package {
                package: label.clone(),
                message: format!("package {} of {n} of a split model: {m}", i + 1),
            };
            let carried_in = if i == 0 {
                None
            } else {
                // The previous output feeds `hidden_in`, else the one input nobody provides.
                let unprovided: Vec<&str> = desc
                    .inputs
                    .iter()
                    .filter(|f| !whole.inputs.iter().any(|w| w.name == f.name))
                    .map(|f| f.name.as_str())
                    .collect();
                let name = if desc.inputs.iter().any(|f| f.name == "hidden_in") {
                    "hidden_in"
                } else {
                    match unprovided.as_slice() {
                        [one] => one,
                        _ => {
                            return Err(bad(format!(
                                "expected one input taking the previous package's output (hidden_in), found [{}]",
                                unprovided.join(", ")
                            )))
                        }
                    }
                };
                Some(name.to_string())
            };
            for f in &desc.inputs {
                let provided = whole.inputs.iter().find(|w| w.name == f.name);
                match provided {
                    Some(w) if Some(&f.name) != carried_in.as_ref() && w.ty != f.ty => {
                        return Err(bad(format!(
                            "input {} is {} here but {} in the first package",
                            f.name,
                            feature_type(&f.ty),
                            feature_type(&w.ty)
                        )))
                    }
                    None if Some(&f.name) != carried_in.as_ref() => whole.inputs.push(f.clone()),
                    _ => {}
                }
            }
            let carried_out = if i + 1 == n {
                whole.outputs = desc.outputs.clone();
                None
            } else {
                let name = match desc.outputs.iter().find(|o| o.name == "hidden_out") {
                    Some(o) => o.name.clone(),
                    None => match desc.outputs.as_slice() {
                        [o] => o.name.clone(),
                        outs => {
                            let names: Vec<&str> = outs.iter().map(|o| o.name.as_str()).collect();
                            return Err(bad(format!(
                                "expected one output for the next package (hidden_out), found [{}]",
                                names.join(", ")
                            )));
                        }
                    },
                };
                Some(name)
            };
            for s in &desc.states {
                let mut s = s.clone();
                s.name = format!("part{}.{}", i + 1, s.name);
                whole.states.push(s);
            }
            whole.specification_version =
                whole.specification_version.max(desc.specification_version);
            stages.push(Stage {
                label,
                runner,
                inputs: desc.inputs.iter().map(|f| f.name.clone()).collect(),
                carried_in,
                carried_out,
            });
        }
        Ok((ChainRunner { stages }, whole))
    }

    /// How many packages run.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether the chain is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }
}

fn feature_type(t: &FeatureType) -> String {
    match t {
        FeatureType::Array(a) => a.to_string(),
        FeatureType::State(a) => format!("state {a}"),
        FeatureType::Other(k) => k.clone(),
    }
}

impl PackageRunner for ChainRunner {
    fn predict(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, CoreMlError> {
        let mut carried: Option<Tensor> = None;
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let mut feed = HashMap::with_capacity(stage.inputs.len());
            for name in &stage.inputs {
                let value = if Some(name) == stage.carried_in.as_ref() {
                    carried.take()
                } else {
                    inputs.get(name).cloned()
                };
                let value = value.ok_or_else(|| CoreMlError::Input {
                    package: stage.label.clone(),
                    input: name.clone(),
                    message: "not provided".into(),
                })?;
                feed.insert(name.clone(), value);
            }
            let mut out = stage.runner.predict(&feed)?;
            if i == last {
                return Ok(out);
            }
            let name = stage
                .carried_out
                .as_ref()
                .expect("every stage but the last");
            carried = Some(out.remove(name).ok_or_else(|| CoreMlError::Package {
                package: stage.label.clone(),
                message: format!("the call returned no output {name}"),
            })?);
        }
        unreachable!("a chain has at least one stage")
    }

    fn reset_states(&mut self) {
        for s in &mut self.stages {
            s.runner.reset_states();
        }
    }

    fn output_dims(&self, name: &str) -> Option<Vec<Option<usize>>> {
        self.stages.last()?.runner.output_dims(name)
    }

    fn describe(&self) -> String {
        let first = self.stages.first().map(|s| s.runner.describe());
        format!(
            "{}, {} packages in a chain",
            first.unwrap_or_default(),
            self.stages.len()
        )
    }
}
