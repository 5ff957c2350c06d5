//! Conversion of a GGUF file or Hugging Face folder into a kiln package (or a GGUF file, or a
//! Hugging Face folder), optionally changing the weights' format on the way.
//!
//! Where a ggml block type represents a scheme exactly, tensors are stored in it, so the
//! runtime's kernels for that type read them in place: `keep` copies the source's blocks byte
//! for byte (the package runs exactly as the GGUF does), `f32`/`f16`/`bf16` store those float
//! types, `int4-block32` stores symmetric int4 in blocks of 32 as ggml `Q4_0` blocks
//! (`w = d * (q - 8)`, one f16 scale per block) and `int4-block32-offset` int4 with a scale
//! and a minimum per block as `Q4_1` (`w = d * q + m`). The other schemes have kiln formats
//! of their own ([`kiln_format::kiln_types`]): `int8-channel` is `I8_CH`, `int4-block64` is
//! `I4_B64`, `lut2` … `lut8` are `LUT{b}` (one table per tensor) or `LUT{b}_G{n}` (one
//! per `--lut-group-channels` output channels), and `lut4-block32` is `LUT4_B32` (a 4-bit
//! table for the tensor with a scale and an offset per block of 32, learned together).
//!
//! The int4 scale of each block is chosen by a small search for the least squared error
//! rather than from the largest weight alone (ggml's reference rounding), which matters most
//! when the source is itself quantized. Lookup tables are learned by k-means (k-means++
//! seeding, Lloyd iterations to convergence) and stored as f16.
//!
//! Protected tensors — 1-D vectors (norms, biases), and by default the embedding and output
//! matrices — are never stored below their source precision: when the target has fewer bits
//! per weight than the source they are copied as they are.
//!
//! Output: a kiln package (default), a GGUF file ([`gguf_out`]: ggml types only) or a Hugging
//! Face folder ([`hf_out`]: float types only).
//!
//! With a calibration text (kiln packages, k-means lookup tables), the source model is first run
//! over the text's first `calibration_tokens` tokens (default [`calibration::DEFAULT_TOKENS`]).
//! Every table's k-means counts a weight's squared error by the mean square of its input
//! channel there ([`kiln_format::quant::quantize_lut_weighted`]): the error a matrix product's
//! output takes rather than the weights' own. Then each weight's index is chosen with error
//! feedback on the inputs' second moments ([`kiln_format::quant::feedback`]), so the rounding
//! errors of a row compensate each other in the product instead of adding up. The text and how
//! much of it was used go into the manifest's `conversion.calibration`.
//!
//! With `fp16_safe` (kiln packages only), the weights are first made fp16-safe
//! ([`crate::fp16_fix`]): the tensors that write into the residual stream are divided by a
//! power of two before any format change, the model description records the matching
//! embedding scale and norm epsilon, and the fix goes into the manifest's `conversion.fp16`.

pub mod gguf_out;
pub mod hf_out;

use crate::calibration::{self, InputStats};
use crate::error::ModelError;
use crate::fp16_fix::{self, Fp16Fix};
use crate::model::Model;
use crate::weights::{GgufSource, TensorSource};
use crate::{arch, hf, package};
use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::GgufFile;
use kiln_format::kiln_types::{self, KilnType, LutOptions, TensorFormat};
use kiln_format::package::{
    sha256_file, CalibrationInfo, Conversion, FileHash, Manifest, PackageWriter, SourceInfo,
    TensorQuality,
};
use kiln_format::quant::feedback::{self, Feedback};
use kiln_format::quant::{cosine, snr_db};
use kiln_format::safetensors::ShardedSafetensors;
use kiln_tokenizer::TokenizerSpec;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// The weight format a conversion stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantTarget {
    /// Each tensor as the source stores it.
    Keep,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// Symmetric int8 with one f32 scale per output channel (kiln `I8_CH`).
    Int8Channel,
    /// Symmetric int4 in blocks of 32 input channels with an f16 scale (ggml `Q4_0`).
    Int4Block32,
    /// int4 in blocks of 32 with an f16 scale and minimum (ggml `Q4_1`).
    Int4Block32Offset,
    /// Symmetric int4 in blocks of 64 input channels with an f16 scale (kiln `I4_B64`).
    Int4Block64,
    /// Lookup tables of `2^bits` f16 entries learned by k-means (kiln `LUT{bits}[_G{n}]`).
    Lut(u8),
    /// A 16-entry table for the tensor (or per group of output channels) with an int8 scale
    /// and offset per block of 32 input channels (kiln `LUT4_B32[_G{n}]`), 4.5 bits per
    /// weight.
    Lut4Block32,
}

