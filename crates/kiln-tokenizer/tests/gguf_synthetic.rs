//! Small hand-made vocabularies, in GGUF files written with kiln-format's writer or as plain
//! specs: the algorithms' details, and clear errors (never panics) for bad metadata.

use kiln_format::gguf::{GgufFile, GgufWriter, MetadataValue};
use kiln_tokenizer::{StreamDecoder, Tokenizer, TokenizerError, TokenizerSpec};
use proptest::prelude::*;

/// GPT-2's printable stand-in for a byte.
fn byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        b as char
    } else {
        char::from_u32(0x100 + (0..b).filter(|&x| !printable(x)).count() as u32).unwrap()
    }
}

/// A byte-level BPE vocabulary: the 256 byte characters, a few merges, two control tokens
/// and one user-defined token.
fn bpe_spec(pre: Option<&str>) -> TokenizerSpec {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|user|>".into(), "[sep]".into()];
    let mut types = vec![3, 3, 4];
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    types.extend(std::iter::repeat_n(1, 256));
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    TokenizerSpec {
        model: "gpt2".into(),
        pre: pre.map(str::to_owned),
        tokens,
        token_types: Some(types),
        merges: Some(merges.iter().map(|s| s.to_string()).collect()),
        eos_id: Some(0),
        bos_id: Some(0),
        ..Default::default()
    }
}

fn id_of(tok: &Tokenizer, text: &str) -> u32 {
    (0..tok.vocab_size() as u32)
        .find(|&i| tok.token_text(i) == Some(text))
        .unwrap_or_else(|| panic!("{text:?} not in vocabulary"))
}

#[test]
fn byte_level_bpe_from_a_gguf_file() {
    let spec = bpe_spec(Some("gpt2"));
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama".into());
    w.add_metadata("tokenizer.ggml.model", spec.model.as_str().into());
    w.add_metadata("tokenizer.ggml.pre", "gpt2".into());
    w.add_metadata("tokenizer.ggml.tokens", spec.tokens.clone().into());
    w.add_metadata(
        "tokenizer.ggml.token_type",
        spec.token_types.clone().unwrap().into(),
    );
    w.add_metadata("tokenizer.ggml.merges", spec.merges.clone().unwrap().into());
    w.add_metadata("tokenizer.ggml.eos_token_id", 0u32.into());
    w.add_metadata("tokenizer.ggml.bos_token_id", 0u32.into());
    w.add_metadata("tokenizer.chat_template", "{{ messages }}".into());
    let file = GgufFile::from_bytes("tiny.gguf", w.to_bytes()).unwrap();
    let read = TokenizerSpec::from_gguf(&file).unwrap();
    assert_eq!(
        read,
        TokenizerSpec {
            chat_template: Some("{{ messages }}".into()),
            ..spec
        }
    );
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(tok.kind(), "gpt2 (gpt2)");
    assert!(!tok.add_bos());
    assert_eq!(tok.chat_template(), Some("{{ messages }}"));

    let ids = tok.encode("hello world", true, false).unwrap();
    assert_eq!(ids, vec![id_of(&tok, "hello"), id_of(&tok, "Ġworld")]);
    assert_eq!(tok.decode(&ids, false), "hello world");
    // Control tokens only with parse_special; the user-defined "[sep]" always.
    let parsed = tok.encode("<|user|>hello[sep]", false, true).unwrap();
    assert_eq!(parsed, vec![1, id_of(&tok, "hello"), 2]);
    let plain = tok.encode("<|user|>hello[sep]", false, false).unwrap();
    assert_eq!(plain[plain.len() - 1], 2);
    assert!(!plain.contains(&1));
    assert_eq!(tok.decode(&parsed, true), "hello[sep]");
    assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(2));
}

#[test]
fn pre_tokenizers_split_digits_differently() {
    // GPT-2 keeps "12" together (and merges it); the smollm splitter isolates each digit.
    let gpt2 = Tokenizer::from_spec(bpe_spec(Some("gpt2"))).unwrap();
    let smol = Tokenizer::from_spec(bpe_spec(Some("smollm"))).unwrap();
    let default = Tokenizer::from_spec(bpe_spec(None)).unwrap();
    assert_eq!(
        gpt2.encode("12", false, false).unwrap(),
        vec![id_of(&gpt2, "12")]
    );
    assert_eq!(smol.encode("12", false, false).unwrap().len(), 2);
    assert_eq!(default.kind(), "gpt2 (default)");
    for t in [&gpt2, &smol, &default] {
        let text = "x 123, hello world!  \n\t ünïcödé 🎉";
        assert_eq!(
            t.decode(&t.encode(text, false, false).unwrap(), false),
            text
        );
    }
    // Llama 3's pre-tokenizer turns BOS on by default.
    let llama3 = Tokenizer::from_spec(bpe_spec(Some("llama-bpe"))).unwrap();
    assert!(llama3.add_bos());
    assert_eq!(llama3.encode("hello", true, false).unwrap()[0], 0);
    assert_eq!(llama3.encode("hello", true, false).unwrap().len(), 2);
}

