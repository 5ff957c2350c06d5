//! `kiln run` and `kiln logits` on Core ML packages: SmolLM2 exported by `kiln export coreml`
//! against the GGUF it came from (kiln's exact CPU path) and against Hugging Face
//! transformers' reference; coremltools' tiny Llama packages against transformers' logits;
//! tokenizers carried in the package's metadata or sidecar; refusals with exit 2.

mod common;
use common::*;

use kiln_coreml::proto;
use prost::Message;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("cli-mlpackage-{}-{tag}", std::process::id()))
}

const CONTEXT: usize = 128;
const MAX_QUERY: usize = 16;

/// SmolLM2 exported once for every test here: fp16, 128 positions, at most 16 tokens per
/// call, so longer prompts run as several calls.
fn smollm2_package() -> &'static Path {
    static PKG: OnceLock<PathBuf> = OnceLock::new();
    PKG.get_or_init(|| {
        let pkg = tmpdir("export").keep().join("smollm2.mlpackage");
        export_smollm2(&pkg, &[]);
        pkg
    })
}

/// `kiln export coreml` of SmolLM2 with the settings above, plus `extra`.
fn export_smollm2(pkg: &Path, extra: &[&str]) {
    let (context, max_query) = (CONTEXT.to_string(), MAX_QUERY.to_string());
    let source = smollm2();
    let mut args = vec![
        "export",
        "coreml",
        s(&source),
        "-o",
        s(pkg),
        "--context",
        &context,
        "--max-query",
        &max_query,
    ];
    args.extend_from_slice(extra);
    kiln_ok(&args);
}

fn reference() -> Value {
    let path = repo().join("../shared/reference/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn joined(ids: &[u64]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn logits_of(model: &Path, ids: &[u64], out: &Path, extra: &[&str]) -> Vec<f32> {
    let ids = joined(ids);
    let mut args = vec!["logits", s(model), "--token-ids", &ids, "--out", s(out)];
    args.extend_from_slice(extra);
    kiln_ok(&args);
    read_f32(out)
}

/// The package's logits after the last prompt token against kiln's exact CPU path on the
/// GGUF and against transformers (float32, weights dequantized from the same GGUF); the
/// 37-token chat prompt runs as calls of 16, 16 and 5 tokens.
#[test]
fn smollm2_package_logits_match_the_gguf_and_transformers() {
    let pkg = smollm2_package();
    let reference = reference();
    let dir = tmpdir("logits");
    for name in ["capital", "capital_chat"] {
        let case = &reference["cases"][name];
        let ids = ids_of(&case["prompt_token_ids"]);
        let got = logits_of(pkg, &ids, &dir.join(format!("{name}.pkg.f32")), &[]);
        let cpu = logits_of(
            &smollm2(),
            &ids,
            &dir.join(format!("{name}.gguf.f32")),
            &["--precision", "exact"],
        );
        let hf = read_f32(
            &repo()
                .join("../shared/reference/smollm2")
                .join(format!("{name}.last_logits.f32")),
        );
        let (c_cpu, c_hf) = (cosine(&got, &cpu), cosine(&got, &hf));
        eprintln!(
            "{name} ({} tokens): cosine {c_cpu:.6} against the GGUF, {c_hf:.6} against transformers; top-1 {} / {} / {}",
            ids.len(),
            argmax(&got),
            argmax(&cpu),
            argmax(&hf)
        );
        assert!(c_cpu >= 0.99, "{name}: cosine {c_cpu} against the GGUF");
        assert!(c_hf >= 0.99, "{name}: cosine {c_hf} against transformers");
        assert_eq!(argmax(&got), argmax(&cpu), "{name}");
        assert_eq!(
            argmax(&got) as u64,
            case["last_top10_ids"][0].as_u64().unwrap(),
            "{name}"
        );
    }
}

/// `kiln validate` takes the exported package itself as the candidate: the executor's logits
/// against the GGUF's on a prompt and a teacher-forced continuation, gated like any candidate
/// (exit 1 when a bar is set beyond what fp16 reaches), and refused as a source (exit 2).
#[test]
fn validate_gates_the_exported_package_against_its_source() {
    let pkg = smollm2_package();
    let dir = tmpdir("validate");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\n").unwrap();
    let args = |min_cos: &'static str| {
        vec![
            "validate".to_string(),
            s(pkg).to_string(),
            "--against".to_string(),
            s(&smollm2()).to_string(),
            "--prompts".to_string(),
            s(&prompts).to_string(),
            "--continuation".to_string(),
            "3".to_string(),
            "--min-cosine".to_string(),
            min_cos.to_string(),
            "--json".to_string(),
        ]
    };
    let pass = args("0.999");
    let pass: Vec<&str> = pass.iter().map(String::as_str).collect();
    let v = run_json(&pass);
    let prompt = &v["prompts"][0];
    let min_cos = prompt["min_cosine"].as_f64().unwrap();
    println!("package vs GGUF: {prompt}");
    assert!(min_cos >= 0.999, "min cosine {min_cos}");
    assert_eq!(prompt["top1_agreements"], prompt["steps"]);
    // fp16 weights cannot reach a cosine of exactly 1 everywhere: a bar there fails, exit 1.
    let strict = args("0.99999999");
    let strict: Vec<&str> = strict.iter().map(String::as_str).collect();
    let out = kiln(&strict);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln(&["validate", s(&smollm2()), "--against", s(pkg)]);
    assert_bad_input(&out, &["candidate, not the source"]);
}

