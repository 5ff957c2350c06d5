//! A model with everything needed to talk to it: weights, tokenizer, chat template, and the
//! rules for turning a user's prompt into token ids.

use crate::error::ModelError;
use crate::model::Model;
use kiln_format::gguf::GgufFile;
use kiln_tokenizer::chat::{ChatTemplate, Message};
use kiln_tokenizer::Tokenizer;
use std::path::Path;
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
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The file's chat template, or the built-in one for its family.
    pub chat_template: Option<ChatTemplate>,
    /// Whether `chat_template` came from the file (false: built in).
    pub chat_template_from_file: bool,
    /// Time taken to open everything, in milliseconds.
    pub load_ms: f64,
}

impl ModelBundle {
    /// Opens a GGUF model file with its tokenizer and chat template.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelBundle, BundleError> {
        let start = Instant::now();
        let file = Arc::new(GgufFile::open(path.as_ref())?);
        // The model first: an unsupported architecture is the more useful message.
        let model = Model::from_gguf(Arc::clone(&file))?;
        let in_file = |source| BundleError::Tokenizer {
            path: file.path().to_path_buf(),
            source,
        };
        let tokenizer = Tokenizer::from_gguf(&file).map_err(in_file)?;
        let bos = tokenizer.bos_text().unwrap_or("").to_string();
        let eos = tokenizer.eos_text().unwrap_or("").to_string();
        let (chat_template, from_file) = match tokenizer.chat_template() {
            Some(src) => (
                Some(ChatTemplate::new(src, &bos, &eos).map_err(in_file)?),
                true,
            ),
            None => (
                ChatTemplate::builtin(&model.config.architecture, &bos, &eos),
                false,
            ),
        };
        Ok(ModelBundle {
            model,
            tokenizer,
            chat_template,
            chat_template_from_file: from_file,
            load_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Token ids of a plain prompt: BOS added as the model's metadata says, and special-token
    /// texts (e.g. `<|im_start|>`) recognised, as llama.cpp and Hugging Face do by default.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, BundleError> {
        Ok(self.tokenizer.encode(text, true, true)?)
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
        let text = self.render_chat(messages)?;
        let mut ids = self.tokenizer.encode(&text, false, true)?;
        if self.tokenizer.add_bos() {
            if let Some(bos) = self.tokenizer.bos_id() {
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
