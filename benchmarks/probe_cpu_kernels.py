#!/usr/bin/env python
"""XLA's CPU kernels against YNNPACK's library fusions for the encoder's programs, one process, full-size
random checkpoint.

    python benchmarks/probe_cpu_kernels.py                          # float32 and bfloat16
    python benchmarks/probe_cpu_kernels.py --dtypes float32 --shapes 8x512

XLA's CPU backend hands dots, reductions and elementwise chains to YNNPACK ("library fusions") by default;
``xla_cpu_experimental_ynn_fusion_type`` empty keeps them in XLA's own kernels. Per dtype and batch shape
this compiles, with and without that option, one sliding and one full layer program of
:mod:`embgemma_jax.layerwise` (the per-layer form) and the scanned forward program (``Engine._forward``),
and times them (best of ``--calls``, the variants alternating), with the largest difference of each program's
output against the default's. The engine uses XLA's kernels for the float32 layer programs of long rows
and the float32 scanned programs, and YNNPACK everywhere else (``layerwise.xla_kernel_options``).
Writes benchmarks/results/probe_cpu_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def programs(eng, lp, opts, params, layers, x, given, d_ids, d_mask, emb) -> dict:
    """Calls of one sliding and one full layer program and of the scanned forward, compiled with ``opts``."""
    import jax

    given_layer = jax.jit(lp._layer_given, **opts)
    own_layer = jax.jit(lp._layer, static_argnames=("layer_type",), **opts)

    def layer(i: int, kind: str, layer_type: str):
        if kind in given:  # a plain mask from prepare
            return lambda: given_layer(layers[i], x, *given[kind])
        return lambda: own_layer(layers[i], x, d_mask, None, layer_type=layer_type)  # banded or chunked

    g = jax.jit(eng._forward, **opts)
    return {
        "sliding layer": layer(0, "sliding", "sliding_attention"),
        "full layer": layer(5, "full", "full_attention"),
        "scanned forward": lambda: g(params, d_ids, d_mask, d_mask, emb).embeddings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default="8x32,8x256,4x2048", help="rows x tokens, comma-separated")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "probe_cpu_kernels.json")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma

    results = []
    for dtype in args.dtypes.split(","):
        model = EmbeddingGemma.from_pretrained(cached_checkpoint(), dtype=dtype)
        eng, lp = model.engine, model.engine.layers
        params, table = eng.split_table(model.params)
        enc = params["encoder"]
        layers = lp.layers(enc)
        for shape in args.shapes.split(","):
            rows, length = (int(v) for v in shape.lower().split("x"))
            ids = np.full((rows, length), 7, np.int32)
            d_ids, d_mask = eng.place("forward", ids, np.ones_like(ids), count=False)
            emb = eng.gather(table, ids)
            x, given = lp.prepare(lp.table_params(enc, emb), d_ids, d_mask, None, emb)
            variants = {"ynnpack": {}, "xla": {"compiler_options": NO_YNN}}
            calls = {
                name: programs(eng, lp, opts, params, layers, x, given, d_ids, d_mask, emb)
                for name, opts in variants.items()
            }
            for program in ("sliding layer", "full layer", "scanned forward"):
                outs, times = {}, {name: [] for name in variants}
                for name in variants:
                    outs[name] = np.asarray(jax.block_until_ready(calls[name][program]()).astype(jnp.float32))
                for _ in range(args.calls):
                    for name in variants:
                        t = time.perf_counter()
                        jax.block_until_ready(calls[name][program]())
                        times[name].append(time.perf_counter() - t)
                r = {
                    "dtype": dtype,
                    "shape": [rows, length],
                    "program": program,
                    "ynnpack_ms": min(times["ynnpack"]) * 1e3,
                    "xla_ms": min(times["xla"]) * 1e3,
                    "max_abs_diff": float(np.abs(outs["xla"] - outs["ynnpack"]).max()),
                    "max_abs": float(np.abs(outs["ynnpack"]).max()),
                }
                r["ynnpack_over_xla"] = r["ynnpack_ms"] / r["xla_ms"]
                results.append(r)
                print(
                    f"{dtype} {rows}x{length} {program:15s}: YNNPACK {r['ynnpack_ms']:8.1f} ms, "
                    f"XLA {r['xla_ms']:8.1f} ms ({r['ynnpack_over_xla']:.2f}x); "
                    f"max |diff| {r['max_abs_diff']:.2e} of max |out| {r['max_abs']:.1f}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"jax": jax.__version__, "calls": args.calls, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
