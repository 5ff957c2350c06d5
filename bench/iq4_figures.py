"""IQ4_NL and IQ4_XS files made by llama.cpp's own quantizer, run by kiln and by llama.cpp.

Driven by bench/iq4-figures; see that script.

figures: SmolLM2's GGUF is requantized by `llama_cpp.llama_model_quantize` (requantization
allowed, llama.cpp's default tensor mixture for the file type) to IQ4_NL, IQ4_XS and, as a
baseline of a long-supported type, Q4_0. Two llama.cpp references per file:

- "llama.cpp f32": llama.cpp run on ggml's own f32 dequantization of the file
  (`llama_model_quantize` to ALL_F32) with an f32 KV cache, so nothing in it is quantized but
  the weights themselves: the exact answer for the file's weights, computed by ggml alone;
- "llama.cpp": llama.cpp on the file itself, which quantizes activations to 8 bits inside its
  matrix products (Q8_0 / Q8_K), so it sits about a logit away from the exact answer.

On each file, the last-token logits of the four reference prompts (`reference.json`, its token
ids) from kiln (default and exact paths) are compared with both: cosine, max |diff|, top-1.
Perplexity on the reference text: `kiln perplexity` against the same computation done with
llama.cpp's logits (whole text tokenized without special tokens, chunks of 256 tokens, no BOS,
every token after a chunk's first scored).

speed: `kiln bench` on the files, interleaved (A B C A B C ...), medians of prompt and
generation tokens/s.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

SOURCE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def quantize(src, dst, ftype):
    import llama_cpp

    if os.path.exists(dst):
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize {ftype} failed: {rc}")
    os.replace(tmp, dst)


def files(args):
    src = os.path.join(args.models_dir, SOURCE)
    out = {"Q4_1 (source)": src}
    os.makedirs(args.work, exist_ok=True)
    for ftype in args.types:
        dst = os.path.join(args.work, f"smollm2-{ftype}.gguf")
        quantize(src, dst, ftype)
        out[ftype] = dst
    return out


def type_counts(kiln, path):
    """Tensor types of a file, from `kiln inspect` (which must accept it)."""
    counts = {}
    in_table = False
    for line in run([kiln, "inspect", path]).splitlines():
        if line.startswith("tensor "):
            in_table = True
            continue
        if in_table and line.strip():
            ty = line.split()[-2]
            counts[ty] = counts.get(ty, 0) + 1
    return counts


def kiln_logits(kiln, path, ids, precision, threads):
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        run([kiln, "logits", path, "--token-ids", ",".join(map(str, ids)), "--out", f.name,
             "--precision", precision, "--threads", str(threads)])
        return np.fromfile(f.name, dtype="<f4").astype(np.float64)


class LlamaCpp:
    def __init__(self, path, threads, f32_cache=False):
        import llama_cpp

        kw = dict(type_k=0, type_v=0) if f32_cache else {}
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=1024, n_ubatch=1024,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads,
                                   verbose=False, **kw)

    def logits(self, ids):
        """Logits after every token of `ids`, from a fresh context."""
        # reset() rewinds to position 0; eval() drops the cache beyond it first.
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


def f32_copy(path):
    """ggml's f32 dequantization of every tensor of `path` (a temporary file)."""
    import llama_cpp

    dst = path[:-len(".gguf")] + "-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(path.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize to f32 of {path} failed: {rc}")
    return dst


def compare(a, b):
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return cos, float(np.max(np.abs(a - b))), int(np.argmax(a)) == int(np.argmax(b))


def llama_perplexity(llm, text, ctx):
    ids = llm.tokenize(text)
    nll, scored = 0.0, 0
    for start in range(0, len(ids), ctx):
        chunk = ids[start:start + ctx]
        if len(chunk) < 2:
            continue
        logits = llm.logits(chunk)
        for i in range(len(chunk) - 1):
            row = logits[i]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll += lse - row[chunk[i + 1]]
            scored += 1
    return math.exp(nll / scored), len(ids), scored


REFS = ("llama.cpp f32", "llama.cpp")
PATHS = ("exact", "refined")


