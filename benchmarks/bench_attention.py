#!/usr/bin/env python
"""Dense vs banded sliding-window attention on this machine, by sequence length (one layer's attention
at EmbeddingGemma's sizes: 3 query heads, 1 kv head, head dim 256, radius 256).

    python benchmarks/bench_attention.py [--batch 2] [--dtype float32]

Prints a table (ms per call, ratio) and writes benchmarks/results/bench_attention.json. This is what
``masks.use_banded`` (banded from T >= 4 * radius) is checked against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax.config import EMBEDDINGGEMMA_300M
from embgemma_jax.model import Attention

HERE = Path(__file__).resolve().parent


def time_call(f, *args, reps: int = 5) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lengths", default="512,768,1024,1536,2048")
    args = p.parse_args()
    cfg = EMBEDDINGGEMMA_300M
    dt = jnp.dtype(args.dtype)
    from embgemma_jax.masks import attention_mask, banded_mask
    from embgemma_jax.model import rope_tables

    attn = Attention(cfg, "sliding_attention", dt)
    rows = []
    for t in [int(x) for x in args.lengths.split(",")]:
        x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, t, cfg.hidden_size), dt)
        valid = jnp.ones((args.batch, t), bool)
        cos, sin = rope_tables(jnp.arange(t), cfg.head_dim, cfg.rope_local_base, dt)
        params = attn.init(jax.random.PRNGKey(1), x, attention_mask(valid, cfg.window_radius), cos, sin)

        dense = jax.jit(lambda p, x, v, c, s: attn.apply(p, x, attention_mask(v, cfg.window_radius), c, s))
        banded = jax.jit(lambda p, x, v, c, s: attn.apply(p, x, banded_mask(v, cfg.window_radius), c, s))
        a, b = dense(params, x, valid, cos, sin), banded(params, x, valid, cos, sin)
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        td, tb = time_call(dense, params, x, valid, cos, sin), time_call(banded, params, x, valid, cos, sin)
        rows.append(
            {
                "tokens": t,
                "dense_ms": 1e3 * td,
                "banded_ms": 1e3 * tb,
                "dense_over_banded": td / tb,
                "max_abs_diff": err,
            }
        )
        print(
            f"T={t:5d}  dense {1e3 * td:8.1f} ms  banded {1e3 * tb:8.1f} ms  dense/banded {td / tb:5.2f}  "
            f"max|diff| {err:.2e}"
        )
    out = HERE / "results" / f"bench_attention_{args.dtype}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "batch": args.batch,
                "dtype": args.dtype,
                "rows": rows,
                "backend": jax.default_backend(),
                "numpy": np.__version__,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
