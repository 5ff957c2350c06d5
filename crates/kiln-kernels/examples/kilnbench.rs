//! Kernel throughput of the kiln formats against the ggml formats of equal bits: ns per weight
//! and GB/s of weight bytes, single-threaded, on a matrix larger than the caches.
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example kilnbench -- [--mb 64] [--k 2048] [--tokens 2]
//! ```

use std::time::Instant;

use kiln_format::ggml::{self, GgmlType};
use kiln_format::kiln_types::{self, KilnType, LutOptions};
use kiln_kernels::kiln_formats::{self, KilnMatrix};
use kiln_kernels::{activation_format, available_isas, dot_block_with, quantize_row, QuantizedRow};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let mb = arg("--mb", 64);
    let k = arg("--k", 2048);
    let tokens = arg("--tokens", 2);
    let reps = arg("--reps", 5);
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
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    // Each format gets `mb` MB of weights.
    for isa in available_isas() {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let rows = (mb << 20) / ty.row_bytes(k).unwrap();
            let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
            let data = ggml::quantize(ty, &w).unwrap();
            let xq: Vec<QuantizedRow> = x
                .iter()
                .map(|v| {
                    let mut q = QuantizedRow::new();
                    quantize_row(v, activation_format(ty), &mut q);
                    q
                })
                .collect();
            let mut out = vec![0.0f32; rows * tokens];
            let rb = ty.row_bytes(k).unwrap();
            let sec =
                time(&mut || dot_block_with(isa, ty, &data, rb, 0..rows, &xq, &mut out, rows));
            println!(
                "{isa:?} {ty:>8}: {:.3} ns/w  {:.1} GB/s",
                sec * 1e9 / (rows * k * tokens) as f64,
                data.len() as f64 / sec / 1e9
            );
        }
        for ty in [
            KilnType::I8Ch,
            KilnType::I4B64,
            KilnType::Lut4B32,
            KilnType::Lut {
                bits: 4,
                group: Some(16),
            },
            KilnType::Lut {
                bits: 2,
                group: Some(16),
            },
        ] {
            let row_bytes = ty.row_bytes(k).unwrap();
            let rows = ((mb << 20) / row_bytes) / 16 * 16;
            let w: Vec<f32> = (0..rows * k).map(|_| unit()).collect();
            let data = match ty {
                KilnType::I8Ch => kiln_types::encode_i8_channel(&w, rows, k).unwrap(),
                KilnType::I4B64 => kiln_types::encode_i4_b64(&w, rows, k).unwrap(),
                KilnType::Lut4B32 => kiln_types::encode_lut4_b32(&w, rows, k).unwrap(),
                _ => kiln_types::encode_lut(ty, &w, rows, k, LutOptions::default()).unwrap(),
            };
            let m = KilnMatrix::new(ty, &data, rows, k).unwrap();
            let xq: Vec<QuantizedRow> = x
                .iter()
                .map(|v| {
                    let mut q = QuantizedRow::new();
                    quantize_row(v, kiln_formats::activation_format(ty), &mut q);
                    q
                })
                .collect();
            let mut out = vec![0.0f32; rows * tokens];
            let sec =
                time(&mut || kiln_formats::dot_block_with(isa, &m, 0..rows, &xq, &mut out, rows));
            println!(
                "{isa:?} {ty:>8}: {:.3} ns/w  {:.1} GB/s",
                sec * 1e9 / (rows * k * tokens) as f64,
                data.len() as f64 / sec / 1e9
            );
        }
    }
}
