//! Hugging Face folders.
//!
//! - A checkpoint transformers wrote (the shared tiny Llama) against transformers' own float32
//!   logits at every position.
//! - Tiny GGUF models rewritten as Hugging Face folders by kiln's safetensors writer, with the
//!   conversions done here independently of the runtime's: names mapped by this file's own
//!   table, dimensions reversed, `llama` q/k rows un-permuted (the inverse of llama.cpp's
//!   converter `permute`: rows `[n_head, head_dim/2, 2]` in GGUF are `[n_head, 2, head_dim/2]`
//!   in the checkpoint), Gemma norms stored as `w - 1`, Llama 3 rope factors replaced by
//!   `rope_scaling`. The folder must give the GGUF file's logits: bit for bit where no weight
//!   moves, within f32 rounding where the rotary pairing changes the summation order.
//! - Published `config.json` files describing the same model as the GGUF files we have.
//! - Bad folders: every refusal names the file and the key or tensor.

mod common;
#[allow(dead_code)]
mod tiny;

use common::*;
use kiln_format::ggml::GgmlType;
use kiln_format::gguf::GgufFile;
use kiln_format::safetensors::{Dtype, SafetensorsWriter};
use kiln_runtime::config::RopeStyle;
use kiln_runtime::{Logits, Model, ModelConfig, Session, ThreadPool};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tiny::{random_tokens, Spec, TensorSpec, TinyFile};

const SEQ: usize = 20;

fn tiny_llama_dir() -> PathBuf {
    reference_dir().join("coreml/tiny_llama_hf")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let pool = ThreadPool::new(2);
    Session::new(model, &pool, tokens.len())
        .forward(tokens, Logits::All)
        .unwrap()
}

#[test]
fn tiny_llama_folder_matches_transformers() {
    let model = Model::load(tiny_llama_dir()).unwrap();
    let c = &model.config;
    assert_eq!(c.architecture, "llama");
    assert_eq!(c.rope_style, RopeStyle::Neox);
    assert_eq!(
        (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim),
        (2, 4, 2, 16)
    );
    assert!(!model.tied_embeddings);

    let tokens = [1u32, 2, 3, 4, 5, 77, 200];
    let want = read_f32(&reference_dir().join("coreml/tiny_llama.logits_7x256.f32"));
    let got = logits(&model, &tokens);
    assert_eq!((got.len(), want.len()), (7 * 256, 7 * 256));
    for (i, (g, w)) in got
        .chunks_exact(256)
        .zip(want.chunks_exact(256))
        .enumerate()
    {
        let cos = cosine(g, w);
        let max_abs = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("tiny_llama_hf row {i}: cosine {cos:.9}, max |diff| {max_abs:.2e}");
        assert!(cos >= 0.9999, "row {i}: cosine {cos}");
        assert!(max_abs <= 1e-4, "row {i}: max |diff| {max_abs}");
    }
}

