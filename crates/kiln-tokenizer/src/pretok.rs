//! Pre-tokenizer regexes for byte-level BPE vocabularies, keyed by the name GGUF stores in
//! `tokenizer.ggml.pre`.
//!
//! The text is split by each regex in turn (matches and the text between them both become
//! pieces, i.e. Hugging Face's `Split` with the `Isolated` behaviour), then mapped to the
//! byte-level alphabet. The regexes are the ones published with each model family's
//! `tokenizer.json`, in the form llama.cpp uses for GGUF files.

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::TokenizerError;

/// GPT-2's word splitter.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's splitter: case-insensitive contractions, letters with one leading non-letter,
/// numbers in groups of up to three digits, newlines kept together.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's splitter: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken splitter (case-aware words).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const DEEPSEEK3_WORDS: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// A family of pre-tokenizer names sharing one list of regexes.
struct Family {
    names: &'static [&'static str],
    regexes: &'static [&'static str],
    /// Llama 3 style vocabularies look whole words up before merging.
    ignore_merges: bool,
    /// The families whose tokenizers add BOS unless the file says otherwise.
    add_bos: bool,
}

const FAMILIES: &[Family] = &[
    Family {
        // GGUF files whose `pre` is missing or "default" get llama.cpp's generic splitter.
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &[
            "gpt2",
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
        ],
        regexes: &[GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3"],
        regexes: &[LLAMA3],
        ignore_merges: true,
        add_bos: true,
    },
    Family {
        names: &["dbrx", "smaug-bpe", "chatglm-bpe"],
        regexes: &[LLAMA3],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["qwen2", "stablelm2", "megrez"],
        regexes: &[QWEN2],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        regexes: &[r"\p{N}", GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["deepseek-coder"],
        regexes: &[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["deepseek-v3"],
        regexes: &[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_WORDS],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["tekken"],
        regexes: &[TEKKEN],
        ignore_merges: true,
        add_bos: true,
    },
    Family {
        names: &["poro-chat", "bloom", "gpt3-finnish"],
        regexes: &[BLOOM],
        ignore_merges: false,
        add_bos: false,
    },
    Family {
        names: &["viking"],
        regexes: &[BLOOM, r"\p{N}"],
        ignore_merges: false,
        add_bos: false,
    },
];

/// How a named pre-tokenizer behaves.
pub(crate) struct PreTokenizerChoice {
    pub regexes: &'static [&'static str],
    pub ignore_merges: bool,
    pub add_bos: bool,
}

/// The `tokenizer.ggml.pre` names this crate knows. Other names are refused with an error
/// rather than tokenized with a guessed splitter.
pub fn known_pre_tokenizers() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.names.iter().copied())
        .collect()
}

/// Resolves a `tokenizer.ggml.pre` name. Unknown names are an error rather than a silent
/// fallback: a wrong splitter yields plausible but different token ids, which is worse than
/// refusing the file.
pub(crate) fn lookup(name: &str) -> Result<PreTokenizerChoice, TokenizerError> {
    FAMILIES
        .iter()
        .find(|f| f.names.contains(&name))
        .map(|f| PreTokenizerChoice {
            regexes: f.regexes,
            ignore_merges: f.ignore_merges,
            add_bos: f.add_bos,
        })
        .ok_or_else(|| TokenizerError::UnknownPreTokenizer {
            name: name.to_owned(),
            known: known_pre_tokenizers().join(", "),
        })
}

/// The `tokenizers` pre-tokenizer for a list of regexes: split by each, then byte-level map.
pub(crate) fn build(regexes: &[&str]) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Invalid(format!("pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(steps).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_family_compiles() {
        for name in known_pre_tokenizers() {
            let choice = lookup(name).unwrap();
            build(choice.regexes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = lookup("no-such-splitter").err().unwrap().to_string();
        assert!(err.contains("no-such-splitter"), "{err}");
        assert!(err.contains("smollm") && err.contains("llama-bpe") && err.contains("qwen2"));
    }

    /// The pieces the family named `name` cuts `text` into, as substrings of `text`.
    fn pieces(name: &str, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pre = build(lookup(name).unwrap().regexes).unwrap();
        let mut pts = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut pts).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| text[a..b].to_string())
            .collect()
    }

    /// Expected pieces worked out from each family's published expression: digit runs of any
    /// length (GPT-2), up to three (Llama 3) or one (Qwen 2); contractions case-sensitive in
    /// GPT-2 only; punctuation keeps the newlines that follow it in Llama 3 and Qwen 2.
    #[test]
    fn families_split_as_their_expressions_define() {
        let text = "Hello world's 12345 ok!!\n\nI'M fine";
        let split = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pieces("gpt2", text),
            split(&[
                "Hello", " world", "'s", " 12345", " ok", "!!", "\n", "\n", "I", "'", "M", " fine"
            ])
        );
        assert_eq!(
            pieces("llama-bpe", text),
            split(&[
                "Hello", " world", "'s", " ", "123", "45", " ok", "!!\n\n", "I", "'M", " fine"
            ])
        );
        assert_eq!(
            pieces("qwen2", text),
            split(&[
                "Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " ok", "!!\n\n", "I", "'M",
                " fine"
            ])
        );
    }
}
