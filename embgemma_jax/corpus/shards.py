"""The stored form of an embedded corpus: shards, commit records, the manifest, and reading it back.

An output directory (local, or any fsspec URL: see ``embgemma_jax.corpus.store``) holds::

    manifest.json                   written last, by process 0: the run is complete and this is its index
    run-p00000-of-00002.json        what process 0 was asked to do (settings, its part of the input)
    progress-p00000.json            process 0's progress, rewritten at every commit (machine-readable)
    run-p00000.lock                 held by process 0 of the run writing here: pid, host, start time
    errors-p00000.jsonl             skipped records of process 0 (only with on_error="skip")
    shards/p00000-s000000.parquet   format "parquet": columns id and embedding (fixed-size float32 list)
    shards/p00000-s000000.npy       format "npy": float32 [rows, dim] embeddings ...
    shards/p00000-s000000.ids.json  ... and their ids (a JSON list), in input order
    commits/p00000-s000000.json     the shard's commit record: row count, size and sha256 of its files,
                                    the input span it covers, where reading resumes after it, the records
                                    it skipped as malformed

``shards/`` holds nothing but data files, so ``shards/*.parquet`` can be given as it is to pandas,
polars, DuckDB or ``datasets``; once ``manifest.json`` exists, those files are exactly the run's rows, in
input order when sorted by name. A shard counts as written only once its commit record exists, and the
commit record is written after its data files; data files without one are leftovers of an interrupted run
and are overwritten when it resumes. Input order is process order, then shard order, then row order.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from embgemma_jax.corpus.store import ShardError, Store, exclusive_output, json_bytes, open_output, utf8

__all__ = [
    "COMMIT_DIR",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARD_DIR",
    "ShardError",
    "check_manifest",
    "commit_shard",
    "committed_shards",
    "exclusive_output",
    "iter_embeddings",
    "json_bytes",
    "open_output",
    "prepare_output_dir",
    "read_embeddings",
    "read_manifest",
    "utf8",
    "write_manifest",
]

FORMAT_NAME = "embgemma_jax.embeddings"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
COMMIT_DIR = "commits"
FORMATS = ("npy", "parquet")
_READ_CHUNK = 1 << 22


def shard_stem(process: int, index: int) -> str:
    return f"p{process:05d}-s{index:06d}"


def commit_name(process: int, index: int) -> str:
    return f"{COMMIT_DIR}/{shard_stem(process, index)}.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_names(fmt: str, process: int, index: int) -> dict[str, str]:
    """The data files of a shard, by kind."""
    stem = f"{SHARD_DIR}/{shard_stem(process, index)}"
    if fmt == "parquet":
        return {"table": f"{stem}.parquet"}
    return {"embeddings": f"{stem}.npy", "ids": f"{stem}.ids.json"}


def check_format(fmt: str) -> None:
    """Raises ValueError for an unknown output format, or if ``parquet`` lacks pyarrow."""
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(
                "output format 'parquet' needs pyarrow: pip install 'embgemma-jax[parquet]' (or use format 'npy')"
            ) from None


def prepare_output_dir(output: str | Path | Store) -> Store:
    """Opens (creating if needed) an output directory with its ``shards/`` and ``commits/``.

    Raises:
      ShardError: the output is a file, cannot be created, or is not writable (names it).
    """
    store = open_output(output, create=True)
    try:
        store.makedirs(SHARD_DIR, COMMIT_DIR)
    except OSError as e:
        raise ShardError(f"cannot create output directory {store.url}: {e.strerror or e}") from None
    if store.local:
        import os

        for folder in (SHARD_DIR, COMMIT_DIR):
            if not os.access(store.path(folder), os.W_OK | os.X_OK):
                raise ShardError(f"output directory {store.url} is not writable")
    return store


# ---------------------------------------------------------------------------------------------------
# Shards


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(emb: np.ndarray, ids: list[str | int], id_kind: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64() if id_kind == "int" else pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1]),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def commit_shard(
    store: Store,
    fmt: str,
    process: int,
    index: int,
    embeddings: np.ndarray,
    ids: list[str | int],
    info: dict[str, Any],
    *,
    id_kind: str | None = None,
) -> dict[str, Any]:
    """Writes one shard (its data files, then the commit record) and returns the commit record.

    ``info`` is stored in the commit record as is (input span, resume position, skipped records, ...).
    ``id_kind`` ("int" or "string") is the parquet id column's type.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"shard {index}: {embeddings.shape} embeddings for {len(ids)} ids")
    names = data_names(fmt, process, index)
    if fmt == "parquet":
        payloads = {"table": _parquet_bytes(embeddings, ids, id_kind or "string")}
    else:
        payloads = {"embeddings": _npy_bytes(embeddings), "ids": utf8(json.dumps(ids, ensure_ascii=False))}
    files = {}
    for kind, data in payloads.items():
        store.write(names[kind], data)
        files[kind] = {"name": names[kind], "bytes": len(data), "sha256": sha256(data)}
    record = {
        "format": FORMAT_NAME,
        "output_format": fmt,
        "process": process,
        "index": index,
        "rows": int(embeddings.shape[0]),
        "dim": int(embeddings.shape[1]),
        "files": files,
        **info,
    }
    store.write(commit_name(process, index), json_bytes(record))
    return record


