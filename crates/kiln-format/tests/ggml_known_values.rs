//! Dequantization and quantization checked against values produced by an independent
//! implementation: the `gguf` Python package (see `tools/gen-ggml-fixtures.py`).
//!
//! Bound: bit-exact. kiln follows ggml's reference arithmetic operation for operation
//! (no fused multiply-add, same association), so every dequantized f32 must equal gguf's.

use std::path::PathBuf;

use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::GgufFile;

fn data(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i}: kiln {g:e} vs gguf {w:e}"
        );
    }
}

const FIXTURE_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

const QUANTIZABLE: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

#[test]
fn dequantize_random_blocks_matches_gguf() {
    for ty in FIXTURE_TYPES {
        let blocks = data(&format!("raw_{ty}.bin"));
        let want = f32s(&data(&format!("raw_{ty}.f32")));
        let mut got = vec![0.0; want.len()];
        ggml::dequantize(ty, &blocks, &mut got).unwrap();
        assert_bits_eq(&format!("raw {ty}"), &got, &want);
    }
}

#[test]
fn dequantize_quantized_vectors_matches_gguf() {
    for ty in QUANTIZABLE {
        let blocks = data(&format!("quant_{ty}.bin"));
        let want = f32s(&data(&format!("quant_{ty}.f32")));
        let mut got = vec![0.0; want.len()];
        ggml::dequantize(ty, &blocks, &mut got).unwrap();
        assert_bits_eq(&format!("quant {ty}"), &got, &want);
    }
}

/// kiln's reference quantizers produce the same bytes as gguf's (which in turn documents
/// itself as matching ggml's `quantize_row_*_ref`).
#[test]
fn quantize_matches_gguf_bytes() {
    for ty in QUANTIZABLE {
        let src = f32s(&data(&format!("quant_{ty}.src")));
        let want = data(&format!("quant_{ty}.bin"));
        let got = ggml::quantize(ty, &src).unwrap();
        assert_eq!(got.len(), want.len(), "{ty}: length");
        let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        assert!(
            bad.is_empty(),
            "{ty}: {} bytes differ from gguf, first at {} (kiln {:#04x}, gguf {:#04x})",
            bad.len(),
            bad[0],
            got[bad[0]],
            want[bad[0]]
        );
    }
}

/// `dot_row` over the fixture blocks agrees with "dequantize, then dot" to within f32
/// rounding: relative 1e-5 of `sum |w_i x_i|` (the sum can cancel, so the bound is taken
/// against the magnitude that was summed, not the result).
#[test]
fn dot_row_matches_dequantized_dot_on_fixtures() {
    for ty in FIXTURE_TYPES {
        let blocks = data(&format!("raw_{ty}.bin"));
        let w = f32s(&data(&format!("raw_{ty}.f32")));
        if w.iter().any(|v| !v.is_finite()) {
            continue; // the float fixtures hold infinities on purpose
        }
        let x: Vec<f32> = (0..w.len())
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let (exact, mag) = w.iter().zip(&x).fold((0.0f64, 0.0f64), |(s, m), (&a, &b)| {
            let p = f64::from(a) * f64::from(b);
            (s + p, m + p.abs())
        });
        let got = ggml::dot_row(ty, &blocks, &x);
        assert!(
            (f64::from(got) - exact).abs() <= 1e-5 * mag + 1e-30,
            "{ty}: dot_row {got} vs {exact} (magnitude {mag})"
        );
    }
}

fn model(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    assert!(
        path.exists(),
        "model file {} is missing: run scripts/fetch-models first",
        path.display()
    );
    path
}

fn hex_f32s(hex: &str) -> Vec<f32> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    f32s(&bytes)
}

/// Rows of the real models, read with kiln's reader and dequantized by kiln, match the rows
/// gguf dequantized from the same files.
#[test]
fn real_model_rows_match_gguf() {
    let json: serde_json::Value =
        serde_json::from_slice(&data("real_rows.json")).expect("real_rows.json");
    let models = json["models"].as_object().unwrap();
    let mut types_seen = std::collections::BTreeSet::new();
    for (file, rows) in models {
        let f = GgufFile::open(model(file)).unwrap();
        for r in rows.as_array().unwrap() {
            let name = r["tensor"].as_str().unwrap();
            let row = r["row"].as_u64().unwrap() as usize;
            let want = hex_f32s(r["f32le_hex"].as_str().unwrap());
            let t = f.require_tensor(name).unwrap();
            assert_eq!(t.ty.name(), r["type"].as_str().unwrap(), "{name}");
            assert_eq!(t.row_len() as usize, want.len(), "{name}");
            let rb = t.row_bytes() as usize;
            let bytes = &f.tensor_data(t)[row * rb..(row + 1) * rb];
            let mut got = vec![0.0; want.len()];
            ggml::dequantize(t.ty, bytes, &mut got).unwrap();
            assert_bits_eq(&format!("{file} {name} row {row}"), &got, &want);

            // The whole-tensor path agrees with the row path.
            let all = f.tensor_f32(t).unwrap();
            assert_bits_eq(
                &format!("{file} {name} row {row} via tensor_f32"),
                &all[row * want.len()..(row + 1) * want.len()],
                &want,
            );
            types_seen.insert(t.ty.name());
        }
    }
    let expected: std::collections::BTreeSet<_> = ["F32", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"]
        .into_iter()
        .collect();
    assert_eq!(types_seen, expected);
}
