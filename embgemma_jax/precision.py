"""Embedding precision: float32 vectors -> int8 / uint8 scalars or packed bits, as sentence-transformers.

:func:`quantize_embeddings` follows ``sentence_transformers.quantize_embeddings`` operation for operation,
so equal float inputs give equal outputs (tested against the installed reference):

* ``"int8"`` / ``"uint8"``: each dimension's range ``[min, max]`` is cut into 255 steps; a value becomes
  ``clip(floor((x - min) / step), 0, 255)`` (minus 128 for int8). The ranges are, in this order of
  preference: ``ranges`` (a [2, dim] array of minima and maxima), the per-dimension min and max of
  ``calibration_embeddings``, or those of the embeddings themselves (which then must hold more than one
  vector; fewer than 100 vectors log a warning, as the reference). A dimension whose range is empty gets a
  step of 1.
* ``"binary"`` / ``"ubinary"``: each value becomes the bit ``x > 0``, packed eight to a byte along the last
  axis with ``np.packbits`` (big-endian bit order, the last byte zero-filled); ``"binary"`` stores each byte
  minus 128 as int8, ``"ubinary"`` the byte as uint8. The width becomes ``ceil(dim / 8)``.
* A list of 2-D arrays (token embeddings, one [T_i, dim] matrix per text) is quantized matrix by matrix
  with one set of int8/uint8 ranges computed over all of them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; raises ValueError listing them otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def _as_float_array(x: Any, what: str) -> np.ndarray:
    """NumPy view of x; bfloat16/float16 (JAX or ml_dtypes) are upcast to float32 as the reference does."""
    a = np.asarray(x)
    if a.dtype in (np.uint8, np.int8):
        raise ValueError(f"{what} to quantize must be float rather than {a.dtype}; pass the float32 embeddings")
    if a.dtype.kind == "V" or a.dtype.name in ("bfloat16", "float16"):
        a = a.astype(np.float32)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be a numeric array, got dtype {a.dtype}")
    return a


def quantization_ranges(
    embeddings: np.ndarray, precision: str, calibration_embeddings: np.ndarray | None = None
) -> np.ndarray:
    """[2, dim] per-dimension minima and maxima, from ``calibration_embeddings`` if given, else from
    ``embeddings`` (which must then hold more than one vector)."""
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(
                f"Cannot compute {precision} quantization ranges from a single embedding. Pass `ranges` or "
                "`calibration_embeddings` from a representative set of embeddings instead."
            )
        if embeddings.shape[0] < 100:
            logger.warning(
                "Computing %s quantization buckets based on %d embeddings. %s quantization is more stable with "
                "`ranges` calculated from more embeddings or a `calibration_embeddings` that can be used to "
                "calculate the buckets.",
                precision,
                len(embeddings),
                precision,
            )
        calibration_embeddings = embeddings
    calibration = _as_float_array(calibration_embeddings, "calibration_embeddings")
    return np.vstack((np.min(calibration, axis=0), np.max(calibration, axis=0)))


def quantize_embeddings(
    embeddings: Any,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Quantizes float embeddings to ``precision`` with sentence-transformers' semantics (module docstring).

    Args:
      embeddings: [N, dim] or [dim] floats (NumPy, JAX, or anything ``np.asarray`` takes), or a list of
        [T_i, dim] matrices (quantized with shared ranges).
      precision: one of :data:`PRECISIONS`.
      ranges: [2, dim] minima and maxima for int8/uint8 (wins over ``calibration_embeddings``).
      calibration_embeddings: [M, dim] embeddings whose per-dimension min and max give the int8/uint8 ranges.

    Returns:
      int8/uint8 arrays of the same shape for "int8"/"uint8"; [..., ceil(dim / 8)] int8/uint8 for
      "binary"/"ubinary"; float32 for "float32". A list for a list of matrices.
    """
    check_precision(precision)
    if isinstance(embeddings, (list, tuple)):
        if not embeddings:
            return []
        mats = [_as_float_array(m, "embeddings") for m in embeddings]
        if mats[0].ndim == 2:
            if precision.endswith("int8") and ranges is None:
                calibration = np.concatenate(mats, axis=0) if calibration_embeddings is None else calibration_embeddings
                if len(calibration):
                    ranges = quantization_ranges(calibration, precision, calibration_embeddings)
            return [quantize_embeddings(m, precision, ranges, calibration_embeddings) for m in mats]
        embeddings = np.array(mats)
    embeddings = _as_float_array(embeddings, "embeddings")

    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        dim = embeddings.shape[1]
        if precision.endswith("int8"):
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision.endswith("binary"):
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)

    if precision == "float32":
        return embeddings.astype(np.float32)

    if precision.endswith("int8"):
        if ranges is None:
            ranges = quantization_ranges(embeddings, precision, calibration_embeddings)
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        if ranges.shape != (2, embeddings.shape[-1]):
            raise ValueError(
                f"ranges must have shape (2, {embeddings.shape[-1]}) (minima, maxima per dimension), got {ranges.shape}"
            )
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)

    bits = np.packbits(embeddings > 0, axis=-1)
    return (bits - 128).astype(np.int8) if precision == "binary" else bits