def figures(args):
    ref = json.load(open(os.path.join(args.reference, "reference.json")))
    text = open(args.text, encoding="utf-8").read()
    rows = []
    for label, path in files(args).items():
        counts = type_counts(args.kiln, path)
        f32 = f32_copy(path)
        llms = {"llama.cpp f32": LlamaCpp(f32, args.threads, f32_cache=True),
                "llama.cpp": LlamaCpp(path, args.threads)}
        row = dict(file=label, types=counts, cases={}, ppl={})
        for case, c in ref["cases"].items():
            ids = c["prompt_token_ids"]
            want = {r: llm.logits(ids)[-1] for r, llm in llms.items()}
            got = {p: kiln_logits(args.kiln, path, ids, p, args.threads) for p in PATHS}
            row["cases"][case] = {f"kiln {p} vs {r}": compare(got[p], want[r])
                                  for p in PATHS for r in REFS}
            row["cases"][case]["llama.cpp vs llama.cpp f32"] = compare(want["llama.cpp"],
                                                                       want["llama.cpp f32"])
            print(f"{label} {case}: {row['cases'][case]}", file=sys.stderr)
        for p in PATHS:
            out = run([args.kiln, "perplexity", path, "--text-file", args.text, "--json",
                       "--precision", p, "--threads", str(args.threads)])
            row["ppl"][f"kiln {p}"] = json.loads(out)["ppl"]
        for r, llm in llms.items():
            row["ppl"][r], n_tokens, scored = llama_perplexity(llm, text, 256)
        row["ppl_tokens"] = [n_tokens, scored]
        print(f"{label} perplexity: {row['ppl']} ({n_tokens} tokens, {scored} scored)",
              file=sys.stderr)
        rows.append(row)
        del llms
        os.remove(f32)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    pairs = [f"kiln {p} vs {r}" for r in REFS for p in PATHS] + ["llama.cpp vs llama.cpp f32"]
    print("| file | tensor types | comparison | cosine, worst of 4 | max \\|diff\\|, worst | "
          "top-1 same |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items(), key=lambda kv: -kv[1])
                          if t != "F32")
        for pair in pairs:
            cs = [c[pair] for c in r["cases"].values()]
            print(f"| {r['file']} | {types} | {pair} | {min(c[0] for c in cs):.7f} | "
                  f"{max(c[1] for c in cs):.2g} | {sum(c[2] for c in cs)}/{len(cs)} |")
            types = ""
    print()
    print("| file | " + " | ".join(f"perplexity, {k}" for k in rows[0]["ppl"]) + " |")
    print("|---|" + "---|" * len(rows[0]["ppl"]))
    for r in rows:
        print(f"| {r['file']} | " + " | ".join(f"{v:.4f}" for v in r["ppl"].values()) + " |")


def speed(args):
    paths = files(args)
    labels = [l for l in paths if l in args.types or l.startswith("Q4_1")]
    res = {l: [] for l in labels}
    for _ in range(args.rounds):
        for l in labels:
            out = run([args.kiln, "bench", paths[l], "-p", str(args.p), "-n", str(args.n),
                       "--reps", str(args.reps), "--threads", str(args.threads), "--json"])
            res[l].append(json.loads(out))
            print(f"{l}: pp {res[l][-1]['pp_tok_s']:.1f}, tg {res[l][-1]['tg_tok_s']:.1f} tok/s",
                  file=sys.stderr)
    med = lambda l, k: statistics.median(r[k] for r in res[l])
    # Machine speed drifts between rounds on a shared machine: ratios are taken within a
    # round (the files ran back to back), then the median over rounds.
    ratio = lambda l, k: statistics.median(a[k] / b[k] for a, b in zip(res[l], res[args.baseline]))
    b = args.baseline
    print(f"| file ({args.threads} thread{'s' if args.threads > 1 else ''}) | size MB | "
          f"pp{args.p} tok/s | vs {b} | tg{args.n} tok/s | vs {b} | roofline % |")
    print("|---|---|---|---|---|---|---|")
    for l in labels:
        mb = os.path.getsize(paths[l]) / 1e6
        print(f"| {l} | {mb:.1f} | {med(l, 'pp_tok_s'):.0f} | {ratio(l, 'pp_tok_s'):.2f} | "
              f"{med(l, 'tg_tok_s'):.1f} | {ratio(l, 'tg_tok_s'):.2f} | "
              f"{med(l, 'roofline_pct'):.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["figures", "speed"])
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--types", nargs="+", default=["IQ4_NL", "IQ4_XS", "Q4_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default="Q4_0")
    args = ap.parse_args()
    figures(args) if args.mode == "figures" else speed(args)


if __name__ == "__main__":
    main()
