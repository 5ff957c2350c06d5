"""kiln against ExecuTorch's XNNPACK backend on equal bits; see bench/compare-executorch.

Three subcommands, all run by the venv's Python:

  prepare GGUF OUTDIR      dequantize a llama-architecture GGUF into the Meta-format checkpoint
                           (meta.pth + params.json) that ExecuTorch's export_llm reads
  et-run PTE THREADS ...   one ExecuTorch measurement in a fresh process, one JSON line out
  compare ...              the interleaved driver: kiln and ExecuTorch rounds, medians, ratios
"""
import argparse
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time

# "The capital of France is" in SmolLM2's tokenizer (no BOS: the GGUF says add_bos_token false).
CAPITAL_PROMPT = "The capital of France is"
CAPITAL_IDS = [504, 3575, 282, 4649, 314]
GREEDY_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(gguf_path, out_dir):
    """Writes OUT/meta.pth and OUT/params.json from the GGUF's weights, dequantized to f32.

    A llama GGUF already stores the query and key projections in the interleaved rotary layout
    that ExecuTorch's Meta-format transformer expects (the GGUF converter permutes them out of
    the Hugging Face layout), so the tensors only need renaming. The output head is tied to
    the token embedding in SmolLM2; the checkpoint gets an explicit copy so the exporter sees
    an ordinary linear layer it can quantize like the others.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise SystemExit(f"{gguf_path}: architecture {arch!r}, expected 'llama'")

    def meta(key):
        field = reader.fields.get(f"llama.{key}")
        if field is None:
            raise SystemExit(f"{gguf_path}: metadata llama.{key} is missing")
        return field.contents()

    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        # numpy order is the reverse of ggml's: rows first.
        weights[t.name] = torch.from_numpy(np.ascontiguousarray(w.reshape(tuple(reversed(t.shape.tolist())))))

    n_layers = int(meta("block_count"))
    renames = {
        "attn_q": "attention.wq",
        "attn_k": "attention.wk",
        "attn_v": "attention.wv",
        "attn_output": "attention.wo",
        "attn_norm": "attention_norm",
        "ffn_norm": "ffn_norm",
        "ffn_gate": "feed_forward.w1",
        "ffn_down": "feed_forward.w2",
        "ffn_up": "feed_forward.w3",
    }
    sd = {
        "tok_embeddings.weight": weights["token_embd.weight"],
        "norm.weight": weights["output_norm.weight"],
        "output.weight": weights.get("output.weight", weights["token_embd.weight"]).clone(),
    }
    for i in range(n_layers):
        for src, dst in renames.items():
            name = f"blk.{i}.{src}.weight"
            if name not in weights:
                raise SystemExit(f"{gguf_path}: tensor {name} is missing")
            sd[f"layers.{i}.{dst}.weight"] = weights[name]
    vocab = sd["tok_embeddings.weight"].shape[0]
    params = {
        "dim": int(meta("embedding_length")),
        "hidden_dim": int(meta("feed_forward_length")),
        "ffn_dim_multiplier": 1,
        "n_heads": int(meta("attention.head_count")),
        "n_kv_heads": int(meta("attention.head_count_kv")),
        "n_layers": n_layers,
        # Stored as f32 (9.99999975e-06); the shortest decimal that rounds to it is the intent.
        "norm_eps": float(f"{float(meta('attention.layer_norm_rms_epsilon')):.7g}"),
        "rope_theta": float(meta("rope.freq_base")),
        "use_scaled_rope": False,
        "use_hf_rope": False,
        "attention_qkv_bias": False,
        "vocab_size": int(vocab),
    }
    os.makedirs(out_dir, exist_ok=True)
    # Written under temporary names and renamed, so an interrupted run leaves no half file.
    torch.save(sd, os.path.join(out_dir, "meta.pth.tmp"))
    with open(os.path.join(out_dir, "params.json.tmp"), "w") as f:
        json.dump(params, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.pth.tmp"), os.path.join(out_dir, "meta.pth"))
    os.replace(os.path.join(out_dir, "params.json.tmp"), os.path.join(out_dir, "params.json"))
    print(f"prepare: {len(sd)} tensors, {params}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# et-run: one ExecuTorch measurement process


def et_run(pte, threads, p, n, reps, greedy):
    """Loads PTE, warms up, then times `reps` prompts of p tokens in one batch and `reps` runs
    of n single-token steps from an empty cache (kiln bench's and llama-bench's definition),
    plus n steps after the prompt for reference. Prints one JSON object."""
    t0 = time.perf_counter()
    import torch
    from executorch.extension.pybindings import _C
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: runtime ops)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed:: runtime ops)

    import_ms = (time.perf_counter() - t0) * 1000
    _C._unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    module = _C._load_for_executorch(pte)
    load_ms = (time.perf_counter() - t0) * 1000

    def forward(tokens, pos):
        out = module.forward((torch.tensor([tokens], dtype=torch.long), torch.tensor([pos], dtype=torch.long)))[0]
        return int(out.reshape(-1, out.shape[-1])[-1].argmax())

    out = {"engine": "executorch", "threads": _C._threadpool_get_thread_count(), "import_ms": import_ms,
           "load_ms": load_ms}
    if greedy:
        ids = [forward(CAPITAL_IDS, 0)]
        for i in range(GREEDY_TOKENS - 1):
            ids.append(forward([ids[-1]], len(CAPITAL_IDS) + i))
        out["greedy_ids"] = ids

    # The same kind of prompt as kiln bench's: uniform random ids (their values do not matter
    # to speed); the seed only makes runs repeatable.
    rng = random.Random(42)
    prompt = [rng.randrange(100, 49152) for _ in range(p)]

    def time_prompt():
        t = time.perf_counter()
        forward(prompt, 0)
        return time.perf_counter() - t

    def time_gen(start_pos):
        tok = prompt[0]
        t = time.perf_counter()
        for i in range(n):
            tok = forward([tok], start_pos + i)
        return time.perf_counter() - t

    pp, tg, tg_after = [], [], []
    for rep in range(reps + 1):
        a = time_prompt()
        b = time_gen(p)  # continues after the prompt: a longer cache to attend over
        c = time_gen(0)  # from an empty cache: the figure kiln bench reports
        if rep > 0:
            pp.append(p / a)
            tg_after.append(n / b)
            tg.append(n / c)
    out.update({
        "pp_tok_s": statistics.median(pp),
        "ttft_ms": p / statistics.median(pp) * 1000,
        "tg_tok_s": statistics.median(tg),
        "tg_after_pp_tok_s": statistics.median(tg_after),
        "pp_runs": pp,
        "tg_runs": tg,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000,
    })
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# compare: the interleaved driver

ENGINES = {
    "executorch": "ExecuTorch XNNPACK 8da4w g32",
    "kiln-int8": "kiln int4-block32, int8 activations",
    "kiln-refined": "kiln int4-block32, refined activations",
}


def run_json(cmd, wrap):
    full = shlex.split(wrap) + cmd if wrap else cmd
    r = subprocess.run(full, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"compare-executorch: {' '.join(cmd)} failed with exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kiln_bench(a, threads, precision):
    return run_json([a.kiln, "bench", a.package, "-p", str(a.p), "-n", str(a.n), "--threads", str(threads),
                     "--reps", "1", "--precision", precision, "--json"], a.wrap)


def et_bench(a, threads):
    return run_json([sys.executable, os.path.abspath(__file__), "et-run", a.pte, str(threads),
                     "-p", str(a.p), "-n", str(a.n), "--reps", "1"], a.wrap)


def kiln_greedy(a, precision):
    r = subprocess.run([a.kiln, "run", a.package, "--prompt", CAPITAL_PROMPT, "-n", str(GREEDY_TOKENS),
                        "--temperature", "0", "--ignore-eos", "--precision", precision, "--json"],
                       capture_output=True, text=True, check=True).stdout
    return json.loads(r)


def token_texts(gguf_path):
    """The vocabulary's strings as bytes: GPT-2 style byte-level BPE stores each byte as a
    printable character (the printable Latin-1 ones as themselves, the rest as U+0100 onwards,
    in byte order)."""
    from gguf import GGUFReader

    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(0x100 + extra)] = b
            extra += 1
    field = GGUFReader(gguf_path).fields["tokenizer.ggml.tokens"]
    strings = [bytes(field.parts[i]).decode() for i in field.data]
    return [bytes(char_to_byte.get(c, 0x3F) for c in t) for t in strings]


def common_prefix(x, y):
    k = 0
    while k < min(len(x), len(y)) and x[k] == y[k]:
        k += 1
    return k


def compare(a):
    keys = ["pp_tok_s", "tg_tok_s", "ttft_ms", "load_ms", "peak_rss_mb"]
    rows = []
    for t in a.threads:
        runs = {e: [] for e in ENGINES}
        for r in range(a.reps):
            # One process per engine per round, in a fixed order, so slow drift in the machine's
            # speed touches every engine alike.
            runs["executorch"].append(et_bench(a, t))
            runs["kiln-int8"].append(kiln_bench(a, t, "int8"))
            runs["kiln-refined"].append(kiln_bench(a, t, "refined"))
            print(f"[t{t} rep {r + 1}/{a.reps}] " + " | ".join(
                f"{e} pp {runs[e][-1]['pp_tok_s']:.1f} tg {runs[e][-1]['tg_tok_s']:.1f}" for e in ENGINES),
                file=sys.stderr, flush=True)
        med = {e: {k: statistics.median(x[k] for x in rs) for k in keys} for e, rs in runs.items()}
        for e in ("kiln-int8", "kiln-refined"):
            med[e]["roofline_pct"] = statistics.median(x["roofline_pct"] for x in runs[e])
            med[e]["bytes_per_token"] = runs[e][0]["bytes_per_token"]
        med["executorch"]["tg_after_pp_tok_s"] = statistics.median(x["tg_after_pp_tok_s"] for x in runs["executorch"])
        et = med["executorch"]
        rows.append({
            "threads": t,
            **med,
            "ratio": {e: {"pp": med[e]["pp_tok_s"] / et["pp_tok_s"], "tg": med[e]["tg_tok_s"] / et["tg_tok_s"]}
                      for e in ("kiln-int8", "kiln-refined")},
            "runs": {e: [{"pp": x["pp_tok_s"], "tg": x["tg_tok_s"]} for x in rs] for e, rs in runs.items()},
        })

    greedy = None
    if a.greedy:
        et = run_json([sys.executable, os.path.abspath(__file__), "et-run", a.pte, "1", "-p", "1", "-n", "1",
                       "--reps", "1", "--greedy"], None)
        greedy = {"prompt": CAPITAL_PROMPT, "prompt_ids": CAPITAL_IDS, "executorch": et["greedy_ids"]}
        if a.pte_f32:
            greedy["executorch-f32"] = run_json([sys.executable, os.path.abspath(__file__), "et-run", a.pte_f32, "1",
                                                 "-p", "1", "-n", "1", "--reps", "1", "--greedy"], None)["greedy_ids"]
        for prec in ("int8", "refined"):
            run = kiln_greedy(a, prec)
            # ExecuTorch is given the ids kiln's tokenizer makes of the prompt: check they agree.
            if run["prompt_token_ids"] != CAPITAL_IDS:
                raise SystemExit(f"compare-executorch: kiln tokenizes {CAPITAL_PROMPT!r} as "
                                 f"{run['prompt_token_ids']}, ExecuTorch was given {CAPITAL_IDS}")
            greedy[f"kiln-{prec}"] = run["token_ids"][:GREEDY_TOKENS]
        if a.reference:
            with open(a.reference) as f:
                case = json.load(f)["cases"]["capital"]
            greedy["reference_f32"] = case["greedy_32_ids"][:GREEDY_TOKENS]
        if a.gguf:
            vocab = token_texts(a.gguf)
            greedy["text"] = {k: b"".join(vocab[i] for i in v).decode(errors="replace")
                              for k, v in greedy.items() if k.startswith(("executorch", "kiln", "reference"))}

    if a.json:
        print(json.dumps({"p": a.p, "n": a.n, "reps": a.reps, "rows": rows, "greedy": greedy}, indent=1))
        return
    print(f"SmolLM2-135M, pp{a.p} / tg{a.n} (tg from an empty cache), tokens/s, medians of {a.reps} interleaved "
          f"runs; ratio = kiln / ExecuTorch (>1: kiln faster)")
    print("| engine | threads | pp tok/s | ratio | tg tok/s | ratio | tg roofline % |")
    print("|---|---|---|---|---|---|---|")
    def ratio(q, k):
        return f"{q[k]:.2f}x" if q else ""

    for r in rows:
        for e, label in ENGINES.items():
            m = r[e]
            q = r["ratio"].get(e)
            roof = f"{m['roofline_pct']:.0f}" if "roofline_pct" in m else ""
            print(f"| {label} | {r['threads']} | {m['pp_tok_s']:.1f} | {ratio(q, 'pp')}"
                  f" | {m['tg_tok_s']:.1f} | {ratio(q, 'tg')} | {roof} |")
    if greedy:
        print(f"\ngreedy ids after {CAPITAL_PROMPT!r} {CAPITAL_IDS}:")
        for k in ("reference_f32", "executorch-f32", "executorch", "kiln-int8", "kiln-refined"):
            if k not in greedy:
                continue
            note = ""
            if "reference_f32" in greedy and k != "reference_f32":
                note = f"  (first {common_prefix(greedy[k], greedy['reference_f32'])} equal the f32 reference)"
            print(f"  {k:<14} {greedy[k]}{note}")
            text = greedy.get("text", {}).get(k)
            if text is not None:
                print(f"  {'':<14} {text!r}")

def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("gguf")
    s.add_argument("out")
    s = sub.add_parser("et-run")
    s.add_argument("pte")
    s.add_argument("threads", type=int)
    s.add_argument("-p", type=int, default=128)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--reps", type=int, default=1)
    s.add_argument("--greedy", action="store_true")
    s = sub.add_parser("compare")
    s.add_argument("--kiln", required=True)
    s.add_argument("--package", required=True)
    s.add_argument("--pte", required=True)
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("-p", type=int, default=128)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    s.add_argument("--wrap", default=None)
    s.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--reference", default=None)
    s.add_argument("--pte-f32", default=None)
    s.add_argument("--gguf", default=None)
    s.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.gguf, a.out)
    elif a.cmd == "et-run":
        et_run(a.pte, a.threads, a.p, a.n, a.reps, a.greedy)
    else:
        compare(a)


if __name__ == "__main__":
    main()
