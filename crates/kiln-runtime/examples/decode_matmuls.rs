//! The matrix products of one decoded token, and nothing else: every layer's products called
//! as a session calls them (query, key and value in one shared call, the attention output,
//! gate and up in one shared call, down), then the output projection, on random activations,
//! for one or more models loaded as `kiln run` loads them (GGUF files, kiln packages, Hugging
//! Face folders). Several models are measured in turns, the first of each round alternating,
//! so a package and its GGUF twin meet the same phases of the host; each model's median per
//! kind of product is printed with its ratio to the first model's.
//!
//! Against `kiln bench`'s generation figure this splits a token into its products (the kernels
//! as the runtime reaches them: activation quantization, thread pool, real weight shapes and
//! memory) and the rest (attention, norms, sampling).
//!
//! ```sh
//! cargo run --release -p kiln-runtime --example decode_matmuls -- A [B ...] [--reps 200] [--threads 1]
//! ```

use std::time::Instant;

use kiln_runtime::bench::median;
use kiln_runtime::kernels::{matmul, matmul_shared};
use kiln_runtime::weights::WeightMatrix;
use kiln_runtime::{Model, Precision, ThreadPool};

/// The kinds of product a token makes, in the order it makes them.
const KINDS: [&str; 5] = ["qkv", "attn_output", "gate_up", "down", "output"];

/// Buffers for one model's products, sized from its matrices.
struct Buffers {
    x_embd: Vec<f32>,
    x_ff: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    h: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
}

fn noise(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// One token's products of `m`, each kind's time added to `times`.
fn token(pool: &ThreadPool, m: &Model, b: &mut Buffers, times: &mut [f64; 5]) {
    let p = Precision::Refined;
    let timed = |times: &mut [f64; 5], kind: usize, f: &mut dyn FnMut()| {
        let t0 = Instant::now();
        f();
        times[kind] += t0.elapsed().as_secs_f64();
    };
    for l in &m.layers {
        timed(times, 0, &mut || {
            let ws: [&WeightMatrix; 3] = [&l.wq, &l.wk, &l.wv];
            matmul_shared(
                pool,
                &ws,
                &b.x_embd,
                1,
                &mut [&mut b.q, &mut b.k, &mut b.v],
                p,
            )
        });
        timed(times, 1, &mut || matmul(pool, &l.wo, &b.q, 1, &mut b.h, p));
        timed(times, 2, &mut || {
            matmul_shared(
                pool,
                &[&l.w_gate, &l.w_up],
                &b.x_embd,
                1,
                &mut [&mut b.gate, &mut b.up],
                p,
            )
        });
        timed(times, 3, &mut || {
            matmul(pool, &l.w_down, &b.x_ff, 1, &mut b.h, p)
        });
    }
    timed(times, 4, &mut || {
        matmul(pool, &m.output, &b.x_embd, 1, &mut b.logits, p)
    });
}

fn main() {
    let usage = || -> ! {
        eprintln!("usage: decode_matmuls A [B ...] [--reps 200] [--threads 1]");
        std::process::exit(2);
    };
    let (mut paths, mut reps, mut threads) = (Vec::new(), 200usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--reps" => reps = number().max(3),
            "--threads" => threads = number(),
            _ if a.starts_with("--") => usage(),
            _ => paths.push(a),
        }
    }
    if paths.is_empty() {
        usage();
    }
    kiln_runtime::package::set_verify_on_open(false);
    let models: Vec<Model> = paths
        .iter()
        .map(|p| {
            Model::load(p).unwrap_or_else(|e| {
                eprintln!("decode_matmuls: {e}");
                std::process::exit(2);
            })
        })
        .collect();
    for (m, p) in models.iter().zip(&paths) {
        if let Some(o) = m.wait_for_huge_pages() {
            eprintln!(
                "{p}: {} MB of weights, merged into huge pages: {}",
                o.bytes >> 20,
                o.merged
            );
        }
    }
    let pool = ThreadPool::new(threads);
    let mut seed = 1u64;
    let mut bufs: Vec<Buffers> = models
        .iter()
        .map(|m| {
            let l = &m.layers[0];
            Buffers {
                x_embd: noise(l.wq.cols(), &mut seed),
                x_ff: noise(l.w_down.cols(), &mut seed),
                q: vec![0.0; l.wq.rows()],
                k: vec![0.0; l.wk.rows()],
                v: vec![0.0; l.wv.rows()],
                h: vec![0.0; l.wo.rows()],
                gate: vec![0.0; l.w_gate.rows()],
                up: vec![0.0; l.w_up.rows()],
                logits: vec![0.0; m.output.rows()],
            }
        })
        .collect();
    // [model][kind] per repetition, and the whole token.
    let mut per: Vec<Vec<[f64; 6]>> = vec![Vec::with_capacity(reps); models.len()];
    for rep in 0..reps {
        let n = models.len();
        for j in 0..n {
            let i = (j + rep) % n;
            let mut times = [0.0; 5];
            let t0 = Instant::now();
            token(&pool, &models[i], &mut bufs[i], &mut times);
            let total = t0.elapsed().as_secs_f64();
            if rep > 0 {
                per[i].push([times[0], times[1], times[2], times[3], times[4], total]);
            }
        }
    }
    let medians: Vec<[f64; 6]> = per
        .iter()
        .map(|reps| std::array::from_fn(|k| median(&reps.iter().map(|r| r[k]).collect::<Vec<_>>())))
        .collect();
    // Per pair of repetitions, each model's token time over the first model's.
    let ratios: Vec<f64> = per
        .iter()
        .map(|reps| {
            median(
                &reps
                    .iter()
                    .zip(&per[0])
                    .map(|(a, b)| a[5] / b[5])
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    println!(
        "{} thread(s), {} repetitions, one refined activation row; ms per token (median), time over the first model's",
        threads,
        reps - 1
    );
    print!("{:>12}", "");
    for p in &paths {
        let name = std::path::Path::new(p)
            .file_name()
            .map_or(p.clone(), |n| n.to_string_lossy().into_owned());
        print!(" {name:>24}");
    }
    println!();
    for (k, kind) in KINDS.iter().chain(["token"].iter()).enumerate() {
        print!("{kind:>12}");
        for m in &medians {
            print!(" {:>15.4} {:>7.3}x", m[k] * 1e3, m[k] / medians[0][k]);
        }
        println!();
    }
    print!("{:>12}", "paired");
    for r in &ratios {
        print!(" {:>15} {r:>7.3}x", "");
    }
    println!();
}
