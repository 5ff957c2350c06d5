//! The kiln package's own tensor formats: encoders against their documented guarantees,
//! and round trips through a package.

use kiln_format::ggml::{f16_to_f32, f32_to_f16};
use kiln_format::kiln_types::{
    self, dequantize_row, encode_i4_b64, encode_i8_channel, encode_lut, encode_lut4_b32, KilnType,
    LutOptions, TensorFormat,
};
use kiln_format::package::{
    Conversion, Manifest, Package, PackageWriter, SourceInfo, TensorQuality, Verify, FORMAT_VERSION,
};
use kiln_format::quant::snr_db;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// `LUT4_B32` with one table for the tensor.
const B32: KilnType = KilnType::Lut4B32 { group: None };

/// Deterministic, roughly Gaussian weights with rows of different scales and a few outliers.
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut uniform = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64) as f32
    };
    (0..rows * cols)
        .map(|i| {
            let g: f32 = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
            let row_scale = 0.02 * (1.0 + (i / cols) as f32 % 3.0);
            let outlier = if i % 97 == 13 { 6.0 } else { 1.0 };
            g * row_scale * outlier
        })
        .collect()
}

fn decode(ty: KilnType, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        dequantize_row(ty, data, rows, cols, r, row);
    }
    out
}

#[test]
fn int8_channel_is_within_half_a_step_per_row() {
    let (rows, cols) = (6, 96);
    let w = weights(rows, cols, 1);
    let data = encode_i8_channel(&w, rows, cols).unwrap();
    assert_eq!(data.len(), rows * (4 + cols));
    let back = decode(KilnType::I8Ch, &data, rows, cols);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let step = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        // Every row's codes first (row r at r * cols), then the row scales.
        let s = f32::from_le_bytes(data[rows * cols + 4 * r..][..4].try_into().unwrap());
        assert_eq!(s, step);
        assert_eq!(kiln_types::i8_ch_scale(&data, rows, cols, r), step);
        for (i, &c) in data[r * cols..(r + 1) * cols].iter().enumerate() {
            assert_eq!(
                f32::from(c as i8) * s,
                back[r * cols + i],
                "row {r}, code {i}"
            );
        }
        for (a, b) in row.iter().zip(&back[r * cols..]) {
            assert!((a - b).abs() <= 0.5 * step * 1.0001, "row {r}: {a} vs {b}");
        }
    }
    assert!(snr_db(&w, &back) > 38.0);
}

#[test]
fn int4_block64_is_no_worse_than_the_largest_weight_scale() {
    let (rows, cols) = (4, 192);
    let w = weights(rows, cols, 2);
    let data = encode_i4_b64(&w, rows, cols).unwrap();
    assert_eq!(data.len(), rows * cols / 64 * 34);
    let back = decode(KilnType::I4B64, &data, rows, cols);
    // Per block, against ggml's reference rule (the largest weight maps to -8).
    for (b, (x, y)) in w.chunks_exact(64).zip(back.chunks_exact(64)).enumerate() {
        let max = x
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = f16_to_f32(f32_to_f16(max / -8.0));
        let reference: f32 = x
            .iter()
            .map(|&v| {
                let q = (v / d).round().clamp(-8.0, 7.0);
                (v - d * q).powi(2)
            })
            .sum();
        let err: f32 = x.iter().zip(y).map(|(a, b)| (a - b).powi(2)).sum();
        assert!(err <= reference * 1.0001, "block {b}: {err} > {reference}");
    }
    assert!(snr_db(&w, &back) > 17.0, "{}", snr_db(&w, &back));
}