/// SmolLM2 exported in four parts of at most 100 MB runs as one model by the name it was
/// exported to: `kiln logits` gives the single package's logits (hidden states handed over in
/// fp16 between parts), `kiln validate` passes the same bar, and `kiln verify` checks every
/// part, naming one whose weights changed after export.
#[test]
fn smollm2_split_over_packages_runs_as_one() {
    let whole = smollm2_package();
    let dir = tmpdir("split");
    let pkg = dir.join("smol.mlpackage");
    export_smollm2(&pkg, &["--max-chunk-mb", "100"]);
    // Embedding + layers 0..6, layers 6..20, 20..30, then the tied head alone (56.6 MB).
    let parts: Vec<PathBuf> = (1..=4)
        .map(|i| dir.join(format!("smol-part{i}.mlpackage")))
        .collect();
    assert!(parts.iter().all(|p| p.is_dir()) && !pkg.exists());
    assert!(!dir.join("smol-part5.mlpackage").exists());

    let case = &reference()["cases"]["capital_chat"];
    let ids = ids_of(&case["prompt_token_ids"]);
    let want = logits_of(whole, &ids, &dir.join("whole.f32"), &[]);
    let got = logits_of(&pkg, &ids, &dir.join("split.f32"), &[]);
    let (c, d) = (cosine(&got, &want), max_abs_diff(&got, &want));
    eprintln!("split package: cosine {c:.7}, max abs diff {d:.4} against the single package");
    assert!(c >= 0.99999, "cosine {c}");
    assert_eq!(argmax(&got), argmax(&want));
    let from_part = logits_of(&parts[1], &ids, &dir.join("part2.f32"), &[]);
    assert_eq!(from_part, got);

    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\n").unwrap();
    let v = run_json(&[
        "validate",
        s(&pkg),
        "--against",
        s(&smollm2()),
        "--prompts",
        s(&prompts),
        "--continuation",
        "3",
        "--min-cosine",
        "0.999",
        "--json",
    ]);
    let min_cos = v["prompts"][0]["min_cosine"].as_f64().unwrap();
    assert!(min_cos >= 0.999, "min cosine {min_cos}");

    let report = run_json(&["verify", s(&pkg), "--json"]);
    assert_eq!(report["packages"].as_array().unwrap().len(), 4);
    // A byte of part 2's weights changed: its sha256 no longer matches kiln.json.
    let weights = parts[1].join("Data/com.apple.CoreML/weights/weight.bin");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    assert_bad_input(
        &kiln(&["verify", s(&pkg)]),
        &["smol-part2.mlpackage", "sha256", "package 2 of 4"],
    );
}

