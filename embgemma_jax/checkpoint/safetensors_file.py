"""The safetensors reader: one header parse per file, every size checked before any tensor data is read.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{dtype, shape, data_offsets}``, then the tensors' bytes back to back. :class:`SafetensorsFile` parses
and checks the header once, with the rules of the safetensors library (offsets contiguous from 0, each
tensor's byte size equal to its shape times its dtype's size, the data filling the file exactly), so a
file that declares a 4 GB tensor is judged from its header and file size alone. The loaders then compare
names, dtypes and shapes with what the config expects (:meth:`SafetensorsFile.check_tensor`) before
reading anything, and read each tensor with one ``readinto`` into a fresh aligned array: no second copy
of a tensor (the 805 MB embedding table matters), and arrays that ``jax.device_put`` takes without copying
on CPU. :meth:`SafetensorsFile.memory_map` instead maps one tensor read-only (the embedding table on the
CPU backend, gathered row by row on the host: only the rows a batch uses are ever read).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embgemma_jax.errors import CheckpointError

# safetensors refuses headers over 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every safetensors dtype (sub-byte ones included, so any valid file frames correctly).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64,
}  # fmt: skip
# The dtypes a weight may have, as read into NumPy (BF16: the raw 16-bit words, viewed as bfloat16 below).
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# Names for error messages, as NumPy spells them.
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}  # fmt: skip


class TensorInfo(NamedTuple):
    """One header entry: the tensor's dtype (safetensors' code, e.g. ``"F32"``), shape and byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the data section, which begins after the header
    end: int


class SafetensorsFile:
    """One safetensors file: its header parsed and checked on opening, tensors read on demand.

    Raises CheckpointError naming the file when it is missing, truncated, has bytes after its last
    tensor, or its header is not a valid safetensors header. Use as a context manager (or ``close()``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing weights file: {self.path}")
        self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for read(); closed by close()
        try:
            self.tensors, self.metadata, self._data_start = _parse_header(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.tensors)

    def check_tensor(self, name: str, shape: tuple[int, ...]) -> None:
        """Raises unless the header declares ``name`` as a float tensor of ``shape`` (nothing is read)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"no tensor {name!r} in {self.path}")
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {self.path} has dtype {_DTYPE_NAMES.get(info.dtype, info.dtype)}; expected a "
                "float type (F32, BF16, F16 or F64)"
            )
        if info.shape != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {self.path} has shape {info.shape}; expected {tuple(shape)}")

    def read(self, name: str) -> np.ndarray:
        """The float tensor ``name`` as a fresh NumPy array (bfloat16 as ``ml_dtypes.bfloat16``), checked
        to hold no NaN or inf."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"no tensor {name!r} in {self.path}")
        if info.dtype not in _FLOAT_DTYPES:
            self.check_tensor(name, info.shape)  # raises the dtype error
        arr = aligned_empty(info.shape, _FLOAT_DTYPES[info.dtype])
        self._fh.seek(self._data_start + info.start)
        try:
            got = self._fh.readinto(memoryview(arr.reshape(-1)).cast("B"))
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {e}") from e
        if got != arr.nbytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} is incomplete (changed while loading?)")
        if info.dtype == "BF16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)  # numpy has no bfloat16: the raw 16-bit words, reinterpreted
        _check_finite(arr, name, self.path)
        return arr

    def memory_map(self, name: str) -> np.ndarray:
        """The float tensor ``name`` as a read-only memory map of the file (bfloat16 as
        ``ml_dtypes.bfloat16``): nothing is read until it is indexed. Its values are not checked here (that
        would read it all); :func:`check_rows_finite` checks the rows a caller gathers."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"no tensor {name!r} in {self.path}")
        if info.dtype not in _FLOAT_DTYPES:
            self.check_tensor(name, info.shape)  # raises the dtype error
        arr = np.memmap(
            self.path, dtype=_FLOAT_DTYPES[info.dtype], mode="r", offset=self._data_start + info.start, shape=info.shape
        )
        if info.dtype == "BF16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)
        return arr


def check_rows_finite(rows: np.ndarray, ids: np.ndarray, table: np.ndarray) -> None:
    """Raises CheckpointError if any gathered row of a memory-mapped table holds NaN or inf, naming the
    token id and the file (a loaded tensor is checked whole at load; a mapped one, row by row as used)."""
    finite = np.isfinite(rows.astype(np.float32, copy=False)).all(axis=-1)
    if not finite.all():
        tok = int(np.asarray(ids)[~finite].flat[0])
        where = getattr(table, "filename", None) or "the memory-mapped table"
        raise CheckpointError(f"the embedding table's row for token id {tok} in {where} contains NaN or inf")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor {key!r} is declared twice")
        out[key] = value
    return out


def _parse_header(fh: Any, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
    n = int.from_bytes(fh.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} is corrupt: its header length field says {n} bytes (not a safetensors file?)")
    if 8 + n > size:
        raise CheckpointError(f"{path} is truncated: the header needs {8 + n} bytes but the file has {size}")
    try:
        raw = json.loads(fh.read(n), object_pairs_hook=_reject_duplicates)
        if not isinstance(raw, dict):
            raise ValueError("the header is not a JSON object")
        metadata = raw.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ must map names to strings")
        tensors = {name: _tensor_info(name, entry) for name, entry in raw.items()}
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is corrupt: its header is not a valid safetensors header ({e})") from e

    data_size = size - 8 - n
    needed = max((t.end for t in tensors.values()), default=0)
    if needed > data_size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + n + needed} bytes but the file has only {size} "
            "(an interrupted download or copy?)"
        )
    if needed < data_size:
        raise CheckpointError(f"{path} is corrupt: {data_size - needed} unexpected bytes after the last tensor")
    # The library's rule: sorted by offsets, tensors tile the data section from 0 with no gap or overlap.
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} starts at byte {info.start} of the data, expected {position} "
                "(overlapping or gapped offsets)"
            )
        position = info.end
    return tensors, dict(metadata), 8 + n


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}; expected [start, end]")
    start, end = offsets
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if end < start or bits % 8 or end - start != bits // 8:
        raise ValueError(
            f"tensor {name!r}: shape {tuple(shape)} of {dtype} is {bits / 8:.0f} bytes but its data_offsets span "
            f"{end - start}"
        )
    return TensorInfo(dtype, tuple(shape), start, end)


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary: XLA's CPU client then uses the buffer in place instead of copying."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _check_finite(arr: np.ndarray, name: str, path: Path) -> None:
    flat = arr.reshape(-1)
    step = 1 << 22  # in chunks: no full-size temporary for the 262144 x 768 table
    for i in range(0, flat.size, step):
        if not np.isfinite(flat[i : i + step].astype(np.float32, copy=False)).all():
            raise CheckpointError(f"tensor {name!r} in {path} contains NaN or inf")
