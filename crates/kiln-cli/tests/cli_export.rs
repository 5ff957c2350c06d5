//! `kiln export coreml` end to end: the exported package is verified and run with
//! `kiln predict`, and its logits are held to Hugging Face transformers' reference.

mod common;
use common::*;

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("kiln-cli-export-{}-{tag}", std::process::id()))
}

/// One prefill call of `ids` with its causal mask, as a `kiln predict` calls file.
fn prefill_call(ids: &[u64]) -> String {
    let n = ids.len();
    let mask: Vec<String> = (0..n * n)
        .map(|k| {
            if k % n > k / n {
                "\"-inf\"".to_string()
            } else {
                "0".to_string()
            }
        })
        .collect();
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!(
        r#"[{{"input_ids": {{"dtype": "int32", "shape": [1, {n}], "data": [{}]}},
            "causal_mask": {{"dtype": "fp16", "shape": [1, 1, {n}, {n}], "data": [{}]}}}}]"#,
        ids.join(", "),
        mask.join(", ")
    )
}

#[test]
fn smollm2_export_predicts_the_reference_next_token() {
    let model = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-models",
        model.display()
    );
    let refdir = repo().join("../shared/reference/smollm2");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("reference.json")).unwrap())
            .unwrap();
    let case = &reference["cases"]["capital"];
    let ids: Vec<u64> = case["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();

    let dir = tmpdir("smollm2");
    let pkg = dir.join("smollm2.mlpackage");
    let out = kiln_ok(&[
        "export",
        "coreml",
        s(&model),
        "-o",
        s(&pkg),
        "--context",
        "64",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["context"], 64);
    kiln_ok(&["verify", s(&pkg)]);

    let calls = dir.join("calls.json");
    std::fs::write(&calls, prefill_call(&ids)).unwrap();
    let out_dir = dir.join("out");
    kiln_ok(&[
        "predict",
        s(&pkg),
        "--calls",
        s(&calls),
        "--out",
        s(&out_dir),
    ]);
    let logits = read_f32(&out_dir.join("call0.logits.f32"));
    let vocab = 49152;
    assert_eq!(logits.len(), ids.len() * vocab);
    let last = &logits[(ids.len() - 1) * vocab..];
    let want = read_f32(&refdir.join("capital.last_logits.f32"));
    let cos = cosine(last, &want);
    let max_diff = last
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("smollm2 capital: cosine {cos:.7}, max abs diff {max_diff:.4}");
    assert_eq!(argmax(last), argmax(&want));
    assert_eq!(
        argmax(last) as u64,
        case["last_top10_ids"][0].as_u64().unwrap()
    );
    // Measured: cosine 0.999999, max abs diff 0.020 (fp16 weights and activations).
    assert!(cos >= 0.9999, "cosine {cos}");

    // The sidecar and the metadata carry what a runtime needs.
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("kiln.json")).unwrap()).unwrap();
    assert_eq!(sidecar["context"], 64);
    assert_eq!(
        sidecar["lm_head_pieces"], 3,
        "49152 rows in pieces of 16384"
    );
    assert_eq!(sidecar["packages"][0]["path"], "smollm2.mlpackage");
    assert_eq!(
        sidecar["packages"][0]["states"][0]["shape"],
        serde_json::json!([30, 1, 3, 64, 64])
    );
    let sha = reference["model_sha256"].as_str().unwrap();
    assert_eq!(sidecar["source"]["sha256"], sha);
    assert_eq!(sidecar["special_tokens"]["eos"], 2);
    let pkg_desc = kiln_coreml::MlPackage::open(&pkg)
        .unwrap()
        .description()
        .clone();
    let meta = &pkg_desc.metadata;
    assert_eq!(meta["kiln.source_sha256"], sha);
    assert_eq!(meta["kiln.version"], env!("CARGO_PKG_VERSION"));
    assert!(meta["kiln.chat_template"].contains("im_start"));
    let tokenizer: serde_json::Value = serde_json::from_str(&meta["kiln.tokenizer_json"]).unwrap();
    assert_eq!(tokenizer["model"]["type"], "BPE");

    // int8 weights, arg max out: the reference's next token.
    let q8 = dir.join("q8").join("smollm2-int8.mlpackage");
    kiln_ok(&[
        "export",
        "coreml",
        s(&model),
        "-o",
        s(&q8),
        "--context",
        "64",
        "--query-len",
        "1-8",
        "--quant",
        "int8-channel",
        "--output",
        "argmax",
    ]);
    // Written into a folder the export had to create, with its metadata all the same.
    let q8_desc = kiln_coreml::MlPackage::open(&q8)
        .unwrap()
        .description()
        .clone();
    assert!(q8_desc.metadata.contains_key("kiln.tokenizer_json"));
    assert_eq!(q8_desc.metadata["kiln.weights"], "int8-channel");
    let out_dir = dir.join("out-q8");
    kiln_ok(&[
        "predict",
        s(&q8),
        "--calls",
        s(&calls),
        "--out",
        s(&out_dir),
    ]);
    let next = read_f32(&out_dir.join("call0.next_token.f32"));
    assert_eq!(next.len(), ids.len());
    assert_eq!(
        next[ids.len() - 1] as u64,
        case["last_top10_ids"][0].as_u64().unwrap()
    );
}

#[test]
fn export_refuses_bad_requests_with_exit_2() {
    let dir = tmpdir("bad");
    let hf = repo().join("../shared/reference/coreml/tiny_llama_hf");
    let pkg = dir.join("tiny.mlpackage");
    for args in [
        vec!["--context", "0"],
        vec!["--context", "16", "--max-query", "32"],
        vec!["--context", "16", "--query-len", "4-2"],
        vec!["--query-len", "0"],
        vec!["--query-len", "one"],
        vec!["--context", "100000"],
        vec!["--quant", "int3"],
        vec!["--quant", "int8-channel", "--lut-group-channels", "16"],
        vec!["--quant", "lut4", "--lut-group-channels", "7"],
        vec!["--lm-head-split", "0"],
        vec!["--max-chunk-mb", "0"],
        vec!["--max-chunk-mb", "0.01"],
        vec!["--output", "probabilities"],
        vec!["--precision", "bf16"],
    ] {
        let mut all = vec!["export", "coreml", s(&hf), "-o", s(&pkg)];
        all.extend(args.iter().copied());
        let out = kiln(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!pkg.exists());
    }
    let out = kiln(&[
        "export",
        "coreml",
        s(&dir.join("missing.gguf")),
        "-o",
        s(&pkg),
    ]);
    assert_eq!(out.status.code(), Some(2));
    // The tiny Hugging Face Llama exports and verifies.
    kiln_ok(&["export", "coreml", s(&hf), "-o", s(&pkg), "--context", "64"]);
    kiln_ok(&["verify", s(&pkg)]);
}
