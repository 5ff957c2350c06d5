//! The order a decoded token reads a model's tensors in (GGUF names): the order kiln
//! packages store them in, and what tools that replay a token's reads follow.

/// A layer's tensors in the order a token reaches them: each matrix followed by its bias, the
/// norms where they apply.
pub const LAYER_USE_ORDER: [&str; 20] = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_q.bias",
    "attn_k.weight",
    "attn_k.bias",
    "attn_v.weight",
    "attn_v.bias",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
    "attn_output.weight",
    "attn_output.bias",
    "post_attention_norm.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_gate.bias",
    "ffn_up.weight",
    "ffn_up.bias",
    "ffn_down.weight",
    "ffn_down.bias",
    "post_ffw_norm.weight",
];

/// Where `name` falls in a token's reads: the embedding first, the layers by number, each in
/// [`LAYER_USE_ORDER`] (anything else after them), then the output norm and matrix, then any
/// other tensor.
pub fn key(name: &str) -> (u8, u64, usize) {
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((layer, within)) = rest.split_once('.') {
            if let Ok(layer) = layer.parse::<u64>() {
                let rank = LAYER_USE_ORDER
                    .iter()
                    .position(|n| *n == within)
                    .unwrap_or(LAYER_USE_ORDER.len());
                return (1, layer, rank);
            }
        }
    }
    match name {
        "token_embd.weight" => (0, 0, 0),
        "rope_freqs.weight" => (0, 0, 1),
        "output_norm.weight" => (2, 0, 0),
        "output.weight" => (2, 0, 1),
        _ => (3, 0, 0),
    }
}

/// Sorts `names` into the order the runtime reads the tensors for each token ([`key`]; ties
/// by name). Decoding streams every matrix once per token from the mapped shards, so storing
/// them in that order makes the reads one forward sweep: the kernels' prefetches past the end
/// of a tensor land on the next one used. (Sources list tensors in other orders: GGUF files
/// often by name, `blk.10` before `blk.2`.)
pub fn sort(names: &mut [String]) {
    names.sort_by(|a, b| key(a).cmp(&key(b)).then_with(|| a.cmp(b)));
}

#[cfg(test)]
mod tests {
    use super::sort;

    #[test]
    fn tensors_are_stored_in_the_order_a_token_reads_them() {
        let names = [
            "output.weight",
            "blk.10.attn_q.weight",
            "blk.2.ffn_down.weight",
            "blk.2.attn_q.weight",
            "blk.2.attn_k.weight",
            "blk.2.attn_norm.weight",
            "blk.2.ffn_up.weight",
            "blk.2.ffn_gate.weight",
            "blk.2.unknown.weight",
            "blk.2.attn_v.weight",
            "blk.2.attn_output.weight",
            "blk.2.ffn_norm.weight",
            "output_norm.weight",
            "token_embd.weight",
            "zzz.weight",
        ];
        let mut got: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        sort(&mut got);
        assert_eq!(
            got,
            [
                "token_embd.weight",
                "blk.2.attn_norm.weight",
                "blk.2.attn_q.weight",
                "blk.2.attn_k.weight",
                "blk.2.attn_v.weight",
                "blk.2.attn_output.weight",
                "blk.2.ffn_norm.weight",
                "blk.2.ffn_gate.weight",
                "blk.2.ffn_up.weight",
                "blk.2.ffn_down.weight",
                "blk.2.unknown.weight",
                "blk.10.attn_q.weight",
                "output_norm.weight",
                "output.weight",
                "zzz.weight",
            ]
        );
    }
}
