#!/usr/bin/env python
"""What the layer scan's weight slicing costs on the CPU: the scanned program against the same layers
unrolled over separate per-layer weight buffers, full-size random checkpoint, float32, one process.

    python benchmarks/probe_scan_copy.py

The production program scans over the 4 repeating groups of 6 layers with the weights stacked per group
(``model.params["encoder"]["groups"]``); each iteration's dynamic slice of the stacked weights is copied
into a temporary buffer (one group: 6 x 4.4M parameters, 106 MB in float32), i.e. 424 MB copied per
forward pass. For each shape this compiles both programs ahead of time and reports XLA's temporary memory
(``memory_analysis``), the median time per call, and the largest difference between their embeddings.
It also checks whether per-group device arrays built from NumPy views of the stacked arrays alias them
(resident memory before and after), which a program run once per group would need to avoid the copy
without holding the weights twice. Writes benchmarks/results/probe_scan_copy.json.
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
    ap.add_argument("--calls", type=int, default=50, help="timed calls per program for the 1 x 16 shape (5 above)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma
    from embgemma_jax.model import EmbeddingGemmaModule, unstack_layers

    model = EmbeddingGemma.from_pretrained(cached_checkpoint())
    engine = model.engine
    params, table = engine.split_table(model.params)
    # Separate buffers per layer (a copy of the layer weights: only for this comparison).
    layers = jax.block_until_ready(jax.tree_util.tree_map(jnp.array, unstack_layers(params, model.config)))
    unrolled = EmbeddingGemmaModule(model.config, jnp.float32, "auto", scan_layers=False)
    forward_unrolled = jax.jit(
        lambda p, ids, mask, emb: unrolled.apply({"params": p}, ids, mask, mask, embedded=emb).embeddings
    )
    report: dict = {"command": "python benchmarks/probe_scan_copy.py", "shapes": {}}
    for rows, length in SHAPES:
        ids = np.full((rows, length), 5, np.int32)
        d_ids, d_mask = engine.place("forward", ids, np.ones_like(ids), count=False)
        emb = engine.gather(table, ids)
        scan = engine.forward.lower(params, d_ids, d_mask, d_mask, emb).compile()
        unr = forward_unrolled.lower(layers, d_ids, d_mask, emb).compile()
        a = np.asarray(scan(params, d_ids, d_mask, d_mask, emb).embeddings)
        b = np.asarray(unr(layers, d_ids, d_mask, emb))
        n = args.calls if rows * length <= 64 else 5
        row = {
            "temp_mib_scan": scan.memory_analysis().temp_size_in_bytes / 2**20,
            "temp_mib_unrolled": unr.memory_analysis().temp_size_in_bytes / 2**20,
            "ms_scan": median_ms(lambda f=scan, a=(params, d_ids, d_mask, d_mask, emb): f(*a).embeddings, n),
            "ms_unrolled": median_ms(lambda f=unr, a=(layers, d_ids, d_mask, emb): f(*a), n),
            "max_abs_diff": float(np.abs(a - b).max()),
        }
        report["shapes"][f"{rows}x{length}"] = row
        print(f"{rows}x{length}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)

    groups = model.params["encoder"]["groups"]
    before = rss_mib()
    host = jax.tree_util.tree_map(np.asarray, groups)
    per_group = [jax.tree_util.tree_map(lambda x, g=g: jax.device_put(x[g]), host) for g in range(4)]
    jax.block_until_ready(per_group)
    first = jax.tree_util.tree_leaves(groups)[0]
    base = first.unsafe_buffer_pointer()
    offsets = [jax.tree_util.tree_leaves(p)[0].unsafe_buffer_pointer() - base for p in per_group]
    report["per_group_views"] = {
        "rss_growth_mib": rss_mib() - before,
        "group_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(groups)) / 4,
        "first_leaf_offsets": offsets,
    }
    print("per-group arrays from views:", report["per_group_views"])
    out = HERE / "results" / "probe_scan_copy.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