/// The checkpoint's name of a canonical GGUF tensor name (this file's own table).
fn hf_name(gguf: &str, gemma: bool, multimodal: bool) -> String {
    let model = if multimodal {
        "model.language_model"
    } else {
        "model"
    };
    match gguf {
        "token_embd.weight" => return format!("{model}.embed_tokens.weight"),
        "output_norm.weight" => return format!("{model}.norm.weight"),
        "output.weight" => return "lm_head.weight".to_string(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").expect("a block tensor");
    let (layer, rest) = rest.split_once('.').unwrap();
    let (base, kind) = rest.split_once('.').unwrap();
    let module = match (base, gemma) {
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", false) => "post_attention_layernorm",
        ("ffn_norm", true) => "pre_feedforward_layernorm",
        ("post_attention_norm", true) => "post_attention_layernorm",
        ("post_ffw_norm", true) => "post_feedforward_layernorm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        other => panic!("no checkpoint name for {other:?}"),
    };
    format!("{model}.layers.{layer}.{module}.{kind}")
}

/// Undoes llama.cpp's `permute` on the rows of a q or k tensor (`rows` of `cols` values, in
/// `n_head` heads): GGUF row `h*d + 2i + s` is checkpoint row `h*d + s*(d/2) + i`.
fn unpermute(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for s in 0..2 {
                let from = h * d + 2 * i + s;
                let to = h * d + s * (d / 2) + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// How a test folder is laid out beyond the model itself.
#[derive(Clone, Copy, Default)]
struct Layout {
    /// Shard size in bytes (None: one `model.safetensors`).
    shard_bytes: Option<u64>,
    /// Write Gemma 3 as the multimodal model (`text_config`, `model.language_model.*`, a
    /// vision tensor the text model ignores).
    multimodal: bool,
    /// transformers 5 style configuration (`rope_parameters`, `layer_types`).
    v5_config: bool,
    /// Store matrices as BF16 / F16 instead of F32 (must match the GGUF file's values).
    matrix_dtype: Option<Dtype>,
    /// Deliberately skip a conversion (q/k un-permutation, Gemma's `w - 1`), to show the
    /// comparison notices.
    skip_conversion: bool,
}

/// `config.json` for `spec`, in the style of `layout`.
fn hf_config(spec: &Spec, layout: Layout, llama3: Option<&Value>) -> Value {
    let gemma = spec.arch == "gemma3";
    let mut c = json!({
        "hidden_size": spec.n_embd,
        "intermediate_size": spec.n_ff,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.eps,
        "max_position_embeddings": spec.n_ctx,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": !spec.untied_output,
        "torch_dtype": "float32",
    });
    let o = c.as_object_mut().unwrap();
    let scaling = match (spec.linear_rope_factor, llama3) {
        (Some(f), _) => json!({"rope_type": "linear", "factor": f}),
        (None, Some(l3)) => l3.clone(),
        (None, None) => Value::Null,
    };
    if gemma {
        o.insert("model_type".into(), json!("gemma3_text"));
        o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        o.insert("query_pre_attn_scalar".into(), json!(spec.head_dim));
        o.insert("sliding_window".into(), json!(spec.sliding_window));
        if layout.v5_config {
            let types: Vec<&str> = (0..spec.n_layers)
                .map(|i| {
                    if (i + 1) % 6 == 0 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            o.insert("layer_types".into(), json!(types));
            let mut full = json!({"rope_type": "default", "rope_theta": spec.rope_base});
            if let Some(f) = spec.linear_rope_factor {
                full = json!({"rope_type": "linear", "factor": f, "rope_theta": spec.rope_base});
            }
            o.insert(
                "rope_parameters".into(),
                json!({
                    "full_attention": full,
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                }),
            );
        } else {
            o.insert("rope_theta".into(), json!(spec.rope_base));
            o.insert("rope_local_base_freq".into(), json!(10000.0));
            o.insert("rope_scaling".into(), scaling);
        }
        if layout.multimodal {
            let mut text = c;
            // The multimodal model keeps tie_word_embeddings at the top level.
            let tie = text.as_object_mut().unwrap().remove("tie_word_embeddings");
            return json!({
                "model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": text,
                "vision_config": {"model_type": "siglip_vision_model"},
                "tie_word_embeddings": tie,
            });
        }
    } else {
        o.insert("model_type".into(), json!(spec.arch));
        o.insert("hidden_act".into(), json!("silu"));
        if layout.v5_config {
            let mut p = if scaling.is_null() {
                json!({"rope_type": "default"})
            } else {
                scaling
            };
            p.as_object_mut()
                .unwrap()
                .insert("rope_theta".into(), json!(spec.rope_base));
            o.insert("rope_parameters".into(), p);
        } else {
            o.insert("rope_theta".into(), json!(spec.rope_base));
            o.insert("rope_scaling".into(), scaling);
        }
    }
    c
}

/// Rewrites the GGUF file at `gguf` (generated from `spec`) as a Hugging Face folder.
fn write_folder(spec: &Spec, gguf: &Path, dir: &Path, layout: Layout, llama3: Option<&Value>) {
    let file = GgufFile::open(gguf).unwrap();
    let gemma = spec.arch == "gemma3";
    let mut w = SafetensorsWriter::new();
    w.add_metadata("format", "pt");
    for t in file.tensors() {
        if t.name == "rope_freqs.weight" {
            continue; // carried by rope_scaling in config.json
        }
        let mut values = file.tensor_f32(t).unwrap();
        let shape: Vec<u64> = t.dims.iter().rev().copied().collect();
        let base = t.name.rsplit('.').nth(1).unwrap_or("");
        if spec.arch == "llama" && matches!(base, "attn_q" | "attn_k") && !layout.skip_conversion {
            let n_head = if base == "attn_q" {
                spec.n_heads
            } else {
                spec.n_kv_heads
            };
            let rows = shape[0] as usize;
            let cols = shape.get(1).copied().unwrap_or(1) as usize;
            values = unpermute(&values, rows, cols, n_head);
        }
        let is_norm = t.name.ends_with("norm.weight");
        if gemma && is_norm && !layout.skip_conversion {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        let dtype = match (shape.len(), layout.matrix_dtype) {
            (2, Some(d)) => d,
            _ => Dtype::F32,
        };
        w.add_tensor_f32(
            hf_name(&t.name, gemma, layout.multimodal),
            dtype,
            &shape,
            &values,
        )
        .unwrap();
    }
    if layout.multimodal {
        // A vision-tower weight: present in real multimodal checkpoints, unused by text.
        w.add_tensor_f32(
            "model.vision_tower.vision_model.post_layernorm.weight",
            Dtype::F32,
            &[4],
            &[1.0; 4],
        )
        .unwrap();
    }
    match layout.shard_bytes {
        Some(n) => {
            let shards = w.write_sharded(dir, n).unwrap();
            assert!(shards.len() > 1, "expected several shards");
        }
        None => w.write(dir.join("model.safetensors")).unwrap(),
    }
    let config = hf_config(spec, layout, llama3);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Logits of the GGUF model and of its folder rewrite, after `SEQ` random tokens.
fn both(
    name: &str,
    spec: &Spec,
    tiny: TinyFile,
    layout: Layout,
    llama3: Option<&Value>,
) -> (Vec<f32>, Vec<f32>, Model) {
    let gguf = tiny.write(&format!("hf-{name}"));
    let dir = scratch(name);
    write_folder(spec, &gguf, &dir, layout, llama3);
    let from_gguf = Model::load(&gguf).unwrap();
    let from_hf = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut hf_config = from_hf.config.clone();
    // The one intended difference: GGUF llama files were permuted to interleaved pairs.
    hf_config.rope_style = from_gguf.config.rope_style;
    assert_eq!(hf_config, from_gguf.config, "{name}: configurations differ");
    assert_eq!(from_hf.tied_embeddings, from_gguf.tied_embeddings);
    assert_eq!(from_hf.n_params, from_gguf.n_params, "{name}: parameters");
    let tokens = random_tokens(0xf01d, SEQ, spec.vocab);
    let a = logits(&from_gguf, &tokens);
    let b = logits(&from_hf, &tokens);
    (a, b, from_hf)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    diff / scale
}

#[test]
fn gemma3_folders_give_the_gguf_logits_exactly() {
    let spec = Spec {
        arch: "gemma3",
        n_layers: 7,
        n_kv_heads: 1,
        rope_base: 1_000_000.0,
        sliding_window: 4,
        eps: 1e-6,
        ..Spec::llama()
    };
    let scaled = Spec {
        n_layers: 6,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 32,
        rope_dim: 32,
        linear_rope_factor: Some(8.0),
        sliding_window: 8,
        ..spec.clone()
    };
    let layouts = [
        ("gemma3", &spec, Layout::default()),
        (
            "gemma3_sharded_bf16",
            &Spec {
                matrix_type: GgmlType::BF16,
                ..spec.clone()
            },
            Layout {
                shard_bytes: Some(20_000),
                matrix_dtype: Some(Dtype::BF16),
                ..Layout::default()
            },
        ),
        (
            "gemma3_multimodal_v5",
            &scaled,
            Layout {
                multimodal: true,
                v5_config: true,
                ..Layout::default()
            },
        ),
        ("gemma3_linear_rope", &scaled, Layout::default()),
    ];
    for (i, (name, spec, layout)) in layouts.into_iter().enumerate() {
        let tiny = TinyFile::generate(spec, 40 + i as u64);
        let (a, b, model) = both(name, spec, tiny, layout, None);
        eprintln!(
            "{name}: {} layers, logits identical: {}",
            spec.n_layers,
            a == b
        );
        assert_eq!(a, b, "{name}: logits differ");
        // The norms really are derived: the stored values are w - 1, far from w.
        assert!(model.layers[0].attn_norm.iter().all(|&w| w > 0.5));
    }
    let wrong = Layout {
        skip_conversion: true,
        ..Layout::default()
    };
    let (a, b, _) = both(
        "gemma3_norms_kept",
        &spec,
        TinyFile::generate(&spec, 40),
        wrong,
        None,
    );
    let rel = max_rel_diff(&a, &b);
    eprintln!("gemma3 with norms stored as 1 + w: {rel:.2e}");
    assert!(rel > 1e-2, "storing 1 + w went unnoticed ({rel})");
}

#[test]
fn llama_family_folders_give_the_gguf_logits() {
    let llama = Spec::llama();
    let cases = [
        // q/k rows move, so attention sums in another order: equal within rounding.
        ("llama", llama.clone(), 1e-5),
        (
            "llama_untied_gqa4_f16",
            Spec {
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 8,
                rope_dim: 8,
                untied_output: true,
                matrix_type: GgmlType::F16,
                linear_rope_factor: Some(4.0),
                ..llama.clone()
            },
            1e-5,
        ),
        // No weight moves: bit for bit.
        (
            "qwen2_qkv_bias",
            Spec {
                arch: "qwen2",
                n_heads: 6,
                n_kv_heads: 2,
                qkv_bias: true,
                rope_base: 1_000_000.0,
                eps: 1e-6,
                ..llama.clone()
            },
            0.0,
        ),
        (
            "qwen3_qk_norm",
            Spec {
                arch: "qwen3",
                head_dim: 32,
                rope_dim: 32,
                qk_norm: true,
                eps: 1e-6,
                untied_output: true,
                ..llama.clone()
            },
            0.0,
        ),
    ];
    for (i, (name, spec, tol)) in cases.into_iter().enumerate() {
        for v5 in [false, true] {
            let layout = Layout {
                v5_config: v5,
                matrix_dtype: (spec.matrix_type == GgmlType::F16).then_some(Dtype::F16),
                shard_bytes: (i == 1).then_some(30_000),
                ..Layout::default()
            };
            let name = format!("{name}{}", if v5 { "_v5" } else { "" });
            let tiny = TinyFile::generate(&spec, 60 + i as u64);
            let (a, b, _) = both(&name, &spec, tiny, layout, None);
            let rel = max_rel_diff(&a, &b);
            eprintln!("{name}: max |diff| / max |logit| = {rel:.2e}");
            if tol == 0.0 {
                assert_eq!(a, b, "{name}: logits differ");
            } else {
                assert!(rel <= tol, "{name}: relative difference {rel}");
            }
        }
    }
    let wrong = Layout {
        skip_conversion: true,
        ..Layout::default()
    };
    let (a, b, _) = both(
        "llama_permuted",
        &llama,
        TinyFile::generate(&llama, 60),
        wrong,
        None,
    );
    let rel = max_rel_diff(&a, &b);
    eprintln!("llama with q/k left permuted: {rel:.2e}");
    assert!(rel > 1e-2, "the permutation went unnoticed ({rel})");
}

/// Llama 3 rope scaling: the GGUF file carries the divisors as `rope_freqs.weight` (computed
/// here the way transformers scales its inverse frequencies); the folder carries the
/// `rope_scaling` parameters, from which the runtime derives them.
#[test]
fn llama3_rope_scaling_matches_the_gguf_factors() {
    let spec = Spec::llama();
    // Frequencies 0-3 are kept, 4 and 5 interpolated, 6 and 7 divided by the factor.
    let (factor, low, high, original) = (8.0f64, 1.0f64, 8.0f64, 4096.0f64);
    let half = spec.rope_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / f64::from(spec.rope_base).powf((2 * i) as f64 / spec.rope_dim as f64))
        .collect();
    let scaled: Vec<f64> = inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let divided = if wavelen > original / low {
                f / factor
            } else {
                f
            };
            let smooth = (original / wavelen - low) / (high - low);
            let smoothed = (1.0 - smooth) * divided / factor + smooth * divided;
            let medium = wavelen >= original / high && wavelen <= original / low;
            if medium {
                smoothed
            } else {
                divided
            }
        })
        .collect();
    let divisors: Vec<f32> = inv_freq
        .iter()
        .zip(&scaled)
        .map(|(f, s)| (f / s) as f32)
        .collect();
    let kinds: Vec<&str> = divisors
        .iter()
        .map(|&d| {
            if d == 1.0 {
                "kept"
            } else if d == factor as f32 {
                "divided"
            } else {
                "smoothed"
            }
        })
        .collect();
    assert_eq!(
        kinds,
        ["kept", "kept", "kept", "kept", "smoothed", "smoothed", "divided", "divided"]
    );
    let mut tiny = TinyFile::generate(&spec, 77);
    tiny.tensors.push(TensorSpec {
        name: "rope_freqs.weight".into(),
        dims: vec![half as u64],
        ty: GgmlType::F32,
        values: divisors.clone(),
    });
    let l3 = json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    });
    for v5 in [false, true] {
        let layout = Layout {
            v5_config: v5,
            ..Layout::default()
        };
        let tiny = TinyFile {
            metadata: tiny.metadata.clone(),
            tensors: tiny
                .tensors
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                    values: t.values.clone(),
                })
                .collect(),
        };
        let name = format!("llama3_rope{}", if v5 { "_v5" } else { "" });
        let gguf = tiny.write(&name);
        let dir = scratch(&name);
        write_folder(&spec, &gguf, &dir, layout, Some(&l3));
        let from_gguf = Model::load(&gguf).unwrap();
        let from_hf = Model::load(&dir).unwrap();
        let got = from_hf.config.rope_freq_factors.clone().unwrap();
        let want = from_gguf.config.rope_freq_factors.clone().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w, "divisors {got:?} vs {want:?}");
        }
        let tokens = random_tokens(5, SEQ, spec.vocab);
        let rel = max_rel_diff(&logits(&from_gguf, &tokens), &logits(&from_hf, &tokens));
        eprintln!("{name}: max |diff| / max |logit| = {rel:.2e}");
        assert!(rel <= 1e-5, "{name}: {rel}");
    }
}

