"""Our converted format: ``embgemma_config.json`` (the whole config and the prompts) next to
``params.safetensors`` (float32, our layout, one tensor per parameter path joined by ``/``) and the
tokenizer files. Written by ``embgemma-jax convert``; loaded with the same header-first checks as the
sentence-transformers layout.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from embgemma_jax.checkpoint.safetensors_file import SafetensorsFile
from embgemma_jax.checkpoint.tree import (
    Checkpoint,
    ParamPath,
    Put,
    check_similarity_fn_name,
    flatten,
    layer_indices,
    set_path,
)
from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.errors import CheckpointError, read_json

FORMAT_NAME = "embgemma_jax"
FORMAT_VERSION = 1
CONVERTED_CONFIG = "embgemma_config.json"
CONVERTED_PARAMS = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_converted(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Writes ``embgemma_config.json`` + ``params.safetensors`` + the tokenizer files into ``out_dir``.

    Files get the permissions of any new file (``0666`` less the umask), as the tokenizer copies do.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"/".join(p): np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for p, v in flatten(ckpt.params)}
    tmp = out_dir / (CONVERTED_PARAMS + ".tmp")
    # safetensors writes its files 0600. Create the file as open() would, to learn the mode the umask gives
    # (reading the umask itself means setting it, which races with other threads), and restore it after.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    os.chmod(tmp, mode)
    tmp.replace(out_dir / CONVERTED_PARAMS)
    for name in TOKENIZER_FILES:
        src = ckpt.tokenizer_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "prompts": ckpt.prompts,
        "default_prompt_name": ckpt.default_prompt_name,
        "similarity_fn_name": ckpt.similarity_fn_name or "cosine",
    }
    (out_dir / CONVERTED_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _read_meta(directory: Path) -> tuple[EmbeddingGemmaConfig, dict[str, str], str | None, str | None]:
    path = directory / CONVERTED_CONFIG
    meta = read_json(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION}); re-run the conversion"
        )
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: 'config' must be an object")
    try:
        cfg = EmbeddingGemmaConfig.from_dict(meta["config"])
    except (CheckpointError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    prompts, default = meta.get("prompts") or {}, meta.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise CheckpointError(f"{path}: prompts must map names to strings")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return cfg, dict(prompts), default, check_similarity_fn_name(meta.get("similarity_fn_name"), path)


def read_converted_config(directory: str | Path) -> EmbeddingGemmaConfig:
    """The config of a converted directory (no tensor is read)."""
    return _read_meta(Path(directory))[0]


def load_converted(
    directory: str | Path, *, put: Put | None = None, memory_map: Collection[ParamPath] = ()
) -> Checkpoint:
    """Loads a converted directory; ``put`` and ``memory_map`` as in :func:`load_st_checkpoint`. Every
    tensor's name, dtype and shape are checked against the config from the header before any is read."""
    from embgemma_jax.model import param_shapes

    directory = Path(directory)
    cfg, prompts, default, similarity = _read_meta(directory)
    config_path, path = directory / CONVERTED_CONFIG, directory / CONVERTED_PARAMS
    params: dict[str, Any] = {}
    with SafetensorsFile(path) as f:
        held = len(layer_indices(f.tensors, r"encoder/layer_(\d+)/"))
        if cfg.num_layers > held:
            raise CheckpointError(f"{config_path}: num_layers={cfg.num_layers} but {path} holds {held} layers")
        expected = {"/".join(p): tuple(s.shape) for p, s in flatten(param_shapes(cfg))}
        for name in f.tensors:
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in {path}")
            f.check_tensor(name, expected[name])
        missing = [name for name in expected if name not in f.tensors]
        if missing:
            raise CheckpointError(f"missing tensors in {path}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for name in f.tensors:
            ours = tuple(name.split("/"))
            if ours in memory_map:
                set_path(params, ours, f.memory_map(name))
                continue
            arr = f.read(name)
            set_path(params, ours, put(ours, arr) if put is not None else arr)
    return Checkpoint(cfg, params, prompts, default, directory, directory, similarity)
