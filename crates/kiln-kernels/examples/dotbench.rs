//! Kernel throughput: ns per weight and GB/s of weight bytes, per weight format and SIMD level,
//! on a weight matrix larger than the caches, single-threaded.
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example dotbench -- [--mb 64] [--k 2048] [--reps 5]
//!     [--kb N] [--tokens 1,8] [--formats Q4_0,Q4_K,...] [--levels avx512,avx2] [--scalar]
//! ```
//!
//! For T activation rows, every weight row is multiplied with all T of them in one pass over
//! the matrix (`dot_block`); "ns/w" is the time per weight per activation row, "GB/s" the
//! weight bytes streamed per second. `format-f32` is kiln-format's scalar `dot_row` against
//! f32 activations (dequantize-as-you-go), for comparison.

use std::time::Instant;

use kiln_format::ggml::{dot_row, f32_to_bf16, f32_to_f16, GgmlType};
use kiln_kernels::QuantizedRow;
use kiln_kernels::{
    activation_format, available_isas, dot_block_with, quantize_row, ActivationFormat, Isa,
};

const FORMATS: [GgmlType; 15] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::Q5_1,
    GgmlType::Q5_K,
    GgmlType::Q3_K,
    GgmlType::Q2_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Byte offsets of the f16 scale fields of a block.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random codes with ordinary scales; quantizing tens of millions of floats would take longer
/// than the benchmark.
fn matrix(ty: GgmlType, bytes: usize, rng: &mut Rng) -> Vec<u8> {
    let mut w = vec![0u8; bytes];
    if ty.is_quantized() {
        for chunk in w.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        for blk in w.chunks_exact_mut(ty.block_bytes()) {
            for &at in f16_fields(ty) {
                let s = f32_to_f16(0.001 + 0.01 * rng.unit().abs());
                blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
            }
        }
    } else {
        let size = ty.block_bytes();
        for e in w.chunks_exact_mut(size) {
            let v = rng.unit();
            match ty {
                GgmlType::F32 => e.copy_from_slice(&v.to_le_bytes()),
                GgmlType::F16 => e.copy_from_slice(&f32_to_f16(v).to_le_bytes()),
                _ => e.copy_from_slice(&f32_to_bf16(v).to_le_bytes()),
            }
        }
    }
    w
}

