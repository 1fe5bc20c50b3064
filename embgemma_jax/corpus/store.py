"""Where an embedded corpus is written: a local directory or any fsspec URL, and who owns it.

Writes are whole-file: on a local disk a file is written under a temporary name, flushed, and renamed
into place (atomic); on an object store (``gs://``, ``s3://``, ``memory://``) one upload creates the object,
which readers see whole or not at all. Object stores have no atomic rename, so nothing here renames
there: the shard protocol (``embgemma_jax.corpus.shards``) makes a shard count only once its commit record
exists, and the manifest is written last. Other fsspec filesystems (``hf://``, where every file is a
commit, ``sftp://``, ...) are written the same way; a write they interrupt can leave a partial file,
which the checksums in commit records and the manifest then report.

Ownership (:func:`exclusive_output`): each process of a run holds a lock on ``run-pXXXXX.lock`` until the
manifest is written, so a second run on the same output stops with an error naming the holder.

* Local disk: ``flock`` on the lock file (never deleted). The kernel drops the lock when the holder
  exits or dies (even by SIGKILL), so a crashed run leaves no stale lock.
* Anything else: the lock file is a record created exclusively (``open(..., "xb")``: a conditional
  upload on GCS and S3) holding a random token, the holder's pid, host and start time, and a heartbeat
  time it rewrites every minute; on filesystems without exclusive creation it is written after a
  check that it does not exist, then read back to verify the token. A lock is stale, and is taken over,
  when its heartbeat is more than :data:`STALE_AFTER_S` seconds old by this machine's clock, or when its
  holder was on this host and its process is gone. It is deleted when the run ends.

Limits of the object-store lock, honestly: the check-then-write fallback leaves a short window in which
two runs starting at the same moment can both proceed; taking over a stale lock is delete-then-create,
which two runs doing it at once can race; a run paused (SIGSTOP, a suspended VM) for longer than
:data:`STALE_AFTER_S` loses its lock to a new run -- it notices at its next shard commit (the heartbeat
finds another token) and stops with an error, but a shard it was writing then may already have been
overwritten by the new run's; clocks of different hosts must agree to within minutes. The lock catches
the common mistake (a second run started on an output that is in use), not a deliberate race.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embgemma_jax.corpus.readers import CorpusError, resolve

STALE_AFTER_S = 600.0
HEARTBEAT_S = 60.0
# fsspec protocols whose open(..., "xb") creates a file only if it does not exist (GCS and S3: a
# conditional upload, gcsfs and s3fs >= 2024.12; memory: a check in this process).
_EXCLUSIVE_CREATE = {"memory", "gs", "gcs", "s3", "s3a"}


class ShardError(ValueError):
    """An output directory is incomplete, inconsistent, or fails its checksums; the message names the file."""


def json_bytes(obj: Any) -> bytes:
    return utf8(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate (e.g. from an undecodable file name) becomes its JSON escape
    ``\\udcXX``, so JSON text stays valid and reads back as the same string."""
    return text.encode("utf-8", "backslashreplace")


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
    """Writes ``data`` to a local ``path`` so that ``path`` is either absent/old or complete, never partial."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """An output directory, local or behind fsspec. Names are relative paths with ``/``.

    Args:
      url: a local directory or an fsspec URL.
    """

    def __init__(self, url: str | Path) -> None:
        try:
            self.fs, self.root, self.url = resolve(url)
        except CorpusError as e:
            raise ShardError(f"output: {e}") from None
        self.root = self.root.rstrip("/") or "/"

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def protocol(self) -> str:
        if self.fs is None:
            return "file"
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def show(self, name: str) -> str:
        """A name as a user can find it: a local path or a URL."""
        return self.path(name) if self.fs is None else self.fs.unstrip_protocol(self.path(name))

    def local_path(self, name: str) -> Path:
        if self.fs is not None:
            raise ValueError(f"{self.url} is not on a local disk")
        return Path(self.path(name))

    # ----------------------------------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        """Writes a whole file (atomically on a local disk; one upload elsewhere)."""
        if self.fs is None:
            write_atomic(Path(self.path(name)), data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def read(self, name: str) -> bytes:
        if self.fs is None:
            return Path(self.path(name)).read_bytes()
        return self.fs.cat_file(self.path(name))

    def exists(self, name: str) -> bool:
        if self.fs is None:
            return os.path.lexists(self.path(name))
        return self.fs.exists(self.path(name))

    def is_file(self, name: str) -> bool:
        if self.fs is None:
            return Path(self.path(name)).is_file()
        return self.fs.isfile(self.path(name))

    def size(self, name: str) -> int | None:
        """Size in bytes, or None if there is no such file."""
        try:
            if self.fs is None:
                p = Path(self.path(name))
                return p.stat().st_size if p.is_file() else None
            info = self.fs.info(self.path(name))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") != "directory" else None

    def delete(self, name: str) -> None:
        if self.fs is None:
            Path(self.path(name)).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))

    def open(self, name: str) -> Any:
        """A binary file object to read from."""
        if self.fs is None:
            return open(self.path(name), "rb")  # noqa: SIM115 (the caller closes it)
        return self.fs.open(self.path(name), "rb")

    def list(self, folder: str, pattern: str) -> list[str]:
        """Names (``folder/file``) of the files in ``folder`` matching the glob ``pattern``, sorted; hidden
        files (temporaries) included when the pattern starts with a dot."""
        if self.fs is None:
            d = Path(self.path(folder)) if folder else Path(self.root)
            if not d.is_dir():
                return []
            names = [p.name for p in d.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]
        else:
            base = self.path(folder) if folder else self.root
            self.fs.invalidate_cache(base)  # listings are cached by gcsfs/s3fs; others may have written here
            try:
                entries = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return sorted(f"{folder}/{n}" if folder else n for n in names)

    def makedirs(self, *folders: str) -> None:
        if self.fs is None:
            for f in folders:
                Path(self.path(f)).mkdir(parents=True, exist_ok=True)
        else:
            for f in folders:
                self.fs.makedirs(self.path(f), exist_ok=True)

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Creates ``name`` holding ``data``; FileExistsError if it exists (see the module docstring for
        which filesystems guarantee that against a concurrent writer)."""
        path = self.path(name)
        if self.fs is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return
        if self.protocol in _EXCLUSIVE_CREATE:
            try:
                with self.fs.open(path, "xb") as fh:
                    fh.write(data)
                return
            except (NotImplementedError, ValueError):  # a version without exclusive writes (gcsfs/s3fs < 2024.12)
                pass
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)


