//! Multi-turn chat over one session, reusing the key/value cache between turns.
//!
//! Each turn renders the whole conversation with the chat template, tokenizes it, and runs only
//! the tokens after the longest prefix the cache already holds. A template that re-renders
//! earlier turns differently (or an assistant reply that re-tokenizes differently) only costs
//! recomputation from the first difference, never a wrong answer.

use crate::bundle::{BundleError, ModelBundle};
use crate::generate::{generate, GenerateOptions, Generation};
use crate::pool::ThreadPool;
use crate::session::Session;
use kiln_tokenizer::chat::Message;

/// A chat in progress: its messages and the tokens its session's cache holds.
pub struct Conversation<'m> {
    bundle: &'m ModelBundle,
    session: Session<'m>,
    messages: Vec<Message>,
    /// The tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
}

impl<'m> Conversation<'m> {
    /// A new conversation with room for `n_ctx` positions and an optional system message.
    pub fn new(
        bundle: &'m ModelBundle,
        pool: &'m ThreadPool,
        n_ctx: usize,
        system: Option<&str>,
    ) -> Conversation<'m> {
        let messages = system
            .map(|s| vec![Message::new("system", s)])
            .unwrap_or_default();
        Conversation {
            bundle,
            session: Session::new(&bundle.model, pool, n_ctx),
            messages,
            cached: Vec::new(),
        }
    }

    /// Chooses the activation precision of the matrix products.
    pub fn set_precision(&mut self, precision: crate::kernels::Precision) {
        self.session.set_precision(precision);
    }

    /// The messages so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Positions the session can hold.
    pub fn n_ctx(&self) -> usize {
        self.session.n_ctx()
    }

    /// Tokens currently held in the cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Forgets every turn except the system message.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.session.reset();
        self.cached.clear();
    }

    /// Adds a user message and generates the assistant's reply, streaming it to `on_text`.
    /// Returns the generation (its `prompt_token_ids` are the tokens actually run this turn).
    /// On failure (e.g. the context is full) the user message is withdrawn.
    pub fn reply(
        &mut self,
        user: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, BundleError> {
        self.messages.push(Message::new("user", user));
        let result = self.run_turn(options, on_text);
        match &result {
            Ok(g) => self
                .messages
                .push(Message::new("assistant", g.text.trim_end())),
            Err(_) => {
                self.messages.pop();
            }
        }
        result
    }

    fn run_turn(
        &mut self,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, BundleError> {
        let prompt = self.bundle.encode_chat(&self.messages)?;
        let mut keep = common_prefix(&self.cached, &prompt);
        // At least one token must run to produce the next logits.
        if keep == prompt.len() {
            keep -= 1;
        }
        // A reply may use whatever room the context has left, up to the caller's limit.
        let room = self.session.n_ctx().saturating_sub(prompt.len());
        if room == 0 {
            return Err(BundleError::Model(crate::error::ModelError::Request(
                format!(
                "the conversation ({} tokens) fills the context of {} positions; start a new one",
                prompt.len(),
                self.session.n_ctx()
            ),
            )));
        }
        let options = GenerateOptions {
            max_tokens: options.max_tokens.min(room),
            ..options.clone()
        };
        self.session.truncate(keep);
        self.cached.truncate(keep);
        let generation = generate(
            &mut self.session,
            self.bundle.tokenizer()?,
            &prompt[keep..],
            &options,
            on_text,
        )?;
        // The cache now holds the prompt and every generated token but the last (sampled,
        // never run).
        self.cached.extend_from_slice(&prompt[keep..]);
        let run = generation.token_ids.len().saturating_sub(1);
        self.cached.extend_from_slice(&generation.token_ids[..run]);
        debug_assert_eq!(self.cached.len(), self.session.n_past());
        Ok(generation)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[], &[1, 2]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2]), 2);
    }
}