fn main() {
    let mut kb = 64usize << 10;
    let mut k = 2048usize;
    let mut reps = 5usize;
    let mut tokens = vec![1usize, 8];
    let mut formats: Vec<GgmlType> = FORMATS.to_vec();
    let mut scalar = false;
    let mut levels: Option<Vec<Isa>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--mb" => kb = val().parse::<usize>().expect("--mb N") << 10,
            "--kb" => kb = val().parse().expect("--kb N"),
            "--k" => k = val().parse().expect("--k N"),
            "--reps" => reps = val().parse().expect("--reps N"),
            "--tokens" => {
                tokens = val()
                    .split(',')
                    .map(|t| t.parse().expect("--tokens 1,8"))
                    .collect()
            }
            "--formats" => {
                formats = val()
                    .split(',')
                    .map(|f| GgmlType::from_name(f).expect("unknown format"))
                    .collect()
            }
            "--scalar" => scalar = true,
            "--levels" => {
                levels = Some(
                    val()
                        .split(',')
                        .map(|l| Isa::from_name(l).expect("unknown level"))
                        .collect(),
                )
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let isas: Vec<Isa> = match levels {
        Some(l) => l.into_iter().filter(|i| i.is_available()).collect(),
        None => available_isas()
            .into_iter()
            .filter(|&i| scalar || i != Isa::Scalar)
            .collect(),
    };
    println!("weights {kb} KB per format, K = {k}, best of {reps}, single thread");
    print!("{:<6} {:>5} {:<12}", "format", "B/w", "level");
    for t in &tokens {
        print!(" {:>9} {:>7}", format!("T={t} ns/w"), "GB/s");
    }
    println!();
    // The roofline: how fast one thread can stream the same number of bytes.
    let words = vec![1u64; (kb << 10) / 8];
    let mut best = f64::INFINITY;
    for _ in 0..=reps {
        let start = Instant::now();
        let s = words.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        std::hint::black_box(s);
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "memory read (one thread): {:.1} GB/s",
        (kb << 10) as f64 / best / 1e9
    );
    #[cfg(target_arch = "x86_64")]
    {
        // The same with a software prefetch 8 KiB ahead, as the kernels do.
        let mut best = f64::INFINITY;
        for _ in 0..=reps {
            let start = Instant::now();
            let mut s = 0u64;
            for (i, c) in words.chunks_exact(8).enumerate() {
                let ahead = words.as_ptr().wrapping_add(8 * i + 1024);
                // SAFETY: a prefetch has no effect on memory and is valid for any address;
                // SSE is part of every x86-64 CPU.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        ahead.cast(),
                    )
                };
                s = c.iter().fold(s, |a, &b| a.wrapping_add(b));
            }
            std::hint::black_box(s);
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "memory read with prefetch (one thread): {:.1} GB/s",
            (kb << 10) as f64 / best / 1e9
        );
    }
    drop(words);
    // Activation quantization, once per activation row and matrix product.
    for fmt in [ActivationFormat::Q8_1, ActivationFormat::Q8_K] {
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut q = QuantizedRow::new();
        let mut best = f64::INFINITY;
        for _ in 0..200 {
            let start = Instant::now();
            quantize_row(std::hint::black_box(&x), fmt, &mut q);
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "quantize_row {fmt:?}: {:.2} ns/element",
            best * 1e9 / k as f64
        );
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &ty in &formats {
        let row_bytes = ty
            .row_bytes(k)
            .expect("K must be a multiple of the block length");
        let rows = (kb << 10) / row_bytes;
        let w = matrix(ty, rows * row_bytes, &mut rng);
        let bpw = row_bytes as f64 / k as f64;
        let max_t = tokens.iter().copied().max().unwrap_or(1);
        let xf: Vec<Vec<f32>> = (0..max_t)
            .map(|_| (0..k).map(|_| rng.unit() * 3.0).collect())
            .collect();
        let xq: Vec<QuantizedRow> = xf
            .iter()
            .map(|x| {
                let mut q = QuantizedRow::new();
                quantize_row(x, activation_format(ty), &mut q);
                q
            })
            .collect();
        let mut out = vec![0.0f32; max_t * rows];
        for &isa in &isas {
            print!("{:<6} {:>5.3} {:<12}", ty.name(), bpw, format!("{isa:?}"));
            for &t in &tokens {
                let reps = if isa == Isa::Scalar { 1 } else { reps };
                let mut best = f64::INFINITY;
                for _ in 0..=reps {
                    let start = Instant::now();
                    dot_block_with(isa, ty, &w, row_bytes, 0..rows, &xq[..t], &mut out, rows);
                    best = best.min(start.elapsed().as_secs_f64());
                }
                std::hint::black_box(&out);
                let ns_w = best * 1e9 / (rows * k * t) as f64;
                let gbs = (rows * row_bytes) as f64 / best / 1e9;
                print!(" {ns_w:>9.4} {gbs:>7.1}");
            }
            println!();
        }
        // The dequantize-as-you-go scalar path kiln-format offers, for one activation row.
        let mut best = f64::INFINITY;
        for _ in 0..=reps.min(2) {
            let start = Instant::now();
            for (r, o) in out[..rows].iter_mut().enumerate() {
                *o = dot_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &xf[0]);
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        std::hint::black_box(&out);
        println!(
            "{:<6} {:>5.3} {:<12} {:>9.4} {:>7.1}",
            ty.name(),
            bpw,
            "format-f32",
            best * 1e9 / (rows * k) as f64,
            (rows * row_bytes) as f64 / best / 1e9
        );
    }
}
