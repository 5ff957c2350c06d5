//! The forward pass on tiny random models against a naive f64 reference, for the features no
//! real test model exercises: q/k/v biases, split-half rotary pairs in the Llama family, Llama 3
//! frequency factors, linear rope scaling, Qwen 3 q/k norms, an untied LM head, partial rotary
//! dimensions, grouped-query sizes 1 to 4, Gemma 3 with a window far shorter than the sequence,
//! and every weight block format. Also: incremental and chunked decoding against one batch,
//! session limits, and models with inconsistent shapes.
//!
//! Tolerance: the runtime computes in f32 and the reference in f64 from the same (dequantized)
//! weights, so every logit must agree within `1e-5 * max|logit|` of the reference (measured:
//! below 1e-6). Each variant also names the mistakes it guards against, and the reference
//! making one of them on purpose must miss the runtime by at least `MISTAKE_FACTOR` times that
//! bound; otherwise the variant would not really exercise its feature.

mod tiny;

use kiln_format::ggml::GgmlType;
use kiln_format::gguf::MetadataValue;
use kiln_runtime::{Logits, Model, ModelError, Session, ThreadPool};
use tiny::{exact_session, random_tokens, Mistake, Reference, Rng, Spec, TensorSpec, TinyFile};

/// Allowed max |runtime - reference| as a fraction of the reference's largest |logit|.
const REL_TOL: f64 = 1e-5;
/// How far (in units of the tolerance) a deliberately wrong reference must land.
const MISTAKE_FACTOR: f64 = 100.0;
/// Sequence length of the forward checks: long enough that a window of 4 hides most keys.
const SEQ: usize = 20;

/// One model family configuration and the mistakes it must be able to detect.
struct Variant {
    name: &'static str,
    spec: Spec,
    mistakes: &'static [Mistake],
}

/// The configurations under test, chosen so that together they cover every optional feature
/// of the two architecture files and grouped-query group sizes 1, 2, 3 and 4.
fn variants() -> Vec<Variant> {
    let llama = Spec::llama();
    vec![
        Variant {
            name: "llama",
            spec: llama.clone(),
            mistakes: &[Mistake::SwapRopePairing, Mistake::InterleaveKvHeads],
        },
        Variant {
            name: "llama_untied_output",
            spec: Spec {
                n_kv_heads: 4,
                untied_output: true,
                ..llama.clone()
            },
            mistakes: &[Mistake::TieOutput],
        },
        Variant {
            name: "llama_rope_freqs",
            spec: Spec {
                n_kv_heads: 1,
                rope_freqs: true,
                ..llama.clone()
            },
            mistakes: &[Mistake::IgnoreRopeFactors, Mistake::SwapRopePairing],
        },
        Variant {
            name: "llama_linear_rope_x4",
            spec: Spec {
                n_layers: 3,
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 8,
                rope_dim: 8,
                linear_rope_factor: Some(4.0),
                ..llama.clone()
            },
            mistakes: &[Mistake::IgnoreLinearScaling, Mistake::InterleaveKvHeads],
        },
        Variant {
            name: "llama_partial_rope",
            spec: Spec {
                rope_dim: 8,
                vocab_from_token_list: true,
                ..llama.clone()
            },
            mistakes: &[Mistake::SwapRopePairing],
        },
        Variant {
            name: "qwen2_qkv_bias",
            spec: Spec {
                arch: "qwen2",
                n_heads: 6,
                n_kv_heads: 2,
                qkv_bias: true,
                rope_base: 1_000_000.0,
                eps: 1e-6,
                ..llama.clone()
            },
            mistakes: &[
                Mistake::IgnoreBiases,
                Mistake::SwapRopePairing,
                Mistake::InterleaveKvHeads,
            ],
        },
        Variant {
            name: "qwen3_qk_norm",
            spec: Spec {
                arch: "qwen3",
                head_dim: 32,
                rope_dim: 32,
                qk_norm: true,
                eps: 1e-6,
                ..llama.clone()
            },
            mistakes: &[
                Mistake::IgnoreQkNorm,
                Mistake::SwapRopePairing,
                Mistake::InterleaveKvHeads,
            ],
        },
        Variant {
            // Layers 0-4 and 6 are local (window 4), layer 5 is global.
            name: "gemma3_window4",
            spec: Spec {
                arch: "gemma3",
                n_layers: 7,
                n_kv_heads: 1,
                rope_base: 1_000_000.0,
                sliding_window: 4,
                eps: 1e-6,
                ..llama.clone()
            },
            mistakes: &[
                Mistake::WindowOneTooWide,
                Mistake::NoGlobalLayers,
                Mistake::GlobalLayersUseLocalBase,
                Mistake::IgnoreQkNorm,
                Mistake::SwapRopePairing,
            ],
        },
        Variant {
            // Gemma 3 4B and larger scale the global layers' positions linearly (factor 8).
            name: "gemma3_global_linear_rope_x8",
            spec: Spec {
                arch: "gemma3",
                n_layers: 6,
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: 32,
                rope_dim: 32,
                rope_base: 10_000.0,
                sliding_window: 8,
                linear_rope_factor: Some(8.0),
                eps: 1e-6,
                ..llama
            },
            mistakes: &[
                Mistake::IgnoreLinearScaling,
                Mistake::ScaleLocalLayersToo,
                Mistake::WindowOneTooWide,
            ],
        },
    ]
}

