//! Tokenizers for kiln.
//!
//! A [`Tokenizer`] comes from one of two places:
//! - a GGUF file's `tokenizer.ggml.*` metadata ([`Tokenizer::from_gguf`], or
//!   [`Tokenizer::from_spec`] on the same data held as a [`TokenizerSpec`]). The `gpt2` model
//!   (byte-level BPE) runs on the `tokenizers` crate's BPE with the pre-tokenizer named by
//!   `tokenizer.ggml.pre`; the `llama` model (SentencePiece-style, scores instead of merges)
//!   runs on this crate's own implementation of llama.cpp's merge-by-score algorithm. Both
//!   reproduce llama.cpp's token ids, including how special-token texts are found. An unknown
//!   `pre` name is an error listing the known ones ([`known_pre_tokenizers`]): a guessed
//!   splitter would give plausible but wrong ids.
//! - a Hugging Face `tokenizer.json` ([`Tokenizer::from_hf`]), run by the `tokenizers` crate
//!   with Hugging Face's own semantics, with BOS/EOS and the chat template taken from
//!   `tokenizer_config.json`.
//!
//! Decoding works on bytes: every token stands for a byte string ([`Tokenizer::token_bytes`]),
//! and text is the lossy UTF-8 reading of their concatenation. [`StreamDecoder`] does the same
//! incrementally and only ever hands out whole characters.
//!
//! [`chat`] renders chat templates (Jinja, as Hugging Face's `apply_chat_template` does).
//!
//! # BOS and rendered chat prompts
//!
//! Chat templates usually write the BOS token's text themselves (`{{ bos_token }}`), while the
//! model's flags also ask for BOS to be added when encoding. llama.cpp then produces two BOS
//! tokens and warns about it. Here [`Tokenizer::encode`] with `add_special` does not add BOS
//! when the encoded text already starts with the BOS token (which happens only when
//! `parse_special` is set), and likewise does not append EOS when the text already ends with
//! it. So a rendered prompt is encoded with `encode(rendered, true, true)`
//! ([`Tokenizer::encode_chat`]).

#![warn(missing_docs)]

use std::path::Path;

mod bytelevel;
pub mod chat;
mod hf;
mod pretok;
mod spec;
mod special;
mod spm;
mod stream;

pub use pretok::known_pre_tokenizers;
pub use spec::TokenizerSpec;
pub use stream::StreamDecoder;

use special::{Fragment, SpecialMatcher};
use spm::SpmModel;

/// Errors from building tokenizers, encoding text and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF file could not be read.
    #[error(transparent)]
    Format(#[from] kiln_format::FormatError),
    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata key {0:?} is missing")]
    MissingKey(&'static str),
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error("unsupported tokenizer model {0:?} (supported: gpt2, llama)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names an unknown pre-tokenizer.
    #[error("unknown pre-tokenizer {name:?} (known: {known})")]
    UnknownPreTokenizer {
        /// The name found in the file.
        name: String,
        /// The names this crate knows, comma-separated.
        known: String,
    },
    /// The tokenizer description is inconsistent.
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
    /// A Hugging Face tokenizer file could not be used.
    #[error("{path}: {message}")]
    HuggingFace {
        /// The file or folder concerned.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Text could not be encoded.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// The operation is not available for this kind of tokenizer.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A chat template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    TemplateRaised(String),
}

/// What a vocabulary entry is, with GGUF's numbering (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0, or any number GGUF does not define.
    Undefined,
    /// 1: ordinary text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: control tokens (BOS, EOS, turn markers): they stand for no text.
    Control,
    /// 4: user-defined tokens: literal text matched before tokenization.
    UserDefined,
    /// 5: reserved entries.
    Unused,
    /// 6: byte-fallback tokens `<0xNN>`.
    Byte,
}

impl TokenType {
    /// The type GGUF's number stands for.
    pub fn from_gguf(v: i32) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// GGUF's number for this type.
    pub fn gguf_id(self) -> i32 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }

    fn hidden(self) -> bool {
        matches!(
            self,
            TokenType::Control | TokenType::Unknown | TokenType::Unused
        )
    }
}

/// Texts of tokens that end a turn or a document in common model families. Generation stops
/// on any of them that the vocabulary holds.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<EOT>",
    "<|return|>",
    "<｜end▁of▁sentence｜>",
];

