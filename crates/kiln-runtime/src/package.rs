//! kiln packages (`NAME.kiln/`, see [`kiln_format::package`]) as a model source: the model
//! description and tokenizer come from the manifest, the weights are read in place from the
//! mapped shards.
//!
//! What the runtime puts in the manifest's opaque fields:
//! - `config`: the [`ModelConfig`], serialized field by field.
//! - `tokenizer`: `null` (no tokenizer: the model runs on token ids), or
//!   `{"kind": "gguf", "spec": TokenizerSpec}` (the GGUF tokenizer metadata; its chat template
//!   is the manifest's `chat_template`), or `{"kind": "hf", "files": [...]}` (Hugging Face
//!   tokenizer files stored in the package and listed in its `files`).

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::model::Model;
use crate::weights::{TensorRef, TensorSource, WeightStorage};
use kiln_format::package::{Package, PackageFile, Verify};
use kiln_tokenizer::{Tokenizer, TokenizerError, TokenizerSpec};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use kiln_format::package::is_package;

static VERIFY_ON_OPEN: AtomicBool = AtomicBool::new(true);

/// Sets whether [`Model::load`] and [`crate::bundle::ModelBundle::open`] check every shard's
/// sha256 when they open a package (default: yes). A command line's `--no-verify` turns it off
/// for the whole process; library callers wanting a choice per call use [`open`].
pub fn set_verify_on_open(verify: bool) {
    VERIFY_ON_OPEN.store(verify, Ordering::Relaxed);
}

/// The current setting of [`set_verify_on_open`].
pub fn verify_on_open() -> Verify {
    if VERIFY_ON_OPEN.load(Ordering::Relaxed) {
        Verify::Full
    } else {
        Verify::StructureOnly
    }
}

impl WeightStorage for PackageFile {
    fn bytes(&self) -> &[u8] {
        PackageFile::bytes(self)
    }

    fn release(&self, range: std::ops::Range<usize>) {
        self.release_range(range);
    }

    fn releases(&self) -> bool {
        true
    }
}

/// The tensors of an open package.
pub struct PackageSource {
    package: Arc<Package>,
}

impl PackageSource {
    /// A source over `package`'s tensors.
    pub fn new(package: Arc<Package>) -> PackageSource {
        PackageSource { package }
    }
}

impl TensorSource for PackageSource {
    fn origin(&self) -> &Path {
        self.package.dir()
    }

    fn tensor(&self, name: &str) -> Option<TensorRef> {
        let t = self.package.tensor(name)?;
        Some(TensorRef {
            storage: t.shard as Arc<dyn WeightStorage>,
            offset: t.offset,
            dims: t.shape,
            format: t.format,
        })
    }

    fn names(&self) -> Vec<String> {
        self.package.names()
    }

    fn describe(&self, name: &str) -> String {
        match self
            .package
            .manifest()
            .tensors
            .iter()
            .find(|t| t.name == name)
        {
            Some(t) => format!("'{name}' (in shard {})", t.shard),
            None => format!("'{name}'"),
        }
    }
}

/// Opens and checks the package folder at `path` (see [`Package::open`]).
pub fn open(path: &Path, verify: Verify) -> Result<Arc<Package>, ModelError> {
    Ok(Arc::new(Package::open(path, verify)?))
}