impl QuantTarget {
    /// Every target, in the order the command line lists them.
    pub const ALL: [QuantTarget; 13] = [
        QuantTarget::Keep,
        QuantTarget::F32,
        QuantTarget::F16,
        QuantTarget::Bf16,
        QuantTarget::Int8Channel,
        QuantTarget::Int4Block32,
        QuantTarget::Int4Block32Offset,
        QuantTarget::Int4Block64,
        QuantTarget::Lut(2),
        QuantTarget::Lut(4),
        QuantTarget::Lut(6),
        QuantTarget::Lut(8),
        QuantTarget::Lut4Block32,
    ];

    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            QuantTarget::Keep => "keep",
            QuantTarget::F32 => "f32",
            QuantTarget::F16 => "f16",
            QuantTarget::Bf16 => "bf16",
            QuantTarget::Int8Channel => "int8-channel",
            QuantTarget::Int4Block32 => "int4-block32",
            QuantTarget::Int4Block32Offset => "int4-block32-offset",
            QuantTarget::Int4Block64 => "int4-block64",
            QuantTarget::Lut(2) => "lut2",
            QuantTarget::Lut(4) => "lut4",
            QuantTarget::Lut(6) => "lut6",
            QuantTarget::Lut(_) => "lut8",
            QuantTarget::Lut4Block32 => "lut4-block32",
        }
    }

    /// The ggml type a tensor becomes, `None` for [`QuantTarget::Keep`] and the kiln formats.
    pub fn ggml_type(self) -> Option<GgmlType> {
        match self.format(None)? {
            TensorFormat::Ggml(t) => Some(t),
            TensorFormat::Kiln(_) => None,
        }
    }

    /// The format a tensor becomes (`group`: output channels per lookup table, `None` for one
    /// table per tensor); `None` for [`QuantTarget::Keep`].
    pub fn format(self, group: Option<u32>) -> Option<TensorFormat> {
        Some(match self {
            QuantTarget::Keep => return None,
            QuantTarget::F32 => GgmlType::F32.into(),
            QuantTarget::F16 => GgmlType::F16.into(),
            QuantTarget::Bf16 => GgmlType::BF16.into(),
            QuantTarget::Int8Channel => KilnType::I8Ch.into(),
            QuantTarget::Int4Block32 => GgmlType::Q4_0.into(),
            QuantTarget::Int4Block32Offset => GgmlType::Q4_1.into(),
            QuantTarget::Int4Block64 => KilnType::I4B64.into(),
            QuantTarget::Lut(bits) => KilnType::Lut { bits, group }.into(),
            QuantTarget::Lut4Block32 => KilnType::Lut4B32 { group }.into(),
        })
    }

    /// Whether the target is a lookup-table scheme with tables per group of output channels
    /// (`--lut-group-channels` applies).
    pub fn is_lut(self) -> bool {
        matches!(self, QuantTarget::Lut(_) | QuantTarget::Lut4Block32)
    }
}

impl fmt::Display for QuantTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        QuantTarget::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = QuantTarget::ALL.iter().map(|t| t.name()).collect();
                format!("unknown --quant '{s}' (supported: {})", names.join(", "))
            })
    }
}

/// What a conversion writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// A kiln package folder.
    #[default]
    Kiln,
    /// A GGUF file (ggml types only).
    Gguf,
    /// A Hugging Face folder: `config.json`, `model.safetensors` (float types only).
    Safetensors,
}

impl OutputFormat {
    /// The `--to` name.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Kiln => "kiln",
            OutputFormat::Gguf => "gguf",
            OutputFormat::Safetensors => "safetensors",
        }
    }
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            OutputFormat::Kiln,
            OutputFormat::Gguf,
            OutputFormat::Safetensors,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| format!("unknown --to '{s}' (supported: kiln, gguf, safetensors)"))
    }
}

/// The tensors kept at source precision unless the caller names others.
pub const DEFAULT_KEEP: [&str; 2] = ["token_embd.weight", "output.weight"];

