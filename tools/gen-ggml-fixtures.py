#!/usr/bin/env python3
"""Generates the known-value fixtures for kiln-format's ggml tests.

The values come from the `gguf` Python package (gguf-py, maintained with llama.cpp), an
implementation independent of kiln's. Run it in a throwaway environment:

    python3 -m venv /tmp/pyfmt && /tmp/pyfmt/bin/pip install gguf numpy
    /tmp/pyfmt/bin/python tools/gen-ggml-fixtures.py

Fixtures written to crates/kiln-format/tests/data/ (all little-endian):

  raw_<TYPE>.bin      random blocks of <TYPE>: random bytes, with every f16 scale field
                      replaced by a sane random value (so no NaN/inf scales)
  raw_<TYPE>.f32      those blocks dequantized by gguf.quants.dequantize

  quant_<TYPE>.src    random f32 input (with a few edge-case blocks: zeros, one spike, ties)
  quant_<TYPE>.bin    that input quantized by gguf.quants.quantize (types gguf can quantize)
  quant_<TYPE>.f32    quant_<TYPE>.bin dequantized by gguf

  real_rows.json      for each ggml type in the two real models under models/, the first two
                      rows of a tensor of that type (the first with the shortest rows),
                      dequantized by gguf (values as
                      hex of the f32 little-endian bytes, so they compare bit for bit)

Deterministic: fixed seeds, so rerunning produces identical files.
"""

import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from gguf.constants import GGML_QUANT_SIZES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "crates", "kiln-format", "tests", "data")
MODELS = os.path.join(ROOT, "models")

# Byte offsets of f16 scale fields within each block (from ggml-common.h): (offset, kind)
# where kind "d" is a scale (either sign) and "m" a minimum / dmin (either sign).
F16_FIELDS = {
    T.Q4_0: [(0, "d")],
    T.Q4_1: [(0, "d"), (2, "m")],
    T.Q5_0: [(0, "d")],
    T.Q5_1: [(0, "d"), (2, "m")],
    T.Q8_0: [(0, "d")],
    T.Q2_K: [(80, "d"), (82, "m")],
    T.Q3_K: [(108, "d")],
    T.Q4_K: [(0, "d"), (2, "m")],
    T.Q5_K: [(0, "d"), (2, "m")],
    T.Q6_K: [(208, "d")],
    T.IQ4_NL: [(0, "d")],
    T.IQ4_XS: [(0, "d")],
}

# New types go at the end: each type's seed is its position here, so the others' fixtures stay
# byte for byte what they were.
ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
       T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def write(name: str, data: bytes) -> None:
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def as_f32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def dequant_bytes(blocks: np.ndarray, qtype: T) -> np.ndarray:
    """Dequantizes a flat uint8 array of whole blocks."""
    if qtype == T.F32:
        return blocks.view("<f4").copy()
    if qtype == T.F16:
        return blocks.view("<f2").astype(np.float32)
    block_len, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = blocks.reshape(1, -1)
    return dequantize(rows, qtype).reshape(-1).astype(np.float32)