/// Max |a - b| over every logit of every row, and the reference's max |logit|.
fn max_diff(got: &[f32], want: &[Vec<f64>]) -> (f64, f64) {
    let vocab = want[0].len();
    assert_eq!(got.len(), want.len() * vocab, "logit count");
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    for (g_row, w_row) in got.chunks_exact(vocab).zip(want) {
        for (&g, &w) in g_row.iter().zip(w_row) {
            assert!(g.is_finite(), "non-finite logit {g}");
            diff = diff.max((f64::from(g) - w).abs());
            scale = scale.max(w.abs());
        }
    }
    (diff, scale)
}

/// Largest element-wise difference of two equally long f32 slices.
fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Writes `spec`'s model, loads it, and checks every position's logits against the reference
/// and the reference's deliberate mistakes against the runtime.
fn check_against_reference(name: &str, spec: &Spec, mistakes: &[Mistake], seed: u64) {
    let path = TinyFile::generate(spec, seed).write(name);
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let pool = ThreadPool::new(2);
    let tokens = random_tokens(seed ^ 0x5eed, SEQ, spec.vocab);
    let got = exact_session(&model, &pool, SEQ)
        .forward(&tokens, Logits::All)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = Reference::load(spec, &path);
    let want = reference.logits(&tokens);
    let (diff, scale) = max_diff(&got, &want);
    let bound = REL_TOL * scale;
    eprintln!(
        "{name}: max |logit| {scale:.3}, max |diff| {diff:.3e} ({:.2e} relative)",
        diff / scale
    );
    assert!(
        scale > 1.0,
        "{name}: logits too small ({scale}) to be a meaningful check"
    );
    assert!(
        diff <= bound,
        "{name}: max |diff| {diff} exceeds {bound} ({REL_TOL} * {scale})"
    );
    for &m in mistakes {
        let wrong = reference.logits_with(&tokens, Some(m));
        let (miss, _) = max_diff(&got, &wrong);
        eprintln!("{name}: reference with {m:?} misses by {miss:.3e}");
        assert!(
            miss >= MISTAKE_FACTOR * bound,
            "{name}: the reference with {m:?} still agrees with the runtime (max |diff| {miss}), \
             so this model does not exercise that feature"
        );
    }
}

#[test]
fn llama_family_and_gemma3_variants_match_the_naive_reference() {
    for (i, v) in variants().iter().enumerate() {
        check_against_reference(v.name, &v.spec, v.mistakes, 1000 + i as u64);
    }
}

/// The Gemma 3 variant's local layers must hide most of the sequence, or the window is not
/// really tested: with window 4 over 20 positions, 16 of them have keys outside it.
#[test]
fn gemma3_window_hides_most_keys() {
    let v = variants()
        .into_iter()
        .find(|v| v.name == "gemma3_window4")
        .expect("gemma3 variant");
    let hidden = (0..SEQ).filter(|&p| p + 1 > v.spec.sliding_window).count();
    assert!(
        hidden >= SEQ / 2,
        "only {hidden} positions reach past the window"
    );
    assert!(v.spec.n_layers >= 6, "no global layer");
    let path = TinyFile::generate(&v.spec, 7).write("gemma3_window_config");
    let model = Model::load(&path).unwrap();
    let windows: Vec<Option<usize>> = model
        .config
        .layers
        .iter()
        .map(|l| l.sliding_window)
        .collect();
    let local = Some(v.spec.sliding_window);
    assert_eq!(
        windows,
        vec![local, local, local, local, local, None, local]
    );
}

