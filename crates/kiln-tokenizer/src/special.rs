//! Finding special-token texts inside raw text before the model's own tokenizer runs.
//!
//! Semantics follow llama.cpp's partitioning of GGUF vocabularies: candidate tokens are tried
//! longest text first, each taking its leftmost non-overlapping occurrences in the text not
//! yet claimed by a longer one. Control and unknown tokens take part only when the caller asks
//! for special tokens to be parsed; user-defined tokens always do (SentencePiece's
//! user-defined symbols and Hugging Face's non-special added tokens behave that way).
//!
//! Doing that literally costs one scan of the text per candidate token, which is too slow for
//! vocabularies with thousands of control tokens (Gemma 3 has over six thousand). Instead every
//! occurrence of every candidate is found in one pass with a byte trie, and occurrences are
//! accepted in the same priority order (longer text first, then lower id, then further left),
//! skipping any that overlap an accepted one. That yields the same partition.

/// One piece of partitioned input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    /// Token ending here, and whether it takes part even when specials are not parsed.
    terminal: Option<(u32, bool)>,
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
    /// tokens are not being parsed. Empty texts are ignored; a text listed twice keeps the
    /// lowest id.
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
            match nodes[cur].terminal {
                Some((old, _)) if old <= id => {}
                _ => {
                    nodes[cur].terminal = Some((id, always));
                    any = true;
                    any_always |= always;
                }
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
        // (length, id, start) of every occurrence.
        let mut found: Vec<(usize, u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            let first = self.root[bytes[start] as usize];
            if first == u32::MAX {
                continue;
            }
            let mut node = first as usize;
            let mut pos = start + 1;
            loop {
                if let Some((id, always)) = self.nodes[node].terminal {
                    if parse_special || always {
                        found.push((pos - start, id, start));
                    }
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
        }
        if found.is_empty() {
            return vec![Fragment::Text(text)];
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut claimed = vec![false; bytes.len()];
        let mut accepted: Vec<(usize, usize, u32)> = Vec::new();
        for (len, id, start) in found {
            if claimed[start..start + len].iter().any(|&c| c) {
                continue;
            }
            claimed[start..start + len]
                .iter_mut()
                .for_each(|c| *c = true);
            accepted.push((start, len, id));
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
}
