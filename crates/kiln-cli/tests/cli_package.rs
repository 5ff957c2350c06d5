//! `kiln convert` to kiln packages, running them, and `kiln verify` of damaged ones.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("cli-package-{tag}"))
}

fn perplexity(model: &Path) -> f64 {
    let text = repo().join("../shared/reference/text/ppl_dev.txt");
    let out = kiln_ok(&["perplexity", s(model), "--text-file", s(&text), "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["ppl"].as_f64().unwrap()
}

const IDS: &str = "1,2,3,4,5,77,200";

#[test]
fn smollm2_packages_run_like_their_source() {
    let dir = tmpdir("smollm2");
    let src = smollm2();
    let src_logits = dir.join("src.f32");
    kiln_ok(&[
        "logits",
        s(&src),
        "--token-ids",
        IDS,
        "--out",
        s(&src_logits),
    ]);
    let src_ppl = perplexity(&src);

    // keep: the same blocks, so the same logits bit for bit and the same perplexity.
    let keep = dir.join("keep.kiln");
    kiln_ok(&["convert", s(&src), "-o", s(&keep)]);
    kiln_ok(&["verify", s(&keep)]);
    let keep_logits = dir.join("keep.f32");
    kiln_ok(&[
        "logits",
        s(&keep),
        "--token-ids",
        IDS,
        "--out",
        s(&keep_logits),
    ]);
    assert_eq!(
        std::fs::read(&src_logits).unwrap(),
        std::fs::read(&keep_logits).unwrap(),
        "keep package logits differ from the GGUF's"
    );
    assert_eq!(perplexity(&keep), src_ppl);
    assert_stored_in_use_order(&keep);
    // Text in, text out: the tokenizer and chat template travel in the manifest.
    let text = kiln_ok(&[
        "run",
        s(&keep),
        "--prompt",
        "The capital of France is",
        "-n",
        "4",
        "--temperature",
        "0",
        "--chat",
    ]);
    let gguf_text = kiln_ok(&[
        "run",
        s(&src),
        "--prompt",
        "The capital of France is",
        "-n",
        "4",
        "--temperature",
        "0",
        "--chat",
    ]);
    assert_eq!(text, gguf_text);

    for (quant, max_increase) in [("f16", 0.01), ("int4-block32", 0.25)] {
        let pkg = dir.join(format!("{quant}.kiln"));
        let report = kiln_ok(&["convert", s(&src), "-o", s(&pkg), "--quant", quant]);
        assert!(report.contains("snr"), "{report}");
        let ppl = perplexity(&pkg);
        let size: u64 = std::fs::read_dir(&pkg)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        eprintln!(
            "{quant}: perplexity {ppl:.4} (source {src_ppl:.4}, {:+.2} %), {:.1} MB",
            (ppl / src_ppl - 1.0) * 100.0,
            size as f64 / 1e6
        );
        assert!(
            ppl < src_ppl * (1.0 + max_increase),
            "{quant}: {ppl} vs {src_ppl}"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap();
        let quantized = manifest["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["quality"]["cosine"].as_f64().is_some())
            .count();
        assert!(
            quantized > 200,
            "{quant}: {quantized} tensors with quality figures"
        );
    }
}

/// The package's tensors lie in its shards in the order a token reads them: the embedding,
/// layer 0 (norm, q, k, v, output, norm, gate, up, down), layer 1, …, then the output norm. The
/// source GGUF lists them by name (`blk.10` before `blk.2`, `ffn_down` before `attn_q`).
fn assert_stored_in_use_order(pkg: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap();
    let mut stored: Vec<(String, u64, String)> = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["shard"].as_str().unwrap().to_string(),
                t["offset"].as_u64().unwrap(),
                t["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    stored.sort();
    let layers = stored
        .iter()
        .filter(|t| t.2.ends_with("attn_q.weight"))
        .count();
    let mut want = vec!["token_embd.weight".to_string()];
    for i in 0..layers {
        for n in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            want.push(format!("blk.{i}.{n}.weight"));
        }
    }
    want.push("output_norm.weight".into());
    let got: Vec<String> = stored.into_iter().map(|t| t.2).collect();
    assert_eq!(got, want, "tensors in storage order");
}

/// A small package from the tiny Hugging Face folder, for damage tests.
fn tiny_package(tag: &str) -> PathBuf {
    let pkg = tmpdir(tag).keep().join("tiny.kiln");
    kiln_ok(&[
        "convert",
        s(&tiny_hf()),
        "-o",
        s(&pkg),
        "--max-shard-mb",
        "1",
    ]);
    pkg
}

#[test]
fn hf_folder_converts_and_runs_identically() {
    let pkg = tiny_package("hf");
    let dir = pkg.parent().unwrap();
    let (a, b) = (dir.join("a.f32"), dir.join("b.f32"));
    kiln_ok(&["logits", s(&tiny_hf()), "--token-ids", IDS, "--out", s(&a)]);
    kiln_ok(&["logits", s(&pkg), "--token-ids", IDS, "--out", s(&b)]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let out = kiln_ok(&["verify", s(&pkg), "--json"]);
    assert!(out.contains("\"ok\":true"), "{out}");
    let out = kiln_ok(&["inspect", s(&pkg)]);
    assert!(out.contains("kiln package version 2"), "{out}");
    assert!(out.contains("no tokenizer"), "{out}");
}

fn first_shard(pkg: &Path) -> PathBuf {
    pkg.join("shard-00001.bin")
}

#[test]
fn tampered_shard_is_named_and_refused_unless_no_verify() {
    let pkg = tiny_package("tamper");
    let shard = first_shard(&pkg);
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    assert_bad_input(&kiln(&["verify", s(&pkg)]), &["shard-00001.bin", "sha256"]);
    let out = dir_logits(&pkg, &[]);
    assert_bad_input(&out, &["shard-00001.bin", "integrity"]);
    let out = dir_logits(&pkg, &["--no-verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dir_logits(pkg: &Path, extra: &[&str]) -> Output {
    let out = pkg.parent().unwrap().join("x.f32");
    let mut args = vec!["logits", s(pkg), "--token-ids", IDS, "--out", s(&out)];
    args.extend_from_slice(extra);
    kiln(&args)
}

fn edit_manifest(pkg: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = pkg.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn damaged_packages_exit_2_with_the_fault_named() {
    // Truncated shard.
    let pkg = tiny_package("truncated");
    let shard = first_shard(&pkg);
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_bad_input(
        &kiln(&["verify", s(&pkg)]),
        &["shard-00001.bin", "truncated"],
    );
    assert_bad_input(&dir_logits(&pkg, &["--no-verify"]), &["shard-00001.bin"]);

    // Missing shard.
    let pkg = tiny_package("missing");
    std::fs::remove_file(first_shard(&pkg)).unwrap();
    assert_bad_input(&kiln(&["verify", s(&pkg)]), &["shard-00001.bin", "missing"]);

    // A version 1 package with I8_CH tensors (their rows were laid out differently then).
    let pkg = tmpdir("v1-i8").keep().join("tiny.kiln");
    let src = tiny_hf();
    let args = ["convert", s(&src), "-o", s(&pkg), "--quant", "int8-channel"];
    kiln_ok(&[&args[..], &["--keep", "none"]].concat());
    assert!(dir_logits(&pkg, &[]).status.success());
    edit_manifest(&pkg, |v| v["format_version"] = serde_json::Value::from(1));
    assert_bad_input(
        &dir_logits(&pkg, &["--no-verify"]),
        &[
            "manifest.json",
            "version 1",
            "I8_CH",
            "'token_embd.weight'",
            "convert the source model again",
        ],
    );

    // A tensor pointing past the end of its shard.
    let pkg = tiny_package("past-end");
    let mut name = String::new();
    edit_manifest(&pkg, |v| {
        let t = &mut v["tensors"][0];
        name = t["name"].as_str().unwrap().to_string();
        t["offset"] = serde_json::Value::from(1u64 << 30);
    });
    assert_bad_input(&kiln(&["verify", s(&pkg)]), &[&name, "past the end"]);

    // A misaligned offset.
    let pkg = tiny_package("misaligned");
    edit_manifest(&pkg, |v| {
        let t = &mut v["tensors"][1];
        name = t["name"].as_str().unwrap().to_string();
        let off = t["offset"].as_u64().unwrap();
        t["offset"] = serde_json::Value::from(off + 8);
    });
    assert_bad_input(&kiln(&["verify", s(&pkg)]), &[&name, "multiple of 64"]);
    assert_bad_input(&dir_logits(&pkg, &[]), &[&name, "multiple of 64"]);
}

#[test]
fn interrupted_convert_leaves_no_package_and_the_next_run_cleans_up() {
    let dir = tmpdir("interrupted");
    let out = dir.join("m.kiln");
    // What a killed convert leaves behind: a temp folder of a process that no longer runs.
    let stale = dir.join("m.kiln.tmp-4294967294");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("shard-00001.bin"), vec![0u8; 4096]).unwrap();
    assert!(!out.exists());
    assert_bad_input(&kiln(&["verify", s(&out)]), &["m.kiln"]);
    kiln_ok(&["convert", s(&tiny_hf()), "-o", s(&out)]);
    assert!(!stale.exists(), "stale temp left behind");
    kiln_ok(&["verify", s(&out)]);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");

    // A failing convert leaves nothing either.
    let bad = dir.join("bad.kiln");
    assert_bad_input(
        &kiln(&["convert", s(&tiny_hf()), "-o", s(&bad), "--quant", "int3"]),
        &["int3"],
    );
    assert!(!bad.exists());
}