#[test]
fn lookup_tables_are_exact_for_few_values_and_close_for_many() {
    // Two rows per group, each group drawing from 16 values f16 holds exactly: lossless.
    let (rows, cols) = (4, 64);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let g = (i / cols / 2) as f32;
            (((i * 7) % 16) as f32 - 7.5) * 0.125 + g
        })
        .collect();
    let ty = KilnType::Lut {
        bits: 4,
        group: Some(2),
    };
    let data = encode_lut(ty, &w, rows, cols, LutOptions::default()).unwrap();
    assert_eq!(data.len() as u64, ty.data_length(cols, rows).unwrap());
    assert_eq!(decode(ty, &data, rows, cols), w);

    // Many values: k-means tables gain about 6 dB per bit on heavy-tailed weights (rows of
    // three scales, every 97th weight six times larger).
    let (rows, cols) = (8, 512);
    let w = weights(rows, cols, 3);
    for (bits, min_snr) in [(2u8, 5.5), (4, 16.0), (6, 28.0), (8, 42.0)] {
        let ty = KilnType::Lut { bits, group: None };
        let data = encode_lut(ty, &w, rows, cols, LutOptions::default()).unwrap();
        let snr = snr_db(&w, &decode(ty, &data, rows, cols));
        assert!(snr > min_snr, "lut{bits}: {snr} dB");
        // More k-means runs keep the best table, so never a worse one.
        let restarts = LutOptions {
            restarts: 3,
            ..LutOptions::default()
        };
        let data3 = encode_lut(ty, &w, rows, cols, restarts).unwrap();
        let snr3 = snr_db(&w, &decode(ty, &data3, rows, cols));
        assert!(snr3 >= snr - 1e-9, "lut{bits}: {snr3} < {snr}");
    }
}

/// Symmetric int4 in blocks of 32 with searched scales (what `--quant int4-block32` stores).
fn int4_block32(w: &[f32]) -> Vec<f32> {
    let mut codes = [0u8; 32];
    w.chunks_exact(32)
        .flat_map(|x| {
            let d = kiln_types::quantize_int4_searched(x, &mut codes);
            codes.map(|c| d * (f32::from(c) - 8.0))
        })
        .collect()
}

#[test]
fn lut4_b32_follows_block_offsets_and_beats_int4_block32() {
    let (rows, cols) = (16, 256);
    let ty = B32;
    // A ggml Q4_1-like source: each block of 32 is d·q + m with its own f16 d and m.
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut w = Vec::with_capacity(rows * cols);
    for _ in 0..rows * cols / 32 {
        let d = f16_to_f32(f32_to_f16(0.001 + (next() % 1000) as f32 * 1e-5));
        let m = f16_to_f32(f32_to_f16(-8.5 * d + (next() % 100) as f32 * 1e-5));
        for _ in 0..32 {
            w.push(d * (next() % 16) as f32 + m);
        }
    }
    let data = encode_lut4_b32(ty, &w, rows, cols).unwrap();
    assert_eq!(data.len(), rows * (8 + cols / 32 * 18) + 16);
    let table = kiln_types::lut4_b32_table(ty, &data, rows, cols, rows - 1);
    assert!(table.windows(2).all(|p| p[0] <= p[1]), "{table:?}");
    assert!(table[15] <= kiln_types::LUT4_B32_ENTRY_MAX);
    let lut = snr_db(&w, &decode(ty, &data, rows, cols));
    let int4 = snr_db(&w, &int4_block32(&w));
    assert!(
        lut > 30.0 && lut > int4 + 6.0,
        "LUT4_B32 {lut} dB, int4-block32 {int4} dB"
    );

    // Bell-shaped weights with outliers: the learned levels and the offsets still win.
    let w = weights(rows, cols, 11);
    let data = encode_lut4_b32(ty, &w, rows, cols).unwrap();
    let lut = snr_db(&w, &decode(ty, &data, rows, cols));
    let int4 = snr_db(&w, &int4_block32(&w));
    assert!(
        lut > int4 + 1.0,
        "LUT4_B32 {lut} dB, int4-block32 {int4} dB"
    );
    kiln_types::check_data(ty, &data, rows, cols).unwrap();

    // A table entry off the 7-bit grid is refused (the kernels rely on it), as is a size
    // that is not the shape's.
    let mut bad = data.clone();
    let n = bad.len();
    bad[n - 3] = 200;
    let e = kiln_types::check_data(ty, &bad, rows, cols).unwrap_err();
    assert!(e.to_string().contains("entry 13 of table 0 is 200"), "{e}");
    let e = kiln_types::check_data(ty, &data[1..], rows, cols).unwrap_err();
    assert!(e.to_string().contains("not a 16x256 tensor"), "{e}");
}

