#!/usr/bin/env python
"""Compile time of one new batch shape: the unrolled encoder (24 layers), the scanned one (one layer group),
and the per-layer programs (:mod:`embgemma_jax.layerwise`, the CPU's form: one layer program for both layer
types below 768 tokens, two above, plus the embedding and tail programs; their times summed, compiled one
after the other).

    python benchmarks/bench_compile.py                      # EmbeddingGemma-300M shapes, float32 and bfloat16
    python benchmarks/bench_compile.py --shapes 8x128,32x512

Needs no weights: parameters are abstract (jax.ShapeDtypeStruct), so only XLA's compile is timed
(``jax.jit(...).lower(...).compile()``), the three forms in turn per shape, fresh jit each time.
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
from embgemma_jax.layerwise import LayerPrograms
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


def per_layer_compile_seconds(dtype: str, rows: int, length: int) -> tuple[float, int]:
    """(seconds, number of programs) to compile every per-layer program of one shape, one after the other."""
    cfg = EMBEDDINGGEMMA_300M
    params = param_shapes(cfg)
    layers = [params["encoder"][f"layer_{i}"] for i in range(cfg.num_layers)]
    module = EmbeddingGemmaModule(cfg, jnp.dtype(dtype), "auto", scan_layers=True)
    programs = LayerPrograms(cfg, jnp.dtype(dtype), "auto", module)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    t = time.perf_counter()
    jobs = programs.compile_jobs(params, ids, ids, None, layers=layers)
    for job in jobs:
        job()
    return time.perf_counter() - t, len(jobs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x16,8x128,32x512,4x2048", help="rows x tokens, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_compile.json")
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            r, t = map(int, shape.split("x"))
            unrolled = compile_seconds(False, dtype, r, t)
            scanned = compile_seconds(True, dtype, r, t)
            per_layer, programs = per_layer_compile_seconds(dtype, r, t)
            rows.append(
                {
                    "dtype": dtype,
                    "rows": r,
                    "tokens": t,
                    "unrolled_s": unrolled,
                    "scanned_s": scanned,
                    "per_layer_s": per_layer,
                    "per_layer_programs": programs,
                    "speedup": unrolled / scanned,
                    "per_layer_speedup": unrolled / per_layer,
                }
            )
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})\n")
    print(
        "| dtype | shape | unrolled s | scanned s | per-layer s (programs) | unrolled / scanned "
        "| unrolled / per-layer |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for x in rows:
        print(
            f"| {x['dtype']} | {x['rows']}x{x['tokens']} | {x['unrolled_s']:.2f} | {x['scanned_s']:.2f} "
            f"| {x['per_layer_s']:.2f} ({x['per_layer_programs']}) | {x['speedup']:.1f}x "
            f"| {x['per_layer_speedup']:.1f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
