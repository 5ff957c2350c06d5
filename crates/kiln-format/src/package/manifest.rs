//! `manifest.json`: what a package holds and how to check it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "kiln-package";
/// The package format this code writes (and the newest it reads). Version 2 stores `I8_CH`
/// tensors with every row's codes first and the row scales after them (version 1: each row's
/// scale before its codes); nothing else changed.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest package format this code reads: version 1 packages load unless they hold
/// `I8_CH` tensors, which are refused with a request to convert again.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The first version whose `I8_CH` tensors have the codes-first layout.
pub const I8_CH_CODES_FIRST_VERSION: u32 = 2;

/// The whole manifest of a package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`]: tells a kiln manifest from any other `manifest.json`.
    pub format: String,
    /// The manifest layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The version of kiln that wrote the package.
    pub kiln_version: String,
    /// The model family (`llama`, `gemma3`, …), as GGUF's `general.architecture` names it.
    pub architecture: String,
    /// The model description, as the runtime defines it; not interpreted here.
    pub config: Value,
    /// The tokenizer, as the runtime defines it (`null` when the source had none).
    #[serde(default)]
    pub tokenizer: Value,
    /// The chat template the source carried, if any.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Where the weights came from.
    pub source: SourceInfo,
    /// How they were converted.
    pub conversion: Conversion,
    /// Alignment of tensor data within shards, in bytes ([`super::ALIGNMENT`]).
    pub alignment: u64,
    /// The shard files, in order.
    pub shards: Vec<ShardEntry>,
    /// Other files of the package (e.g. `tokenizer.json`), checked like shards.
    #[serde(default)]
    pub files: Vec<ShardEntry>,
    /// Every tensor, in the order written.
    pub tensors: Vec<TensorEntry>,
}

/// The source model a package was converted from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The path given to the converter, for people; never used to find anything.
    pub path: String,
    /// `gguf` or `hf` (a Hugging Face folder).
    pub format: String,
    /// sha256 of the source file (GGUF), or of its weight files in order (Hugging Face
    /// folders, one entry per file), lowercase hex.
    pub sha256: Vec<FileHash>,
}

/// A file's name and sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileHash {
    /// File name.
    pub file: String,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// The settings a package was converted with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    /// The `--quant` setting (`keep`, `f16`, `int4-block32`, …).
    pub quant: String,
    /// Tensors kept at their source precision by request.
    pub keep: Vec<String>,
    /// The shard size cap, in bytes.
    pub max_shard_bytes: u64,
    /// The fp16 range fix the weights carry (`kiln convert --fp16-safe`), as the runtime
    /// describes it; absent when none was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16: Option<Value>,
    /// The text the lookup tables' k-means was weighted by (`kiln convert --calibration`);
    /// absent when the tables were learned without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationInfo>,
}

/// The calibration text of a conversion: each weight's error in the k-means of a lookup table
/// counted by the mean square of its input channel's activations over this text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// The text file's name (no directories).
    pub file: String,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Tokens of the text the model was run over (the text's first tokens, bounded).
    pub tokens: u64,
    /// Positions per forward pass: the tokens were run in chunks of this many, each from an
    /// empty context.
    pub chunk_tokens: u64,
    /// Whether each table's indices were chosen with error feedback on the inputs' second
    /// moments (`kiln_format::quant::feedback`) rather than as each weight's nearest entry.
    /// Absent (false) in packages written before it existed.
    #[serde(default)]
    pub error_feedback: bool,
}

/// One file of a package with its size and hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the package folder (no directories).
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the whole file, lowercase hex.
    pub sha256: String,
}

/// One tensor: where its bytes are and what they mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Canonical (GGUF) name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `shape[0]` is the contiguous row length.
    pub shape: Vec<u64>,
    /// The ggml block type name (`F32`, `F16`, `BF16`, `Q4_0`, `Q4_K`, …).
    pub format: String,
    /// The shard file holding the data.
    pub shard: String,
    /// Offset of the data in the shard, a multiple of the alignment.
    pub offset: u64,
    /// Length of the data in bytes: exactly what the shape takes in the format.
    pub length: u64,
    /// How close a quantized tensor is to its source, when the converter quantized it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<TensorQuality>,
}

/// Reconstruction quality of a converted tensor against its source values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorQuality {
    /// The scheme the tensor was converted with (`int4-block32`, `f16`, …).
    pub scheme: String,
    /// Signal-to-noise ratio in dB; `null` for an exact reconstruction (infinite SNR).
    pub snr_db: Option<f64>,
    /// Cosine similarity with the source values.
    pub cosine: f64,
}