#[test]
fn lut4_b32_groups_learn_their_own_tables() {
    // Two groups of rows with differently shaped weights: blocks peaked at zero (cubes of
    // uniform values: levels dense in the middle), and uniformly spread blocks (evenly spaced
    // levels). A table per group follows each.
    let (rows, cols) = (32, 256);
    let mut s = 99u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = 2.0 * ((s >> 40) as f32 / (1u64 << 24) as f32) - 1.0;
            let v = if i < 16 * cols { u * u * u } else { u };
            0.01 * (1 + i / 32 % 7) as f32 * v
        })
        .collect();
    let g16 = KilnType::Lut4B32 { group: Some(16) };
    let data = encode_lut4_b32(g16, &w, rows, cols).unwrap();
    assert_eq!(data.len(), rows * (8 + cols / 32 * 18) + 2 * 16);
    kiln_types::check_data(g16, &data, rows, cols).unwrap();
    let t0 = *kiln_types::lut4_b32_table(g16, &data, rows, cols, 15);
    let t1 = *kiln_types::lut4_b32_table(g16, &data, rows, cols, 16);
    assert_eq!(&data[data.len() - 32..data.len() - 16], &t0);
    assert_eq!(&data[data.len() - 16..], &t1);
    assert_ne!(t0, t1);
    for t in [t0, t1] {
        assert!(t.windows(2).all(|p| p[0] <= p[1]) && t[15] <= 127, "{t:?}");
    }
    // Row 20 decodes with the second table: w = S·a·u[q] + M·b, computed here from the bytes.
    let rb = g16.row_bytes(cols).unwrap();
    let row = &data[20 * rb..21 * rb];
    let s_unit = f32::from_le_bytes(row[..4].try_into().unwrap());
    let m_unit = f32::from_le_bytes(row[4..8].try_into().unwrap());
    let blk = &row[8 + 18..8 + 36];
    let want =
        (f64::from(s_unit) * f64::from(blk[0] as i8) * f64::from(t1[usize::from(blk[2] & 15)])
            + f64::from(m_unit) * f64::from(blk[1] as i8)) as f32;
    let mut got = vec![0.0f32; cols];
    dequantize_row(g16, &data, rows, cols, 20, &mut got);
    assert_eq!(got[32], want);

    // Each group's table, refined from the tensor's on the group alone, fits that group at
    // least as well (the alternation lowers the error; the 7-bit grid allows a little
    // slack), and the whole tensor better.
    let half = 16 * cols;
    let whole_data = encode_lut4_b32(B32, &w, rows, cols).unwrap();
    let (grouped, whole) = (
        decode(g16, &data, rows, cols),
        decode(B32, &whole_data, rows, cols),
    );
    for part in [0..half, half..2 * half] {
        let g = snr_db(&w[part.clone()], &grouped[part.clone()]);
        let t = snr_db(&w[part.clone()], &whole[part.clone()]);
        assert!(g > t - 0.05, "rows {part:?}: G16 {g} dB, per tensor {t} dB");
    }
    let (g, t) = (snr_db(&w, &grouped), snr_db(&w, &whole));
    assert!(g > t, "G16 {g} dB, per tensor {t} dB");

    // A table entry off the 7-bit grid is refused, naming its table; a group that does not
    // divide the rows is refused.
    let mut bad = data.clone();
    let n = bad.len();
    bad[n - 2] = 128;
    let e = kiln_types::check_data(g16, &bad, rows, cols).unwrap_err();
    assert!(e.to_string().contains("entry 14 of table 1 is 128"), "{e}");
    let g3 = KilnType::Lut4B32 { group: Some(3) };
    let e = encode_lut4_b32(g3, &w, rows, cols).unwrap_err();
    assert!(e.to_string().contains("3 must divide 32"), "{e}");
}

