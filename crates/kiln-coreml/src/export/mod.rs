//! Exporting models to Core ML ML Program packages.
//!
//! - [`BlobWriter`] writes weight files (blob storage format version 2);
//! - [`PackageWriter`] lays out `Manifest.json`, `Data/com.apple.CoreML/model.mlmodel` and
//!   `weights/weight.bin`, and moves the package into place only once it is complete;
//! - [`ProgramBuilder`] builds a typed MIL program (specification version 9, opset
//!   `CoreML8`) and derives the model description from the function signature;
//! - [`WeightFormat`] stores matrices as fp16 or compressed (`constexpr_blockwise_shift_scale`,
//!   `constexpr_lut_to_dense`), as coremltools 9 does;
//! - [`export_model`] turns a loaded Llama-family or Gemma 3 [`kiln_runtime::Model`] into one
//!   stateful package, or several over layer ranges when the weights exceed
//!   [`ExportOptions::max_chunk_bytes`], with a sidecar `kiln.json` describing them;
//!   [`export_path`] does the same from a GGUF file, Hugging Face folder or kiln package,
//!   adding its tokenizer, chat template and sha256 to the metadata.
//!
//! The interface of the packages is documented in [`decoder`]. What is exported can be
//! checked with this crate's own reader: [`crate::MlPackage::verify`] and [`crate::Executor`].

mod blob_writer;
pub mod decoder;
mod gemma3;
mod llama;
mod mil;
mod package_writer;
mod weights;

pub use blob_writer::{BlobType, BlobWriter};
pub use decoder::ChunkSpec;
pub use mil::{Arg, InputDim, ProgramBuilder, Var, OPSET, SPECIFICATION_VERSION, WEIGHT_FILE};
pub use package_writer::PackageWriter;
pub use weights::{WeightFormat, INT4_BLOCK};

use crate::proto;
pub use kiln_runtime::fp16::GraphFix;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The widest tensor dimension the Neural Engine takes; LM heads are split below it.
pub const MAX_ANE_DIMENSION: usize = 16384;

/// Default limit of one package's weight file: single weight files over ~1 GB fail to load
/// on iPhones.
pub const DEFAULT_MAX_CHUNK_BYTES: u64 = 950 * 1_000_000;

/// Name of the sidecar description written next to the package(s).
pub const SIDECAR: &str = "kiln.json";

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The source model could not be loaded.
    #[error("{0}")]
    Load(#[from] kiln_runtime::ModelError),
    /// The model uses a feature the exporter does not build yet.
    #[error("{0}")]
    Unsupported(String),
    /// The request or the model is inconsistent (options out of range, odd shapes).
    #[error("{0}")]
    Invalid(String),
    /// The program under construction is inconsistent: a defect of the exporter.
    #[error("building the ML Program: {0}")]
    Build(String),
}

impl ExportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where RMSNorm's statistics are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Square, mean and rsqrt in fp32, everything else fp16 (the default: real models'
    /// residual streams square beyond fp16's range).
    Mixed,
    /// Everything in fp16.
    Fp16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Mixed => "mixed",
            Precision::Fp16 => "fp16",
        })
    }
}

/// What the last package returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `logits`: fp16 `[1, q, vocab]`.
    Logits,
    /// `next_token`: int32 `[1, q]`, the arg max of the logits.
    Argmax,
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputKind::Logits => "logits",
            OutputKind::Argmax => "argmax",
        })
    }
}

/// How the LM head's matrix product is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadSplit {
    /// In pieces of at most [`MAX_ANE_DIMENSION`] rows when the vocabulary is larger.
    Auto,
    /// In this many pieces of (nearly) equal rows, concatenated; 1 leaves it whole.
    Pieces(usize),
}

/// What to export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    /// Positions the key/value caches hold (the largest `past + q`).
    pub context: usize,
    /// The smallest and largest number of tokens one call takes (`input_ids` is
    /// `[1, min..=max]`; equal bounds make it a fixed shape).
    pub query: (usize, usize),
    /// How weight matrices are stored.
    pub weights: WeightFormat,
    /// Where RMSNorm's statistics are computed.
    pub precision: Precision,
    /// Logits or the arg max.
    pub output: OutputKind,
    /// How the LM head is cut.
    pub lm_head_split: HeadSplit,
    /// The largest weight file of one package, in bytes; larger models are cut into
    /// packages over layer ranges.
    pub max_chunk_bytes: u64,
    /// What the program computes differently so that it stays in fp16 range, as
    /// `kiln convert --fp16-safe` recorded it in the source package ([`export_model`] reads
    /// it from there): the RMSNorms it names are computed max-scaled under
    /// [`Precision::Fp16`], and with their statistics in fp32 when listed as fp32 ops.
    pub fp16_graph: GraphFix,
}