#[test]
fn incremental_and_chunked_decoding_match_one_batch() {
    for (i, v) in variants().iter().enumerate() {
        let seed = 2000 + i as u64;
        let path = TinyFile::generate(&v.spec, seed).write(&format!("{}_incremental", v.name));
        let model = Model::load(&path).unwrap();
        let vocab = v.spec.vocab;
        let tokens = random_tokens(seed, SEQ, vocab);
        let pool = ThreadPool::new(3);
        let batch = exact_session(&model, &pool, SEQ)
            .forward(&tokens, Logits::All)
            .unwrap();

        let mut one_by_one = exact_session(&model, &pool, SEQ);
        let mut stepped = Vec::new();
        for &t in &tokens {
            stepped.extend(one_by_one.forward(&[t], Logits::Last).unwrap());
        }
        assert_eq!(one_by_one.n_past(), SEQ);

        let mut chunked_session = exact_session(&model, &pool, SEQ);
        let mut chunked = Vec::new();
        let mut last_rows = Vec::new();
        let mut start = 0;
        for len in [5, 1, 7, SEQ - 13] {
            let chunk = &tokens[start..start + len];
            let rows = chunked_session.forward(chunk, Logits::All).unwrap();
            last_rows.extend_from_slice(&rows[(len - 1) * vocab..]);
            chunked.extend(rows);
            start += len;
        }

        let scale = batch.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let tol = 1e-5 * scale;
        let d_step = max_abs(&stepped, &batch);
        let d_chunk = max_abs(&chunked, &batch);
        let last_of_chunks: Vec<f32> = [4, 5, 12, SEQ - 1]
            .iter()
            .flat_map(|&p| batch[p * vocab..(p + 1) * vocab].to_vec())
            .collect();
        let d_last = max_abs(&last_rows, &last_of_chunks);
        eprintln!(
            "{}: token by token {d_step:.2e}, chunks {d_chunk:.2e} (max |logit| {scale:.2})",
            v.name
        );
        assert!(
            d_step <= tol,
            "{}: token by token differs by {d_step}",
            v.name
        );
        assert!(d_chunk <= tol, "{}: chunks differ by {d_chunk}", v.name);
        assert!(
            d_last <= tol,
            "{}: chunk last rows differ by {d_last}",
            v.name
        );

        // Every output element is computed by one task in a fixed order, so the thread count
        // must not change a single bit.
        let single = ThreadPool::new(1);
        let serial = exact_session(&model, &single, SEQ)
            .forward(&tokens, Logits::All)
            .unwrap();
        assert_eq!(serial, batch, "{}: 1 and 3 threads disagree", v.name);
    }
}

/// Shapes whose rows are whole K-quant super-blocks (256), so every format applies to every
/// matrix, embeddings and LM head included.
fn format_spec(ty: GgmlType) -> Spec {
    Spec {
        n_embd: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rope_dim: 64,
        n_ff: 256,
        untied_output: true,
        matrix_type: ty,
        ..Spec::llama()
    }
}

#[test]
fn every_weight_format_computes_from_its_stored_blocks() {
    let seed = 3000;
    let tokens = random_tokens(seed, 12, 96);
    let pool = ThreadPool::new(2);
    let exact_path = TinyFile::generate(&format_spec(GgmlType::F32), seed).write("format_f32");
    let exact = Reference::load(&format_spec(GgmlType::F32), &exact_path).logits(&tokens);
    for ty in GgmlType::ALL {
        let spec = format_spec(ty);
        let name = format!("format_{}", ty.name().to_lowercase());
        let path = TinyFile::generate(&spec, seed).write(&name);
        let model = Model::load(&path).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(model.token_embd.ggml_format(), Some(ty));
        assert_eq!(model.layers[1].w_down.ggml_format(), Some(ty));
        assert_eq!(model.output.ggml_format(), Some(ty));
        let got = exact_session(&model, &pool, tokens.len())
            .forward(&tokens, Logits::All)
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        let want = Reference::load(&spec, &path).logits(&tokens);
        let (diff, scale) = max_diff(&got, &want);
        let (from_f32, _) = max_diff(&got, &exact);
        eprintln!(
            "{ty}: max |diff| {diff:.3e} ({:.2e} relative) vs its blocks, {from_f32:.3e} vs the \
             f32 weights",
            diff / scale
        );
        assert!(
            diff <= REL_TOL * scale,
            "{ty}: max |diff| {diff} exceeds {REL_TOL} * {scale}"
        );
        if ty != GgmlType::F32 {
            // The file really holds rounded weights: they move the logits more than the
            // tolerance, so matching the dequantized reference means computing from the blocks.
            assert!(
                from_f32 > REL_TOL * scale,
                "{ty}: logits equal the unrounded model's ({from_f32})"
            );
        }
    }
}