#[test]
fn encoders_refuse_what_does_not_fit() {
    let w = weights(3, 64, 4);
    let lut = KilnType::Lut {
        bits: 4,
        group: Some(2),
    };
    let e = encode_lut(lut, &w, 3, 64, LutOptions::default()).unwrap_err();
    assert!(e.to_string().contains("2 must divide 3"), "{e}");
    let e = encode_i4_b64(&w[..96], 3, 32).unwrap_err();
    assert!(e.to_string().contains("multiple of 64"), "{e}");
    let e = encode_lut4_b32(B32, &w[..144], 3, 48).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let mut bad = w.clone();
    bad[70] = f32::NAN;
    let e = encode_i8_channel(&bad, 3, 64).unwrap_err();
    assert!(e.to_string().contains("row 1, column 6"), "{e}");
}

fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kiln-types-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn manifest() -> Manifest {
    Manifest {
        format: String::new(),
        format_version: 0,
        kiln_version: "test".into(),
        architecture: "llama".into(),
        config: serde_json::json!({}),
        tokenizer: serde_json::Value::Null,
        chat_template: None,
        source: SourceInfo {
            path: "memory".into(),
            format: "gguf".into(),
            sha256: Vec::new(),
        },
        conversion: Conversion {
            quant: "lut4-g2".into(),
            keep: Vec::new(),
            max_shard_bytes: 1 << 20,
            fp16: None,
            calibration: None,
        },
        alignment: 0,
        shards: Vec::new(),
        files: Vec::new(),
        tensors: Vec::new(),
    }
}

#[test]
fn kiln_formats_round_trip_through_a_package() {
    let dir = scratch("roundtrip");
    let out = dir.join("m.kiln");
    let (rows, cols) = (4, 128);
    let w = weights(rows, cols, 5);
    let lut = KilnType::Lut {
        bits: 4,
        group: Some(2),
    };
    let cases = [
        (KilnType::I8Ch, encode_i8_channel(&w, rows, cols).unwrap()),
        (KilnType::I4B64, encode_i4_b64(&w, rows, cols).unwrap()),
        (B32, encode_lut4_b32(B32, &w, rows, cols).unwrap()),
        (
            lut,
            encode_lut(lut, &w, rows, cols, LutOptions::default()).unwrap(),
        ),
    ];
    let mut writer = PackageWriter::create(&out, 1 << 20).unwrap();
    for (ty, data) in &cases {
        let q = TensorQuality {
            scheme: ty.name(),
            snr_db: Some(snr_db(&w, &decode(*ty, data, rows, cols))),
            cosine: 0.99,
        };
        writer
            .add_tensor(&ty.name(), &[cols as u64, rows as u64], *ty, data, Some(q))
            .unwrap();
    }
    // A size that is not what the shape takes in the format is refused when written.
    let e = writer
        .add_tensor("bad", &[cols as u64, 3], lut, &cases[3].1, None)
        .unwrap_err();
    assert!(e.to_string().contains("impossible size"), "{e}");
    writer.finish(manifest()).unwrap();

    let pkg = Package::open(&out, Verify::Full).unwrap();
    for (ty, data) in &cases {
        let t = pkg.tensor(&ty.name()).unwrap();
        assert_eq!(t.format, TensorFormat::Kiln(*ty));
        assert_eq!(t.shape, vec![cols as u64, rows as u64]);
        assert_eq!(t.data(), &data[..]);
        let entry = pkg
            .manifest()
            .tensors
            .iter()
            .find(|e| e.name == ty.name())
            .unwrap();
        assert_eq!(entry.format, ty.name());
        assert!(entry.quality.as_ref().unwrap().snr_db.unwrap() > 15.0);
    }

    // A manifest whose table group does not divide the rows is refused, naming the tensor.
    let path = out.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for t in m["tensors"].as_array_mut().unwrap() {
        if t["name"] == "LUT4_G2" {
            t["format"] = "LUT4_G3".into();
        }
    }
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let e = Package::open(&out, Verify::StructureOnly)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor 'LUT4_G2'") && e.contains("does not fit LUT4_G3"),
        "{e}"
    );
}

