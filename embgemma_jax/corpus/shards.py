"""The on-disk format of an embedded corpus: shards, commit records and the manifest.

An output directory holds::

    manifest.json                  written last, by process 0: the run is complete and this is its index
    run-p00000-of-00002.json       what process 0 was asked to do (settings, its part of the input)
    shards/p00000-s000000.npy      float32 [rows, dim] embeddings of shard 0 of process 0
    shards/p00000-s000000.ids.json the ids of those rows (a JSON list), in input order
    shards/p00000-s000000.json     the shard's commit record: row count, sha256 and size of both files,
                                   where reading resumes after it, the records it skipped as malformed
    errors-p00000.jsonl            skipped records of process 0 (only with on_error="skip")
    run-p00000.lock                held (flock) by process 0 of the run writing here: pid, host, start time

Every file is written to a temporary name, flushed to disk and renamed, so a file that exists under its
final name is whole. A shard counts as written only once its commit record exists, and the commit record
is renamed into place after both data files; data files without one are leftovers of an interrupted run
and are overwritten when it resumes. Input order is process order, then shard order, then row order.

A run owns its output: each of its processes holds an exclusive lock on its ``run-pXXXXX.lock`` from
before it reads or cleans anything there until the manifest is written (:func:`exclusive_output`), so a
second run on the same directory stops with an error naming the holder, and never touches the first
run's files. The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run leaves
no stale lock: the next run takes it over and resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

FORMAT_NAME = "embgemma_jax.embeddings"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_DIR = "shards"


class ShardError(ValueError):
    """An output directory is incomplete, inconsistent, or fails its checksums; the message names the file."""


def shard_stem(process: int, index: int) -> str:
    return f"p{process:05d}-s{index:06d}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either absent/old or complete, never partial."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate (e.g. from an undecodable file name) becomes its JSON escape
    ``\\udcXX``, so JSON text stays valid and reads back as the same string."""
    return text.encode("utf-8", "backslashreplace")


def json_bytes(obj: Any) -> bytes:
    return utf8(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------
# Owning an output directory


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Creates ``out_dir`` (and its ``shards/``) if needed; raises ShardError naming the path if it cannot."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"output {out_dir} exists and is not a directory")
    try:
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK) or not os.access(out_dir / SHARD_DIR, os.W_OK | os.X_OK):
        raise ShardError(f"output directory {out_dir} is not writable")
    return out_dir


def lock_path(out_dir: Path, process: int) -> Path:
    return out_dir / f"run-p{process:05d}.lock"


