//! Lossless round trips and streaming decode on the real SmolLM2 and Gemma 3 tokenizers.

mod common;

use std::time::Instant;

use common::{gemma3, model_path, smollm2, GEMMA3_FILE};
use kiln_format::gguf::GgufFile;
use kiln_tokenizer::{StreamDecoder, Tokenizer, TokenizerSpec};
use proptest::prelude::*;

const SAMPLES: &[&str] = &[
    "Hello, world!",
    "The capital of France is Paris.",
    "héllo wörld — naïve café, São Paulo, Łódź, İstanbul",
    "日本語のテキストと中文字符，还有한국어 문장。",
    "emoji 🎉🚀 family 👩‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 keycap 1️⃣",
    "combining: e\u{301} a\u{308} o\u{302}\u{323} hangul jamo \u{1100}\u{1161}\u{11a8}",
    "whitespace   runs\t\ttabs\n\n\nnewlines  \n  \r\n windows\r\n",
    "   leading and trailing   ",
    " ",
    "\n",
    "\t",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया Привет, мир Γειά σου",
    "math ∑ ∫ √ ≠ ≤ ∞ 𝔸𝕓𝒸 and zero width a\u{200b}b\u{feff}c\u{200d}d",
    "private use \u{e000}\u{f8ff} and plane 16 \u{10fffd} and nul \u{0} bell \u{7} del \u{7f}",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "numbers 1234567890 3.14159 1,000,000 0x1F -42 1e-9",
    "special-looking text: <|im_start|>user <|im_end|> <start_of_turn>model <end_of_turn> <bos> <eos>",
    "<0x41> Ġ Ċ literal vocabulary syntax",
    "don't can't I'm you're we've they'll she'd IT'S",
];

fn models() -> [(&'static str, &'static Tokenizer); 2] {
    [
        ("SmolLM2", &smollm2().tokenizer),
        ("Gemma 3", &gemma3().tokenizer),
    ]
}

/// What decoding can give back: SentencePiece stores spaces as U+2581, so a literal U+2581
/// comes back as a space from Gemma (as from SentencePiece itself).
fn recoverable(name: &str, text: &str) -> String {
    if name == "Gemma 3" {
        text.replace('\u{2581}', " ")
    } else {
        text.to_owned()
    }
}

#[test]
fn sentencepiece_space_marker_reads_as_space() {
    let gemma = &gemma3().tokenizer;
    let ids = gemma.encode("a\u{2581}b", false, false).unwrap();
    assert_eq!(gemma.decode(&ids, false), "a b");
    let smol = &smollm2().tokenizer;
    let ids = smol.encode("a\u{2581}b Ġ", false, false).unwrap();
    assert_eq!(smol.decode(&ids, false), "a\u{2581}b Ġ");
}

#[test]
fn decode_inverts_encode_on_varied_unicode() {
    for (name, tok) in models() {
        for &text in SAMPLES {
            let ids = tok.encode(text, false, false).unwrap();
            assert_eq!(tok.decode(&ids, false), text, "{name}: {text:?}");
            assert_eq!(
                tok.decode(&ids, true),
                text,
                "{name}: {text:?} (skip_special)"
            );
            // With special parsing, control-token texts become control tokens whose text
            // still decodes back, unless they are skipped.
            let ids = tok.encode(text, false, true).unwrap();
            assert_eq!(tok.decode(&ids, false), text, "{name}: {text:?} (parsed)");
        }
    }
}

#[test]
fn special_tokens_are_recognised_only_when_asked() {
    let smol = &smollm2().tokenizer;
    let ids = smol.encode("<|im_start|>user", false, true).unwrap();
    assert_eq!(ids[0], 1);
    assert!(smol.is_special(1));
    let plain = smol.encode("<|im_start|>user", false, false).unwrap();
    assert!(plain.len() > 2 && !plain.contains(&1));
    assert_eq!(smol.decode(&ids, true), "user");

    let gemma = &gemma3().tokenizer;
    let ids = gemma.encode("<start_of_turn>user", false, true).unwrap();
    assert_eq!(ids, vec![105, 2364]);
    let plain = gemma.encode("<start_of_turn>user", false, false).unwrap();
    assert!(!plain.contains(&105));
    // User-defined tokens (Gemma's newline and space runs) are matched either way.
    assert_eq!(gemma.encode("\n\n", false, false).unwrap(), vec![108]);
}

#[test]
fn bos_is_added_once() {
    let gemma = &gemma3().tokenizer;
    assert!(gemma.add_bos());
    assert_eq!(gemma.bos_text(), Some("<bos>"));
    assert_eq!(gemma.eos_text(), Some("<eos>"));
    let with_bos = gemma.encode("Hi", true, false).unwrap();
    assert_eq!(with_bos[0], 2);
    assert_eq!(with_bos[1..], gemma.encode("Hi", false, false).unwrap()[..]);
    // The BOS text in a rendered prompt is the BOS: no second one.
    let rendered = gemma.encode_chat("<bos>Hi").unwrap();
    assert_eq!(rendered, with_bos);
    // Without special parsing the text "<bos>" is ordinary text after the added BOS.
    let literal = gemma.encode("<bos>Hi", true, false).unwrap();
    assert_eq!(literal[0], 2);
    assert_ne!(literal[1], 2);

    let smol = &smollm2().tokenizer;
    assert!(!smol.add_bos());
    assert_eq!(
        smol.encode("Hi", true, false).unwrap(),
        smol.encode("Hi", false, false).unwrap()
    );
}

