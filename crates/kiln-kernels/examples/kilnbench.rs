//! Kernel throughput of the kiln formats against the ggml formats of equal bits: ns per weight
//! and GB/s of weight bytes, single-threaded, on a matrix larger than the caches, stored 64-byte
//! aligned as a package's shards hold tensors.
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example kilnbench -- [--mb 64] [--k 2048] [--tokens 2] \
//!     [--reps 5] [--rounds 3] [--isa avx512] [--formats "Q8_0 I8_CH LUT8"] [--runtime] \
//!     [--dequantize]
//! ```
//!
//! `--runtime` sets each matrix up as the runtime's decode does: rows rewritten into the planar
//! layout where the level's kernels read it, 4-bit row tables converted ahead, refined int8
//! activations for the kernels that take them in one pass. Without it, stored rows and plain
//! activations.
//!
//! Each round times every format at every level once, in turn, so drift on a shared machine
//! touches them alike; the figures are medians over the rounds. Lookup-table weights are random
//! indices and tables (the kernels' speed does not depend on what the tables hold), so no
//! k-means runs here.

use std::time::Instant;

use kiln_format::ggml::{self, f32_to_f16, GgmlType};
use kiln_format::kiln_types::{self, KilnType};
use kiln_kernels::aligned::AlignedVec;
use kiln_kernels::gemm::PANEL_ROWS;
use kiln_kernels::kiln_formats::{self, KilnMatrix};
use kiln_kernels::{
    activation_format, available_isas, dot_block_with, quantize_row, Isa, QuantizedRow,
};

fn args() -> Vec<String> {
    std::env::args().collect()
}

