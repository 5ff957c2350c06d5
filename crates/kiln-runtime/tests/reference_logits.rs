//! The forward pass against Hugging Face transformers' float32 logits on the real models.

mod common;

use common::*;
use kiln_runtime::{Logits, Model, Precision, Session, ThreadPool};

fn check_model(model_name: &str, file: &str) {
    let reference = reference(model_name);
    let model = Model::load(model_path(file)).unwrap();
    let pool = ThreadPool::new(2);
    let cases = reference["cases"].as_object().unwrap();
    assert!(cases.len() >= 4);
    for (case, v) in cases {
        let prompt = ids(&v["prompt_token_ids"]);
        let want = read_f32(
            &reference_dir()
                .join(model_name)
                .join(format!("{case}.last_logits.f32")),
        );
        for (precision, min_cosine) in [(Precision::Exact, 0.9999), (Precision::Refined, 0.999)] {
            let mut session = Session::new(&model, &pool, prompt.len());
            session.set_precision(precision);
            let got = session.forward(&prompt, Logits::Last).unwrap();
            let cos = cosine(&got, &want);
            let max_abs = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            eprintln!(
                "{model_name}/{case} {precision:?}: {} tokens, cosine {cos:.8}, max |diff| {max_abs:.5}",
                prompt.len()
            );
            assert!(
                cos >= min_cosine,
                "{model_name}/{case} {precision:?}: cosine {cos} < {min_cosine}"
            );
            assert_eq!(
                argmax(&got),
                argmax(&want),
                "{model_name}/{case} {precision:?}: top-1 differs"
            );
        }
        let mut session = Session::new(&model, &pool, prompt.len());
        session.set_precision(Precision::Exact);
        let got = session.forward(&prompt, Logits::Last).unwrap();
        let top10 = ids(&v["last_top10_ids"]);
        assert_eq!(argmax(&got), top10[0] as usize);
    }
}

#[test]
fn smollm2_logits_match_transformers() {
    check_model("smollm2", SMOLLM2);
}

#[test]
fn gemma3_logits_match_transformers() {
    check_model("gemma3", GEMMA3);
}