/// Settings of a conversion.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The weight format to store.
    pub quant: QuantTarget,
    /// Tensors never stored below their source precision (besides 1-D vectors).
    pub keep: Vec<String>,
    /// The shard size cap in bytes (kiln packages).
    pub max_shard_bytes: u64,
    /// Output channels per lookup table; `None`: one table per tensor.
    pub lut_group_channels: Option<u32>,
    /// How lookup tables are learned.
    pub lut: LutOptions,
    /// What to write.
    pub to: OutputFormat,
    /// Apply the fp16 range fix ([`crate::fp16_fix`]), calibrated on
    /// [`crate::validate::DEFAULT_PROMPTS`] (kiln packages only).
    pub fp16_safe: bool,
    /// A text file whose activations weight the k-means of lookup tables (kiln packages,
    /// `lut2` … `lut8`); `None`: every weight counts the same.
    pub calibration: Option<PathBuf>,
    /// Tokens of the calibration text the source runs over, at most (its first ones).
    pub calibration_tokens: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quant: QuantTarget::Keep,
            keep: DEFAULT_KEEP.iter().map(|s| s.to_string()).collect(),
            max_shard_bytes: kiln_format::package::DEFAULT_MAX_SHARD_BYTES,
            lut_group_channels: None,
            lut: LutOptions::default(),
            to: OutputFormat::Kiln,
            fp16_safe: false,
            calibration: None,
            calibration_tokens: calibration::DEFAULT_TOKENS,
        }
    }
}

impl ConvertOptions {
    /// The `quant` setting as manifests record it: the target name, with the table group
    /// for lookup tables (`lut4-g16`, `lut4-block32-g16`).
    pub fn quant_label(&self) -> String {
        match (self.quant, self.lut_group_channels) {
            (q, Some(g)) if q.is_lut() => format!("{}-g{g}", self.quant.name()),
            _ => self.quant.name().to_string(),
        }
    }
}

/// What happened to one tensor.
#[derive(Clone, Debug)]
pub struct TensorOutcome {
    /// Canonical name.
    pub name: String,
    /// Shape in ggml order.
    pub shape: Vec<u64>,
    /// The source's format.
    pub from: TensorFormat,
    /// The stored format.
    pub to: TensorFormat,
    /// Bytes stored.
    pub bytes: u64,
    /// Reconstruction quality against the source values, when the format changed.
    pub quality: Option<TensorQuality>,
    /// Why a tensor was left in its source format although the target differs.
    pub kept_because: Option<String>,
}

/// The result of a conversion.
pub struct ConvertReport {
    /// The manifest written (kiln packages only).
    pub manifest: Option<Manifest>,
    /// Per tensor, in write order.
    pub tensors: Vec<TensorOutcome>,
    /// Files written (shards, or the GGUF file, or the folder's files).
    pub files: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Things the output leaves out that a reader may expect (e.g. no tokenizer).
    pub notes: Vec<String>,
    /// The fp16 range fix applied, with `fp16_safe`.
    pub fp16: Option<Fp16Fix>,
    /// The calibration text used, with `calibration`.
    pub calibration: Option<CalibrationInfo>,
}

fn is_vector(dims: &[u64]) -> bool {
    dims.iter().filter(|&&d| d != 1).count() <= 1
}

/// Bits per weight of `format` for a tensor of `dims`.
fn bits_per_weight(format: TensorFormat, dims: &[u64]) -> Option<f64> {
    let n: u64 = dims.iter().product();
    Some(format.data_length(dims)? as f64 * 8.0 / n as f64)
}

