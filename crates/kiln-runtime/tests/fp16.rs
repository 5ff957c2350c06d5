//! The fp16 reference forward and the fp16 fix on tiny models: the f32 mode computes what a
//! session computes; a model whose residual stream leaves the fp16 range fails the check; the
//! fix rescales its weights without changing a single f32 logit, and the fixed model passes.
//! (The real models' figures are in the CLI tests.)

#[allow(dead_code)]
mod tiny;

use kiln_format::ggml::GgmlType;
use kiln_runtime::fp16::{self, GraphFix, RangeReport, Rounding, FP16_MAX};
use kiln_runtime::fp16_fix;
use kiln_runtime::validate::cosine;
use kiln_runtime::weights::GgufSource;
use kiln_runtime::{arch, Logits, Model, ThreadPool};
use std::sync::Arc;
use tiny::{exact_session, random_tokens, Spec, TinyFile};

/// A tiny model whose residual stream grows far beyond fp16: its first layer's contribution
/// to the stream (down projection in Llama, post-feed-forward norm in Gemma) multiplied by
/// `boost`.
fn boosted(spec: &Spec, name: &str, boost: f32) -> std::path::PathBuf {
    let mut f = TinyFile::generate(spec, 4242);
    let writer = if spec.arch == "gemma3" {
        "blk.0.post_ffw_norm.weight"
    } else {
        "blk.0.ffn_down.weight"
    };
    f.tensor_mut(writer)
        .values
        .iter_mut()
        .for_each(|v| *v *= boost);
    f.write(name)
}

#[test]
fn f32_mode_matches_the_session() {
    let pool = ThreadPool::new(2);
    for (name, spec) in [
        ("fp16_llama", Spec::llama()),
        ("fp16_gemma", Spec::gemma3()),
    ] {
        let model = Model::load(TinyFile::generate(&spec, 7).write(name)).unwrap();
        let tokens = random_tokens(3, 12, spec.vocab);
        let mut report = RangeReport::default();
        let ours = fp16::forward(
            &model,
            &pool,
            &tokens,
            Rounding::None,
            &GraphFix::default(),
            &mut report,
        )
        .unwrap();
        let mut s = exact_session(&model, &pool, 64);
        let theirs = s.forward(&tokens, Logits::Last).unwrap();
        let c = cosine(&ours, &theirs);
        assert!(c > 0.999_999, "{name}: cosine {c}");
        let max_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_diff < 1e-3, "{name}: max diff {max_diff}");
        // Every layer reports every operation it ran.
        for layer in 0..spec.n_layers {
            for op in [
                "attn_norm.square",
                "attn_scores",
                "ffn_gated",
                "ffn_residual",
            ] {
                assert!(report.get(Some(layer), op).is_some(), "{name}: {op}");
            }
        }
        assert_eq!(
            report.get(Some(0), "post_ffw_norm").is_some(),
            spec.arch == "gemma3"
        );
    }
}

#[test]
fn the_fix_rescales_the_residual_stream_exactly_and_the_check_then_passes() {
    let pool = ThreadPool::new(2);
    let llama = Spec {
        untied_output: true,
        matrix_type: GgmlType::Q4_1,
        ..Spec::llama()
    };
    for (name, spec, boost) in [
        ("fp16_fix_llama", llama, 30_000.0),
        ("fp16_fix_gemma", Spec::gemma3(), 60_000.0),
    ] {
        let path = boosted(&spec, name, boost);
        let file = Arc::new(kiln_format::gguf::GgufFile::open(&path).unwrap());
        let config = arch::config_from_gguf(&file).unwrap();
        let source = GgufSource(Arc::clone(&file));
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| random_tokens(i, 10, spec.vocab)).collect();
        let texts: Vec<(String, Vec<u32>)> = prompts
            .iter()
            .map(|p| (format!("{p:?}"), p.clone()))
            .collect();

        let original = Model::from_source(config.clone(), &source).unwrap();
        let before = fp16::check(&original, &pool, &texts, &GraphFix::default()).unwrap();
        assert!(
            !before.passed(),
            "{name}: the boosted model should overflow"
        );
        let residual = before.report.max_of("ffn_residual");
        assert!(residual > FP16_MAX, "{name}: residual {residual}");

        let safe = fp16_fix::make_safe(&config, &source, &pool, &prompts).unwrap();
        let fix = &safe.fix;
        // The smallest power of two bringing the stream under half the fp16 range.
        let want = (residual * fp16_fix::HEADROOM / FP16_MAX)
            .log2()
            .ceil()
            .exp2();
        assert_eq!(fix.residual_divisor, want, "{name}: {fix:?}");
        assert_eq!(fix.scaled_tensors.len(), 2 * spec.n_layers, "{name}");
        assert_eq!(fix.inexact_scales, 0, "{name}");
        assert!(fix.graph.fp32_ops.is_empty(), "{name}: {fix:?}");
        assert!(fix.graph.max_scaled_norms.iter().any(|n| n == "attn_norm"));
        assert_eq!(fix.calibration.after.failures, 0, "{name}: {fix:?}");

        // The f32 network is unchanged, bit for bit: every rescaling is by a power of two.
        let fixed = Model::from_source(safe.config.clone(), &safe.source).unwrap();
        let tokens = random_tokens(99, 16, spec.vocab);
        let a = exact_session(&original, &pool, 64)
            .forward(&tokens, Logits::All)
            .unwrap();
        let b = exact_session(&fixed, &pool, 64)
            .forward(&tokens, Logits::All)
            .unwrap();
        let differ = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            differ.is_none(),
            "{name}: the fixed model's logits differ first at {differ:?}"
        );

        let after = fp16::check(&fixed, &pool, &texts, &fix.graph).unwrap();
        assert!(after.passed(), "{name}: {:?}", after.report.failures());
        assert!(after.report.max_of("ffn_residual") <= FP16_MAX / fp16_fix::HEADROOM);
        for run in &after.prompts {
            assert!(
                run.cosine > 0.999,
                "{name}: strict fp16 cosine {}",
                run.cosine
            );
        }
    }
}

#[test]
fn an_op_no_rescaling_reaches_is_marked_fp32() {
    // Huge logits from an untied output matrix: not in the residual stream, so no divisor
    // helps; the fix must say so and keep them in fp32.
    let pool = ThreadPool::new(2);
    let spec = Spec {
        untied_output: true,
        ..Spec::llama()
    };
    let mut f = TinyFile::generate(&spec, 5);
    f.tensor_mut("output.weight")
        .values
        .iter_mut()
        .for_each(|v| *v *= 1e5);
    let path = f.write("fp16_fix_logits");
    let file = Arc::new(kiln_format::gguf::GgufFile::open(&path).unwrap());
    let config = arch::config_from_gguf(&file).unwrap();
    let source = GgufSource(Arc::clone(&file));
    let prompts = vec![random_tokens(1, 8, spec.vocab)];
    let safe = fp16_fix::make_safe(&config, &source, &pool, &prompts).unwrap();
    assert_eq!(safe.fix.residual_divisor, 1.0);
    assert_eq!(safe.fix.graph.fp32_ops, vec!["logits".to_string()]);
    assert!(
        safe.fix
            .notes
            .iter()
            .any(|n| n.contains("logits") && n.contains("fp32")),
        "{:?}",
        safe.fix.notes
    );
    assert_eq!(safe.fix.calibration.after.failures, 0);
}
