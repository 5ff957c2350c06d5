//! Running a language-model package token by token: [`CoremlSession`].
//!
//! A stateful language-model package is called repeatedly: each call takes a few token ids,
//! writes their keys and values into the package's states and returns logits (or the argmax
//! token) for each of them. How a package wants to be called is read from its model
//! description, not assumed ([`CallProtocol::discover`]):
//! - token ids: the input `input_ids` (else the one other int32 input of rank 2), int32
//!   `[1, q]`; the query lengths `q` a call may use come from its shape (a range dimension,
//!   enumerated shapes or a fixed shape);
//! - where the new tokens sit, one of
//!   - a causal mask, a float input of rank 4, `[1, 1, q, past + q]` when its last dimension
//!     is flexible (the coremltools convention and kiln's exporter: the mask's width tells the
//!     program how many positions are cached) or `[1, 1, q, context]` when it is fixed; 0
//!     where a query may look, `-inf` where it may not;
//!   - positions, an int32 input named `position_ids`, `positions`, `input_pos`,
//!     `cache_position` or `position`: `[1, q]` or `[q]` (each token's position), or `[1]`
//!     (the first token's);
//! - states (the key/value caches): carried from call to call, zeroed by
//!   [`CoremlSession::reset`];
//! - output `logits` (float `[1, q, vocab]`) or `next_token` (int32, one id per position,
//!   for packages exported with an argmax head).
//!
//! A model split over several packages (an export over `--max-chunk-mb`) runs as one: the
//! packages listed in the sidecar are called in order, each one's hidden states feeding the
//! next ([`crate::chain`]).
//!
//! Prompts longer than a call allows are split into several calls; a query length the
//! package cannot take exactly is padded (the padded positions are computed and dropped,
//! and the next call overwrites what they wrote).
//!
//! What a runtime needs beyond the interface comes from the package's user metadata
//! (`kiln.context`, `kiln.query_length` as `min-max`, `kiln.max_query`, `kiln.vocab_size`,
//! `kiln.architecture`, `kiln.tokenizer_json` or `kiln.tokenizer`, `kiln.tokenizer_config`,
//! `kiln.chat_template`, `kiln.bos_token_id`, `kiln.eos_token_id`) and from a sidecar
//! `kiln.json`, inside the package folder or beside it (where `kiln export coreml` writes it;
//! a sidecar beside the package that lists other packages is not this one's). The sidecar's
//! keys of the same names (without `kiln.`; `query_length` as `{"min", "max"}`,
//! `special_tokens` as `{"bos", "eos", "stop", "add_bos"}`) take precedence. The tokenizer is
//! a Hugging Face `tokenizer.json` document (BOS, EOS and `add_bos` from the special tokens
//! unless `tokenizer_config` holds its `tokenizer_config.json`), `{"kind": "gguf", "spec":
//! {...}}` (a [`kiln_tokenizer::TokenizerSpec`], as kiln packages store it) or a bare
//! `TokenizerSpec`; metadata stores each as JSON text.

use crate::chain::ChainRunner;
use crate::exec::{ExecOptions, Executor};
use crate::package::{ArrayDataType, ArrayInfo, FeatureType, ModelDescription, ShapeFlexibility};
use crate::tensor::{Tensor, TensorData};
use crate::{CoreMlError, MlPackage};
use kiln_tokenizer::{Tokenizer, TokenizerSpec};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The name of the sidecar file with what a runtime needs.
pub const SIDECAR_FILE: &str = "kiln.json";

/// The names a positions input may have.
pub const POSITION_INPUTS: [&str; 5] = [
    "position_ids",
    "positions",
    "input_pos",
    "cache_position",
    "position",
];

/// The conventions [`CallProtocol::discover`] understands, for messages.
const EXPECTED: &str = "expected input_ids int32 [1, q], plus a causal mask (fp16/fp32 [1, 1, q, past + q] or [1, 1, q, context]) or int32 positions (position_ids [1, q] or [q], or a start position [1])";

/// What the package's metadata and sidecar `kiln.json` say, beyond its interface.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackageInfo {
    /// Positions the states hold.
    pub context: Option<usize>,
    /// The most tokens one call may take.
    pub max_query: Option<usize>,
    /// Entries of the vocabulary.
    pub vocab_size: Option<usize>,
    /// The model family (e.g. `llama`), which picks a built-in chat template.
    pub architecture: Option<String>,
    /// The beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// The end-of-sequence token.
    pub eos_id: Option<u32>,
    /// Tokens that end a generation.
    pub stop_ids: Vec<u32>,
    /// Whether prompts start with BOS.
    pub add_bos: Option<bool>,
    /// The packages the sidecar lists (file names, in order): more than one when the model
    /// is split over layers.
    pub packages: Vec<String>,
    /// The sidecar file read, if any.
    pub sidecar: Option<PathBuf>,
    /// The stored tokenizer document (see the module documentation for its forms).
    pub tokenizer: Option<Value>,
    /// A Hugging Face `tokenizer_config.json` going with a stored `tokenizer.json`.
    pub tokenizer_config: Option<Value>,
    /// The chat template, when stored apart from the tokenizer.
    pub chat_template: Option<String>,
}

/// The keys read, as `(sidecar key, metadata keys)`; the first name found wins.
const KEYS: [(&str, &[&str]); 8] = [
    ("context", &["kiln.context"]),
    ("max_query", &["kiln.max_query"]),
    ("query_length", &["kiln.query_length"]),
    ("vocab_size", &["kiln.vocab_size"]),
    ("architecture", &["kiln.architecture"]),
    ("tokenizer", &["kiln.tokenizer", "kiln.tokenizer_json"]),
    ("tokenizer_config", &["kiln.tokenizer_config"]),
    ("chat_template", &["kiln.chat_template"]),
];