/// The source model, opened.
pub(crate) struct Source {
    config: crate::config::ModelConfig,
    tensors: Box<dyn TensorSource>,
    format: &'static str,
    hashes: Vec<FileHash>,
    tokenizer: Value,
    chat_template: Option<String>,
    /// Hugging Face tokenizer files to carry over: (name, contents).
    files: Vec<(String, Vec<u8>)>,
    /// The GGUF file, for a GGUF source (its metadata is carried into GGUF output).
    gguf: Option<Arc<GgufFile>>,
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

fn open_source(src: &Path) -> Result<Source, ModelError> {
    if package::is_package(src) {
        return Err(ModelError::unsupported(
            src,
            "converting from a kiln package is not supported; convert the original GGUF file or \
             Hugging Face folder",
        ));
    }
    if src.is_dir() {
        let (json, config_path) = hf::read_config(src)?;
        let config = hf::config_from_json(&json, &config_path)?;
        let tied = hf::tie_word_embeddings(&json, &config, &config_path)?;
        let weights = ShardedSafetensors::open_dir(src)?;
        let mut hashes = Vec::new();
        for f in weights.files() {
            hashes.push(FileHash {
                file: file_name(f.path()),
                sha256: sha256_file(f.path())?,
            });
        }
        let tensors = hf::HfSource::new(src, &weights, &config, tied)?;
        let mut files = Vec::new();
        for name in package::HF_TOKENIZER_FILES {
            let path = src.join(name);
            if path.is_file() {
                let bytes =
                    std::fs::read(&path).map_err(|e| ModelError::bad(&path, e.to_string()))?;
                files.push((name.to_string(), bytes));
            }
        }
        let (tokenizer, chat_template) = if src.join(hf::TOKENIZER_FILE).is_file() {
            let tok = kiln_tokenizer::Tokenizer::from_hf(src)
                .map_err(|e| ModelError::bad(src, format!("tokenizer: {e}")))?;
            let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
            (
                package::hf_tokenizer_value(&names),
                tok.chat_template().map(str::to_string),
            )
        } else {
            files.clear();
            (Value::Null, None)
        };
        return Ok(Source {
            config,
            tensors: Box::new(tensors),
            format: "hf",
            hashes,
            tokenizer,
            chat_template,
            files,
            gguf: None,
        });
    }
    hf::refuse_weights_file(src)?;
    let file = Arc::new(GgufFile::open(src)?);
    let config = arch::config_from_gguf(&file)?;
    let hashes = vec![FileHash {
        file: file_name(src),
        sha256: sha256_file(src)?,
    }];
    // A GGUF without tokenizer metadata still converts; the package then runs on token ids.
    let (tokenizer, chat_template) = match TokenizerSpec::from_gguf(&file) {
        Ok(spec) => (
            package::gguf_tokenizer_value(&spec),
            spec.chat_template.clone(),
        ),
        Err(kiln_tokenizer::TokenizerError::MissingKey(_)) => (Value::Null, None),
        Err(e) => return Err(ModelError::bad(src, format!("tokenizer: {e}"))),
    };
    Ok(Source {
        config,
        tensors: Box::new(GgufSource(Arc::clone(&file))),
        format: "gguf",
        hashes,
        tokenizer,
        chat_template,
        files: Vec::new(),
        gguf: Some(file),
    })
}

/// Converts the model at `src` (GGUF file or Hugging Face folder) into `options.to` at `out`.
/// `on_tensor` is called after each tensor is converted, with its outcome and the count done
/// and total. Nothing appears at `out` unless the whole conversion succeeds.
pub fn convert(
    src: &Path,
    out: &Path,
    options: &ConvertOptions,
    on_tensor: &mut dyn FnMut(&TensorOutcome, usize, usize),
) -> Result<ConvertReport, ModelError> {
    if options.lut_group_channels == Some(0) {
        return Err(ModelError::Request(
            "--lut-group-channels must be at least 1".into(),
        ));
    }
    let source = open_source(src)?;
    // Refuse what the runtime could not run before spending time on it (a calibration then
    // runs this model).
    let model = Model::from_source(source.config.clone(), source.tensors.as_ref())?;
    check_table_groups(source.tensors.as_ref(), options)?;
    if let Some(path) = &options.calibration {
        if !matches!(options.quant, QuantTarget::Lut(_)) {
            return Err(ModelError::Request(format!(
                "--calibration weights the k-means of lookup tables (lut2, lut4, lut6, lut8); \
                 --quant {} does not use it",
                options.quant
            )));
        }
        if options.to != OutputFormat::Kiln {
            return Err(ModelError::Request(format!(
                "--calibration writes kiln packages (lookup tables are kiln formats), not --to {}",
                options.to.name()
            )));
        }
        if !path.is_file() {
            return Err(ModelError::bad(
                path,
                "the calibration text does not exist or is not a file",
            ));
        }
        if options.calibration_tokens == 0 {
            return Err(ModelError::Request(
                "--calibration-tokens must be at least 1".into(),
            ));
        }
    }
    if options.fp16_safe && options.to != OutputFormat::Kiln {
        return Err(ModelError::Request(format!(
            "--fp16-safe writes kiln packages (the fix lives in the package's model \
             description), not --to {}",
            options.to.name()
        )));
    }
    // Measured on the source as it is: a power-of-two rescaling by the fp16 fix scales a
    // matrix's input channels all alike, which changes no table.
    let calibrated = match &options.calibration {
        Some(path) => Some(calibrate(
            src,
            &source,
            &model,
            path,
            options.calibration_tokens,
        )?),
        None => None,
    };
    drop(model);
    match options.to {
        OutputFormat::Kiln => to_package(src, out, &source, options, calibrated, on_tensor),
        OutputFormat::Gguf => gguf_out::write(src, out, &source, options, on_tensor),
        OutputFormat::Safetensors => hf_out::write(src, out, &source, options, on_tensor),
    }
}

fn to_package(
    src: &Path,
    out: &Path,
    source: &Source,
    options: &ConvertOptions,
    calibrated: Option<Calibrated>,
    on_tensor: &mut dyn FnMut(&TensorOutcome, usize, usize),
) -> Result<ConvertReport, ModelError> {
    let safe = if options.fp16_safe {
        Some(make_fp16_safe(src, source)?)
    } else {
        None
    };
    let (config, tensors): (&crate::config::ModelConfig, &dyn TensorSource) = match &safe {
        Some(safe) => (&safe.config, &safe.source),
        None => (&source.config, source.tensors.as_ref()),
    };
    let config_json = serde_json::to_value(config)
        .map_err(|e| ModelError::bad(src, format!("cannot describe the model: {e}")))?;
    let fp16 = safe.as_ref().map(|s| s.fix.clone());
    let fp16_json = match &fp16 {
        Some(fix) => Some(
            serde_json::to_value(fix)
                .map_err(|e| ModelError::bad(src, format!("cannot describe the fp16 fix: {e}")))?,
        ),
        None => None,
    };
    let mut writer = PackageWriter::create(out, options.max_shard_bytes)?;
    for (name, bytes) in &source.files {
        writer.add_file(name, bytes)?;
    }
    let mut names = tensors.names();
    kiln_format::read_order::sort(&mut names);
    let mut outcomes = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let stored = convert_tensor(tensors, name, options, calibrated.as_ref())?;
        writer.add_tensor(
            name,
            &stored.outcome.shape,
            stored.outcome.to,
            stored.bytes(),
            stored.outcome.quality.clone(),
        )?;
        on_tensor(&stored.outcome, i + 1, names.len());
        outcomes.push(stored.outcome);
    }
    let manifest = Manifest {
        format: String::new(),
        format_version: 0,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        architecture: config.architecture.clone(),
        config: config_json,
        tokenizer: source.tokenizer.clone(),
        chat_template: source.chat_template.clone(),
        source: SourceInfo {
            path: src.display().to_string(),
            format: source.format.to_string(),
            sha256: source.hashes.clone(),
        },
        conversion: Conversion {
            quant: options.quant_label(),
            keep: options.keep.clone(),
            max_shard_bytes: options.max_shard_bytes,
            fp16: fp16_json,
            calibration: calibrated.as_ref().map(|c| c.info.clone()),
        },
        alignment: 0,
        shards: Vec::new(),
        files: Vec::new(),
        tensors: Vec::new(),
    };
    let manifest = writer.finish(manifest)?;
    Ok(ConvertReport {
        files: manifest.shards.len(),
        bytes: manifest.shards.iter().map(|s| s.size).sum(),
        manifest: Some(manifest),
        tensors: outcomes,
        notes: Vec::new(),
        fp16,
        calibration: calibrated.map(|c| c.info),
    })
}