def open_output(output: str | Path | Store, *, create: bool) -> Store:
    """The :class:`Store` of an output directory; with ``create``, made (with ``folders``) if missing.

    Raises:
      ShardError: the output is a file, cannot be created, or (local) is not writable; names it.
    """
    store = output if isinstance(output, Store) else Store(output)
    if not create:
        if store.fs is not None:  # gcsfs and s3fs cache listings; other processes may have written since
            store.fs.invalidate_cache(store.root)
        return store
    if store.fs is None:
        out_dir = Path(store.root)
        if out_dir.exists() and not out_dir.is_dir():
            raise ShardError(f"output {out_dir} exists and is not a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ShardError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ShardError(f"output directory {out_dir} is not writable")
        return store
    try:
        if store.fs.isfile(store.root):
            raise ShardError(f"output {store.url} exists and is not a directory")
        store.fs.makedirs(store.root, exist_ok=True)
    except ShardError:
        raise
    except Exception as e:  # each filesystem raises its own errors (permissions, missing bucket, ...)
        raise ShardError(f"cannot create output directory {store.url}: {e}") from None
    return store


# ---------------------------------------------------------------------------------------------------
# Owning an output directory


def lock_name(process: int) -> str:
    return f"run-p{process:05d}.lock"


class Lock:
    """A held output lock. :meth:`check` raises if it was lost (object stores only)."""

    def __init__(self, store: Store, process: int) -> None:
        self.store, self.process, self.name = store, process, lock_name(process)
        self.path = store.show(self.name)
        self.lost: str | None = None
        self.token: str | None = None  # the lock record's token (object stores)

    def check(self) -> None:
        """Raises ShardError if another run has taken this lock over (reads the lock record on object stores)."""
        if self.token is not None and self.lost is None:
            info = _read_record(self.store, self.name)
            if (info or {}).get("token") != self.token:
                self.lost = _describe_holder(info, self.path)
        if self.lost is not None:
            raise ShardError(
                f"this run lost its lock on {self.store.url} ({self.path}) to another run ({self.lost}); it stops "
                "here: two runs must not write to one output"
            )


def _holder_info() -> dict[str, Any]:
    now = time.time()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def _describe_holder(info: dict[str, Any] | None, where: str) -> str:
    try:
        text = f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        if "heartbeat" in info:
            age = time.time() - float(info["heartbeat"])
            text += f", last heartbeat {age:.0f} s ago"
        return f"{text}, lock {where}"
    except (KeyError, TypeError, ValueError):
        return f"lock {where}"


@contextlib.contextmanager
def exclusive_output(output: str | Path | Store, process: int) -> Iterator[Lock]:
    """Holds process ``process``'s exclusive lock on an output directory for the ``with`` block (see the
    module docstring: ``flock`` on a local disk, an exclusively created lock record elsewhere).

    Raises:
      ShardError: another run holds the lock (the message names it), or the lock cannot be taken.
    """
    store = output if isinstance(output, Store) else Store(output)
    lock = Lock(store, process)
    if store.local:
        with _flock(store, lock):
            yield lock
    else:
        with _record_lock(store, lock):
            yield lock


@contextlib.contextmanager
def _flock(store: Store, lock: Lock) -> Iterator[None]:
    import fcntl

    path = Path(lock.path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ShardError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(path.read_bytes())
            except (OSError, ValueError):
                info = None
            raise ShardError(
                f"{store.root} is being written by another embed-corpus run ({_describe_holder(info, str(path))}); "
                "two runs cannot share an output directory: wait for that run to finish (the same command then "
                "resumes or reuses it), stop it, or choose another output directory"
            ) from None
        except OSError as e:
            raise ShardError(
                f"cannot lock {path}: {e.strerror or e} (the file system of the output directory does not support "
                "flock; write to a local or lock-capable directory)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json_bytes(_holder_info()), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _stale(info: dict[str, Any] | None) -> bool:
    """Whether a lock record's holder is gone: its heartbeat is old, or it ran on this host and has exited."""
    if not isinstance(info, dict):
        return False
    try:
        if info.get("host") == socket.gethostname():
            os.kill(int(info["pid"]), 0)
        return time.time() - float(info["heartbeat"]) > STALE_AFTER_S
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return time.time() - float(info["heartbeat"]) > STALE_AFTER_S
    except (KeyError, TypeError, ValueError):
        return False


def _read_record(store: Store, name: str) -> dict[str, Any] | None:
    try:
        info = json.loads(store.read(name))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def _record_lock(store: Store, lock: Lock) -> Iterator[None]:
    token = uuid.uuid4().hex
    record = {**_holder_info(), "token": token, "heartbeat": time.time()}
    for attempt in range(2):
        try:
            store.create_exclusive(lock.name, json_bytes(record))
        except FileExistsError:
            info = _read_record(store, lock.name)
            if attempt == 0 and _stale(info):
                store.delete(lock.name)  # a crashed run's lock: take it over
                continue
            raise ShardError(
                f"{store.url} is being written by another embed-corpus run ({_describe_holder(info, lock.path)}); "
                "two runs cannot share an output directory: wait for that run to finish (the same command then "
                f"resumes or reuses it), stop it, or choose another output directory. If that run is gone, its "
                f"lock goes stale {STALE_AFTER_S:.0f} s after its last heartbeat (or delete {lock.path})"
            ) from None
        except Exception as e:  # the filesystem's own errors (permissions, a missing bucket, ...)
            raise ShardError(f"cannot create the lock {lock.path}: {e}") from None
        break
    if (_read_record(store, lock.name) or {}).get("token") != token:
        raise ShardError(f"another embed-corpus run took the lock {lock.path} at the same moment; run again later")
    lock.token = token
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            info = _read_record(store, lock.name)
            if (info or {}).get("token") != token:
                lock.lost = _describe_holder(info, lock.path)
                return
            record["heartbeat"] = time.time()
            with contextlib.suppress(Exception):  # a failed heartbeat is retried at the next one
                store.write(lock.name, json_bytes(record))

    thread = threading.Thread(target=beat, name=f"embgemma-lock-{lock.process}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read_record(store, lock.name) or {}).get("token") == token:
            store.delete(lock.name)
