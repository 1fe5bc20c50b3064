#!/usr/bin/env python
"""A fresh process's first single-query encode, ours against sentence-transformers, in one run.

    python benchmarks/bench_first_query.py                 # the full-size random checkpoint, 3 rounds
    python benchmarks/bench_first_query.py --model DIR --rounds 5

Each round starts one new Python process per system (float32, CPU) that imports the library, loads the
model, then times ``encode`` of one short query (the first, with whatever compilation it needs), then a
second query, then a prompted query (``encode_query``: a new shape for us). Systems: ``st`` (sentence-
transformers), ``jax`` (ours, defaults) and ``jax-cache`` (ours with a persistent compilation cache that
the first round fills: the second process onward loads its programs). Reports the median over rounds; JSON in
benchmarks/results/bench_first_query.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
system, model_dir, cache = sys.argv[1], sys.argv[2], sys.argv[3]
if system == "st":
    import torch
    from sentence_transformers import SentenceTransformer
    t1 = time.perf_counter()
    model = SentenceTransformer(model_dir, device="cpu")
    query = lambda text: model.encode_query(text)
else:
    from embgemma_jax import EmbeddingGemma
    t1 = time.perf_counter()
    kw = {}
    if system == "jax-cache":
        kw["compilation_cache_dir"] = cache
    model = EmbeddingGemma.from_pretrained(model_dir, **kw)
    query = model.encode_query
t2 = time.perf_counter()
model.encode("What is the capital of France?")
t3 = time.perf_counter()
model.encode("Which planet is known as the Red Planet?")
t4 = time.perf_counter()
query("How do I bake sourdough bread?")
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "second_s": t4 - t3,
                  "first_prompted_s": t5 - t4}))
"""

SYSTEMS = ("st", "jax", "jax-cache")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "random-full")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_first_query.json")
    args = p.parse_args()
    if not (args.model / "modules.json").is_file():
        raise SystemExit(f"{args.model}: no checkpoint (run benchmarks/bench_encode.py once to build it)")
    env = {"PYTHONPATH": str(ROOT), "EMBGEMMA_COMPILATION_CACHE": "off"}
    import os

    env = {**os.environ, **env}
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            for system in SYSTEMS:
                out = subprocess.run(
                    [sys.executable, "-c", WORKER, system, str(args.model), cache],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                runs[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model": str(args.model), "rounds": args.rounds, "median": summary, "runs": runs}, indent=2)
    )
    print(f"median of {args.rounds} fresh processes per system (float32, CPU):\n")
    print("| system | load s | first query s | second query s | first prompted query s |")
    print("|---|---:|---:|---:|---:|")
    for s, m in summary.items():
        print(f"| {s} | {m['load_s']:.2f} | {m['first_s']:.2f} | {m['second_s']:.3f} | {m['first_prompted_s']:.2f} |")


if __name__ == "__main__":
    main()
