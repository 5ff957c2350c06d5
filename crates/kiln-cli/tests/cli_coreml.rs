//! `kiln predict` and `kiln verify` on the coremltools reference packages.

mod common;
use common::*;

use std::path::PathBuf;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/coreml")
}

fn package(name: &str) -> PathBuf {
    reference_dir().join(format!("tiny_llama_stateful_{name}.mlpackage"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-cli-coreml-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The README's call protocol as a calls file.
fn protocol_calls() -> String {
    let mask5: Vec<String> = (0..5)
        .flat_map(|i| {
            (0..5).map(move |j| {
                if j > i {
                    "\"-inf\"".to_string()
                } else {
                    "0".into()
                }
            })
        })
        .collect();
    format!(
        r#"[
 {{"input_ids": {{"dtype": "int32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}},
   "causal_mask": {{"dtype": "fp16", "shape": [1, 1, 5, 5], "data": [{}]}}}},
 {{"input_ids": {{"dtype": "int32", "shape": [1, 1], "data": [77]}},
   "causal_mask": {{"dtype": "fp16", "shape": [1, 1, 1, 6], "data": [0, 0, 0, 0, 0, 0]}}}},
 {{"input_ids": {{"dtype": "int32", "shape": [1, 1], "data": [200]}},
   "causal_mask": {{"dtype": "fp32", "shape": [1, 1, 1, 7], "data": [[[[0, 0, 0, 0, 0, 0, 0]]]]}}}}
]"#,
        mask5.join(", ")
    )
}

#[test]
fn predict_runs_the_protocol_and_writes_f32_logits() {
    let dir = tmpdir("predict");
    let calls = dir.join("calls.json");
    std::fs::write(&calls, protocol_calls()).unwrap();
    let out_dir = dir.join("out");
    let pkg = package("int8_perchannel");
    let out = kiln(&[
        "predict",
        s(&pkg),
        "--calls",
        s(&calls),
        "--out",
        s(&out_dir),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let calls_done = report["calls"].as_array().unwrap();
    assert_eq!(calls_done.len(), 3);
    assert_eq!(
        calls_done[0]["outputs"][0]["shape"],
        serde_json::json!([1, 5, 256])
    );
    assert_eq!(calls_done[2]["outputs"][0]["dtype"], "fp16");
    let mut got = Vec::new();
    for i in 0..3 {
        got.extend(read_f32(&out_dir.join(format!("call{i}.logits.f32"))));
    }
    let want = read_f32(&reference_dir().join("tiny_llama.logits_7x256.f32"));
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(got.len(), want.len());
    assert!(diff <= 0.0067 * 1.02, "max abs diff {diff}");

    // Text mode prints each output's shape.
    let out = kiln(&[
        "predict",
        s(&pkg),
        "--calls",
        s(&calls),
        "--out",
        s(&out_dir),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("call 0: logits fp16 [1, 5, 256]"), "{text}");
}

#[test]
fn verify_accepts_the_reference_packages() {
    for name in [
        "fp16",
        "int8_perchannel",
        "int4_block32",
        "pal4_kmeans_grouped16",
    ] {
        let out = kiln(&["verify", s(&package(name))]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(": ok") && text.contains("state keyCache"),
            "{text}"
        );
    }
    let out = kiln(&["verify", "--json", s(&package("fp16"))]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["specification_version"], 9);
}

fn damaged_copy(tag: &str) -> PathBuf {
    let dir = tmpdir(tag);
    let src = package("fp16");
    let dst = dir.join("damaged.mlpackage");
    let w = "Data/com.apple.CoreML/weights";
    std::fs::create_dir_all(dst.join(w)).unwrap();
    for f in [
        "Manifest.json",
        "Data/com.apple.CoreML/model.mlmodel",
        "Data/com.apple.CoreML/weights/weight.bin",
    ] {
        std::fs::write(dst.join(f), std::fs::read(src.join(f)).unwrap()).unwrap();
    }
    dst
}

#[test]
fn verify_names_the_damaged_blob() {
    let pkg = damaged_copy("verify");
    let weights = pkg.join("Data/com.apple.CoreML/weights/weight.bin");
    let mut w = std::fs::read(&weights).unwrap();
    w[64] = 0;
    std::fs::write(&weights, w).unwrap();
    let out = kiln(&["verify", s(&pkg)]);
    assert_bad_input(
        &out,
        &["damaged.mlpackage", "blob at offset 64", "sentinel"],
    );
    // predict refuses the same package the same way.
    let calls = pkg.parent().unwrap().join("calls.json");
    std::fs::write(&calls, protocol_calls()).unwrap();
    let out_dir = pkg.parent().unwrap().join("out");
    let out = kiln(&[
        "predict",
        s(&pkg),
        "--calls",
        s(&calls),
        "--out",
        s(&out_dir),
    ]);
    assert_bad_input(&out, &["blob at offset 64"]);
}

#[test]
fn bad_paths_and_calls_are_bad_input() {
    let out = kiln(&["verify", "/nonexistent/model.mlpackage"]);
    assert_bad_input(&out, &["/nonexistent/model.mlpackage"]);
    let dir = tmpdir("bad");
    let out = kiln(&["verify", s(&dir)]);
    assert_bad_input(&out, &["not a Core ML package"]);

    let pkg = package("fp16");
    let calls = dir.join("calls.json");
    for (text, needle) in [
        ("not json", "not valid JSON"),
        (
            r#"[{"input_ids": {"dtype": "int32", "shape": [1, 1], "data": [1]}}]"#,
            "causal_mask",
        ),
        (
            r#"[{"input_ids": {"dtype": "int32", "shape": [1, 2], "data": [1]},
                 "causal_mask": {"dtype": "fp16", "shape": [1, 1, 1, 1], "data": [0]}}]"#,
            "holds 2 elements",
        ),
    ] {
        std::fs::write(&calls, text).unwrap();
        let out = kiln(&[
            "predict",
            s(&pkg),
            "--calls",
            s(&calls),
            "--out",
            s(&dir.join("o")),
        ]);
        assert_bad_input(&out, &[needle]);
    }
    let out = kiln(&[
        "predict",
        s(&pkg),
        "--calls",
        "/nonexistent/calls.json",
        "--out",
        s(&dir),
    ]);
    assert_bad_input(&out, &["/nonexistent/calls.json"]);
}
