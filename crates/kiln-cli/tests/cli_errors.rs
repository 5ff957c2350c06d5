//! Bad input reaches the user as exit code 2 and a message naming the file and the problem;
//! never a panic.

mod common;
use common::*;

use kiln_format::ggml::GgmlType;
use kiln_format::gguf::{GgufWriter, MetadataValue};
use std::path::PathBuf;
use std::process::Command;

fn tmpdir() -> PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn missing_file_is_bad_input() {
    let out = kiln(&["inspect", "/nonexistent/model.gguf"]);
    assert_bad_input(&out, &["/nonexistent/model.gguf"]);
}

#[test]
fn not_a_gguf_is_bad_input() {
    let p = tmpdir().join("not-a-model.gguf");
    std::fs::write(&p, b"this is not a model file at all, just text").unwrap();
    for cmd in ["inspect", "tokenize"] {
        let mut args = vec![cmd, s(&p)];
        if cmd == "tokenize" {
            args.extend(["--text", "hi"]);
        }
        assert_bad_input(&kiln(&args), &["not-a-model.gguf", "GGUF"]);
    }
}

#[test]
fn truncated_real_model_is_bad_input() {
    let bytes = std::fs::read(smollm2()).unwrap();
    let p = tmpdir().join("truncated.gguf");
    // Cut inside the tensor data: the header parses, a tensor then reaches past the end.
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let out = kiln(&["run", s(&p), "--prompt", "hi", "-n", "1"]);
    assert_bad_input(&out, &["truncated.gguf", "past the end"]);
    // Cut inside the metadata.
    std::fs::write(&p, &bytes[..5000]).unwrap();
    let out = kiln(&["inspect", s(&p)]);
    assert_bad_input(&out, &["truncated.gguf"]);
}

/// A well-formed GGUF that lacks what a llama model needs.
#[test]
fn missing_required_key_and_tensor_are_named() {
    let dir = tmpdir();
    let mut w = GgufWriter::new();
    w.add_metadata(
        "general.architecture",
        MetadataValue::String("llama".into()),
    );
    w.add_tensor_f32("token_embd.weight", &[8, 4], GgmlType::F32, &[0.0; 32])
        .unwrap();
    let p = dir.join("no-block-count.gguf");
    w.write(&p).unwrap();
    let out = kiln(&[
        "logits",
        s(&p),
        "--token-ids",
        "1",
        "--out",
        s(&dir.join("x.f32")),
    ]);
    assert_bad_input(&out, &["no-block-count.gguf", "llama.block_count"]);
}

#[test]
fn unknown_architecture_is_refused_by_name() {
    let dir = tmpdir();
    let mut w = GgufWriter::new();
    w.add_metadata(
        "general.architecture",
        MetadataValue::String("mamba9".into()),
    );
    let p = dir.join("mamba.gguf");
    w.write(&p).unwrap();
    let out = kiln(&[
        "logits",
        s(&p),
        "--token-ids",
        "1",
        "--out",
        s(&dir.join("x.f32")),
    ]);
    assert_bad_input(&out, &["mamba.gguf", "mamba9"]);
}

#[test]
fn prompt_plus_n_beyond_context_is_refused() {
    let out = kiln(&["run", s(&smollm2()), "--prompt", "Hello", "-n", "9000"]);
    assert_bad_input(&out, &["context", "8192"]);
}

#[test]
fn token_id_outside_vocabulary_is_refused() {
    let dir = tmpdir();
    let out = kiln(&[
        "logits",
        s(&smollm2()),
        "--token-ids",
        "1,49152",
        "--out",
        s(&dir.join("y.f32")),
    ]);
    assert_bad_input(&out, &["49152", "vocabulary"]);
    assert!(
        !dir.join("y.f32").exists(),
        "no output may be written on failure"
    );
}

#[test]
fn bad_flags_and_values_are_bad_input() {
    let m = smollm2();
    assert_eq!(
        kiln(&["run", s(&m), "--prompt", "x", "--no-such-flag"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        kiln(&["run", s(&m)]).status.code(),
        Some(2),
        "a prompt source is required"
    );
    assert_bad_input(
        &kiln(&["run", s(&m), "--prompt", "x", "--top-p", "1.5"]),
        &["top-p"],
    );
    assert_bad_input(
        &kiln(&["run", s(&m), "--prompt", "x", "--threads", "0"]),
        &["threads"],
    );
    let messages = tmpdir().join("bad-messages.json");
    std::fs::write(&messages, r#"[{"role": "wizard", "content": "hi"}]"#).unwrap();
    assert_bad_input(
        &kiln(&["run", s(&m), "--messages", s(&messages)]),
        &["bad-messages.json", "wizard"],
    );
    std::fs::write(&messages, r#"{"not": "a list"}"#).unwrap();
    assert_bad_input(
        &kiln(&["run", s(&m), "--messages", s(&messages)]),
        &["bad-messages.json"],
    );
}

#[test]
fn version_and_help_exit_zero() {
    assert_eq!(kiln(&["--version"]).status.code(), Some(0));
    assert_eq!(kiln(&["run", "--help"]).status.code(), Some(0));
}

/// `kiln inspect MODEL | head`: the reader closes the pipe early; kiln stops quietly.
#[test]
fn closed_stdout_is_not_a_crash() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["inspect", s(&smollm2())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{stderr}"
    );
}
