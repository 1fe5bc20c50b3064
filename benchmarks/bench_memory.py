#!/usr/bin/env python
"""Resident memory of a fresh process: after loading, and after encoding one batch, ours against
sentence-transformers (float32, CPU), each in its own process.

    python benchmarks/bench_memory.py                  # full-size random checkpoint, 8 mixed texts, batch 8
    python benchmarks/bench_memory.py --model DIR --texts 32 --batch-size 32

Reads ``VmRSS`` (now) and ``VmHWM`` (peak so far) from ``/proc/self/status`` after imports, after loading
and after one ``encode`` of the first ``--texts`` texts of ``bench_encode.py``'s mixed case. JSON in
benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r"""
import json, sys
from pathlib import Path

def mem():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out

system, model_dir, n, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from bench_encode import build_cases
texts = build_cases(Path(model_dir), {"queries": 0, "mixed": n, "long": 0})["mixed"]
if system == "st":
    import torch
    from sentence_transformers import SentenceTransformer
    report = {"import": mem()}
    model = SentenceTransformer(model_dir, device="cpu")
else:
    from embgemma_jax import EmbeddingGemma
    report = {"import": mem()}
    model = EmbeddingGemma.from_pretrained(model_dir)
report["load"] = mem()
model.encode(texts, batch_size=batch_size)
report["encode"] = mem()
print(json.dumps(report))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "random-full")
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_memory.json")
    args = p.parse_args()
    if not (args.model / "modules.json").is_file():
        raise SystemExit(f"{args.model}: no checkpoint (run benchmarks/bench_encode.py once to build it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBGEMMA_COMPILATION_CACHE": "off"}
    report = {}
    for system in ("st", "jax"):
        out = subprocess.run(
            [sys.executable, "-c", WORKER, system, str(args.model), str(args.texts), str(args.batch_size), str(HERE)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        report[system] = json.loads(out.stdout.strip().splitlines()[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "texts": args.texts, **report}, indent=2))
    print(f"MiB, float32, {args.texts} mixed texts at batch size {args.batch_size}, fresh process per system:\n")
    print("| system | after load (now / peak) | after encode (now / peak) |")
    print("|---|---:|---:|")
    for system, r in report.items():
        load, enc = r["load"], r["encode"]
        print(f"| {system} | {load['VmRSS']:.0f} / {load['VmHWM']:.0f} | {enc['VmRSS']:.0f} / {enc['VmHWM']:.0f} |")


if __name__ == "__main__":
    main()