/// `kiln perplexity` scores the package's own logits: on the first 600 characters of the
/// reference text in chunks of 64, within 0.5 % of the GGUF's exact path (fp16 weights and
/// activations against f32; measured 0.04 % on 1500 characters in chunks of 128); a `--ctx`
/// beyond the package's context is refused.
#[test]
fn perplexity_of_the_package_matches_the_gguf() {
    let pkg = smollm2_package();
    let dir = tmpdir("perplexity");
    let text =
        std::fs::read_to_string(repo().join("../shared/reference/text/ppl_dev.txt")).unwrap();
    let cut: String = text.chars().take(600).collect();
    let file = dir.join("text.txt");
    std::fs::write(&file, cut).unwrap();
    let ppl = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            s(model),
            "--text-file",
            s(&file),
            "--ctx",
            "64",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v = run_json(&args);
        (
            v["ppl"].as_f64().unwrap(),
            v["scored_tokens"].as_u64().unwrap(),
        )
    };
    let (p_pkg, n_pkg) = ppl(pkg, &[]);
    let (p_gguf, n_gguf) = ppl(&smollm2(), &["--precision", "exact"]);
    eprintln!("perplexity: package {p_pkg:.4}, GGUF {p_gguf:.4} over {n_pkg} tokens");
    assert_eq!(n_pkg, n_gguf);
    assert!(n_pkg > 100, "{n_pkg} tokens scored");
    assert!((p_pkg / p_gguf - 1.0).abs() < 0.005, "{p_pkg} vs {p_gguf}");
    let out = kiln(&[
        "perplexity",
        s(pkg),
        "--text-file",
        s(&file),
        "--ctx",
        "256",
    ]);
    assert_bad_input(&out, &["--ctx 256", "context length 128"]);
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run_json(args: &[&str]) -> Value {
    serde_json::from_str(kiln_ok(args).trim()).unwrap()
}

