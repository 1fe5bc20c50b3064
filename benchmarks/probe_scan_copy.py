#!/usr/bin/env python
"""The engine's two forms of the encoder on the CPU, side by side in one process: the scanned program
(``Engine.scanned_forward``, what the CPU ran before :mod:`embgemma_jax.layerwise`) and the per-layer
programs (``Engine.layers``, the CPU's default now). Full-size random checkpoint, float32.

    python benchmarks/probe_scan_copy.py

The scanned program's layer scan copies each group's dynamic slice of the stacked weights into a temporary
buffer on every step (one group: 6 x 4.4M parameters, 97 MiB in float32), 4 copies per forward pass. The
per-layer programs take each layer's weights as device arrays over the same buffers instead. For each shape
this compiles both ahead of time and reports XLA's temporary memory (``memory_analysis``; for the per-layer
form, the largest of its programs'), the median time per call, and the largest difference between their
embeddings. It also records the per-layer views' offsets into the stacked weights and the bytes that had to
be copied (0 expected). Writes benchmarks/results/probe_scan_copy.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SHAPES = [(1, 16), (8, 128), (4, 640)]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_ms(fn, n: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50, help="timed calls per form for the 1 x 16 shape (5 above)")
    args = ap.parse_args()
    import jax
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(cached_checkpoint())
    engine = model.engine
    layers = engine.layers
    params, table = engine.split_table(model.params)
    report: dict = {"command": "python benchmarks/probe_scan_copy.py", "shapes": {}}
    for rows, length in SHAPES:
        ids = np.full((rows, length), 5, np.int32)
        d_ids, d_mask = engine.place("forward", ids, np.ones_like(ids), count=False)
        emb = engine.gather(table, ids)
        scan = engine.scanned_forward.lower(params, d_ids, d_mask, d_mask, emb).compile()
        per_layer = [job() for job in layers.compile_jobs(params, d_ids, d_mask, emb)]

        def run_layers(a=(params, d_ids, d_mask, d_mask, emb)):
            return layers.forward(*a).embeddings

        def run_scan(a=(params, d_ids, d_mask, d_mask, emb), program=scan):
            return program(*a).embeddings

        a, b = np.asarray(run_scan()), np.asarray(run_layers())
        n = args.calls if rows * length <= 64 else 5
        row = {
            "temp_mib_scanned": scan.memory_analysis().temp_size_in_bytes / 2**20,
            "temp_mib_per_layer_max": max(c.memory_analysis().temp_size_in_bytes for c in per_layer) / 2**20,
            "per_layer_programs": len(per_layer),
            "ms_scanned": median_ms(run_scan, n),
            "ms_per_layer": median_ms(run_layers, n),
            "max_abs_diff": float(np.abs(a - b).max()),
        }
        report["shapes"][f"{rows}x{length}"] = row
        print(f"{rows}x{length}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)

    views = layers.layers(params["encoder"])
    groups = params["encoder"]["groups"]
    base = jax.tree_util.tree_leaves(groups["layer_0"])[0].unsafe_buffer_pointer()
    period = len(groups)
    offsets = [
        jax.tree_util.tree_leaves(views[i])[0].unsafe_buffer_pointer() - base for i in range(0, len(views), period)
    ]
    report["per_layer_views"] = {
        "copied_bytes": layers.copied_bytes,
        "layer_0_first_leaf_offsets_per_group": offsets,
        "rss_mib_after": rss_mib(),
    }
    print("per-layer views:", report["per_layer_views"])
    out = HERE / "results" / "probe_scan_copy.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
