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
                    out("k1") _, out("k2") _, out("k3") _, out("k4") _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                    out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                    out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                    out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                    out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                    out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                    out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                    options(nostack),
                );
            }
            (unsafe { _rdtsc() } - start) as f64
        }};
    }

    /// One instruction form into each register `zmm<r>` named, from `zmm16` and `zmm17`.
    macro_rules! into {
        ($head:literal, $tail:literal, $($r:literal)*) => {
            concat!($($head, " zmm", $r, ", ", $tail, "\n",)*)
        };
    }

    /// A probe of one instruction written into `zmm0`..`zmm7`, or into `zmm0`..`zmm15` (`16`)
    /// for instructions that add into their destination and would otherwise wait on their own
    /// latency.
    macro_rules! each {
        ($name:literal, $head:literal, $tail:literal) => {
            Probe {
                name: $name,
                per: 8.0,
                unit: "instr",
                ticks: || probe!(into!($head, $tail, 0 1 2 3 4 5 6 7)),
            }
        };
        ($name:literal, $head:literal, $tail:literal, 16) => {
            Probe {
                name: $name,
                per: 16.0,
                unit: "instr",
                ticks: || probe!(into!($head, $tail, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)),
            }
        };
    }

    /// The start of every `LUT8` step below: the indices loaded from `rdi + $off` into
    /// `zmm19` by `$load`, then looked up by `$lookup` (low bytes to `zmm20`, high to `zmm21`).
    macro_rules! looked_up {
        ($load:literal, $off:literal, $lookup:ident) => {
            concat!($load, ", [rdi + ", $off, "]\n", $lookup!())
        };
    }

    /// One row's 64-weight step of the `LUT8` decode kernel: the indices loaded from
    /// `rdi + $off` into `zmm19` by `$load`, looked up by `$lookup` in a 256-entry table of
    /// 16-bit entries (byte planes in `zmm1`..`zmm8`; low bytes to `zmm20`, high to `zmm21`),
    /// interleaved into words and multiplied into `zmm$acc` with the codes in `zmm17`, `zmm18`.
    macro_rules! lut8_step {
        ($lookup:ident, $off:literal, $acc:literal, $load:literal) => {
            concat!(
                looked_up!($load, $off, $lookup),
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

    /// A probe of two instructions interleaved, eight of each: the first into `zmm0`..`zmm7`,
    /// the second into `zmm8`..`zmm15` (whether they share a port).
    macro_rules! pair {
        ($name:literal, $a:literal, $a_tail:literal, $b:literal, $b_tail:literal) => {
            Probe {
                name: $name,
                per: 8.0,
                unit: "pair",
                ticks: || {
                    probe!(concat!(
                        into!($a, $a_tail, 0 1 2 3 4 5 6 7),
                        into!($b, $b_tail, 8 9 10 11 12 13 14 15),
                    ))
                },
            }
        };
    }

    /// [`lut8_step!`] with the words formed by shifts and bit selects in place of the
    /// interleaves: even elements' words from the planes' even bytes, odd from odd ones
    /// (`zmm9` stands for `0x00ff` in every word: the probes time the steps, not their results).
    macro_rules! lut8_step_select {
        ($lookup:ident, $off:literal, $acc:literal, $load:literal) => {
            concat!(
                looked_up!($load, $off, $lookup),
                "vpsllw zmm22, zmm21, 8\n",
                "vpsrlw zmm23, zmm20, 8\n",
                "vpternlogd zmm22, zmm20, zmm9, 0xf8\n",
                "vpternlogd zmm23, zmm21, zmm9, 0xf4\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm22, zmm17\n",
                "vpdpwssd zmm",
                $acc,
                ", zmm23, zmm18\n",
            )
        };
    }

    /// The lookup as the kernel did it before: two `vpermt2b` per plane and a byte blend on
    /// the index's top bit.
    macro_rules! blends {
        () => {
            concat!(
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
            )
        };
    }

    /// The lookup as the kernel does it now: each plane's two halves merge in masked
    /// `vpermi2b` (the first leaves the upper half's lanes holding their index for the second).
    macro_rules! merged {
        () => {
            concat!(
                "vpmovb2m k2, zmm19\n",
                "knotq k3, k2\n",
                "vmovdqa64 zmm20, zmm19\n",
                "vmovdqa64 zmm21, zmm19\n",
                "vpermi2b zmm20 {{k3}}, zmm1, zmm2\n",
                "vpermi2b zmm20 {{k2}}, zmm3, zmm4\n",
                "vpermi2b zmm21 {{k3}}, zmm5, zmm6\n",
                "vpermi2b zmm21 {{k2}}, zmm7, zmm8\n",
            )
        };
    }

    /// The lookup in 64-byte quarters: one `vpermb` per quarter and plane, merged under masks
    /// of the index's two top bits (bit 6 from the index added to itself).
    macro_rules! quarters {
        () => {
            concat!(
                "vpmovb2m k2, zmm19\n",
                "vpaddb zmm24, zmm19, zmm19\n",
                "vpmovb2m k3, zmm24\n",
                "kandq k4, k2, k3\n",
                "vpermb zmm20, zmm19, zmm1\n",
                "vpermb zmm20 {{k3}}, zmm19, zmm2\n",
                "vpermb zmm20 {{k2}}, zmm19, zmm3\n",
                "vpermb zmm20 {{k4}}, zmm19, zmm4\n",
                "vpermb zmm21, zmm19, zmm5\n",
                "vpermb zmm21 {{k3}}, zmm19, zmm6\n",
                "vpermb zmm21 {{k2}}, zmm19, zmm7\n",
                "vpermb zmm21 {{k4}}, zmm19, zmm8\n",
            )
        };
    }

    /// One row's step with byte products: the table's low bytes (7 bits) and high bytes
    /// against the codes' low bytes (`zmm17`) and high bytes (`zmm18`), four `vpdpbusd` into
    /// `zmm$a`..: the high plane flipped to unsigned for the product of two signed halves.
    macro_rules! lut8_step_bytes {
        ($lookup:ident, $off:literal, $a:literal, $b:literal, $c:literal, $d:literal) => {
            concat!(
                looked_up!("vmovdqu64 zmm19", $off, $lookup),
                "vpdpbusd zmm",
                $a,
                ", zmm17, zmm20\n",
                "vpdpbusd zmm",
                $b,
                ", zmm17, zmm21\n",
                "vpdpbusd zmm",
                $c,
                ", zmm20, zmm18\n",
                "vpxord zmm22, zmm21, zmm9\n",
                "vpdpbusd zmm",
                $d,
                ", zmm22, zmm18\n",
            )
        };
    }

    /// [`lut8_step_bytes!`] with the high plane stored biased to unsigned, so no flip: the
    /// four `vpdpbusd` add into three sums (the two middle products share one).
    macro_rules! lut8_step_biased {
        ($lookup:ident, $off:literal, $a:literal, $b:literal, $c:literal) => {
            concat!(
                looked_up!("vmovdqu64 zmm19", $off, $lookup),
                "vpdpbusd zmm",
                $a,
                ", zmm20, zmm17\n",
                "vpdpbusd zmm",
                $b,
                ", zmm20, zmm18\n",
                "vpdpbusd zmm",
                $b,
                ", zmm21, zmm17\n",
                "vpdpbusd zmm",
                $c,
                ", zmm21, zmm18\n",
            )
        };
    }

    /// A step macro (`lut8_step` or `lut8_step_select`) for four rows, each with its
    /// accumulator.
    macro_rules! four_rows {
        ($step:ident, $lookup:ident, $load:literal) => {
            concat!(
                $step!($lookup, "0", "12", $load),
                $step!($lookup, "64", "13", $load),
                $step!($lookup, "128", "14", $load),
                $step!($lookup, "192", "15", $load),
            )
        };
    }

    /// [`lut8_step_bytes!`] for four rows.
    macro_rules! four_rows_bytes {
        ($lookup:ident) => {
            concat!(
                lut8_step_bytes!($lookup, "0", "10", "11", "12", "13"),
                lut8_step_bytes!($lookup, "64", "14", "15", "16", "23"),
                lut8_step_bytes!($lookup, "128", "25", "26", "27", "28"),
                lut8_step_bytes!($lookup, "192", "29", "30", "31", "0"),
            )
        };
    }

    /// [`lut8_step_biased!`] for four rows.
    macro_rules! four_rows_biased {
        ($lookup:ident) => {
            concat!(
                lut8_step_biased!($lookup, "0", "10", "11", "12"),
                lut8_step_biased!($lookup, "64", "13", "14", "15"),
                lut8_step_biased!($lookup, "128", "16", "23", "25"),
                lut8_step_biased!($lookup, "192", "26", "27", "28"),
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
        let step = |name, ticks| Probe {
            name,
            per: 4.0,
            unit: "step",
            ticks,
        };
        let probes = [
            each!("vpermb (64-byte table)", "vpermb", "zmm17, zmm16"),
            each!("vpermi2b (128-byte table)", "vpermi2b", "zmm17, zmm16"),
            each!("vpermw (32 words)", "vpermw", "zmm17, zmm16"),
            each!("vpermi2w (64 words)", "vpermi2w", "zmm17, zmm16"),
            each!("vpunpcklbw", "vpunpcklbw", "zmm17, zmm16"),
            each!("vpsllw", "vpsllw", "zmm17, 8"),
            each!("vpshldw", "vpshldw", "zmm17, zmm16, 8"),
            each!("vpaddd", "vpaddd", "zmm17, zmm16"),
            each!("vpdpwssd", "vpdpwssd", "zmm17, zmm16", 16),
            each!("vpdpbusd", "vpdpbusd", "zmm17, zmm16", 16),
            each!("vdpbf16ps", "vdpbf16ps", "zmm17, zmm16", 16),
            each!("vfmadd231ps", "vfmadd231ps", "zmm17, zmm16", 16),
            each!("vfmadd231ph", "vfmadd231ph", "zmm17, zmm16", 16),
            pair!(
                "vpermb + vpdpwssd, 8 each",
                "vpermb",
                "zmm17, zmm16",
                "vpdpwssd",
                "zmm17, zmm16"
            ),
            pair!(
                "vpermb + vpsrlw, 8 each",
                "vpermb",
                "zmm17, zmm16",
                "vpsrlw",
                "zmm17, 8"
            ),
            pair!(
                "vpermb + vpternlogd, 8 each",
                "vpermb",
                "zmm17, zmm16",
                "vpternlogd",
                "zmm17, zmm16, 0xf8"
            ),
            pair!(
                "vpermi2b + vpdpwssd, 8 each",
                "vpermi2b",
                "zmm17, zmm16",
                "vpdpwssd",
                "zmm17, zmm16"
            ),
            pair!(
                "vpermi2b + vpsrlw, 8 each",
                "vpermi2b",
                "zmm17, zmm16",
                "vpsrlw",
                "zmm17, 8"
            ),
            step("LUT8 step, blends", || {
                probe!(four_rows!(lut8_step, blends, "vmovdqu64 zmm19"))
            }),
            step("LUT8 step, merged", || {
                probe!(four_rows!(lut8_step, merged, "vmovdqu64 zmm19"))
            }),
            step("LUT8 step, merged, masked load", || {
                probe!(four_rows!(lut8_step, merged, "vmovdqu8 zmm19 {{k1}}{{z}}"))
            }),
            step("LUT8 step, merged, bit selects", || {
                probe!(four_rows!(lut8_step_select, merged, "vmovdqu64 zmm19"))
            }),
            step("LUT8 step, quarters", || {
                probe!(four_rows!(lut8_step, quarters, "vmovdqu64 zmm19"))
            }),
            step("LUT8 step, quarters, bit selects", || {
                probe!(four_rows!(lut8_step_select, quarters, "vmovdqu64 zmm19"))
            }),
            step("LUT8 step, quarters, byte products", || {
                probe!(four_rows_bytes!(quarters))
            }),
            step("LUT8 step, merged, byte products", || {
                probe!(four_rows_bytes!(merged))
            }),
            step("LUT8 step, quarters, biased bytes", || {
                probe!(four_rows_biased!(quarters))
            }),
            step("LUT8 step, merged, biased bytes", || {
                probe!(four_rows_biased!(merged))
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
