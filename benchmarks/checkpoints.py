"""The random checkpoints the benchmarks share, built once under ``benchmarks/.cache``.

``random-full``: the exact google/embeddinggemma-300m architecture and sizes, random weights, an
8000-piece SentencePiece tokenizer (:func:`embgemma_jax.testing.build_full_size_random_checkpoint`).
``tiny``: the tiny test model with a 256-token window.
"""

from __future__ import annotations

import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"


def cached_checkpoint(tiny: bool = False) -> Path:
    """The directory of the tiny or full-size random checkpoint, built on first use."""
    from embgemma_jax import testing

    path = CACHE / ("tiny" if tiny else "random-full")
    if not (path / "modules.json").is_file():
        print("building a random checkpoint in", path, file=sys.stderr)
        if tiny:
            testing.build_tiny_checkpoint(path, max_seq_length=256, max_position_embeddings=256)
        else:
            testing.build_full_size_random_checkpoint(path)
    return path
