#!/usr/bin/env python
"""Device tokens over real tokens that the batch planner produces for the benchmark's texts (no model run).

    python benchmarks/bench_padding.py                         # the GPU benchmark's cases (scale 16)
    python benchmarks/bench_padding.py --scale 1 --token-budget 8192 --batch-size 256

Uses bench_encode's corpus (stdlib docstrings cut by token count with the checkpoint's tokenizer) and the
planner of embgemma_jax.batching: packed rows with a token budget (throughput mode), padded batches
without. Deterministic: the same numbers as model.engine.stats on a real run with the same settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_encode import CASES, build_cases  # noqa: E402
from embgemma_jax import batching  # noqa: E402
from embgemma_jax.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / ".cache" / "random-full")
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--token-budget", type=int, default=65536, help="0: padded batches (no packing)")
    args = p.parse_args()
    if not (args.model / "tokenizer.model").is_file():
        from embgemma_jax import testing

        testing.build_full_size_random_checkpoint(args.model)
    cases = build_cases(args.model, {name: c * args.scale for name, (_, _, c) in CASES.items()})
    tok = Tokenizer.from_dir(args.model, max_length=2048)
    print("| case | texts | real tokens | device tokens | ratio | shapes |\n|---|---:|---:|---:|---:|---|")
    for name, texts in cases.items():
        real = device = 0
        shapes = set()
        if args.token_budget:
            for _, b in batching.packed_batches(tok, texts, args.batch_size, args.token_budget):
                real += int((b.segment_ids > 0).sum())
                device += b.input_ids.size
                shapes.add(b.input_ids.shape)
        else:
            for _, b in batching.padded_batches(tok, texts, args.batch_size):
                real += int(b["attention_mask"].sum())
                device += b["input_ids"].size
                shapes.add(b["input_ids"].shape)
        print(f"| {name} | {len(texts)} | {real} | {device} | {device / real:.3f}x | {sorted(shapes)} |")


if __name__ == "__main__":
    main()
