//! `kiln convert --calibration`: lookup tables weighted by a text's activations, recorded in
//! the manifest, and what the flag refuses.

mod common;
use common::*;

use std::path::Path;

fn perplexity(model: &Path, text: &Path) -> (f64, u64) {
    let out = kiln_ok(&["perplexity", s(model), "--text-file", s(text), "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (v["ppl"].as_f64().unwrap(), v["n_tokens"].as_u64().unwrap())
}

fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// SmolLM2 as `lut4-g16`, calibrated on one text and judged on another: weighted tables with
/// error feedback take the perplexity from about 62 to 21.0 (`docs/quantization.md`).
#[test]
fn calibrated_lookup_tables_are_recorded_and_beat_plain_ones() {
    let dir = Scratch::new("cli-calibration");
    let src = smollm2();
    let calib = repo().join("../shared/reference/text/long_prompt_dev.txt");
    // `long_prompt_dev.txt` is a passage of `ppl_dev.txt`: the judge is the rest of it, so the
    // tables are not judged on the text they were fitted to.
    let calib_text = std::fs::read_to_string(&calib).unwrap();
    let seen: std::collections::HashSet<&str> = calib_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let dev = std::fs::read_to_string(repo().join("../shared/reference/text/ppl_dev.txt")).unwrap();
    let rest: Vec<&str> = dev.lines().filter(|l| !seen.contains(l)).collect();
    let judge = dir.join("judge.txt");
    std::fs::write(&judge, rest.join("\n")).unwrap();

    let plain = dir.join("plain.kiln");
    kiln_ok(&[
        "convert",
        s(&src),
        "-o",
        s(&plain),
        "--quant",
        "lut4",
        "--lut-group-channels",
        "16",
    ]);
    let pkg = dir.join("calibrated.kiln");
    let out = kiln_ok(&[
        "convert",
        s(&src),
        "-o",
        s(&pkg),
        "--quant",
        "lut4",
        "--lut-group-channels",
        "16",
        "--calibration",
        s(&calib),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    kiln_ok(&["verify", s(&pkg)]);

    // The whole text was used (fewer tokens than the bound), tokenized as perplexity does.
    let (_, text_tokens) = perplexity(&src, &calib);
    assert!(text_tokens < 2048, "{text_tokens}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap();
    let recorded = &manifest["conversion"]["calibration"];
    assert_eq!(recorded["file"], "long_prompt_dev.txt");
    assert_eq!(recorded["sha256"], sha256sum(&calib).as_str());
    assert_eq!(recorded["tokens"].as_u64(), Some(text_tokens));
    assert_eq!(recorded["chunk_tokens"].as_u64(), Some(256));
    assert_eq!(recorded["error_feedback"], true);
    assert_eq!(&report["calibration"], recorded);
    assert_eq!(manifest["conversion"]["quant"], "lut4-g16");
    let plain_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plain.join("manifest.json")).unwrap()).unwrap();
    assert!(plain_manifest["conversion"].get("calibration").is_none());

    let (p_plain, _) = perplexity(&plain, &judge);
    let (p_cal, _) = perplexity(&pkg, &judge);
    eprintln!("lut4-g16: perplexity {p_plain:.3} plain, {p_cal:.3} calibrated");
    assert!(p_plain > 45.0, "plain lut4-g16: {p_plain}");
    assert!(p_cal < 22.5, "calibrated lut4-g16: {p_cal}");
}

#[test]
fn calibration_refuses_what_it_cannot_use() {
    let dir = Scratch::new("cli-calibration-bad");
    let src = smollm2();
    let out = dir.join("out.kiln");
    let convert = |extra: &[&str]| {
        let mut args = vec!["convert", s(&src), "-o", s(&out)];
        args.extend_from_slice(extra);
        kiln(&args)
    };

    let missing = dir.join("no-such-text.txt");
    assert_bad_input(
        &convert(&["--quant", "lut4", "--calibration", s(&missing)]),
        &["no-such-text.txt", "calibration text", "does not exist"],
    );
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, " \n\n").unwrap();
    assert_bad_input(
        &convert(&["--quant", "lut4", "--calibration", s(&empty)]),
        &["empty.txt", "calibration text is empty"],
    );
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, b"text\xff\xfe").unwrap();
    assert_bad_input(
        &convert(&["--quant", "lut4", "--calibration", s(&binary)]),
        &["binary.txt", "not valid UTF-8"],
    );
    let text = repo().join("../shared/reference/text/long_prompt_dev.txt");
    assert_bad_input(
        &convert(&["--quant", "int4-block32", "--calibration", s(&text)]),
        &["--calibration", "lookup tables", "int4-block32"],
    );
    assert_bad_input(
        &convert(&["--quant", "lut4", "--to", "gguf", "--calibration", s(&text)]),
        &["--calibration", "kiln packages", "gguf"],
    );
    assert_bad_input(
        &convert(&[
            "--quant",
            "lut4",
            "--calibration",
            s(&text),
            "--calibration-tokens",
            "0",
        ]),
        &["--calibration-tokens", "at least 1"],
    );
    assert!(
        !out.exists(),
        "a refused conversion wrote {}",
        out.display()
    );
}