/// Sidecar keys that name the same thing as a key of [`KEYS`].
const SIDECAR_ALIASES: [(&str, &str); 1] = [("tokenizer_json", "tokenizer")];

impl PackageInfo {
    /// Reads the metadata of `pkg` and its sidecar `kiln.json`, if any: inside the package
    /// folder, or beside it when it lists this package (or lists no packages).
    pub fn read(pkg: &MlPackage) -> Result<PackageInfo, CoreMlError> {
        let label = pkg.label().to_string();
        let bad = |m: String| CoreMlError::Package {
            package: label.clone(),
            message: m,
        };
        // Every value with where it came from, for messages.
        let mut fields: HashMap<&'static str, (Value, String)> = HashMap::new();
        let meta = &pkg.description().metadata;
        for (key, meta_keys) in KEYS {
            if let Some((k, text)) = meta_keys.iter().find_map(|k| meta.get(*k).map(|v| (*k, v))) {
                fields.insert(key, (Value::String(text.clone()), format!("metadata {k}")));
            }
        }
        for (key, meta_key) in [("bos", "kiln.bos_token_id"), ("eos", "kiln.eos_token_id")] {
            if let Some(text) = meta.get(meta_key) {
                fields.insert(
                    key,
                    (Value::String(text.clone()), format!("metadata {meta_key}")),
                );
            }
        }
        let mut packages = Vec::new();
        let sidecar = match sidecar_of(pkg.path()) {
            Some(path) => {
                let text = std::fs::read(&path).map_err(|e| CoreMlError::Io {
                    path: path.clone(),
                    source: e,
                })?;
                let v: Value = serde_json::from_slice(&text)
                    .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
                let obj = v
                    .as_object()
                    .ok_or_else(|| bad(format!("{}: expected a JSON object", path.display())))?;
                packages = obj
                    .get("packages")
                    .and_then(Value::as_array)
                    .map(|list| {
                        list.iter()
                            .filter_map(|p| p.get("path").and_then(Value::as_str))
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let name = pkg.path().file_name().map(|n| n.to_string_lossy());
                let ours = packages.is_empty()
                    || path.parent() == Some(pkg.path())
                    || name.is_some_and(|n| packages.iter().any(|p| *p == n));
                if ours {
                    let at = |k: &str| format!("{}: {k}", path.display());
                    for (key, _) in KEYS {
                        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                            fields.insert(key, (v.clone(), at(key)));
                        }
                    }
                    for (alias, key) in SIDECAR_ALIASES {
                        if let Some(v) = obj.get(alias).filter(|v| !v.is_null()) {
                            fields.insert(key, (v.clone(), at(alias)));
                        }
                    }
                    if let Some(special) = obj.get("special_tokens").and_then(Value::as_object) {
                        for key in ["bos", "eos", "stop", "add_bos"] {
                            if let Some(v) = special.get(key).filter(|v| !v.is_null()) {
                                fields
                                    .insert(key, (v.clone(), at(&format!("special_tokens.{key}"))));
                            }
                        }
                    }
                    Some(path)
                } else {
                    packages.clear();
                    None
                }
            }
            None => None,
        };

        let number = |key: &str| -> Result<Option<u64>, CoreMlError> {
            let Some((v, at)) = fields.get(key) else {
                return Ok(None);
            };
            let n = match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            n.map(Some)
                .ok_or_else(|| bad(format!("{at} = {v} is not a non-negative integer")))
        };
        let size = |key: &str| -> Result<Option<usize>, CoreMlError> {
            match number(key)? {
                None => Ok(None),
                Some(n) => usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or_else(|| bad(format!("{} = {n} is not a positive size", fields[key].1))),
            }
        };
        let token = |key: &str| -> Result<Option<u32>, CoreMlError> {
            match number(key)? {
                None => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| bad(format!("{} = {n} is not a token id", fields[key].1))),
            }
        };
        let text = |key: &str| -> Result<Option<String>, CoreMlError> {
            match fields.get(key) {
                None => Ok(None),
                Some((Value::String(s), _)) => Ok(Some(s.clone())),
                Some((v, at)) => Err(bad(format!("{at} = {v} is not a string"))),
            }
        };
        let json = |key: &str| -> Result<Option<Value>, CoreMlError> {
            match fields.get(key) {
                None => Ok(None),
                // Metadata holds documents as JSON text; a sidecar may too.
                Some((Value::String(s), at)) => serde_json::from_str(s)
                    .map(Some)
                    .map_err(|e| bad(format!("{at} is not valid JSON: {e}"))),
                Some((v, _)) => Ok(Some(v.clone())),
            }
        };
        // `query_length` is {"min", "max"} in a sidecar, "min-max" in metadata.
        let mut max_query = size("max_query")?;
        if let Some((v, at)) = fields.get("query_length") {
            let max = match v {
                Value::Object(o) => o.get("max").and_then(Value::as_u64),
                Value::String(s) => s.rsplit('-').next().and_then(|m| m.trim().parse().ok()),
                Value::Number(n) => n.as_u64(),
                _ => None,
            };
            let max = max
                .and_then(|m| usize::try_from(m).ok())
                .filter(|&m| m > 0)
                .ok_or_else(|| bad(format!("{at} = {v} gives no largest query length")))?;
            max_query = Some(max_query.map_or(max, |m| m.min(max)));
        }
        let stop_ids = match fields.get("stop") {
            None => Vec::new(),
            Some((Value::Array(list), at)) => list
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(format!("{at}: {v} is not a token id")))
                })
                .collect::<Result<_, _>>()?,
            Some((v, at)) => return Err(bad(format!("{at} = {v} is not a list of token ids"))),
        };
        let add_bos = match fields.get("add_bos") {
            None => None,
            Some((Value::Bool(b), _)) => Some(*b),
            Some((v, at)) => return Err(bad(format!("{at} = {v} is not true or false"))),
        };
        Ok(PackageInfo {
            context: size("context")?,
            max_query,
            vocab_size: size("vocab_size")?,
            architecture: text("architecture")?,
            bos_id: token("bos")?,
            eos_id: token("eos")?,
            stop_ids,
            add_bos,
            packages,
            sidecar,
            tokenizer: json("tokenizer")?,
            tokenizer_config: json("tokenizer_config")?,
            chat_template: text("chat_template")?,
        })
    }

    /// Whether the package carries a tokenizer.
    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// The tokenizer the package carries (`None` when it carries none), with its chat
    /// template when one is stored.
    pub fn tokenizer(&self, package: &str) -> Result<Option<Tokenizer>, CoreMlError> {
        let Some(doc) = &self.tokenizer else {
            return Ok(None);
        };
        let bad = |m: String| CoreMlError::Package {
            package: package.to_string(),
            message: format!("the stored tokenizer: {m}"),
        };
        let spec_of = |v: &Value| -> Result<TokenizerSpec, CoreMlError> {
            let mut spec: TokenizerSpec =
                serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
            if self.chat_template.is_some() {
                spec.chat_template = self.chat_template.clone();
            }
            Ok(spec)
        };
        let spec = match doc.get("kind").and_then(Value::as_str) {
            Some("gguf") => Some(spec_of(
                doc.get("spec")
                    .ok_or_else(|| bad("kind gguf without a spec".into()))?,
            )?),
            Some(other) => return Err(bad(format!("unknown kind {other:?} (expected gguf)"))),
            // A Hugging Face tokenizer.json has a model object; a spec names its model.
            None if doc.get("model").is_some_and(Value::is_string) => Some(spec_of(doc)?),
            None if doc.get("model").is_some_and(Value::is_object) => None,
            None => {
                return Err(bad(
                    "neither {\"kind\": \"gguf\", \"spec\": ...}, a tokenizer spec, nor a Hugging Face tokenizer.json".into(),
                ))
            }
        };
        let tokenizer = match spec {
            Some(spec) => Tokenizer::from_spec(spec).map_err(|e| bad(e.to_string()))?,
            None => self.hf_tokenizer(doc).map_err(bad)?,
        };
        Ok(Some(tokenizer))
    }

    /// Loads a Hugging Face tokenizer through a private temporary folder, since its loader
    /// reads `tokenizer.json` and the configuration files beside it.
    fn hf_tokenizer(&self, doc: &Value) -> Result<Tokenizer, String> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "kiln-mlpackage-tokenizer-{}-{n}",
            std::process::id()
        ));
        let result = (|| {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let write = |name: &str, bytes: &[u8]| {
                std::fs::write(dir.join(name), bytes)
                    .map_err(|e| format!("{}: {e}", dir.join(name).display()))
            };
            write("tokenizer.json", doc.to_string().as_bytes())?;
            let config = match &self.tokenizer_config {
                Some(cfg) => Some(cfg.clone()),
                None => self.synthesized_config(doc),
            };
            if let Some(cfg) = config {
                write("tokenizer_config.json", cfg.to_string().as_bytes())?;
            }
            if let Some(t) = &self.chat_template {
                write("chat_template.jinja", t.as_bytes())?;
            }
            Tokenizer::from_hf(&dir).map_err(|e| e.to_string())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

impl PackageInfo {
    /// A `tokenizer_config.json` for a bare `tokenizer.json` from the special tokens the
    /// metadata or sidecar name (BOS and EOS by id, whether prompts start with BOS), which a
    /// `tokenizer.json` alone does not say.
    fn synthesized_config(&self, doc: &Value) -> Option<Value> {
        if self.bos_id.is_none() && self.eos_id.is_none() && self.add_bos.is_none() {
            return None;
        }
        let text_of = |id: u32| -> Option<String> {
            let added = doc
                .get("added_tokens")
                .and_then(Value::as_array)
                .and_then(|list| {
                    list.iter().find_map(|t| {
                        (t.get("id").and_then(Value::as_u64) == Some(u64::from(id)))
                            .then(|| t.get("content").and_then(Value::as_str))
                            .flatten()
                    })
                });
            let vocab = || {
                doc.get("model")
                    .and_then(|m| m.get("vocab"))
                    .and_then(Value::as_object)
                    .and_then(|v| {
                        v.iter()
                            .find(|(_, i)| i.as_u64() == Some(u64::from(id)))
                            .map(|(t, _)| t.as_str())
                    })
            };
            added.or_else(vocab).map(str::to_string)
        };
        let mut cfg = serde_json::Map::new();
        if let Some(t) = self.bos_id.and_then(text_of) {
            cfg.insert("bos_token".into(), Value::String(t));
        }
        if let Some(t) = self.eos_id.and_then(text_of) {
            cfg.insert("eos_token".into(), Value::String(t));
        }
        if let Some(b) = self.add_bos {
            cfg.insert("add_bos_token".into(), Value::Bool(b));
        }
        Some(Value::Object(cfg))
    }
}

/// The sidecar of the package at `path`: `kiln.json` inside it, else in its parent folder
/// (where `kiln export coreml` writes it).
fn sidecar_of(path: &Path) -> Option<PathBuf> {
    let inside = path.join(SIDECAR_FILE);
    if inside.is_file() {
        return Some(inside);
    }
    let beside = path.parent()?.join(SIDECAR_FILE);
    beside.is_file().then_some(beside)
}

/// The query lengths a call may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryLengths {
    /// Any length from `min` to `max` inclusive.
    Range {
        /// The shortest.
        min: usize,
        /// The longest.
        max: usize,
    },
    /// Exactly these lengths (ascending).
    List(Vec<usize>),
}

impl QueryLengths {
    /// The longest query a call may take.
    pub fn max(&self) -> usize {
        match self {
            QueryLengths::Range { max, .. } => *max,
            QueryLengths::List(l) => l.last().copied().unwrap_or(1),
        }
    }
}

/// How a call tells the package where its tokens sit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PositionInput {
    /// An additive causal mask `[1, 1, q, width]`.
    CausalMask {
        /// The input's name.
        name: String,
        /// fp16 or fp32.
        dtype: ArrayDataType,
        /// `None`: the width is `past + q`; `Some(w)`: always `w` columns.
        fixed_width: Option<usize>,
    },
    /// Positions as int32.
    Positions {
        /// The input's name.
        name: String,
        /// The shape for a call of `q` tokens: `[1, q]`, `[q]` or `[1]` (start only).
        layout: PositionLayout,
    },
}

