"""A corpus of many files: input patterns, their order, and how processes share the work.

``--input`` takes one or more local paths or fsspec URLs (``memory://``, ``gs://`` with gcsfs, ``s3://``
with s3fs, ``hf://datasets/...`` through huggingface_hub's ``HfFileSystem``), each possibly a glob
(``*``, ``?``, ``[...]``, ``**``). The corpus is the files in this order: the patterns in the order
given; the files of one pattern sorted by their path (code point order, as Python sorts strings).
Directories matched by a glob are passed over (``**`` lists their files); a pattern that matches no file,
a file named by two patterns, and a file of an unknown format are errors naming them.

Processes share the work by bytes: the files are laid end to end (their stored sizes) and process p
takes the byte range [p * total / P, (p + 1) * total / P). A plain ``.txt``/``.jsonl`` file that a range
boundary crosses is cut there (a line belongs to the process holding its first byte); a ``.parquet`` file
is cut at the row in proportion; a compressed file cannot be entered in the middle and goes whole to the
process whose range holds its first byte. Each process reads only its own *pieces*.

Positions: a record is located by (file index, line) -- the 1-based line of a ``.txt``/``.jsonl`` file,
the 0-based row of a ``.parquet`` file. Part boundaries are positions too; the end of file k is written
as the start of file k + 1 (``(n, 0)`` is the end of the input), so the parts of all processes tile the
input: each part starts where the one before it ends.

Ids: with ``id_field`` None, a record's id is its line (row) when the corpus is one file, and the string
``"FILE:LINE"`` (``FILE`` as the corpus names it: an absolute path or a URL) when it has several.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from embgemma_jax.corpus.readers import (
    UNBOUNDED,
    CorpusError,
    InputFile,
    InputHash,
    Part,
    Record,
    _KeyedHash,
    file_format,
    file_metadata,
    resolve,
    stat_input,
)

GLOB_CHARS = "*?["

Position = tuple[int, int]  # (file index, line or row)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A contiguous share of one file: [start, end) in bytes (plain txt, jsonl) or rows (parquet); ``end``
    is :data:`UNBOUNDED` when the piece runs to the end of the file. ``weight``: its stored bytes."""

    file: int
    start: int
    end: int
    weight: int

    @property
    def to_end(self) -> bool:
        return self.end == UNBOUNDED


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """What one process reads: its pieces in order, the line (row) number each starts at, and the
    positions where its part starts and ends."""

    process: int
    pieces: tuple[Piece, ...]
    first_lines: tuple[int, ...]
    start: Position
    end: Position

    def to_json(self) -> dict[str, Any]:
        return {
            "pieces": [[p.file, p.start, None if p.to_end else p.end] for p in self.pieces],
            "first_lines": list(self.first_lines),
            "start": list(self.start),
            "end": list(self.end),
        }


def _has_glob(text: str) -> bool:
    if "://" in text:
        text = text.split("://", 1)[1]
    return any(c in text for c in GLOB_CHARS)


