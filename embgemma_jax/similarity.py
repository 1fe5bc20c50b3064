"""Similarity functions, with sentence-transformers' names and definitions.

=============  ==============================================  ==========================================
name           ``similarity(a, b)[i, j]``                      note
=============  ==============================================  ==========================================
``cosine``     ``a_i / max(|a_i|, 1e-12) . b_j / max(...)``    as ``torch.nn.functional.normalize``
``dot``        ``a_i . b_j``
``euclidean``  ``-|a_i - b_j|_2``                              a NEGATIVE distance: larger is more similar
``manhattan``  ``-|a_i - b_j|_1``                              a NEGATIVE distance: larger is more similar
=============  ==============================================  ==========================================

``similarity_pairwise(a, b)[i]`` is the same function of ``a[i]`` and ``b[i]``. Inputs are NumPy, JAX or
anything ``np.asarray`` takes; a 1-D vector counts as one row in :func:`similarity`. Scores are float32
(float64 for float64 inputs), NumPy.

Deviation from the reference: distances are computed directly from the differences (in row blocks of
bounded memory). ``torch.cdist``, which the reference uses for the matrix form, switches to the expansion
``|a|^2 + |b|^2 - 2 a.b`` when either side has more than 25 rows, which loses precision for near-equal
vectors (up to about 7e-4 instead of 0 for identical unit vectors in float32); away from that cancellation the
two agree to float32 rounding.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

SIMILARITY_FN_NAMES = ("cosine", "dot", "euclidean", "manhattan")

# Elements of one block of differences [rows, len(b), dim] in the distance functions (128 MB in float32).
_BLOCK_ELEMENTS = 1 << 25


def check_similarity_fn_name(name: Any) -> str:
    """``name`` (a str, or an enum such as sentence-transformers' ``SimilarityFunction``, by its value) if it
    is one of :data:`SIMILARITY_FN_NAMES`; raises ValueError listing them otherwise."""
    value = name.value if isinstance(name, enum.Enum) else name
    if not isinstance(value, str) or value not in SIMILARITY_FN_NAMES:
        raise ValueError(f"similarity_fn_name must be one of {list(SIMILARITY_FN_NAMES)}, got {name!r}")
    return value


def _as_array(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.float64:
        a = a.astype(np.float32)
    if a.ndim not in (1, 2):
        raise ValueError(f"{what} must be a vector [dim] or a matrix [n, dim], got shape {a.shape}")
    return a


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), x.dtype.type(1e-12))


def _negative_distances(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.result_type(a, b))
    rows = max(1, _BLOCK_ELEMENTS // max(1, b.shape[0] * a.shape[1]))
    for start in range(0, a.shape[0], rows):
        diff = a[start : start + rows, None, :] - b[None, :, :]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)) if p == 2 else np.abs(diff).sum(axis=-1)
        out[start : start + rows] = -dist
    return out


def similarity(a: Any, b: Any, name: str = "cosine") -> np.ndarray:
    """The [len(a), len(b)] matrix of ``name`` similarities (see the module docstring)."""
    name = check_similarity_fn_name(name)
    a, b = np.atleast_2d(_as_array(a, "embeddings1")), np.atleast_2d(_as_array(b, "embeddings2"))
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding widths differ: {a.shape[-1]} vs {b.shape[-1]}")
    if name == "cosine":
        return _normalize(a) @ _normalize(b).T
    if name == "dot":
        return a @ b.T
    return _negative_distances(a, b, 2 if name == "euclidean" else 1)


def similarity_pairwise(a: Any, b: Any, name: str = "cosine") -> np.ndarray:
    """``name`` similarity of ``a[i]`` and ``b[i]`` for each i: [n] (rows broadcast as NumPy does)."""
    name = check_similarity_fn_name(name)
    a, b = _as_array(a, "embeddings1"), _as_array(b, "embeddings2")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding widths differ: {a.shape[-1]} vs {b.shape[-1]}")
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"pairwise similarity needs as many rows on both sides, got {a.shape} and {b.shape}") from None
    if name == "cosine":
        a, b = _normalize(a), _normalize(b)
    if name in ("cosine", "dot"):
        return (a * b).sum(axis=-1)
    diff = a - b
    return -np.sqrt(np.square(diff).sum(axis=-1)) if name == "euclidean" else -np.abs(diff).sum(axis=-1)