/// The shape of a positions input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionLayout {
    /// `[1, q]`: each token's position.
    Batch,
    /// `[q]`: each token's position.
    Flat,
    /// `[1]`: the first token's position.
    Start,
}

/// What a call returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// Float logits, `[1, q, vocab]`.
    Logits {
        /// The output's name.
        name: String,
    },
    /// The argmax token id per position (int32).
    NextToken {
        /// The output's name.
        name: String,
    },
}

/// How to call a stateful language-model package, discovered from its description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallProtocol {
    /// The token-id input.
    pub ids: String,
    /// The query lengths a call may use.
    pub query: QueryLengths,
    /// Where the new tokens sit.
    pub position: PositionInput,
    /// What a call returns.
    pub output: OutputKind,
    /// Positions the states hold: the most `past + q` may reach.
    pub context: usize,
    /// The states carried across calls.
    pub states: Vec<String>,
}

/// One call of a prompt split by [`CallProtocol::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedCall {
    /// Position of the call's first token.
    pub past: usize,
    /// Tokens of the prompt the call carries.
    pub tokens: usize,
    /// The call's query length (more than `tokens` when padded).
    pub q: usize,
}

impl CallProtocol {
    /// Reads the calling convention of a package from its description and what its
    /// metadata and sidecar say; refuses, naming the input, a package that follows no
    /// convention known here.
    pub fn discover(
        package: &str,
        desc: &ModelDescription,
        info: &PackageInfo,
    ) -> Result<CallProtocol, CoreMlError> {
        let bad = |m: String| CoreMlError::Package {
            package: package.to_string(),
            message: m,
        };
        let mut ids: Option<(&str, &ArrayInfo)> = None;
        let mut mask: Option<(&str, &ArrayInfo)> = None;
        let mut positions: Option<(&str, &ArrayInfo)> = None;
        let is_float =
            |a: &ArrayInfo| matches!(a.dtype, ArrayDataType::Float16 | ArrayDataType::Float32);
        // The named token input first, so another int32 input is not mistaken for it.
        let named_ids = desc.inputs.iter().any(|f| f.name == "input_ids");
        for f in &desc.inputs {
            let a = match &f.ty {
                FeatureType::Array(a) => a,
                other => {
                    return Err(bad(format!(
                        "input {} is {}, not a multi-array: {EXPECTED}",
                        f.name,
                        match other {
                            FeatureType::Other(k) => k.as_str(),
                            _ => "a state",
                        }
                    )))
                }
            };
            let name = f.name.as_str();
            let rank = a.rank();
            if name == "input_ids"
                || (!named_ids
                    && ids.is_none()
                    && a.dtype == ArrayDataType::Int32
                    && rank == Some(2)
                    && !POSITION_INPUTS.contains(&name))
            {
                ids = Some((name, a));
            } else if is_float(a) && rank == Some(4) && mask.is_none() {
                mask = Some((name, a));
            } else if a.dtype == ArrayDataType::Int32
                && POSITION_INPUTS.contains(&name)
                && positions.is_none()
            {
                positions = Some((name, a));
            } else {
                return Err(bad(format!(
                    "input {name} ({a}) follows no calling convention kiln knows: {EXPECTED}"
                )));
            }
        }
        let (ids_name, ids_info) =
            ids.ok_or_else(|| bad(format!("no token-id input: {EXPECTED}")))?;
        if ids_info.dtype != ArrayDataType::Int32 || ids_info.rank().is_some_and(|r| r != 2) {
            return Err(bad(format!("input {ids_name} is {ids_info}: {EXPECTED}")));
        }
        let query = query_lengths(ids_info).ok_or_else(|| {
            bad(format!(
                "input {ids_name} ({ids_info}) takes no [1, q] shape: {EXPECTED}"
            ))
        })?;

        let mut limits: Vec<usize> = info.context.into_iter().collect();
        let position = match (mask, positions) {
            (Some(_), Some(_)) | (None, None) => {
                let which = if mask.is_some() {
                    "both a causal mask and positions"
                } else {
                    "neither a causal mask nor positions"
                };
                return Err(bad(format!("the package takes {which}: {EXPECTED}")));
            }
            (Some((name, a)), None) => {
                let width = match &a.flexibility {
                    ShapeFlexibility::Fixed => Some(a.shape[3]),
                    _ => None,
                };
                match (&a.flexibility, width) {
                    (_, Some(w)) => limits.push(w),
                    (ShapeFlexibility::Ranges(r), None) => limits.extend(r[3].upper),
                    (ShapeFlexibility::Enumerated(l), None) => {
                        limits.extend(l.iter().filter_map(|s| s.get(3).copied()).max())
                    }
                    _ => {}
                }
                PositionInput::CausalMask {
                    name: name.to_string(),
                    dtype: a.dtype,
                    fixed_width: width,
                }
            }
            (None, Some((name, a))) => {
                let layout = match (a.rank(), &a.flexibility) {
                    (Some(1), ShapeFlexibility::Fixed) if a.shape == [1] => PositionLayout::Start,
                    (Some(1), _) => PositionLayout::Flat,
                    (Some(2), _) => PositionLayout::Batch,
                    _ => {
                        return Err(bad(format!(
                            "input {name} is {a}: positions must be [1, q], [q] or [1]"
                        )))
                    }
                };
                PositionInput::Positions {
                    name: name.to_string(),
                    layout,
                }
            }
        };
        let context = limits.into_iter().min().ok_or_else(|| {
            bad("cannot tell how many positions the states hold: the mask's width is unbounded and neither the metadata (kiln.context) nor kiln.json says".into())
        })?;
        let query = match (query, info.max_query) {
            (QueryLengths::Range { min, max }, m) => QueryLengths::Range {
                min,
                max: max.min(m.unwrap_or(usize::MAX)).min(context),
            },
            (QueryLengths::List(l), _) => {
                QueryLengths::List(l.into_iter().filter(|&q| q <= context).collect())
            }
        };
        if matches!(&query, QueryLengths::Range { min, max } if min > max)
            || matches!(&query, QueryLengths::List(l) if l.is_empty())
        {
            return Err(bad(format!(
                "input {ids_name} ({ids_info}) allows no query length within the context of {context}"
            )));
        }

        let output = match desc.outputs.iter().find(|o| o.name == "logits") {
            Some(o) => OutputKind::Logits {
                name: o.name.clone(),
            },
            None => match desc.outputs.iter().find(|o| o.name == "next_token") {
                Some(o) => OutputKind::NextToken {
                    name: o.name.clone(),
                },
                None => match desc.outputs.as_slice() {
                    [o] => match o.array().map(|a| a.dtype) {
                        Some(ArrayDataType::Int32) => OutputKind::NextToken {
                            name: o.name.clone(),
                        },
                        Some(_) => OutputKind::Logits {
                            name: o.name.clone(),
                        },
                        None => {
                            return Err(bad(format!(
                                "output {} is not a multi-array; expected logits or next_token",
                                o.name
                            )))
                        }
                    },
                    outs => {
                        let names: Vec<&str> = outs.iter().map(|o| o.name.as_str()).collect();
                        return Err(bad(format!(
                            "outputs [{}]: expected one named logits (float [1, q, vocab]) or next_token (int32)",
                            names.join(", ")
                        )));
                    }
                },
            },
        };
        Ok(CallProtocol {
            ids: ids_name.to_string(),
            query,
            position,
            output,
            context,
            states: desc.states.iter().map(|s| s.name.clone()).collect(),
        })
    }

