//! Finding special-token texts inside raw text before the model's own tokenizer runs.
//!
//! Semantics follow llama.cpp's partitioning of GGUF vocabularies: candidate tokens are tried
//! longest text first, each taking its leftmost non-overlapping occurrences in the text not
//! yet claimed by a longer one. Control and unknown tokens take part only when the caller asks
//! for special tokens to be parsed; user-defined tokens always do (SentencePiece's
//! user-defined symbols and Hugging Face's non-special added tokens behave that way).
//!
//! Doing that literally costs one scan of the text per candidate token, which is too slow for
//! vocabularies with thousands of control tokens (Gemma 3 has over six thousand). The same
//! partition comes from accepting occurrences in that priority order (longer text first, then
//! lower id, then further left) and skipping any that overlap an accepted one. Listing every
//! occurrence up front would take memory proportional to text length times token length
//! (Gemma has tokens for every run of up to 31 spaces), so a heap holds only the best
//! remaining occurrence at each text position, found by walking a byte trie; when it is
//! rejected, the next shorter one at that position that can still fit replaces it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// One piece of partitioned input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    /// Lowest id of the tokens ending here.
    any: Option<u32>,
    /// Lowest id of the tokens ending here that take part even when specials are not parsed.
    always: Option<u32>,
}

/// A byte trie over the texts of the special tokens.
#[derive(Default)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
    /// Root fan-out as a dense table: most text positions start no token at all.
    root: Vec<u32>,
    any_always: bool,
    any: bool,
}