/// The source's own tokenizer; `option` names what needs it when there is none.
fn source_tokenizer(
    src: &Path,
    source: &Source,
    option: &str,
) -> Result<kiln_tokenizer::Tokenizer, ModelError> {
    match source.format {
        "hf" if src.join(hf::TOKENIZER_FILE).is_file() => kiln_tokenizer::Tokenizer::from_hf(src),
        "gguf" if !source.tokenizer.is_null() => {
            kiln_tokenizer::Tokenizer::from_gguf(&GgufFile::open(src)?)
        }
        _ => {
            return Err(ModelError::Request(format!(
                "{}: {option} calibrates on text, but the model has no tokenizer",
                src.display()
            )))
        }
    }
    .map_err(|e| ModelError::bad(src, format!("tokenizer: {e}")))
}

/// Activation statistics of a calibration text, and what the manifest records of it.
pub(crate) struct Calibrated {
    stats: InputStats,
    /// Whether the output projection is the embedding matrix (which then takes its weights).
    tied: bool,
    info: CalibrationInfo,
    /// The last error-feedback factor made, with its distinct input: matrices reading one
    /// input (query, key and value; gate and up) are converted one after the other and share it.
    factor: Mutex<Option<(usize, Arc<Feedback>)>>,
}

impl Calibrated {
    /// The error weight of each input channel of tensor `name`: the mean square of the
    /// channel's activations, at least a millionth of their mean over the channels (so a
    /// channel the text never drives still keeps its weights in view). `None` for a tensor
    /// no matrix product reads (an untied embedding is looked up, not multiplied).
    fn column_weights(&self, name: &str) -> Option<Vec<f32>> {
        let key = if name == "token_embd.weight" && self.tied {
            calibration::OUTPUT_WEIGHT
        } else {
            name
        };
        let imp = self.stats.importance(key)?;
        let mean = imp.iter().map(|&v| f64::from(v)).sum::<f64>() / imp.len().max(1) as f64;
        if !(mean.is_finite() && mean > 0.0) {
            return None;
        }
        let floor = (1e-6 * mean) as f32;
        Some(imp.iter().map(|&v| v.max(floor)).collect())
    }