    /// Splits `n` tokens starting at position `past` into calls: as long as allowed, the
    /// last one padded when the package cannot take its length exactly. Fails when the
    /// tokens do not fit the context.
    pub fn plan(&self, past: usize, n: usize) -> Result<Vec<PlannedCall>, String> {
        if past + n > self.context {
            return Err(format!(
                "{n} tokens after the {past} already processed exceed the package's context of {} positions",
                self.context
            ));
        }
        let mut calls = Vec::new();
        let mut at = past;
        let end = past + n;
        while at < end {
            let remaining = end - at;
            let q = match &self.query {
                QueryLengths::Range { min, max } => remaining.min(*max).max(*min),
                QueryLengths::List(l) => match l.iter().rev().find(|&&q| q <= remaining) {
                    Some(&q) => q,
                    None => l[0],
                },
            };
            if at + q > self.context {
                return Err(format!(
                    "the package takes at least {q} tokens per call, and {remaining} tokens padded to {q} at position {at} exceed its context of {} positions",
                    self.context
                ));
            }
            let tokens = q.min(remaining);
            calls.push(PlannedCall {
                past: at,
                tokens,
                q,
            });
            at += tokens;
        }
        Ok(calls)
    }

    /// The inputs of one call: `ids` (at most `call.q` of them; the rest is padding) at
    /// positions `call.past..`.
    pub fn inputs(
        &self,
        ids: &[u32],
        call: &PlannedCall,
    ) -> Result<Vec<(String, Tensor)>, CoreMlError> {
        let q = call.q;
        let past = call.past;
        let mut padded: Vec<i32> = Vec::with_capacity(q);
        for &id in ids.iter().take(q) {
            padded.push(
                i32::try_from(id).map_err(|_| {
                    CoreMlError::Tensor(format!("token id {id} does not fit int32"))
                })?,
            );
        }
        let pad = padded.last().copied().unwrap_or(0);
        padded.resize(q, pad);
        let mut out = vec![(self.ids.clone(), Tensor::i32(vec![1, q], padded)?)];
        match &self.position {
            PositionInput::CausalMask {
                name,
                dtype,
                fixed_width,
            } => {
                let width = fixed_width.unwrap_or(past + q);
                let mut mask = vec![f32::NEG_INFINITY; q * width];
                for (i, row) in mask.chunks_exact_mut(width).enumerate() {
                    let visible = (past + i + 1).min(width);
                    row[..visible].fill(0.0);
                }
                let shape = vec![1, 1, q, width];
                let t = match dtype {
                    ArrayDataType::Float16 => Tensor::f16_from_f32(shape, &mask)?,
                    _ => Tensor::f32(shape, mask)?,
                };
                out.push((name.clone(), t));
            }
            PositionInput::Positions { name, layout } => {
                let pos: Vec<i32> = (past..past + q).map(|p| p as i32).collect();
                let t = match layout {
                    PositionLayout::Batch => Tensor::i32(vec![1, q], pos)?,
                    PositionLayout::Flat => Tensor::i32(vec![q], pos)?,
                    PositionLayout::Start => Tensor::i32(vec![1], vec![past as i32])?,
                };
                out.push((name.clone(), t));
            }
        }
        Ok(out)
    }
}