def _check_file(store: Store, entry: dict[str, Any], *, checksum: bool) -> bytes | None:
    name = entry["name"]
    size = store.size(name)
    if size is None:
        raise ShardError(f"{store.show(name)} is missing")
    if size != entry["bytes"]:
        raise ShardError(
            f"{store.show(name)} has {size} bytes; its record says {entry['bytes']} (truncated or replaced)"
        )
    if not checksum:
        return None
    data = store.read(name)
    if sha256(data) != entry["sha256"]:
        raise ShardError(f"{store.show(name)} fails its sha256 checksum (corrupted or replaced)")
    return data


def _check_file_streaming(store: Store, entry: dict[str, Any]) -> None:
    """Checks a file's size and sha256 reading it in chunks (never whole in memory)."""
    _check_file(store, entry, checksum=False)
    h = hashlib.sha256()
    with store.open(entry["name"]) as fh:
        while buf := fh.read(_READ_CHUNK):
            h.update(buf)
    if h.hexdigest() != entry["sha256"]:
        raise ShardError(f"{store.show(entry['name'])} fails its sha256 checksum (corrupted or replaced)")


def committed_shards(store: Store, process: int) -> list[dict[str, Any]]:
    """The commit records of ``process``'s shards, in order, after checking them.

    Every listed file must exist with its recorded size; the last shard (the one an interruption could
    have hit) is also checksummed. Leftover temporary files of this process (local disks) are removed.
    """
    prefix = f"p{process:05d}-s"
    if store.local:
        for folder in (SHARD_DIR, COMMIT_DIR):
            for tmp in store.list(folder, f".{prefix}*.tmp"):
                store.delete(tmp)
    pattern = re.compile(rf"{COMMIT_DIR}/{prefix}(\d+)\.json")
    found = {int(m.group(1)): n for n in store.list(COMMIT_DIR, f"{prefix}*.json") if (m := pattern.fullmatch(n))}
    records = []
    for _, name in sorted(found.items()):
        try:
            rec = json.loads(store.read(name))
        except (OSError, ValueError) as e:
            raise ShardError(f"{store.show(name)} is not a readable commit record: {e}") from e
        records.append(rec)
    for k, rec in enumerate(records):
        if rec.get("format") != FORMAT_NAME or rec.get("process") != process or rec.get("index") != k:
            raise ShardError(
                f"{store.show(COMMIT_DIR)}: commit records of process {process} are not shards 0..{len(records) - 1} "
                f"in order (found index {rec.get('index')!r} at position {k}); the directory was modified by hand"
            )
        for entry in rec["files"].values():
            _check_file(store, entry, checksum=k == len(records) - 1)
    return records


# ---------------------------------------------------------------------------------------------------
# The manifest


def write_manifest(store: Store, manifest: dict[str, Any]) -> None:
    store.write(MANIFEST, json_bytes(manifest))