impl Default for ExportOptions {
    fn default() -> ExportOptions {
        ExportOptions {
            context: 512,
            query: (1, 64),
            weights: WeightFormat::Fp16,
            precision: Precision::Mixed,
            output: OutputKind::Logits,
            lm_head_split: HeadSplit::Auto,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            fp16_graph: GraphFix::default(),
        }
    }
}

impl ExportOptions {
    /// The number of pieces the LM head of a `vocab`-token model is cut into.
    pub fn head_pieces(&self, vocab: usize) -> usize {
        match self.lm_head_split {
            HeadSplit::Auto => vocab.div_ceil(MAX_ANE_DIMENSION).max(1),
            HeadSplit::Pieces(n) => n.clamp(1, vocab.max(1)),
        }
    }
}

/// What the source carries beyond its weights, recorded in the metadata and the sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceInfo {
    /// sha256 of the source file (for a folder: of the `sha256sum`-style listing of its
    /// files' hashes).
    pub sha256: Option<String>,
    /// The tokenizer as a Hugging Face `tokenizer.json`, when it has that form.
    pub tokenizer_json: Option<String>,
    /// The chat template (Jinja source).
    pub chat_template: Option<String>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
    /// Tokens that end a generation.
    pub stop_token_ids: Vec<u32>,
    /// Whether prompts start with the BOS token.
    pub add_bos: bool,
}

/// One package an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageSummary {
    /// The package.
    pub path: PathBuf,
    /// The transformer blocks it runs.
    pub layers: Range<usize>,
    /// Whether it takes token ids.
    pub embedding: bool,
    /// Whether it ends in the LM head.
    pub head: bool,
    /// Size of its weight file.
    pub weight_bytes: u64,
    /// sha256 of its weight file.
    pub weight_sha256: String,
    /// Blobs in the weight file.
    pub blobs: usize,
    /// Operations in the program, constants included.
    pub ops: usize,
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// The packages, in the order a call runs them.
    pub packages: Vec<PackageSummary>,
    /// The sidecar description.
    pub sidecar: PathBuf,
    /// Positions the caches hold.
    pub context: usize,
    /// The smallest and largest query length.
    pub query: (usize, usize),
    /// Pieces of the LM head.
    pub head_pieces: usize,
}

impl ExportSummary {
    /// The first (or only) package.
    pub fn path(&self) -> &Path {
        &self.packages[0].path
    }

    /// Bytes of all weight files.
    pub fn weight_bytes(&self) -> u64 {
        self.packages.iter().map(|p| p.weight_bytes).sum()
    }
}

/// Loads the model at `src` (a GGUF file, Hugging Face folder or kiln package) with its
/// tokenizer and exports it to `dest`.
pub fn export_path(
    src: &Path,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    let bundle = kiln_runtime::bundle::ModelBundle::open(src).map_err(|e| match e {
        kiln_runtime::bundle::BundleError::Model(m) => ExportError::Load(m),
        other => ExportError::Invalid(other.to_string()),
    })?;
    let mut info = SourceInfo {
        sha256: Some(source_sha256(src)?),
        chat_template: bundle
            .chat_template
            .as_ref()
            .map(|t| t.source().to_string()),
        ..SourceInfo::default()
    };
    if let Some(t) = &bundle.tokenizer {
        info.bos_token_id = t.bos_id();
        info.eos_token_id = t.eos_id();
        info.stop_token_ids = t.stop_ids();
        info.add_bos = t.add_bos();
        info.tokenizer_json = tokenizer_json(t);
    }
    export_model(&bundle.model, dest, opts, &info)
}

/// The tokenizer as `tokenizer.json` text, written through a scratch folder; `None` for
/// vocabularies without an exact `tokenizer.json` form.
fn tokenizer_json(t: &kiln_tokenizer::Tokenizer) -> Option<String> {
    static SCRATCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-tokenizer-{}-{n}", std::process::id()));
    let text = t
        .save_hf(&dir)
        .ok()
        .and_then(|_| std::fs::read_to_string(dir.join("tokenizer.json")).ok());
    let _ = std::fs::remove_dir_all(&dir);
    text
}