/// The `[1, q]` query lengths an int32 `[1, q]` input accepts, `None` if none.
fn query_lengths(a: &ArrayInfo) -> Option<QueryLengths> {
    match &a.flexibility {
        ShapeFlexibility::Unspecified => Some(QueryLengths::Range {
            min: 1,
            max: usize::MAX,
        }),
        ShapeFlexibility::Fixed => match a.shape.as_slice() {
            [1, q] if *q > 0 => Some(QueryLengths::List(vec![*q])),
            _ => None,
        },
        ShapeFlexibility::Ranges(r) => {
            let (b, q) = (r.first()?, r.get(1)?);
            if b.lower > 1 || b.upper.is_some_and(|u| u < 1) {
                return None;
            }
            Some(QueryLengths::Range {
                min: q.lower.max(1),
                max: q.upper.unwrap_or(usize::MAX),
            })
        }
        ShapeFlexibility::Enumerated(list) => {
            let mut l: Vec<usize> = list
                .iter()
                .filter_map(|s| match s.as_slice() {
                    [1, q] if *q > 0 => Some(*q),
                    _ => None,
                })
                .collect();
            l.sort_unstable();
            l.dedup();
            (!l.is_empty()).then_some(QueryLengths::List(l))
        }
    }
}

/// What runs one call of a package: kiln's reference [`Executor`] here, Core ML itself on
/// Apple platforms (the `kiln-coreml-apple` crate). States live in the runner and carry
/// from call to call.
pub trait PackageRunner {
    /// Runs the package's main function once on `inputs` (by name) and returns every output
    /// by name.
    fn predict(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, CoreMlError>;

    /// Sets every state back to zero.
    fn reset_states(&mut self);

    /// The dimensions the program declares for an output, where the runner knows them.
    fn output_dims(&self, _name: &str) -> Option<Vec<Option<usize>>> {
        None
    }

    /// What computes, for messages and timings lines.
    fn describe(&self) -> String;
}

impl PackageRunner for Executor {
    fn predict(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, CoreMlError> {
        Executor::predict(self, inputs)
    }

    fn reset_states(&mut self) {
        Executor::reset_states(self)
    }

    fn output_dims(&self, name: &str) -> Option<Vec<Option<usize>>> {
        Executor::output_dims(self, name)
    }

    fn describe(&self) -> String {
        "kiln reference executor (CPU)".into()
    }
}

/// A stateful language-model package run token by token: token ids in, logits (f32) out,
/// positions tracked and states carried across calls. [`CoremlSession::open`] runs it with
/// kiln's reference executor; [`CoremlSession::with_runner`] with any [`PackageRunner`].
///
/// Its [`CoremlSession::forward_all`] has the shape of a logits model for validation (every
/// fed position's logits), and it implements [`kiln_runtime::generate::TokenModel`] so
/// `kiln_runtime`'s sampling and generation drive it as they drive the CPU session.
pub struct CoremlSession {
    label: String,
    path: PathBuf,
    runner: Box<dyn PackageRunner>,
    protocol: CallProtocol,
    info: PackageInfo,
    vocab: usize,
    n_past: usize,
}

impl std::fmt::Debug for CoremlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoremlSession")
            .field("package", &self.label)
            .field("protocol", &self.protocol)
            .field("n_past", &self.n_past)
            .finish_non_exhaustive()
    }
}