/// Rewinding must forget the dropped positions entirely: what follows is computed as if they
/// had never been seen, including in a sliding-window model whose cache is shorter-lived.
#[test]
fn truncate_and_reset_rewind_the_cache() {
    for name in ["llama", "gemma3_window4"] {
        let v = variants().into_iter().find(|v| v.name == name).unwrap();
        let vocab = v.spec.vocab;
        let path = TinyFile::generate(&v.spec, 6000).write(&format!("{name}_rewind"));
        let model = Model::load(&path).unwrap();
        let pool = ThreadPool::new(2);
        let first = random_tokens(6001, 12, vocab);
        let other = random_tokens(6002, 8, vocab);
        let mut expected_tokens = first[..7].to_vec();
        expected_tokens.extend(&other);
        let expected = exact_session(&model, &pool, SEQ)
            .forward(&expected_tokens, Logits::All)
            .unwrap();
        let want = Reference::load(&v.spec, &path).logits(&expected_tokens);
        let (diff, scale) = max_diff(&expected, &want);
        assert!(diff <= REL_TOL * scale, "{name}: {diff}");

        let mut s = exact_session(&model, &pool, SEQ);
        s.forward(&first, Logits::Last).unwrap();
        s.truncate(7);
        assert_eq!(s.n_past(), 7);
        let got = s.forward(&other, Logits::All).unwrap();
        assert_eq!(got, expected[7 * vocab..], "{name}: after truncate");

        s.reset();
        assert_eq!(s.n_past(), 0);
        let again = s.forward(&expected_tokens, Logits::All).unwrap();
        assert_eq!(again, expected, "{name}: after reset");
    }
}

/// The plain Llama model, for tests about requests rather than numerics.
fn small_model(name: &str) -> (Spec, Model) {
    let spec = Spec::llama();
    let path = TinyFile::generate(&spec, 4000).write(name);
    let model = Model::load(path).unwrap();
    (spec, model)
}

#[test]
fn forwarding_past_the_session_context_is_a_request_error() {
    let (spec, model) = small_model("limits_ctx");
    let pool = ThreadPool::new(2);
    let tokens = random_tokens(4001, 16, spec.vocab);
    let full = exact_session(&model, &pool, 16)
        .forward(&tokens, Logits::All)
        .unwrap();

    let mut s = exact_session(&model, &pool, 16);
    assert_eq!(s.n_ctx(), 16);
    s.forward(&tokens[..10], Logits::Last).unwrap();
    let err = s.forward(&random_tokens(4002, 7, spec.vocab), Logits::Last);
    assert!(
        matches!(err, Err(ModelError::Request(ref m)) if m.contains("16")),
        "{err:?}"
    );
    // The refused request changed nothing: the remaining six positions still fit and give the
    // same logits as the single batch.
    assert_eq!(s.n_past(), 10);
    let rest = s.forward(&tokens[10..], Logits::All).unwrap();
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_abs(&rest, &full[10 * spec.vocab..]) <= 1e-5 * scale);
    assert!(matches!(
        s.forward(&tokens[..1], Logits::Last),
        Err(ModelError::Request(_))
    ));

    // A session asked for more than the model's context gets the model's context.
    let mut big = exact_session(&model, &pool, 10 * spec.n_ctx);
    assert_eq!(big.n_ctx(), spec.n_ctx);
    let too_long = random_tokens(4003, spec.n_ctx + 1, spec.vocab);
    assert!(matches!(
        big.forward(&too_long, Logits::Last),
        Err(ModelError::Request(_))
    ));
    big.forward(&too_long[..spec.n_ctx], Logits::Last).unwrap();
    assert!(matches!(
        big.forward(&[], Logits::Last),
        Err(ModelError::Request(_))
    ));
}

