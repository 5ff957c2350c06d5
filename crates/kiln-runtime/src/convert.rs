//! Conversion of a GGUF file or Hugging Face folder into a kiln package, optionally changing
//! the weights' format on the way.
//!
//! Every tensor is stored in a ggml block format, so the runtime's kernels for that format
//! read it in place: `keep` copies the source's blocks byte for byte (the package runs
//! exactly as the GGUF does), `f32`/`f16`/`bf16` store those float types, and `int4-block32`
//! stores symmetric int4 in blocks of 32 as ggml `Q4_0` blocks (`w = d * (q - 8)`, one f16
//! scale per block), which the integer kernels run at full speed.
//!
//! The int4 scale of each block is chosen by a small search for the least squared error
//! rather than from the largest weight alone (ggml's reference rounding), which matters most
//! when the source is itself quantized.
//!
//! Protected tensors — 1-D vectors (norms, biases), and by default the embedding and output
//! matrices — are never stored below their source precision: when the target has fewer bits
//! per weight than the source they are copied as they are.
//!
//! With `fp16_safe`, the weights are first made fp16-safe ([`crate::fp16_fix`]): the tensors
//! that write into the residual stream are divided by a power of two before any format change,
//! the model description records the matching embedding scale and norm epsilon, and the fix
//! goes into the manifest's `conversion.fp16`.

use crate::error::ModelError;
use crate::fp16_fix::{self, Fp16Fix};
use crate::model::Model;
use crate::weights::{GgufSource, TensorSource};
use crate::{arch, hf, package};
use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::GgufFile;
use kiln_format::package::{
    sha256_file, Conversion, FileHash, Manifest, PackageWriter, SourceInfo, TensorQuality,
};
use kiln_format::quant::{cosine, snr_db};
use kiln_format::safetensors::ShardedSafetensors;
use kiln_tokenizer::TokenizerSpec;
use serde_json::Value;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

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
    /// Symmetric int4 in blocks of 32 input channels with an f16 scale (ggml `Q4_0`).
    Int4Block32,
}

impl QuantTarget {
    /// Every target, in the order the command line lists them.
    pub const ALL: [QuantTarget; 5] = [
        QuantTarget::Keep,
        QuantTarget::F32,
        QuantTarget::F16,
        QuantTarget::Bf16,
        QuantTarget::Int4Block32,
    ];

    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            QuantTarget::Keep => "keep",
            QuantTarget::F32 => "f32",
            QuantTarget::F16 => "f16",
            QuantTarget::Bf16 => "bf16",
            QuantTarget::Int4Block32 => "int4-block32",
        }
    }

    /// The ggml type a tensor becomes, `None` for [`QuantTarget::Keep`].
    pub fn ggml_type(self) -> Option<GgmlType> {
        match self {
            QuantTarget::Keep => None,
            QuantTarget::F32 => Some(GgmlType::F32),
            QuantTarget::F16 => Some(GgmlType::F16),
            QuantTarget::Bf16 => Some(GgmlType::BF16),
            QuantTarget::Int4Block32 => Some(GgmlType::Q4_0),
        }
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

/// The tensors kept at source precision unless the caller names others.
pub const DEFAULT_KEEP: [&str; 2] = ["token_embd.weight", "output.weight"];

/// Settings of a conversion.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The weight format to store.
    pub quant: QuantTarget,
    /// Tensors never stored below their source precision (besides 1-D vectors).
    pub keep: Vec<String>,
    /// The shard size cap in bytes.
    pub max_shard_bytes: u64,
    /// Apply the fp16 range fix ([`crate::fp16_fix`]), calibrated on
    /// [`crate::validate::DEFAULT_PROMPTS`].
    pub fp16_safe: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quant: QuantTarget::Keep,
            keep: DEFAULT_KEEP.iter().map(|s| s.to_string()).collect(),
            max_shard_bytes: kiln_format::package::DEFAULT_MAX_SHARD_BYTES,
            fp16_safe: false,
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
    pub from: GgmlType,
    /// The stored format.
    pub to: GgmlType,
    /// Bytes stored.
    pub bytes: u64,
    /// Reconstruction quality against the source values, when the format changed.
    pub quality: Option<TensorQuality>,
    /// Why a tensor was left in its source format although the target differs.
    pub kept_because: Option<&'static str>,
}

