//! Checks against the two real models kiln is developed with (fetched by
//! `scripts/fetch-models`). These tests fail, rather than skip, when the models are absent.

use std::path::PathBuf;

use kiln_format::ggml::GgmlType;
use kiln_format::gguf::GgufFile;

fn model(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    assert!(
        path.exists(),
        "model file {} is missing: run scripts/fetch-models first",
        path.display()
    );
    path
}

fn smollm2() -> GgufFile {
    GgufFile::open(model("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("open SmolLM2")
}

fn gemma3() -> GgufFile {
    GgufFile::open(model("gemma-3-270m-q4_k_m.gguf")).expect("open Gemma 3")
}

#[test]
fn smollm2_metadata() {
    let f = smollm2();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.require_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.require_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.require_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.require_u64("llama.attention.head_count_kv").unwrap(), 3);
    let eps = f
        .require_f32("llama.attention.layer_norm_rms_epsilon")
        .unwrap();
    assert!(eps > 0.0 && eps < 1e-3, "{eps}");
    assert_eq!(f.tensors().len(), 272);
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens.len(), 49152);
    let types = f
        .get_i64_array("tokenizer.ggml.token_type")
        .unwrap()
        .unwrap();
    assert_eq!(types.len(), 49152);
    assert!(f.get_str_array("tokenizer.ggml.merges").unwrap().is_some());
    assert_eq!(f.tensors().len(), 272);
    let embd = f.require_tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(f.tensor_data(embd).len() as u64, embd.n_bytes);
    let mut counts = std::collections::HashMap::new();
    for t in f.tensors() {
        *counts.entry(t.ty).or_insert(0) += 1;
    }
    assert_eq!(counts[&GgmlType::Q4_1], 210);
    assert_eq!(counts[&GgmlType::F32], 61);
    assert_eq!(counts[&GgmlType::Q8_0], 1);
    // Wrong-type and missing-key errors name the file and key.
    let e = f.get_str("llama.block_count").unwrap_err().to_string();
    assert!(
        e.contains("SmolLM2") && e.contains("llama.block_count") && e.contains("u32 30"),
        "{e}"
    );
    let e = f.require_u64("llama.no_such_key").unwrap_err().to_string();
    assert!(
        e.contains("missing required metadata key 'llama.no_such_key'"),
        "{e}"
    );
    let e = f
        .require_tensor("blk.99.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensor 'blk.99.ffn_up.weight'"), "{e}");
}

#[test]
fn gemma3_metadata() {
    let f = gemma3();
    assert_eq!(f.architecture().unwrap(), "gemma3");
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(
        f.require_u64("gemma3.attention.sliding_window").unwrap(),
        512
    );
    assert_eq!(f.require_u64("gemma3.block_count").unwrap(), 18);
    assert_eq!(f.require_u64("gemma3.embedding_length").unwrap(), 640);
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens.len(), 262144);
    let scores = f.get_f32_array("tokenizer.ggml.scores").unwrap().unwrap();
    assert_eq!(scores.len(), 262144);
    let mut counts = std::collections::HashMap::new();
    for t in f.tensors() {
        *counts.entry(t.ty).or_insert(0) += 1;
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(t.offset % f.alignment(), 0);
    }
    assert_eq!(counts[&GgmlType::F32], 109);
    assert_eq!(counts[&GgmlType::Q5_0], 81);
    assert_eq!(counts[&GgmlType::Q4_K], 27);
    assert_eq!(counts[&GgmlType::Q8_0], 10);
    assert_eq!(counts[&GgmlType::Q6_K], 9);
}