/// Per-token text, type and bytes.
struct Vocab {
    texts: Vec<String>,
    types: Vec<TokenType>,
    /// Token `i`'s bytes are `bytes[offsets[i]..offsets[i + 1]]`; one flat buffer keeps a
    /// 262k-entry vocabulary to a couple of allocations.
    offsets: Vec<u32>,
    bytes: Vec<u8>,
}

impl Vocab {
    fn new(
        texts: Vec<String>,
        types: Vec<TokenType>,
        mut bytes_of: impl FnMut(usize, &str, TokenType, &mut Vec<u8>),
    ) -> Result<Vocab, TokenizerError> {
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        let mut bytes = Vec::with_capacity(texts.iter().map(String::len).sum());
        offsets.push(0u32);
        for (i, (text, &ty)) in texts.iter().zip(&types).enumerate() {
            bytes_of(i, text, ty, &mut bytes);
            let end = u32::try_from(bytes.len()).map_err(|_| {
                TokenizerError::Invalid("the vocabulary's text exceeds 4 GiB".into())
            })?;
            offsets.push(end);
        }
        Ok(Vocab {
            texts,
            types,
            offsets,
            bytes,
        })
    }

    fn len(&self) -> usize {
        self.texts.len()
    }

    fn bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
}

enum Backend {
    /// GGUF `gpt2`: special tokens are split off by `specials`, the rest goes to BPE.
    Bpe {
        tokenizer: Box<tokenizers::Tokenizer>,
        specials: SpecialMatcher,
    },
    /// GGUF `llama`.
    Spm {
        model: Box<SpmModel>,
        specials: SpecialMatcher,
        add_space_prefix: bool,
    },
    /// `tokenizer.json`: `plain` is the same tokenizer with special tokens read as text.
    Hf(Box<hf::HfBackend>),
}