#[test]
fn token_ids_outside_the_vocabulary_are_request_errors() {
    let (spec, model) = small_model("limits_vocab");
    let pool = ThreadPool::new(2);
    let mut s = exact_session(&model, &pool, 8);
    let last = spec.vocab as u32 - 1;
    s.forward(&[0, last], Logits::Last).unwrap();
    for bad in [spec.vocab as u32, u32::MAX] {
        let err = s.forward(&[1, bad, 2], Logits::All);
        assert!(
            matches!(err, Err(ModelError::Request(ref m)) if m.contains(&bad.to_string())),
            "{bad}: {err:?}"
        );
        assert_eq!(s.n_past(), 2);
    }
}

/// Loads a damaged model and returns the error, checking it names the file and `what`.
fn load_error(name: &str, file: &TinyFile, what: &str) -> ModelError {
    let path = file.write(name);
    let err = match Model::load(&path) {
        Ok(_) => panic!("{name}: a model with {what} wrong loaded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    let file_name = path.display().to_string();
    assert!(
        msg.contains(&file_name),
        "{name}: '{msg}' does not name the file"
    );
    assert!(msg.contains(what), "{name}: '{msg}' does not name {what}");
    err
}

#[test]
fn inconsistent_shapes_fail_to_load_naming_the_tensor_or_key_and_file() {
    let spec = Spec::llama();

    let mut f = TinyFile::generate(&spec, 5000);
    let t = f.tensor_mut("blk.1.attn_q.weight");
    t.dims = vec![64, 48];
    t.values.truncate(64 * 48);
    let err = load_error("bad_q_rows", &f, "blk.1.attn_q.weight");
    assert!(matches!(err, ModelError::Bad { .. }), "{err:?}");

    // Same element count, transposed: only the shape check can catch it.
    let qwen3 = Spec {
        arch: "qwen3",
        head_dim: 32,
        rope_dim: 32,
        qk_norm: true,
        ..spec.clone()
    };
    let mut f = TinyFile::generate(&qwen3, 5001);
    f.tensor_mut("blk.0.attn_output.weight").dims = vec![64, 128];
    let err = load_error("bad_wo_transposed", &f, "blk.0.attn_output.weight");
    assert!(matches!(err, ModelError::Bad { .. }), "{err:?}");

    let mut f = TinyFile::generate(&spec, 5002);
    f.set_metadata("llama.attention.head_count_kv", MetadataValue::U32(3));
    let err = load_error("bad_kv_heads", &f, "head_count_kv");
    assert!(matches!(err, ModelError::Bad { .. }), "{err:?}");

    let mut f = TinyFile::generate(&spec, 5003);
    f.set_metadata("llama.vocab_size", MetadataValue::U32(100));
    load_error("bad_vocab", &f, "token_embd.weight");

    let mut f = TinyFile::generate(
        &Spec {
            rope_freqs: true,
            ..spec.clone()
        },
        5004,
    );
    let t = f.tensor_mut("rope_freqs.weight");
    t.dims = vec![4];
    t.values.truncate(4);
    load_error("bad_rope_freqs", &f, "rope_freqs.weight");

    // Biases in the first block promise biases in every block.
    let mut f = TinyFile::generate(
        &Spec {
            arch: "qwen2",
            qkv_bias: true,
            ..spec.clone()
        },
        5005,
    );
    f.tensors.retain(|t| t.name != "blk.1.attn_v.bias");
    load_error("missing_bias", &f, "blk.1.attn_v.bias");

    let mut f = TinyFile::generate(&spec, 5006);
    f.set_metadata("llama.rope.scaling.type", MetadataValue::from("yarn"));
    let err = load_error("unsupported_rope_scaling", &f, "yarn");
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
}

/// Llama-family files converted with `attention_bias` / `mlp_bias` carry output and
/// feed-forward biases; they must be applied, not dropped.
#[test]
fn llama_output_and_mlp_biases_are_applied() {
    let spec = Spec {
        qkv_bias: true,
        ..Spec::llama()
    };
    let mut f = TinyFile::generate(&spec, 7000);
    let mut rng = Rng::new(7001);
    for il in 0..spec.n_layers {
        for (t, len) in [
            ("attn_output", spec.n_embd),
            ("ffn_gate", spec.n_ff),
            ("ffn_up", spec.n_ff),
            ("ffn_down", spec.n_embd),
        ] {
            f.tensors.push(TensorSpec {
                name: format!("blk.{il}.{t}.bias"),
                dims: vec![len as u64],
                ty: GgmlType::F32,
                values: (0..len).map(|_| rng.range(-0.5, 0.5)).collect(),
            });
        }
    }
    let path = f.write("llama_o_mlp_bias");
    let model = Model::load(&path).unwrap();
    let pool = ThreadPool::new(1);
    let tokens = random_tokens(7002, 10, spec.vocab);
    let got = exact_session(&model, &pool, 10)
        .forward(&tokens, Logits::All)
        .unwrap();
    let want = Reference::load(&spec, &path).logits(&tokens);
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want.iter().flatten()) {
        diff = diff.max((f64::from(*g) - w).abs());
        scale = scale.max(w.abs());
    }
    assert!(
        diff <= 1e-5 * scale,
        "max |diff| {diff} (max |logit| {scale})"
    );
}

/// The older `rope.scale_linear` key supplies the factor of a `linear` scaling type.
#[test]
fn linear_rope_scaling_with_the_legacy_factor_key_loads() {
    let spec = Spec {
        linear_rope_factor: Some(4.0),
        ..Spec::llama()
    };
    let mut f = TinyFile::generate(&spec, 7100);
    f.metadata.retain(|(k, _)| k != "llama.rope.scaling.factor");
    f.set_metadata("llama.rope.scale_linear", MetadataValue::F32(4.0));
    let model = Model::load(f.write("linear_legacy")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.config.layers[0].rope_freq_scale, 0.25);
}

/// A tensor no part of the loader reads is a model feature kiln would silently drop: refused.
#[test]
fn unread_tensors_are_refused_by_name() {
    let spec = Spec::llama();
    let mut f = TinyFile::generate(&spec, 7200);
    f.tensors.push(TensorSpec {
        name: "blk.0.attn_sinks.weight".into(),
        dims: vec![spec.n_heads as u64],
        ty: GgmlType::F32,
        values: vec![0.5; spec.n_heads],
    });
    let path = f.write("unread_tensor");
    let err = Model::load(&path)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(err.contains("blk.0.attn_sinks.weight"), "{err}");
    assert!(err.contains("unread_tensor"), "{err}");
}

/// Long decode with one key/value head: attention splits the key range into chunks (so both
/// threads work) and merges them by online-softmax rescaling; the result must equal the
/// one-batch pass, which uses a single chunk per position, and the naive reference.
#[test]
fn chunked_decode_attention_matches_one_batch_at_long_context() {
    let n = 300;
    for (arch, window) in [("llama", 0), ("gemma3", 128)] {
        let spec = Spec {
            arch,
            n_kv_heads: 1,
            n_layers: if arch == "gemma3" { 6 } else { 2 },
            n_ctx: 512,
            sliding_window: window,
            qk_norm: arch == "gemma3",
            ..Spec::llama()
        };
        let path = TinyFile::generate(&spec, 9100).write(&format!("long_decode_{arch}"));
        let model = Model::load(&path).unwrap();
        let pool = ThreadPool::new(2);
        let tokens = random_tokens(9101, n, spec.vocab);
        let batch = exact_session(&model, &pool, n)
            .forward(&tokens, Logits::All)
            .unwrap();
        let mut session = exact_session(&model, &pool, n);
        let mut stepped = Vec::new();
        for &t in &tokens {
            stepped.extend(session.forward(&[t], Logits::Last).unwrap());
        }
        let scale = batch.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_abs(&stepped, &batch);
        let want = Reference::load(&spec, &path).logits(&tokens);
        let flat: Vec<f32> = want.iter().flatten().map(|&v| v as f32).collect();
        let d_ref = max_abs(&stepped, &flat);
        eprintln!("{arch}: {n} decode steps vs batch max |diff| {d:e}, vs reference {d_ref:e} (max |logit| {scale})");
        assert!(d <= 1e-5 * scale, "{arch}: {d} vs scale {scale}");
        assert!(d_ref <= 1e-5 * scale, "{arch}: {d_ref} vs scale {scale}");
    }
}

/// The default path on every weight format, as a prompt (one batch: the dequantizing GEMM) and
/// token by token (decode: the integer kernels on quantized activations): logits within a
/// small distance of the exact path, measured as cosine over all positions and as agreement
/// of the chosen token wherever the exact path's top two are not nearly tied.
#[test]
fn quantized_path_stays_close_to_exact_for_every_format() {
    let seed = 3100;
    let tokens = random_tokens(seed, 12, 96);
    let pool = ThreadPool::new(2);
    for ty in GgmlType::ALL {
        let spec = format_spec(ty);
        let path = TinyFile::generate(&spec, seed).write(&format!("quantized_{}", ty.name()));
        let model = Model::load(&path).unwrap();
        let exact = exact_session(&model, &pool, tokens.len())
            .forward(&tokens, Logits::All)
            .unwrap();
        let prompt = Session::new(&model, &pool, tokens.len())
            .forward(&tokens, Logits::All)
            .unwrap();
        let mut decode_session = Session::new(&model, &pool, tokens.len());
        let mut decode = Vec::new();
        for &t in &tokens {
            decode.extend(decode_session.forward(&[t], Logits::Last).unwrap());
        }
        for (path, quantized) in [("prompt", &prompt), ("decode", &decode)] {
            let dot: f64 = exact
                .iter()
                .zip(quantized)
                .map(|(a, b)| f64::from(a * b))
                .sum();
            let na: f64 = exact.iter().map(|a| f64::from(a * a)).sum::<f64>().sqrt();
            let nb: f64 = quantized
                .iter()
                .map(|b| f64::from(b * b))
                .sum::<f64>()
                .sqrt();
            let cos = dot / (na * nb);
            let mut compared = 0;
            for (e, q) in exact.chunks(spec.vocab).zip(quantized.chunks(spec.vocab)) {
                let mut sorted = e.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] < 0.05 * sorted[0].abs().max(1.0) {
                    continue;
                }
                compared += 1;
                let top = |v: &[f32]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
                assert_eq!(
                    top(e),
                    top(q),
                    "{ty} {path}: quantized path picks another token"
                );
            }
            eprintln!("{ty} {path}: cosine {cos:.6}, {compared} positions compared");
            assert!(cos >= 0.999, "{ty} {path}: cosine {cos}");
        }
    }
}