/// The relevant keys of the published `config.json` of each model we have as GGUF (SmolLM2
/// 135M Instruct, Gemma 3 270M) describe the same network as the GGUF file's metadata.
#[test]
fn published_configs_describe_the_gguf_models() {
    let smollm2 = json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 100000,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 49152
    });
    let mut gemma_layers = vec!["sliding_attention"; 18];
    for i in [5, 11, 17] {
        gemma_layers[i] = "full_attention";
    }
    let gemma3 = json!({
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
        "attn_logit_softcapping": null, "final_logit_softcapping": null, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
        "intermediate_size": 2048, "layer_types": gemma_layers,
        "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
        "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 512,
        "use_bidirectional_attention": false, "vocab_size": 262144
    });
    for (json, file) in [(smollm2, SMOLLM2), (gemma3, GEMMA3)] {
        let gguf = GgufFile::open(model_path(file)).unwrap();
        let want = kiln_runtime::arch::config_from_gguf(&gguf).unwrap();
        let mut got: ModelConfig =
            kiln_runtime::hf::config_from_json(&json, Path::new("config.json")).unwrap();
        assert_eq!(got.rope_style, RopeStyle::Neox);
        got.rope_style = want.rope_style;
        assert_eq!(got, want, "{file}");
    }
}

/// Configurations whose features no GGUF file here exercises: Mistral and Qwen sliding
/// windows, a multimodal Gemma 3 that leaves most keys at their defaults, null keys.
#[test]
fn configuration_variants() {
    let hf = |v: Value| kiln_runtime::hf::config_from_json(&v, Path::new("config.json"));
    let base = json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "vocab_size": 100, "head_dim": null
    });
    let with = |extra: Value| {
        let mut v = base.clone();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let windows = |c: &ModelConfig| -> Vec<Option<usize>> {
        c.layers.iter().map(|l| l.sliding_window).collect()
    };
    let c = hf(with(json!({"model_type": "llama"}))).unwrap();
    assert_eq!((c.n_kv_heads, c.head_dim, c.context_length), (4, 16, 2048));
    assert_eq!(windows(&c), vec![None; 4]);
    assert!(!c.qkv_bias && !c.qk_norm);
    let c = hf(with(json!({"model_type": "mistral"}))).unwrap();
    assert_eq!(windows(&c), vec![Some(4096); 4]);
    let c = hf(with(
        json!({"model_type": "mistral", "sliding_window": null}),
    ))
    .unwrap();
    assert_eq!(windows(&c), vec![None; 4]);
    let c = hf(with(json!({
        "model_type": "qwen2", "use_sliding_window": true, "sliding_window": 32,
        "max_window_layers": 2
    })))
    .unwrap();
    assert_eq!(windows(&c), vec![None, None, Some(32), Some(32)]);
    assert!(c.qkv_bias);
    let c = hf(with(json!({"model_type": "qwen3", "sliding_window": 32}))).unwrap();
    assert_eq!(windows(&c), vec![None; 4]);
    assert!(c.qk_norm);
    let c = hf(with(json!({
        "model_type": "llama",
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    })))
    .unwrap();
    assert_eq!(
        (c.layers[0].rope_base, c.layers[0].rope_freq_scale),
        (5e5, 0.5)
    );

    // Gemma 3 4B's configuration: its text_config leaves the defaults out.
    let c = hf(json!({
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        },
        "vision_config": {"model_type": "siglip_vision_model"}
    }))
    .unwrap();
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (8, 4, 256, 262_208)
    );
    assert_eq!(c.attn_scale, 1.0 / 16.0);
    let global: Vec<usize> = (0..34)
        .filter(|&i| c.layers[i].sliding_window.is_none())
        .collect();
    assert_eq!(global, vec![5, 11, 17, 23, 29]);
    assert_eq!(
        (c.layers[5].rope_base, c.layers[5].rope_freq_scale),
        (1e6, 0.125)
    );
    assert_eq!(
        (
            c.layers[0].rope_base,
            c.layers[0].rope_freq_scale,
            c.layers[0].sliding_window
        ),
        (1e4, 1.0, Some(1024))
    );
}

