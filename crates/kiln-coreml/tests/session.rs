//! `CoremlSession`: language-model packages run token by token with the call protocol read
//! from their description. Held to transformers' logits for coremltools' tiny Llama packages,
//! to kiln's CPU runtime for exported tiny GGUF models, and to answers computed here for a
//! hand-built package with positions and an argmax head.

#[allow(dead_code)]
#[path = "../../kiln-runtime/tests/tiny/mod.rs"]
mod tiny;

use kiln_coreml::export::{
    export_llama, Arg, ExportOptions, InputDim, PackageWriter, ProgramBuilder,
};
use kiln_coreml::proto::{self, DataType};
use kiln_coreml::{
    ArrayDataType, ArrayInfo, CallProtocol, CoremlSession, DimRange, FeatureInfo, FeatureType,
    ModelDescription, OutputKind, PackageInfo, PlannedCall, PositionInput, PositionLayout,
    QueryLengths, ShapeFlexibility,
};
use kiln_runtime::generate::TokenModel;
use kiln_runtime::{Logits, Model, ThreadPool};
use std::path::PathBuf;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/coreml")
}

fn out_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("session-{name}.mlpackage"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// coremltools' packages, called as `README.json` says (a 5-token prefill, then 77 and 200
/// one at a time), and again in one 7-token call: every row within the tolerance an
/// independent numpy evaluator needed.
#[test]
fn reference_packages_match_transformers_call_by_call() {
    let readme: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir().join("README.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = readme["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 77, 200]);
    let want = read_f32(&reference_dir().join("tiny_llama.logits_7x256.f32"));
    for (scheme, tol) in readme["tolerances_seen_with_an_independent_numpy_evaluator"]
        .as_object()
        .unwrap()
    {
        // The README gives two significant digits (the executor lands at 0.092478 for
        // int4_block32 and 0.1014 for the LUT package, as the numpy evaluator did).
        let tol = tol.as_f64().unwrap() as f32 * 1.02;
        let path = reference_dir().join(format!("tiny_llama_stateful_{scheme}.mlpackage"));
        let mut s = CoremlSession::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let p = s.protocol().clone();
        assert_eq!(p.ids, "input_ids");
        assert_eq!(p.query, QueryLengths::Range { min: 1, max: 64 });
        assert_eq!(p.context, 64);
        assert!(matches!(
            &p.position,
            PositionInput::CausalMask { name, dtype: ArrayDataType::Float16, fixed_width: None }
                if name == "causal_mask"
        ));
        assert_eq!(p.states, ["keyCache", "valueCache"]);
        assert_eq!(s.vocab_size(), 256);

        let mut got = s.forward_all(&ids[..5]).unwrap();
        assert_eq!(s.n_past(), 5);
        got.extend(s.forward_all(&ids[5..6]).unwrap());
        got.extend(s.forward_all(&ids[6..7]).unwrap());
        assert_eq!(s.n_past(), 7);
        let d = max_abs_diff(&got, &want);
        eprintln!("{scheme}: max abs diff {d:.6} over 7 rows (tolerance {tol})");
        assert!(d <= tol, "{scheme}: max abs diff {d} > {tol}");

        s.reset();
        assert_eq!(s.n_past(), 0);
        let once = s.forward_all(&ids).unwrap();
        let d = max_abs_diff(&once, &want);
        assert!(d <= tol, "{scheme} in one call: max abs diff {d} > {tol}");
        s.reset();
        let last = s.forward_last(&ids).unwrap();
        assert_eq!(last, once[6 * 256..]);
    }
}

