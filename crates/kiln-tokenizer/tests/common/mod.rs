//! Locating and loading the real models and reference outputs shared by the integration tests.
//! A missing file is a failure with instructions, never a skipped test.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_format::gguf::GgufFile;
use kiln_tokenizer::Tokenizer;

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_path(name: &str) -> PathBuf {
    let path = manifest_dir().join("../../models").join(name);
    assert!(
        path.is_file(),
        "model file {} is missing: run scripts/fetch-models from the repository root",
        path.display()
    );
    path
}

pub fn reference_path(rel: &str) -> PathBuf {
    let path = manifest_dir().join("../../../shared/reference").join(rel);
    assert!(
        path.exists(),
        "reference file {} is missing (expected the shared reference outputs beside the \
         repository, at ../shared/reference)",
        path.display()
    );
    path
}

pub fn reference_json(rel: &str) -> serde_json::Value {
    let path = reference_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn reference_text(rel: &str) -> String {
    let path = reference_path(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub struct Model {
    pub tokenizer: Tokenizer,
    pub architecture: String,
}

fn load(name: &str) -> Model {
    let path = model_path(name);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tokenizer =
        Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Model {
        tokenizer,
        architecture: file.architecture().expect("architecture").to_owned(),
    }
}

pub fn smollm2() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(SMOLLM2_FILE))
}

pub fn gemma3() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(GEMMA3_FILE))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}
