"""Embedding a whole corpus to disk: streamed, sharded, resumable, on one or many processes.

Each of the ``jax.process_count()`` processes takes one contiguous part of the input (see
``embgemma_jax.corpus``), reads only that part, encodes it on its own local devices (data-parallel over
the model's mesh) and writes only its own shards (see ``embgemma_jax.shards``). Processes meet twice
through JAX's distributed runtime: at the start, to agree on the settings and to number lines across
parts, and at the end, when process 0 gathers every process's shard list and writes the manifest.

A run owns its output directory: each process holds an exclusive lock there for the whole run
(:func:`embgemma_jax.corpus.shards.exclusive_output`), taken before it reads, checks or cleans anything,
so a second run on the same directory stops with an error naming the holder.

A run is resumable: started again with the same settings, each process skips its committed shards and
continues from the input position recorded in its last one. Every commit records the sha256 of the
input read so far (:class:`~embgemma_jax.corpus.readers.InputHash`); a resumed run reads that span again
and refuses to go on if it changed, naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embgemma_jax.batching import check_batching, check_positive_int, check_truncate_dim, tokenize_window
from embgemma_jax.config import MATRYOSHKA_DIMS
from embgemma_jax.corpus import shards
from embgemma_jax.corpus.readers import Corpus, CorpusError, InputHash, Part, Record, open_corpus, short_repr
from embgemma_jax.prompts import resolve_prompt

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma

ON_ERROR = ("raise", "skip")


# ---------------------------------------------------------------------------------------------------
# Talking to the other processes (JAX's distributed runtime; trivial with one process)


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order."""
    import jax

    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(gathered[i, : lengths[i]]).decode("utf-8")) for i in range(len(lengths))]


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------
# The job


