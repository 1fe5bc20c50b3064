#!/usr/bin/env python
"""bfloat16 per-layer weights as bfloat16 views against uint16 bit views, one process, alternating.

    python benchmarks/probe_bf16_views.py                 # shapes 8x16, 8x32, 8x128
    python benchmarks/probe_bf16_views.py --shapes 8x64 --calls 20

The scanned program takes a bfloat16 model's stacked weights as uint16 bits (``Engine.split_table``,
``model.from_bits``): XLA's CPU backend otherwise converts every stacked bfloat16 array to float32 on each
call. The per-layer programs (:mod:`embgemma_jax.layerwise`) take each layer's weights as views of those
stacks; this times the 24 layer calls of one batch (full-size random checkpoint) with the views as bfloat16
(what ``LayerPrograms.layers`` places) and as the uint16 bits (which the layer converts back, a copy per call),
checks that both give the same bits, and writes benchmarks/results/probe_bf16_views.json.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x16,8x32,8x128", help="rows x tokens, comma-separated")
    ap.add_argument("--calls", type=int, default=15, help="timed passes per form and shape (alternating)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "probe_bf16_views.json")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma
    from embgemma_jax.model import _kind

    model = EmbeddingGemma.from_pretrained(cached_checkpoint(), dtype="bfloat16")
    eng = model.engine
    params, table = eng.split_table(model.params)
    lp, enc = eng.layers, params["encoder"]
    views = lp.layers(enc)
    bits = [
        jax.tree_util.tree_map(
            lambda a: jax.device_put(np.asarray(a).view(np.uint16)) if a.dtype == jnp.bfloat16 else a, layer
        )
        for layer in views
    ]
    kinds = [_kind(t) for t in model.config.layer_types]
    rows_out = []
    for shape in args.shapes.split(","):
        rows, length = (int(v) for v in shape.lower().split("x"))
        if length >= 768:
            raise SystemExit(f"{shape}: this probe runs the given-mask layer program (below 768 tokens)")
        ids = np.full((rows, length), 5, np.int32)
        d_ids, d_mask = eng.place("forward", ids, np.ones_like(ids), count=False)
        emb = eng.gather(table, ids)
        x0, given = lp.prepare(lp.table_params(enc, emb), d_ids, d_mask, None, emb)

        def run(layers, x0=x0, given=given):
            t = time.perf_counter()
            x = x0
            for w, kind in zip(layers, kinds, strict=True):
                x = lp.layer_given(w, x, *given[kind])
            jax.block_until_ready(x)
            return time.perf_counter() - t, x

        same = bool(np.array_equal(np.asarray(run(views)[1], np.float32), np.asarray(run(bits)[1], np.float32)))
        t_views, t_bits = [], []
        for _ in range(args.calls):
            t_views.append(run(views)[0])
            t_bits.append(run(bits)[0])
        r = {
            "shape": [rows, length],
            "bfloat16_views_ms": float(np.median(t_views) * 1e3),
            "uint16_bits_ms": float(np.median(t_bits) * 1e3),
            "same_bits": same,
        }
        r["bits_over_views"] = r["uint16_bits_ms"] / r["bfloat16_views_ms"]
        rows_out.append(r)
        print(
            f"{rows}x{length}: bfloat16 views {r['bfloat16_views_ms']:.1f} ms, uint16 bits {r['uint16_bits_ms']:.1f} ms"
            f" ({r['bits_over_views']:.2f}x), same bits: {same}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"jax": jax.__version__, "calls": args.calls, "shapes": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
