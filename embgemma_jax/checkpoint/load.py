"""Loading: a local directory or a Hub id, in either format, placed where the caller wants it.

``load_checkpoint`` resolves the name (:func:`resolve`), picks the format (our converted directory or a
sentence-transformers one) and hands every tensor, as it is read, to the placement (``placement.py``:
storage dtype, int8, devices). ``convert`` writes our format from a sentence-transformers checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax

from embgemma_jax.checkpoint import placement
from embgemma_jax.checkpoint.converted import CONVERTED_CONFIG, load_converted, read_converted_config, save_converted
from embgemma_jax.checkpoint.sentence_transformers import backbone_table, load_st_checkpoint, read_st_config
from embgemma_jax.checkpoint.tree import Checkpoint, Put
from embgemma_jax.errors import CheckpointError

__all__ = ["Checkpoint", "backbone_table", "convert", "load_checkpoint", "read_st_config", "resolve", "save_converted"]

HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*/config.json",
    "*/*.safetensors",
]
# The embedding table's path in the parameter tree (the tensor that ``embedding_on_host`` memory-maps).
EMBEDDING_PATH = ("encoder", "embedding")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local checkpoint directory for a path or a Hugging Face Hub model id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    text = str(name_or_path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        local = huggingface_hub.snapshot_download(
            repo_id=text, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except HFValidationError as e:
        raise CheckpointError(f"{text!r} is neither a local directory nor a valid Hub model id: {e}") from e
    except Exception as e:  # network, auth, offline without a cached copy
        raise CheckpointError(
            f"could not get {text!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If you have a local "
            "copy, pass its directory instead."
        ) from e
    return Path(local)


def load_checkpoint(
    name_or_path: str | Path,
    *,
    dtype: Any = "float32",
    quantize: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    fsdp: bool = False,
    on_device: bool = False,
    embedding_on_host: bool = False,
    stacked: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    put: Put | None = None,
) -> Checkpoint:
    """Loads either format from a directory or a Hub id, each tensor placed as it is read.

    Args:
      name_or_path: a sentence-transformers directory, a converted directory, or a Hub id.
      dtype: the compute dtype ("float32" or "bfloat16", or a NumPy/JAX dtype); parameters are stored
        in it (int8 scales stay float32). float16 is refused.
      quantize: None or "int8" (weight-only int8 with per-channel scales; see ``quant.py``).
      mesh: place every parameter on this mesh (replicated, or split with ``fsdp``).
      fsdp: with a mesh, split each parameter along one axis instead of replicating it.
      on_device: without a mesh, True puts the parameters on the default device; False (default) leaves
        them as NumPy arrays in host memory.
      embedding_on_host: keep the embedding table as a read-only memory map of the weights file (an
        ``np.memmap`` in the file's dtype, whatever ``dtype`` says), neither read nor placed: the engine
        gathers the rows a batch uses on the host (see :class:`embgemma_jax.engine.Engine`). Not with
        ``quantize`` or a mesh.
      stacked: return the layers in the scanned layout of :func:`embgemma_jax.model.stack_layers`, each
        tensor written into its stacked array as it is read (host placement only: not with ``on_device``,
        ``quantize``, a mesh or ``put``), so the layers are never held twice.
      revision, cache_dir, token: for a Hub id, passed to ``huggingface_hub.snapshot_download``.
      put: transitional, for callers that still place tensors themselves: called with each tensor cast to
        the storage dtype, instead of the placement that quantize/mesh/fsdp/on_device describe.

    Raises:
      ValueError: a bad dtype, quantize mode or mesh (before any file is read).
      CheckpointError: a missing, malformed or inconsistent checkpoint, naming the file and the problem.
    """
    if embedding_on_host and (quantize or mesh is not None):
        raise ValueError("embedding_on_host=True keeps a float table on the host; it excludes quantize and mesh")
    if stacked and (on_device or quantize or mesh is not None or put is not None):
        raise ValueError("stacked=True places on the host; it excludes on_device, quantize, mesh and put")
    memory_map = {EMBEDDING_PATH} if embedding_on_host else set()
    if put is None:
        put = placement.make_put(dtype=dtype, quantize=quantize, mesh=mesh, fsdp=fsdp, on_device=on_device)
    else:
        store, custom = placement.storage_dtype(dtype), put
        put = lambda path, arr: custom(path, arr.astype(store, copy=False))  # noqa: E731
    directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    converted = (directory / CONVERTED_CONFIG).is_file()
    stacking = None
    if stacked:
        config = read_converted_config(directory) if converted else read_st_config(directory)
        put = stacking = placement.StackingPut(config, put)
    if converted:
        ckpt = load_converted(directory, put=put, memory_map=memory_map)
    elif (directory / "modules.json").is_file():
        ckpt = load_st_checkpoint(directory, put=put, memory_map=memory_map)
    else:
        raise CheckpointError(
            f"{directory} is neither a sentence-transformers directory (no modules.json) nor a converted "
            f"embgemma_jax checkpoint (no {CONVERTED_CONFIG})"
        )
    ckpt.params = placement.finish(ckpt.params, quantize)
    if stacking is not None:
        ckpt.params = stacking.tree(ckpt.params)
    return ckpt


def convert(src: str | Path, out_dir: str | Path, **resolve_kwargs: Any) -> Path:
    """Converts a sentence-transformers checkpoint (directory or Hub id) into our format."""
    directory = resolve(src, **resolve_kwargs)
    if not (directory / "modules.json").is_file():
        raise CheckpointError(f"{directory} is not a sentence-transformers directory (no modules.json)")
    return save_converted(load_st_checkpoint(directory, put=placement.make_put()), out_dir)
