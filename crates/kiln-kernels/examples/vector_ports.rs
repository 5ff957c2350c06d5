//! What the AVX-512 instructions of the lookup-table kernels cost on this core, in core cycles,
//! from loops of independent instructions: the facts the `LUT8` and planar kernels are shaped
//! by, measured rather than taken from tables (which disagree between cores of one family).
//!
//! ```sh
//! cargo run --release -p kiln-kernels --example vector_ports [-- --rounds 3]
//! ```
//!
//! A core cycle is calibrated from a chain of dependent scalar additions (one cycle each), so
//! the time-stamp counter's rate drops out. Each probe runs one `asm!` loop; "per instruction"
//! probes repeat one instruction into eight independent registers, and the `LUT8` probes run
//! the 64-weight step of the decode kernel, four rows at a time, with the indices in L1. A
//! machine shared with other guests drifts: take the smallest of the rounds.
//!
//! x86-64 with AVX-512 BW, VBMI, VBMI2 and VNNI only; elsewhere it says so and exits.

#[cfg(target_arch = "x86_64")]
mod probes {
    use std::arch::asm;
    use std::arch::x86_64::_rdtsc;

    /// Iterations per probe: long enough to swamp the timer, short enough for a few rounds.
    const ITERS: u64 = 4_000_000;

    /// Time-stamp ticks of `ITERS` runs of the loop `body` (which repeats itself `ITERS` times
    /// through the counter in `rcx`), with `rdi` pointing at 4 KiB of zeros and `k1` all ones.
    macro_rules! probe {
        ($body:expr) => {{
            let buf = [0u8; 4096 + 64];
            let p = buf.as_ptr().wrapping_add(buf.as_ptr().align_offset(64));
            let start = unsafe { _rdtsc() };
            // SAFETY: the loop reads 256 bytes at `rdi`, inside `buf`; every register it
            // writes is declared clobbered; it touches no stack.
            unsafe {
                asm!(
                    "kxnorq k1, k1, k1",
                    "2:",
                    $body,
                    "dec rcx",
                    "jnz 2b",
                    inout("rcx") ITERS => _,
                    in("rdi") p,
                    out("rax") _,
                    out("k1") _, out("k2") _, out("k3") _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                    out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                    out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                    out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                    out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                    options(nostack),
                );
            }
            (unsafe { _rdtsc() } - start) as f64
        }};
    }

    /// Eight copies of one instruction form writing `zmm0`..`zmm7` from `zmm16` and `zmm17`.
    macro_rules! eight {
        ($head:literal, $tail:literal) => {
            concat!(
                $head, " zmm0, ", $tail, "\n", $head, " zmm1, ", $tail, "\n", $head, " zmm2, ",
                $tail, "\n", $head, " zmm3, ", $tail, "\n", $head, " zmm4, ", $tail, "\n", $head,
                " zmm5, ", $tail, "\n", $head, " zmm6, ", $tail, "\n", $head, " zmm7, ", $tail,
                "\n",
            )
        };
    }

    /// [`eight!`] into `zmm8`..`zmm15` as well: sixteen chains, for instructions that add into
    /// their destination and would otherwise wait on their own latency.
    macro_rules! sixteen {
        ($head:literal, $tail:literal) => {
            concat!(
                eight!($head, $tail),
                $head,
                " zmm8, ",
                $tail,
                "\n",
                $head,
                " zmm9, ",
                $tail,
                "\n",
                $head,
                " zmm10, ",
                $tail,
                "\n",
                $head,
                " zmm11, ",
                $tail,
                "\n",
                $head,
                " zmm12, ",
                $tail,
                "\n",
                $head,
                " zmm13, ",
                $tail,
                "\n",
                $head,
                " zmm14, ",
                $tail,
                "\n",
                $head,
                " zmm15, ",
                $tail,
                "\n",
            )
        };
    }

    /// One row's 64 indices at `rdi + OFF` looked up in a 256-entry table of 16-bit entries
    /// (byte planes in `zmm1`..`zmm8`), as the kernel did before: two `vpermt2b` per plane and
    /// a byte blend on the index's top bit, then two interleaves and two `vpdpwssd`.
    macro_rules! lut8_blend {
        ($off:literal, $acc:literal, $load:literal) => {
            concat!(
                $load,
                ", [rdi + ",
                $off,
                "]\n",
                "vpmovb2m k2, zmm19\n",
                "vmovdqa64 zmm20, zmm1\n",
                "vpermt2b zmm20, zmm19, zmm2\n",
                "vmovdqa64 zmm21, zmm3\n",
                "vpermt2b zmm21, zmm19, zmm4\n",
                "vmovdqu8 zmm20 {{k2}}, zmm21\n",
                "vmovdqa64 zmm21, zmm5\n",
                "vpermt2b zmm21, zmm19, zmm6\n",
                "vpermi2b zmm19, zmm7, zmm8\n",
                "vmovdqu8 zmm21 {{k2}}, zmm19\n",
                "vpunpcklbw zmm22, zmm20, zmm21\n",
                "vpunpckhbw zmm23, zmm20, zmm21\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm22, zmm17\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm23, zmm18\n",
            )
        };
    }

