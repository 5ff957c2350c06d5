//! Hugging Face tokenizer folders: `tokenizer.json` plus the configuration files beside it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::AddedToken;

use crate::{bytelevel, spm, stop_ids, Backend, TokenType, Tokenizer, TokenizerError, Vocab};

pub(crate) struct HfBackend {
    main: tokenizers::Tokenizer,
    /// `main` with special tokens read as plain text, for `parse_special = false`.
    plain: tokenizers::Tokenizer,
    /// Whether the tokenizer's post-processor adds tokens itself (e.g. Llama 3's
    /// `<|begin_of_text|>`). If so, `add_special` is delegated to it.
    post_processor_adds: bool,
}

fn hf_err(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::HuggingFace {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl HfBackend {
    pub(crate) fn encode(
        &self,
        tok: &Tokenizer,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let t = if parse_special {
            &self.main
        } else {
            &self.plain
        };
        let delegate = add_special && self.post_processor_adds;
        let mut ids = t
            .encode(text, delegate)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?
            .get_ids()
            .to_vec();
        if delegate {
            // The text may carry BOS/EOS itself; keep one of each.
            if let Some(bos) = tok.bos_id {
                if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                    ids.remove(0);
                }
            }
            if let Some(eos) = tok.eos_id {
                let n = ids.len();
                if n >= 2 && ids[n - 1] == eos && ids[n - 2] == eos {
                    ids.pop();
                }
            }
        } else if add_special {
            tok.add_bos_eos(&mut ids);
        }
        Ok(ids)
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| hf_err(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(hf_err(path, e.to_string())),
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" (else the
/// first) is the chat template.
fn chat_template_of(v: Option<&Value>, path: &Path) -> Result<Option<String>, TokenizerError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
            };
            let entry = named("default").or_else(|| list.first());
            Ok(entry
                .and_then(|e| e.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned))
        }
        Some(other) => Err(hf_err(
            path,
            format!("chat_template is neither a string nor a list: {other}"),
        )),
    }
}

/// How token texts map to bytes, read off the decoder.
enum ByteStyle {
    ByteLevel,
    /// U+2581 for spaces; `<0xNN>` tokens are bytes when the decoder has byte fallback.
    SentencePiece {
        byte_fallback: bool,
    },
    /// Anything else: each token decoded on its own by `tokenizers`.
    PerToken,
}

