"""Streaming readers for one corpus file: ``.txt`` (one text per line), ``.jsonl`` and ``.parquet``.

A file is a local path or an fsspec URL (``memory://``, ``gs://``, ``s3://``, ``hf://``, ...; see
``embgemma_jax.corpus.sources``). ``.txt`` and ``.jsonl`` may be compressed (``.gz``, ``.zst``) and are
then decompressed as they stream. A file is read in contiguous *parts* and, within a part, from a resume
*position*, one record at a time, so memory stays bounded whatever its size:

* plain ``.txt`` / ``.jsonl``: part p is the byte range [p * size / P, (p + 1) * size / P); a line belongs
  to the part holding its first byte. Positions are byte offsets of line starts. Only ``\\n`` ends a line
  (a ``\\r`` before it is dropped too; ``\\f``, ``\\v``, U+2028 and the like are text); a UTF-8 byte-order
  mark at the start of the file is dropped. :func:`read_text_lines` (``embed --input``) splits by the
  same rule.
* compressed ``.txt`` / ``.jsonl``: a compressed stream cannot be entered in the middle, so the file is
  one part; positions are offsets in the decompressed bytes (a resume decompresses up to it again).
* ``.parquet``: part p is the row range [p * rows / P, (p + 1) * rows / P); only the row groups that
  overlap it are read. Positions are row indices.

Ids: with ``id_field`` None, a record's id is its location: the 1-based line number for ``.txt`` and
``.jsonl`` (as in editors and error messages), the 0-based row index for ``.parquet``. With ``id_field``,
the field's value (a str or an int) is the id; a record without one is malformed. Ids are labels carried
to the output verbatim, not keys: duplicates are allowed and kept.

Malformed records (undecodable bytes, bad JSON, JSON nested too deeply or with an integer longer than
Python parses, a JSON value that is not an object, a missing field, a text that is not a string, a null, a
string holding a lone surrogate) come back as records with ``error`` set and a location naming the file
and line (or row); whether that stops the run is the caller's choice. Problems of the whole file
(missing, a directory or a pipe, empty, unknown format, a missing or mistyped parquet column, damaged
compressed data) raise :class:`CorpusError` naming the file (and the line reached). In ``.jsonl``, blank
lines are not records and are passed over; in ``.txt`` every line is a text, the empty line included.

Input hashes: :meth:`InputFile.read` feeds what it reads to an :class:`InputHash` (the raw bytes of every
line for txt/jsonl, decompressed for compressed files; the id and text of every row for parquet), so a
resumed run can check that the input it already embedded is still the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import reprlib
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
UNBOUNDED = 2**62  # the end of a part that runs to the end of a compressed file (its length is unknown)
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel = 2


class CorpusError(ValueError):
    """The input cannot be read as a corpus; the message names the file (and line or row)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One input record. Exactly one of ``text`` and ``error`` is set.

    Attributes:
      line: 1-based line number (txt, jsonl) or 0-based row index (parquet) in its file.
      next_position: where reading resumes after this record (byte offset or row index).
      id: the record's id (see the module docstring); None when it could not be read.
      text: the text to embed.
      error: what is wrong with the record.
      file: the index of its file in the corpus (0 for a corpus of one file).
      consumed: bytes of the stored (compressed) file read so far, where known; for progress only.
    """

    line: int
    next_position: int
    id: str | int | None
    text: str | None
    error: str | None = None
    file: int = 0
    consumed: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Part:
    """A contiguous share of a file: [start, end) in bytes (txt, jsonl), decompressed bytes, or rows."""

    start: int
    end: int


class InputHash:
    """sha256 of the input read so far, one hash per file (key), and the position reached.

    Lines that are not records (blank ``.jsonl`` lines) are hashed tentatively: :meth:`rollback` drops them
    when no record follows, so the hashes always cover exactly [start, last record's next_position).
    """

    def __init__(self, position: int, key: int = 0) -> None:
        self.position, self.key = position, key
        self._h: dict[int, Any] = {}
        self._saved: tuple[dict[int, Any], int, int] | None = None

    def update(self, data: bytes, position: int, *, record: bool = True, key: int = 0) -> None:
        if not record and self._saved is None:
            self._saved = ({k: h.copy() for k, h in self._h.items()}, self.position, self.key)
        elif record:
            self._saved = None
        if key not in self._h:
            self._h[key] = hashlib.sha256()
        self._h[key].update(data)
        self.position, self.key = position, key

    def rollback(self) -> None:
        """Forgets what was hashed since the last record."""
        if self._saved is not None:
            self._h, self.position, self.key = self._saved
            self._saved = None

    def hexdigest(self, key: int = 0) -> str:
        """The sha256 of what was read of file ``key`` (of nothing, if nothing was)."""
        return (self._h[key] if key in self._h else hashlib.sha256()).hexdigest()

    def digests(self) -> dict[str, str]:
        """``{str(key): sha256}`` of every file read so far."""
        return {str(k): h.hexdigest() for k, h in sorted(self._h.items())}


class _KeyedHash:
    """Feeds an :class:`InputHash` under one file's key; rollback is left to the owner of the hash."""

    def __init__(self, inner: InputHash, key: int) -> None:
        self.inner, self.key = inner, key

    def update(self, data: bytes, position: int, *, record: bool = True) -> None:
        self.inner.update(data, position, record=record, key=self.key)

    def rollback(self) -> None:
        pass


def short_repr(value: Any) -> str:
    """A short repr (bounded length and depth, so deep or huge values cannot blow up an error message)."""
    return _repr.repr(value)


def _check_id(value: Any, field: str) -> tuple[str | int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field {field!r} is {type(value).__name__} ({short_repr(value)}); ids must be strings or integers"
    if isinstance(value, str) and (m := _SURROGATE.search(value)):
        return None, f"id field {field!r} holds a lone surrogate ({m.group()!r} at character {m.start()}), not text"
    return value, None


def _lines(fh: IO[bytes], pos: int) -> Iterator[tuple[bytes, bytes, int]]:
    """The lines of a binary stream from byte offset ``pos`` (the one rule of every reader here).

    Yields ``(raw, content, next_pos)``: the line's bytes as stored (with its ``\\n``, and the BOM of a
    first line), the line without its line end (``\\n``, ``\\r\\n``) or BOM, and the offset after it.
    """
    while True:
        raw = fh.readline()
        if not raw:
            return
        content = raw[len(_BOM) :] if pos == 0 and raw.startswith(_BOM) else raw
        pos += len(raw)
        yield raw, content.removesuffix(b"\n").removesuffix(b"\r"), pos


def _decode(content: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, what is wrong)."""
    try:
        return content.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of the line ({content[e.start : e.start + 4]!r})"


def _check_input_file(path: Path, *, what: str, regular: bool) -> os.stat_result:
    """Raises CorpusError unless ``path`` is a file that can be read (a regular file if ``regular``)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CorpusError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CorpusError(f"{what} {path} is a directory; expected a file")
    if regular and not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise CorpusError(
            f"{what} {path} is {kind}: a corpus is read in parts and again on resume, so it must be a regular "
            "file (save the stream to a file first)"
        )
    return st


def read_text_lines(path: str | Path, *, what: str = "input file") -> list[str]:
    """The lines of a UTF-8 text file, split exactly as a ``.txt`` corpus is (see the module docstring).

    Used by ``embgemma-jax embed --input`` (and ``parity --texts``). Pipes work too (``/dev/stdin``).

    Args:
      path: the file.
      what: what the file is, for error messages ("input file not found: ...").

    Raises:
      CorpusError: the file is missing, a directory or unreadable, or a line is not UTF-8 (names path:line).
    """
    path = Path(path)
    _check_input_file(path, what=what, regular=False)
    out = []
    try:
        with open(path, "rb") as fh:
            for n, (_raw, content, _pos) in enumerate(_lines(fh, 0), start=1):
                text, error = _decode(content)
                if error is not None:
                    raise CorpusError(f"{path}:{n}: {error}")
                out.append(text)
    except OSError as e:
        raise CorpusError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return out


def file_format(name: str) -> tuple[str, str | None]:
    """``(format, compression)`` of a file name: format ``txt``, ``jsonl`` or ``parquet``; compression
    None, ``gzip`` (``.gz``) or ``zstd`` (``.zst``).

    Raises:
      CorpusError: an unsupported suffix (names the file).
    """
    lower = name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = kind, lower[: -len(suffix)]
    suffix = os.path.splitext(lower)[1]
    if suffix not in SUPPORTED:
        shown = suffix or "(no suffix)"
        raise CorpusError(
            f"{name}: unsupported input format {shown!r}; expected one of {list(SUPPORTED)}, .txt and .jsonl "
            f"optionally compressed ({', '.join(COMPRESSIONS)})"
        )
    if suffix in PARQUET_SUFFIXES and compression is not None:
        raise CorpusError(f"{name}: a compressed parquet file is not supported (parquet compresses its own pages)")
    fmt = "txt" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else "parquet"
    return fmt, compression


def check_decompressor(name: str, compression: str | None) -> None:
    """Raises CorpusError if the package that decompresses ``compression`` is missing."""
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise CorpusError(
                f"reading {name} needs the zstandard package: pip install 'embgemma-jax[corpus]'"
            ) from None


def _timestamp(value: Any) -> str | None:
    """A modification time from an fsspec info dict as an ISO 8601 UTC string (microseconds), or None."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC).isoformat(timespec="microseconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="microseconds")
    if isinstance(value, str) and value:
        return value
    return None


_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")
_CHECKSUM_KEYS = ("md5Hash", "crc32c", "ETag", "etag", "sha256", "blob_id")


def file_metadata(info: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(mtime, checksum)`` from an fsspec info dict: the modification time, and a content checksum where
    the store keeps one (GCS ``md5Hash``/``crc32c``, S3 ``ETag``, the Hub's LFS sha256 or blob id)."""
    mtime = next((t for k in _MTIME_KEYS if (t := _timestamp(info.get(k))) is not None), None)
    checksum = None
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        checksum = f"sha256:{lfs['sha256']}"
    else:
        for key in _CHECKSUM_KEYS:
            if info.get(key):
                checksum = f"{key}:{info[key]}"
                break
    return mtime, checksum


class InputFile:
    """One corpus file opened for streaming. Use :func:`open_corpus` (one file) or
    :class:`embgemma_jax.corpus.sources.Corpus` (several).

    Args:
      url: the file's name in messages and ids: a local path, or a URL with its protocol.
      fs: the fsspec filesystem holding it (None: the local filesystem).
      path: the path within ``fs`` (default: ``url``).
      size: its size in bytes (as stored, compressed or not).
      mtime: its modification time as recorded by the store, or None.
      checksum: a content checksum kept by the store, or None.
      text_field: the field (jsonl) or column (parquet) holding the text; unused for txt.
      id_field: the field or column holding the id, or None for positional ids.
      index: the file's place in its corpus (carried by its records).
    """

    def __init__(
        self,
        url: str,
        *,
        fs: Any = None,
        path: str | None = None,
        size: int,
        mtime: str | None = None,
        checksum: str | None = None,
        text_field: str = "text",
        id_field: str | None = None,
        index: int = 0,
    ) -> None:
        self.url, self.fs, self.fspath = url, fs, path if path is not None else url
        self.size, self.mtime, self.checksum, self.index = size, mtime, checksum, index
        self.format, self.compression = file_format(url)
        if not isinstance(text_field, str) or not text_field:
            raise CorpusError(f"text_field must be a non-empty string, got {text_field!r}")
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise CorpusError(f"id_field must be a non-empty string or None, got {id_field!r}")
        self.text_field, self.id_field = text_field, id_field
        self._rows: int | None = None
        self._row_starts: list[int] | None = None
        self._id_kind: str | None = None

    @property
    def path(self) -> str:
        """The file's name (a local path or a URL)."""
        return self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def splittable(self) -> bool:
        """Whether parts can start inside the file (not in a compressed stream)."""
        return self.compression is None

    @property
    def base_line(self) -> int:
        """The number of the first record: line 1 (txt, jsonl) or row 0 (parquet)."""
        return 0 if self.format == "parquet" else 1

    def describe(self) -> dict[str, Any]:
        """What identifies the file's content in a run's settings: name, format, size and store checksum."""
        out = {"url": self.url, "format": self.format, "compression": self.compression, "bytes": self.size}
        if self.checksum is not None:
            out["checksum"] = self.checksum
        return out

    def check(self) -> None:
        """Checks what can be checked before reading: the decompressor exists; a parquet file's footer and
        columns. Raises CorpusError naming the file."""
        check_decompressor(self.url, self.compression)
        if self.format == "parquet" and self.size > 0:
            self._parquet_meta()

    # ----------------------------------------------------------------------------------------------
    # Shares

    def location(self, line: int) -> str:
        """``path:line`` for text formats, ``path row N`` for parquet."""
        return f"{self.url} row {line}" if self.format == "parquet" else f"{self.url}:{line}"

    def extent(self) -> int | None:
        """Bytes (txt, jsonl), rows (parquet) of the whole file; None for a compressed file."""
        if self.format == "parquet":
            return self.rows
        return self.size if self.compression is None else None

    @property
    def rows(self) -> int:
        """Rows of a parquet file (read from its footer once)."""
        if self._rows is None:
            self._parquet_meta()
        return self._rows

    def parts(self, n: int) -> list[Part]:
        """The file cut into n contiguous parts of (nearly) equal extent (a compressed file: the first part
        is all of it)."""
        total = self.extent()
        if total is None:
            return [Part(0, UNBOUNDED)] + [Part(UNBOUNDED, UNBOUNDED)] * (n - 1)
        return [Part(total * p // n, total * (p + 1) // n) for p in range(n)]

    def count(self, part: Part) -> int:
        """Lines (txt, jsonl) or rows (parquet) in a part: reads only the part."""
        if self.format == "parquet":
            return part.end - part.start
        if part.start >= part.end:
            return 0
        if self.compression is not None:
            with self._open_text() as fh:
                return sum(1 for _ in self._guard(_lines(fh, 0), 0))
        start = self._first_line_start(part)
        if start >= part.end:
            return 0
        # A line starts at `start` and after every "\n" at offsets [start, end - 1).
        n, pos = 1, start
        with self._open_raw() as fh:
            fh.seek(start)
            while pos < part.end - 1:
                buf = fh.read(min(_READ_CHUNK, part.end - 1 - pos))
                if not buf:
                    break
                n += buf.count(b"\n")
                pos += len(buf)
        return n

    def start_hash(self, part: Part) -> InputHash:
        """An empty :class:`InputHash` at the start of ``part``."""
        return InputHash(self.first_position(part), self.index)

    def first_position(self, part: Part) -> int:
        """Where the first record of ``part`` starts (its first line's offset, or its first row)."""
        return part.start if self.format == "parquet" else self._first_line_start(part)

    def input_hash(self, part: Part, end: int) -> InputHash:
        """The :class:`InputHash` :meth:`read` would have built from the start of ``part`` up to ``end`` (a
        :attr:`Record.next_position`): reads that span of the input again, in full."""
        h = self.start_hash(part)
        if self.format == "parquet":
            for _ in self._read_parquet(Part(part.start, end), part.start, _KeyedHash(h, self.index)):
                pass
            return h
        if self.compression is not None:
            for rec in self.read(part, None, 1, h):
                if rec.next_position >= end:
                    break
            return h
        pos = h.position
        with self._open_raw() as fh:
            fh.seek(pos)
            while pos < end:
                buf = fh.read(min(_READ_CHUNK, end - pos))
                if not buf:
                    break
                pos += len(buf)
                h.update(buf, pos, key=self.index)
        return h

    # ----------------------------------------------------------------------------------------------
    # Reading

    def read(
        self,
        part: Part,
        position: int | None = None,
        first_line: int = 1,
        hasher: InputHash | _KeyedHash | None = None,
    ) -> Iterator[Record]:
        """Records of ``part`` from ``position`` (a value of :attr:`Record.next_position`; default: the
        part's start). ``first_line`` is the line number (row index for parquet) of the record there.
        ``hasher`` (at ``position``) is fed what is read, up to the last record's next_position."""
        if isinstance(hasher, InputHash):
            hasher = _Owned(hasher, self.index)
        if self.format == "parquet":
            yield from self._read_parquet(part, part.start if position is None else position, hasher)
        else:
            start = self._first_line_start(part) if position is None else position
            yield from self._read_lines(part, start, first_line, hasher)
        if hasher is not None:
            hasher.rollback()

    def _open_raw(self) -> IO[bytes]:
        """The stored bytes, seekable."""
        if self.fs is None:
            return open(self.fspath, "rb")  # noqa: SIM115 (the callers close it)
        fh = self.fs.open(self.fspath, "rb")
        return fh if isinstance(fh, io.BytesIO) else io.BufferedReader(fh, buffer_size=_READ_CHUNK)

    def _open_text(self) -> IO[bytes]:
        """The file's bytes, decompressed as they are read."""
        raw = self._open_raw()
        if self.compression == "gzip":
            return _Decompressed(gzip.GzipFile(fileobj=raw, mode="rb"), raw)
        if self.compression == "zstd":
            return _Decompressed(io.BufferedReader(_Zstd(raw), buffer_size=_READ_CHUNK), raw)
        return raw

    def _guard(self, lines: Iterator[Any], line: int) -> Iterator[Any]:
        """Turns damaged compressed data (and read errors) into a CorpusError naming the file and line."""
        try:
            for item in lines:
                yield item
                line += 1
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorpusError(f"{self.url}: damaged or truncated {self.compression} data at line {line}: {e}") from e
        except OSError as e:
            raise CorpusError(f"{self.url}: cannot read it at line {line}: {e.strerror or e}") from e
        except Exception as e:  # zstandard.ZstdError
            if type(e).__name__ != "ZstdError":
                raise
            raise CorpusError(f"{self.url}: damaged or truncated zstd data at line {line}: {e}") from e

    def _first_line_start(self, part: Part) -> int:
        """Offset of the first line starting in [part.start, part.end), or part.end if there is none."""
        if part.start == 0 or part.start >= part.end:
            return part.start
        with self._open_raw() as fh:
            fh.seek(part.start - 1)
            if fh.read(1) == b"\n":
                return part.start
            fh.readline()
            return min(fh.tell(), part.end) if fh.tell() < self.size else part.end

    def _read_lines(self, part: Part, pos: int, line: int, hasher: Any) -> Iterator[Record]:
        if pos >= part.end:
            return
        with self._open_text() as fh:
            if self.compression is None:
                fh.seek(pos)
            else:
                self._skip(fh, pos)
            for raw, content, next_pos in self._guard(_lines(fh, pos), line):
                rec = self._line_record(content, line, next_pos)
                if hasher is not None:
                    hasher.update(raw, next_pos, record=rec is not None)
                if rec is not None:
                    if isinstance(fh, _Decompressed):
                        rec = dataclasses.replace(rec, consumed=fh.consumed())
                    yield rec
                line += 1
                if next_pos >= part.end:
                    break

    def _skip(self, fh: IO[bytes], n: int) -> None:
        """Reads and drops the first ``n`` decompressed bytes."""
        try:
            while n > 0:
                buf = fh.read(min(_READ_CHUNK, n))
                if not buf:
                    return
                n -= len(buf)
        except (EOFError, OSError, zlib.error) as e:
            raise CorpusError(f"{self.url}: damaged or truncated {self.compression} data: {e}") from e

    def _line_record(self, content: bytes, line: int, next_pos: int) -> Record | None:
        text, error = _decode(content)
        if error is not None:
            return Record(line, next_pos, None, None, error, self.index)
        if self.format == "txt":
            return Record(line, next_pos, line, text, None, self.index)
        if not text.strip():
            return None  # blank lines of a .jsonl are not records
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return Record(line, next_pos, None, None, f"invalid JSON: {e.msg} at column {e.colno}", self.index)
        except ValueError as e:  # an integer literal longer than int() parses (sys.get_int_max_str_digits())
            return Record(line, next_pos, None, None, f"invalid JSON: {str(e).split(';')[0]}", self.index)
        except RecursionError:
            return Record(line, next_pos, None, None, "invalid JSON: nested too deeply to parse", self.index)
        if not isinstance(obj, dict):
            return Record(line, next_pos, None, None, f"expected a JSON object, got {type(obj).__name__}", self.index)
        return self._fields(obj, line, next_pos)

    def _fields(self, obj: dict[str, Any], line: int, next_pos: int) -> Record:
        def bad(rid: str | int | None, error: str) -> Record:
            return Record(line, next_pos, rid, None, error, self.index)

        rid: str | int | None = line
        if self.id_field is not None:
            if obj.get(self.id_field) is None:
                return bad(None, f"id field {self.id_field!r} {'is null' if self.id_field in obj else 'is missing'}")
            rid, err = _check_id(obj[self.id_field], self.id_field)
            if err:
                return bad(None, err)
        if self.text_field not in obj:
            fields = short_repr(sorted(obj)[:10])
            return bad(rid, f"text field {self.text_field!r} is missing (fields: {fields})")
        text = obj[self.text_field]
        if not isinstance(text, str):
            return bad(
                rid, f"text field {self.text_field!r} is {type(text).__name__} ({short_repr(text)}), expected a string"
            )
        if m := _SURROGATE.search(text):
            return bad(
                rid,
                f"text field {self.text_field!r} holds a lone surrogate ({m.group()!r} at character {m.start()}), "
                "which is not text",
            )
        return Record(line, next_pos, rid, text, None, self.index)

    # ----------------------------------------------------------------------------------------------
    # Parquet

    def _parquet_file(self) -> Any:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise CorpusError(f"reading {self.url} needs pyarrow: pip install 'embgemma-jax[parquet]'") from e
        source = self.fspath if self.fs is None else self.fs.open(self.fspath, "rb")
        try:
            return pq.ParquetFile(source)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for a bad file
            raise CorpusError(f"{self.url} is not a readable parquet file: {e}") from e

    def _parquet_meta(self) -> None:
        """Reads the footer once: row counts per row group; checks the text and id columns. An empty file
        (0 bytes) has no rows."""
        import pyarrow as pa

        if self.size == 0:
            self._row_starts, self._rows = [0], 0
            return

        pf = self._parquet_file()
        try:
            schema, meta = pf.schema_arrow, pf.metadata
        finally:
            pf.close()
        for role, name in (("text", self.text_field), ("id", self.id_field)):
            if name is None:
                continue
            if name not in schema.names:
                raise CorpusError(f"{self.url}: no {role} column {name!r} (columns: {schema.names})")
            typ = schema.field(name).type
            is_str = pa.types.is_string(typ) or pa.types.is_large_string(typ)
            ok = is_str or (role == "id" and pa.types.is_integer(typ))
            if not ok:
                want = "a string or integer" if role == "id" else "a string"
                raise CorpusError(f"{self.url}: {role} column {name!r} has type {typ}; expected {want} column")
            if role == "id":
                self._id_kind = "string" if is_str else "int"
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._row_starts, self._rows = starts, meta.num_rows

    @property
    def id_kind(self) -> str | None:
        """For a parquet file with an id column: "int" or "string" (its type); else None."""
        if self.format == "parquet" and self.id_field is not None and self._id_kind is None:
            self._parquet_meta()
        return self._id_kind

    def _read_parquet(self, part: Part, pos: int, hasher: Any = None) -> Iterator[Record]:
        if self._row_starts is None:
            self._parquet_meta()
        starts = self._row_starts
        groups = [g for g in range(len(starts) - 1) if starts[g + 1] > pos and starts[g] < part.end]
        if pos >= part.end or not groups:
            return
        columns = [self.text_field] + ([self.id_field] if self.id_field is not None else [])
        row = starts[groups[0]]
        pf = self._parquet_file()
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
                texts = batch.column(self.text_field).to_pylist()
                ids = batch.column(self.id_field).to_pylist() if self.id_field is not None else None
                for k, text in enumerate(texts):
                    r = row + k
                    if r < pos:
                        continue
                    if r >= part.end:
                        return
                    rid: str | int | None = r if ids is None else ids[k]
                    if hasher is not None:
                        hasher.update(json.dumps([None if ids is None else rid, text]).encode() + b"\n", r + 1)
                    if rid is None:
                        yield Record(r, r + 1, None, None, f"id column {self.id_field!r} is null", self.index)
                    elif text is None:
                        yield Record(r, r + 1, rid, None, f"text column {self.text_field!r} is null", self.index)
                    else:
                        yield Record(r, r + 1, rid, text, None, self.index)
                row += len(texts)
        finally:
            pf.close()


class _Owned(_KeyedHash):
    """A hash owned by a single-file read: rolled back at the end of it."""

    def rollback(self) -> None:
        self.inner.rollback()


class _Zstd(io.RawIOBase):
    """zstd frames, one after another, decompressed as they are read. Unlike zstandard's stream_reader, data
    that ends inside a frame is an error (EOFError), not a quiet end of file."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._d, self._fed = self._new(), 0
        self._buf, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._at >= len(self._buf):
            chunk = self._raw.read(_READ_CHUNK)
            if not chunk:
                if self._fed and not self._d.eof:
                    raise EOFError("the data ends inside a zstd frame (truncated)")
                return 0
            out = []
            while chunk:
                if self._d.eof:
                    self._d, self._fed = self._new(), 0
                out.append(self._d.decompress(chunk))
                self._fed += len(chunk)
                chunk = self._d.unused_data if self._d.eof else b""
            self._buf, self._at = b"".join(out), 0
        n = min(len(b), len(self._buf) - self._at)
        b[:n] = self._buf[self._at : self._at + n]
        self._at += n
        return n


class _Decompressed(io.BufferedIOBase):
    """A decompressing stream that also closes the stored file under it and reports how much of it was read."""

    def __init__(self, stream: IO[bytes], raw: IO[bytes]) -> None:
        self._stream, self._raw = stream, raw

    def readline(self, size: int | None = -1) -> bytes:
        return self._stream.readline(-1 if size is None else size)

    def read(self, size: int | None = -1) -> bytes:
        return self._stream.read(-1 if size is None else size)

    def consumed(self) -> int | None:
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._raw.close()
            super().close()


def resolve(url: str | Path) -> tuple[Any, str, str]:
    """``(fs, path, name)`` of a local path or fsspec URL: fs None for the local filesystem (then path and
    name are the absolute path); else the fsspec filesystem, the path in it, and the URL with its protocol.

    Raises:
      CorpusError: an unknown protocol, or one whose package is missing (names the extra to install).
    """
    text = os.fspath(url)
    if "://" not in text and "::" not in text:
        path = os.path.abspath(text)
        return None, path, path
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(text)
    except ImportError as e:
        protocol = text.split("://", 1)[0]
        extra = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}.get(protocol)
        hint = f": pip install 'embgemma-jax[{extra}]'" if extra else ""
        raise CorpusError(
            f"{text}: the {protocol}:// filesystem needs a package that is not installed{hint} ({e})"
        ) from None
    except ValueError as e:
        raise CorpusError(f"{text}: {e}") from None
    if isinstance(fs, LocalFileSystem):
        return None, path, path
    return fs, path, fs.unstrip_protocol(path)


def stat_input(url: str | Path) -> tuple[Any, str, str, int, str | None, str | None]:
    """``(fs, path, url, size, mtime, checksum)`` of one input file (a local path or an fsspec URL).

    Raises:
      CorpusError: it is missing, a directory, or not a regular file (names it).
    """
    fs, path, name = resolve(url)
    if fs is None:
        st = _check_input_file(Path(path), what="input file", regular=True)
        return None, path, name, st.st_size, _timestamp(st.st_mtime), None
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CorpusError(f"input file not found: {name}") from None
    except OSError as e:
        raise CorpusError(f"cannot read input file {name}: {e}") from None
    if info.get("type") == "directory":
        raise CorpusError(f"input file {name} is a directory; expected a file")
    mtime, checksum = file_metadata(info)
    return fs, path, name, int(info.get("size") or 0), mtime, checksum


def open_corpus(path: str | Path, *, text_field: str = "text", id_field: str | None = None) -> InputFile:
    """Opens one ``.txt``, ``.jsonl`` (or ``.ndjson``), optionally ``.gz``/``.zst`` compressed, or
    ``.parquet`` file for streaming. For several files and globs, see
    :class:`embgemma_jax.corpus.sources.Corpus`.

    Args:
      path: the input file: a local path or an fsspec URL; its suffix picks the format.
      text_field: field (jsonl) or column (parquet) with the text.
      id_field: field or column with each record's id; None: the line number (txt, jsonl) or row index
        (parquet).

    Raises:
      CorpusError: the file is missing, not a regular file, empty, of an unknown format, or lacks a parquet
        column.
    """
    fs, fspath, url, size, mtime, checksum = stat_input(path)
    f = InputFile(
        url,
        fs=fs,
        path=fspath,
        size=size,
        mtime=mtime,
        checksum=checksum,
        text_field=text_field,
        id_field=id_field,
    )
    if size == 0:
        raise CorpusError(f"{url} is empty (0 bytes): nothing to embed")
    f.check()
    if f.format == "parquet" and f.rows == 0:
        raise CorpusError(f"{url} has no rows: nothing to embed")
    return f