/// A tokenizer: text to token ids and back.
pub struct Tokenizer {
    kind: String,
    backend: Backend,
    vocab: Vocab,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Whether decoding drops the space the tokenizer put in front of the text.
    strip_first_space: bool,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn check_id(name: &str, id: Option<u32>, n: usize) -> Result<Option<u32>, TokenizerError> {
    match id {
        Some(i) if i as usize >= n => Err(TokenizerError::Invalid(format!(
            "{name} token id {i} is outside the vocabulary of {n} tokens"
        ))),
        other => Ok(other),
    }
}

fn stop_ids(texts: &[String], eos: Option<u32>, extra: &[Option<u32>]) -> Vec<u32> {
    let mut ids: Vec<u32> = eos
        .into_iter()
        .chain(extra.iter().flatten().copied())
        .collect();
    for (i, t) in texts.iter().enumerate() {
        if END_OF_TURN_TEXTS.contains(&t.as_str()) {
            ids.push(i as u32);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF-style plain data.
    ///
    /// Defaults follow llama.cpp where the data is silent: `llama` adds BOS and a space prefix;
    /// `gpt2` adds BOS only for the Llama 3 and Tekken pre-tokenizers; a missing
    /// `pre` means llama.cpp's `default` splitter. Out-of-range BOS/EOS ids are an error;
    /// out-of-range unknown/padding/end-of-turn ids are ignored. Tokens whose text marks an end
    /// of turn (`<|im_end|>`, `<end_of_turn>`, …) are treated as control tokens whatever
    /// their stored type, as llama.cpp does.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("the vocabulary is empty".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::Invalid(format!("{n} tokens is too many")));
        }
        if let Some(s) = &spec.scores {
            if s.len() != n {
                return Err(TokenizerError::Invalid(format!(
                    "{} scores for {n} tokens",
                    s.len()
                )));
            }
        }
        let mut types: Vec<TokenType> = match &spec.token_types {
            Some(t) if t.len() != n => {
                return Err(TokenizerError::Invalid(format!(
                    "{} token types for {n} tokens",
                    t.len()
                )))
            }
            Some(t) => t.iter().map(|&v| TokenType::from_gguf(v)).collect(),
            None => vec![TokenType::Normal; n],
        };
        let bos_id = check_id("BOS", spec.bos_id, n)?;
        let eos_id = check_id("EOS", spec.eos_id, n)?;
        let lenient = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let unk_id = lenient(spec.unk_id);
        let eot_id = lenient(spec.eot_id);

        let stop = stop_ids(&spec.tokens, eos_id, &[eot_id]);
        for &id in &stop {
            types[id as usize] = TokenType::Control;
        }
        let specials = SpecialMatcher::new(spec.tokens.iter().enumerate().filter_map(|(i, t)| {
            match types[i] {
                TokenType::Control | TokenType::Unknown => Some((i as u32, t.as_str(), false)),
                TokenType::UserDefined => Some((i as u32, t.as_str(), true)),
                _ => None,
            }
        }));

        let (kind, backend, vocab, add_bos, strip_first_space) = match spec.model.as_str() {
            "gpt2" => {
                let pre = spec.pre.clone().unwrap_or_else(|| "default".to_owned());
                let choice = pretok::lookup(&pre)?;
                let merges = spec.merges.as_ref().ok_or_else(|| {
                    TokenizerError::Invalid("a gpt2 tokenizer needs merges".into())
                })?;
                let tokenizer = build_bpe(&spec.tokens, merges, &choice)?;
                let vocab = Vocab::new(spec.tokens, types, |_, text, ty, out| match ty {
                    TokenType::Normal | TokenType::Undefined => {
                        out.extend_from_slice(&bytelevel::decode_token(text))
                    }
                    _ => out.extend_from_slice(text.as_bytes()),
                })?;
                (
                    format!("gpt2 ({pre})"),
                    Backend::Bpe {
                        tokenizer: Box::new(tokenizer),
                        specials,
                    },
                    vocab,
                    spec.add_bos.unwrap_or(choice.add_bos),
                    false,
                )
            }
            "llama" => {
                let mut byte_ids = [None; 256];
                for (i, t) in spec.tokens.iter().enumerate() {
                    if types[i] == TokenType::Byte {
                        if let Some(b) = spm::parse_byte_token(t) {
                            byte_ids[b as usize].get_or_insert(i as u32);
                        }
                    }
                }
                let scores = spec.scores.unwrap_or_else(|| vec![0.0; n]);
                let model = SpmModel::new(&spec.tokens, scores, byte_ids, unk_id);
                let add_space_prefix = spec.add_space_prefix.unwrap_or(true);
                let vocab = Vocab::new(spec.tokens, types, |_, text, ty, out| match ty {
                    TokenType::Normal | TokenType::Undefined => {
                        for c in text.chars() {
                            if c == '\u{2581}' {
                                out.push(b' ');
                            } else {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                    TokenType::Byte => match spm::parse_byte_token(text) {
                        Some(b) => out.push(b),
                        None => out.extend_from_slice(text.as_bytes()),
                    },
                    _ => out.extend_from_slice(text.as_bytes()),
                })?;
                (
                    "llama (sentencepiece)".to_owned(),
                    Backend::Spm {
                        model: Box::new(model),
                        specials,
                        add_space_prefix,
                    },
                    vocab,
                    spec.add_bos.unwrap_or(true),
                    add_space_prefix,
                )
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };

        Ok(Tokenizer {
            kind,
            backend,
            vocab,
            bos_id,
            eos_id,
            add_bos: add_bos && bos_id.is_some(),
            add_eos: spec.add_eos.unwrap_or(false) && eos_id.is_some(),
            strip_first_space,
            stop_ids: stop,
            chat_template: spec.chat_template,
        })
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(f: &kiln_format::gguf::GgufFile) -> Result<Self, TokenizerError> {
        Self::from_spec(TokenizerSpec::from_gguf(f)?)
    }

    /// Loads a Hugging Face tokenizer: `path` is a folder holding `tokenizer.json`, or the file
    /// itself. BOS/EOS, `add_bos_token`/`add_eos_token` and the chat template come from
    /// `tokenizer_config.json` beside it when present (then `special_tokens_map.json` and
    /// `chat_template.jinja`).
    pub fn from_hf(path: &Path) -> Result<Self, TokenizerError> {
        hf::load(path)
    }

    /// Encodes text.
    ///
    /// `add_special`: add BOS (and EOS) as the model's flags say, but not a second one when
    /// the text already yields it (see the crate documentation). `parse_special`: read the
    /// texts of control tokens (e.g. `<|im_start|>`, `<start_of_turn>`, `<bos>`) as those
    /// tokens; otherwise they are tokenized as ordinary text. User-defined tokens are always
    /// recognised, as in llama.cpp and SentencePiece.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        match &self.backend {
            Backend::Hf(h) => return h.encode(self, text, add_special, parse_special),
            Backend::Bpe {
                tokenizer,
                specials,
            } => {
                for frag in specials.split(text, parse_special) {
                    match frag {
                        Fragment::Text(t) => {
                            let enc = tokenizer
                                .encode(t, false)
                                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                            ids.extend_from_slice(enc.get_ids());
                        }
                        Fragment::Token(id) => ids.push(id),
                    }
                }
            }
            Backend::Spm {
                model,
                specials,
                add_space_prefix,
            } => {
                // The space prefix goes at the start and after every special token.
                let mut after_special = true;
                let mut buf = String::new();
                for frag in specials.split(text, parse_special) {
                    match frag {
                        Fragment::Text(t) => {
                            buf.clear();
                            if *add_space_prefix && after_special {
                                buf.push('\u{2581}');
                            }
                            for c in t.chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            model.tokenize(&buf, &mut ids)?;
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            ids.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special {
            self.add_bos_eos(&mut ids);
        }
        Ok(ids)
    }

    /// Encodes a prompt rendered by a chat template: special tokens parsed, BOS/EOS per the
    /// model's flags unless the rendered text already carries them.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(rendered, true, true)
    }

    fn add_bos_eos(&self, ids: &mut Vec<u32>) {
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        if self.add_eos {
            if let Some(eos) = self.eos_id {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
        }
    }

    /// Decodes token ids to text. `skip_special` leaves out tokens that stand for no text
    /// (see [`Tokenizer::is_special`]). Ids outside the vocabulary are skipped. Bytes that do
    /// not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        let mut first = true;
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            let b = self.vocab.bytes(id);
            if first && !b.is_empty() {
                first = false;
                if self.strip_first_space {
                    bytes.extend_from_slice(b.strip_prefix(b" ").unwrap_or(b));
                    continue;
                }
            }
            bytes.extend_from_slice(b);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes a token stands for: byte-level BPE characters decoded, U+2581 read as a
    /// space, `<0xNN>` as its byte, control and user-defined tokens as their text. Empty for
    /// ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.vocab.bytes(id).to_vec()
    }

    pub(crate) fn token_bytes_ref(&self, id: u32) -> &[u8] {
        self.vocab.bytes(id)
    }

    pub(crate) fn strips_first_space(&self) -> bool {
        self.strip_first_space
    }

    /// The vocabulary entry as stored (e.g. `Ġthe`, `▁the`, `<0x0A>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        match (self.vocab.texts.get(i), self.vocab.types.get(i)) {
            (Some(t), Some(TokenType::Undefined)) if t.is_empty() => None,
            (Some(t), _) => Some(t),
            _ => None,
        }
    }

    /// The token's type, `None` outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.vocab.token_type(id)
    }

    /// Number of token ids (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The BOS token id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS token id, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether `encode(…, add_special = true, …)` adds BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(…, add_special = true, …)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Tokens that end generation: EOS, the file's end-of-turn id, and the end-of-turn /
    /// end-of-text tokens of common families found in the vocabulary (`<|im_end|>`,
    /// `<end_of_turn>`, `<|eot_id|>`, `<|eom_id|>`, `<|end_of_text|>`, `<|endoftext|>`, …).
    /// Sorted, without duplicates.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }

    /// Whether the token stands for no text and is hidden by `skip_special`: control tokens
    /// (type 3), and also the unknown token and unused entries. For Hugging Face tokenizers:
    /// added tokens marked special.
    pub fn is_special(&self, id: u32) -> bool {
        self.vocab.token_type(id).is_none_or(TokenType::hidden)
    }

    /// A short description: `"gpt2 (smollm)"`, `"llama (sentencepiece)"`, `"huggingface"`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The BOS token's text (e.g. `<bos>`), for chat templates.
    pub fn bos_text(&self) -> Option<&str> {
        self.bos_id.and_then(|id| self.token_text(id))
    }

    /// The EOS token's text, for chat templates.
    pub fn eos_text(&self) -> Option<&str> {
        self.eos_id.and_then(|id| self.token_text(id))
    }

    /// The chat template the file carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A ready chat renderer: the file's template, else the built-in one for `architecture`
    /// (see [`chat::ChatTemplate::builtin`]), with this tokenizer's BOS/EOS texts. `None` when
    /// neither exists.
    pub fn chat_renderer(
        &self,
        architecture: &str,
    ) -> Result<Option<chat::ChatTemplate>, TokenizerError> {
        let bos = self.bos_text().unwrap_or("");
        let eos = self.eos_text().unwrap_or("");
        match &self.chat_template {
            Some(src) => chat::ChatTemplate::new(src, bos, eos).map(Some),
            None => Ok(chat::ChatTemplate::builtin(architecture, bos, eos)),
        }
    }

    /// Writes this tokenizer as a Hugging Face folder (`tokenizer.json` and
    /// `tokenizer_config.json`) that [`Tokenizer::from_hf`] reads back with the same token
    /// ids. Available for byte-level BPE and Hugging Face tokenizers; SentencePiece-style GGUF
    /// vocabularies have no exact `tokenizer.json` form.
    pub fn save_hf(&self, dir: &Path) -> Result<(), TokenizerError> {
        hf::save(self, dir)
    }
}

/// The `tokenizers` BPE tokenizer for a GGUF `gpt2` vocabulary (no added tokens: special
/// texts are split off before it runs).
fn build_bpe(
    tokens: &[String],
    merges: &[String],
    choice: &pretok::PreTokenizerChoice,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    use tokenizers::models::bpe::{Merges, Vocab as BpeVocab, BPE};

    let mut vocab = BpeVocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if !t.is_empty() {
            // The first of duplicate entries keeps the text, like SentencePiece vocabularies.
            vocab.entry(t.clone()).or_insert(i as u32);
        }
    }
    let mut pairs: Merges = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            TokenizerError::Invalid(format!(
                "merge {i} ({m:?}) is not two space-separated tokens"
            ))
        })?;
        pairs.push((a.to_owned(), b.to_owned()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(choice.ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Invalid(format!("BPE vocabulary and merges: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pretok::build(choice.regexes)?));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Tokenizer>();
        assert_send_sync::<super::chat::ChatTemplate>();
        assert_send_sync::<super::TokenizerError>();
    }
}
