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

const FIXTURE_TYPES: [GgmlType; 15] = [
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
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
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

/// IQ4 blocks built by hand, with values worked out from the layout in `ggml-common.h` and
/// `dequantize_row_iq4_*` in `ggml-quants.c`: every level and every scale bit appears once,
/// and all values are exact in f32, so each one is compared exactly. The blocks also go
/// through a GGUF file and back.
#[test]
fn iq4_blocks_dequantize_to_hand_computed_values() {
    const LEVELS: [f32; 16] = [
        -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0,
        69.0, 89.0, 113.0,
    ];
    // Codes j (low nibbles, elements 0..16) and 15 - j (high nibbles, elements 16..32).
    let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();

    // IQ4_NL: d = 0.5 (f16 0x3800).
    let mut nl = vec![0x00, 0x38];
    nl.extend_from_slice(&nibbles);
    let mut want_nl = Vec::new();
    want_nl.extend((0..16).map(|j| 0.5 * LEVELS[j]));
    want_nl.extend((0..16).map(|j| 0.5 * LEVELS[15 - j]));

    // IQ4_XS: d = 0.25 (f16 0x3400); the eight 6-bit scales ls = 0, 1, 31, 32, 33, 47, 62, 63
    // (multipliers ls - 32 = -32, -31, -1, 0, 1, 15, 30, 31). Low nibbles, two per byte,
    // sub-block 2k in the low half: 0x10, 0x0f, 0xf1, 0xfe. High two bits at 2 * ib of
    // scales_h: 0,0,1,2,2,2,3,3 -> 0xfa90.
    let ls = [0i32, 1, 31, 32, 33, 47, 62, 63];
    let mut xs = vec![0x00, 0x34, 0x90, 0xfa, 0x10, 0x0f, 0xf1, 0xfe];
    for _ in 0..8 {
        xs.extend_from_slice(&nibbles);
    }
    let mut want_xs = Vec::new();
    for &l in &ls {
        let m = 0.25 * (l - 32) as f32;
        want_xs.extend((0..16).map(|j| m * LEVELS[j]));
        want_xs.extend((0..16).map(|j| m * LEVELS[15 - j]));
    }
    assert_eq!(want_xs[0], 1016.0); // 0.25 * -32 * -127
    assert_eq!(want_xs[255], 0.25 * 31.0 * -127.0);

    let mut writer = kiln_format::gguf::GgufWriter::new();
    for (ty, blocks, want) in [
        (GgmlType::IQ4_NL, &nl, &want_nl),
        (GgmlType::IQ4_XS, &xs, &want_xs),
    ] {
        assert_eq!(blocks.len(), ty.block_bytes());
        let mut got = vec![0.0; want.len()];
        ggml::dequantize(ty, blocks, &mut got).unwrap();
        assert_bits_eq(&format!("hand-made {ty}"), &got, want);
        writer
            .add_tensor(format!("{ty}"), &[want.len() as u64], ty, blocks.clone())
            .unwrap();
    }
    let path = std::env::temp_dir().join(format!("kiln-iq4-{}.gguf", std::process::id()));
    writer.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    for (ty, want) in [(GgmlType::IQ4_NL, &want_nl), (GgmlType::IQ4_XS, &want_xs)] {
        let t = file.require_tensor(&format!("{ty}")).unwrap();
        assert_eq!(t.ty, ty);
        assert_bits_eq(
            &format!("{ty} from GGUF"),
            &file.tensor_f32(t).unwrap(),
            want,
        );
    }
    drop(file);
    std::fs::remove_file(&path).unwrap();
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
