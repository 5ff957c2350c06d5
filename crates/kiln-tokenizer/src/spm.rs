//! SentencePiece-style tokenization of GGUF `llama` vocabularies.
//!
//! The algorithm is the one llama.cpp applies to these files: the text is cut into characters,
//! then the adjacent pair whose concatenation is the highest-scoring vocabulary entry is merged,
//! repeatedly (ties go to the leftmost pair), until no adjacent pair forms a vocabulary entry.
//! A character that is not in the vocabulary is emitted as its UTF-8 bytes through the
//! `<0xNN>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::TokenizerError;

pub(crate) struct SpmModel {
    lookup: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk_id: Option<u32>,
}

#[derive(Clone, Copy)]
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    start: usize,
    len: usize,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    // Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Parses a byte token's text, `<0xNN>`.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl SpmModel {
    /// `byte_ids` are the ids of the `<0xNN>` tokens; the first occurrence of a text wins the
    /// lookup.
    pub(crate) fn new(
        tokens: &[String],
        scores: Vec<f32>,
        byte_ids: [Option<u32>; 256],
        unk_id: Option<u32>,
    ) -> Self {
        let mut lookup = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if !t.is_empty() {
                lookup.entry(t.clone()).or_insert(id as u32);
            }
        }
        SpmModel {
            lookup,
            scores,
            byte_ids,
            unk_id,
        }
    }

    /// Tokenizes already escaped text (spaces replaced by U+2581), appending to `out`.
    pub(crate) fn tokenize(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                prev: i.checked_sub(1),
                next: None,
                start,
                len: c.len_utf8(),
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }

        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.try_add(text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            // Stale entries: one side was merged away or grew since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.len {
                continue;
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(bigram.left);
            }
            if let Some(p) = l.prev {
                self.try_add(text, &symbols, p, bigram.left, &mut queue);
            }
            if let Some(n) = r.next {
                self.try_add(text, &symbols, bigram.left, n, &mut queue);
            }
        }

        let mut cur = Some(0);
        while let Some(i) = cur {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.lookup.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        match self.byte_ids[b as usize].or(self.unk_id) {
                            Some(id) => out.push(id),
                            None => {
                                return Err(TokenizerError::Encode(format!(
                                    "{piece:?} is not in the vocabulary, which has neither a \
                                     <0x{b:02X}> byte token nor an unknown token"
                                )))
                            }
                        }
                    }
                }
            }
            cur = s.next;
        }
        Ok(())
    }

    fn try_add(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (symbols[left], symbols[right]);
        let merged = &text[l.start..l.start + l.len + r.len];
        if let Some(&id) = self.lookup.get(merged) {
            queue.push(Bigram {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                len: merged.len(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vocab: &[(&str, f32)]) -> SpmModel {
        let tokens: Vec<String> = vocab.iter().map(|(t, _)| t.to_string()).collect();
        let scores = vocab.iter().map(|(_, s)| *s).collect();
        let mut byte_ids = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if let Some(b) = parse_byte_token(t) {
                byte_ids[b as usize] = Some(i as u32);
            }
        }
        SpmModel::new(&tokens, scores, byte_ids, None)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let m = model(&[
            ("<0xC3>", 0.0),
            ("<0xA9>", 0.0),
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -3.0),
            ("bc", -2.0),
        ]);
        let mut out = Vec::new();
        // "bc" outscores "ab", and "a" + "bc" is not in the vocabulary.
        m.tokenize("abc", &mut out).unwrap();
        assert_eq!(out, vec![2, 6]);
        out.clear();
        m.tokenize("aé", &mut out).unwrap();
        assert_eq!(out, vec![2, 0, 1]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let m = model(&[("a", 0.0), ("aa", 1.0)]);
        let mut out = Vec::new();
        m.tokenize("aaa", &mut out).unwrap();
        assert_eq!(out, vec![1, 0]);
    }

    #[test]
    fn missing_bytes_without_unknown_is_an_error() {
        let m = model(&[("a", 0.0)]);
        let mut out = Vec::new();
        assert!(m.tokenize("ab", &mut out).is_err());
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("a"), None);
    }
}