impl CoremlSession {
    /// Opens the package at `path` (and its sidecar), discovers how to call it and loads its
    /// weights into kiln's reference executor. A model split over several packages is opened
    /// whole, from any of its packages or from the name it was exported to (see
    /// [`crate::chain::resolve_packages`]).
    pub fn open(path: impl AsRef<Path>) -> Result<CoremlSession, CoreMlError> {
        CoremlSession::with_options(path, ExecOptions::default())
    }

    /// Like [`CoremlSession::open`] with explicit execution options.
    pub fn with_options(
        path: impl AsRef<Path>,
        options: ExecOptions,
    ) -> Result<CoremlSession, CoreMlError> {
        CoremlSession::open_with(path, |pkg| {
            Ok(Box::new(Executor::with_options(pkg, options)?))
        })
    }

    /// Opens the package (or the packages of a split model) at `path` with runners made by
    /// `load`, one per package: how the Core ML backend and the reference executor share the
    /// discovery of packages, protocol and metadata.
    pub fn open_with(
        path: impl AsRef<Path>,
        mut load: impl FnMut(&MlPackage) -> Result<Box<dyn PackageRunner>, CoreMlError>,
    ) -> Result<CoremlSession, CoreMlError> {
        let path = path.as_ref();
        let parts = crate::chain::resolve_packages(path)?;
        if let [only] = parts.as_slice() {
            let pkg = MlPackage::open(only)?;
            let info = PackageInfo::read(&pkg)?;
            let protocol = CallProtocol::discover(pkg.label(), pkg.description(), &info)?;
            let runner = load(&pkg)?;
            return CoremlSession::assemble(pkg.label(), pkg.path(), info, protocol, runner);
        }
        let mut info = None;
        let mut stages = Vec::with_capacity(parts.len());
        for part in &parts {
            let pkg = MlPackage::open(part)?;
            if info.is_none() {
                // The first package carries the tokenizer; the sidecar is shared.
                info = Some(PackageInfo::read(&pkg)?);
            }
            let runner = load(&pkg)?;
            stages.push((pkg, runner));
        }
        let info = info.unwrap_or_default();
        let (chain, whole) = ChainRunner::new(stages)?;
        let label = format!("{} ({} packages)", path.display(), parts.len());
        let protocol = CallProtocol::discover(&label, &whole, &info)?;
        CoremlSession::assemble(&label, path, info, protocol, Box::new(chain))
    }