/// Greedy generation through the package (tokenizer borrowed from the GGUF) against the
/// GGUF on kiln's exact path and transformers' greedy ids: identical up to the first
/// position where transformers' two best logits are within 0.1 of each other.
#[test]
fn smollm2_package_generates_greedily_like_the_gguf() {
    let pkg = smollm2_package();
    let model = smollm2();
    let reference = reference();
    for name in ["capital", "code"] {
        let case = &reference["cases"][name];
        let prompt = case["input_text"].as_str().unwrap();
        let common = [
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "-n",
            "8",
            "--ignore-eos",
            "--json",
        ];
        let mut args = vec!["run", s(pkg), "--tokenizer", s(&model)];
        args.extend_from_slice(&common);
        let got = run_json(&args);
        let mut args = vec!["run", s(&model), "--precision", "exact"];
        args.extend_from_slice(&common);
        let cpu = run_json(&args);
        assert_eq!(
            ids_of(&got["prompt_token_ids"]),
            ids_of(&case["prompt_token_ids"])
        );
        let (got, cpu) = (ids_of(&got["token_ids"]), ids_of(&cpu["token_ids"]));
        let want = ids_of(&case["greedy_32_ids"]);
        let gaps: Vec<f64> = case["greedy_32_top2_gap"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        let firm = gaps.iter().take(8).take_while(|&&g| g >= 0.1).count();
        eprintln!(
            "{name}: package {got:?}, GGUF {cpu:?}, transformers {:?} ({firm} before a near-tie)",
            &want[..8]
        );
        assert_eq!(got.len(), 8);
        assert_eq!(got[..firm], cpu[..firm], "{name}: package against the GGUF");
        assert_eq!(
            got[..firm],
            want[..firm],
            "{name}: package against transformers"
        );
        assert!(firm >= 5, "{name}: the test needs a few firm tokens");
    }
}

/// A copy of `src` whose model specification `edit` changes; the weights are linked, not
/// copied.
fn edited_copy(src: &Path, dest: &Path, edit: impl FnOnce(&mut proto::Model)) {
    let _ = std::fs::remove_dir_all(dest);
    let spec_rel = Path::new("Data/com.apple.CoreML/model.mlmodel");
    let weights_rel = Path::new("Data/com.apple.CoreML/weights/weight.bin");
    std::fs::create_dir_all(dest.join(weights_rel).parent().unwrap()).unwrap();
    std::fs::copy(src.join("Manifest.json"), dest.join("Manifest.json")).unwrap();
    if src.join(weights_rel).exists() {
        std::fs::hard_link(src.join(weights_rel), dest.join(weights_rel))
            .or_else(|_| std::fs::copy(src.join(weights_rel), dest.join(weights_rel)).map(|_| ()))
            .unwrap();
    }
    let bytes = std::fs::read(src.join(spec_rel)).unwrap();
    let mut model = proto::Model::decode(bytes.as_slice()).unwrap();
    edit(&mut model);
    std::fs::write(dest.join(spec_rel), model.encode_to_vec()).unwrap();
}

fn set_metadata(model: &mut proto::Model, key: &str, value: String) {
    let desc = model.description.as_mut().unwrap();
    desc.metadata
        .get_or_insert_with(Default::default)
        .user_defined
        .insert(key.to_string(), value);
}

/// Tokenizers the package carries, in the forms `kiln export coreml` writes: a Hugging Face
/// tokenizer.json in the user metadata (`kiln.tokenizer_json`) with the chat template and
/// special tokens beside it, so a chat prompt tokenizes exactly as transformers' reference;
/// and a sidecar kiln.json beside the package (a GGUF tokenizer spec, query lengths, special
/// tokens), honoured only when it lists this package.
#[test]
fn tokenizers_carried_by_the_package_are_used() {
    let pkg = smollm2_package();
    let reference = reference();
    let dir = tmpdir("tokenizers");
    let file = kiln_format::gguf::GgufFile::open(smollm2()).unwrap();
    let tok = kiln_tokenizer::Tokenizer::from_gguf(&file).unwrap();
    let mut spec = kiln_tokenizer::TokenizerSpec::from_gguf(&file).unwrap();
    let template = spec
        .chat_template
        .take()
        .expect("SmolLM2 carries a chat template");
    let hf_dir = dir.join("hf");
    tok.save_hf(&hf_dir).unwrap();
    let tokenizer_json = std::fs::read_to_string(hf_dir.join("tokenizer.json")).unwrap();

    let with_meta = dir.join("meta.mlpackage");
    edited_copy(pkg, &with_meta, |m| {
        set_metadata(m, "kiln.tokenizer_json", tokenizer_json.clone());
        set_metadata(m, "kiln.chat_template", template.clone());
        set_metadata(m, "kiln.eos_token_id", tok.eos_id().unwrap().to_string());
    });
    let case = &reference["cases"]["capital_chat"];
    let messages = dir.join("messages.json");
    std::fs::write(&messages, case["messages"].to_string()).unwrap();
    let got = run_json(&[
        "run",
        s(&with_meta),
        "--messages",
        s(&messages),
        "--temperature",
        "0",
        "-n",
        "1",
        "--json",
    ]);
    assert_eq!(
        ids_of(&got["prompt_token_ids"]),
        ids_of(&case["prompt_token_ids"])
    );
    assert_eq!(
        ids_of(&got["token_ids"]),
        ids_of(&case["greedy_32_ids"])[..1]
    );

    // A sidecar beside the package, as the exporter writes it.
    let folder = dir.join("export");
    std::fs::create_dir_all(&folder).unwrap();
    let beside = folder.join("smol.mlpackage");
    // Without the tokenizer the exporter put in the metadata: the sidecar's is the only one.
    edited_copy(pkg, &beside, |m| {
        let meta = m.description.as_mut().unwrap().metadata.as_mut().unwrap();
        meta.user_defined.remove("kiln.tokenizer_json");
        meta.user_defined.remove("kiln.chat_template");
    });
    let sidecar = |packages: &[&str]| {
        let packages: Vec<Value> = packages.iter().map(|p| json!({ "path": p })).collect();
        let doc = json!({
            "format": "kiln-coreml",
            "context": CONTEXT,
            "query_length": {"min": 1, "max": MAX_QUERY},
            "tokenizer": {"kind": "gguf", "spec": spec},
            "special_tokens": {"bos": tok.bos_id(), "eos": tok.eos_id(), "stop": tok.stop_ids(), "add_bos": tok.add_bos()},
            "packages": packages,
        });
        std::fs::write(folder.join("kiln.json"), doc.to_string()).unwrap();
    };
    sidecar(&["smol.mlpackage"]);
    let case = &reference["cases"]["capital"];
    let out = dir.join("capital.f32");
    let logits_args = [
        "logits",
        s(&beside),
        "--prompt",
        case["input_text"].as_str().unwrap(),
        "--out",
        s(&out),
    ];
    let printed: Value = serde_json::from_str(kiln_ok(&logits_args).trim()).unwrap();
    assert_eq!(
        ids_of(&printed["prompt_token_ids"]),
        ids_of(&case["prompt_token_ids"])
    );
    assert_eq!(
        argmax(&read_f32(&out)) as u64,
        case["last_top10_ids"][0].as_u64().unwrap()
    );

    // A sidecar describing other packages is not this one's; one splitting the model over
    // several packages is refused by name.
    sidecar(&["other.mlpackage"]);
    assert_bad_input(&kiln(&logits_args), &["carries no tokenizer"]);
    sidecar(&["smol.mlpackage", "smol-part2.mlpackage"]);
    assert_bad_input(
        &kiln(&logits_args),
        &["smol-part2.mlpackage", "not a package directory"],
    );
}

fn coreml_reference() -> PathBuf {
    repo().join("../shared/reference/coreml")
}

/// coremltools' tiny Llama packages through `kiln logits` (one 7-token call): the last row of
/// transformers' logits within the README's tolerances.
#[test]
fn coremltools_packages_through_kiln_logits() {
    let readme: Value = serde_json::from_str(
        &std::fs::read_to_string(coreml_reference().join("README.json")).unwrap(),
    )
    .unwrap();
    let want = read_f32(&coreml_reference().join("tiny_llama.logits_7x256.f32"));
    let last = &want[6 * 256..];
    let dir = tmpdir("tiny");
    for (scheme, tol) in readme["tolerances_seen_with_an_independent_numpy_evaluator"]
        .as_object()
        .unwrap()
    {
        let tol = tol.as_f64().unwrap() as f32;
        let pkg = coreml_reference().join(format!("tiny_llama_stateful_{scheme}.mlpackage"));
        let got = logits_of(&pkg, &[1, 2, 3, 4, 5, 77, 200], &dir.join("t.f32"), &[]);
        let d = got
            .iter()
            .zip(last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{scheme}: max abs diff {d:.6} (tolerance {tol:.4})");
        assert!(d <= tol, "{scheme}: {d}");
    }
}

#[test]
fn package_requests_that_cannot_be_served_exit_2() {
    let tiny = coreml_reference().join("tiny_llama_stateful_fp16.mlpackage");
    let dir = tmpdir("bad");
    let out = dir.join("x.f32");

    // Longer than the 64 positions the states hold.
    let long = joined(&(0..65).map(|i| i % 200).collect::<Vec<u64>>());
    let r = kiln(&["logits", s(&tiny), "--token-ids", &long, "--out", s(&out)]);
    assert_bad_input(&r, &["65 tokens", "context of 64"]);

    // No tokenizer in the package and none given.
    let out_arg = s(&out);
    for args in [
        vec!["run", s(&tiny), "--prompt", "hello"],
        vec!["logits", s(&tiny), "--prompt", "hello", "--out", out_arg],
    ] {
        assert_bad_input(&kiln(&args), &["carries no tokenizer", "--tokenizer"]);
    }

    // A prompt plus the tokens to generate beyond the context.
    let r = kiln(&[
        "run",
        s(smollm2_package()),
        "--tokenizer",
        s(&smollm2()),
        "--prompt",
        "hello",
        "-n",
        "200",
    ]);
    assert_bad_input(&r, &["context of 128"]);

    // An input no convention explains, named in the message.
    let odd = dir.join("odd.mlpackage");
    edited_copy(&tiny, &odd, |m| {
        let desc = m.description.as_mut().unwrap();
        let mut extra = desc.input[0].clone();
        extra.name = "temperature".into();
        desc.input.push(extra);
    });
    let r = kiln(&["logits", s(&odd), "--token-ids", "1,2", "--out", s(&out)]);
    assert_bad_input(
        &r,
        &["input temperature", "expected input_ids int32 [1, q]"],
    );

    // Package-only options on other models, other commands on packages.
    let r = kiln(&[
        "run",
        s(&smollm2()),
        "--tokenizer",
        s(&smollm2()),
        "--prompt",
        "hi",
    ]);
    assert_bad_input(&r, &["--tokenizer applies to Core ML packages"]);
    let r = kiln(&["chat", s(&tiny)]);
    assert_bad_input(&r, &["kiln chat does not take Core ML packages"]);

    #[cfg(not(target_vendor = "apple"))]
    {
        let r = kiln(&[
            "logits",
            s(&tiny),
            "--backend",
            "coreml",
            "--token-ids",
            "1",
            "--out",
            s(&out),
        ]);
        assert_bad_input(
            &r,
            &["needs Apple's Core ML framework", "--backend reference"],
        );
        let r = kiln(&["residency", s(&tiny), "--compute-units", "cpu-ne"]);
        assert_bad_input(
            &r,
            &[
                "kiln residency",
                "needs Apple's Core ML framework",
                "kiln verify",
            ],
        );
    }
    assert!(!out.exists());
}
