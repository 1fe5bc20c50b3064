#!/usr/bin/env python
"""Does a row of an XLA CPU float32 matmul depend on how many rows the matmul has? (Why the server's
coalesced requests are not bit-identical to ``encode`` of their own texts.)

    python benchmarks/probe_row_invariance.py                     # this process's default devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/probe_row_invariance.py

For each of EmbeddingGemma's matmul shapes [M, K] x [K, N] (the key/value projection 768 -> 256, query
768 -> 768, MLP 768 <-> 1152, dense head 768 <-> 3072) and row counts M = rows x padded length of the
planner's batches, it multiplies the first M rows of one random matrix and compares them bit for bit with
the same rows of an 8192-row product. Two compilations of each: XLA's default (YNNPACK fusions on this
jaxlib) and ``xla_cpu_experimental_ynn_fusion_type=""`` (XLA's Eigen matmuls). Prints the row counts whose
rows differ and writes JSON to benchmarks/results/.

Findings on the 2-core CPU (jax 0.10.2), benchmarks/results/probe_row_invariance_{1,8}dev.json:
  * default (YNNPACK): at these widths rows differ only for M = 8 and 16 (against 8192 rows), with one
    host device and with 8 (the test suite's XLA_FLAGS) alike. On the tiny test model's 48-wide matmuls
    they also differed between 1024 and 2048 rows (an ad-hoc whole-model run, not kept: batch 4 against
    8 of 256 tokens), so YNNPACK's kernel choice depends on the widths as well;
  * Eigen, one host device: rows agree from 32 rows up for every shape (the 256-wide one differs below);
  * Eigen, 8 host devices: the 256-, 512- and 768-wide products differ up to 80, 40 and 32 rows: Eigen
    splits small products over the contraction dimension depending on its thread pool, so Eigen-based
    row-invariance would depend on the machine.
  A text's bits also depend on its padded length (the bucket of its batch's longest text). So we promise
  no bit-identity across batch compositions (README, "Serving over HTTP"); a batch-invariant mode would
  need each text padded to its own bucket, at least 32 rows per matmul (the dense head's pooled rows
  too), and kernels whose choice is checked on the real widths on each machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np

SHAPES = [(768, 256), (768, 512), (768, 768), (768, 1152), (1152, 768), (768, 3072), (3072, 768)]
LENGTHS = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 512, 768, 1024, 2048)
VARIANTS = {"default": None, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = sorted({8, 16, 24} | {r * t for r in (1, 2, 4, 8, 16, 32, 64) for t in LENGTHS if r * t <= 8192})
    rng = np.random.default_rng(0)
    devices = len(jax.devices())
    result: dict = {"jax": jax.__version__, "devices": devices, "cpus": os.cpu_count(), "row_counts": rows}
    for name, options in VARIANTS.items():
        matmul = jax.jit(lambda a, b: a @ b, compiler_options=options)
        result[name] = {}
        for k, n in SHAPES:
            x = rng.standard_normal((8192, k)).astype(np.float32)
            w = rng.standard_normal((k, n)).astype(np.float32)
            full = np.asarray(matmul(x, w))
            bad = [m for m in rows if (np.asarray(matmul(x[:m], w)) != full[:m]).any()]
            result[name][f"{k}x{n}"] = bad
            print(f"{name:8s} [M, {k}] x [{k}, {n}]: rows differ at M = {bad or 'none'}", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"probe_row_invariance_{devices}dev.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
