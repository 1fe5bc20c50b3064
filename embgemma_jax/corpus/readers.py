"""Streaming corpus readers: ``.txt`` (one text per line), ``.jsonl`` and ``.parquet``.

A corpus is read in contiguous *parts* (one per process) and, within a part, from a resume *position*,
one record at a time, so memory stays bounded whatever the corpus size. Each process reads only its part:

* ``.txt`` / ``.jsonl``: part p is the byte range [p * size / P, (p + 1) * size / P); a line belongs to
  the part holding its first byte. Positions are byte offsets of line starts. Only ``\\n`` ends a line
  (a ``\\r`` before it is dropped too; ``\\f``, ``\\v``, U+2028 and the like are text); a UTF-8
  byte-order mark at the start of the file is dropped. :func:`read_text_lines` (``embed --input``)
  splits by the same rule.
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
(missing, a directory or a pipe, empty, unknown format, a missing or mistyped parquet column) raise
:class:`CorpusError`. In ``.jsonl``, blank lines are not records and are passed over; in ``.txt`` every
line is a text, the empty line included.

Input hashes: :meth:`Corpus.read` feeds what it reads to an :class:`InputHash` (the raw bytes of every line
for txt/jsonl, the id and text of every row for parquet), so a resumed run can check, with
:meth:`Corpus.input_hash`, that the input it already embedded is still the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import reprlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
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


class InputHash:
    """sha256 of the input read so far in a part, and the position it reaches.

    Lines that are not records (blank ``.jsonl`` lines) are hashed tentatively: :meth:`rollback` drops them
    when no record follows, so the hash always covers exactly [part start, last record's next_position).
    """

    def __init__(self, position: int) -> None:
        self.position = position
        self._h = hashlib.sha256()
        self._saved: tuple[Any, int] | None = None

    def update(self, data: bytes, position: int, *, record: bool = True) -> None:
        if not record and self._saved is None:
            self._saved = (self._h.copy(), self.position)
        elif record:
            self._saved = None
        self._h.update(data)
        self.position = position

    def rollback(self) -> None:
        """Forgets what was hashed since the last record."""
        if self._saved is not None:
            self._h, self.position = self._saved
            self._saved = None

    def hexdigest(self) -> str:
        return self._h.hexdigest()


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


def _check_input_file(path: Path, *, what: str, regular: bool) -> None:
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


class Corpus:
    """A corpus file opened for streaming. Use :func:`open_corpus`.

    Args:
      path: the input file.
      text_field: the field (jsonl) or column (parquet) holding the text; unused for txt.
      id_field: the field or column holding the id, or None for positional ids.
    """

    def __init__(self, path: str | Path, *, text_field: str = "text", id_field: str | None = None) -> None:
        self.path = Path(path)
        _check_input_file(self.path, what="input file", regular=True)
        suffix = self.path.suffix.lower()
        if suffix not in SUPPORTED:
            raise CorpusError(
                f"{self.path}: unsupported input format {suffix or '(no suffix)'!r}; expected one of {list(SUPPORTED)} "
                "(compressed files must be decompressed first)"
            )
        self.format = "txt" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else "parquet"
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
        """Path, format, size and the sha256 of the first and last MiB: a quick check that every process
        sees the same file. What a resume depends on is checked in full by :meth:`input_hash`."""
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

    def start_hash(self, part: Part) -> InputHash:
        """An empty :class:`InputHash` at the start of ``part``."""
        return InputHash(part.start if self._parquet is not None else self._first_line_start(part))

    def input_hash(self, part: Part, end: int) -> InputHash:
        """The :class:`InputHash` :meth:`read` would have built from the start of ``part`` up to ``end`` (a
        :attr:`Record.next_position`): reads that span of the input again, in full."""
        h = self.start_hash(part)
        if self._parquet is not None:
            for _ in self._read_parquet(Part(part.start, end), part.start, h):
                pass
            return h
        pos = h.position
        with open(self.path, "rb") as fh:
            fh.seek(pos)
            while pos < end:
                buf = fh.read(min(_READ_CHUNK, end - pos))
                if not buf:
                    break
                pos += len(buf)
                h.update(buf, pos)
        return h

    # ----------------------------------------------------------------------------------------------
    # Reading

    def read(
        self, part: Part, position: int | None = None, first_line: int = 1, hasher: InputHash | None = None
    ) -> Iterator[Record]:
        """Records of ``part`` from ``position`` (a value of :attr:`Record.next_position`; default: the
        part's start). ``first_line`` is the line number (row index for parquet) of the record there.
        ``hasher`` (at ``position``) is fed what is read, up to the last record's next_position."""
        if self._parquet is not None:
            yield from self._read_parquet(part, part.start if position is None else position, hasher)
        else:
            yield from self._read_lines(
                part, self._first_line_start(part) if position is None else position, first_line, hasher
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

    def _read_lines(self, part: Part, pos: int, line: int, hasher: InputHash | None) -> Iterator[Record]:
        if pos >= part.end:
            return
        with open(self.path, "rb") as fh:
            fh.seek(pos)
            for raw, content, next_pos in _lines(fh, pos):
                rec = self._line_record(content, line, next_pos)
                if hasher is not None:
                    hasher.update(raw, next_pos, record=rec is not None)
                if rec is not None:
                    yield rec
                line += 1
                if next_pos >= part.end:
                    break
        if hasher is not None:
            hasher.rollback()

    def _line_record(self, content: bytes, line: int, next_pos: int) -> Record | None:
        text, error = _decode(content)
        if error is not None:
            return Record(line, next_pos, None, None, error)
        if self.format == "txt":
            return Record(line, next_pos, line, text)
        if not text.strip():
            return None  # blank lines of a .jsonl are not records
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return Record(line, next_pos, None, None, f"invalid JSON: {e.msg} at column {e.colno}")
        except ValueError as e:  # an integer literal longer than int() parses (sys.get_int_max_str_digits())
            return Record(line, next_pos, None, None, f"invalid JSON: {str(e).split(';')[0]}")
        except RecursionError:
            return Record(line, next_pos, None, None, "invalid JSON: nested too deeply to parse")
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
            fields = short_repr(sorted(obj)[:10])
            return Record(line, next_pos, rid, None, f"text field {self.text_field!r} is missing (fields: {fields})")
        text = obj[self.text_field]
        if not isinstance(text, str):
            return Record(
                line,
                next_pos,
                rid,
                None,
                f"text field {self.text_field!r} is {type(text).__name__} ({short_repr(text)}), expected a string",
            )
        if m := _SURROGATE.search(text):
            return Record(
                line,
                next_pos,
                rid,
                None,
                f"text field {self.text_field!r} holds a lone surrogate ({m.group()!r} at character {m.start()}), "
                "which is not text",
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

    def _read_parquet(self, part: Part, pos: int, hasher: InputHash | None = None) -> Iterator[Record]:
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
                if hasher is not None:
                    hasher.update(json.dumps([None if ids is None else rid, text]).encode() + b"\n", r + 1)
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
      CorpusError: the file is missing, not a regular file, empty, of an unknown format, or lacks a parquet
        column.
    """
    return Corpus(path, text_field=text_field, id_field=id_field)
