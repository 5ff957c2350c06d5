//! The CLI on Hugging Face folders: the transformers-written tiny Llama (no tokenizer) against
//! transformers' logits, the same folder with a byte-level tokenizer added for text commands,
//! and the refusals a folder without a tokenizer or a bare weights file gets.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

fn reference() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/coreml")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-hf-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn bad_input(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn logits_of_a_folder_match_transformers() {
    let dir = reference().join("tiny_llama_hf");
    let out_path = scratch("logits").join("last.f32");
    let out = kiln(&[
        "logits",
        s(&dir),
        "--token-ids",
        "1,2,3,4,5,77,200",
        "--out",
        s(&out_path),
    ]);
    let stdout = ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["prompt_token_ids"],
        serde_json::json!([1, 2, 3, 4, 5, 77, 200])
    );
    let got = read_f32(&out_path);
    let all = read_f32(&reference().join("tiny_llama.logits_7x256.f32"));
    let want = &all[6 * 256..];
    assert_eq!(got.len(), 256);
    let dot: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let norm = |x: &[f32]| x.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (norm(&got) * norm(want));
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("kiln logits on tiny_llama_hf: cosine {cos:.9}, max |diff| {max_abs:.2e}");
    assert!(cos >= 0.9999, "cosine {cos}");
    assert!(max_abs <= 1e-4, "max |diff| {max_abs}");
}

#[test]
fn a_folder_without_tokenizer_needs_token_ids() {
    let dir = reference().join("tiny_llama_hf");
    let out_path = scratch("no-tokenizer").join("x.f32");
    let out = kiln(&["logits", s(&dir), "--prompt", "hi", "--out", s(&out_path)]);
    bad_input(
        &out,
        &[
            "tiny_llama_hf",
            "this model folder has no tokenizer.json; pass --token-ids",
        ],
    );
    for args in [
        vec!["run", s(&dir), "--prompt", "hi"],
        vec!["perplexity", s(&dir), "--text-file", "Cargo.toml"],
    ] {
        bad_input(&kiln(&args), &["tiny_llama_hf", "no tokenizer.json"]);
    }
    let weights = dir.join("model.safetensors");
    for cmd in ["run", "inspect"] {
        let mut args = vec![cmd, s(&weights)];
        if cmd == "run" {
            args.extend(["--prompt", "hi"]);
        }
        bad_input(
            &kiln(&args),
            &["model.safetensors", "pass the Hugging Face folder"],
        );
    }
    let empty = scratch("empty");
    bad_input(&kiln(&["inspect", s(&empty)]), &["config.json"]);
}

#[test]
fn inspect_describes_a_folder() {
    let dir = reference().join("tiny_llama_hf");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&kiln(&["inspect", s(&dir), "--json"]))).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["parameters"], 106_816);
    assert_eq!(v["hyperparameters"]["n_layers"], 2);
    assert_eq!(v["hyperparameters"]["rope_style"], "Neox");
    assert!(v["tokenizer"]["error"]
        .as_str()
        .unwrap()
        .contains("tokenizer.json"));
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 21);
    let q = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(q["shape"], serde_json::json!([32, 64]));
    assert_eq!(q["type"], "F32");
    let text = ok(&kiln(&["inspect", s(&dir)]));
    assert!(text.contains("Hugging Face folder"), "{text}");
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the others are moved
/// above U+0100 in order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// The tiny Llama folder plus a byte-level tokenizer of exactly its 256 ids (no merges) and a
/// chat template.
fn folder_with_tokenizer() -> PathBuf {
    let dir = scratch("with-tokenizer");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(reference().join("tiny_llama_hf").join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn text_commands_work_on_a_folder_with_a_tokenizer() {
    let dir = folder_with_tokenizer();
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&[
        "tokenize",
        s(&dir),
        "--text",
        "Hi!",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["token_ids"], serde_json::json!([72, 105, 33]));

    let out_text = dir.join("text.f32");
    let out_ids = dir.join("ids.f32");
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&[
        "logits",
        s(&dir),
        "--prompt",
        "Hi!",
        "--out",
        s(&out_text),
    ])))
    .unwrap();
    assert_eq!(v["prompt_token_ids"], serde_json::json!([72, 105, 33]));
    ok(&kiln(&[
        "logits",
        s(&dir),
        "--token-ids",
        "72,105,33",
        "--out",
        s(&out_ids),
    ]));
    assert_eq!(read_f32(&out_text), read_f32(&out_ids));

    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "run",
            s(&dir),
            "--prompt",
            "Hello",
            "-n",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&kiln(&args))).unwrap()
    };
    let plain = run(&[]);
    assert_eq!(
        plain["prompt_token_ids"],
        serde_json::json!([72, 101, 108, 108, 111])
    );
    assert_eq!(plain["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(
        run(&[])["token_ids"],
        plain["token_ids"],
        "greedy is deterministic"
    );
    let chat = run(&["--chat"]);
    let rendered: Vec<u64> = "<user>Hello\n<assistant>".bytes().map(u64::from).collect();
    assert_eq!(chat["prompt_token_ids"], serde_json::json!(rendered));

    let text = dir.join("ppl.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(4),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&[
        "perplexity",
        s(&dir),
        "--text-file",
        s(&text),
        "--ctx",
        "32",
        "--json",
    ])))
    .unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "perplexity {ppl}");

    let v: serde_json::Value =
        serde_json::from_str(&ok(&kiln(&["inspect", s(&dir), "--json"]))).unwrap();
    assert_eq!(v["tokenizer"]["vocab_size"], 256);
    assert_eq!(v["tokenizer"]["chat_template"], true);
}
