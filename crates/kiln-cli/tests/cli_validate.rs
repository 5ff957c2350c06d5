//! `kiln validate`: parity of converted packages with their GGUF source, and the fp16 range
//! check before and after `kiln convert --fp16-safe`, on the real models.
//!
//! Independent figures: the source perplexities match transformers' float32 answers in
//! `reference/{smollm2,gemma3}/reference.json`; the fp16 failures reproduce what others saw
//! running these models in fp16 (SmolLM2's RMSNorm squares residual values of several hundred,
//! which fp16 cannot hold; Gemma 3's residual stream itself exceeds fp16).

mod common;
use common::*;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn gemma3() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

fn reference(path: &str) -> PathBuf {
    repo().join("../shared/reference").join(path)
}

fn reference_ppl(model: &str) -> f64 {
    let text = std::fs::read_to_string(reference(&format!("{model}/reference.json"))).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["perplexity"]["ppl"].as_f64().unwrap()
}

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("cli-validate-{tag}"))
}

/// Two short prompts, as a JSON list (the second spans lines).
fn prompts_file(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.json");
    std::fs::write(
        &p,
        r#"["The capital of France is", "def fibonacci(n):\n    if n < 2:"]"#,
    )
    .unwrap();
    p
}

fn json_of(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn smollm2_against_itself_passes_with_cosine_1() {
    let dir = tmpdir("self");
    let prompts = prompts_file(&dir);
    let text = reference("text/ppl_dev.txt");
    let src = smollm2();
    let out = kiln_ok(&[
        "validate",
        s(&src),
        "--against",
        s(&src),
        "--prompts",
        s(&prompts),
        "--continuation",
        "4",
        "--text",
        s(&text),
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pass"], true);
    assert_eq!(v["summary"]["min_cosine"], 1.0);
    assert_eq!(v["summary"]["mean_kl"], 0.0);
    assert_eq!(v["summary"]["top1_rate"], 1.0);
    let prompts = v["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    // The first prompt tokenizes as transformers does (reference prompt_token_ids).
    assert_eq!(prompts[0]["tokens"], 5);
    assert_eq!(prompts[0]["continuation"].as_array().unwrap().len(), 4);
    // Teacher forcing feeds the source's greedy tokens: transformers' greedy answer begins
    // " Paris." (7042, 30).
    assert_eq!(prompts[0]["continuation"][0], 7042);
    assert_eq!(prompts[0]["continuation"][1], 30);
    let ppl = &v["perplexity"];
    assert_eq!(ppl["increase_pct"], 0.0);
    let want = reference_ppl("smollm2");
    let got = ppl["source"].as_f64().unwrap();
    assert!(
        (got / want - 1.0).abs() < 1e-4,
        "source perplexity {got} vs transformers {want}"
    );
}

/// An int4-block32 package of SmolLM2 against its Q4_1 GGUF: real losses, measured and gated.
#[test]
fn int4_package_is_measured_and_gated() {
    let dir = tmpdir("int4");
    let prompts = prompts_file(&dir);
    // The first half of the perplexity text (two chunks of 256), to keep the test short.
    let full = std::fs::read_to_string(reference("text/ppl_dev.txt")).unwrap();
    let cut = full[..full.len() / 2].rfind('\n').unwrap();
    let text = dir.join("half.txt");
    std::fs::write(&text, &full[..cut]).unwrap();
    let src = smollm2();
    let pkg = dir.join("int4.kiln");
    kiln_ok(&[
        "convert",
        s(&src),
        "-o",
        s(&pkg),
        "--quant",
        "int4-block32",
        "--json",
    ]);

    // A strict bar fails (exit 1), naming the prompt and the metric, with the JSON printed.
    let out = kiln(&[
        "validate",
        s(&pkg),
        "--against",
        s(&src),
        "--prompts",
        s(&prompts),
        "--continuation",
        "4",
        "--text",
        s(&text),
        "--min-cosine",
        "0.99999",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("prompt 1") && stderr.contains("--min-cosine 0.99999"));
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v = json_of(&out.stdout);
    for key in [
        "candidate",
        "source",
        "precision",
        "continuation",
        "prompts",
        "summary",
        "perplexity",
        "thresholds",
        "failures",
        "pass",
    ] {
        assert!(v.get(key).is_some(), "JSON lacks {key}: {v}");
    }
    for key in [
        "text",
        "tokens",
        "last",
        "continuation",
        "steps",
        "min_cosine",
        "min_cosine_step",
        "mean_kl",
        "max_kl",
        "top1_agreements",
        "top1_rate",
    ] {
        assert!(v["prompts"][0].get(key).is_some(), "prompt lacks {key}");
    }
    for key in ["cosine", "kl", "top1_agrees"] {
        assert!(
            v["prompts"][0]["last"].get(key).is_some(),
            "last lacks {key}"
        );
    }
    assert_eq!(v["pass"], false);
    assert_eq!(v["prompts"][0]["steps"], 5);
    let min_cos = v["summary"]["min_cosine"].as_f64().unwrap();
    let mean_kl = v["summary"]["mean_kl"].as_f64().unwrap();
    let increase = v["perplexity"]["increase_pct"].as_f64().unwrap();
    eprintln!("SmolLM2 int4-block32 vs Q4_1: min cosine {min_cos:.6}, mean KL {mean_kl:.4}, perplexity {increase:+.2} %");
    assert!(min_cos > 0.2 && min_cos < 0.999, "min cosine {min_cos}");
    assert!(mean_kl > 1e-3 && mean_kl < 2.0, "mean KL {mean_kl}");
    // Measured +17.4 % (docs/validate.md): well beyond the default 5 % gate.
    assert!(
        increase > 5.0 && increase < 40.0,
        "perplexity {increase:+.2} %"
    );
    assert!(v["failures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f.as_str().unwrap().contains("--max-ppl-increase 5")));

    // A loose bar passes.
    let out = kiln_ok(&[
        "validate",
        s(&pkg),
        "--against",
        s(&src),
        "--prompts",
        s(&prompts),
        "--continuation",
        "4",
        "--min-cosine",
        "0.2",
    ]);
    assert!(out.contains("PASS"), "{out}");
}

#[test]
fn bad_input_exits_2() {
    let dir = tmpdir("bad");
    let src = smollm2();
    let missing = dir.join("no-such-model.gguf");
    let out = kiln(&["validate", s(&missing), "--against", s(&src)]);
    assert_bad_input(&out, &["no-such-model.gguf"]);

    // Different vocabularies cannot be compared.
    let out = kiln(&["validate", s(&gemma3()), "--against", s(&src)]);
    assert_bad_input(&out, &["262144", "49152", "tokenizer"]);

    // Prompts files: empty, or JSON that is not a list of strings.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let out = kiln(&[
        "validate",
        s(&src),
        "--against",
        s(&src),
        "--prompts",
        s(&empty),
    ]);
    assert_bad_input(&out, &["empty.txt", "no prompts"]);
    let numbers = dir.join("numbers.json");
    std::fs::write(&numbers, "[1, 2]").unwrap();
    let out = kiln(&[
        "validate",
        s(&src),
        "--against",
        s(&src),
        "--prompts",
        s(&numbers),
    ]);
    assert_bad_input(&out, &["numbers.json", "JSON list of strings"]);

    // Nothing to compare against, or both modes at once.
    assert_bad_input(&kiln(&["validate", s(&src)]), &["--against"]);
    assert_bad_input(
        &kiln(&["validate", s(&src), "--against", s(&src), "--fp16"]),
        &["--fp16"],
    );
    let out = kiln(&["validate", s(&src), "--fp16", "--threads", "0"]);
    assert_bad_input(&out, &["--threads"]);
}

/// The fp16 check of a model: exit 1 and the JSON report.
fn fp16_failing(model: &Path) -> (Value, String) {
    let out = kiln(&["validate", s(model), "--fp16", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (json_of(&out.stdout), stderr)
}

fn fp16_passing(model: &Path) -> Value {
    let out = kiln_ok(&["validate", s(model), "--fp16", "--json"]);
    serde_json::from_str(out.trim()).unwrap()
}

fn ratio(v: &Value, key: &str) -> f64 {
    v[key]["ratio"].as_f64().unwrap()
}

/// Converts with `--fp16-safe` (weights kept as they are), checks the package's logits are the
/// source's bit for bit, and returns the package and the fix its manifest records.
fn fp16_safe_package(src: &Path, dir: &Path) -> (PathBuf, Value) {
    let pkg = dir.join("fp16.kiln");
    kiln_ok(&["convert", s(src), "-o", s(&pkg), "--fp16-safe", "--json"]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(pkg.join("manifest.json")).unwrap()).unwrap();
    let fix = manifest["conversion"]["fp16"].clone();
    assert!(fix.is_object(), "manifest records no fp16 fix");
    let logits = |m: &Path, out: &Path| {
        kiln_ok(&[
            "logits",
            s(m),
            "--prompt",
            "The capital of France is",
            "--out",
            s(out),
        ]);
        std::fs::read(out).unwrap()
    };
    assert_eq!(
        logits(src, &dir.join("src.f32")),
        logits(&pkg, &dir.join("pkg.f32")),
        "the fp16-safe package computes other logits than its source"
    );
    (pkg, fix)
}

#[test]
fn smollm2_fp16_overflows_in_rmsnorm_until_fixed() {
    let dir = tmpdir("fp16-smollm2");
    let src = smollm2();
    let (v, stderr) = fp16_failing(&src);
    // The residual stream fits fp16; RMSNorm's square of it does not, from layer 3 on.
    assert!(ratio(&v, "max_activation") < 1.0, "{}", v["max_activation"]);
    assert!(ratio(&v, "max_norm_statistic") > 100.0);
    assert!(
        stderr.contains("attn_norm.square") && stderr.contains("layer "),
        "{stderr}"
    );
    let overflows = v["overflows"].as_array().unwrap();
    let first_square = overflows
        .iter()
        .filter(|o| o["op"] == "attn_norm.square")
        .map(|o| o["layer"].as_u64().unwrap())
        .min()
        .unwrap();
    assert_eq!(first_square, 3);
    // Several hundred at the input of layer 3: squares near 6e5.
    let layer3 = v["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["layer"] == 3 && o["op"] == "attn_norm.square")
        .unwrap();
    let residual = layer3["max_abs"].as_f64().unwrap().sqrt();
    assert!((400.0..2000.0).contains(&residual), "{residual}");
    // Run purely in fp16 the model produces garbage.
    for p in v["prompts"].as_array().unwrap() {
        assert_eq!(p["top1_agrees"], false, "{p}");
        assert!(p["cosine"].as_f64().unwrap_or(0.0) < 0.5, "{p}");
    }
    eprintln!(
        "SmolLM2 fp16: largest activation {} ({:.3}x), largest RMSNorm statistic {} ({:.1}x)",
        v["max_activation"]["at"],
        ratio(&v, "max_activation"),
        v["max_norm_statistic"]["at"],
        ratio(&v, "max_norm_statistic")
    );

    let (pkg, fix) = fp16_safe_package(&src, &dir);
    assert_eq!(fix["residual_divisor"], 1.0);
    let norms: Vec<&str> = fix["graph"]["max_scaled_norms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(norms, ["attn_norm", "ffn_norm", "output_norm"]);
    let v = fp16_passing(&pkg);
    assert_eq!(v["pass"], true);
    assert!(v["overflows"].as_array().unwrap().is_empty());
    assert!(ratio(&v, "max_norm_statistic") < 0.5);
    for p in v["prompts"].as_array().unwrap() {
        assert_eq!(p["top1_agrees"], true, "{p}");
        assert!(p["cosine"].as_f64().unwrap() > 0.9999, "{p}");
    }
}

#[test]
fn gemma3_residual_stream_exceeds_fp16_until_rescaled() {
    let dir = tmpdir("fp16-gemma3");
    let src = gemma3();
    let (v, stderr) = fp16_failing(&src);
    let r = ratio(&v, "max_activation");
    eprintln!(
        "Gemma 3 fp16: largest activation {} at {} ({r:.3}x the fp16 maximum)",
        v["max_activation"]["value"], v["max_activation"]["at"]
    );
    // The residual stream itself leaves fp16 (1.59x on this file, at the BOS position).
    assert!((1.2..8.0).contains(&r), "{r}");
    assert!(v["max_activation"]["at"]
        .as_str()
        .unwrap()
        .contains("residual"));
    assert!(stderr.contains("fp16 range check failed"), "{stderr}");
    for p in v["prompts"].as_array().unwrap() {
        assert_eq!(p["top1_agrees"], false, "{p}");
    }

    let (pkg, fix) = fp16_safe_package(&src, &dir);
    assert_eq!(fix["residual_divisor"], 4.0);
    assert_eq!(fix["graph"]["fp32_ops"].as_array().unwrap().len(), 0);
    let v = fp16_passing(&pkg);
    assert!(ratio(&v, "max_activation") < 0.5, "{}", v["max_activation"]);
    for p in v["prompts"].as_array().unwrap() {
        assert_eq!(p["top1_agrees"], true, "{p}");
        assert!(p["cosine"].as_f64().unwrap() > 0.9999, "{p}");
    }
}