/// A SentencePiece-style vocabulary with byte tokens.
fn spm_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("▁h", -3.0),
        ("ll", -3.0),
        ("▁he", -4.0),
        ("llo", -4.0),
        ("▁hello", -5.0),
        ("<tab>", 0.0),
    ] {
        tokens.push(piece.into());
        types.push(if piece == "<tab>" { 4 } else { 1 });
        scores.push(score);
    }
    TokenizerSpec {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        ..Default::default()
    }
}

#[test]
fn sentencepiece_space_prefix_and_bytes() {
    let tok = Tokenizer::from_spec(spm_spec()).unwrap();
    assert_eq!(tok.kind(), "llama (sentencepiece)");
    assert!(
        tok.add_bos(),
        "llama vocabularies add BOS unless told otherwise"
    );
    let hello = id_of(&tok, "▁hello");
    assert_eq!(tok.encode("hello", true, false).unwrap(), vec![1, hello]);
    assert_eq!(tok.decode(&[1, hello], true), "hello");
    // The space prefix comes back after every special token, as in llama.cpp.
    assert_eq!(
        tok.encode("hello</s>hello", false, true).unwrap(),
        vec![hello, 2, hello]
    );
    // Unknown characters are spelled with byte tokens.
    let ids = tok.encode("hé", false, false).unwrap();
    assert_eq!(ids, vec![id_of(&tok, "▁h"), 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.decode(&ids, false), "hé");
    let mut s = StreamDecoder::new(&tok, false);
    assert_eq!(
        [s.push(ids[0]), s.push(ids[1]), s.push(ids[2]), s.finish()],
        ["h", "", "é", ""].map(String::from)
    );
    // User-defined tokens are literal text, matched even without parse_special.
    let tab = id_of(&tok, "<tab>");
    assert_eq!(tok.encode("<tab>", false, false).unwrap(), vec![tab]);
    assert_eq!(tok.token_bytes(tab), b"<tab>");

    // Without a space prefix, and with neither byte tokens nor unknown: an error, not a panic.
    let mut spec = spm_spec();
    spec.add_space_prefix = Some(false);
    let tok = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(
        tok.encode("hello", false, false).unwrap()[0],
        id_of(&tok, "h")
    );
    let mut spec = spm_spec();
    spec.tokens.drain(3..259);
    spec.scores.as_mut().unwrap().drain(3..259);
    spec.token_types.as_mut().unwrap().drain(3..259);
    let with_unk = Tokenizer::from_spec(spec.clone()).unwrap();
    assert_eq!(with_unk.encode("hé", false, false).unwrap()[1..], [0, 0]);
    spec.unk_id = None;
    spec.token_types.as_mut().unwrap()[0] = 1;
    let without = Tokenizer::from_spec(spec).unwrap();
    assert!(matches!(
        without.encode("hé", false, false),
        Err(TokenizerError::Encode(_))
    ));
}

fn expect_invalid(spec: TokenizerSpec, needle: &str) {
    match Tokenizer::from_spec(spec) {
        Err(e) => assert!(e.to_string().contains(needle), "{e} (expected {needle:?})"),
        Ok(_) => panic!("expected an error mentioning {needle:?}"),
    }
}

#[test]
fn bad_specs_are_errors() {
    expect_invalid(
        TokenizerSpec {
            model: "gpt2".into(),
            ..Default::default()
        },
        "empty",
    );
    expect_invalid(
        TokenizerSpec {
            model: "bert".into(),
            ..bpe_spec(None)
        },
        "unsupported tokenizer model \"bert\"",
    );
    expect_invalid(bpe_spec(Some("not-a-splitter")), "known: default, gpt2");
    expect_invalid(
        TokenizerSpec {
            merges: None,
            ..bpe_spec(None)
        },
        "needs merges",
    );
    let mut s = bpe_spec(None);
    s.merges.as_mut().unwrap().push("nospace".into());
    expect_invalid(s, "not two space-separated tokens");
    let mut s = bpe_spec(None);
    s.merges.as_mut().unwrap().push("q zz".into());
    expect_invalid(s, "zz");
    let mut s = bpe_spec(None);
    s.token_types.as_mut().unwrap().pop();
    expect_invalid(s, "token types");
    let mut s = spm_spec();
    s.scores.as_mut().unwrap().push(1.0);
    expect_invalid(s, "scores");
    expect_invalid(
        TokenizerSpec {
            bos_id: Some(100_000),
            ..bpe_spec(None)
        },
        "BOS token id 100000",
    );
    // Out-of-range ids of lesser tokens are dropped rather than refused.
    let tok = Tokenizer::from_spec(TokenizerSpec {
        pad_id: Some(u32::MAX),
        eot_id: Some(1 << 30),
        ..bpe_spec(None)
    })
    .unwrap();
    assert_eq!(tok.stop_ids(), vec![0]);
}

#[test]
fn bad_gguf_metadata_is_an_error() {
    let file = |f: &dyn Fn(&mut GgufWriter)| {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", "llama".into());
        f(&mut w);
        GgufFile::from_bytes("bad.gguf", w.to_bytes()).unwrap()
    };
    let f = file(&|_| {});
    assert!(matches!(
        Tokenizer::from_gguf(&f),
        Err(TokenizerError::MissingKey("tokenizer.ggml.model"))
    ));
    let f = file(&|w| w.add_metadata("tokenizer.ggml.model", "llama".into()));
    assert!(matches!(
        Tokenizer::from_gguf(&f),
        Err(TokenizerError::MissingKey("tokenizer.ggml.tokens"))
    ));
    let f = file(&|w| {
        w.add_metadata("tokenizer.ggml.model", "llama".into());
        w.add_metadata("tokenizer.ggml.tokens", MetadataValue::from(vec![1u32, 2]));
    });
    let err = Tokenizer::from_gguf(&f).unwrap_err();
    assert!(matches!(err, TokenizerError::Format(_)), "{err}");
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");
    let f = file(&|w| {
        w.add_metadata("tokenizer.ggml.model", "llama".into());
        w.add_metadata("tokenizer.ggml.tokens", vec!["a", "b"].into());
        w.add_metadata(
            "tokenizer.ggml.bos_token_id",
            MetadataValue::from(1u64 << 40),
        );
    });
    let err = Tokenizer::from_gguf(&f).unwrap_err();
    assert!(err.to_string().contains("bos_token_id"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

    /// Arbitrary specs either build or fail cleanly; built tokenizers encode and decode
    /// arbitrary text without panicking.
    #[test]
    fn arbitrary_specs_never_panic(
        model in prop_oneof![Just("gpt2"), Just("llama"), Just("x")],
        tokens in proptest::collection::vec("(|<|\\PC{1,3}|<0x[0-9A-F]{2}>|▁\\PC)", 0..40),
        types in proptest::collection::vec(-1i32..8, 0..40),
        merges in proptest::collection::vec("\\PC{0,2} ?\\PC{0,2}", 0..10),
        ids in proptest::collection::vec(proptest::option::of(0u32..50), 5),
        flags in proptest::collection::vec(proptest::option::of(any::<bool>()), 3),
        text in "\\PC{0,30}",
        parse in any::<bool>(),
    ) {
        let n = tokens.len();
        let spec = TokenizerSpec {
            model: model.into(),
            pre: None,
            scores: Some((0..n).map(|i| -(i as f32)).collect()),
            token_types: Some(types.into_iter().cycle().take(n).collect()),
            tokens,
            merges: Some(merges),
            bos_id: ids[0],
            eos_id: ids[1],
            unk_id: ids[2],
            pad_id: ids[3],
            eot_id: ids[4],
            add_bos: flags[0],
            add_eos: flags[1],
            add_space_prefix: flags[2],
            chat_template: None,
        };
        if let Ok(tok) = Tokenizer::from_spec(spec) {
            if let Ok(ids) = tok.encode(&text, true, parse) {
                let _ = tok.decode(&ids, parse);
                let mut s = StreamDecoder::new(&tok, parse);
                let streamed: String = ids.iter().map(|&i| s.push(i)).collect::<String>() + &s.finish();
                prop_assert_eq!(streamed, tok.decode(&ids, parse));
            }
        }
    }
}
