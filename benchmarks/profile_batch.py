#!/usr/bin/env python
"""XLA profile of one warm batch of a given shape on the CPU: where the reference program's time goes.

    python benchmarks/profile_batch.py --dtype bfloat16 --shape 8x24
    python benchmarks/profile_batch.py --dtype float32 --shape 8x512 --model DIR

Loads the checkpoint (default: the full-size random one that ``bench_encode.py`` builds), places one batch of
``rows x tokens`` real tokens, runs the engine's ``forward`` warm (best of 3 untraced; ``--form``: what the
engine picks for the shape, or every batch per layer or scanned, see ``Engine.uses_layers``), then once
under ``jax.profiler.trace`` and sums the XLA op events by category from the compiled HLO (of the per-layer
programs together, see ``profile_cpu.forward_hlo_text``), with the same
categorizer as ``profile_cpu.py`` (dot fusions per einsum with their GFLOP/s, converts, transposes and
copies, reductions, the scan's slices of the stacked weights, elementwise), plus the 8 costliest ops.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_encode import model_flops_per_text  # noqa: E402
from profile_cpu import forward_hlo_text, hlo_index, trace_summary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "random-full")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="8x24", help="rows x tokens")
    p.add_argument("--form", default="default", choices=["default", "per-layer", "scanned"])
    args = p.parse_args()
    rows, length = (int(x) for x in args.shape.lower().split("x"))

    import jax

    from embgemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype)
    eng = model.engine
    eng.per_layer = {"default": None, "per-layer": True, "scanned": False}[args.form]
    params, table = eng.split_table(model.params)
    ids = np.full((rows, length), 5, np.int32)
    mask = np.ones((rows, length), np.int32)
    d_ids, d_mask = eng.place("forward", ids, mask, count=False)
    emb = eng.gather(table, ids)
    hlo = hlo_index(forward_hlo_text(eng, params, d_ids, d_mask, emb))

    def run() -> float:
        t = time.perf_counter()
        jax.block_until_ready(eng.forward(params, d_ids, d_mask, d_mask, emb).embeddings)
        return time.perf_counter() - t

    run()
    best = min(run() for _ in range(3))
    gflop = rows * model_flops_per_text(length, model.config) / 1e9
    form = "per layer" if eng.uses_layers(rows, length) else "scanned"
    print(f"{args.dtype} {rows}x{length} ({form}): best {best:.3f} s, model {gflop / best:.0f} GFLOP/s")
    trace_dir = Path(tempfile.mkdtemp(prefix="embgemma-batch-profile-"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        wall = run()
    s = trace_summary(trace_dir, hlo, wall)
    print(f"traced {wall:.3f} s; op time {s['op_us_total'] / 1e6:.3f} s; busy {s['op_busy_us'] / 1e6:.3f} s")
    print("share of op time by category:")
    for name, c in s["categories"].items():
        print(f"  {name:28s} {100 * c['share']:5.1f}%  ({c['events']} events)")
    print("dot fusions by einsum:")
    for name, d in s["dot_fusions_by_einsum"].items():
        print(f"  {name:40s} {d['us'] / 1e3:8.1f} ms  {d['gflops']:6.0f} GFLOP/s")
    print("costliest ops:")
    for t in s["top_ops"][:8]:
        print(f"  {t['us'] / 1e3:7.1f} ms x{t['count']} {t['category']:22s} {t['shape']} {t['op_name'][-70:]}")


if __name__ == "__main__":
    main()
