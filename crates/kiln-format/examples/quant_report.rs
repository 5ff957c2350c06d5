//! Quantizes tensors of a GGUF file with every scheme and prints quality, size and time.
//!
//! `cargo run --release -p kiln-format --example quant_report -- FILE.gguf TENSOR...`

use std::time::Instant;

use kiln_format::gguf::GgufFile;
use kiln_format::quant::{quantize, QuantMatrix, Scheme};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: quant_report FILE.gguf TENSOR...");
    let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let schemes = [
        Scheme::Int8Channel,
        Scheme::Int4Block {
            block: 32,
            symmetric: true,
        },
        Scheme::Int4Block {
            block: 32,
            symmetric: false,
        },
        Scheme::Int4Block {
            block: 64,
            symmetric: true,
        },
        Scheme::Int4Block {
            block: 64,
            symmetric: false,
        },
        Scheme::Lut {
            bits: 2,
            group_channels: Some(16),
        },
        Scheme::Lut {
            bits: 4,
            group_channels: None,
        },
        Scheme::Lut {
            bits: 4,
            group_channels: Some(16),
        },
        Scheme::Lut {
            bits: 4,
            group_channels: Some(1),
        },
        Scheme::Lut {
            bits: 6,
            group_channels: Some(16),
        },
        Scheme::Lut {
            bits: 8,
            group_channels: None,
        },
        Scheme::Lut {
            bits: 8,
            group_channels: Some(16),
        },
    ];
    for name in args {
        let t = f.require_tensor(&name).unwrap_or_else(|e| panic!("{e}"));
        let (rows, cols) = (t.n_rows() as usize, t.row_len() as usize);
        let w = f.tensor_f32(t).unwrap_or_else(|e| panic!("{e}"));
        println!("{name} [{rows}x{cols}] stored as {:?}", t.ty);
        for scheme in schemes {
            let start = Instant::now();
            let q = quantize(&w, rows, cols, scheme, 1).unwrap_or_else(|e| panic!("{e}"));
            let secs = start.elapsed().as_secs_f64();
            let r = q.report(&w);
            println!(
                "  {:<20} snr {:6.2} dB  cosine {:.6}  {:5.2} bits/weight  {:8.3} s",
                r.scheme.to_string(),
                r.snr_db,
                r.cosine,
                8.0 * r.bytes as f64 / (rows * cols) as f64,
                secs
            );
        }
    }
}