def read_manifest(output: str | Path | Store) -> dict[str, Any]:
    """The manifest of a finished output directory (a local path or a URL), as written.

    Raises:
      ShardError: there is none (the run has not finished), or it is not a manifest of this version.
    """
    store = open_output(output, create=False)
    if not store.is_file(MANIFEST):
        hint = (
            " (the run has not finished: run the same command again to resume it)"
            if store.exists(SHARD_DIR) or store.exists(COMMIT_DIR)
            else ""
        )
        raise ShardError(f"no {MANIFEST} in {store.url}{hint}")
    try:
        manifest = json.loads(store.read(MANIFEST))
    except ValueError as e:
        raise ShardError(f"{store.show(MANIFEST)} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{store.show(MANIFEST)}: format is not {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{store.show(MANIFEST)}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"version ({FORMAT_VERSION}); embed the corpus again"
        )
    return manifest


def check_manifest(store: Store, manifest: dict[str, Any]) -> None:
    """Cross-checks the manifest's shard list against its process summaries.

    The processes' parts must tile the input (each starts where the one before it ends, from the first
    record of the first file to the end of the last); per process, the shard entries must be that
    process's shards 0..n-1 in order (n = its summary's ``shards``), each starting where the previous one
    ended, the last one (marked final) ending where the part ends, each naming its own files; rows and
    skipped records add up to the summary's, and those to the totals. So a dropped, duplicated,
    reordered or emptied shard list is an error even with ``documents`` adjusted.
    """
    try:
        _check_manifest(store.show(MANIFEST), manifest)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(
            f"{store.show(MANIFEST)} is malformed ({type(e).__name__}: {e}); it was not written by this version"
        ) from e


def _where(files: list[dict[str, Any]], pos: Sequence[int]) -> str:
    file, line = pos
    if file >= len(files):
        return "the end of the input"
    return f"{files[file]['url']} row {line}" if files[file]["format"] == "parquet" else f"{files[file]['url']}:{line}"


def _check_manifest(path: str, m: dict[str, Any]) -> None:
    def fail(msg: str) -> NoReturn:
        raise ShardError(f"{path}: {msg}; the manifest was modified or is damaged")

    settings = m["settings"]
    nproc, fmt, files = settings["processes"], settings["output_format"], settings["input"]["files"]

    def where(pos: Sequence[int]) -> str:
        return _where(files, pos)

    procs = m["processes"]
    if [p["process"] for p in procs] != list(range(nproc)):
        fail(f"lists processes {[p['process'] for p in procs]}, expected 0..{nproc - 1}")
    for key in ("documents", "errors"):
        if sum(p[key] for p in procs) != m[key]:
            fail(f"{key}={m[key]}, but its processes add up to {sum(p[key] for p in procs)}")
    by_proc: list[list[dict[str, Any]]] = [[] for _ in range(nproc)]
    last = 0
    for k, shard in enumerate(m["shards"]):
        p = shard["process"]
        if not isinstance(p, int) or not last <= p < nproc:
            fail(f"shard entry {k} (process {p!r}) is out of process order")
        last = p
        by_proc[p].append(shard)
    pos = [0, 0 if files[0]["format"] == "parquet" else 1]
    for p, (info, entries) in enumerate(zip(procs, by_proc, strict=True)):
        if list(info["start"]) != pos:
            fail(f"process {p} starts at {where(info['start'])}, but the one before it ends at {where(pos)}")
        indices = [e["index"] for e in entries]
        if indices != list(range(info["shards"])):
            fail(
                f"the shard entries of process {p} are {_short(indices)}, expected 0..{info['shards'] - 1} in order "
                "(entries dropped, duplicated or reordered)"
            )
        for e in entries:
            names = {kind: entry["name"] for kind, entry in e["files"].items()}
            if names != data_names(fmt, p, e["index"]):
                fail(f"shard {e['index']} of process {p} names the files {sorted(names.values())}, not its own")
            if list(e["start"]) != pos:
                fail(f"shard {e['index']} of process {p} starts at {where(e['start'])}, expected {where(pos)}")
            start, nxt = e["start"], e["next"]
            same_file = start[0] == nxt[0] and start[0] < len(files)
            span = nxt[1] - start[1]
            lines_are_records = same_file and files[start[0]]["format"] != "jsonl"
            if (
                e["records"] != e["rows"] + e["errors"]
                or (same_file and span < e["records"])
                or (lines_are_records and span != e["records"])
                or e["final"] != (e["index"] == info["shards"] - 1)
            ):
                fail(
                    f"shard {e['index']} of process {p} has {e['rows']} rows and {e['errors']} skipped records of "
                    f"{e['records']} records from {where(start)} to {where(nxt)}"
                    + (" and is marked final" if e["final"] else "")
                )
            pos = list(nxt)
        if list(info["next"]) != pos:
            fail(f"the shards of process {p} end at {where(pos)}, but the process ended at {where(info['next'])}")
        if pos != list(info["end"]):
            fail(f"the shards of process {p} end at {where(pos)}, but its part ends at {where(info['end'])}")
        for key, field in (("documents", "rows"), ("errors", "errors")):
            if sum(e[field] for e in entries) != info[key]:
                fail(f"process {p} has {key}={info[key]}, but its shards hold {sum(e[field] for e in entries)}")
    if pos != [len(files), 0]:
        fail(f"the processes end at {where(pos)}, not at the end of the input")