    /// The error-feedback factor of the inputs of matrix `name`. `None` for the embedding,
    /// which is also looked up row by row (feedback would trade its rows' own accuracy for the
    /// output projection's), and for a tensor no matrix product reads.
    fn feedback(&self, name: &str) -> Option<Result<Arc<Feedback>, String>> {
        if name == "token_embd.weight" {
            return None;
        }
        let input = self.stats.input_index(name)?;
        let mut last = self.factor.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, f)) = last.as_ref() {
            if *i == input {
                return Some(Ok(f.clone()));
            }
        }
        let h = self.stats.second_moment(name)?;
        let n = (h.len() as f64).sqrt() as usize;
        Some(match Feedback::new(&h, n, feedback::DEFAULT_DAMPING) {
            Ok(f) => {
                let f = Arc::new(f);
                *last = Some((input, f.clone()));
                Ok(f)
            }
            Err(e) => Err(format!("error feedback: {e}")),
        })
    }
}

/// Runs `model` (the source's) over the first `max_tokens` tokens of the text at `path`,
/// gathering the second moments error feedback needs.
fn calibrate(
    src: &Path,
    source: &Source,
    model: &Model,
    path: &Path,
    max_tokens: usize,
) -> Result<Calibrated, ModelError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ModelError::bad(path, format!("cannot read the calibration text: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        ModelError::bad(
            path,
            format!(
                "the calibration text is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ModelError::bad(
            path,
            "the calibration text is empty: expected text to run the model over",
        ));
    }
    let tokenizer = source_tokenizer(src, source, "--calibration")?;
    let chunks = calibration::chunks(&tokenizer, &text, max_tokens, calibration::CHUNK_TOKENS)
        .map_err(|e| ModelError::bad(path, format!("tokenizing the calibration text: {e}")))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = crate::pool::ThreadPool::new(threads);
    let mut stats = InputStats::with_second_moments();
    calibration::collect_into(model, &pool, &chunks, &mut stats)?;
    let bos = usize::from(tokenizer.add_bos() && tokenizer.bos_id().is_some());
    let tokens: usize = chunks.iter().map(|c| c.len() - bos).sum();
    Ok(Calibrated {
        stats,
        tied: model.tied_embeddings,
        info: CalibrationInfo {
            file: file_name(path),
            sha256: sha256_file(path)?,
            tokens: tokens as u64,
            chunk_tokens: calibration::CHUNK_TOKENS as u64,
            error_feedback: true,
        },
        factor: Mutex::new(None),
    })
}

/// Calibrates the fp16 fix on the built-in prompts, tokenized by the source's own tokenizer.
fn make_fp16_safe<'a>(
    src: &Path,
    source: &'a Source,
) -> Result<fp16_fix::SafeModel<'a>, ModelError> {
    let tokenizer = source_tokenizer(src, source, "--fp16-safe")?;
    let prompts = crate::validate::DEFAULT_PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::bad(src, format!("tokenizer: {e}")))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = crate::pool::ThreadPool::new(threads);
    fp16_fix::make_safe(&source.config, source.tensors.as_ref(), &pool, &prompts)
}

/// One converted tensor: what happened, and the bytes to store.
pub(crate) struct StoredTensor {
    pub(crate) outcome: TensorOutcome,
    data: StoredData,
}

/// Where a converted tensor's bytes are.
enum StoredData {
    /// Unchanged: in the source's storage.
    Source(crate::weights::TensorRef),
    /// Newly encoded.
    Owned(Vec<u8>),
}