/// Each bad configuration is refused with a message naming config.json and the key.
#[test]
fn bad_configurations_name_the_key() {
    let hf = |v: Value| {
        kiln_runtime::hf::config_from_json(&v, Path::new("/x/config.json"))
            .unwrap_err()
            .to_string()
    };
    let ok = json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100
    });
    let with = |k: &str, v: Value| {
        let mut c = ok.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = ok.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let cases: Vec<(Value, &[&str])> = vec![
        (
            without("hidden_size"),
            &["missing required key 'hidden_size'"],
        ),
        (without("model_type"), &["model_type"]),
        (
            with("model_type", json!("mamba")),
            &["model_type 'mamba'", "not supported"],
        ),
        (
            with("hidden_size", json!("64")),
            &["'hidden_size'", "integer"],
        ),
        (
            with("num_attention_heads", json!(0)),
            &["'num_attention_heads'"],
        ),
        (
            with("num_key_value_heads", json!(3)),
            &["num_key_value_heads 3"],
        ),
        (with("hidden_act", json!("gelu")), &["hidden_act 'gelu'"]),
        (with("rms_norm_eps", json!(-1.0)), &["rms_norm_eps"]),
        (
            with("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
            &["rope type 'yarn'", "not supported"],
        ),
        (
            with("rope_scaling", json!({"type": "linear"})),
            &["needs a 'factor'"],
        ),
        (
            with(
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
            ),
            &["low_freq_factor"],
        ),
        (
            with("rope_scaling", json!(3)),
            &["'rope_scaling'", "object"],
        ),
        (
            with("layer_types", json!(["full_attention"])),
            &["'layer_types'", "num_hidden_layers is 2"],
        ),
        (
            with("quantization_config", json!({"quant_method": "gptq"})),
            &["quant_method 'gptq'"],
        ),
        (
            json!({"model_type": "gemma3_text", "hidden_activation": "gelu"}),
            &["hidden_activation 'gelu'"],
        ),
        (
            json!({"model_type": "gemma3", "text_config": {"sliding_window": 0}}),
            &["'sliding_window'"],
        ),
    ];
    for (config, needles) in cases {
        let msg = hf(config.clone());
        assert!(msg.contains("/x/config.json"), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{config}: message lacks {n:?}: {msg}");
        }
    }
}

/// A copy of the tiny Llama folder, damaged by `damage`, must fail to load with a message
/// containing every needle.
fn damaged(name: &str, damage: impl FnOnce(&Path), needles: &[&str]) {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_llama_dir().join(f), dir.join(f)).unwrap();
    }
    damage(&dir);
    let msg = match Model::load(&dir) {
        Ok(_) => panic!("{name}: damaged folder accepted"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(msg.contains(n), "{name}: message lacks {n:?}: {msg}");
    }
}

