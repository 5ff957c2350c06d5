//! The weight reads of one decoded token, kernels alone: every matrix of a GGUF file through
//! its integer kernel once, in the order a token reads them (layers by number, the output
//! projection last), one thread, repeated. Against `kiln bench`'s generation figure this splits
//! a token's time into kernel streaming and everything else, and the GB/s per tensor kind show
//! whether the kernels stream at the memory's rate.
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example decode_kernels -- MODEL.gguf [--reps 30] [--tokens 2] [--fused] [--planar]
//! ```
//!
//! `--planar` reads the matrices that have a planar layout ([`kiln_kernels::planar`]) in it,
//! as the runtime does.
//!
//! `--tokens 2` is the two activation rows of the runtime's default (refined) decode where the
//! kernels have no refined path; `--fused` gives the matrices whose kernels do
//! ([`kiln_kernels::fuses_refined`]) one refined row instead, as the runtime does.

use std::collections::BTreeMap;
use std::time::Instant;

use kiln_format::gguf::{GgufFile, TensorInfo};
use kiln_format::read_order;
use kiln_kernels::{
    activation_format, detect, dot_block_with, fuses_refined, quantize_row, quantize_row_refined,
    QuantizedRow,
};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let Some(path) = std::env::args().nth(1).filter(|a| !a.starts_with("--")) else {
        eprintln!("usage: decode_kernels MODEL.gguf [--reps 30] [--tokens 2] [--fused] [--planar]");
        std::process::exit(2);
    };
    let reps: usize = arg("--reps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .max(2);
    let tokens: usize = arg("--tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let fused = std::env::args().any(|a| a == "--fused");
    let planar = std::env::args().any(|a| a == "--planar");
    let file = GgufFile::open(&path).unwrap_or_else(|e| {
        eprintln!("decode_kernels: {e}");
        std::process::exit(2);
    });
    let isa = detect();
    // The output projection: `output.weight`, or the tied embedding when there is none.
    let tied = file.tensor("output.weight").is_none();
    let mut mats: Vec<&TensorInfo> = file
        .tensors()
        .iter()
        .filter(|t| t.dims.len() == 2)
        .filter(|t| {
            t.name.starts_with("blk.")
                || t.name == "output.weight"
                || (tied && t.name == "token_embd.weight")
        })
        .collect();
    // A token reads the tied embedding last, as its output projection.
    mats.sort_by_key(|t| match t.name.as_str() {
        "token_embd.weight" => (u8::MAX, 0, 0),
        name => read_order::key(name),
    });
    let mut s = 1u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    #[allow(clippy::type_complexity)]
    let mut work: Vec<(&TensorInfo, Vec<QuantizedRow>, Vec<f32>, Option<Vec<u8>>)> = mats
        .iter()
        .map(|t| {
            let k = t.row_len() as usize;
            let refined = fused && fuses_refined(isa, t.ty);
            let n = if refined { 1 } else { tokens };
            let xq: Vec<QuantizedRow> = (0..n)
                .map(|_| {
                    let x: Vec<f32> = (0..k).map(|_| unit()).collect();
                    let mut q = QuantizedRow::new();
                    if refined {
                        quantize_row_refined(&x, &mut q);
                    } else {
                        quantize_row(&x, activation_format(t.ty), &mut q);
                    }
                    q
                })
                .collect();
            let k = t.row_len() as usize;
            let packed = (planar && kiln_kernels::planar::supported(isa, t.ty, k)).then(|| {
                let src = file.tensor_data(t);
                let mut dst = vec![0u8; src.len()];
                kiln_kernels::planar::pack_rows(t.ty, k, src, &mut dst);
                dst
            });
            (*t, xq, vec![0.0f32; t.n_rows() as usize * n], packed)
        })
        .collect();
    let bytes: u64 = mats.iter().map(|t| t.n_bytes).sum();
    let mut per = vec![Vec::with_capacity(reps); work.len()];
    let mut totals = Vec::with_capacity(reps);
    for rep in 0..reps {
        let start = Instant::now();
        for (i, (t, xq, out, packed)) in work.iter_mut().enumerate() {
            let t0 = Instant::now();
            let rows = t.n_rows() as usize;
            let row_bytes = t.row_bytes() as usize;
            match packed {
                Some(w) => {
                    kiln_kernels::planar::dot_block(isa, t.ty, w, row_bytes, 0..rows, xq, out, rows)
                }
                None => dot_block_with(
                    isa,
                    t.ty,
                    file.tensor_data(t),
                    row_bytes,
                    0..rows,
                    xq,
                    out,
                    rows,
                ),
            }
            if rep > 0 {
                per[i].push(t0.elapsed().as_secs_f64());
            }
        }
        if rep > 0 {
            totals.push(start.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let token = median(&mut totals);
    println!(
        "{isa:?}, {tokens} activation row(s){}: {} matrices, {:.1} MB per token, {:.3} ms median ({:.3} fastest), {:.1} GB/s, {:.1} tok/s of kernels alone",
        if fused { " (one refined row where fused)" } else { "" },
        mats.len(),
        bytes as f64 / 1e6,
        token * 1e3,
        totals[0] * 1e3,
        bytes as f64 / token / 1e9,
        1.0 / token
    );
    let mut kinds: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for (i, (t, ..)) in work.iter().enumerate() {
        let kind = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .map_or(t.name.as_str(), |(_, rest)| rest);
        let e = kinds.entry(format!("{} {kind}", t.ty.name())).or_default();
        e.0 += median(&mut per[i]);
        e.1 += t.n_bytes;
    }
    for (kind, (sec, b)) in kinds {
        println!(
            "{kind:>32}: {:7.3} ms {:7.1} MB {:5.1} GB/s",
            sec * 1e3,
            b as f64 / 1e6,
            b as f64 / sec / 1e9
        );
    }
}