/// Version 1 packages stored each `I8_CH` row as its scale then its codes: the same length as
/// the codes-first layout, so only the version tells them apart. Such a package is refused,
/// naming the manifest and a tensor and saying to convert again; a version 1 package without
/// `I8_CH` tensors (whose formats did not change) still opens.
#[test]
fn version_1_packages_open_unless_they_hold_i8_ch() {
    let (rows, cols) = (4, 128);
    let w = weights(rows, cols, 9);
    let cases = [
        (KilnType::I8Ch, encode_i8_channel(&w, rows, cols).unwrap()),
        (KilnType::I4B64, encode_i4_b64(&w, rows, cols).unwrap()),
    ];
    for (ty, data) in &cases {
        let out = scratch(&format!("v1-{ty}")).join("m.kiln");
        let mut writer = PackageWriter::create(&out, 1 << 20).unwrap();
        writer
            .add_tensor(
                "blk.0.attn_q.weight",
                &[cols as u64, rows as u64],
                *ty,
                data,
                None,
            )
            .unwrap();
        let written = writer.finish(manifest()).unwrap();
        assert_eq!(written.format_version, FORMAT_VERSION);
        assert_eq!(FORMAT_VERSION, 2);
        Package::open(&out, Verify::Full).unwrap();

        let path = out.join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        m["format_version"] = 1.into();
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        match (ty, Package::open(&out, Verify::Full)) {
            (KilnType::I8Ch, Err(e)) => {
                let e = e.to_string();
                for needle in [
                    "manifest.json",
                    "version 1",
                    "I8_CH",
                    "'blk.0.attn_q.weight'",
                    "convert the source model again",
                ] {
                    assert!(e.contains(needle), "{needle}: {e}");
                }
            }
            (KilnType::I8Ch, Ok(_)) => panic!("a version 1 I8_CH package opened"),
            (_, r) => assert_eq!(
                r.unwrap().tensor("blk.0.attn_q.weight").unwrap().data(),
                &data[..]
            ),
        }
    }
}

#[test]
fn bits_per_weight_count_scales_and_tables() {
    let f = |ty: KilnType| TensorFormat::Kiln(ty).bits_per_weight(576, 576).unwrap();
    assert!((f(KilnType::I8Ch) - (8.0 + 32.0 / 576.0)).abs() < 1e-9);
    assert!((f(KilnType::I4B64) - 4.25).abs() < 1e-9);
    let lut4_b32 = 4.5 + (8.0 * 576.0 + 16.0) * 8.0 / (576.0 * 576.0);
    assert!((f(B32) - lut4_b32).abs() < 1e-9);
    let g16 = f(KilnType::Lut4B32 { group: Some(16) });
    assert!((g16 - (lut4_b32 + 35.0 * 16.0 * 8.0 / (576.0 * 576.0))).abs() < 1e-9);
    let lut = f(KilnType::Lut {
        bits: 4,
        group: Some(16),
    });
    assert!((lut - (4.0 + 36.0 * 32.0 * 8.0 / (576.0 * 576.0))).abs() < 1e-9);
    assert_eq!(kiln_types::LUT_BITS, [2, 4, 6, 8]);
}

/// Squared error of `x` reconstructed from `codes` (0..=15) and scale `d`.
fn int4_error(x: &[f32], codes: &[u8], d: f32) -> f32 {
    x.iter()
        .zip(codes)
        .map(|(&v, &c)| (v - d * (f32::from(c) - 8.0)).powi(2))
        .sum()
}