impl SpecialMatcher {
    /// `entries`: (id, text, always) where `always` marks tokens matched even when special
    /// tokens are not being parsed. Empty texts are ignored; of tokens sharing a text, the one
    /// with the lowest id among those taking part is used.
    pub(crate) fn new<'a>(entries: impl IntoIterator<Item = (u32, &'a str, bool)>) -> Self {
        let mut nodes = vec![Node::default()];
        let mut any = false;
        let mut any_always = false;
        for (id, text, always) in entries {
            if text.is_empty() {
                continue;
            }
            let mut cur = 0usize;
            for &b in text.as_bytes() {
                let next = match nodes[cur].children.binary_search_by_key(&b, |&(k, _)| k) {
                    Ok(i) => nodes[cur].children[i].1 as usize,
                    Err(i) => {
                        let n = nodes.len();
                        nodes.push(Node::default());
                        nodes[cur].children.insert(i, (b, n as u32));
                        n
                    }
                };
                cur = next;
            }
            let node = &mut nodes[cur];
            node.any = Some(node.any.map_or(id, |old| old.min(id)));
            any = true;
            if always {
                node.always = Some(node.always.map_or(id, |old| old.min(id)));
                any_always = true;
            }
        }
        let mut root = vec![u32::MAX; 256];
        for &(b, n) in &nodes[0].children {
            root[b as usize] = n;
        }
        SpecialMatcher {
            nodes,
            root,
            any_always,
            any,
        }
    }

    /// The longest active token starting at `start` and at most `max_len` bytes long.
    fn longest_at(
        &self,
        bytes: &[u8],
        start: usize,
        max_len: usize,
        parse_special: bool,
    ) -> Option<(usize, u32)> {
        let first = self.root[bytes[start] as usize];
        if first == u32::MAX {
            return None;
        }
        let mut best = None;
        let mut node = first as usize;
        let mut pos = start + 1;
        loop {
            if pos - start > max_len {
                break;
            }
            let n = &self.nodes[node];
            if let Some(id) = if parse_special { n.any } else { n.always } {
                best = Some((pos - start, id));
            }
            if pos == bytes.len() {
                break;
            }
            match self.child(node, bytes[pos]) {
                Some(n) => {
                    node = n;
                    pos += 1;
                }
                None => break,
            }
        }
        best
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let children = &self.nodes[node].children;
        children
            .binary_search_by_key(&b, |&(k, _)| k)
            .ok()
            .map(|i| children[i].1 as usize)
    }

    /// Splits `text` into raw text and special tokens.
    pub(crate) fn split<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let active = if parse_special {
            self.any
        } else {
            self.any_always
        };
        if !active || text.is_empty() {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(text)]
            };
        }
        let bytes = text.as_bytes();
        // Max-heap of (length, lower id first, leftmost first): each position's best
        // occurrence not yet known to be rejected.
        let mut heap: BinaryHeap<(usize, Reverse<u32>, Reverse<usize>)> = (0..bytes.len())
            .filter_map(|start| {
                let (len, id) = self.longest_at(bytes, start, usize::MAX, parse_special)?;
                Some((len, Reverse(id), Reverse(start)))
            })
            .collect();
        if heap.is_empty() {
            return vec![Fragment::Text(text)];
        }
        let mut claimed = vec![false; bytes.len()];
        let mut accepted: Vec<(usize, usize, u32)> = Vec::new();
        while let Some((len, Reverse(id), Reverse(start))) = heap.pop() {
            if claimed[start] {
                // Everything starting inside an accepted token overlaps it.
                continue;
            }
            match claimed[start..start + len].iter().position(|&c| c) {
                None => {
                    claimed[start..start + len]
                        .iter_mut()
                        .for_each(|c| *c = true);
                    accepted.push((start, len, id));
                }
                Some(room) => {
                    // Claims never shrink, so only occurrences ending before the claimed
                    // byte can still be accepted.
                    if let Some((len, id)) = self.longest_at(bytes, start, room, parse_special) {
                        heap.push((len, Reverse(id), Reverse(start)));
                    }
                }
            }
        }
        accepted.sort_unstable();
        let mut out = Vec::with_capacity(accepted.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in accepted {
            if start > pos {
                out.push(Fragment::Text(&text[pos..start]));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < text.len() {
            out.push(Fragment::Text(&text[pos..]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Fragment::*;
    use super::*;

    fn matcher() -> SpecialMatcher {
        SpecialMatcher::new([
            (1, "<s>", false),
            (2, "<|im_start|>", false),
            (3, "\n", true),
            (4, "\n\n", true),
            (5, "ab", false),
            (6, "bcd", false),
        ])
    }

    #[test]
    fn control_tokens_only_when_parsing_specials() {
        let m = matcher();
        assert_eq!(
            m.split("<s>hi<|im_start|>x", true),
            vec![Token(1), Text("hi"), Token(2), Text("x")]
        );
        assert_eq!(m.split("<s>hi", false), vec![Text("<s>hi")]);
        assert_eq!(m.split("a\nb", false), vec![Text("a"), Token(3), Text("b")]);
    }

    #[test]
    fn longer_tokens_win_then_leftmost() {
        let m = matcher();
        assert_eq!(m.split("\n\n\n", false), vec![Token(4), Token(3)]);
        // The longer "bcd" is claimed before "ab" is considered.
        assert_eq!(m.split("abcd", true), vec![Text("a"), Token(6)]);
        assert_eq!(m.split("", true), vec![]);
        assert_eq!(m.split("é<s>", true), vec![Text("é"), Token(1)]);
    }

    /// llama.cpp's procedure spelled out: tokens by descending length (then id), each taking
    /// its leftmost non-overlapping occurrences within the still-unclaimed text.
    fn naive(
        tokens: &[(u32, String, bool)],
        text: &str,
        parse_special: bool,
    ) -> Vec<Fragment<'static>> {
        let mut order: Vec<&(u32, String, bool)> = tokens
            .iter()
            .filter(|t| !t.1.is_empty() && (parse_special || t.2))
            .collect();
        order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let mut owner: Vec<Option<(u32, usize)>> = vec![None; text.len()];
        let mut seen = std::collections::HashSet::new();
        for (id, tok, _) in order {
            if !seen.insert(tok.clone()) {
                continue;
            }
            let mut from = 0;
            while let Some(i) = text[from..].find(tok.as_str()).map(|i| i + from) {
                if owner[i..i + tok.len()].iter().all(Option::is_none) {
                    owner[i] = Some((*id, tok.len()));
                    for o in &mut owner[i + 1..i + tok.len()] {
                        *o = Some((u32::MAX, 0));
                    }
                    from = i + tok.len();
                } else {
                    from = i + 1;
                }
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        let mut text_start = 0;
        while i < text.len() {
            match owner[i] {
                Some((id, len)) if id != u32::MAX => {
                    if text_start < i {
                        out.push(Fragment::Text(text[text_start..i].to_owned().leak()));
                    }
                    out.push(Fragment::Token(id));
                    i += len;
                    text_start = i;
                }
                _ => i += 1,
            }
        }
        if text_start < text.len() {
            out.push(Fragment::Text(text[text_start..].to_owned().leak()));
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]

        #[test]
        fn same_partition_as_token_by_token_scanning(
            tokens in proptest::collection::vec(("[ab ]{1,4}", proptest::bool::ANY), 0..8),
            text in "[ab c]{0,40}",
            parse_special in proptest::bool::ANY,
        ) {
            let tokens: Vec<(u32, String, bool)> = tokens
                .into_iter()
                .enumerate()
                .map(|(i, (t, always))| (i as u32, t, always))
                .collect();
            let m = SpecialMatcher::new(tokens.iter().map(|(i, t, a)| (*i, t.as_str(), *a)));
            proptest::prop_assert_eq!(m.split(&text, parse_special), naive(&tokens, &text, parse_special));
        }
    }
}
