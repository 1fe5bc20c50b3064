#!/usr/bin/env python
"""What batch-invariant mode costs, and a check that it holds, on one model in one process.

    python benchmarks/bench_invariant.py                       # full-size random checkpoint (built once, cached)
    python benchmarks/bench_invariant.py --tokens 256,512,1024 --cases mixed

Systems, all loaded from the same checkpoint in float32 and run alternating on the same texts:

  default      ``encode(texts, batch_size=--batch-size)``: the usual plan (batches padded to the bucket of
               their longest text, row counts powers of two)
  inv-N        ``from_pretrained(..., batch_invariant=True, invariant_batch_tokens=N)``: every text padded to
               its own bucket, every batch of a bucket N // bucket rows (empty rows fill the last one)

Cases (texts cut from stdlib docstrings with the model's tokenizer, as ``bench_encode.py``): ``queries``
(16 tokens), ``mixed`` (10-600 tokens). After one untimed pass of each system (compilation), ``--repeats``
alternating timed passes; the best counts. Reported per system: texts/s, the ratio to ``default``, the
padding ratio (device tokens / real tokens), and the warm latency of one lone query (median of 5).

The check: for each inv-N system, the first ``--check`` texts encoded one at a time must give exactly the
bits they got inside the whole pass (reported as identical / checked, with the largest difference).
Writes benchmarks/results/bench_invariant_<model>.json.
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

from bench_encode import CASES, build_cases, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="sentence-transformers directory")
    ap.add_argument("--tiny", action="store_true", help="the tiny random checkpoint")
    ap.add_argument("--tokens", default="256,512,1024", help="invariant_batch_tokens values, comma-separated")
    ap.add_argument("--cases", default="queries,mixed")
    ap.add_argument("--count", type=int, default=None, help="texts per case (default: queries 256, mixed 48)")
    ap.add_argument("--batch-size", type=int, default=8, help="the default plan's batch size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check", type=int, default=8, help="texts re-encoded alone per system and case")
    args = ap.parse_args()

    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma

    if args.model is None:
        args.model = cached_checkpoint(tiny=args.tiny)
    cases = [c for c in args.cases.split(",") if c]
    defaults = {"queries": 256, "mixed": 48}
    counts = {name: (args.count or defaults.get(name, spec[2])) for name, spec in CASES.items()}
    texts_by_case = {c: t for c, t in build_cases(args.model, counts).items() if c in cases}

    systems = {"default": EmbeddingGemma.from_pretrained(args.model)}
    for n in (int(x) for x in args.tokens.split(",") if x):
        systems[f"inv-{n}"] = EmbeddingGemma.from_pretrained(args.model, batch_invariant=True, invariant_batch_tokens=n)

    report: dict = {"machine": machine(), "model": str(args.model), "args": vars(args) | {"model": str(args.model)}}
    for case, texts in texts_by_case.items():
        real = sum(len(x) for x in systems["default"].tokenizer.encode(texts))
        runs: dict[str, dict] = {name: {"seconds": []} for name in systems}

        def one_pass(name: str, texts=texts, runs=runs) -> tuple[float, np.ndarray]:
            m = systems[name]
            before = dict(m.engine.stats)
            t0 = time.perf_counter()
            out = m.encode(texts, batch_size=args.batch_size)
            dt = time.perf_counter() - t0
            runs[name]["padding"] = (m.engine.stats["device_tokens"] - before["device_tokens"]) / (
                m.engine.stats["real_tokens"] - before["real_tokens"]
            )
            return dt, out

        outs = {name: one_pass(name)[1] for name in systems}  # untimed: compiles
        for _ in range(args.repeats):
            for name in systems:
                runs[name]["seconds"].append(one_pass(name)[0])
        query = texts_by_case.get("queries", texts)[0]
        for name, m in systems.items():
            m.encode([query])
            lat = []
            for _ in range(5):
                t0 = time.perf_counter()
                m.encode([query])
                lat.append(time.perf_counter() - t0)
            runs[name]["lone_query_s"] = float(np.median(lat))
            if name != "default":
                alone = np.stack([m.encode([t])[0] for t in texts[: args.check]])
                got = outs[name][: args.check]
                runs[name]["identical_alone"] = f"{int((alone == got).all(axis=1).sum())}/{len(alone)}"
                runs[name]["max_diff_alone"] = float(np.abs(alone - got).max())
            runs[name]["max_diff_vs_default"] = float(np.abs(outs[name] - outs["default"]).max())
        base = min(runs["default"]["seconds"])
        for r in runs.values():
            best = min(r["seconds"])
            r["texts_per_s"] = len(texts) / best
            r["real_tokens_per_s"] = real / best
            r["vs_default"] = base / best
        report[case] = {"texts": len(texts), "real_tokens": real, "systems": runs}

        print(f"\n{case}: {len(texts)} texts, {real} real tokens, default batch size {args.batch_size}")
        head = ("system", "texts/s", "vs default", "padding", "lone query", "alone == batch")
        print(f"{head[0]:<10} {head[1]:>8} {head[2]:>10} {head[3]:>8} {head[4]:>11} {head[5]:>15}")
        for name, r in runs.items():
            same = r.get("identical_alone", "-")
            print(
                f"{name:<10} {r['texts_per_s']:8.2f} {r['vs_default']:9.2f}x {r['padding']:7.2f}x "
                f"{r['lone_query_s'] * 1000:9.0f}ms {same:>15}"
            )

    out = HERE / "results" / f"bench_invariant_{args.model.name}.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
