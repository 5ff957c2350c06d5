"""Interleaved kiln / llama.cpp measurements; see bench/compare-llamacpp."""
import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

LLAMA_ONE_RUN = r"""
import ctypes, json, random, resource, sys, time
import llama_cpp as L
path, threads, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
L.llama_backend_init()
t0 = time.perf_counter()
mp = L.llama_model_default_params()
model = L.llama_model_load_from_file(path.encode(), mp)
cp = L.llama_context_default_params()
cp.n_ctx = max(p, n) + 8
cp.n_batch = max(p, 1)
cp.n_ubatch = max(p, 1)
cp.n_threads = threads
cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
load_ms = (time.perf_counter() - t0) * 1000
vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
rng = random.Random(42)
prompt = [rng.randrange(vocab) for _ in range(p)]
mem = L.llama_get_memory(ctx)

def clear():
    L.llama_memory_clear(mem, True)

def decode(tokens):
    arr = (L.llama_token * len(tokens))(*tokens)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise SystemExit(f"llama_decode failed: {rc}")

def pp():
    clear()
    t = time.perf_counter()
    decode(prompt)
    L.llama_get_logits_ith(ctx, -1)
    return time.perf_counter() - t

def tg():
    clear()
    t = time.perf_counter()
    tok = prompt[0] if prompt else 1
    for _ in range(n):
        decode([tok])
    return time.perf_counter() - t

if p: pp()
if n: tg()
out = {"load_ms": load_ms}
if p:
    s = pp(); out["pp_tok_s"] = p / s; out["ttft_ms"] = s * 1000
if n:
    out["tg_tok_s"] = n / tg()
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000
print(json.dumps(out))
"""


def kiln_run(kiln, path, threads, p, n):
    out = subprocess.run(
        [kiln, "bench", path, "-p", str(p), "-n", str(n), "--threads", str(threads), "--reps", "1", "--json"],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    # kiln merges its weights into huge pages on a thread of its own after loading; `kiln
    # bench` measures once that is done and reports how long it took (0: not run).
    r["merge_ms"] = (r.get("huge_pages") or {}).get("ms_after_load", 0.0)
    return r


def llama_run(path, threads, p, n):
    out = subprocess.run([sys.executable, "-c", LLAMA_ONE_RUN, path, str(threads), str(p), str(n)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    keys = ["pp_tok_s", "tg_tok_s", "ttft_ms", "load_ms", "peak_rss_mb"]
    rows = []
    for m in a.models:
        path = f"{a.models_dir}/{MODELS[m]}"
        for t in a.threads:
            runs = {"kiln": [], "llama.cpp": []}
            for r in range(a.reps):
                runs["kiln"].append(kiln_run(a.kiln, path, t, a.p, a.n))
                runs["llama.cpp"].append(llama_run(path, t, a.p, a.n))
                print(f"[{m} t{t} rep {r + 1}/{a.reps}] kiln pp {runs['kiln'][-1]['pp_tok_s']:.1f} tg {runs['kiln'][-1]['tg_tok_s']:.1f}"
                      f" | llama.cpp pp {runs['llama.cpp'][-1]['pp_tok_s']:.1f} tg {runs['llama.cpp'][-1]['tg_tok_s']:.1f}", file=sys.stderr)
            med = {e: {k: statistics.median(x[k] for x in rs) for k in keys} for e, rs in runs.items()}
            med["kiln"]["merge_ms"] = statistics.median(x["merge_ms"] for x in runs["kiln"])
            rows.append({"model": m, "threads": t, "kiln": med["kiln"], "llama.cpp": med["llama.cpp"],
                         "ratio": {k: med["kiln"][k] / med["llama.cpp"][k] for k in keys}})
    if a.json:
        print(json.dumps({"p": a.p, "n": a.n, "reps": a.reps, "rows": rows}, indent=1))
        return
    print(f"pp{a.p} / tg{a.n}, medians of {a.reps} interleaved runs; ratio = kiln / llama.cpp (>1 is better for tok/s, <1 for ms and MB)")
    print("| model | threads | pp kiln | pp llama.cpp | ratio | tg kiln | tg llama.cpp | ratio | ttft ms kiln / llama.cpp | load ms kiln / llama.cpp | kiln huge pages ms after load | peak RSS MB kiln / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, l, q = r["kiln"], r["llama.cpp"], r["ratio"]
        print(f"| {r['model']} | {r['threads']} | {k['pp_tok_s']:.1f} | {l['pp_tok_s']:.1f} | {q['pp_tok_s']:.2f}x"
              f" | {k['tg_tok_s']:.1f} | {l['tg_tok_s']:.1f} | {q['tg_tok_s']:.2f}x"
              f" | {k['ttft_ms']:.0f} / {l['ttft_ms']:.0f} | {k['load_ms']:.0f} / {l['load_ms']:.0f}"
              f" | {k['merge_ms']:.0f} | {k['peak_rss_mb']:.0f} / {l['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