/// IQ4 sources through `convert`: kept as they are (`--quant keep`) in a kiln package and in a
/// GGUF file, the blocks, and so the logits, are the source's bit for bit; requantized to a
/// kiln format (int8 per channel), they are dequantized and requantized like any other type.
#[test]
fn iq4_sources_convert_keeping_or_requantizing_their_blocks() {
    use kiln_runtime::convert::{convert, ConvertOptions, OutputFormat, QuantTarget};
    let seed = 3200;
    let tokens = random_tokens(seed, 6, 96);
    let pool = ThreadPool::new(2);
    for ty in [GgmlType::IQ4_NL, GgmlType::IQ4_XS] {
        let src = TinyFile::generate(&format_spec(ty), seed).write(&format!("convert_{ty}"));
        let source = Model::load(&src).unwrap();
        let want = exact_session(&source, &pool, tokens.len())
            .forward(&tokens, Logits::All)
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for (to, quant, name) in [
            (OutputFormat::Kiln, QuantTarget::Keep, "keep.kiln"),
            (OutputFormat::Gguf, QuantTarget::Keep, "keep.gguf"),
            (OutputFormat::Kiln, QuantTarget::Int8Channel, "i8.kiln"),
        ] {
            let out = dir.join(format!("convert_{ty}_{name}"));
            let _ = std::fs::remove_dir_all(&out);
            let _ = std::fs::remove_file(&out);
            let options = ConvertOptions {
                quant,
                to,
                keep: Vec::new(),
                ..ConvertOptions::default()
            };
            convert(&src, &out, &options, &mut |_, _, _| {})
                .unwrap_or_else(|e| panic!("{ty} {name}: {e}"));
            let model = Model::load(&out).unwrap_or_else(|e| panic!("{ty} {name}: {e}"));
            let got = exact_session(&model, &pool, tokens.len())
                .forward(&tokens, Logits::All)
                .unwrap();
            if quant == QuantTarget::Keep {
                assert_eq!(model.layers[0].w_down.ggml_format(), Some(ty), "{name}");
                assert_eq!(model.output.ggml_format(), Some(ty), "{name}");
                assert_eq!(got, want, "{ty} {name}: logits differ from the source's");
            } else {
                assert_eq!(model.layers[0].w_down.ggml_format(), None, "{name}");
                let diff = max_abs(&got, &want);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                eprintln!("{ty} {name}: max |diff| {diff:.3e} of {scale:.2}");
                assert!(diff > 0.0 && diff < 0.05 * scale, "{ty} {name}: {diff}");
            }
        }
    }
}