    /// A session over `pkg` whose calls `runner` computes; the protocol is read from `pkg`.
    /// One package of a split model is refused: [`CoremlSession::open_with`] runs it whole.
    pub fn with_runner(
        pkg: &MlPackage,
        runner: Box<dyn PackageRunner>,
    ) -> Result<CoremlSession, CoreMlError> {
        let parts = crate::chain::resolve_packages(pkg.path())?;
        if parts.len() > 1 {
            return Err(CoreMlError::Package {
                package: pkg.label().to_string(),
                message: format!(
                    "one of the {} packages of a split model, which run only together (open the model with CoremlSession::open_with)",
                    parts.len()
                ),
            });
        }
        let info = PackageInfo::read(pkg)?;
        let protocol = CallProtocol::discover(pkg.label(), pkg.description(), &info)?;
        CoremlSession::assemble(pkg.label(), pkg.path(), info, protocol, runner)
    }

    fn assemble(
        label: &str,
        path: &Path,
        info: PackageInfo,
        protocol: CallProtocol,
        runner: Box<dyn PackageRunner>,
    ) -> Result<CoremlSession, CoreMlError> {
        let mut session = CoremlSession {
            label: label.to_string(),
            path: path.to_path_buf(),
            runner,
            protocol,
            info,
            vocab: 0,
            n_past: 0,
        };
        session.vocab = session.find_vocab_size()?;
        Ok(session)
    }

    /// The vocabulary size: from the program's output type, else the metadata, else one
    /// probe call (after which the states are zeroed again).
    fn find_vocab_size(&mut self) -> Result<usize, CoreMlError> {
        match &self.protocol.output {
            OutputKind::Logits { name } => {
                let declared = self
                    .runner
                    .output_dims(name)
                    .and_then(|d| d.last().copied().flatten());
                if let Some(v) = declared.or(self.info.vocab_size) {
                    return Ok(v);
                }
                let rows = self.forward_all(&[0])?;
                self.reset();
                Ok(rows.len())
            }
            // An argmax head hides the vocabulary; 0 when nothing says it.
            OutputKind::NextToken { .. } => Ok(self.info.vocab_size.unwrap_or(0)),
        }
    }

    /// What computes the calls.
    pub fn backend(&self) -> String {
        self.runner.describe()
    }

    /// The package's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the package is called.
    pub fn protocol(&self) -> &CallProtocol {
        &self.protocol
    }

    /// What the metadata and sidecar say.
    pub fn info(&self) -> &PackageInfo {
        &self.info
    }