def raw_blocks(rng: np.random.Generator, qtype: T) -> np.ndarray:
    block_len, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        vals = rng.standard_normal(64).astype(np.float32)
        vals[:4] = [0.0, -0.0, np.inf, -np.inf]
        vals[4] = np.float32(1e-40)  # subnormal
        return vals.view(np.uint8).copy()
    if qtype in (T.F16, T.BF16):
        bits = rng.integers(0, 1 << 16, size=64, dtype=np.uint16)
        if qtype == T.F16:
            # +-0, +-inf, smallest subnormal, largest finite; NaNs are left out so values
            # compare bit for bit without depending on NaN payload handling.
            bits[:6] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x7BFF]
            nan = (bits & 0x7C00) == 0x7C00
            bits[6:][nan[6:]] &= 0xBFFF
        else:
            bits[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F]
            nan = ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)
            bits[6:][nan[6:]] &= 0xBFFF
        return bits.view(np.uint8).copy()
    n_blocks = 8 if block_len == 32 else 4
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off, kind in F16_FIELDS[qtype]:
        mag = rng.uniform(1e-3, 5e-2, size=n_blocks) if kind == "d" else rng.uniform(1e-3, 2e-1, size=n_blocks)
        sign = np.where(rng.random(n_blocks) < 0.5, -1.0, 1.0)
        val = (mag * sign).astype(np.float16)
        blocks[:, off:off + 2] = val.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def quant_source(rng: np.random.Generator, qtype: T) -> np.ndarray:
    block_len, _ = GGML_QUANT_SIZES[qtype]
    n = 256
    x = (rng.standard_normal(n) * rng.uniform(0.01, 2.0)).astype(np.float32)
    if block_len == 32:
        x[0:32] = 0.0                      # an all-zero block
        x[32:64] = 0.01                    # a constant block
        x[64:96] = rng.standard_normal(32).astype(np.float32) * 1e-3
        x[70] = 3.0                        # one spike dominating the block
        x[96:128] = np.linspace(-1, 1, 32, dtype=np.float32)  # many ties to round
    else:
        x[:4] = [0.0, -0.0, 65504.0, 1e-8]
        x[4:8] = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8, 1.0 + 2 ** -11]
    return x


def quantize_bytes(x: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return x.astype("<f4").view(np.uint8).copy()
    if qtype == T.F16:
        return x.astype("<f2").view(np.uint8).copy()
    block_len, _ = GGML_QUANT_SIZES[qtype]
    return quantize(x.reshape(1, -1), qtype).reshape(-1)


def first_rows(path: str) -> list:
    reader = GGUFReader(path)
    # Per type, the first tensor (in file order) with the shortest rows, to keep this small.
    chosen = {}
    for t in reader.tensors:
        best = chosen.get(t.tensor_type)
        if best is None or int(t.shape[0]) < int(best.shape[0]):
            chosen[t.tensor_type] = t
    out = []
    for qtype, t in sorted(chosen.items(), key=lambda kv: kv[0].value):
        # gguf-py exposes quantized data as (rows, row_bytes) uint8 and float data as
        # (rows, row_len) typed arrays.
        data = np.asarray(t.data)
        rows = data.reshape(-1, data.shape[-1])[:2]
        if qtype in (T.F32, T.F16, T.BF16):
            values = rows.astype(np.float32) if qtype != T.BF16 else dequantize(rows, qtype)
        else:
            values = dequantize(rows, qtype)
        for i, row in enumerate(values):
            out.append({
                "tensor": t.name,
                "type": qtype.name,
                "row": i,
                "len": int(row.shape[0]),
                "f32le_hex": as_f32(row).hex(),
            })
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for i, qtype in enumerate(ALL):
        rng = np.random.default_rng(1000 + i)
        blocks = raw_blocks(rng, qtype)
        write(f"raw_{qtype.name}.bin", blocks.tobytes())
        write(f"raw_{qtype.name}.f32", as_f32(dequant_bytes(blocks, qtype)))
        if qtype in QUANTIZABLE:
            x = quant_source(rng, qtype)
            q = quantize_bytes(x, qtype)
            write(f"quant_{qtype.name}.src", as_f32(x))
            write(f"quant_{qtype.name}.bin", q.tobytes())
            write(f"quant_{qtype.name}.f32", as_f32(dequant_bytes(q, qtype)))

    models = {
        "SmolLM2-135M-Instruct.Q4_1.gguf": None,
        "gemma-3-270m-q4_k_m.gguf": None,
    }
    for name in models:
        path = os.path.join(MODELS, name)
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run scripts/fetch-models first")
        models[name] = first_rows(path)
    with open(os.path.join(OUT, "real_rows.json"), "w") as f:
        json.dump({"generator": "tools/gen-ggml-fixtures.py", "models": models}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