impl StoredTensor {
    /// The bytes to store.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.data {
            // Checked by `tensor_data` when the tensor was converted.
            StoredData::Source(t) => t.data().expect("tensor data checked"),
            StoredData::Owned(v) => v,
        }
    }

    /// The bytes to store, owned.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        match self.data {
            StoredData::Source(t) => t.data().expect("tensor data checked").to_vec(),
            StoredData::Owned(v) => v,
        }
    }
}

/// Refuses a `LUT4_B32` table group that does not divide the output channels of a tensor the
/// conversion would store as `LUT4_B32`, naming the tensor: a quiet fallback to the source
/// format would leave that tensor at several times the bits asked for.
fn check_table_groups(
    source: &dyn TensorSource,
    options: &ConvertOptions,
) -> Result<(), ModelError> {
    let (QuantTarget::Lut4Block32, Some(g)) = (options.quant, options.lut_group_channels) else {
        return Ok(());
    };
    let whole = ConvertOptions {
        lut_group_channels: None,
        ..options.clone()
    };
    for name in source.names() {
        let t = crate::weights::require(source, &name)?;
        let (target, _) = target_format(&name, &t.dims, t.format, &whole);
        let rows: u64 = t.dims[1..].iter().product();
        if matches!(target, TensorFormat::Kiln(KilnType::Lut4B32 { .. }))
            && rows % u64::from(g) != 0
        {
            return Err(ModelError::Request(format!(
                "tensor '{name}': --lut-group-channels {g} does not divide its {rows} output \
                 channels (LUT4_B32_G{g} takes one table per {g} rows)"
            )));
        }
    }
    Ok(())
}

/// The format `name` is stored in, and why it stays in its source format when it does.
fn target_format(
    name: &str,
    dims: &[u64],
    from: TensorFormat,
    options: &ConvertOptions,
) -> (TensorFormat, Option<String>) {
    let Some(target) = options.quant.format(options.lut_group_channels) else {
        return (from, None);
    };
    if target == from {
        return (from, None);
    }
    if is_vector(dims) && target.kiln().is_some() {
        // Norms and biases are read as f32 vectors; the kiln formats are for matrices.
        return (from, Some("vectors stay in ggml types".into()));
    }
    let protected = is_vector(dims) || options.keep.iter().any(|k| k == name);
    let bits = |f| bits_per_weight(f, dims).unwrap_or(f64::INFINITY);
    if target.data_length(dims).is_none() {
        let why = match target {
            TensorFormat::Kiln(KilnType::Lut { group: Some(g), .. }) => format!(
                "shape does not fit {target} (rows must be a multiple of 32 elements and {g} \
                 must divide the {} rows)",
                dims[1..].iter().product::<u64>()
            ),
            _ => format!("row length is not a whole number of {target} blocks"),
        };
        return (from, Some(why));
    }
    if protected && bits(target) < bits(from) {
        return (from, Some("kept at source precision".into()));
    }
    (target, None)
}