@contextlib.contextmanager
def exclusive_output(out_dir: Path, process: int) -> Iterator[Path]:
    """Holds process ``process``'s exclusive lock on ``out_dir`` for the ``with`` block.

    The lock is ``flock`` on ``run-pXXXXX.lock`` (never deleted, so every run locks the same file), which
    records the holder's pid, host and start time for the error a second run gets. The kernel releases
    the lock when the holder exits or dies.

    Raises:
      ShardError: another run holds the lock (the message names it), or the file system cannot lock.
    """
    import fcntl

    path = lock_path(out_dir, process)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ShardError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardError(
                f"{out_dir} is being written by another embed-corpus run ({_holder(path)}); two runs cannot share "
                "an output directory: wait for that run to finish (the same command then resumes or reuses it), "
                "stop it, or choose another output directory"
            ) from None
        except OSError as e:
            raise ShardError(
                f"cannot lock {path}: {e.strerror or e} (the file system of the output directory does not support "
                "flock; write to a local or lock-capable directory)"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json_bytes(holder), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_bytes())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}, lock {path}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"lock {path}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def commit_shard(
    out_dir: Path, process: int, index: int, embeddings: np.ndarray, ids: list[str | int], info: dict[str, Any]
) -> dict[str, Any]:
    """Writes one shard (embeddings, ids, then the commit record) and returns the commit record.

    ``info`` is stored in the commit record as is (resume position, skipped records, ...).
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"shard {index}: {embeddings.shape} embeddings for {len(ids)} ids")
    shard_dir = out_dir / SHARD_DIR
    stem = shard_stem(process, index)
    files = {}
    for kind, name, data in (
        ("embeddings", f"{stem}.npy", _npy_bytes(embeddings)),
        ("ids", f"{stem}.ids.json", utf8(json.dumps(ids, ensure_ascii=False))),
    ):
        write_atomic(shard_dir / name, data)
        files[kind] = {"name": f"{SHARD_DIR}/{name}", "bytes": len(data), "sha256": sha256(data)}
    record = {
        "format": FORMAT_NAME,
        "process": process,
        "index": index,
        "rows": int(embeddings.shape[0]),
        "dim": int(embeddings.shape[1]),
        "files": files,
        **info,
    }
    write_atomic(shard_dir / f"{stem}.json", json_bytes(record))
    return record


def _check_file(out_dir: Path, entry: dict[str, Any], *, checksum: bool) -> bytes | None:
    path = out_dir / entry["name"]
    if not path.is_file():
        raise ShardError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(f"{path} has {size} bytes; its record says {entry['bytes']} (truncated or replaced)")
    if not checksum:
        return None
    data = path.read_bytes()
    if sha256(data) != entry["sha256"]:
        raise ShardError(f"{path} fails its sha256 checksum (corrupted or replaced)")
    return data


def committed_shards(out_dir: Path, process: int) -> list[dict[str, Any]]:
    """The commit records of ``process``'s shards, in order, after checking them.

    Every listed file must exist with its recorded size; the last shard (the one an interruption could
    have hit) is also checksummed. Leftover temporary files of this process are removed.
    """
    shard_dir = out_dir / SHARD_DIR
    prefix = f"p{process:05d}-s"
    for tmp in shard_dir.glob(f".{prefix}*.tmp"):
        tmp.unlink(missing_ok=True)
    records = []
    pattern = re.compile(rf"{prefix}(\d+)\.json")
    found = {int(m.group(1)): p for p in shard_dir.glob(f"{prefix}*.json") if (m := pattern.fullmatch(p.name))}
    for _, path in sorted(found.items()):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ShardError(f"{path} is not a readable commit record: {e}") from e
        records.append(rec)
    for k, rec in enumerate(records):
        if rec.get("format") != FORMAT_NAME or rec.get("process") != process or rec.get("index") != k:
            raise ShardError(
                f"{shard_dir}: commit records of process {process} are not shards 0..{len(records) - 1} in order "
                f"(found index {rec.get('index')!r} at position {k}); the directory was modified by hand"
            )
        for entry in rec["files"].values():
            _check_file(out_dir, entry, checksum=k == len(records) - 1)
    return records


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    write_atomic(out_dir / MANIFEST, json_bytes(manifest))


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished output directory."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        hint = " (the run has not finished: run the same command again to resume it)" if out_dir.is_dir() else ""
        raise ShardError(f"no {MANIFEST} in {out_dir}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported ({FORMAT_VERSION})"
        )
    return manifest


def check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Cross-checks the manifest's shard list against its process summaries.

    Per process, the shard entries must be that process's shards 0..n-1 in order (n = its summary's
    ``shards``), each starting at the line where the previous one ended, from the process's first line
    (1 + the lines of the processes before it; the first row for parquet) to its ``next_line``, naming
    the files of that shard; rows and skipped records add up to the summary's, and those to the totals.
    So a dropped, duplicated, reordered or emptied shard list is an error even with ``documents`` adjusted.
    """
    path = out_dir / MANIFEST
    try:
        _check_manifest(path, manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{path} is malformed ({type(e).__name__}: {e}); it was not written by this version") from e


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    def fail(msg: str) -> NoReturn:
        raise ShardError(f"{path}: {msg}; the manifest was modified or is damaged")

    nproc, fmt = m["settings"]["processes"], m["settings"]["input"]["format"]
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
    line = 0 if fmt == "parquet" else 1
    for p, (info, entries) in enumerate(zip(procs, by_proc, strict=True)):
        if info["first_line"] != line:
            fail(f"process {p} starts at line {info['first_line']}, but the processes before it end at line {line}")
        indices = [e["index"] for e in entries]
        if indices != list(range(info["shards"])):
            fail(
                f"the shard entries of process {p} are {_short(indices)}, expected 0..{info['shards'] - 1} in order "
                "(entries dropped, duplicated or reordered)"
            )
        for e in entries:
            stem = f"{SHARD_DIR}/{shard_stem(p, e['index'])}"
            names = (e["files"]["embeddings"]["name"], e["files"]["ids"]["name"])
            if names != (f"{stem}.npy", f"{stem}.ids.json"):
                fail(f"shard {e['index']} of process {p} names the files {list(names)}, not those of {stem}")
            if e["start_line"] != line:
                fail(f"shard {e['index']} of process {p} starts at line {e['start_line']}, expected {line}")
            span = e["next_line"] - e["start_line"]
            if (
                e["records"] != e["rows"] + e["errors"]
                or span < e["records"]
                or (fmt != "jsonl" and span != e["records"])
            ):
                fail(
                    f"shard {e['index']} of process {p} has {e['rows']} rows and {e['errors']} skipped records of "
                    f"{e['records']} records on lines [{e['start_line']}, {e['next_line']})"
                )
            line = e["next_line"]
        if line != info["next_line"]:
            fail(f"the shards of process {p} end at line {line}, but the process ended at line {info['next_line']}")
        end = info["first_line"] + info["lines"]
        if line > end or (fmt != "jsonl" and line != end):
            fail(f"the shards of process {p} cover its lines up to {line}, but its part ends at {end}")
        for key, field in (("documents", "rows"), ("errors", "errors")):
            if sum(e[field] for e in entries) != info[key]:
                fail(f"process {p} has {key}={info[key]}, but its shards hold {sum(e[field] for e in entries)}")
        line = end


def _short(values: list[Any]) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ...] ({len(values)} entries)"


