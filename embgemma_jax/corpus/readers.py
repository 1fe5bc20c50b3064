"""Streaming corpus readers: ``.txt`` (one text per line), ``.jsonl`` and ``.parquet``.

A corpus is read in contiguous *parts* (one per process) and, within a part, from a resume *position*,
one record at a time, so memory stays bounded whatever the corpus size. Each process reads only its part:

* ``.txt`` / ``.jsonl``: part p is the byte range [p * size / P, (p + 1) * size / P); a line belongs to
  the part holding its first byte. Positions are byte offsets of line starts. Lines end at ``\\n`` (a
  trailing ``\\r`` is dropped too); a UTF-8 byte-order mark at the start of the file is dropped.
* ``.parquet``: part p is the row range [p * rows / P, (p + 1) * rows / P); only the row groups that
  overlap it are read. Positions are row indices.

Ids: with ``id_field`` None, a record's id is its location: the 1-based line number for ``.txt`` and
``.jsonl`` (as in editors and error messages), the 0-based row index for ``.parquet``. With ``id_field``,
the field's value (a str or an int) is the id; a record without one is malformed. Ids are labels carried
to the output verbatim, not keys: duplicates are allowed and kept.

Malformed records (undecodable bytes, bad JSON, a JSON value that is not an object, a missing field, a
text that is not a string, a null) come back as records with ``error`` set and a location naming the
file and line (or row); whether that stops the run is the caller's choice. Problems of the whole file
(missing, empty, unknown format, a missing or mistyped parquet column) raise :class:`CorpusError`. In
``.jsonl``, blank lines are not records and are passed over; in ``.txt`` every line is a text, the empty
line included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 20


class CorpusError(ValueError):
    """The input cannot be read as a corpus; the message names the file (and line or row)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One input record. Exactly one of ``text`` and ``error`` is set.

    Attributes:
      line: 1-based line number (txt, jsonl) or 0-based row index (parquet).
      next_position: where reading resumes after this record (byte offset or row index).
      id: the record's id (see the module docstring); None when it could not be read.
      text: the text to embed.
      error: what is wrong with the record.
    """

    line: int
    next_position: int
    id: str | int | None
    text: str | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Part:
    """A contiguous share of the corpus: [start, end) in bytes (txt, jsonl) or rows (parquet)."""

    start: int
    end: int


def _check_id(value: Any, field: str) -> tuple[str | int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field {field!r} is {type(value).__name__} ({value!r:.60}); ids must be strings or integers"
    return value, None


class Corpus:
    """A corpus file opened for streaming. Use :func:`open_corpus`.

    Args:
      path: the input file.
      text_field: the field (jsonl) or column (parquet) holding the text; unused for txt.
      id_field: the field or column holding the id, or None for positional ids.
    """

    def __init__(self, path: str | Path, *, text_field: str = "text", id_field: str | None = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in SUPPORTED:
            raise CorpusError(
                f"{self.path}: unsupported input format {suffix or '(no suffix)'!r}; expected one of {list(SUPPORTED)} "
                "(compressed files must be decompressed first)"
            )
        self.format = "txt" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else "parquet"
        if not self.path.is_file():
            raise CorpusError(f"input file not found: {self.path}")
        if not isinstance(text_field, str) or not text_field:
            raise CorpusError(f"text_field must be a non-empty string, got {text_field!r}")
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise CorpusError(f"id_field must be a non-empty string or None, got {id_field!r}")
        self.text_field, self.id_field = text_field, id_field
        self.size = self.path.stat().st_size
        if self.size == 0:
            raise CorpusError(f"{self.path} is empty (0 bytes): nothing to embed")
        self._parquet = None
        if self.format == "parquet":
            self._open_parquet()

    # ----------------------------------------------------------------------------------------------
    # Shares

    def location(self, line: int) -> str:
        """``path:line`` for text formats, ``path row N`` for parquet."""
        return f"{self.path} row {line}" if self.format == "parquet" else f"{self.path}:{line}"

    def extent(self) -> int:
        """Bytes (txt, jsonl) or rows (parquet) of the whole corpus."""
        return self._parquet.metadata.num_rows if self._parquet is not None else self.size

    def parts(self, n: int) -> list[Part]:
        """The corpus cut into n contiguous parts of (nearly) equal extent."""
        total = self.extent()
        return [Part(total * p // n, total * (p + 1) // n) for p in range(n)]

    def count(self, part: Part) -> int:
        """Lines (txt, jsonl) or rows (parquet) in a part: reads only the part."""
        if self._parquet is not None:
            return part.end - part.start
        start = self._first_line_start(part)
        if start >= part.end:
            return 0
        # A line starts at `start` and after every "\n" at offsets [start, end - 1).
        n, pos = 1, start
        with open(self.path, "rb") as fh:
            fh.seek(start)
            while pos < part.end - 1:
                buf = fh.read(min(_READ_CHUNK, part.end - 1 - pos))
                if not buf:
                    break
                n += buf.count(b"\n")
                pos += len(buf)
        return n

    def fingerprint(self) -> dict[str, Any]:
        """Size and sha256 of the first and last MiB: enough to tell a resumed run the input changed."""
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            h.update(fh.read(_READ_CHUNK))
            if self.size > 2 * _READ_CHUNK:
                fh.seek(self.size - _READ_CHUNK)
            h.update(fh.read(_READ_CHUNK))
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "bytes": self.size,
            "edges_sha256": h.hexdigest(),
        }

    # ----------------------------------------------------------------------------------------------
    # Reading

    def read(self, part: Part, position: int | None = None, first_line: int = 1) -> Iterator[Record]:
        """Records of ``part`` from ``position`` (a value of :attr:`Record.next_position`; default: the
        part's start). ``first_line`` is the line number (row index for parquet) of the record there."""
        if self._parquet is not None:
            yield from self._read_parquet(part, part.start if position is None else position)
        else:
            yield from self._read_lines(
                part, self._first_line_start(part) if position is None else position, first_line
            )

    def _first_line_start(self, part: Part) -> int:
        """Offset of the first line starting in [part.start, part.end), or part.end if there is none."""
        if part.start == 0:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(part.start - 1)
            if fh.read(1) == b"\n":
                return part.start
            fh.readline()
            return min(fh.tell(), part.end) if fh.tell() < self.size else part.end

    def _read_lines(self, part: Part, pos: int, line: int) -> Iterator[Record]:
        with open(self.path, "rb") as fh:
            fh.seek(pos)
            while pos < part.end:
                raw = fh.readline()
                if not raw:
                    break
                if pos == 0 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                    pos += len(_BOM)
                pos += len(raw)
                raw = raw.removesuffix(b"\n").removesuffix(b"\r")
                rec = self._line_record(raw, line, pos)
                if rec is not None:
                    yield rec
                line += 1

    def _line_record(self, raw: bytes, line: int, next_pos: int) -> Record | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(
                line,
                next_pos,
                None,
                None,
                f"invalid UTF-8 at byte {e.start} of the line ({raw[e.start : e.start + 4]!r})",
            )
        if self.format == "txt":
            return Record(line, next_pos, line, text)
        if not text.strip():
            return None  # blank lines of a .jsonl are not records
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return Record(line, next_pos, None, None, f"invalid JSON: {e.msg} at column {e.colno}")
        if not isinstance(obj, dict):
            return Record(line, next_pos, None, None, f"expected a JSON object, got {type(obj).__name__}")
        return self._fields(obj, line, next_pos)

    def _fields(self, obj: dict[str, Any], line: int, next_pos: int) -> Record:
        rid: str | int | None = line
        if self.id_field is not None:
            if obj.get(self.id_field) is None:
                what = "is null" if self.id_field in obj else "is missing"
                return Record(line, next_pos, None, None, f"id field {self.id_field!r} {what}")
            rid, err = _check_id(obj[self.id_field], self.id_field)
            if err:
                return Record(line, next_pos, None, None, err)
        if self.text_field not in obj:
            return Record(
                line, next_pos, rid, None, f"text field {self.text_field!r} is missing (fields: {sorted(obj)[:10]})"
            )
        text = obj[self.text_field]
        if not isinstance(text, str):
            return Record(
                line,
                next_pos,
                rid,
                None,
                f"text field {self.text_field!r} is {type(text).__name__} ({text!r:.60}), expected a string",
            )
        return Record(line, next_pos, rid, text)

    # ----------------------------------------------------------------------------------------------
    # Parquet

    def _open_parquet(self) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise CorpusError(f"reading {self.path} needs pyarrow: pip install 'embgemma-jax[parquet]'") from e
        try:
            self._parquet = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for a bad file
            raise CorpusError(f"{self.path} is not a readable parquet file: {e}") from e
        schema = self._parquet.schema_arrow
        for role, name in (("text", self.text_field), ("id", self.id_field)):
            if name is None:
                continue
            if name not in schema.names:
                raise CorpusError(f"{self.path}: no {role} column {name!r} (columns: {schema.names})")
            typ = schema.field(name).type
            ok = pa.types.is_string(typ) or pa.types.is_large_string(typ)
            if role == "id":
                ok = ok or pa.types.is_integer(typ)
            if not ok:
                want = "a string or integer" if role == "id" else "a string"
                raise CorpusError(f"{self.path}: {role} column {name!r} has type {typ}; expected {want} column")
        if self._parquet.metadata.num_rows == 0:
            raise CorpusError(f"{self.path} has no rows: nothing to embed")

    def _read_parquet(self, part: Part, pos: int) -> Iterator[Record]:
        meta = self._parquet.metadata
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        groups = [g for g in range(meta.num_row_groups) if starts[g + 1] > pos and starts[g] < part.end]
        if pos >= part.end or not groups:
            return
        columns = [self.text_field] + ([self.id_field] if self.id_field is not None else [])
        row = starts[groups[0]]
        for batch in self._parquet.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
            texts = batch.column(self.text_field).to_pylist()
            ids = batch.column(self.id_field).to_pylist() if self.id_field is not None else None
            for k, text in enumerate(texts):
                r = row + k
                if r < pos:
                    continue
                if r >= part.end:
                    return
                rid: str | int | None = r if ids is None else ids[k]
                if rid is None:
                    yield Record(r, r + 1, None, None, f"id column {self.id_field!r} is null")
                elif text is None:
                    yield Record(r, r + 1, rid, None, f"text column {self.text_field!r} is null")
                else:
                    yield Record(r, r + 1, rid, text)
            row += len(texts)


def open_corpus(path: str | Path, *, text_field: str = "text", id_field: str | None = None) -> Corpus:
    """Opens a ``.txt``, ``.jsonl`` (or ``.ndjson``) or ``.parquet`` corpus for streaming.

    Args:
      path: the input file; its suffix picks the format.
      text_field: field (jsonl) or column (parquet) with the text.
      id_field: field or column with each record's id; None: the line number (txt, jsonl) or row index
        (parquet).

    Raises:
      CorpusError: the file is missing, empty, of an unknown format, or lacks a parquet column.
    """
    return Corpus(path, text_field=text_field, id_field=id_field)
