//! The GGUF tokenizers of SmolLM2 and Gemma 3 against the token ids Hugging Face
//! transformers and llama.cpp produced for the same files.

mod common;

use common::{gemma3, ids, reference_json, reference_text, smollm2, Model};
use kiln_tokenizer::chat::Message;

/// Every case of a `reference.json`: chat cases are rendered from their messages and must
/// reproduce `input_text`; then `input_text` must tokenize to `prompt_token_ids`.
fn check_reference(model: &Model, rel: &str) {
    let reference = reference_json(rel);
    let tok = &model.tokenizer;
    let cases = reference["cases"].as_object().expect("cases");
    assert!(!cases.is_empty());
    for (name, case) in cases {
        let text = case["input_text"].as_str().expect("input_text");
        let expected = ids(&case["prompt_token_ids"]);
        let got = if let Some(messages) = case.get("messages") {
            let messages: Vec<Message> =
                serde_json::from_value(messages.clone()).expect("messages");
            let template = tok
                .chat_renderer(&model.architecture)
                .expect("template compiles")
                .expect("a chat template");
            let rendered = template.render(&messages, true).expect("renders");
            assert_eq!(rendered, text, "{rel} case {name}: rendered chat prompt");
            tok.encode_chat(&rendered).unwrap()
        } else {
            tok.encode(text, true, false).unwrap()
        };
        assert_eq!(got, expected, "{rel} case {name}: token ids");
        // The greedy continuation decodes to the reference text.
        let greedy = ids(&case["greedy_32_ids"]);
        assert_eq!(
            tok.decode(&greedy, false),
            case["greedy_32_text"].as_str().unwrap(),
            "{rel} case {name}: greedy text"
        );
    }
}

#[test]
fn smollm2_matches_transformers() {
    let m = smollm2();
    assert_eq!(m.tokenizer.kind(), "gpt2 (smollm)");
    check_reference(m, "smollm2/reference.json");
}

#[test]
fn gemma3_matches_transformers() {
    let m = gemma3();
    assert_eq!(m.tokenizer.kind(), "llama (sentencepiece)");
    assert!(
        m.tokenizer.chat_template().is_none(),
        "the file carries no template"
    );
    check_reference(m, "gemma3/reference.json");
}

/// llama.cpp's tokenizations: the raw prompt (add_special, no special parsing), the chat
/// prompt (both), and token counts of the GPL-3 text used for its perplexity runs.
fn check_llamacpp(model: &Model, rel: &str, ppl_name: &str) {
    let reference = reference_json(rel);
    let tok = &model.tokenizer;
    assert_eq!(
        tok.vocab_size() as u64,
        reference["n_vocab"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_id().map(u64::from), reference["bos_id"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), reference["eos_id"].as_u64());
    assert_eq!(
        tok.add_bos().to_string(),
        reference["add_bos"].as_str().unwrap()
    );

    let raw = &reference["raw"];
    let prompt = raw["prompt"].as_str().unwrap();
    assert_eq!(
        tok.encode(prompt, true, false).unwrap(),
        ids(&raw["prompt_ids"])
    );
    for step in raw["greedy_steps"].as_array().unwrap() {
        let id = step["id"].as_u64().unwrap() as u32;
        let piece = step["piece"].as_str().unwrap();
        assert_eq!(tok.token_bytes(id), piece.as_bytes(), "piece of token {id}");
    }
    assert_eq!(
        tok.decode(&ids(&raw["greedy_32_ids"]), false),
        raw["greedy_32_text"].as_str().unwrap()
    );

    if let Some(chat) = reference.get("chat") {
        let template_src = chat["chat_template"].as_str().unwrap();
        assert_eq!(tok.chat_template(), Some(template_src));
        let rendered = chat["rendered_prompt"].as_str().unwrap();
        let template = tok.chat_renderer(&model.architecture).unwrap().unwrap();
        let messages = [Message::new("user", chat["user_message"].as_str().unwrap())];
        assert_eq!(template.render(&messages, true).unwrap(), rendered);
        assert_eq!(
            tok.encode(rendered, true, true).unwrap(),
            ids(&chat["prompt_ids"])
        );
    }

    let ppl = reference_json("llamacpp/ppl_gpl3_ctx256.json");
    let gpl = std::path::Path::new(
        ppl["text_file"]
            .as_str()
            .unwrap()
            .split(' ')
            .next()
            .unwrap(),
    );
    let text = std::fs::read(gpl)
        .unwrap_or_else(|e| panic!("{} (the GPL-3 text llama.cpp measured): {e}", gpl.display()));
    let text = String::from_utf8(text).expect("GPL-3 text is UTF-8");
    let n = tok.encode(&text, true, false).unwrap().len() as u64;
    assert_eq!(
        n,
        ppl["models"][ppl_name]["n_tokens_file"].as_u64().unwrap(),
        "GPL-3 token count"
    );
}

#[test]
fn smollm2_matches_llamacpp() {
    check_llamacpp(
        smollm2(),
        "llamacpp/smollm2-135m-instruct-q4_1.json",
        "SmolLM2-135M-Instruct.Q4_1",
    );
}

#[test]
fn gemma3_matches_llamacpp() {
    check_llamacpp(
        gemma3(),
        "llamacpp/gemma3-270m-q4_k_m.json",
        "gemma-3-270m-q4_k_m",
    );
}

/// The perplexity texts tokenize to the lengths the references report (whole text, no
/// special tokens).
#[test]
fn perplexity_text_token_counts() {
    let text = reference_text("text/ppl_dev.txt");
    for (model, rel) in [
        (smollm2(), "smollm2/reference.json"),
        (gemma3(), "gemma3/reference.json"),
    ] {
        let expected = reference_json(rel)["perplexity"]["n_tokens"]
            .as_u64()
            .unwrap();
        let n = model.tokenizer.encode(&text, false, false).unwrap().len() as u64;
        assert_eq!(n, expected, "{rel}");
    }
}
