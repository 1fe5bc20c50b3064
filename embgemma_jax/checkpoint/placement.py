"""Placement on load: each tensor, as soon as it is read, gets its storage dtype, is quantized if asked,
and goes to its devices, so the whole model is never held twice (in float32 and in its final form).

* Storage dtype follows the compute dtype: float32 parameters for ``"float32"`` (exact parity),
  bfloat16 for ``"bfloat16"``. int8 scales (``*_scale``) always stay float32.
* ``quantize="int8"``: the large matrices and the embedding table become int8 + per-channel scales
  (:mod:`embgemma_jax.quant`), each from the tensor as read.
* Devices: NumPy arrays in host memory (the default; the float64 oracle and conversion want these),
  the default device (``on_device=True``), or a mesh with :func:`embgemma_jax.sharding.param_sharding`
  (replicated, or split with ``fsdp``).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np

from embgemma_jax import sharding
from embgemma_jax.checkpoint.safetensors_file import aligned_empty
from embgemma_jax.checkpoint.tree import ParamPath, Put, set_path
from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.errors import CheckpointError
from embgemma_jax.model import layer_number, layer_period, resolve_dtype, stacked_slot
from embgemma_jax.quant import check_quantize, expand_quantized, quantizing_put


def storage_dtype(dtype: Any) -> np.dtype:
    """The dtype parameters are stored in for a compute dtype ("float32"/"bfloat16", or a NumPy/JAX
    dtype); raises ValueError on anything else (float16 with the reason)."""
    return np.dtype(np.float32) if resolve_dtype(dtype) == np.float32 else np.dtype(ml_dtypes.bfloat16)


def make_put(
    *,
    dtype: Any = "float32",
    quantize: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    fsdp: bool = False,
    on_device: bool = False,
) -> Put:
    """The per-tensor ``put`` a loader calls with (path in our tree, array as read). Checks every argument
    here, before a file is opened. After loading with a quantizing put, call :func:`finish`."""
    store = storage_dtype(dtype)
    check_quantize(quantize)
    if fsdp and mesh is None:
        raise ValueError("fsdp=True needs a mesh, e.g. mesh=embgemma_jax.sharding.make_mesh()")
    if mesh is not None:
        sharding.data_size(mesh)  # raises unless the mesh has a "data" axis
    on_device = on_device or mesh is not None

    def put(path: ParamPath, arr: np.ndarray) -> Any:
        if arr.dtype.kind == "f" or arr.dtype == ml_dtypes.bfloat16:
            arr = arr.astype(np.float32 if path[-1].endswith("_scale") else store, copy=False)
        if not on_device:
            return arr
        if mesh is None:
            return jax.device_put(arr)
        return jax.device_put(arr, sharding.param_sharding(mesh, arr.shape, fsdp=fsdp))

    return quantizing_put(put) if quantize else put


class StackingPut:
    """A put for host placement that writes each layer's tensor straight into its slot of the scanned
    layout (:func:`embgemma_jax.model.stack_layers`): one 64-byte aligned host array per stacked parameter,
    which ``jax.device_put`` then uses in place on the CPU backend. The layers are never held twice (per
    layer and stacked): that double, freed after loading but kept by the allocator, made 450 MB of a
    float32 load's resident set. Other tensors go through ``put``, which must return NumPy arrays.

    After loading, :meth:`tree` turns the loader's tree into the stacked one, and raises CheckpointError
    if a layer's tensor never arrived (its slot would hold uninitialized memory)."""

    def __init__(self, config: EmbeddingGemmaConfig, put: Put) -> None:
        self.config, self.put = config, put
        self.groups = config.num_layers // layer_period(config)
        self.stacks: dict[ParamPath, np.ndarray] = {}
        self.filled: dict[ParamPath, set[int]] = {}

    def __call__(self, path: ParamPath, arr: np.ndarray) -> Any:
        slot = stacked_slot(path, self.config)
        if slot is None:
            return self.put(path, arr)
        key, g = slot
        arr = self.put(path, arr)
        buf = self.stacks.get(key)
        if buf is None:
            buf = self.stacks[key] = aligned_empty((self.groups, *arr.shape), arr.dtype)
            self.filled[key] = set()
        if buf.shape[1:] != arr.shape or buf.dtype != arr.dtype:
            raise CheckpointError(f"{'/'.join(path)}: {arr.dtype}{arr.shape} differs from the other layers'")
        buf[g] = arr
        self.filled[key].add(g)
        return None

    def tree(self, params: dict[str, Any]) -> dict[str, Any]:
        """The loaded tree with its per-layer entries replaced by the stacked arrays."""
        # Every position of the group holds the same parameters, each filled for every group.
        names = {key[3:] for key in self.stacks}
        for j in range(layer_period(self.config)):
            for name in sorted(names):
                key = ("encoder", "groups", f"layer_{j}", *name)
                got = self.filled.get(key, set())
                if len(got) != self.groups:
                    missing = sorted(set(range(self.groups)) - got)
                    raise CheckpointError(f"{'/'.join(key)}: no tensor for layer group(s) {missing}")
        encoder = {k: v for k, v in params["encoder"].items() if layer_number(k) is None}
        out = {**params, "encoder": encoder}
        for key, buf in self.stacks.items():
            set_path(out, key, buf)
        return out


def finish(params: dict[str, Any], quantize: str | None) -> dict[str, Any]:
    """The parameter tree as the model takes it (int8 leaves expanded into ``name`` + ``name_scale``)."""
    return expand_quantized(params) if quantize else params
