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
from embgemma_jax.checkpoint.tree import ParamPath, Put
from embgemma_jax.model import resolve_dtype
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


def finish(params: dict[str, Any], quantize: str | None) -> dict[str, Any]:
    """The parameter tree as the model takes it (int8 leaves expanded into ``name`` + ``name_scale``)."""
    return expand_quantized(params) if quantize else params