    /// The tokenizer the package carries, `None` when it carries none.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>, CoreMlError> {
        self.info.tokenizer(&self.label)
    }

    /// Entries of the vocabulary (0 for an argmax package whose metadata does not say).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Whether calls return logits (false: argmax token ids only).
    pub fn has_logits(&self) -> bool {
        matches!(self.protocol.output, OutputKind::Logits { .. })
    }

    /// Positions processed so far.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Positions the package's states hold.
    pub fn n_ctx(&self) -> usize {
        self.protocol.context
    }

    /// Zeroes the states and forgets every position.
    pub fn reset(&mut self) {
        self.runner.reset_states();
        self.n_past = 0;
    }

    fn input_err(&self, message: String) -> CoreMlError {
        CoreMlError::Input {
            package: self.label.clone(),
            input: self.protocol.ids.clone(),
            message,
        }
    }

    /// Runs `ids` after the positions already processed, in as many calls as needed, and
    /// hands `each` every call's output with the number of real (unpadded) positions.
    fn feed(
        &mut self,
        ids: &[u32],
        mut each: impl FnMut(&Tensor, usize) -> Result<(), CoreMlError>,
    ) -> Result<(), CoreMlError> {
        if ids.is_empty() {
            return Err(self.input_err("no tokens given".into()));
        }
        if self.vocab > 0 {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(self.input_err(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    self.vocab
                )));
            }
        }
        let calls = self
            .protocol
            .plan(self.n_past, ids.len())
            .map_err(|m| self.input_err(m))?;
        let out_name = match &self.protocol.output {
            OutputKind::Logits { name } | OutputKind::NextToken { name } => name.clone(),
        };
        let mut offset = 0;
        for call in calls {
            let chunk = &ids[offset..offset + call.tokens];
            let inputs: HashMap<String, Tensor> =
                self.protocol.inputs(chunk, &call)?.into_iter().collect();
            let mut outputs = self.runner.predict(&inputs)?;
            let out = outputs
                .remove(&out_name)
                .ok_or_else(|| CoreMlError::Package {
                    package: self.label.clone(),
                    message: format!("the call returned no output {out_name}"),
                })?;
            let rows: usize = match &self.protocol.output {
                OutputKind::Logits { .. } => {
                    let s = out.shape();
                    s[..s.len().saturating_sub(1)].iter().product()
                }
                OutputKind::NextToken { .. } => out.len(),
            };
            if rows != call.q {
                return Err(CoreMlError::Package {
                    package: self.label.clone(),
                    message: format!(
                        "output {out_name} has shape {:?} for a call of {} tokens; expected one row per token",
                        out.shape(),
                        call.q
                    ),
                });
            }
            self.n_past = call.past + call.tokens;
            offset += call.tokens;
            each(&out, call.tokens)?;
        }
        Ok(())
    }

    fn no_logits(&self) -> CoreMlError {
        CoreMlError::Package {
            package: self.label.clone(),
            message: "the package returns next_token (an argmax head), not logits".into(),
        }
    }

    /// Runs `ids` after the positions already processed and returns the logits after every
    /// one of them, row-major `[ids.len(), vocab]`, as f32.
    pub fn forward_all(&mut self, ids: &[u32]) -> Result<Vec<f32>, CoreMlError> {
        if !self.has_logits() {
            return Err(self.no_logits());
        }
        let mut logits = Vec::new();
        let mut vocab = self.vocab;
        self.feed(ids, |out, real| {
            let v = *out.shape().last().unwrap_or(&0);
            if vocab == 0 {
                vocab = v;
            }
            if v != vocab {
                return Err(CoreMlError::Tensor(format!(
                    "logits of width {v}, expected the vocabulary size {vocab}"
                )));
            }
            logits.extend_from_slice(&out.to_f32_vec()[..real * v]);
            Ok(())
        })?;
        Ok(logits)
    }

    /// Like [`CoremlSession::forward_all`], keeping only the logits after the last token.
    pub fn forward_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, CoreMlError> {
        if !self.has_logits() {
            return Err(self.no_logits());
        }
        let mut last = Vec::new();
        self.feed(ids, |out, real| {
            let v = *out.shape().last().unwrap_or(&0);
            last = out.to_f32_vec()[(real - 1) * v..real * v].to_vec();
            Ok(())
        })?;
        Ok(last)
    }

    /// Runs `ids` and returns the most likely next token after each of them: the package's
    /// `next_token` output, or the argmax of its logits.
    pub fn next_tokens(&mut self, ids: &[u32]) -> Result<Vec<u32>, CoreMlError> {
        let mut tokens = Vec::with_capacity(ids.len());
        let logits = self.has_logits();
        self.feed(ids, |out, real| {
            if logits {
                let v = *out.shape().last().unwrap_or(&1);
                let all = out.to_f32_vec();
                for row in all.chunks_exact(v).take(real) {
                    tokens.push(kiln_runtime::sampling::argmax(row) as u32);
                }
            } else {
                let ids = match out.data() {
                    TensorData::I32(v) => v.clone(),
                    _ => out.to_f32_vec().iter().map(|&x| x as i32).collect(),
                };
                for &t in ids.iter().take(real) {
                    tokens.push(u32::try_from(t).map_err(|_| {
                        CoreMlError::Tensor(format!("next_token {t} is not a token id"))
                    })?);
                }
            }
            Ok(())
        })?;
        Ok(tokens)
    }
}

impl kiln_runtime::generate::TokenModel for CoremlSession {
    fn n_past(&self) -> usize {
        self.n_past
    }

    fn n_ctx(&self) -> usize {
        self.protocol.context
    }

    /// For an argmax package, a row of `-inf` with 0 at the chosen token: every sampler then
    /// picks that token.
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, kiln_runtime::ModelError> {
        let r = if self.has_logits() {
            CoremlSession::forward_last(self, tokens)
        } else {
            self.next_tokens(tokens).map(|next| {
                let t = *next.last().unwrap_or(&0) as usize;
                let mut row = vec![f32::NEG_INFINITY; self.vocab.max(t + 1)];
                row[t] = 0.0;
                row
            })
        };
        // The message already names the package (and the op or input at fault).
        r.map_err(|e| kiln_runtime::ModelError::Request(e.to_string()))
    }

    fn reset(&mut self) {
        CoremlSession::reset(self)
    }
}

/// A package as the candidate (or source) of `kiln validate`: the exported program itself is
/// what gets compared, call by call.
impl kiln_runtime::validate::LogitsModel for CoremlSession {
    fn vocab_size(&self) -> usize {
        CoremlSession::vocab_size(self)
    }

    fn context_length(&self) -> usize {
        self.n_ctx()
    }

    fn reset(&mut self) {
        CoremlSession::reset(self)
    }

    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, kiln_runtime::ModelError> {
        // The message already names the package (and the op or input at fault).
        self.forward_all(ids)
            .map_err(|e| kiln_runtime::ModelError::Request(e.to_string()))
    }
}