/// Blocks of 64 (and 32) weights of very different shapes: Gaussian-like with a random
/// scale, one outlier of random size and sign at a random place, and sometimes only one sign.
fn int4_block_strategy() -> impl Strategy<Value = Vec<f32>> {
    (
        prop_oneof![Just(64usize), Just(32)],
        -12i32..6,
        any::<u64>(),
        0.0f32..20.0,
        0u8..3,
    )
        .prop_map(|(n, exp, seed, outlier, sign)| {
            let mut w = weights(1, n, seed);
            let scale = 2f32.powi(exp) * 50.0;
            for v in &mut w {
                *v *= scale;
                match sign {
                    1 => *v = v.abs(),
                    2 => *v = -v.abs(),
                    _ => {}
                }
            }
            let at = (seed % n as u64) as usize;
            w[at] *= 1.0 + outlier;
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Against ggml's `Q4_0` rule (the largest weight maps to −8): never a larger block error,
    /// and the largest weight itself within half a step.
    #[test]
    fn unclipped_int4_is_no_worse_than_the_largest_weight_scale(x in int4_block_strategy()) {
        let mut codes = vec![0u8; x.len()];
        let d = kiln_types::quantize_int4_unclipped(&x, &mut codes);
        prop_assert_eq!(f16_to_f32(f32_to_f16(d)), d, "scale not an f16 value");
        let max = x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let reference_d = f16_to_f32(f32_to_f16(max / -8.0));
        let reference: f32 = x
            .iter()
            .map(|&v| (v - reference_d * (v / reference_d).round().clamp(-8.0, 7.0)).powi(2))
            .sum();
        let err = int4_error(&x, &codes, d);
        prop_assert!(err <= reference * (1.0 + 1e-5), "{} > {}", err, reference);
        let i = x.iter().position(|&v| v == max).unwrap();
        let back = d * (f32::from(codes[i]) - 8.0);
        prop_assert!(
            (back - max).abs() <= 0.5 * d.abs() * 1.002,
            "largest weight {} came back as {} (step {})", max, back, d
        );
    }

    /// A block already on a symmetric int4 grid (any f16 step, any widest code from 1 to 8
    /// steps) comes back exactly.
    #[test]
    fn unclipped_int4_is_exact_on_a_symmetric_grid(
        step_bits in 0x0400u16..0x7000,
        negative in any::<bool>(),
        widest in 1i32..=8,
        seed in any::<u64>(),
        n in prop_oneof![Just(64usize), Just(32)],
    ) {
        let step = f16_to_f32(step_bits) * if negative { -1.0 } else { 1.0 };
        let (lo, hi) = (-widest, widest.min(7));
        let mut s = seed;
        let mut q: Vec<i32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                lo + ((s >> 33) % (hi - lo + 1) as u64) as i32
            })
            .collect();
        q[(seed % n as u64) as usize] = -widest;
        let x: Vec<f32> = q.iter().map(|&c| step * c as f32).collect();
        let mut codes = vec![0u8; n];
        let d = kiln_types::quantize_int4_unclipped(&x, &mut codes);
        for (i, (&v, &c)) in x.iter().zip(&codes).enumerate() {
            prop_assert_eq!(d * (f32::from(c) - 8.0), v, "element {}", i);
        }
    }
}

#[test]
fn unclipped_int4_keeps_an_outlier_the_least_squares_search_clips() {
    // 63 weights spread evenly over ±1 and one of 3: the least-squares scale spends fewer
    // steps on the outlier and clips it by more than half a step; the unclipped search keeps
    // it within half a step.
    let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.0) / 31.0).collect();
    x[17] = 3.0;
    let mut codes = [0u8; 64];
    let d = kiln_types::quantize_int4_unclipped(&x, &mut codes);
    let kept = d * (f32::from(codes[17]) - 8.0);
    assert!((kept - 3.0).abs() <= 0.5 * d.abs(), "{kept} (step {d})");
    let d_ls = kiln_types::quantize_int4_searched(&x, &mut codes);
    let clipped = d_ls * (f32::from(codes[17]) - 8.0);
    assert!(3.0 - clipped > 0.5 * d_ls.abs(), "{clipped} (step {d_ls})");
}
