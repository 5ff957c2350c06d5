//! Agreement with llama.cpp (a second independent implementation) on its greedy runs.
//!
//! llama.cpp quantizes activations, so its logits sit up to ~0.7 away from the exact float
//! answer (kiln matches transformers' float32 logits to ~4e-5). Teacher forcing llama.cpp's
//! greedy tokens, kiln must choose the same token at every step where llama.cpp's own top-two
//! margin exceeds that drift.

mod common;

use common::*;
use kiln_runtime::{Logits, Model, Precision, Session, ThreadPool};
use serde_json::Value;

/// Margin above which llama.cpp's activation quantization cannot flip the choice.
const SAFE_MARGIN: f64 = 1.0;

/// llama.cpp's JSON stores some lists as Python-literal strings; accept both forms.
fn list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::String(s) => {
            let json = s
                .replace('\'', "\"")
                .replace("True", "true")
                .replace("False", "false");
            serde_json::from_str::<Vec<Value>>(&json).unwrap_or_default()
        }
        _ => panic!("not a list: {v}"),
    }
}

fn check(json: &str, file: &str) {
    let path = reference_dir().join("llamacpp").join(json);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = Model::load(model_path(file)).unwrap();
    let pool = ThreadPool::new(2);
    let vocab = model.config.vocab_size;
    let mut compared = 0;
    for part in ["raw", "chat"] {
        let Some(c) = r.get(part) else { continue };
        let prompt: Vec<u32> = list(&c["prompt_ids"])
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let steps = list(&c["greedy_steps"]);
        assert!(
            !prompt.is_empty() && !steps.is_empty(),
            "{json}/{part}: no data"
        );
        let greedy: Vec<u32> = steps
            .iter()
            .map(|s| s["id"].as_u64().unwrap() as u32)
            .collect();
        let mut session = Session::new(&model, &pool, prompt.len() + greedy.len());
        session.set_precision(Precision::Exact);
        let first = session.forward(&prompt, Logits::Last).unwrap();
        let rest = session
            .forward(&greedy[..greedy.len() - 1], Logits::All)
            .unwrap();
        let rows: Vec<&[f32]> = std::iter::once(&first[..])
            .chain(rest.chunks_exact(vocab))
            .collect();
        for (i, (row, step)) in rows.iter().zip(&steps).enumerate() {
            let margin = step["margin_top1_top2"].as_f64().unwrap();
            if margin < SAFE_MARGIN {
                continue;
            }
            assert_eq!(
                argmax(row) as u32,
                greedy[i],
                "{json}/{part} step {i}: llama.cpp margin {margin}"
            );
            compared += 1;
        }
    }
    eprintln!("{json}: {compared} confident llama.cpp steps, all agree");
    assert!(compared >= 12, "{json}: only {compared} steps compared");
}

#[test]
fn smollm2_agrees_with_llamacpp() {
    check("smollm2-135m-instruct-q4_1.json", SMOLLM2);
}

#[test]
fn gemma3_agrees_with_llamacpp() {
    check("gemma3-270m-q4_k_m.json", GEMMA3);
}
