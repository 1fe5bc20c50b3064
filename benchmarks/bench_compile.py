#!/usr/bin/env python
"""Compile time of one new batch shape: the scanned encoder (one layer group) against the unrolled one.

    python benchmarks/bench_compile.py                      # EmbeddingGemma-300M shapes, float32 and bfloat16
    python benchmarks/bench_compile.py --shapes 8x128,32x512

Needs no weights: parameters are abstract (jax.ShapeDtypeStruct), so only XLA's compile is timed
(``jax.jit(...).lower(...).compile()``), alternating scanned and unrolled per shape, fresh jit each time.
Prints a table and writes JSON to benchmarks/results/bench_compile.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from embgemma_jax.config import EMBEDDINGGEMMA_300M
from embgemma_jax.model import EmbeddingGemmaModule, param_shapes, stack_layers

HERE = Path(__file__).resolve().parent


def compile_seconds(scan: bool, dtype: str, rows: int, length: int) -> float:
    cfg = EMBEDDINGGEMMA_300M
    params = param_shapes(cfg)
    if scan:
        params = jax.eval_shape(lambda p: stack_layers(p, cfg), params)
    module = EmbeddingGemmaModule(cfg, jnp.dtype(dtype), "auto", scan_layers=scan)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)

    def forward(p, i, m):
        return module.apply({"params": p}, i, m, m).embeddings

    t = time.perf_counter()
    jax.jit(forward).lower(params, ids, ids).compile()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x128,32x512", help="rows x tokens, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_compile.json")
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            r, t = map(int, shape.split("x"))
            unrolled = compile_seconds(False, dtype, r, t)
            scanned = compile_seconds(True, dtype, r, t)
            rows.append(
                {
                    "dtype": dtype,
                    "rows": r,
                    "tokens": t,
                    "unrolled_s": unrolled,
                    "scanned_s": scanned,
                    "speedup": unrolled / scanned,
                }
            )
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})\n")
    print("| dtype | shape | unrolled compile s | scanned compile s | speedup |\n|---|---|---:|---:|---:|")
    for x in rows:
        print(
            f"| {x['dtype']} | {x['rows']}x{x['tokens']} | {x['unrolled_s']:.1f} | {x['scanned_s']:.1f} "
            f"| {x['speedup']:.1f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