fn collect_decoder_steps<'v>(v: &'v Value, out: &mut Vec<&'v serde_json::Map<String, Value>>) {
    match v {
        Value::Object(o) => {
            out.push(o);
            if let Some(Value::Array(items)) = o.get("decoders") {
                for item in items {
                    collect_decoder_steps(item, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_decoder_steps(i, out)),
        _ => {}
    }
}

/// The byte style, and whether decoding drops the first leading space.
fn decoder_style(decoder: &Value) -> (ByteStyle, bool) {
    let mut steps = Vec::new();
    collect_decoder_steps(decoder, &mut steps);
    let ty = |o: &serde_json::Map<String, Value>| {
        o.get("type").and_then(Value::as_str).map(str::to_owned)
    };
    let has = |name: &str| steps.iter().any(|o| ty(o).as_deref() == Some(name));
    let mut strip = false;
    let mut metaspace = false;
    let mut replace_space = false;
    for o in &steps {
        match ty(o).as_deref() {
            Some("Strip") => {
                let content = o.get("content").and_then(Value::as_str);
                let start = o.get("start").and_then(Value::as_u64).unwrap_or(0);
                strip |= content == Some(" ") && start >= 1;
            }
            Some("Metaspace") => {
                metaspace = true;
                let scheme = o.get("prepend_scheme").and_then(Value::as_str);
                let legacy = o.get("add_prefix_space").and_then(Value::as_bool);
                strip |= matches!(scheme, Some("always") | Some("first")) || legacy == Some(true);
            }
            Some("Replace") => {
                let pattern = o
                    .get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(Value::as_str);
                let content = o.get("content").and_then(Value::as_str);
                replace_space |= pattern == Some("\u{2581}") && content == Some(" ");
            }
            _ => {}
        }
    }
    let style = if has("ByteLevel") {
        ByteStyle::ByteLevel
    } else if metaspace || replace_space {
        ByteStyle::SentencePiece {
            byte_fallback: has("ByteFallback"),
        }
    } else {
        ByteStyle::PerToken
    };
    (style, strip)
}

/// Extra end-of-generation ids from `generation_config.json` (`eos_token_id`: an id or a
/// list).
fn generation_eos(dir: &Path) -> Result<Vec<u32>, TokenizerError> {
    let Some(cfg) = read_json(&dir.join("generation_config.json"))? else {
        return Ok(Vec::new());
    };
    let ids = match cfg.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    };
    Ok(ids
        .into_iter()
        .filter_map(|i| u32::try_from(i).ok())
        .collect())
}

/// Largest vocabulary accepted: guards against a corrupt id allocating gigabytes.
const MAX_VOCAB: usize = 1 << 24;

pub(crate) fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let (file, dir): (PathBuf, PathBuf) = if path.is_dir() {
        (path.join("tokenizer.json"), path.to_owned())
    } else {
        let dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        (path.to_owned(), dir)
    };
    if !file.is_file() {
        return Err(hf_err(&file, "no tokenizer.json here"));
    }
    let main = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| hf_err(&file, format!("cannot load: {e}")))?;

    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?.unwrap_or(Value::Null);
    let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
    let special =
        |key: &str| token_string(config.get(key)).or_else(|| token_string(special_map.get(key)));
    let bos_text = special("bos_token");
    let eos_text = special("eos_token");
    let mut chat_template = chat_template_of(config.get("chat_template"), &config_path)?;
    if chat_template.is_none() {
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(s) => chat_template = Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(hf_err(&jinja, e.to_string())),
        }
    }
    if chat_template.is_none() {
        let json_path = dir.join("chat_template.json");
        if let Some(v) = read_json(&json_path)? {
            chat_template = chat_template_of(v.get("chat_template"), &json_path)?;
        }
    }

    // The vocabulary by id, with added tokens typed by their `special` flag.
    let all = main.get_vocab(true);
    let n = all.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    if n == 0 {
        return Err(hf_err(&file, "the vocabulary is empty"));
    }
    if n > MAX_VOCAB {
        return Err(hf_err(
            &file,
            format!("token id {} is implausibly large", n - 1),
        ));
    }
    let mut texts = vec![String::new(); n];
    let mut types = vec![TokenType::Undefined; n];
    for (text, id) in all {
        texts[id as usize] = text;
        types[id as usize] = TokenType::Normal;
    }
    for (id, added) in main.get_added_tokens_decoder() {
        if let Some(slot) = texts.get_mut(id as usize) {
            slot.clone_from(&added.content);
            types[id as usize] = if added.special {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
        }
    }

    let decoder_json = serde_json::to_value(main.get_decoder())
        .map_err(|e| hf_err(&file, format!("cannot inspect the decoder: {e}")))?;
    let (style, strip_first_space) = decoder_style(&decoder_json);
    if let ByteStyle::SentencePiece {
        byte_fallback: true,
    } = style
    {
        for (t, ty) in texts.iter().zip(types.iter_mut()) {
            if *ty == TokenType::Normal && spm::parse_byte_token(t).is_some() {
                *ty = TokenType::Byte;
            }
        }
    }

    let lookup = |t: &Option<String>| t.as_deref().and_then(|t| main.token_to_id(t));
    let bos_id = lookup(&bos_text);
    let eos_id = lookup(&eos_text);
    let extra: Vec<Option<u32>> = generation_eos(&dir)?
        .into_iter()
        .filter(|&i| (i as usize) < n)
        .map(Some)
        .collect();
    let stop = stop_ids(&texts, eos_id, &extra);
    for &id in &stop {
        if types[id as usize] != TokenType::Undefined {
            types[id as usize] = TokenType::Control;
        }
    }

    let vocab = Vocab::new(texts, types, |id, text, ty, out| match (&style, ty) {
        (_, TokenType::Undefined) => {}
        (ByteStyle::ByteLevel, _) => out.extend_from_slice(&bytelevel::decode_token(text)),
        (ByteStyle::SentencePiece { .. }, TokenType::Byte) => {
            out.push(spm::parse_byte_token(text).unwrap_or(0))
        }
        (ByteStyle::SentencePiece { .. }, _) => {
            for c in text.chars() {
                if c == '\u{2581}' {
                    out.push(b' ');
                } else {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        (ByteStyle::PerToken, _) => match main.decode(&[id as u32], false) {
            Ok(s) => out.extend_from_slice(s.as_bytes()),
            Err(_) => out.extend_from_slice(text.as_bytes()),
        },
    })?;

    let post_processor_adds = main.get_post_processor().is_some()
        && !main
            .encode("", true)
            .map_err(|e| hf_err(&file, format!("cannot encode: {e}")))?
            .get_ids()
            .is_empty();
    let (add_bos, add_eos) = if post_processor_adds {
        let ids = main
            .encode("", true)
            .map_err(|e| hf_err(&file, format!("cannot encode: {e}")))?
            .get_ids()
            .to_vec();
        (
            bos_id.is_some() && ids.first().copied() == bos_id,
            eos_id.is_some() && ids.last().copied() == eos_id,
        )
    } else {
        let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
        (
            flag("add_bos_token") && bos_id.is_some(),
            flag("add_eos_token") && eos_id.is_some(),
        )
    };

    let mut plain = main.clone();
    plain.set_encode_special_tokens(true);
    Ok(Tokenizer {
        kind: "huggingface".to_owned(),
        backend: Backend::Hf(Box::new(HfBackend {
            main,
            plain,
            post_processor_adds,
        })),
        vocab,
        bos_id,
        eos_id,
        add_bos,
        add_eos,
        strip_first_space,
        stop_ids: stop,
        chat_template,
    })
}

pub(crate) fn save(tok: &Tokenizer, dir: &Path) -> Result<(), TokenizerError> {
    let hf = match &tok.backend {
        Backend::Bpe { tokenizer, .. } => {
            let mut t = (**tokenizer).clone();
            let mut special = Vec::new();
            let mut user = Vec::new();
            for (i, text) in tok.vocab.texts.iter().enumerate() {
                match tok.vocab.types[i] {
                    TokenType::Control | TokenType::Unknown => {
                        special.push(AddedToken::from(text.clone(), true))
                    }
                    TokenType::UserDefined => user.push(AddedToken::from(text.clone(), false)),
                    _ => {}
                }
            }
            t.add_special_tokens(&special);
            t.add_tokens(&user);
            t
        }
        Backend::Hf(h) => h.main.clone(),
        Backend::Spm { .. } => {
            return Err(TokenizerError::Unsupported(
                "SentencePiece-style GGUF vocabularies cannot be written as tokenizer.json".into(),
            ))
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| hf_err(dir, e.to_string()))?;
    let file = dir.join("tokenizer.json");
    hf.save(&file, false)
        .map_err(|e| hf_err(&file, format!("cannot write: {e}")))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_text(),
        "eos_token": tok.eos_text(),
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "chat_template": tok.chat_template,
    });
    let config_path = dir.join("tokenizer_config.json");
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| hf_err(&config_path, e.to_string()))?;
    std::fs::write(&config_path, text).map_err(|e| hf_err(&config_path, e.to_string()))
}
