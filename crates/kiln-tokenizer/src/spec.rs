//! The plain-data description of a tokenizer, as GGUF stores it.

use kiln_format::gguf::GgufFile;

use crate::TokenizerError;

/// Plain data describing a tokenizer as GGUF stores it (`tokenizer.ggml.*`).
///
/// Build one by hand (tests, converters) or read it with [`TokenizerSpec::from_gguf`], then
/// turn it into a [`crate::Tokenizer`] with [`crate::Tokenizer::from_spec`]. It serializes
/// (serde) with the field names below, as kiln packages store it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name for `gpt2` models (e.g. `"smollm"`,
    /// `"llama-bpe"`, `"qwen2"`).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: merge priorities for `llama` models.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: see [`crate::TokenType`].
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in priority order, for `gpt2` models.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

fn id(f: &GgufFile, key: &'static str) -> Result<Option<u32>, TokenizerError> {
    match f.get_u64(key)? {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| TokenizerError::Invalid(format!("{key} = {v} does not fit a token id"))),
    }
}

impl TokenizerSpec {
    /// Reads the tokenizer metadata of a GGUF file. `tokenizer.ggml.model` and
    /// `tokenizer.ggml.tokens` are required; everything else is optional.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let model = f
            .get_str(MODEL)?
            .ok_or(TokenizerError::MissingKey(MODEL))?
            .to_owned();
        let tokens: Vec<String> = f
            .get_str_array(TOKENS)?
            .ok_or(TokenizerError::MissingKey(TOKENS))?
            .into_iter()
            .map(str::to_owned)
            .collect();
        // Out-of-range numbers read as "undefined" (0), as unknown types do.
        let token_types = f.get_i64_array("tokenizer.ggml.token_type")?.map(|v| {
            v.into_iter()
                .map(|t| i32::try_from(t).unwrap_or(0))
                .collect()
        });
        Ok(TokenizerSpec {
            model,
            pre: f.get_str("tokenizer.ggml.pre")?.map(str::to_owned),
            tokens,
            scores: f.get_f32_array("tokenizer.ggml.scores")?,
            token_types,
            merges: f
                .get_str_array("tokenizer.ggml.merges")?
                .map(|m| m.into_iter().map(str::to_owned).collect()),
            bos_id: id(f, "tokenizer.ggml.bos_token_id")?,
            eos_id: id(f, "tokenizer.ggml.eos_token_id")?,
            unk_id: id(f, "tokenizer.ggml.unknown_token_id")?,
            pad_id: id(f, "tokenizer.ggml.padding_token_id")?,
            eot_id: id(f, "tokenizer.ggml.eot_token_id")?,
            add_bos: f.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: f.get_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: f.get_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: f.get_str("tokenizer.chat_template")?.map(str::to_owned),
        })
    }
}
