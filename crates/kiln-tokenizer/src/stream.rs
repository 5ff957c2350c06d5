//! Incremental decoding for streamed generation.

use crate::Tokenizer;

/// Decodes token ids one at a time and hands out only complete UTF-8 text.
///
/// A token may end in the middle of a character (byte-fallback tokens, byte-level BPE pieces
/// of emoji or CJK); those bytes are held back until the character is complete. The
/// concatenation of everything [`push`](StreamDecoder::push) and
/// [`finish`](StreamDecoder::finish) return equals [`Tokenizer::decode`] of all ids pushed,
/// including U+FFFD for bytes that can never form a character.
///
/// ```no_run
/// # fn demo(tok: &kiln_tokenizer::Tokenizer, ids: &[u32]) {
/// let mut stream = kiln_tokenizer::StreamDecoder::new(tok, true);
/// for &id in ids {
///     print!("{}", stream.push(id));
/// }
/// print!("{}", stream.finish());
/// # }
/// ```
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    /// Whether a token with bytes has been seen (the first may lose its leading space).
    started: bool,
    strip_first_space: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder for a sequence that starts a text, exactly like [`Tokenizer::decode`]: for
    /// tokenizers that put a space in front of the text (SentencePiece with a space prefix),
    /// the first token's leading space is dropped. `skip_special` hides tokens that stand for
    /// no text (see [`Tokenizer::is_special`]).
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special,
            pending: Vec::new(),
            started: false,
            strip_first_space: tokenizer.strips_first_space(),
        }
    }

    /// A decoder for tokens that continue earlier text (generation after a prompt): nothing
    /// is ever dropped, so a leading space that separates the continuation from the prompt
    /// is kept.
    pub fn continuation(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder {
            strip_first_space: false,
            ..StreamDecoder::new(tokenizer, skip_special)
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if self.skip_special && self.tokenizer.is_special(id) {
            return String::new();
        }
        let bytes = self.tokenizer.token_bytes_ref(id);
        if bytes.is_empty() {
            return String::new();
        }
        let bytes = if !self.started && self.strip_first_space {
            bytes.strip_prefix(b" ").unwrap_or(bytes)
        } else {
            bytes
        };
        self.started = true;
        self.pending.extend_from_slice(bytes);
        self.drain(false)
    }

    /// Adds several tokens; returns the text that became complete.
    pub fn push_all(&mut self, ids: &[u32]) -> String {
        ids.iter().map(|&id| self.push(id)).collect()
    }

    /// Ends the stream: returns what is left, with U+FFFD for an unfinished character.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    /// Bytes held back because they may still become a character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// Emits the longest decodable prefix of `pending`. Invalid sequences become U+FFFD the
    /// same way `String::from_utf8_lossy` replaces them, so the pieces add up to the lossy
    /// decoding of the whole byte stream; a truncated character at the end is kept unless
    /// `at_end`.
    fn drain(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        let mut pos = 0;
        while pos < self.pending.len() {
            match std::str::from_utf8(&self.pending[pos..]) {
                Ok(s) => {
                    out.push_str(s);
                    pos = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just validated, so this cannot fail.
                    out.push_str(
                        std::str::from_utf8(&self.pending[pos..pos + valid]).unwrap_or(""),
                    );
                    pos += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos += n;
                        }
                        None if at_end => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos = self.pending.len();
                        }
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..pos);
        out
    }
}