/// An exported tiny GGUF Llama taking at most 3 tokens per call: a 10-token prompt runs as
/// 3 + 3 + 3 + 1 and matches kiln's CPU runtime (exact path) on every row; the context is
/// enforced and a reset session answers the same again.
#[test]
fn prompts_split_into_calls_match_the_runtime() {
    let spec = tiny::Spec::llama();
    let path = tiny::TinyFile::generate(&spec, 5).write("session-split");
    let model = Model::load(&path).unwrap();
    let dest = out_dir("split");
    let opts = ExportOptions {
        context: 12,
        query: (1, 3),
        ..ExportOptions::default()
    };
    export_llama(&model, &dest, &opts).unwrap_or_else(|e| panic!("{e}"));
    let mut s = CoremlSession::open(&dest).unwrap();
    assert_eq!(s.protocol().query, QueryLengths::Range { min: 1, max: 3 });
    assert_eq!(s.n_ctx(), 12);
    assert_eq!(s.vocab_size(), spec.vocab);
    let calls = s.protocol().plan(0, 10).unwrap();
    let sizes: Vec<usize> = calls.iter().map(|c| c.tokens).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);

    let tokens = tiny::random_tokens(6, 10, spec.vocab);
    let pool = ThreadPool::new(2);
    let mut session = tiny::exact_session(&model, &pool, 12);
    let want = session.forward(&tokens, Logits::All).unwrap();
    let got = s.forward_all(&tokens).unwrap();
    let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let d = max_abs_diff(&got, &want);
    eprintln!("split prompt: max abs diff {d:.6}, max |logit| {scale:.3}");
    // fp16 weights and caches against f32 ones (see export.rs: measured at most 5.5e-4).
    assert!(d <= 1.5e-3 * scale, "max abs diff {d} (scale {scale})");

    // Two more tokens fit, three do not.
    let e = s.forward_all(&tokens[..3]).unwrap_err().to_string();
    assert!(e.contains("context of 12"), "{e}");
    assert_eq!(s.n_past(), 10);
    let more = TokenModel::forward_last(&mut s, &tokens[..2]).unwrap();
    assert_eq!(more.len(), spec.vocab);

    s.reset();
    assert_eq!(s.forward_all(&tokens).unwrap(), got);
    let e = s.forward_all(&[spec.vocab as u32]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

const TOY_VOCAB: usize = 8;

fn toy_table() -> Vec<f32> {
    (0..TOY_VOCAB * TOY_VOCAB)
        .map(|i| ((i * 37 + 11) % 23) as f32 * 0.25)
        .collect()
}

fn toy_slope() -> Vec<f32> {
    (0..TOY_VOCAB).map(|v| v as f32 * 0.7 - 2.0).collect()
}

/// A hand-built package with positions and an argmax head: `next_token[t]` is the argmax
/// over `v` of `table[id_t][v] + position_t * slope[v]`, at most 3 tokens per call,
/// `kiln.context` 16 in its metadata.
fn toy_argmax_package(name: &str) -> PathBuf {
    let dest = out_dir(name);
    let writer = PackageWriter::create(&dest).unwrap();
    let mut b = ProgramBuilder::new(None);
    let ids = b.input(
        "input_ids",
        DataType::Int32,
        &[InputDim::Fixed(1), InputDim::Range(1, 3)],
    );
    let pos = b.input(
        "position_ids",
        DataType::Int32,
        &[InputDim::Fixed(1), InputDim::Range(1, 3)],
    );
    let table = b.const_f32("table", &[TOY_VOCAB, TOY_VOCAB], &toy_table());
    let rows = b.gather("rows", &table, &ids, 0);
    let pos_f = b.cast("pos_f", &pos, DataType::Float32);
    let pos_col = b.expand_dims("pos_col", &pos_f, 2);
    let slope = b.const_f32("slope", &[TOY_VOCAB], &toy_slope());
    let ramp = b.mul("ramp", &pos_col, &slope);
    let scores = b.add("scores", &rows, &ramp);
    let axis = b.int("axis", -1);
    let keep = b.boolean("keep", false);
    let next = b.op(
        "reduce_argmax",
        "next_token",
        &[
            ("x", Arg::One(&scores)),
            ("axis", Arg::One(&axis)),
            ("keep_dims", Arg::One(&keep)),
        ],
        DataType::Int32,
        vec![Some(1), None],
    );
    let metadata = proto::Metadata {
        user_defined: [("kiln.context".to_string(), "16".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let (model, _) = b
        .finish(&[&next], metadata)
        .unwrap_or_else(|e| panic!("{e}"));
    writer.commit(&model).unwrap();
    dest
}

fn toy_expected(ids: &[u32]) -> Vec<u32> {
    let (table, slope) = (toy_table(), toy_slope());
    ids.iter()
        .enumerate()
        .map(|(p, &id)| {
            let row: Vec<f32> = (0..TOY_VOCAB)
                .map(|v| table[id as usize * TOY_VOCAB + v] + p as f32 * slope[v])
                .collect();
            kiln_runtime::sampling::argmax(&row) as u32
        })
        .collect()
}

#[test]
fn positions_and_argmax_heads_are_understood() {
    let dest = toy_argmax_package("toy-argmax");
    let mut s = CoremlSession::open(&dest).unwrap_or_else(|e| panic!("{e}"));
    let p = s.protocol().clone();
    assert_eq!(
        p.position,
        PositionInput::Positions {
            name: "position_ids".into(),
            layout: PositionLayout::Batch
        }
    );
    assert_eq!(
        p.output,
        OutputKind::NextToken {
            name: "next_token".into()
        }
    );
    assert_eq!(p.context, 16);
    assert!(!s.has_logits());
    let ids = [3u32, 1, 4, 1, 5, 2, 6, 7];
    let want = toy_expected(&ids);
    // Different answers at different positions, or the test could not see positions.
    assert!(want.iter().any(|&t| t != want[0]), "{want:?}");
    let mut got = s.next_tokens(&ids[..5]).unwrap();
    got.extend(s.next_tokens(&ids[5..]).unwrap());
    assert_eq!(got, want);
    let e = s.forward_all(&ids).unwrap_err().to_string();
    assert!(e.contains("next_token"), "{e}");

    // Through the generation interface: a row that every sampler resolves to the token.
    s.reset();
    let row = TokenModel::forward_last(&mut s, &ids).unwrap();
    assert_eq!(kiln_runtime::sampling::argmax(&row) as u32, want[7]);
    assert_eq!(row.iter().filter(|x| x.is_finite()).count(), 1);
}

fn array(dtype: ArrayDataType, ranges: &[(usize, Option<usize>)]) -> FeatureType {
    FeatureType::Array(ArrayInfo {
        dtype,
        shape: ranges.iter().map(|r| r.0).collect(),
        flexibility: ShapeFlexibility::Ranges(
            ranges
                .iter()
                .map(|&(lower, upper)| DimRange { lower, upper })
                .collect(),
        ),
    })
}

fn feature(name: &str, ty: FeatureType) -> FeatureInfo {
    FeatureInfo {
        name: name.into(),
        ty,
        optional: false,
    }
}

fn description(inputs: Vec<FeatureInfo>) -> ModelDescription {
    ModelDescription {
        specification_version: 9,
        inputs,
        outputs: vec![feature(
            "logits",
            FeatureType::Array(ArrayInfo {
                dtype: ArrayDataType::Float16,
                shape: vec![],
                flexibility: ShapeFlexibility::Unspecified,
            }),
        )],
        states: vec![],
        metadata: Default::default(),
    }
}

fn ids_input() -> FeatureInfo {
    feature(
        "input_ids",
        array(ArrayDataType::Int32, &[(1, Some(1)), (1, Some(8))]),
    )
}

fn mask_input(width: Option<usize>) -> FeatureInfo {
    feature(
        "causal_mask",
        array(
            ArrayDataType::Float32,
            &[(1, Some(1)), (1, Some(1)), (1, Some(8)), (1, width)],
        ),
    )
}

#[test]
fn unknown_conventions_are_refused_naming_the_input() {
    let info = PackageInfo::default();
    let discover = |inputs| CallProtocol::discover("pkg", &description(inputs), &info);

    let e = discover(vec![
        ids_input(),
        mask_input(Some(32)),
        feature(
            "temperature",
            array(ArrayDataType::Float32, &[(1, Some(1))]),
        ),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("input temperature") && e.contains("expected input_ids"),
        "{e}"
    );

    let e = discover(vec![ids_input()]).unwrap_err().to_string();
    assert!(e.contains("neither a causal mask nor positions"), "{e}");

    let e = discover(vec![mask_input(Some(32))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no token-id input"), "{e}");

    // An unbounded mask and no context in the metadata: the context is unknown.
    let e = discover(vec![ids_input(), mask_input(None)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("kiln.context"), "{e}");
    let with_context = PackageInfo {
        context: Some(20),
        ..Default::default()
    };
    let p = CallProtocol::discover(
        "pkg",
        &description(vec![ids_input(), mask_input(None)]),
        &with_context,
    )
    .unwrap();
    assert_eq!(p.context, 20);
    assert_eq!(p.query, QueryLengths::Range { min: 1, max: 8 });
}

/// Query lengths a package enumerates: calls use the longest that fits and pad the rest;
/// masks hide every position after each query's own.
#[test]
fn enumerated_query_lengths_pad_and_masks_are_causal() {
    let p = CallProtocol {
        ids: "input_ids".into(),
        query: QueryLengths::List(vec![1, 4]),
        position: PositionInput::CausalMask {
            name: "mask".into(),
            dtype: ArrayDataType::Float32,
            fixed_width: Some(8),
        },
        output: OutputKind::Logits {
            name: "logits".into(),
        },
        context: 8,
        states: vec![],
    };
    let plan = p.plan(0, 6).unwrap();
    assert_eq!(
        plan,
        [
            PlannedCall {
                past: 0,
                tokens: 4,
                q: 4
            },
            PlannedCall {
                past: 4,
                tokens: 1,
                q: 1
            },
            PlannedCall {
                past: 5,
                tokens: 1,
                q: 1
            },
        ]
    );
    let p4 = CallProtocol {
        query: QueryLengths::List(vec![4]),
        ..p.clone()
    };
    let plan = p4.plan(1, 2).unwrap();
    assert_eq!(
        plan,
        [PlannedCall {
            past: 1,
            tokens: 2,
            q: 4
        }]
    );
    assert!(p4.plan(6, 1).unwrap_err().contains("padded to 4"));
    assert!(p.plan(5, 4).unwrap_err().contains("context of 8"));

    let inputs = p4.inputs(&[7, 9], &plan[0]).unwrap();
    assert_eq!(inputs[0].1.shape(), &[1, 4]);
    assert_eq!(
        inputs[0].1.data(),
        &kiln_coreml::TensorData::I32(vec![7, 9, 9, 9])
    );
    let mask = inputs[1].1.to_f32_vec();
    assert_eq!(inputs[1].1.shape(), &[1, 1, 4, 8]);
    for i in 0..4 {
        for j in 0..8 {
            let open = j <= 1 + i;
            assert_eq!(mask[i * 8 + j] == 0.0, open, "row {i} column {j}");
            assert_eq!(mask[i * 8 + j] == f32::NEG_INFINITY, !open);
        }
    }
}

/// A bare `tokenizer.json` (the form `kiln export coreml` stores) gets BOS, EOS and `add_bos`
/// from the special tokens the package names, and tokenizes as the GGUF tokenizer it came
/// from.
#[test]
fn stored_tokenizer_json_takes_the_named_special_tokens() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch-models",
        gguf.display()
    );
    let file = kiln_format::gguf::GgufFile::open(&gguf).unwrap();
    let original = kiln_tokenizer::Tokenizer::from_gguf(&file).unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("session-tokenizer-json");
    original.save_hf(&dir).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let (bos, eos) = (original.bos_id().unwrap(), original.eos_id().unwrap());
    let info = PackageInfo {
        tokenizer: Some(doc.clone()),
        bos_id: Some(bos),
        eos_id: Some(eos),
        add_bos: Some(original.add_bos()),
        ..Default::default()
    };
    let t = info.tokenizer("pkg").unwrap().unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(bos), Some(eos)));
    assert_eq!(t.add_bos(), original.add_bos());
    assert!(t.stop_ids().contains(&eos));
    let text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(
        t.encode(text, true, true).unwrap(),
        original.encode(text, true, true).unwrap()
    );

    // Without them the document alone says nothing of EOS.
    let bare = PackageInfo {
        tokenizer: Some(doc),
        ..Default::default()
    };
    assert_eq!(bare.tokenizer("pkg").unwrap().unwrap().eos_id(), None);
    let bad = PackageInfo {
        tokenizer: Some(serde_json::json!({"kind": "sentencepiece"})),
        ..Default::default()
    };
    let e = bad.tokenizer("pkg").unwrap_err().to_string();
    assert!(e.contains("unknown kind") && e.contains("pkg"), "{e}");
}

/// A tiny four-layer Llama exported whole and cut into four packages (`--max-chunk-mb`):
/// opened by the name it was exported to, or by any of its parts, the chain computes the
/// whole package's logits (prompts split into calls, states carried in every part), and the
/// runtime's; a single part is not run alone and a missing part is named.
#[test]
fn split_models_run_as_one_session() {
    let spec = tiny::Spec {
        n_layers: 4,
        ..tiny::Spec::llama()
    };
    let path = tiny::TinyFile::generate(&spec, 31).write("session-four-layers");
    let model = Model::load(&path).unwrap();
    let folder = |name: &str| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("session-split-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let opts = ExportOptions {
        context: 16,
        query: (1, 3),
        ..ExportOptions::default()
    };
    let whole = folder("whole").join("tiny.mlpackage");
    export_llama(&model, &whole, &opts).unwrap();
    let dest = folder("chunked").join("tiny.mlpackage");
    // Each layer takes ~62 kB in fp16, the embedding (the tied head too) 12 kB.
    let summary = export_llama(
        &model,
        &dest,
        &ExportOptions {
            max_chunk_bytes: 80_000,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(summary.packages.len(), 4);
    assert!(!dest.exists());

    let tokens = tiny::random_tokens(8, 10, spec.vocab);
    let want = CoremlSession::open(&whole)
        .unwrap()
        .forward_all(&tokens)
        .unwrap();
    let pool = ThreadPool::new(2);
    let exact = tiny::exact_session(&model, &pool, 16)
        .forward(&tokens, Logits::All)
        .unwrap();
    let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);

    let mut s = CoremlSession::open(&dest).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.backend().contains("4 packages"), "{}", s.backend());
    assert_eq!(s.protocol().query, QueryLengths::Range { min: 1, max: 3 });
    assert_eq!(s.n_ctx(), 16);
    assert_eq!(s.vocab_size(), spec.vocab);
    assert_eq!(s.protocol().states.len(), 8);
    let got = s.forward_all(&tokens).unwrap();
    // The parts hand hidden states over as fp16 where the whole package keeps the executor's
    // f32, and both round their logits to fp16 (measured: 0.031, one fp16 step at 39.75).
    let d = max_abs_diff(&got, &want);
    let d_exact = max_abs_diff(&got, &exact);
    eprintln!("split session: max abs diff {d:.6} vs one package, {d_exact:.6} vs the runtime, max |logit| {scale:.3}");
    assert!(d <= 1.5e-3 * scale, "max abs diff {d} (scale {scale})");
    assert!(
        d_exact <= 1.5e-3 * scale,
        "max abs diff {d_exact} (scale {scale})"
    );

    // Decode after the prompt, then the same from a fresh chain opened by one of its parts.
    let next = TokenModel::forward_last(&mut s, &tokens[..2]).unwrap();
    let part3 = dest.with_file_name("tiny-part3.mlpackage");
    let mut again = CoremlSession::open(&part3).unwrap();
    assert_eq!(again.forward_all(&tokens).unwrap(), got);
    assert_eq!(
        TokenModel::forward_last(&mut again, &tokens[..2]).unwrap(),
        next
    );
    s.reset();
    assert_eq!(s.forward_all(&tokens).unwrap(), got);

    // One part alone is refused; so is a chain with a part missing.
    let pkg = kiln_coreml::MlPackage::open(&part3).unwrap();
    let exec = kiln_coreml::Executor::new(&pkg).unwrap();
    let e = CoremlSession::with_runner(&pkg, Box::new(exec))
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 packages of a split model"), "{e}");
    std::fs::remove_dir_all(dest.with_file_name("tiny-part4.mlpackage")).unwrap();
    let e = CoremlSession::open(&dest).unwrap_err().to_string();
    assert!(e.contains("tiny-part4.mlpackage"), "{e}");
}