/// The result of a conversion.
pub struct ConvertReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Per tensor, in write order.
    pub tensors: Vec<TensorOutcome>,
    /// The fp16 range fix applied, with `fp16_safe`.
    pub fp16: Option<Fp16Fix>,
}

/// Bits per weight of a ggml type.
fn bits_per_weight(t: GgmlType) -> f64 {
    (t.block_bytes() * 8) as f64 / t.block_len() as f64
}

fn is_vector(dims: &[u64]) -> bool {
    dims.iter().filter(|&&d| d != 1).count() <= 1
}

/// The source model, opened.
struct Source {
    config: crate::config::ModelConfig,
    tensors: Box<dyn TensorSource>,
    format: &'static str,
    hashes: Vec<FileHash>,
    tokenizer: Value,
    chat_template: Option<String>,
    /// Hugging Face tokenizer files to carry over: (name, contents).
    files: Vec<(String, Vec<u8>)>,
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
        tensors: Box::new(GgufSource(file)),
        format: "gguf",
        hashes,
        tokenizer,
        chat_template,
        files: Vec::new(),
    })
}

/// Converts the model at `src` (GGUF file or Hugging Face folder) into a package at `out`.
/// `on_tensor` is called after each tensor is written, with its outcome and the count done
/// and total. Nothing appears at `out` unless the whole conversion succeeds.
pub fn convert(
    src: &Path,
    out: &Path,
    options: &ConvertOptions,
    on_tensor: &mut dyn FnMut(&TensorOutcome, usize, usize),
) -> Result<ConvertReport, ModelError> {
    let source = open_source(src)?;
    // Refuse what the runtime could not run before spending time on it.
    Model::from_source(source.config.clone(), source.tensors.as_ref())?;
    let safe = if options.fp16_safe {
        Some(make_fp16_safe(src, &source)?)
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
    let names = tensors.names();
    let mut outcomes = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let outcome = convert_tensor(tensors, name, options, &mut writer)?;
        on_tensor(&outcome, i + 1, names.len());
        outcomes.push(outcome);
    }
    let manifest = Manifest {
        format: String::new(),
        format_version: 0,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        architecture: source.config.architecture.clone(),
        config: config_json,
        tokenizer: source.tokenizer,
        chat_template: source.chat_template,
        source: SourceInfo {
            path: src.display().to_string(),
            format: source.format.to_string(),
            sha256: source.hashes,
        },
        conversion: Conversion {
            quant: options.quant.name().to_string(),
            keep: options.keep.clone(),
            max_shard_bytes: options.max_shard_bytes,
            fp16: fp16_json,
        },
        alignment: 0,
        shards: Vec::new(),
        files: Vec::new(),
        tensors: Vec::new(),
    };
    let manifest = writer.finish(manifest)?;
    Ok(ConvertReport {
        manifest,
        tensors: outcomes,
        fp16,
    })
}

/// Calibrates the fp16 fix on the built-in prompts, tokenized by the source's own tokenizer.
fn make_fp16_safe<'a>(
    src: &Path,
    source: &'a Source,
) -> Result<fp16_fix::SafeModel<'a>, ModelError> {
    let no_tokenizer = || {
        ModelError::Request(format!(
            "{}: --fp16-safe calibrates on text prompts, but the model has no tokenizer",
            src.display()
        ))
    };
    let tokenizer = match source.format {
        "hf" if src.join(hf::TOKENIZER_FILE).is_file() => kiln_tokenizer::Tokenizer::from_hf(src),
        "gguf" if !source.tokenizer.is_null() => {
            kiln_tokenizer::Tokenizer::from_gguf(&GgufFile::open(src)?)
        }
        _ => return Err(no_tokenizer()),
    }
    .map_err(|e| ModelError::bad(src, format!("tokenizer: {e}")))?;
    let prompts = crate::validate::DEFAULT_PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::bad(src, format!("tokenizer: {e}")))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = crate::pool::ThreadPool::new(threads);
    fp16_fix::make_safe(&source.config, source.tensors.as_ref(), &pool, &prompts)
}