    /// The same step as the kernel does it now: each plane's two halves merge in masked
    /// `vpermi2b` (the first leaves the upper half's lanes holding their index for the second).
    macro_rules! lut8_merge {
        ($off:literal, $acc:literal, $load:literal) => {
            concat!(
                $load,
                ", [rdi + ",
                $off,
                "]\n",
                "vpmovb2m k2, zmm19\n",
                "knotq k3, k2\n",
                "vmovdqa64 zmm20, zmm19\n",
                "vpermi2b zmm20 {{k3}}, zmm1, zmm2\n",
                "vpermi2b zmm20 {{k2}}, zmm3, zmm4\n",
                "vpermi2b zmm19 {{k3}}, zmm5, zmm6\n",
                "vpermi2b zmm19 {{k2}}, zmm7, zmm8\n",
                "vpunpcklbw zmm22, zmm20, zmm19\n",
                "vpunpckhbw zmm23, zmm20, zmm19\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm22, zmm17\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm23, zmm18\n",
            )
        };
    }

    macro_rules! four_rows {
        ($step:ident, $load:literal) => {
            concat!(
                $step!("0", "12", $load),
                $step!("64", "13", $load),
                $step!("128", "14", $load),
                $step!("192", "15", $load),
            )
        };
    }

    /// A probe: its name, what one loop iteration holds (instructions or 64-weight steps), that
    /// unit's name, and the loop.
    struct Probe {
        name: &'static str,
        per: f64,
        unit: &'static str,
        ticks: fn() -> f64,
    }

    /// Prints every probe's cost, the smallest over `rounds` rounds.
    pub fn run(rounds: usize) {
        let ok = std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512vbmi2")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        if !ok {
            println!("this CPU lacks AVX-512 BW, VBMI, VBMI2 or VNNI: nothing to probe");
            return;
        }
        let p = |name, per, unit, ticks| Probe {
            name,
            per,
            unit,
            ticks,
        };
        let probes: Vec<Probe> = vec![
            p("vpermb (64-byte table)", 8.0, "instr", || {
                probe!(eight!("vpermb", "zmm17, zmm16"))
            }),
            p("vpermi2b (128-byte table)", 8.0, "instr", || {
                probe!(eight!("vpermi2b", "zmm17, zmm16"))
            }),
            p("vpermw (32 words)", 8.0, "instr", || {
                probe!(eight!("vpermw", "zmm17, zmm16"))
            }),
            p("vpermi2w (64 words)", 8.0, "instr", || {
                probe!(eight!("vpermi2w", "zmm17, zmm16"))
            }),
            p("vpunpcklbw", 8.0, "instr", || {
                probe!(eight!("vpunpcklbw", "zmm17, zmm16"))
            }),
            p("vpsllw", 8.0, "instr", || {
                probe!(eight!("vpsllw", "zmm17, 8"))
            }),
            p("vpshldw", 8.0, "instr", || {
                probe!(eight!("vpshldw", "zmm17, zmm16, 8"))
            }),
            p("vpaddd", 8.0, "instr", || {
                probe!(eight!("vpaddd", "zmm17, zmm16"))
            }),
            p("vpdpwssd", 16.0, "instr", || {
                probe!(sixteen!("vpdpwssd", "zmm17, zmm16"))
            }),
            p("vpdpbusd", 16.0, "instr", || {
                probe!(sixteen!("vpdpbusd", "zmm17, zmm16"))
            }),
            p("vpermb + vpdpwssd, 8 each", 8.0, "pair", || {
                probe!(concat!(
                    eight!("vpermb", "zmm17, zmm16"),
                    "vpdpwssd zmm8, zmm17, zmm16\n",
                    "vpdpwssd zmm9, zmm17, zmm16\n",
                    "vpdpwssd zmm10, zmm17, zmm16\n",
                    "vpdpwssd zmm11, zmm17, zmm16\n",
                    "vpdpwssd zmm12, zmm17, zmm16\n",
                    "vpdpwssd zmm13, zmm17, zmm16\n",
                    "vpdpwssd zmm14, zmm17, zmm16\n",
                    "vpdpwssd zmm15, zmm17, zmm16\n",
                ))
            }),
            p("LUT8 step, blends", 4.0, "step", || {
                probe!(four_rows!(lut8_blend, "vmovdqu64 zmm19"))
            }),
            p("LUT8 step, merged", 4.0, "step", || {
                probe!(four_rows!(lut8_merge, "vmovdqu64 zmm19"))
            }),
            p("LUT8 step, merged, masked load", 4.0, "step", || {
                probe!(four_rows!(lut8_merge, "vmovdqu8 zmm19 {{k1}}{{z}}"))
            }),
        ];
        let cycle = || {
            let start = unsafe { _rdtsc() };
            // SAFETY: scalar additions on a declared scratch register.
            unsafe {
                asm!(
                    "2:",
                    "add rax, rdx", "add rax, rdx", "add rax, rdx", "add rax, rdx",
                    "add rax, rdx", "add rax, rdx", "add rax, rdx", "add rax, rdx",
                    "dec rcx",
                    "jnz 2b",
                    inout("rcx") ITERS => _,
                    inout("rax") 0u64 => _,
                    in("rdx") 1u64,
                    options(nostack, nomem),
                );
            }
            (unsafe { _rdtsc() } - start) as f64 / (8.0 * ITERS as f64)
        };
        let mut best = vec![f64::INFINITY; probes.len()];
        let mut tick = f64::INFINITY;
        for _ in 0..rounds {
            tick = tick.min(cycle());
            for (b, p) in best.iter_mut().zip(&probes) {
                *b = b.min((p.ticks)());
            }
        }
        println!("one core cycle = {tick:.3} time-stamp ticks");
        for (p, ticks) in probes.iter().zip(&best) {
            let cycles = ticks / tick / (ITERS as f64 * p.per);
            println!("{:<34} {cycles:6.2} cycles per {}", p.name, p.unit);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    #[cfg(target_arch = "x86_64")]
    probes::run(rounds);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rounds;
        println!("vector_ports probes x86-64 cores only");
    }
}
