"""Quantization figures and speed of kiln's `--quant` schemes against llama.cpp's quantizer.

Driven by bench/quant-figures (figures) and bench/quant-speed (speed); see those scripts.

figures: for each model and scheme, `kiln convert` (with the default --keep and with
--keep none), the package size, the per-tensor weight SNR and cosine the conversion reports,
and `kiln perplexity` on the reference text; then llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, requantization allowed) at the same bit widths, judged by
the same kiln perplexity code.

speed: `kiln bench -p P -n N --reps R` of each package format and of the GGUF files of equal
bits, interleaved (format, GGUF, format, GGUF, ...) so drift in the machine's speed hits both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

# (label, kiln convert arguments)
SCHEMES = [
    ("int8-channel", ["--quant", "int8-channel"]),
    ("int4-block32", ["--quant", "int4-block32"]),
    ("int4-block32-offset", ["--quant", "int4-block32-offset"]),
    ("int4-block64", ["--quant", "int4-block64"]),
    ("lut2-g16", ["--quant", "lut2", "--lut-group-channels", "16"]),
    ("lut4", ["--quant", "lut4"]),
    ("lut4-g16", ["--quant", "lut4", "--lut-group-channels", "16"]),
    ("lut4-g1", ["--quant", "lut4", "--lut-group-channels", "1"]),
    ("lut6-g16", ["--quant", "lut6", "--lut-group-channels", "16"]),
    ("lut8", ["--quant", "lut8"]),
    ("lut4-block32", ["--quant", "lut4-block32"]),
    ("lut4-block32-g16", ["--quant", "lut4-block32", "--lut-group-channels", "16"]),
]

# llama.cpp file types, by the bit width they stand beside.
LLAMA_TYPES = ["Q8_0", "Q6_K", "Q4_K_M", "Q4_1", "Q4_0", "Q2_K"]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def perplexity(kiln, model, text):
    out = run([kiln, "perplexity", model, "--text-file", text, "--json", "--no-verify"])
    return json.loads(out)["ppl"]


def size_of(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def llama_quantize(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize {ftype} failed: {rc}")


def figures(args):
    rows = []
    for name in args.models:
        src = os.path.join(args.models_dir, MODELS[name])
        base = perplexity(args.kiln, src, args.text)
        rows.append(dict(model=name, scheme="source GGUF", keep="-", mb=size_of(src) / 1e6,
                         ppl=base, dppl=0.0, snr=None, snr_min=None, cos=None, cos_min=None))
        print(f"{name}: source perplexity {base:.4f}", file=sys.stderr)
        for label, conv in SCHEMES:
            if label not in args.schemes:
                continue
            for keep in args.keep:
                out = os.path.join(args.work, f"{name}-{label}-{keep}.kiln")
                cmd = [args.kiln, "convert", src, "-o", out, "--json"] + conv
                if keep == "none":
                    cmd += ["--keep", "none"]
                t0 = time.time()
                report = json.loads(run(cmd))
                seconds = time.time() - t0
                q = [t for t in report["tensors"] if t["cosine"] is not None]
                snrs = [t["snr_db"] for t in q if t["snr_db"] is not None]
                coss = [t["cosine"] for t in q]
                ppl = perplexity(args.kiln, out, args.text)
                rows.append(dict(
                    model=name, scheme=label, keep=keep, mb=report["bytes"] / 1e6, ppl=ppl,
                    dppl=100 * (ppl / base - 1), snr=statistics.mean(snrs) if snrs else None,
                    snr_min=min(snrs) if snrs else None,
                    cos=statistics.mean(coss) if coss else None,
                    cos_min=min(coss) if coss else None, convert_s=seconds))
                print(f"{name} {label} keep={keep}: {ppl:.4f} ({rows[-1]['dppl']:+.2f} %)",
                      file=sys.stderr)
                if not args.keep_outputs:
                    subprocess.run(["rm", "-rf", out])
        for ftype in args.llama_types:
            out = os.path.join(args.work, f"{name}-llama-{ftype}.gguf")
            llama_quantize(src, out, ftype)
            ppl = perplexity(args.kiln, out, args.text)
            rows.append(dict(model=name, scheme=f"llama.cpp {ftype}", keep="llama.cpp",
                             mb=size_of(out) / 1e6, ppl=ppl, dppl=100 * (ppl / base - 1),
                             snr=None, snr_min=None, cos=None, cos_min=None))
            print(f"{name} llama.cpp {ftype}: {ppl:.4f}", file=sys.stderr)
            if not args.keep_outputs:
                os.remove(out)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    f = lambda v, p: "–" if v is None else f"{v:.{p}f}"
    print("| model | scheme | --keep | size MB | perplexity | vs source | weight SNR dB mean / min | weight cosine mean / min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['scheme']} | {r['keep']} | {r['mb']:.1f} | {r['ppl']:.3f} | "
              f"{r['dppl']:+.2f} % | {f(r['snr'], 2)} / {f(r['snr_min'], 2)} | "
              f"{f(r['cos'], 5)} / {f(r['cos_min'], 5)} |")


# Speed: each kiln format beside the GGUF of equal (or nearest) bits.
SPEED = {
    # label: (kiln convert arguments, llama.cpp file type of the GGUF it is compared with)
    "int8-channel": (["--quant", "int8-channel"], "Q8_0"),
    "int4-block32": (["--quant", "int4-block32"], "Q4_0"),
    "int4-block64": (["--quant", "int4-block64"], "Q4_0"),
    "lut4": (["--quant", "lut4"], "Q4_0"),
    "lut4-g16": (["--quant", "lut4", "--lut-group-channels", "16"], "Q4_0"),
    "lut4-g1": (["--quant", "lut4", "--lut-group-channels", "1"], "Q4_0"),
    "lut2-g16": (["--quant", "lut2", "--lut-group-channels", "16"], "Q2_K"),
    "lut6-g16": (["--quant", "lut6", "--lut-group-channels", "16"], "Q6_K"),
    "lut8": (["--quant", "lut8"], "Q8_0"),
    "lut4-block32": (["--quant", "lut4-block32"], "Q4_0"),
    "lut4-block32-g16": (["--quant", "lut4-block32", "--lut-group-channels", "16"], "Q4_0"),
}


def bench_pair(kiln, first, second, p, n, reps, threads):
    """`kiln bench FIRST --against SECOND`: both models in one process, each repetition on
    both back to back. Returns each model's median (pp, tg) and the pairs' median ratios."""
    cmd = [kiln, "bench", first, "--against", second, "-p", str(p), "-n", str(n), "--reps",
           str(reps), "--json", "--no-verify"]
    if threads:
        cmd += ["--threads", str(threads)]
    j = json.loads(run(cmd))
    return ((j["pp_tok_s"], j["tg_tok_s"]),
            (j["against"]["pp_tok_s"], j["against"]["tg_tok_s"]),
            (j["pp_ratio"], j["tg_ratio"]))


def speed(args):
    # A round is one process running the package and the GGUF file in turns
    # (`kiln bench --against`): a shared host's slow phases fall on both halves of each pair,
    # where separate processes saw different phases. The model loaded first runs about 1 %
    # faster in such a process (a file against itself: 1.007x, 1.022x), so the rounds
    # alternate which one that is. The ratios are medians of the rounds' ratios (each the
    # median of its pairs'), "tg spread" the range of the rounds'; the tok/s columns are plain
    # medians.
    print("| model | threads | format | pp tok/s | GGUF | pp tok/s | pp ratio | tg tok/s | "
          "GGUF tg tok/s | tg ratio | tg spread |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        src = os.path.join(args.models_dir, MODELS[name])
        ggufs = {}
        for label in args.formats:
            conv, ftype = SPEED[label]
            pkg = os.path.join(args.work, f"{name}-{label}.kiln")
            run([args.kiln, "convert", src, "-o", pkg] + conv)
            if ftype not in ggufs:
                g = os.path.join(args.work, f"{name}-llama-{ftype}.gguf")
                llama_quantize(src, g, ftype)
                ggufs[ftype] = g
            for threads in args.threads:
                a, b, r = [], [], []
                for k in range(args.rounds):
                    if k % 2 == 0:
                        x, y, q = bench_pair(args.kiln, pkg, ggufs[ftype], args.p, args.n,
                                             args.reps, threads)
                    else:
                        y, x, q = bench_pair(args.kiln, ggufs[ftype], pkg, args.p, args.n,
                                             args.reps, threads)
                        q = (1 / q[0], 1 / q[1])
                    a.append(x)
                    b.append(y)
                    r.append(q)
                med = lambda xs, i: statistics.median(x[i] for x in xs)
                tg = [q[1] for q in r]
                print(f"| {name} | {threads or 'all'} | {label} | {med(a, 0):.1f} | {ftype} | "
                      f"{med(b, 0):.1f} | {med(r, 0):.2f}x | {med(a, 1):.1f} | "
                      f"{med(b, 1):.1f} | {statistics.median(tg):.2f}x | "
                      f"{min(tg):.2f}-{max(tg):.2f} |", flush=True)
            subprocess.run(["rm", "-rf", pkg])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["figures", "speed"])
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--keep", nargs="+", default=["default", "none"])
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--schemes", nargs="+", default=[label for label, _ in SCHEMES])
    ap.add_argument("--llama-types", nargs="+", default=LLAMA_TYPES)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--formats", nargs="+", default=list(SPEED))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    figures(args) if args.mode == "figures" else speed(args)


if __name__ == "__main__":
    main()