#[test]
fn stop_ids_cover_end_of_turn_tokens() {
    let smol = &smollm2().tokenizer;
    // <|endoftext|> 0, <|im_end|> 2 (also EOS).
    assert_eq!(smol.stop_ids(), vec![0, 2]);
    let gemma = &gemma3().tokenizer;
    // <eos> 1, <end_of_turn> 106.
    assert_eq!(gemma.stop_ids(), vec![1, 106]);
    for id in gemma.stop_ids() {
        assert!(gemma.is_special(id));
    }
}

#[test]
fn token_bytes_and_texts() {
    let smol = &smollm2().tokenizer;
    assert_eq!(smol.token_text(504), Some("The"));
    let the = smol.encode(" the", false, false).unwrap();
    assert_eq!(the.len(), 1);
    assert_eq!(smol.token_text(the[0]), Some("Ġthe"));
    assert_eq!(smol.token_bytes(the[0]), b" the");
    assert_eq!(smol.token_text(49152), None);
    assert!(smol.token_bytes(u32::MAX).is_empty());

    let gemma = &gemma3().tokenizer;
    assert_eq!(gemma.token_text(248), Some("<0x0A>"));
    assert_eq!(gemma.token_bytes(248), b"\n");
    assert_eq!(gemma.token_text(5279), Some("▁capital"));
    assert_eq!(gemma.token_bytes(5279), b" capital");
    assert_eq!(gemma.token_bytes(105), b"<start_of_turn>");
    assert_eq!(gemma.decode(&[2, 105, 2364], true), "user");
    assert_eq!(
        gemma.decode(&[2, 105, 2364, 999_999], false),
        "<bos><start_of_turn>user"
    );
}

/// Building Gemma 3's 262,144-entry tokenizer from its metadata is fast.
#[test]
fn gemma3_builds_quickly() {
    let file = GgufFile::open(model_path(GEMMA3_FILE)).unwrap();
    let start = Instant::now();
    let spec = TokenizerSpec::from_gguf(&file).unwrap();
    let read = start.elapsed();
    let start = Instant::now();
    let tok = Tokenizer::from_spec(spec).unwrap();
    let build = start.elapsed();
    eprintln!("Gemma 3 tokenizer: metadata read {read:?}, built in {build:?}");
    assert_eq!(tok.vocab_size(), 262_144);
    assert!(
        build.as_secs_f64() < 1.0,
        "building the tokenizer took {build:?}"
    );
}

/// Feeds ids one at a time; checks what comes out and what is held back.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> (String, Vec<String>) {
    let mut s = StreamDecoder::new(tok, skip_special);
    let mut pieces = Vec::new();
    for &id in ids {
        pieces.push(s.push(id));
        let pending = s.pending_bytes();
        // Only an unfinished character is ever held back.
        assert!(pending.len() <= 3, "held back {pending:?}");
        if !pending.is_empty() {
            let err = std::str::from_utf8(pending).unwrap_err();
            assert!(
                err.error_len().is_none() && err.valid_up_to() == 0,
                "{pending:?}"
            );
        }
    }
    pieces.push(s.finish());
    (pieces.concat(), pieces)
}

#[test]
fn streaming_splits_multibyte_characters_correctly() {
    for (name, tok) in models() {
        for &text in SAMPLES {
            let ids = tok.encode(text, false, true).unwrap();
            let (all, pieces) = stream(tok, &ids, false);
            assert_eq!(all, text, "{name}");
            assert!(
                pieces.iter().all(|p| !p.contains('\u{fffd}')),
                "{name}: {pieces:?}"
            );
        }
    }
    // Gemma spells rare characters with byte tokens: 🦀 is four of them.
    let gemma = &gemma3().tokenizer;
    let crab = gemma.encode("🦀", false, false).unwrap();
    let (_, pieces) = stream(gemma, &crab, false);
    assert_eq!(pieces.concat(), "🦀");
    assert!(pieces[..pieces.len() - 2].iter().all(String::is_empty) || crab.len() == 1);
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(128)
    })]

    #[test]
    fn any_text_round_trips(text in any::<String>()) {
        for (name, tok) in models() {
            let ids = tok.encode(&text, false, false).unwrap();
            prop_assert_eq!(tok.decode(&ids, false), recoverable(name, &text), "{}", name);
        }
    }

    #[test]
    fn streamed_text_equals_decoded_text(
        text in "(\\PC|[\u{1F300}-\u{1FAFF}]|[一-龥]|\\s){0,40}",
        skip in any::<bool>(),
    ) {
        prop_assume!(!text.contains('\u{fffd}'));
        for (name, tok) in models() {
            let ids = tok.encode(&text, false, true).unwrap();
            let (all, pieces) = stream(tok, &ids, skip);
            prop_assert_eq!(&all, &tok.decode(&ids, skip), "{}", name);
            prop_assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{}", name);
        }
    }

    /// Arbitrary id sequences (invalid UTF-8 included) stream to exactly what decode gives.
    #[test]
    fn streamed_random_ids_equal_decoded_ids(
        raw in proptest::collection::vec(any::<u32>(), 0..64),
        skip in any::<bool>(),
    ) {
        for (name, tok) in models() {
            let n = tok.vocab_size() as u32;
            // Mostly byte tokens and short pieces, where characters get split.
            let ids: Vec<u32> = raw.iter().map(|&r| match r % 4 {
                0 => r % n,
                1 if name == "Gemma 3" => 238 + r % 256,
                _ => r % 1000,
            }).collect();
            let (all, _) = stream(tok, &ids, skip);
            prop_assert_eq!(all, tok.decode(&ids, skip), "{}", name);
        }
    }
}