fn arg(name: &str) -> Option<String> {
    let args = args();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn num(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `data` copied to a 64-byte boundary, as a package's shards hold tensors: (buffer, offset
/// of the data in it).
fn aligned(data: Vec<u8>) -> (Vec<u8>, usize) {
    let mut v: Vec<u8> = Vec::with_capacity(data.len() + 64);
    let pad = v.as_ptr().align_offset(64);
    v.resize(pad, 0);
    v.extend_from_slice(&data);
    (v, pad)
}

/// A weight matrix in one of the compared formats.
enum Weights {
    Ggml(GgmlType, (Vec<u8>, usize), usize),
    Kiln(KilnType, (Vec<u8>, usize), usize),
}

impl Weights {
    fn name(&self) -> String {
        match self {
            Weights::Ggml(t, ..) => t.name().to_string(),
            Weights::Kiln(t, ..) => t.name(),
        }
    }
}

fn main() {
    let mb = num("--mb", 64);
    let k = num("--k", 2048);
    let tokens = num("--tokens", 2);
    let reps = num("--reps", 5);
    let rounds = num("--rounds", 3);
    let isas: Vec<Isa> = match arg("--isa") {
        Some(name) => {
            let isa = Isa::from_name(&name).expect("--isa: scalar, avx2, avx512, neon, dotprod");
            assert!(isa.is_available(), "--isa {name}: not available here");
            vec![isa]
        }
        None => available_isas(),
    };
    let formats = arg("--formats").unwrap_or_else(|| {
        "Q4_0 Q8_0 I8_CH I4_B64 LUT4_B32 LUT4_B32_G16 LUT4_G16 LUT2_G16 LUT6_G16 LUT8 Q6_K"
            .to_string()
    });
    let mut s = 1u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let x: Vec<Vec<f32>> = (0..tokens)
        .map(|_| (0..k).map(|_| unit()).collect())
        .collect();
    // Each format gets `mb` MB of weights.
    let mut weights = Vec::new();
    for name in formats.split_whitespace() {
        if let Some(ty) = GgmlType::from_name(name) {
            // A format whose blocks do not divide the rows is skipped, not fatal: the default
            // list holds `Q6_K`, whose 256-element blocks most model widths do not divide.
            let Some(rb) = ty.row_bytes(k) else {
                eprintln!("kilnbench: {name} skipped: its blocks do not divide --k {k}");
                continue;
            };
            let rows = (mb << 20) / rb;
            let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
            weights.push(Weights::Ggml(
                ty,
                aligned(ggml::quantize(ty, &w).unwrap()),
                rows,
            ));
        } else if let Some(ty) = KilnType::from_name(name) {
            let Some(rb) = ty.row_bytes(k) else {
                eprintln!("kilnbench: {name} skipped: its chunks do not divide --k {k}");
                continue;
            };
            let rows = ((mb << 20) / rb) / 16 * 16;
            let data = match ty {
                KilnType::I8Ch => {
                    let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
                    kiln_types::encode_i8_channel(&w, rows, k).unwrap()
                }
                KilnType::I4B64 => {
                    let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
                    kiln_types::encode_i4_b64(&w, rows, k).unwrap()
                }
                KilnType::Lut4B32 { .. } => {
                    let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
                    kiln_types::encode_lut4_b32(ty, &w, rows, k).unwrap()
                }
                KilnType::Lut { .. } => {
                    let len = ty.data_length(k, rows).unwrap() as usize;
                    let split = ty.tables_offset(k, rows).unwrap();
                    let mut d: Vec<u8> = (0..len).map(|_| (unit() * 128.0 + 128.0) as u8).collect();
                    for e in d[split..].chunks_exact_mut(2) {
                        e.copy_from_slice(&f32_to_f16(unit()).to_le_bytes());
                    }
                    d
                }
            };
            weights.push(Weights::Kiln(ty, aligned(data), rows));
        } else {
            panic!("--formats: unknown format {name}");
        }
    }
    // As the runtime decodes: planar rows where the level reads them, row tables converted
    // ahead, refined Q8_1 activations for the kernels that fuse them.
    let as_runtime = args().iter().any(|a| a == "--runtime");
    let dequantize = args().iter().any(|a| a == "--dequantize");
    let tokens = if dequantize { 1 } else { tokens };
    let quantized = |fmt, refine: bool| -> Vec<QuantizedRow> {
        x.iter()
            .map(|v| {
                let mut q = QuantizedRow::new();
                if refine && fmt == kiln_kernels::ActivationFormat::Q8_1 {
                    kiln_kernels::quantize_row_refined(v, &mut q);
                } else {
                    quantize_row(v, fmt, &mut q);
                }
                q
            })
            .collect()
    };
    let mut seconds = vec![vec![Vec::new(); weights.len()]; isas.len()];
    for _ in 0..rounds {
        for (i, &isa) in isas.iter().enumerate() {
            for (f, wt) in weights.iter().enumerate() {
                let mut run: Box<dyn FnMut()> = match wt {
                    Weights::Ggml(ty, (buf, at), rows) => {
                        let (ty, rows) = (*ty, *rows);
                        let data = &buf[*at..];
                        let rb = ty.row_bytes(k).unwrap();
                        let planar = as_runtime && kiln_kernels::planar::supported(isa, ty, k);
                        let xq = quantized(
                            activation_format(ty),
                            as_runtime && kiln_kernels::fuses_refined(isa, ty),
                        );
                        let mut out = AlignedVec::filled(rows * tokens, 0.0f32);
                        if planar {
                            let mut p = vec![0u8; data.len()];
                            kiln_kernels::planar::pack_rows(ty, k, data, &mut p);
                            let (pbuf, pat) = aligned(p);
                            if dequantize {
                                let mut row = AlignedVec::filled(k, 0.0f32);
                                Box::new(move || {
                                    for src in pbuf[pat..pat + rows * rb].chunks_exact(rb) {
                                        kiln_kernels::planar::dequantize_row(ty, k, src, &mut row);
                                    }
                                })
                            } else {
                                Box::new(move || {
                                    kiln_kernels::planar::dot_block(
                                        isa,
                                        ty,
                                        &pbuf[pat..],
                                        rb,
                                        0..rows,
                                        &xq,
                                        &mut out,
                                        rows,
                                    )
                                })
                            }
                        } else if dequantize {
                            let mut row = AlignedVec::filled(k, 0.0f32);
                            Box::new(move || {
                                for src in data[..rows * rb].chunks_exact(rb) {
                                    kiln_kernels::ggml_dequant::dequantize_row(ty, src, &mut row);
                                }
                            })
                        } else {
                            Box::new(move || {
                                dot_block_with(isa, ty, data, rb, 0..rows, &xq, &mut out, rows)
                            })
                        }
                    }
                    Weights::Kiln(ty, (buf, at), rows) => {
                        let rows = *rows;
                        let data = &buf[*at..];
                        let xq = quantized(
                            kiln_formats::activation_format(*ty),
                            as_runtime && kiln_formats::fuses_refined(isa, *ty),
                        );
                        let mut out = AlignedVec::filled(rows * tokens, 0.0f32);
                        let mut row = AlignedVec::filled(k, 0.0f32);
                        let mut panel = AlignedVec::filled(PANEL_ROWS * k, 0.0f32);
                        let planar =
                            as_runtime && kiln_kernels::planar::kiln::supported(isa, *ty, k);
                        let stored = KilnMatrix::new(*ty, data, rows, k).unwrap();
                        let tables = (as_runtime && kiln_formats::uses_row_tables(isa, *ty))
                            .then(|| kiln_formats::convert_row_tables(&stored))
                            .flatten()
                            .unwrap_or_default();
                        let packed = planar.then(|| {
                            let split = ty.tables_offset(k, rows).unwrap();
                            let mut p = data.to_vec();
                            kiln_kernels::planar::kiln::pack_rows(
                                *ty,
                                k,
                                &data[..split],
                                &mut p[..split],
                            );
                            aligned(p)
                        });
                        Box::new(move || {
                            let m = match &packed {
                                Some((pbuf, pat)) => {
                                    KilnMatrix::new_planar(*ty, &pbuf[*pat..], rows, k).unwrap()
                                }
                                None => KilnMatrix::new(*ty, data, rows, k).unwrap(),
                            };
                            let m = if tables.is_empty() {
                                m
                            } else {
                                m.with_row_tables(&tables).unwrap()
                            };
                            if dequantize && isa == kiln_kernels::detect() {
                                // Panels of rows, as the prompt GEMM dequantizes them.
                                for p in (0..rows).step_by(PANEL_ROWS) {
                                    let n = PANEL_ROWS.min(rows - p);
                                    let rows_out = &mut panel[..n * k];
                                    kiln_formats::dequantize_rows(&m, p..p + n, rows_out);
                                }
                            } else if dequantize {
                                for r in 0..rows {
                                    kiln_formats::dequantize_row_with(isa, &m, r, &mut row);
                                }
                            } else {
                                kiln_formats::dot_block_with(isa, &m, 0..rows, &xq, &mut out, rows)
                            }
                        })
                    }
                };
                // The scalar reference is slow: one repetition is plenty.
                let n = if isa == Isa::Scalar { 1 } else { reps };
                run();
                let t = Instant::now();
                for _ in 0..n {
                    run();
                }
                seconds[i][f].push(t.elapsed().as_secs_f64() / n as f64);
            }
        }
    }
    for (i, isa) in isas.iter().enumerate() {
        for (f, wt) in weights.iter().enumerate() {
            let (bytes, rows) = match wt {
                Weights::Ggml(_, (d, at), r) | Weights::Kiln(_, (d, at), r) => (d.len() - at, *r),
            };
            let mut s = seconds[i][f].clone();
            s.sort_by(f64::total_cmp);
            let sec = s[s.len() / 2];
            println!(
                "{:<11} {:>9}: {:7.4} ns/w  {:5.1} GB/s",
                format!("{isa:?}"),
                wt.name(),
                sec * 1e9 / (rows * k * tokens) as f64,
                bytes as f64 / sec / 1e9
            );
        }
    }
}
