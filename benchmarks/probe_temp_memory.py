#!/usr/bin/env python
"""XLA's temporary memory for one batch of the reference program, with and without query chunks in the
full-attention layers (``masks.QueryChunks``), on the full-size random checkpoint, float32, CPU.

    python benchmarks/probe_temp_memory.py

Compiles the scanned reference program (``Engine.scanned_forward``, the form the CPU ran before
:mod:`embgemma_jax.layerwise`) ahead of time for a few batch shapes and reads ``compiled.memory_analysis()``
(temporary buffers, arguments, outputs). Then each variant embeds the same 4 documents of 2048 tokens
(stdlib docstrings, batch 4), and the two sets of embeddings are compared bit for bit. ``whole``: every
full-attention layer computes its [B, K, T, G, S] scores at once; ``chunks``: the library's default (256
queries at a time from 1536 tokens on the CPU backend). Each variant runs in its own process. Writes
benchmarks/results/probe_temp_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMBEDDINGS = str(Path(tempfile.gettempdir()) / "probe_temp_memory_{}.npy")
SHAPES = [(8, 512), (8, 1024), (32, 1024), (8, 1280), (8, 1536), (8, 1792), (8, 2048), (32, 2048)]


def worker(variant: str) -> None:
    import numpy as np

    import embgemma_jax.masks as masks

    if variant == "whole":
        masks.GLOBAL_QUERY_CHUNK = 10**9
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma, testing

    model = EmbeddingGemma.from_pretrained(cached_checkpoint())
    engine = model.engine
    params, table = engine.split_table(model.params)
    out = {}
    for rows, length in SHAPES:
        ids = np.zeros((rows, length), np.int32)
        d_ids, d_mask = engine.place("forward", ids, np.ones_like(ids), count=False)
        compiled = engine.scanned_forward.lower(params, d_ids, d_mask, d_mask, engine.gather(table, ids)).compile()
        ma = compiled.memory_analysis()
        out[f"{rows}x{length}"] = {
            "temp_mib": ma.temp_size_in_bytes / 2**20,
            "argument_mib": ma.argument_size_in_bytes / 2**20,
            "output_mib": ma.output_size_in_bytes / 2**20,
        }
    words = " ".join(" ".join(d.split()) for d in testing.stdlib_docstrings()).split(" ")
    docs = [" ".join(words[i * 3000 : (i + 1) * 3000]) for i in range(4)]  # each past the 2048-token window
    emb = model.encode(docs, batch_size=4)
    np.save(EMBEDDINGS.format(variant), emb)
    print(json.dumps(out))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("whole", "chunks"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    results = {}
    for variant in ("whole", "chunks"):
        r = subprocess.run([sys.executable, __file__, "--worker", variant], capture_output=True, text=True, check=True)
        results[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    print("| batch | temp MiB, whole | temp MiB, chunks | ratio |")
    print("|---|---:|---:|---:|")
    for shape in results["whole"]:
        a, b = results["whole"][shape]["temp_mib"], results["chunks"][shape]["temp_mib"]
        print(f"| {shape} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    import numpy as np

    whole, chunks = (np.load(EMBEDDINGS.format(v)) for v in ("whole", "chunks"))
    results["embeddings_bit_identical"] = bool(np.array_equal(whole, chunks))
    results["embeddings_max_abs_diff"] = float(np.abs(whole - chunks).max())
    print(f"4 x 2048-token documents: embeddings bit-identical: {results['embeddings_bit_identical']}")
    out = HERE / "results" / "probe_temp_memory.json"
    out.write_text(json.dumps({"command": "python benchmarks/probe_temp_memory.py", **results}, indent=1) + "\n")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
