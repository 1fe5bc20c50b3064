"""Weight-only int8 quantization of the large matrices (embedding table included).

Each matrix is stored as int8 with one float32 scale per output channel (per row for the embedding
table): ``w ~= q * scale``, ``scale = max|w| / 127`` over the contracted dimensions, symmetric,
round-to-nearest. Matmuls run on ``q`` cast to the compute dtype (exact) with float32 accumulation and
the scale applied to the result, so nothing is dequantized in memory. Norm scales stay float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANT_MODES = (None, "int8")

# Parameter name -> number of leading (contracted) dimensions. The embedding table is quantized per row.
CONTRACTED_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def check_quantize(mode: str | None) -> str | None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; expected one of {list(QUANT_MODES)}")
    return mode


def quantize_matrix(w: np.ndarray, n_contract: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales of the output dims' shape (w.shape[n_contract:])."""
    w = np.asarray(w, dtype=np.float32)
    axes = tuple(range(n_contract))
    scale = np.max(np.abs(w), axis=axes) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_rows(table: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows and one float32 scale per row ([V, D] -> [V, D] int8, [V]), a chunk of rows at a time so
    no float32 temporary of the whole (805 MB) table is made."""
    q = np.empty(table.shape, np.int8)
    scale = np.empty(table.shape[0], np.float32)
    for i in range(0, table.shape[0], chunk):
        q_t, scale[i : i + chunk] = quantize_matrix(table[i : i + chunk].T, 1)  # a row is an output channel
        q[i : i + chunk] = q_t.T
    return q, scale


def quantize_leaf(path: tuple[str, ...], arr: np.ndarray) -> dict[str, np.ndarray] | None:
    """{name: int8, name_scale: f32} for a quantizable parameter at ``path``, else None."""
    name = path[-1]
    if path == ("encoder", "embedding"):
        q, s = quantize_rows(arr)
    elif name in CONTRACTED_DIMS and len(path) >= 2 and path[-2] in ("attn", "mlp"):
        q, s = quantize_matrix(arr, CONTRACTED_DIMS[name])
    elif path[0] == "head" and name.startswith("dense_"):
        q, s = quantize_matrix(arr, 1)
    else:
        return None
    return {name: q, name + "_scale": s}


def is_quantized(params: dict[str, Any]) -> bool:
    return "embedding_scale" in params.get("encoder", {})


class _Quantized(dict):
    """Marker for a leaf replaced by {name: int8, name_scale: f32} during loading."""


def quantizing_put(put=lambda path, a: a):
    """A checkpoint ``put`` callback that quantizes each tensor as it is read (no full float32 copy of the
    model is ever held). Follow the load with :func:`expand_quantized`."""

    def fn(path: tuple[str, ...], arr: np.ndarray) -> Any:
        quantized = quantize_leaf(path, arr)
        if quantized is None:
            return put(path, arr)
        return _Quantized({name: put((*path[:-1], name), a) for name, a in quantized.items()})

    return fn


def expand_quantized(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, _Quantized):
            out.update(value)
        elif isinstance(value, dict):
            out[key] = expand_quantized(value)
        else:
            out[key] = value
    return out
