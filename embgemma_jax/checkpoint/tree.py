"""The loaded-checkpoint record and the parameter-tree paths that every format shares."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.errors import CheckpointError
from embgemma_jax.similarity import SIMILARITY_FN_NAMES

ParamPath = tuple[str, ...]
# What a loader does with each tensor once it is read and in our layout: returns what the tree stores
# (a NumPy array, a device array, or an int8 + scale pair; see placement.py).
Put = Callable[[ParamPath, np.ndarray], Any]

# Pickle checkpoints are never loaded (unpickling runs arbitrary code); these names get a clear refusal.
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: config, parameter pytree (host or device arrays) and metadata."""

    config: EmbeddingGemmaConfig
    params: dict[str, Any]
    prompts: dict[str, str]
    default_prompt_name: str | None
    tokenizer_dir: Path
    source: Path
    similarity_fn_name: str | None = None  # from config_sentence_transformers.json; None: not given (cosine)


def check_similarity_fn_name(value: Any, path: Path) -> str | None:
    """A checkpoint's ``similarity_fn_name`` (None if absent), refused by name if it is not one we compute."""
    if value is None or value in SIMILARITY_FN_NAMES:
        return value
    raise CheckpointError(f"{path}: similarity_fn_name {value!r} is not one of {list(SIMILARITY_FN_NAMES)}")


def set_path(tree: dict[str, Any], path: ParamPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten(tree: dict[str, Any], prefix: ParamPath = ()) -> Iterator[tuple[ParamPath, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def layer_indices(names: Iterable[str], pattern: str) -> set[int]:
    """The distinct layer numbers among tensor ``names`` (``pattern`` captures the number), e.g. to bound a
    config's layer count by the layers a weights file actually holds."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for name in names if (m := regex.match(name))}