def _settings(model: EmbeddingGemma, source: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Everything that decides the output; a resumed run must match it exactly. ``source``: the input's
    path, format and size (its content is checked by the input hashes of the shards)."""
    import jax

    settings = {
        "format_version": shards.FORMAT_VERSION,
        "input": source,
        "model": {"source": str(Path(model.source).resolve()), "config": model.config.to_dict()},
        "dtype": model.dtype.name,
        "quantize": "int8" if model.quantized else None,
        "processes": jax.process_count(),
        **options,
    }
    return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from disk


_ABSENT = object()


def _differences(old: Any, new: Any, name: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, old value, new value) of every leaf setting that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{name}.{k}" if name else k)
        ]
    return [] if old == new else [(name, old, new)]


def _describe(diffs: list[tuple[str, Any, Any]], old_label: str, new_label: str) -> str:
    """``(a, b): a is 1 in ..., 2 in ...; ...`` for a list of differences."""

    def show(v: Any) -> str:
        return "(absent)" if v is _ABSENT else short_repr(v)

    names = ", ".join(n for n, _, _ in diffs)
    details = "; ".join(f"{n} is {show(o)} {old_label}, {show(v)} {new_label}" for n, o, v in diffs[:5])
    return f"({names}): {details}"


def _check_resume(out_dir: Path, run_file: Path, plan: dict[str, Any]) -> None:
    """Writes this process's run file, or checks an existing one against ``plan``."""
    nproc = plan["settings"]["processes"]
    for other in out_dir.glob("run-p*-of-*.json"):
        if not other.name.endswith(f"-of-{nproc:05d}.json"):
            raise ValueError(
                f"{out_dir} was started by a run with a different number of processes ({other.name}); resume it "
                f"with that many processes, or write to a new output directory (this run has {nproc})"
            )
    if not run_file.is_file():
        shards.write_atomic(run_file, shards.json_bytes(plan))
        return
    try:
        stored = json.loads(run_file.read_bytes())
    except (OSError, ValueError) as e:
        raise shards.ShardError(f"{run_file} is not a readable run file: {e}") from e
    if stored == plan:
        return
    diffs = _differences(stored.get("settings"), plan["settings"])
    if diffs:
        what = "different settings " + _describe(diffs, f"in {run_file.name}", "now")
    else:  # same settings, yet the input splits into other lines: it changed
        what = "another version of the input (it changed) " + _describe(
            _differences(stored, plan), f"in {run_file.name}", "now"
        )
    raise ValueError(
        f"{out_dir} holds an unfinished or finished run with {what}; rerun with the settings recorded in "
        f"{run_file}, or write to a new output directory"
    )


def embed_corpus(
    model: EmbeddingGemma,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    prompt_name: str | None = "document",
    prompt: str | None = None,
    truncate_dim: int | None = None,
    on_error: str = "raise",
    shard_size: int = 10_000,
    batch_size: int = 32,
    token_budget: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embeds every record of ``input_path`` into shards under ``output_dir``; resumes an unfinished run.

    In a multi-process run (after ``jax.distributed.initialize``) every process calls this with the same
    arguments; each reads and writes only its own part. Read the result with
    :func:`embgemma_jax.read_embeddings`.

    Args:
      model: the encoder; give it a mesh (``from_pretrained(..., mesh=make_mesh())``) to use every local device.
      input_path: a ``.txt`` (one text per line), ``.jsonl`` or ``.parquet`` file.
      output_dir: created if missing; an unfinished run there with the same settings is continued.
      text_field: field (jsonl) or column (parquet) with the text.
      id_field: field or column with the id; None: line number (txt, jsonl, 1-based) or row (parquet, 0-based).
      prompt_name: a key of ``model.prompts`` prepended to every text (default "document").
      prompt: an explicit prompt; wins over prompt_name ("" for none).
      truncate_dim: keep the first truncate_dim dimensions (Matryoshka; not re-normalized).
      on_error: "raise" stops at the first malformed record with its file and line; "skip" logs it to
        ``errors-pXXXXX.jsonl``, counts it in the manifest and goes on.
      shard_size: input records per shard (and per commit: at most this much work is lost to a crash).
      batch_size: rows per forward pass, at most; whatever is asked, the batch planner bounds every
        device batch to :data:`embgemma_jax.batching.MAX_BATCH_TOKENS` padded tokens.
      token_budget: pack each batch with up to this many padded tokens (rows x padded length) instead of
        a fixed batch_size rows; the embeddings are the same.
      progress: show a progress bar (docs/s, ETA) on process 0.

    Returns:
      The manifest (also written to ``output_dir/manifest.json``).

    Raises:
      ValueError: a bad argument, or a run with other settings in ``output_dir``.
      CorpusError: the input cannot be read, a malformed record with on_error="raise" (names file:line),
        or the input changed since an unfinished run there embedded part of it.
      ShardError: ``output_dir`` cannot be written, is being written by another run (names it), or holds
        damaged shards.
    """
    import jax

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    check_positive_int(shard_size, "shard_size")
    check_batching(batch_size, token_budget)
    corpus = open_corpus(input_path, text_field=text_field, id_field=id_field)
    prompt_text = resolve_prompt(model.prompts, prompt_name, prompt) or ""
    dim = check_truncate_dim(truncate_dim, model.config.embedding_dim, MATRYOSHKA_DIMS)
    out_dir = shards.prepare_output_dir(output_dir)
    nproc, proc = jax.process_count(), jax.process_index()
    with shards.exclusive_output(out_dir, proc):
        source = corpus.fingerprint()
        edges = source.pop("edges_sha256")  # compared across processes, not across resumes
        settings = _settings(
            model,
            source,
            text_field=text_field if corpus.format != "txt" else None,
            id_field=id_field,
            prompt=prompt_text,
            dim=dim,
            on_error=on_error,
            shard_size=shard_size,
        )
        part = corpus.parts(nproc)[proc]
        lines = corpus.count(part)
        mine = {"settings": settings, "input_edges_sha256": edges}
        peers = _allgather_json({**mine, "lines": lines})
        for i, peer in enumerate(peers):
            theirs = {k: peer[k] for k in mine}
            if theirs != mine:
                diffs = _differences(theirs, mine)
                raise ValueError(
                    f"process {i} runs with other settings than process {proc} "
                    + _describe(diffs, f"in process {i}", f"in process {proc}")
                )
        first_line = part.start if corpus.format == "parquet" else 1 + sum(p["lines"] for p in peers[:proc])
        plan = {
            "settings": settings,
            "process": proc,
            "part": [part.start, part.end],
            "first_line": first_line,
            "lines": lines,
        }
        _check_resume(out_dir, out_dir / f"run-p{proc:05d}-of-{nproc:05d}.json", plan)

        done = shards.committed_shards(out_dir, proc)
        hasher = _resume_hash(corpus, part, done, out_dir, proc)
        line = done[-1]["next_line"] if done else first_line
        bar = _progress_bar(corpus, lines, line - first_line, proc, nproc, enabled=progress and proc == 0)
        job = _ShardJob(
            model=model,
            corpus=corpus,
            out_dir=out_dir,
            process=proc,
            index=len(done),
            line=line,
            hasher=hasher,
            prompt=prompt_text,
            dim=dim,
            on_error=on_error,
            batch_size=batch_size,
            token_budget=token_budget,
            bar=bar,
        )
        try:
            _run(job, corpus.read(part, hasher.position, line, hasher), shard_size, on_error)
        finally:
            if bar is not None:
                bar.close()  # before any error message, so that starts on a line of its own
        return _finish(out_dir, settings, proc, first_line, lines)


def _run(job: _ShardJob, records: Iterator[Record], shard_size: int, on_error: str) -> None:
    """Commits ``records`` in shards of ``shard_size``."""
    pending: list[Record] = []
    for rec in records:
        if rec.error is not None and on_error == "raise":
            raise CorpusError(
                f"{job.corpus.location(rec.line)}: {rec.error} (fix the input, or pass --on-error skip / "
                "on_error='skip' to log such records and go on)"
            )
        pending.append(rec)
        if len(pending) == shard_size:
            job.commit(pending)
            pending = []
    if pending:
        job.commit(pending)


def _resume_hash(corpus: Corpus, part: Part, done: list[dict[str, Any]], out_dir: Path, proc: int) -> InputHash:
    """The input hash to go on from: after the last committed shard, checked against the one it recorded."""
    if not done:
        return corpus.start_hash(part)
    last = done[-1]
    hasher = corpus.input_hash(part, last["next_position"])
    if hasher.hexdigest() != last.get("input_sha256"):
        record = out_dir / shards.SHARD_DIR / f"{shards.shard_stem(proc, last['index'])}.json"
        unit, start = "rows" if corpus.format == "parquet" else "bytes", corpus.start_hash(part).position
        raise CorpusError(
            f"{corpus.path} changed since this run embedded part of it: its {unit} [{start}, "
            f"{last['next_position']}) (up to line {last['next_line'] - 1}, in shards 0..{last['index']} of process "
            f"{proc}) no longer match the sha256 recorded in {record}; restore that input, or write to a new output "
            "directory"
        )
    return hasher


def _progress_bar(corpus: Corpus, total: int, initial: int, proc: int, nproc: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    where = f" (process {proc} of {nproc}, its own part)" if nproc > 1 else ""
    return tqdm(
        total=total,
        initial=initial,
        unit="doc",
        unit_scale=True,
        desc=f"embed {corpus.path.name}{where}",
        file=sys.stderr,
        dynamic_ncols=True,
    )


@dataclasses.dataclass(kw_only=True)
class _ShardJob:
    """Encodes a shard's worth of records and commits it."""

    model: EmbeddingGemma
    corpus: Corpus
    out_dir: Path
    process: int
    index: int  # the next shard's index
    line: int  # the next input line (row) to be committed
    hasher: InputHash  # fed by the reader; at each commit it covers the input up to the shard's last record
    prompt: str
    dim: int
    on_error: str
    batch_size: int
    token_budget: int | None
    bar: Any  # a tqdm bar or None

    def commit(self, records: list[Record]) -> None:
        good = [r for r in records if r.error is None]
        errors = {r.line: r.error for r in records if r.error is not None}
        emb = np.empty((len(good), self.dim), np.float32)
        ok = np.ones(len(good), bool)
        window = tokenize_window(self.batch_size, self.token_budget)  # texts per encode call: progress granularity
        for start in range(0, len(good), window):
            chunk = good[start : start + window]
            emb[start : start + len(chunk)], ok[start : start + len(chunk)] = self._encode(chunk, errors)
            if self.bar is not None:
                self.bar.update(len(chunk))
        kept = [r for r, k in zip(good, ok, strict=True) if k]
        error_list = [{"location": self.corpus.location(n), "line": n, "error": e} for n, e in sorted(errors.items())]
        if self.hasher.position != records[-1].next_position:
            raise AssertionError(f"input hash at {self.hasher.position}, shard ends at {records[-1].next_position}")
        info = {
            "records": len(records),
            "errors": error_list,
            "start_line": self.line,
            "first_line": records[0].line,
            "next_line": records[-1].line + 1,
            "next_position": records[-1].next_position,
            "input_sha256": self.hasher.hexdigest(),
        }
        shards.commit_shard(self.out_dir, self.process, self.index, emb[ok], [r.id for r in kept], info)
        self.index += 1
        if self.bar is not None:  # lines that were not texts: skipped records, blank .jsonl lines
            self.bar.update(records[-1].line + 1 - self.line - len(good))
        self.line = records[-1].line + 1

    def _encode(self, chunk: list[Record], errors: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of chunk's texts and which ones worked. A text the model refuses (e.g. a token id
        outside its embedding table) is found by encoding one by one, and is an error of its record."""
        texts = [r.text for r in chunk]
        try:
            return self.model.encode(
                texts,
                prompt=self.prompt,
                batch_size=self.batch_size,
                truncate_dim=self.dim,
                token_budget=self.token_budget,
            ), np.ones(len(texts), bool)
        except ValueError:
            pass
        out, ok = np.zeros((len(texts), self.dim), np.float32), np.ones(len(texts), bool)
        for i, rec in enumerate(chunk):
            try:
                out[i] = self.model.encode([rec.text], prompt=self.prompt, truncate_dim=self.dim)[0]
            except ValueError as e:
                if self.on_error == "raise":
                    raise CorpusError(f"{self.corpus.location(rec.line)}: cannot embed this text: {e}") from e
                errors[rec.line] = f"cannot embed this text: {e}"
                ok[i] = False
        return out, ok


def _finish(out_dir: Path, settings: dict[str, Any], proc: int, first_line: int, lines: int) -> dict[str, Any]:
    """Writes this process's errors file, gathers every process's shard list; process 0 writes the manifest."""
    done = shards.committed_shards(out_dir, proc)
    n_errors = sum(len(rec["errors"]) for rec in done)
    errors_file = f"errors-p{proc:05d}.jsonl"
    if n_errors:
        rows = [
            json.dumps({"file": settings["input"]["path"], **e}, ensure_ascii=False)
            for rec in done
            for e in rec["errors"]
        ]
        shards.write_atomic(out_dir / errors_file, shards.utf8("\n".join(rows) + "\n"))
    summary = {
        "process": proc,
        "first_line": first_line,
        "lines": lines,
        "next_line": done[-1]["next_line"] if done else first_line,
        "documents": sum(rec["rows"] for rec in done),
        "errors": n_errors,
        "errors_file": errors_file if n_errors else None,
        "shards": len(done),
        "input_sha256": done[-1]["input_sha256"] if done else None,
    }
    entries = [
        {
            "process": proc,
            "index": rec["index"],
            "rows": rec["rows"],
            "records": rec["records"],
            "errors": len(rec["errors"]),
            "start_line": rec["start_line"],
            "next_line": rec["next_line"],
            "files": rec["files"],
        }
        for rec in done
    ]
    gathered = _allgather_json({"summary": summary, "entries": entries})
    summaries = [g["summary"] for g in gathered]
    manifest = {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "dim": settings["dim"],
        "dtype": "float32",
        "documents": sum(s["documents"] for s in summaries),
        "errors": sum(s["errors"] for s in summaries),
        "errors_files": [s["errors_file"] for s in summaries if s["errors_file"]],
        "settings": settings,
        "processes": summaries,
        "shards": [entry for g in gathered for entry in g["entries"]],
    }
    shards.check_manifest(out_dir, manifest)
    if proc == 0:
        shards.write_manifest(out_dir, manifest)
    _barrier("embgemma_jax.embed_corpus.manifest")
    return manifest
