//! `kiln convert` to every weight format, and `--to gguf` / `--to safetensors` read back.

mod common;
use common::*;

use std::path::Path;

/// transformers' float32 logits of the tiny model for [`IDS`], last position.
fn tiny_reference_logits() -> Vec<f32> {
    let all = read_f32(&repo().join("../shared/reference/coreml/tiny_llama.logits_7x256.f32"));
    all[6 * 256..].to_vec()
}

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("cli-formats-{tag}"))
}

const IDS: &str = "1,2,3,4,5,77,200";

/// The logits after `ids`, written into `dir` (sources may lie in read-only folders).
fn logits(dir: &Path, model: &Path, ids: &str, precision: &str) -> Vec<f32> {
    let name = model.file_name().unwrap().to_string_lossy();
    let out = dir.join(format!("{name}.{precision}.{}.f32", ids.len()));
    kiln_ok(&[
        "logits",
        s(model),
        "--token-ids",
        ids,
        "--out",
        s(&out),
        "--precision",
        precision,
    ]);
    read_f32(&out)
}

fn manifest(pkg: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_scheme_converts_and_runs_the_tiny_model() {
    let dir = tmpdir("tiny");
    let want = tiny_reference_logits();
    // (quant, extra arguments, stored format of the matrices, least weight SNR in dB, least
    // logits cosine against transformers; the model's random weights are hard on 2 and 4 bits)
    let cases: [(&str, &[&str], &str, f64, f64); 11] = [
        ("int8-channel", &[], "I8_CH", 38.0, 0.9999),
        ("int4-block32", &[], "Q4_0", 17.0, 0.985),
        ("lut4-block32", &[], "LUT4_B32", 18.5, 0.985),
        (
            "lut4-block32",
            &["--lut-group-channels", "16"],
            "LUT4_B32_G16",
            18.5,
            0.985,
        ),
        ("int4-block32-offset", &[], "Q4_1", 17.0, 0.985),
        ("int4-block64", &[], "I4_B64", 16.0, 0.98),
        (
            "lut2",
            &["--lut-group-channels", "16"],
            "LUT2_G16",
            7.0,
            0.8,
        ),
        ("lut4", &[], "LUT4", 17.0, 0.98),
        (
            "lut4",
            &["--lut-group-channels", "16"],
            "LUT4_G16",
            17.0,
            0.98,
        ),
        (
            "lut6",
            &["--lut-group-channels", "32"],
            "LUT6_G32",
            28.0,
            0.998,
        ),
        ("lut8", &[], "LUT8", 38.0, 0.9999),
    ];
    let tiny = tiny_hf();
    for (quant, extra, format, min_snr, min_cos) in cases {
        let pkg = dir.join(format!("{quant}{}.kiln", extra.len()));
        let mut args = vec![
            "convert",
            s(&tiny),
            "-o",
            s(&pkg),
            "--quant",
            quant,
            "--keep",
            "none",
        ];
        args.extend_from_slice(extra);
        let report = kiln_ok(&args);
        assert!(report.contains("snr"), "{report}");
        kiln_ok(&["verify", s(&pkg)]);
        let m = manifest(&pkg);
        let label = m["conversion"]["quant"].as_str().unwrap().to_string();
        assert!(label.starts_with(quant), "{label}");
        let mut matrices = 0;
        for t in m["tensors"].as_array().unwrap() {
            if t["shape"].as_array().unwrap().len() != 2 {
                continue;
            }
            matrices += 1;
            assert_eq!(t["format"], format, "{quant}: {}", t["name"]);
            let q = &t["quality"];
            assert_eq!(q["scheme"], label.as_str());
            let snr = q["snr_db"].as_f64().unwrap();
            assert!(snr > min_snr, "{quant}: {} at {snr} dB", t["name"]);
            assert!(q["cosine"].as_f64().unwrap() > 0.8);
        }
        assert_eq!(matrices, 2 + 2 * 7, "{quant}");
        // Seven tokens take the decode kernels, exact takes dequantized rows: they agree.
        let refined = logits(&dir, &pkg, IDS, "refined");
        let exact = logits(&dir, &pkg, IDS, "exact");
        let agree = cosine(&refined, &exact);
        assert!(agree > 0.99999, "{quant}: kernels vs exact cosine {agree}");
        let cos = cosine(&exact, &want);
        eprintln!("{quant} {extra:?}: logits cosine {cos:.6} against transformers");
        assert!(cos > min_cos, "{quant}: cosine {cos}");
        if quant != "lut2" {
            assert_eq!(argmax(&exact), argmax(&want), "{quant}");
        }
    }
    // Nine tokens run the prompt path (dequantized panels) over a kiln format.
    let pkg = dir.join("lut40.kiln");
    let long = "1,2,3,4,5,77,200,9,10";
    let (a, b) = (
        logits(&dir, &pkg, long, "refined"),
        logits(&dir, &pkg, long, "exact"),
    );
    assert!(cosine(&a, &b) > 0.99999);
}

#[test]
fn smollm2_int8_channel_keeps_perplexity_within_one_percent() {
    let dir = tmpdir("int8");
    let text = repo().join("../shared/reference/text/ppl_dev.txt");
    let ppl = |m: &Path| -> f64 {
        let out = kiln_ok(&["perplexity", s(m), "--text-file", s(&text), "--json"]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["ppl"]
            .as_f64()
            .unwrap()
    };
    let pkg = dir.join("int8.kiln");
    kiln_ok(&[
        "convert",
        s(&smollm2()),
        "-o",
        s(&pkg),
        "--quant",
        "int8-channel",
    ]);
    let (src, got) = (ppl(&smollm2()), ppl(&pkg));
    eprintln!("int8-channel perplexity {got:.4}, source {src:.4}");
    assert!((got / src - 1.0).abs() < 0.01, "{got} vs {src}");
}

#[test]
fn gguf_output_reads_back_with_the_same_logits_and_tokenizer() {
    let dir = tmpdir("gguf");
    let src = smollm2();
    // keep: the source's blocks and metadata, so the same logits bit for bit and the same text.
    let keep = dir.join("keep.gguf");
    kiln_ok(&["convert", s(&src), "-o", s(&keep), "--to", "gguf"]);
    assert_eq!(
        logits(&dir, &keep, IDS, "refined"),
        logits(&dir, &src, IDS, "refined"),
        "a kept GGUF runs differently"
    );
    let run = |m: &Path| {
        kiln_ok(&[
            "run",
            s(m),
            "--prompt",
            "The capital of France is",
            "-n",
            "4",
            "--temperature",
            "0",
            "--chat",
        ])
    };
    assert_eq!(run(&keep), run(&src));
    // f16: the same bytes a kiln package of f16 holds, so the same logits.
    let gguf = dir.join("f16.gguf");
    let pkg = dir.join("f16.kiln");
    kiln_ok(&[
        "convert",
        s(&src),
        "-o",
        s(&gguf),
        "--to",
        "gguf",
        "--quant",
        "f16",
    ]);
    kiln_ok(&["convert", s(&src), "-o", s(&pkg), "--quant", "f16"]);
    assert_eq!(
        logits(&dir, &gguf, IDS, "refined"),
        logits(&dir, &pkg, IDS, "refined")
    );
}

#[test]
fn safetensors_output_reads_back_with_the_same_logits() {
    let dir = tmpdir("safetensors");
    // A Hugging Face source comes back byte for byte in its weights.
    let out = dir.join("tiny-hf");
    kiln_ok(&[
        "convert",
        s(&tiny_hf()),
        "-o",
        s(&out),
        "--to",
        "safetensors",
    ]);
    let want = tiny_reference_logits();
    let got = logits(&dir, &out, IDS, "exact");
    assert_eq!(got, logits(&dir, &tiny_hf(), IDS, "exact"));
    assert!(cosine(&got, &want) > 0.999999 && max_diff(&got, &want) < 1e-3);

    // A GGUF llama source: q/k rows un-permuted, transformers' names, config.json; the same
    // logits as the f16 package up to summation order, and a note that no tokenizer came.
    let src = smollm2();
    let out = dir.join("smollm2-hf");
    let report = kiln_ok(&[
        "convert",
        s(&src),
        "-o",
        s(&out),
        "--to",
        "safetensors",
        "--quant",
        "f16",
    ]);
    assert!(report.contains("no tokenizer.json written"), "{report}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    let pkg = dir.join("f16.kiln");
    kiln_ok(&["convert", s(&src), "-o", s(&pkg), "--quant", "f16"]);
    let (a, b) = (
        logits(&dir, &out, IDS, "exact"),
        logits(&dir, &pkg, IDS, "exact"),
    );
    let d = max_diff(&a, &b);
    eprintln!("safetensors vs package: max |diff| {d:.2e}");
    assert!(d < 1e-3, "{d}");
    assert_eq!(argmax(&a), argmax(&b));
}

#[test]
fn conversions_that_cannot_be_written_are_refused() {
    let dir = tmpdir("refusals");
    let src = smollm2();
    let tiny = tiny_hf();
    let out = dir.join("x.gguf");
    let o = kiln(&[
        "convert",
        s(&src),
        "-o",
        s(&out),
        "--to",
        "gguf",
        "--quant",
        "lut4",
    ]);
    assert_bad_input(
        &o,
        &[
            "LUT4, a kiln format that GGUF cannot hold",
            "int4-block32 (Q4_0)",
        ],
    );
    let o = kiln(&[
        "convert",
        s(&src),
        "-o",
        s(&out),
        "--to",
        "gguf",
        "--quant",
        "int8-channel",
    ]);
    assert_bad_input(&o, &["I8_CH"]);
    let o = kiln(&["convert", s(&tiny), "-o", s(&out), "--to", "gguf"]);
    assert_bad_input(&o, &["--to gguf converts GGUF sources"]);
    assert!(!out.exists());
    let hf = dir.join("hf");
    let o = kiln(&[
        "convert",
        s(&src),
        "-o",
        s(&hf),
        "--to",
        "safetensors",
        "--quant",
        "int4-block32",
    ]);
    assert_bad_input(&o, &["--to safetensors stores float tensors"]);
    let o = kiln(&["convert", s(&src), "-o", s(&hf), "--to", "safetensors"]);
    assert_bad_input(&o, &["stored as Q8_0", "safetensors cannot hold"]);
    assert!(!hf.exists());
    let pkg = dir.join("p.kiln");
    let o = kiln(&[
        "convert",
        s(&tiny),
        "-o",
        s(&pkg),
        "--quant",
        "int8-channel",
        "--lut-group-channels",
        "16",
    ]);
    assert_bad_input(&o, &["--lut-group-channels applies to lookup tables"]);
    let o = kiln(&[
        "convert",
        s(&tiny),
        "-o",
        s(&pkg),
        "--quant",
        "lut4",
        "--lut-group-channels",
        "0",
    ]);
    assert_bad_input(&o, &["at least 1"]);
    let o = kiln(&["convert", s(&tiny), "-o", s(&pkg), "--quant", "lut5"]);
    assert_bad_input(&o, &["unknown --quant 'lut5'", "lut6"]);
    // A group that divides no matrix's rows leaves them as they are, saying why.
    let report = kiln_ok(&[
        "convert",
        s(&tiny),
        "-o",
        s(&pkg),
        "--quant",
        "lut4",
        "--lut-group-channels",
        "48",
        "--keep",
        "none",
    ]);
    assert!(report.contains("48 must divide the 64 rows"), "{report}");
    // For lut4-block32 it is refused instead, naming the tensor.
    let o = kiln(&[
        "convert",
        s(&tiny),
        "-o",
        s(&pkg),
        "--quant",
        "lut4-block32",
        "--lut-group-channels",
        "48",
        "--keep",
        "none",
    ]);
    assert_bad_input(
        &o,
        &["tensor '", "--lut-group-channels 48 does not divide its"],
    );
}