def _short(values: list[Any]) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ...] ({len(values)} entries)"


# ---------------------------------------------------------------------------------------------------
# Reading an output back


def _select(manifest: dict[str, Any], shards: int | slice | Iterable[int] | None) -> list[dict[str, Any]]:
    entries = manifest["shards"]
    if shards is None:
        return list(entries)
    if isinstance(shards, slice):
        return entries[shards]
    picks = [shards] if isinstance(shards, (int, np.integer)) else list(shards)
    for i in picks:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -len(entries) <= i < len(entries):
            raise ValueError(
                f"shards: {i!r} is not a shard index; this output has {len(entries)} shards (0..{len(entries) - 1})"
            )
    return [entries[i] for i in picks]


def _load_shard(
    store: Store, manifest: dict[str, Any], shard: dict[str, Any], *, verify: bool, mmap: bool
) -> tuple[list[str | int], np.ndarray]:
    fmt, dim, rows = manifest["settings"]["output_format"], int(manifest["dim"]), int(shard["rows"])
    files = shard["files"]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = _check_file(store, files["table"], checksum=verify)
        name = files["table"]["name"]
        try:
            table = pq.read_table(pa.BufferReader(data) if data is not None else store.open(name))
            emb_col, ids = table.column("embedding").combine_chunks(), table.column("id").to_pylist()
            ok = pa.types.is_fixed_size_list(emb_col.type) and emb_col.type.list_size == dim
            emb = emb_col.flatten().to_numpy(zero_copy_only=False).reshape(len(emb_col), dim) if ok else None
        except (KeyError, ValueError, pa.ArrowException) as e:
            raise ShardError(f"{store.show(name)} is not a shard of this output: {e}") from e
        if emb is None or emb.dtype != np.float32 or emb.shape != (rows, dim) or len(ids) != rows:
            raise ShardError(
                f"{store.show(name)}: holds {emb_col.type} x {len(emb_col)}; the manifest says float32 ({rows}, {dim})"
            )
        return ids, emb
    emb_name, ids_name = files["embeddings"]["name"], files["ids"]["name"]
    if mmap:
        if verify:
            _check_file_streaming(store, files["embeddings"])
        else:
            _check_file(store, files["embeddings"], checksum=False)
        emb = np.load(store.local_path(emb_name), mmap_mode="r", allow_pickle=False)
    else:
        emb_bytes = _check_file(store, files["embeddings"], checksum=verify)
        emb = np.load(io.BytesIO(emb_bytes if emb_bytes is not None else store.read(emb_name)), allow_pickle=False)
    ids_bytes = _check_file(store, files["ids"], checksum=verify)
    shard_ids = json.loads(ids_bytes if ids_bytes is not None else store.read(ids_name))
    if emb.shape != (rows, dim) or emb.dtype != np.float32 or len(shard_ids) != rows:
        raise ShardError(
            f"{store.show(emb_name)}: holds {emb.dtype} {emb.shape} and {len(shard_ids)} ids; the manifest says "
            f"float32 ({rows}, {dim})"
        )
    return shard_ids, emb


