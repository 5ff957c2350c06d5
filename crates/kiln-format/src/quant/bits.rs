//! Little-endian bit streams of fixed-width unsigned fields.
//!
//! Field `i` of width `bits` occupies bits `i*bits .. (i+1)*bits` of the stream, where bit `j`
//! is bit `j % 8` (least significant first) of byte `j / 8`. This is how Core ML stores
//! sub-byte tensors; for 4 bits it puts element `2i` in the low nibble of byte `i` and element
//! `2i + 1` in the high nibble.

/// Bytes needed for `n` fields of `bits` bits.
pub(crate) fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs the low `bits` bits of each value.
pub(crate) fn pack(values: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(values.len(), bits)];
    match bits {
        8 => out.copy_from_slice(values),
        4 => {
            for (o, pair) in out.iter_mut().zip(values.chunks(2)) {
                *o = (pair[0] & 0x0f) | (pair.get(1).copied().unwrap_or(0) << 4);
            }
        }
        _ => {
            let mask = (1u16 << bits) - 1;
            for (i, &v) in values.iter().enumerate() {
                let bit = i * bits as usize;
                let field = (v as u16 & mask) << (bit % 8);
                out[bit / 8] |= field as u8;
                if bit % 8 + bits as usize > 8 {
                    out[bit / 8 + 1] |= (field >> 8) as u8;
                }
            }
        }
    }
    out
}

/// Field `i` of a packed stream.
#[inline]
pub(crate) fn get(packed: &[u8], bits: u8, i: usize) -> u8 {
    match bits {
        8 => packed[i],
        4 => (packed[i / 2] >> ((i % 2) * 4)) & 0x0f,
        _ => {
            let bit = i * bits as usize;
            let lo = packed[bit / 8] as u16;
            let hi = packed.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
            (((lo | hi << 8) >> (bit % 8)) & ((1u16 << bits) - 1)) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width() {
        for bits in 1..=8u8 {
            let values: Vec<u8> = (0..101u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                .collect();
            let p = pack(&values, bits);
            assert_eq!(p.len(), packed_len(values.len(), bits));
            for (i, &v) in values.iter().enumerate() {
                assert_eq!(get(&p, bits, i), v, "bits {bits} field {i}");
            }
        }
    }

    #[test]
    fn nibble_and_six_bit_order() {
        assert_eq!(pack(&[0x1, 0x2, 0x3], 4), vec![0x21, 0x03]);
        // Four 6-bit fields 1, 2, 3, 4 fill three bytes least significant bit first.
        assert_eq!(pack(&[1, 2, 3, 4], 6), vec![0x81, 0x30, 0x10]);
    }
}
