//! Hugging Face tokenizer folders: the SmolLM2 tokenizer written out and read back, a
//! SentencePiece-style `tokenizer.json` built here, configuration variants and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{gemma3, smollm2};
use kiln_tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TEXTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 👋 ça va? 日本語<|im_end|>\n",
    "  spaces   and\ttabs\n\n\nand 1234567 digits <|endoftext|>",
];

#[test]
fn smollm2_written_as_tokenizer_json_reads_back_identically() {
    let gguf = &smollm2().tokenizer;
    let dir = scratch("smollm2");
    gguf.save_hf(&dir).unwrap();
    let hf = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(hf.kind(), "huggingface");
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    assert_eq!(hf.bos_id(), gguf.bos_id());
    assert_eq!(hf.eos_id(), gguf.eos_id());
    assert_eq!(hf.add_bos(), gguf.add_bos());
    assert_eq!(hf.chat_template(), gguf.chat_template());
    assert_eq!(hf.stop_ids(), gguf.stop_ids());
    // The file itself works as well as its folder.
    let by_file = Tokenizer::from_hf(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(by_file.vocab_size(), gguf.vocab_size());

    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for &text in TEXTS {
        for add_special in [false, true] {
            for parse_special in [false, true] {
                let a = gguf.encode(text, add_special, parse_special).unwrap();
                let b = hf.encode(text, add_special, parse_special).unwrap();
                assert_eq!(
                    a, b,
                    "{text:?} add_special={add_special} parse={parse_special}"
                );
            }
        }
        let ids = hf.encode(text, false, true).unwrap();
        for id in 0..hf.vocab_size() as u32 {
            if id % 97 == 0 {
                assert_eq!(hf.token_bytes(id), gguf.token_bytes(id), "token {id}");
                assert_eq!(hf.is_special(id), gguf.is_special(id), "token {id}");
            }
        }
        for skip in [false, true] {
            let ours = hf.decode(&ids, skip);
            assert_eq!(ours, reference.decode(&ids, skip).unwrap(), "{text:?}");
            assert_eq!(ours, gguf.decode(&ids, skip));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sentencepiece_folders_cannot_be_written() {
    let dir = scratch("gemma-save");
    let err = gemma3().tokenizer.save_hf(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::Unsupported(_)), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Llama-2-style tokenizer.json: BPE with byte fallback over U+2581-marked text, a space
/// put in front, BOS added by the post-processor, a decoder that undoes all of it.
fn write_sentencepiece_style(dir: &Path) {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hello", "▁w", "or",
        "▁wor", "ld", "▁world",
    ];
    tokens.extend(pieces.iter().map(|s| s.to_string()));
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = [
        ("▁", "h"),
        ("▁h", "e"),
        ("l", "l"),
        ("ll", "o"),
        ("▁he", "llo"),
        ("▁", "w"),
        ("o", "r"),
        ("▁w", "or"),
        ("l", "d"),
        ("▁wor", "ld"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_normalizer(Some(NormalizerSequence::new(vec![
        Prepend::new("▁".into()).into(),
        Replace::new(" ", "▁").unwrap().into(),
    ])));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").unwrap().into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    tk.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", 1)])
            .build()
            .unwrap(),
    ));
    tk.add_special_tokens(&[
        AddedToken::from("<unk>", true),
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    tk.save(dir.join("tokenizer.json"), true).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"}
        ]
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
}

#[test]
fn sentencepiece_style_tokenizer_json() {
    let dir = scratch("spm-style");
    write_sentencepiece_style(&dir);
    let tok = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.bos_text(), Some("<s>"));
    assert!(tok.add_bos(), "the post-processor adds <s>");
    assert!(tok.is_special(1) && tok.is_special(2));
    assert_eq!(tok.stop_ids(), vec![2]);
    assert!(tok.chat_template().unwrap().starts_with("{{ bos_token }}"));

    let hello = tok.token_text(259 + 12).unwrap();
    assert_eq!(hello, "▁hello");
    assert_eq!(tok.token_bytes(259 + 12), b" hello");
    assert_eq!(tok.token_bytes(3 + 0xC3), [0xC3]);

    let ids = tok.encode("hello world", true, false).unwrap();
    assert_eq!(ids, vec![1, 259 + 12, 259 + 17]);
    // The space the normalizer puts in front is dropped again.
    assert_eq!(tok.decode(&ids, true), "hello world");
    // As Hugging Face's Strip decoder does: only a space that starts the output goes.
    assert_eq!(tok.decode(&ids, false), "<s> hello world");
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for seq in [
        &ids[..],
        &ids[1..],
        &[259, 259 + 12],
        &[3 + 0xC3, 259],
        &[2, 259 + 17, 1],
    ] {
        for skip in [false, true] {
            assert_eq!(
                tok.decode(seq, skip),
                reference.decode(seq, skip).unwrap(),
                "{seq:?}"
            );
        }
    }

    // Characters outside the vocabulary go through byte tokens and come back.
    let ids = tok.encode("hé", false, false).unwrap();
    assert_eq!(ids, vec![259 + 8, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.decode(&ids, false), "hé");
    let mut stream = StreamDecoder::new(&tok, false);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id)).collect();
    assert_eq!(pieces, vec!["h", "", "é"]);
    assert_eq!(stream.finish(), "");
    // Continuing a prompt keeps the separating space.
    let mut cont = StreamDecoder::continuation(&tok, true);
    assert_eq!(cont.push_all(&[259 + 17]), " world");

    // A prompt that carries <s> itself gets no second one.
    let chat = tok.encode_chat("<s>hello").unwrap();
    assert_eq!(chat, vec![1, 259 + 12]);
    // Read as text, "<s>" is spelled out after the added BOS.
    let literal = tok.encode("<s>hello", true, false).unwrap();
    assert_eq!(literal[0], 1);
    assert_ne!(literal[1], 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configuration_fallbacks() {
    let dir = scratch("fallbacks");
    smollm2().tokenizer.save_hf(&dir).unwrap();
    // No tokenizer_config.json: special tokens from special_tokens_map.json, the template
    // from chat_template.jinja, extra stop ids from generation_config.json.
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}").unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf(&dir).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.chat_template(), Some("{{ messages[0].content }}"));
    assert_eq!(tok.stop_ids(), vec![0, 2, 5]);

    // add_bos_token applies when the tokenizer has no post-processor of its own.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "add_bos_token": true, "chat_template": null}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf(&dir).unwrap();
    assert!(tok.add_bos());
    assert_eq!(tok.encode("Hi", true, false).unwrap()[0], 1);
    assert_eq!(
        tok.encode_chat("<|im_start|>Hi")
            .unwrap()
            .iter()
            .filter(|&&i| i == 1)
            .count(),
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_folders_are_clear_errors() {
    let dir = scratch("bad");
    let err = Tokenizer::from_hf(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let err = Tokenizer::from_hf(&dir.join("nowhere/tokenizer.json")).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");

    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::HuggingFace { .. }), "{err}");

    smollm2().tokenizer.save_hf(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "[1, 2").unwrap();
    let err = Tokenizer::from_hf(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": 7}"#).unwrap();
    let err = Tokenizer::from_hf(&dir).unwrap_err();
    assert!(err.to_string().contains("chat_template"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
