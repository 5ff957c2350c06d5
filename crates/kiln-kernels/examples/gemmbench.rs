//! Panel GEMM throughput, f32 against bf16, single-threaded.
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example gemmbench -- [--rows 1024] [--tokens 128]
//!     [--k 576,640,1536,2048] [--reps 5]
//! ```
//!
//! For each `k`, a `rows × k` weight matrix is multiplied with `tokens` activation rows the way
//! prompt processing does it: panel by panel, pack then multiply (`pack+gemm`, which for bf16
//! includes rounding the activations once per matrix). `gemm` times the kernel alone on a
//! panel already packed (so it is in cache, as it is right after packing), and `pack` the
//! packing alone, in ns per weight. GFLOP/s count 2 flops per weight per token.

use std::hint::black_box;
use std::time::Instant;

use kiln_kernels::aligned::AlignedVec;
use kiln_kernels::gemm::{gemm_panel, pack_panel, PANEL_ROWS};
use kiln_kernels::gemm_bf16::{
    bf16_available, convert_activations_bf16, gemm_panel_bf16, pack_panel_bf16,
};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Median seconds of `reps` runs of `f`.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    let mut rows: usize = 1024;
    let mut tokens = 128;
    let mut ks = vec![576, 640, 1536, 2048];
    let mut reps = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("missing value");
        match a.as_str() {
            "--rows" => rows = v().parse().unwrap(),
            "--tokens" => tokens = v().parse().unwrap(),
            "--k" => ks = v().split(',').map(|s| s.parse().unwrap()).collect(),
            "--reps" => reps = v().parse().unwrap(),
            _ => panic!("unknown argument {a}"),
        }
    }
    assert!(
        rows.is_multiple_of(PANEL_ROWS),
        "--rows must be a multiple of 32"
    );
    if !bf16_available() {
        eprintln!("note: no AVX-512 BF16 here; bf16 columns time the scalar reference");
    }
    let n_panels = rows / PANEL_ROWS;
    println!("{rows} rows, {tokens} tokens, 1 thread; GFLOP/s (pack ns/weight)");
    println!(
        "{:>6} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8} | {:>7}",
        "k", "f32 gemm", "+pack", "pack", "bf16 gemm", "+pack", "pack", "speedup"
    );
    for &k in &ks {
        let w = values(rows * k, 1);
        let x = values(tokens * k, 2);
        let flops = 2.0 * (rows * k * tokens) as f64;
        let weights = (rows * k) as f64;
        let mut tile = vec![0.0f32; tokens * PANEL_ROWS];

        let mut panel = AlignedVec::new();
        let f32_pack = time(reps, || {
            for p in w.chunks_exact(PANEL_ROWS * k) {
                pack_panel(p, k, &mut panel);
                black_box(&panel);
            }
        });
        let f32_gemm = time(reps, || {
            for _ in 0..n_panels {
                gemm_panel(&panel, k, PANEL_ROWS, &x, tokens, &mut tile, PANEL_ROWS);
                black_box(&tile);
            }
        });
        let f32_both = time(reps, || {
            for p in w.chunks_exact(PANEL_ROWS * k) {
                pack_panel(p, k, &mut panel);
                gemm_panel(&panel, k, PANEL_ROWS, &x, tokens, &mut tile, PANEL_ROWS);
                black_box(&tile);
            }
        });

        let (mut bpanel, mut xb) = (AlignedVec::new(), AlignedVec::new());
        convert_activations_bf16(&x, tokens, k, &mut xb);
        let bf_pack = time(reps, || {
            for p in w.chunks_exact(PANEL_ROWS * k) {
                pack_panel_bf16(p, k, &mut bpanel);
                black_box(&bpanel);
            }
        });
        let bf_gemm = time(reps, || {
            for _ in 0..n_panels {
                gemm_panel_bf16(&bpanel, k, PANEL_ROWS, &xb, tokens, &mut tile, PANEL_ROWS);
                black_box(&tile);
            }
        });
        let bf_both = time(reps, || {
            convert_activations_bf16(&x, tokens, k, &mut xb);
            for p in w.chunks_exact(PANEL_ROWS * k) {
                pack_panel_bf16(p, k, &mut bpanel);
                gemm_panel_bf16(&bpanel, k, PANEL_ROWS, &xb, tokens, &mut tile, PANEL_ROWS);
                black_box(&tile);
            }
        });
        let g = |s: f64| flops / s / 1e9;
        let ns = |s: f64| s / weights * 1e9;
        println!(
            "{k:>6} | {:>9.1} {:>9.1} {:>8.3} | {:>9.1} {:>9.1} {:>8.3} | {:>6.2}x",
            g(f32_gemm),
            g(f32_both),
            ns(f32_pack),
            g(bf_gemm),
            g(bf_both),
            ns(bf_pack),
            f32_both / bf_both
        );
    }
}