fn convert_tensor(
    source: &dyn TensorSource,
    name: &str,
    options: &ConvertOptions,
    writer: &mut PackageWriter,
) -> Result<TensorOutcome, ModelError> {
    let t = crate::weights::require(source, name)?;
    let data = crate::weights::tensor_data(source, name, &t)?;
    let from = t.format;
    let mut target = options.quant.ggml_type().unwrap_or(from);
    let mut kept_because = None;
    let protected = is_vector(&t.dims) || options.keep.iter().any(|k| k == name);
    if target != from && protected && bits_per_weight(target) < bits_per_weight(from) {
        kept_because = Some("kept at source precision");
        target = from;
    }
    let row = t.dims.first().copied().unwrap_or(1) as usize;
    if target != from && row % target.block_len() != 0 {
        kept_because = Some("row length is not a whole number of blocks");
        target = from;
    }
    let (bytes, quality) = if target == from {
        writer.add_tensor(name, &t.dims, from, data, None)?;
        (data.len() as u64, None)
    } else {
        let values = dequantized(source, name, from, data, t.n_elements())?;
        let stored = if target == GgmlType::Q4_0 {
            quantize_q4_0_searched(&values)
        } else {
            ggml::quantize(target, &values)
                .map_err(|e| ModelError::bad(source.origin(), format!("tensor '{name}': {e}")))?
        };
        let mut back = vec![0.0f32; values.len()];
        ggml::dequantize(target, &stored, &mut back)
            .map_err(|e| ModelError::bad(source.origin(), format!("tensor '{name}': {e}")))?;
        let snr = snr_db(&values, &back);
        let quality = TensorQuality {
            scheme: options.quant.name().to_string(),
            snr_db: snr.is_finite().then_some(snr),
            cosine: cosine(&values, &back),
        };
        writer.add_tensor(name, &t.dims, target, &stored, Some(quality.clone()))?;
        (stored.len() as u64, Some(quality))
    };
    Ok(TensorOutcome {
        name: name.to_string(),
        shape: t.dims.clone(),
        from,
        to: target,
        bytes,
        quality,
        kept_because,
    })
}

fn dequantized(
    source: &dyn TensorSource,
    name: &str,
    format: GgmlType,
    data: &[u8],
    n: u64,
) -> Result<Vec<f32>, ModelError> {
    let n = usize::try_from(n)
        .map_err(|_| ModelError::bad(source.origin(), format!("tensor '{name}' is too large")))?;
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
/// scale `d` searched for the least squared reconstruction error. `values.len()` must be a
/// multiple of 32.
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
                    q4_0_block(x, y);
                }
            });
        }
    });
    out
}

/// Codes of `x` for scale `d`, and the squared error of the reconstruction.
fn q4_0_codes(x: &[f32], d: f32, codes: &mut [u8; Q4_BLOCK]) -> f32 {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0f32;
    for (c, &v) in codes.iter_mut().zip(x) {
        // Adding and removing 1.5 * 2^23 rounds to nearest (|v * inv| is far below 2^22)
        // without a library call, so the loop vectorises.
        let q = ((v * inv + 12_582_912.0) - 12_582_912.0).clamp(-8.0, 7.0);
        *c = (q + 8.0) as u8;
        let e = v - d * q;
        err += e * e;
    }
    err
}

fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let mut best = [8u8; Q4_BLOCK];
    let mut best_d = 0.0f32;
    if max != 0.0 {
        let mut best_err = f32::INFINITY;
        let mut codes = [0u8; Q4_BLOCK];
        // The reference scale maps the largest weight to -8; smaller divisors clip it, larger
        // ones spend fewer steps on it. Each candidate is tried as f16 stores it, then refitted
        // by least squares for its codes.
        for step in 0..=12 {
            let divisor = -(6.5 + step as f32 * 0.25);
            let d = ggml::f16_to_f32(ggml::f32_to_f16(max / divisor));
            let err = q4_0_codes(x, d, &mut codes);
            if err < best_err {
                best_err = err;
                best_d = d;
                best = codes;
            }
            let (mut xq, mut qq) = (0.0f32, 0.0f32);
            for (&c, &v) in codes.iter().zip(x) {
                let q = c as f32 - 8.0;
                xq += v * q;
                qq += q * q;
            }
            if qq > 0.0 {
                let d = ggml::f16_to_f32(ggml::f32_to_f16(xq / qq));
                let err = q4_0_codes(x, d, &mut codes);
                if err < best_err {
                    best_err = err;
                    best_d = d;
                    best = codes;
                }
            }
        }
    }
    y[..2].copy_from_slice(&ggml::f32_to_f16(best_d).to_le_bytes());
    for j in 0..Q4_BLOCK / 2 {
        y[2 + j] = best[j] | (best[j + Q4_BLOCK / 2] << 4);
    }
}