def read_embeddings(out_dir: str | Path, *, verify: bool = True) -> tuple[list[str | int], np.ndarray]:
    """Reads a finished ``embed-corpus`` output directory back, in input order.

    Args:
      out_dir: the directory given to ``embgemma-jax embed-corpus --output``.
      verify: check every file against the sha256 in the manifest.

    Returns:
      ``(ids, embeddings)``: a list with one id per document and a float32 array [documents, dim].

    Raises:
      ShardError: the run is not finished (no manifest), the manifest's shard list does not match its
        process summaries (:func:`check_manifest`), or a file is missing, truncated or corrupted.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    check_manifest(out_dir, manifest)
    n, dim = int(manifest["documents"]), int(manifest["dim"])
    out = np.empty((n, dim), dtype=np.float32)
    ids: list[str | int] = []
    row = 0
    for shard in manifest["shards"]:
        files = shard["files"]
        emb_bytes = _check_file(out_dir, files["embeddings"], checksum=True) if verify else None
        ids_bytes = _check_file(out_dir, files["ids"], checksum=True) if verify else None
        emb_path, ids_path = out_dir / files["embeddings"]["name"], out_dir / files["ids"]["name"]
        emb = np.load(io.BytesIO(emb_bytes) if emb_bytes is not None else emb_path, allow_pickle=False)
        shard_ids = json.loads(ids_bytes if ids_bytes is not None else ids_path.read_bytes())
        rows = int(shard["rows"])
        if emb.shape != (rows, dim) or emb.dtype != np.float32 or len(shard_ids) != rows:
            raise ShardError(
                f"{emb_path}: holds {emb.dtype} {emb.shape} and {len(shard_ids)} ids; the manifest says "
                f"float32 ({rows}, {dim})"
            )
        if row + rows > n:
            raise ShardError(f"{out_dir / MANIFEST}: shards hold more rows than its documents={n}")
        out[row : row + rows] = emb
        ids.extend(shard_ids)
        row += rows
    if row != n:
        raise ShardError(f"{out_dir / MANIFEST}: shards hold {row} rows, but documents={n}")
    return ids, out
