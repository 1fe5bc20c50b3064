"""Errors shared by the loaders, and the one JSON-file reader that raises them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed or not an EmbeddingGemma checkpoint."""


def read_json(path: Path, expect: type = dict) -> Any:
    """Reads a JSON file whose top level must be ``expect`` (an object by default), turning a missing or
    malformed file into a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, expect):
        want = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise CheckpointError(f"{path}: top level must be {want}, got {type(data).__name__}")
    return data