def expand_inputs(patterns: str | Path | Sequence[str | Path]) -> list[tuple[Any, str, str, int, Any, Any]]:
    """The files named by ``patterns``, in corpus order (see the module docstring), each as
    ``(fs, path, url, size, mtime, checksum)``.

    Raises:
      CorpusError: no pattern, a pattern that matches no file, a file named twice, a named file that is
        missing, a directory or not a regular file, or a file of an unsupported format (names it).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise CorpusError("no input: give at least one file or pattern")
    seen: dict[str, int] = {}
    out = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern:
            raise CorpusError(f"input pattern {i + 1} is {pattern!r}; expected a path or URL")
        if not _has_glob(pattern):
            matches = [stat_input(pattern)]
        else:
            matches = _glob(pattern)
            if not matches:
                raise CorpusError(f"input pattern {pattern!r} matches no file")
        for entry in matches:
            url = entry[2]
            if url in seen:
                j = seen[url]
                raise CorpusError(
                    f"input file {url} is named twice (by pattern {j + 1}, {patterns[j]!r}, and pattern {i + 1}, "
                    f"{pattern!r}); name each file once"
                )
            seen[url] = i
            file_format(url)
            out.append(entry)
    return out


def _glob(pattern: str) -> list[tuple[Any, str, str, int, Any, Any]]:
    fs, path, _ = resolve(pattern)
    if fs is None:
        import glob

        names = sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
        return [stat_input(p) for p in names]
    try:
        found = fs.glob(path, detail=True)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CorpusError(f"cannot list input pattern {pattern!r}: {e}") from None
    out = []
    for p in sorted(found):
        info = found[p]
        if info.get("type") == "directory":
            continue
        mtime, checksum = file_metadata(info)
        out.append((fs, p, fs.unstrip_protocol(p), int(info.get("size") or 0), mtime, checksum))
    return out


class Corpus:
    """The files of one or more input patterns, read as one corpus.

    Args:
      inputs: a path, URL or glob, or a sequence of them (see the module docstring for the order).
      text_field: the field (jsonl) or column (parquet) holding the text; unused for txt.
      id_field: the field or column holding the id, or None for positional ids.

    Raises:
      CorpusError: see :func:`expand_inputs`; also when every file is empty.
    """

    def __init__(
        self, inputs: str | Path | Sequence[str | Path], *, text_field: str = "text", id_field: str | None = None
    ) -> None:
        entries = expand_inputs(inputs)
        self.files = [
            InputFile(
                url,
                fs=fs,
                path=path,
                size=size,
                mtime=mtime,
                checksum=checksum,
                text_field=text_field,
                id_field=id_field,
                index=k,
            )
            for k, (fs, path, url, size, mtime, checksum) in enumerate(entries)
        ]
        self.text_field, self.id_field = text_field, id_field
        if sum(f.size for f in self.files) == 0:
            if len(self.files) == 1:
                raise CorpusError(f"{self.files[0].url} is empty (0 bytes): nothing to embed")
            raise CorpusError(f"all {len(self.files)} input files are empty (0 bytes): nothing to embed")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def formats(self) -> list[str]:
        return sorted({f.format for f in self.files})

    def describe(self) -> list[dict[str, Any]]:
        """Every file's name, format, compression, size (and store checksum): the input in a run's settings."""
        return [f.describe() for f in self.files]

    def mtimes(self) -> list[str | None]:
        return [f.mtime for f in self.files]

    def location(self, file: int, line: int) -> str:
        """``path:line`` (txt, jsonl) or ``path row N`` (parquet)."""
        return self.files[file].location(line)

    def where(self, pos: Position | Sequence[int]) -> str:
        """A position in words: ``path:line``, ``path row N``, or "the end of the input"."""
        file, line = pos
        return "the end of the input" if file >= len(self.files) else self.location(file, line)

    def file_start(self, k: int) -> Position:
        """The position of file k's first record (the end of file k - 1); ``(n, 0)``: the end of the input."""
        return (k, self.files[k].base_line) if k < len(self.files) else (len(self.files), 0)

    # ----------------------------------------------------------------------------------------------
    # Sharing the work

    def split(self, nproc: int) -> list[list[Piece]]:
        """Each process's pieces (see the module docstring). Reads only the parquet footers of files that a
        range boundary cuts."""
        total = sum(f.size for f in self.files)
        bounds = [total * p // nproc for p in range(nproc + 1)]
        parts: list[list[Piece]] = [[] for _ in range(nproc)]

        def owner(offset: int) -> int:
            return next((p for p in range(nproc) if bounds[p] <= offset < bounds[p + 1]), nproc - 1)

        offset = 0
        for k, f in enumerate(self.files):
            w = f.size
            overlaps = [p for p in range(nproc) if max(bounds[p], offset) < min(bounds[p + 1], offset + w)]
            if not f.splittable or w == 0 or len(overlaps) == 1:
                parts[owner(offset) if len(overlaps) != 1 else overlaps[0]].append(Piece(k, 0, UNBOUNDED, w))
            else:
                pieces = []
                for p in overlaps:
                    a, b = max(bounds[p], offset) - offset, min(bounds[p + 1], offset + w) - offset
                    if f.format == "parquet":
                        a, b = f.rows * a // w, f.rows * b // w
                    pieces.append((p, Piece(k, a, b, min(bounds[p + 1], offset + w) - max(bounds[p], offset))))
                last_p, last = pieces[-1]
                pieces[-1] = (last_p, dataclasses.replace(last, end=UNBOUNDED))
                kept = [(p, pc) for p, pc in pieces if pc.to_end or pc.start < pc.end]
                if not kept:  # cannot happen: the last piece runs to the end
                    raise AssertionError(f"no piece of {f.url}")
                for p, pc in kept:
                    parts[p].append(pc)
            offset += w
        return parts

    def tail_count(self, pieces: Sequence[Piece]) -> int | None:
        """Lines in the last piece of a process when a later process continues its file (a plain txt/jsonl
        file cut there); None otherwise. Reads that piece."""
        if not pieces or pieces[-1].to_end or self.files[pieces[-1].file].format == "parquet":
            return None
        last = pieces[-1]
        return self.files[last.file].count(Part(last.start, last.end))

    def layout(self, parts: Sequence[Sequence[Piece]], tail_counts: Sequence[int | None]) -> list[PartPlan]:
        """Every process's :class:`PartPlan`, from :meth:`split` and every process's :meth:`tail_count`."""
        next_line: dict[int, int] = {}
        cursor = self.file_start(0)
        plans = []
        for p, pieces in enumerate(parts):
            firsts = []
            for pc in pieces:
                f = self.files[pc.file]
                if f.format == "parquet":
                    firsts.append(pc.start)
                else:
                    firsts.append(1 if pc.start == 0 else next_line[pc.file])
            start = (pieces[0].file, firsts[0]) if pieces else cursor
            if start != cursor:
                raise AssertionError(f"process {p} starts at {start}, the one before it ends at {cursor}")
            if not pieces:
                end = start
            elif pieces[-1].to_end:
                end = self.file_start(pieces[-1].file + 1)
            elif self.files[pieces[-1].file].format == "parquet":
                end = (pieces[-1].file, pieces[-1].end)
            else:
                end = (pieces[-1].file, firsts[-1] + tail_counts[p])
                next_line[pieces[-1].file] = end[1]
            plans.append(PartPlan(p, tuple(pieces), tuple(firsts), start, end))
            cursor = end
        if cursor != self.file_start(len(self.files)):
            raise AssertionError(f"the parts end at {cursor}, not at the end of the input")
        return plans

    def check(self, plan: PartPlan) -> None:
        """Checks the files of a part before reading them (decompressors, parquet footers and columns)."""
        for pc in plan.pieces:
            self.files[pc.file].check()

    # ----------------------------------------------------------------------------------------------
    # Reading

    def read(self, plan: PartPlan, resume: Sequence[int] | None = None, hasher: InputHash | None = None):
        """Records of ``plan`` in order, from ``resume`` = (file, position, line) (default: the start).
        ``hasher`` (at ``resume``) is fed what is read, per file, up to the last record."""
        for j, pc in enumerate(plan.pieces):
            if resume is not None and pc.file < resume[0]:
                continue
            f = self.files[pc.file]
            if resume is not None and pc.file == resume[0]:
                pos, line = resume[1], resume[2]
            else:
                pos, line = None, plan.first_lines[j]
            h = _KeyedHash(hasher, pc.file) if hasher is not None else None
            for rec in f.read(Part(pc.start, pc.end), pos, line, h):
                if self.id_field is None and len(self.files) > 1 and rec.id is not None:
                    rec = dataclasses.replace(rec, id=f"{f.url}:{rec.line}")
                yield rec
        if hasher is not None:
            hasher.rollback()

    def input_hash(self, plan: PartPlan, resume: Sequence[int] | None) -> InputHash:
        """The :class:`InputHash` :meth:`read` builds from the start of ``plan`` up to ``resume`` = (file,
        position, ...): reads that span again, in full."""
        first = plan.pieces[0].file if plan.pieces else 0
        h = InputHash(0, first)
        if resume is None:
            return h
        target = (resume[0], resume[1])
        for rec in self.read(plan, None, h):
            if (rec.file, rec.next_position) >= target:
                break
        return h

    def span(self, plan: PartPlan, file: int, resume: Sequence[int] | None) -> str:
        """What of ``file`` a part had read up to ``resume``, in words: ``bytes [a, b)`` or ``rows [a, b)``."""
        j = next(j for j, pc in enumerate(plan.pieces) if pc.file == file)
        pc, f = plan.pieces[j], self.files[file]
        start = f.first_position(Part(pc.start, pc.end))
        unit = "rows" if f.format == "parquet" else "bytes" if f.compression is None else "decompressed bytes"
        if resume is not None and resume[0] == file:
            end = resume[1]
        elif not pc.to_end:
            end = pc.end
        elif f.compression is None:
            end = f.extent()
        else:
            return f"its {unit} from {start} to its end"
        return f"its {unit} [{start}, {end})"

    def weight(self, plan: PartPlan) -> int:
        """Stored bytes of a part (for progress)."""
        return sum(pc.weight for pc in plan.pieces)

    def bytes_done(self, plan: PartPlan, file: int, position: int, consumed: int | None = None) -> int:
        """Stored bytes of ``plan`` read up to ``position`` in ``file`` (a record's next_position; inside a
        compressed file, ``consumed`` stored bytes) -- approximate inside parquet row ranges; for progress."""
        done = 0
        for pc in plan.pieces:
            if pc.file != file:
                done += pc.weight
                continue
            f = self.files[pc.file]
            if f.format == "parquet":
                rows = f.rows
                within = (position - pc.start) * f.size // rows if rows else 0
            elif f.compression is not None:
                within = consumed or 0
            else:
                within = position - pc.start
            return done + max(0, min(pc.weight, within))
        return done

    def first_id_kind(self) -> str:
        """The type of the first id of the corpus ("int" or "string"): the type of the id column of a parquet
        file, else of the first readable id in the files, in order. Positional ids: "int" for one file,
        "string" for several."""
        if self.id_field is None:
            return "int" if len(self.files) == 1 else "string"
        for f in self.files:
            if f.format == "parquet":
                if f.size > 0:
                    return f.id_kind
                continue
            for rec in f.read(f.parts(1)[0]):
                if rec.id is not None:
                    return "int" if isinstance(rec.id, int) else "string"
        return "string"


def iter_plan(corpus: Corpus, plan: PartPlan) -> Iterator[Record]:
    """All records of a part from its start (a convenience for tests and tools)."""
    return corpus.read(plan)