/// Rewrites the tiny Llama's weights through `edit` (name, dtype, shape, values).
fn rewrite_weights(
    dir: &Path,
    edit: impl Fn(&str, &mut Dtype, &mut Vec<u64>, &mut Vec<f32>) -> bool,
) {
    let f = kiln_format::safetensors::SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let mut w = SafetensorsWriter::new();
    for t in f.tensors() {
        let (mut dtype, mut shape, mut values) =
            (t.dtype, t.shape.clone(), f.tensor_f32(t).unwrap());
        if !edit(&t.name, &mut dtype, &mut shape, &mut values) {
            continue;
        }
        if dtype.ggml_type().is_some() {
            w.add_tensor_f32(t.name.clone(), dtype, &shape, &values)
                .unwrap();
        } else {
            let n: u64 = shape.iter().product();
            w.add_tensor(
                t.name.clone(),
                dtype,
                &shape,
                vec![0; n as usize * dtype.size()],
            )
            .unwrap();
        }
    }
    w.write(dir.join("model.safetensors")).unwrap();
}

#[test]
fn bad_folders_are_clear_errors() {
    damaged(
        "no_config",
        |d| std::fs::remove_file(d.join("config.json")).unwrap(),
        &["config.json"],
    );
    damaged(
        "no_weights",
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        &["model.safetensors", "model.safetensors.index.json"],
    );
    damaged(
        "bad_json",
        |d| std::fs::write(d.join("config.json"), "{ nope").unwrap(),
        &["config.json", "malformed JSON"],
    );
    damaged(
        "int8_weight",
        |d| {
            rewrite_weights(d, |n, dtype, _, _| {
                if n == "model.layers.1.mlp.up_proj.weight" {
                    *dtype = Dtype::I8;
                }
                true
            })
        },
        &[
            "model.layers.1.mlp.up_proj.weight",
            "I8",
            "F32, F16 and BF16",
        ],
    );
    damaged(
        "unknown_tensor",
        |d| {
            let mut w = SafetensorsWriter::new();
            w.add_tensor_f32(
                "model.layers.0.mlp.extra.weight",
                Dtype::F32,
                &[2],
                &[0.0; 2],
            )
            .unwrap();
            // Shard the extra tensor next to the others through an index.
            std::fs::rename(d.join("model.safetensors"), d.join("a.safetensors")).unwrap();
            w.write(d.join("b.safetensors")).unwrap();
            let a =
                kiln_format::safetensors::SafetensorsFile::open(d.join("a.safetensors")).unwrap();
            let mut map = serde_json::Map::new();
            for t in a.tensors() {
                map.insert(t.name.clone(), json!("a.safetensors"));
            }
            map.insert(
                "model.layers.0.mlp.extra.weight".into(),
                json!("b.safetensors"),
            );
            let index = json!({"metadata": {}, "weight_map": map});
            std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        },
        &[
            "model.layers.0.mlp.extra.weight",
            "b.safetensors",
            "refusing",
        ],
    );
    damaged(
        "untied_without_lm_head",
        |d| rewrite_weights(d, |n, _, _, _| n != "lm_head.weight"),
        &["tie_word_embeddings", "lm_head.weight"],
    );
    damaged(
        "transposed_k",
        |d| {
            rewrite_weights(d, |n, _, shape, _| {
                if n == "model.layers.1.self_attn.k_proj.weight" {
                    shape.reverse();
                }
                true
            })
        },
        &[
            "'model.layers.1.self_attn.k_proj.weight'",
            "blk.1.attn_k.weight",
            "[32, 64]",
        ],
    );
    damaged(
        "missing_norm",
        |d| rewrite_weights(d, |n, _, _, _| n != "model.layers.1.input_layernorm.weight"),
        &["blk.1.attn_norm.weight", "missing"],
    );
    damaged(
        "layer_too_many",
        |d| {
            let f = kiln_format::safetensors::SafetensorsFile::open(d.join("model.safetensors"))
                .unwrap();
            let mut w = SafetensorsWriter::new();
            for t in f.tensors() {
                w.add_tensor(t.name.clone(), t.dtype, &t.shape, f.tensor_data(t).to_vec())
                    .unwrap();
            }
            w.add_tensor_f32(
                "model.layers.2.input_layernorm.weight",
                Dtype::F32,
                &[64],
                &[1.0; 64],
            )
            .unwrap();
            w.write(d.join("model.safetensors")).unwrap();
        },
        &["'model.layers.2.input_layernorm.weight'", "not used"],
    );
}