/// Converts one tensor of `source` as `options` asks.
pub(crate) fn convert_tensor(
    source: &dyn TensorSource,
    name: &str,
    options: &ConvertOptions,
    calibrated: Option<&Calibrated>,
) -> Result<StoredTensor, ModelError> {
    let t = crate::weights::require(source, name)?;
    let data = crate::weights::tensor_data(source, name, &t)?;
    let (target, kept_because) = target_format(name, &t.dims, t.format, options);
    let mut outcome = TensorOutcome {
        name: name.to_string(),
        shape: t.dims.clone(),
        from: t.format,
        to: target,
        bytes: data.len() as u64,
        quality: None,
        kept_because,
    };
    if target == t.format {
        return Ok(StoredTensor {
            outcome,
            data: StoredData::Source(t),
        });
    }
    let bad = |e: String| ModelError::bad(source.origin(), format!("tensor '{name}': {e}"));
    let values = dequantized(source, name, t.format, data, t.n_elements())?;
    let cols = t.dims[0] as usize;
    let rows = values.len() / cols;
    let stored = match target {
        TensorFormat::Ggml(GgmlType::Q4_0) => quantize_q4_0_searched(&values),
        TensorFormat::Ggml(ty) => ggml::quantize(ty, &values).map_err(|e| bad(e.to_string()))?,
        TensorFormat::Kiln(KilnType::I8Ch) => {
            kiln_types::encode_i8_channel(&values, rows, cols).map_err(|e| bad(e.to_string()))?
        }
        TensorFormat::Kiln(KilnType::I4B64) => {
            kiln_types::encode_i4_b64(&values, rows, cols).map_err(|e| bad(e.to_string()))?
        }
        TensorFormat::Kiln(ty @ KilnType::Lut4B32 { .. }) => {
            kiln_types::encode_lut4_b32(ty, &values, rows, cols).map_err(|e| bad(e.to_string()))?
        }
        TensorFormat::Kiln(ty @ KilnType::Lut { .. }) => {
            let weights = calibrated.and_then(|c| c.column_weights(name));
            let feedback = calibrated
                .and_then(|c| c.feedback(name))
                .transpose()
                .map_err(bad)?;
            kiln_types::encode_lut_calibrated(
                ty,
                &values,
                rows,
                cols,
                options.lut,
                weights.as_deref(),
                feedback.as_deref(),
            )
            .map_err(|e| bad(e.to_string()))?
        }
    };
    let back = reconstruct(target, &stored, rows, cols).map_err(bad)?;
    let snr = snr_db(&values, &back);
    outcome.quality = Some(TensorQuality {
        scheme: options.quant_label(),
        snr_db: snr.is_finite().then_some(snr),
        cosine: cosine(&values, &back),
    });
    outcome.bytes = stored.len() as u64;
    Ok(StoredTensor {
        outcome,
        data: StoredData::Owned(stored),
    })
}

/// The values `stored` (a `rows` × `cols` tensor in `format`) holds.
fn reconstruct(
    format: TensorFormat,
    stored: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, String> {
    let mut back = vec![0.0f32; rows * cols];
    match format {
        TensorFormat::Ggml(ty) => {
            ggml::dequantize(ty, stored, &mut back).map_err(|e| e.to_string())?
        }
        TensorFormat::Kiln(ty) => {
            for (r, row) in back.chunks_exact_mut(cols).enumerate() {
                kiln_types::dequantize_row(ty, stored, rows, cols, r, row);
            }
        }
    }
    Ok(back)
}

fn dequantized(
    source: &dyn TensorSource,
    name: &str,
    format: TensorFormat,
    data: &[u8],
    n: u64,
) -> Result<Vec<f32>, ModelError> {
    let n = usize::try_from(n)
        .map_err(|_| ModelError::bad(source.origin(), format!("tensor '{name}' is too large")))?;
    let TensorFormat::Ggml(format) = format else {
        return Err(ModelError::unsupported(
            source.origin(),
            format!("tensor '{name}' is stored as {format}, which conversion does not read"),
        ));
    };
    let mut out = vec![0.0f32; n];
    ggml::dequantize(format, data, &mut out)
        .map_err(|e| ModelError::bad(source.origin(), format!("tensor '{name}': {e}")))?;
    Ok(out)
}

/// Elements per Q4_0 block.
const Q4_BLOCK: usize = 32;
/// Bytes per Q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_BLOCK_BYTES: usize = 2 + Q4_BLOCK / 2;

/// Symmetric int4 in blocks of 32 as ggml `Q4_0` blocks (`w = d * (q - 8)`), each block's
/// scale `d` searched for the least squared reconstruction error
/// ([`kiln_types::quantize_int4_searched`]). `values.len()` must be a multiple of 32.
pub fn quantize_q4_0_searched(values: &[f32]) -> Vec<u8> {
    let blocks = values.len() / Q4_BLOCK;
    let mut out = vec![0u8; blocks * Q4_BLOCK_BYTES];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(blocks.max(1));
    let per_thread = blocks.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (src, dst) in values
            .chunks(per_thread * Q4_BLOCK)
            .zip(out.chunks_mut(per_thread * Q4_BLOCK_BYTES))
        {
            scope.spawn(move || {
                for (x, y) in src
                    .chunks_exact(Q4_BLOCK)
                    .zip(dst.chunks_exact_mut(Q4_BLOCK_BYTES))
                {
                    let mut codes = [8u8; Q4_BLOCK];
                    let d = kiln_types::quantize_int4_searched(x, &mut codes);
                    y[..2].copy_from_slice(&ggml::f32_to_f16(d).to_le_bytes());
                    for j in 0..Q4_BLOCK / 2 {
                        y[2 + j] = codes[j] | (codes[j + Q4_BLOCK / 2] << 4);
                    }
                }
            });
        }
    });
    out
}
