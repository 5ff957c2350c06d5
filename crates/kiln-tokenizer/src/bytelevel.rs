//! GPT-2's byte-level alphabet: every byte is shown as a printable character so that BPE
//! vocabularies can be stored as text.
//!
//! The mapping (as published with GPT-2 and used by every byte-level BPE since): the printable
//! bytes `!`..=`~`, `¡`..=`¬` and `®`..=`ÿ` stand for themselves; the remaining 68 bytes are
//! given the code points U+0100, U+0101, … in increasing byte order.

use std::sync::OnceLock;

fn is_self_mapped(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

struct Tables {
    // Every mapped character is below U+0144, so a dense table beats a hash map.
    from_char: [i16; 0x144],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut from_char = [-1i16; 0x144];
        let mut next = 0x100u32;
        for b in 0..=255u8 {
            let c = if is_self_mapped(b) {
                b as u32
            } else {
                let c = next;
                next += 1;
                c
            };
            from_char[c as usize] = b as i16;
        }
        Tables { from_char }
    })
}

/// The character that stands for byte `b`.
#[cfg(test)]
pub(crate) fn byte_to_char(b: u8) -> char {
    if is_self_mapped(b) {
        return b as char;
    }
    let below = (0..b).filter(|&x| !is_self_mapped(x)).count() as u32;
    char::from_u32(0x100 + below).unwrap_or('\0')
}

/// The byte a character stands for, if it is part of the alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let t = tables();
    let i = c as usize;
    if i < t.from_char.len() && t.from_char[i] >= 0 {
        Some(t.from_char[i] as u8)
    } else {
        None
    }
}

/// The bytes a byte-level token stands for. A token containing any character outside the
/// alphabet (typically an added token such as `<|im_start|>` written in plain text) is taken
/// literally, as Hugging Face's ByteLevel decoder does.
pub(crate) fn decode_token(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => return text.as_bytes().to_vec(),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(decode_token("Ġthe"), b" the");
        assert_eq!(decode_token("<|im_start|>"), b"<|im_start|>");
        assert_eq!(decode_token("日本"), "日本".as_bytes());
    }
}
