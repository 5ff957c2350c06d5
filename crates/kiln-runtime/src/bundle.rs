//! A model with everything needed to talk to it: weights, tokenizer, chat template, and the
//! rules for turning a user's prompt into token ids.
//!
//! Three sources: a GGUF file and a kiln package, which carry all of it (a package may lack
//! a tokenizer when its source did), and a Hugging Face folder, where the
//! tokenizer (`tokenizer.json`, with BOS/EOS and the chat template from
//! `tokenizer_config.json`) is optional: without it the model still runs on token ids.

use crate::error::ModelError;
use crate::hf;
use crate::model::Model;
use kiln_format::gguf::GgufFile;
use kiln_tokenizer::chat::{ChatTemplate, Message};
use kiln_tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Why a bundle could not be opened or a prompt not prepared.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The model itself.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Its tokenizer or chat template, as stored in the file.
    #[error("{}: {source}", path.display())]
    Tokenizer {
        /// The model file.
        path: std::path::PathBuf,
        /// What is wrong with the tokenizer.
        source: kiln_tokenizer::TokenizerError,
    },
    /// Text that cannot be tokenized or a chat that cannot be rendered.
    #[error("{0}")]
    Prompt(#[from] kiln_tokenizer::TokenizerError),
    /// A chat request for a model with no template of its own or built in.
    #[error("{0}")]
    NoChatTemplate(String),
    /// Text given to a model folder that has no tokenizer.
    #[error("{}: this model folder has no tokenizer.json, so it cannot tokenize text", .0.display())]
    NoTokenizer(PathBuf),
}

impl From<kiln_format::FormatError> for BundleError {
    fn from(e: kiln_format::FormatError) -> Self {
        BundleError::Model(ModelError::Format(e))
    }
}

/// A model, its tokenizer and its chat template.
pub struct ModelBundle {
    /// The model.
    pub model: Model,
    /// Its tokenizer: always present for GGUF files; `None` for a Hugging Face folder without
    /// `tokenizer.json` (see [`ModelBundle::tokenizer`]).
    pub tokenizer: Option<Tokenizer>,
    /// The file's chat template, or the built-in one for its family.
    pub chat_template: Option<ChatTemplate>,
    /// Whether `chat_template` came from the file (false: built in).
    pub chat_template_from_file: bool,
    /// Time taken to open everything, in milliseconds.
    pub load_ms: f64,
}

impl ModelBundle {
    /// Opens a model with its tokenizer and chat template: a GGUF file, a kiln package
    /// (shards checked as [`crate::package::set_verify_on_open`] says), or a Hugging Face
    /// folder (`config.json`, safetensors weights, and optionally `tokenizer.json`).
    pub fn open(path: impl AsRef<Path>) -> Result<ModelBundle, BundleError> {
        let start = Instant::now();
        let path = path.as_ref();
        let (model, tokenizer, tokenizer_path) = if crate::package::is_package(path) {
            let verify = crate::package::verify_on_open();
            let (model, package) = crate::package::load_model(path, verify)?;
            let tokenizer =
                crate::package::tokenizer(&package).map_err(|source| BundleError::Tokenizer {
                    path: crate::package::manifest_path(path),
                    source,
                })?;
            (model, tokenizer, path.to_path_buf())
        } else if path.is_dir() {
            // The model first: an unsupported architecture is the more useful message.
            let model = hf::load_model(path)?;
            let tokenizer = if path.join(hf::TOKENIZER_FILE).is_file() {
                Some(
                    Tokenizer::from_hf(path).map_err(|source| BundleError::Tokenizer {
                        path: path.to_path_buf(),
                        source,
                    })?,
                )
            } else {
                None
            };
            (model, tokenizer, path.to_path_buf())
        } else {
            hf::refuse_weights_file(path)?;
            let file = Arc::new(GgufFile::open(path)?);
            let model = Model::from_gguf(Arc::clone(&file))?;
            let tokenizer =
                Tokenizer::from_gguf(&file).map_err(|source| BundleError::Tokenizer {
                    path: file.path().to_path_buf(),
                    source,
                })?;
            (model, Some(tokenizer), file.path().to_path_buf())
        };
        let in_file = |source| BundleError::Tokenizer {
            path: tokenizer_path.clone(),
            source,
        };
        let (chat_template, from_file) = match &tokenizer {
            None => (None, false),
            Some(tokenizer) => {
                let bos = tokenizer.bos_text().unwrap_or("");
                let eos = tokenizer.eos_text().unwrap_or("");
                match tokenizer.chat_template() {
                    Some(src) => (
                        Some(ChatTemplate::new(src, bos, eos).map_err(in_file)?),
                        true,
                    ),
                    None => (
                        ChatTemplate::builtin(&model.config.architecture, bos, eos),
                        false,
                    ),
                }
            }
        };
        Ok(ModelBundle {
            model,
            tokenizer,
            chat_template,
            chat_template_from_file: from_file,
            load_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// The tokenizer, or [`BundleError::NoTokenizer`] for a folder without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer, BundleError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| BundleError::NoTokenizer(self.model.origin.clone()))
    }

    /// Token ids of a plain prompt: BOS added as the model's metadata says, and special-token
    /// texts (e.g. `<|im_start|>`) recognised, as llama.cpp and Hugging Face do by default.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, BundleError> {
        Ok(self.tokenizer()?.encode(text, true, true)?)
    }

    /// Renders `messages` with the chat template (adding the assistant's turn opener).
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, BundleError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            BundleError::NoChatTemplate(format!(
                "the model ({}) carries no chat template and kiln has none built in for it",
                self.model.config.architecture
            ))
        })?;
        Ok(template.render(messages, true)?)
    }

    /// Token ids of a chat: the rendered template with special-token texts recognised. BOS is
    /// added when the model's metadata asks for it and the template did not already write it
    /// (Llama and Gemma templates do); EOS is never appended, since the text ends with the
    /// assistant's turn opener.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, BundleError> {
        let tokenizer = self.tokenizer()?;
        let text = self.render_chat(messages)?;
        let mut ids = tokenizer.encode(&text, false, true)?;
        if tokenizer.add_bos() {
            if let Some(bos) = tokenizer.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// The messages of a single-prompt chat, with an optional system message first.
    pub fn chat_messages(prompt: &str, system: Option<&str>) -> Vec<Message> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message {
                role: "system".into(),
                content: s.into(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: prompt.into(),
        });
        messages
    }
}