def iter_embeddings(
    output: str | Path,
    *,
    shards: int | slice | Iterable[int] | None = None,
    verify: bool = True,
    mmap: bool = False,
) -> Iterator[tuple[list[str | int], np.ndarray]]:
    """Yields ``(ids, embeddings)`` shard by shard, in input order, from a finished output.

    Args:
      output: the ``embed-corpus`` output: a local directory or a URL (``gs://``, ``memory://``, ...).
      shards: which shards (indices into the manifest's ``shards`` list, an int, a sequence or a slice);
        default all. Each shard's rows are a contiguous run of the input.
      verify: check every file read against the sha256 in the manifest.
      mmap: memory-map the ``.npy`` embeddings (format npy, local disk) instead of reading them: the arrays
        are read-only ``np.memmap`` views. ``verify`` still reads each file once, in chunks, to hash it.

    Raises:
      ShardError: see :func:`read_embeddings`.
      ValueError: a bad shard index, or ``mmap`` for a parquet or non-local output.
    """
    store = open_output(output, create=False)
    manifest = read_manifest(store)
    check_manifest(store, manifest)
    if mmap and manifest["settings"]["output_format"] != "npy":
        fmt = manifest["settings"]["output_format"]
        raise ValueError(f"mmap=True needs npy shards; {store.url} holds {fmt} shards")
    if mmap and not store.local:
        raise ValueError(f"mmap=True needs an output on a local disk; {store.url} is not")
    for shard in _select(manifest, shards):
        yield _load_shard(store, manifest, shard, verify=verify, mmap=mmap)


def read_embeddings(
    output: str | Path,
    *,
    shards: int | slice | Iterable[int] | None = None,
    verify: bool = True,
    mmap: bool = False,
) -> tuple[list[str | int], np.ndarray]:
    """Reads a finished ``embed-corpus`` output back, in input order (npy or parquet shards).

    Args:
      output: the directory or URL given to ``embgemma-jax embed-corpus --output``.
      shards: read only these shards (see :func:`iter_embeddings`); default all.
      verify: check every file against the sha256 in the manifest.
      mmap: with one shard selected (``shards=i``), return its ``.npy`` embeddings memory-mapped (read-only)
        instead of read; for several, iterate :func:`iter_embeddings` with ``mmap=True``.

    Returns:
      ``(ids, embeddings)``: a list with one id per row and a float32 array [rows, dim].

    Raises:
      ShardError: the run is not finished (no manifest), the manifest's shard list does not match its
        process summaries (:func:`check_manifest`), or a file is missing, truncated or corrupted.
    """
    store = open_output(output, create=False)
    manifest = read_manifest(store)
    check_manifest(store, manifest)
    selected = _select(manifest, shards)
    if mmap:
        if len(selected) != 1:
            raise ValueError(
                f"mmap=True maps one shard: pass shards=i (this selection has {len(selected)}), or iterate "
                "iter_embeddings(..., mmap=True)"
            )
        return next(iter_embeddings(store, shards=[manifest["shards"].index(selected[0])], verify=verify, mmap=True))
    dim = int(manifest["dim"])
    total = sum(int(s["rows"]) for s in selected)
    out = np.empty((total, dim), dtype=np.float32)
    ids: list[str | int] = []
    row = 0
    for shard in selected:
        shard_ids, emb = _load_shard(store, manifest, shard, verify=verify, mmap=False)
        out[row : row + len(shard_ids)] = emb
        ids.extend(shard_ids)
        row += len(shard_ids)
    if shards is None and row != int(manifest["documents"]):
        raise ShardError(f"{store.show(MANIFEST)}: shards hold {row} rows, but documents={manifest['documents']}")
    return ids, out