/// sha256 of a file, or of the sorted `sha256  name` lines of a folder's files.
fn source_sha256(src: &Path) -> Result<String, ExportError> {
    let hash = |p: &Path| {
        kiln_format::package::sha256_file(p).map_err(|e| ExportError::Invalid(e.to_string()))
    };
    if !src.is_dir() {
        return hash(src);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(|e| ExportError::io(src, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut listing = String::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        listing.push_str(&format!("{}  {}\n", hash(f)?, name.unwrap_or_default()));
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(listing.as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks the model against its family's exporter.
fn check_model(model: &kiln_runtime::Model, opts: &ExportOptions) -> Result<(), ExportError> {
    let c = &model.config;
    match c.architecture.as_str() {
        "gemma3" => gemma3::check(c, opts),
        _ => llama::check(c, opts),
    }?;
    let pieces = opts.head_pieces(c.vocab_size);
    for rows in decoder::head_pieces(c.vocab_size, pieces) {
        opts.weights.check("the LM head", rows.len(), c.n_embd)?;
    }
    if let Some(op) = opts
        .fp16_graph
        .fp32_ops
        .iter()
        .find(|op| !decoder::is_norm(op))
    {
        return Err(ExportError::Invalid(format!(
            "the source's fp16 fix keeps {op} in fp32, which the exported program cannot do (only RMSNorm statistics are computed in fp32)"
        )));
    }
    if opts.max_chunk_bytes == 0 {
        return Err(ExportError::Invalid(
            "--max-chunk-mb must be positive".into(),
        ));
    }
    Ok(())
}

/// Cuts the model into packages whose weights stay under `max` bytes: the embedding in the
/// first, the LM head in the last, layers in order in between.
fn plan_chunks(
    model: &kiln_runtime::Model,
    opts: &ExportOptions,
) -> Result<Vec<ChunkSpec>, ExportError> {
    let c = &model.config;
    let pieces = opts.head_pieces(c.vocab_size);
    let (embed, layers, head) = decoder::part_bytes(model, opts.weights, pieces);
    let shared = model.tied_embeddings && pieces == 1;
    let total: u64 = embed + layers.iter().sum::<u64>() + if shared { 0 } else { head };
    let max = opts.max_chunk_bytes;
    let mb = |b: u64| format!("{:.3} MB", b as f64 / 1e6);
    if total <= max {
        return Ok(vec![ChunkSpec {
            layers: 0..c.n_layers,
            embedding: true,
            head: true,
        }]);
    }
    for (what, bytes) in [("the embedding", embed), ("the LM head", head)]
        .into_iter()
        .chain(layers.iter().map(|&b| ("a layer", b)))
    {
        if bytes > max {
            return Err(ExportError::Invalid(format!(
                "{what} alone takes {} of weights, more than the {} one package may hold (--max-chunk-mb)",
                mb(bytes),
                mb(max)
            )));
        }
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut used = embed;
    let mut embedding = true;
    for (l, &bytes) in layers.iter().enumerate() {
        if used + bytes > max {
            chunks.push(ChunkSpec {
                layers: start..l,
                embedding,
                head: false,
            });
            embedding = false;
            start = l;
            used = 0;
        }
        used += bytes;
    }
    if used + head > max {
        chunks.push(ChunkSpec {
            layers: start..c.n_layers,
            embedding,
            head: false,
        });
        chunks.push(ChunkSpec {
            layers: c.n_layers..c.n_layers,
            embedding: false,
            head: true,
        });
    } else {
        chunks.push(ChunkSpec {
            layers: start..c.n_layers,
            embedding,
            head: true,
        });
    }
    Ok(chunks)
}

/// The path of package `i` of `n`: `dest` itself when alone, else `<stem>-part<i+1>.mlpackage`
/// beside it.
fn chunk_path(dest: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return dest.to_path_buf();
    }
    let stem = dest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dest.with_file_name(format!("{stem}-part{}.mlpackage", i + 1))
}

/// Exports a loaded model to `dest` (see [`decoder`] for the packages' interface): one
/// package, or several (`<stem>-part<i>.mlpackage`) when the weights exceed
/// `opts.max_chunk_bytes`, and `kiln.json` beside them.
pub fn export_model(
    model: &kiln_runtime::Model,
    dest: &Path,
    opts: &ExportOptions,
    source: &SourceInfo,
) -> Result<ExportSummary, ExportError> {
    // A source made fp16-safe says what its graph must compute differently.
    let recorded = kiln_runtime::fp16_fix::of_model_path(&model.origin)
        .map_err(|e| ExportError::Invalid(e.to_string()))?;
    let with_fix;
    let opts = match recorded {
        Some(fix) if opts.fp16_graph == GraphFix::default() => {
            with_fix = ExportOptions {
                fp16_graph: fix.graph,
                ..opts.clone()
            };
            &with_fix
        }
        _ => opts,
    };
    check_model(model, opts)?;
    if dest.extension().is_none_or(|e| e != "mlpackage") {
        return Err(ExportError::Invalid(format!(
            "{}: the output must be named *.mlpackage",
            dest.display()
        )));
    }
    let chunks = plan_chunks(model, opts)?;
    let n = chunks.len();
    let mut packages = Vec::with_capacity(n);
    for (i, chunk) in chunks.iter().enumerate() {
        let path = chunk_path(dest, i, n);
        packages.push(export_chunk(model, &path, opts, source, chunk, (i, n))?);
    }
    let summary = ExportSummary {
        sidecar: dest.with_file_name(SIDECAR),
        packages,
        context: opts.context,
        query: opts.query,
        head_pieces: opts.head_pieces(model.config.vocab_size),
    };
    write_sidecar(model, opts, source, &summary)?;
    Ok(summary)
}

/// Exports a loaded model as [`export_model`] does, without source information (no
/// tokenizer, chat template or sha256 in the metadata).
pub fn export_llama(
    model: &kiln_runtime::Model,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    export_model(model, dest, opts, &SourceInfo::default())
}

fn export_chunk(
    model: &kiln_runtime::Model,
    path: &Path,
    opts: &ExportOptions,
    source: &SourceInfo,
    chunk: &ChunkSpec,
    (i, n): (usize, usize),
) -> Result<PackageSummary, ExportError> {
    let c = &model.config;
    let package = PackageWriter::create(path)?;
    let mut b = ProgramBuilder::new(Some(package.weights()?));
    let outputs = decoder::build(&mut b, model, opts, chunk)?;
    let origin = model
        .origin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut user: Vec<(&str, String)> = vec![
        ("kiln.version", env!("CARGO_PKG_VERSION").to_string()),
        ("kiln.source", origin),
        ("kiln.architecture", c.architecture.clone()),
        ("kiln.context", opts.context.to_string()),
        (
            "kiln.query_length",
            format!("{}-{}", opts.query.0, opts.query.1),
        ),
        ("kiln.weights", opts.weights.to_string()),
        ("kiln.precision", opts.precision.to_string()),
        ("kiln.output", opts.output.to_string()),
        (
            "kiln.lm_head_pieces",
            opts.head_pieces(c.vocab_size).to_string(),
        ),
        (
            "kiln.package",
            format!(
                "{} of {n}: layers {}..{}",
                i + 1,
                chunk.layers.start,
                chunk.layers.end
            ),
        ),
        (
            "kiln.protocol",
            "input_ids int32 [1,q] (or hidden_in fp16 [1,q,hidden]); causal_mask fp16 [1,1,q,past+q] (0 allowed, -inf masked); states keyCache/valueCache carried across calls; see kiln.json".into(),
        ),
    ];
    if let Some(s) = &source.sha256 {
        user.push(("kiln.source_sha256", s.clone()));
    }
    for (k, v) in [
        ("kiln.bos_token_id", source.bos_token_id),
        ("kiln.eos_token_id", source.eos_token_id),
    ] {
        if let Some(v) = v {
            user.push((k, v.to_string()));
        }
    }
    // The tokenizer and chat template once, in the package that takes token ids.
    if chunk.embedding {
        if let Some(t) = &source.tokenizer_json {
            user.push(("kiln.tokenizer_json", t.clone()));
        }
        if let Some(t) = &source.chat_template {
            user.push(("kiln.chat_template", t.clone()));
        }
    }
    let metadata = proto::Metadata {
        short_description: format!("{} exported by kiln", c.architecture),
        version_string: String::new(),
        author: String::new(),
        license: String::new(),
        user_defined: user.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    let refs: Vec<&Var> = outputs.iter().collect();
    let (model_spec, weights) = b.finish(&refs, metadata)?;
    let (weight_bytes, blobs) = match weights {
        Some(w) => {
            let n = w.count();
            (w.finish()?, n)
        }
        None => (0, 0),
    };
    if weight_bytes > opts.max_chunk_bytes {
        return Err(ExportError::Invalid(format!(
            "{}: the weight file would take {weight_bytes} bytes, more than the limit of {}",
            path.display(),
            opts.max_chunk_bytes
        )));
    }
    let ops = match &model_spec.r#type {
        Some(proto::ModelType::MlProgram(p)) => p
            .functions
            .values()
            .flat_map(|f| f.block_specializations.values())
            .map(|blk| blk.operations.len())
            .sum(),
        None => 0,
    };
    let path = package.commit(&model_spec)?;
    let weight_file = path.join("Data/com.apple.CoreML/weights/weight.bin");
    let weight_sha256 = kiln_format::package::sha256_file(&weight_file)
        .map_err(|e| ExportError::Invalid(e.to_string()))?;
    Ok(PackageSummary {
        path,
        layers: chunk.layers.clone(),
        embedding: chunk.embedding,
        head: chunk.head,
        weight_bytes,
        weight_sha256,
        blobs: blobs as usize,
        ops,
    })
}

/// Writes `kiln.json`: what a runtime needs to drive the packages.
fn write_sidecar(
    model: &kiln_runtime::Model,
    opts: &ExportOptions,
    source: &SourceInfo,
    summary: &ExportSummary,
) -> Result<(), ExportError> {
    use decoder::names;
    let c = &model.config;
    let packages: Vec<serde_json::Value> = summary
        .packages
        .iter()
        .map(|p| {
            let n = p.layers.len();
            let mut inputs = vec![if p.embedding {
                names::INPUT_IDS
            } else {
                names::HIDDEN_IN
            }];
            let mut states = Vec::new();
            if n > 0 {
                inputs.push(names::CAUSAL_MASK);
                for s in [names::KEY_CACHE, names::VALUE_CACHE] {
                    states.push(serde_json::json!({
                        "name": s,
                        "dtype": "fp16",
                        "shape": [n, 1, c.n_kv_heads, opts.context, c.head_dim],
                    }));
                }
            }
            let output = if !p.head {
                names::HIDDEN_OUT
            } else if opts.output == OutputKind::Argmax {
                names::NEXT_TOKEN
            } else {
                names::LOGITS
            };
            serde_json::json!({
                "path": p.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                "layers": [p.layers.start, p.layers.end],
                "inputs": inputs,
                "outputs": [output],
                "states": states,
                "weight_bytes": p.weight_bytes,
                "weight_sha256": p.weight_sha256,
            })
        })
        .collect();
    let j = serde_json::json!({
        "format": "kiln-coreml",
        "format_version": 1,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "architecture": c.architecture,
        "source": {
            "file": model.origin.file_name().map(|f| f.to_string_lossy().into_owned()),
            "sha256": source.sha256,
        },
        "context": opts.context,
        "query_length": {"min": opts.query.0, "max": opts.query.1},
        "weights": opts.weights.to_string(),
        "precision": opts.precision.to_string(),
        "output": opts.output.to_string(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "layers": c.n_layers,
        "lm_head_pieces": summary.head_pieces,
        "hidden_scale": decoder::residual_scale(model),
        "mask": "causal_mask is added to the attention scores: fp16 [1, 1, q, past + q], 0 where query i may see position j (j <= past + i), -inf elsewhere; sliding windows are applied inside the program",
        "special_tokens": {
            "bos": source.bos_token_id,
            "eos": source.eos_token_id,
            "stop": source.stop_token_ids,
            "add_bos": source.add_bos,
        },
        "packages": packages,
    });
    let text = serde_json::to_string_pretty(&j).expect("a JSON value serializes");
    let path = &summary.sidecar;
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{SIDECAR}.{}-{n}.tmp", std::process::id()));
    std::fs::write(&tmp, text + "\n").map_err(|e| ExportError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ExportError::io(path, e))
}