/// The model description a package's manifest carries, checked for the relations the
/// forward pass relies on.
pub fn config(package: &Package) -> Result<ModelConfig, ModelError> {
    let manifest = package.manifest();
    let origin = package.dir().join(kiln_format::package::MANIFEST_FILE);
    let config: ModelConfig = serde_json::from_value(manifest.config.clone())
        .map_err(|e| ModelError::bad(&origin, format!("'config': {e}")))?;
    if config.architecture != manifest.architecture {
        return Err(ModelError::bad(
            &origin,
            format!(
                "'config' describes a {} model, but 'architecture' is {}",
                config.architecture, manifest.architecture
            ),
        ));
    }
    if !crate::arch::SUPPORTED.contains(&config.architecture.as_str()) {
        return Err(ModelError::unsupported(
            &origin,
            format!(
                "architecture '{}' is not supported (supported: {})",
                config.architecture,
                crate::arch::SUPPORTED.join(", ")
            ),
        ));
    }
    let counts = [
        ("n_layers", config.n_layers),
        ("n_embd", config.n_embd),
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.n_kv_heads),
        ("head_dim", config.head_dim),
        ("n_ff", config.n_ff),
        ("vocab_size", config.vocab_size),
        ("context_length", config.context_length),
    ];
    if let Some((key, _)) = counts.iter().find(|(_, v)| *v == 0) {
        return Err(ModelError::bad(&origin, format!("'config.{key}' is 0")));
    }
    if config.layers.len() != config.n_layers {
        return Err(ModelError::bad(
            &origin,
            format!(
                "'config.layers' has {} entries for {} layers",
                config.layers.len(),
                config.n_layers
            ),
        ));
    }
    if let Some(f) = &config.rope_freq_factors {
        if f.len() != config.rope_dim / 2 {
            return Err(ModelError::bad(
                &origin,
                format!(
                    "'config.rope_freq_factors' has {} entries, expected {}",
                    f.len(),
                    config.rope_dim / 2
                ),
            ));
        }
    }
    let names = crate::arch::SizeNames {
        hidden: "config.n_embd",
        heads: "config.n_heads",
        kv_heads: "config.n_kv_heads",
        rms_eps: "config.rms_eps",
    };
    crate::arch::check_shapes(&origin, &config, &names)?;
    Ok(config)
}

/// Loads the model of the package at `path`, checking shard hashes as `verify` says.
pub fn load_model(path: &Path, verify: Verify) -> Result<(Model, Arc<Package>), ModelError> {
    let package = open(path, verify)?;
    let config = config(&package)?;
    let model = Model::from_source(config, &PackageSource::new(Arc::clone(&package)))?;
    Ok((model, package))
}

/// The tokenizer a package carries, `None` when it has none.
pub fn tokenizer(package: &Package) -> Result<Option<Tokenizer>, TokenizerError> {
    let manifest = package.manifest();
    let value = &manifest.tokenizer;
    if value.is_null() {
        return Ok(None);
    }
    let bad = |m: &str| TokenizerError::Invalid(format!("manifest 'tokenizer': {m}"));
    match value.get("kind").and_then(Value::as_str) {
        Some("gguf") => {
            let spec = value.get("spec").ok_or_else(|| bad("no 'spec'"))?;
            let mut spec: TokenizerSpec =
                serde_json::from_value(spec.clone()).map_err(|e| bad(&e.to_string()))?;
            spec.chat_template = manifest.chat_template.clone();
            Tokenizer::from_spec(spec).map(Some)
        }
        Some("hf") => {
            let listed = manifest
                .files
                .iter()
                .any(|f| f.file == HF_TOKENIZER_FILES[0]);
            if !listed {
                return Err(bad("kind 'hf' but the package lists no tokenizer.json"));
            }
            Tokenizer::from_hf(package.dir()).map(Some)
        }
        Some(other) => Err(bad(&format!("unknown kind '{other}'"))),
        None => Err(bad("no 'kind'")),
    }
}

/// The Hugging Face tokenizer files a package may carry (the first is required).
pub const HF_TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The manifest `tokenizer` value of a GGUF tokenizer (its chat template goes in the
/// manifest's `chat_template`).
pub fn gguf_tokenizer_value(spec: &TokenizerSpec) -> Value {
    let mut spec = spec.clone();
    spec.chat_template = None;
    json!({ "kind": "gguf", "spec": spec })
}

/// The manifest `tokenizer` value of Hugging Face tokenizer files stored in the package.
pub fn hf_tokenizer_value(files: &[String]) -> Value {
    json!({ "kind": "hf", "files": files })
}

/// The path of a package's manifest, for messages.
pub fn manifest_path(dir: &Path) -> std::path::PathBuf {
    dir.join(kiln_format::package::MANIFEST_FILE)
}
