"""Embedding a whole corpus: streamed, sharded, resumable, on one or many processes.

Each of the ``jax.process_count()`` processes takes one contiguous part of the input (by files and byte
or row ranges: see ``embgemma_jax.corpus.sources``), reads only that part, encodes it on its own local
devices (data-parallel over the model's mesh) and writes only its own shards (see
``embgemma_jax.corpus.shards``), to a local directory or an object store. Processes meet twice through
JAX's distributed runtime: at the start, to agree on the settings and to number the lines of files cut
between them, and at the end, when process 0 gathers every process's shard list and writes the manifest.
No process reads another's files, so hosts need not share a filesystem.

A run owns its output: each process holds an exclusive lock there for the whole run
(:func:`embgemma_jax.corpus.store.exclusive_output`), taken before it reads, checks or cleans anything,
so a second run on the same output stops with an error naming the holder.

A run is resumable: started again with the same settings, each process skips its committed shards and
continues from the input position recorded in its last one, across files. The run file records every
input file's name, size, modification time and (where the store keeps one) checksum; a file that differs
on resume is an error naming it. Every commit also records the sha256 of the input read so far, per file
(:class:`~embgemma_jax.corpus.readers.InputHash`); a resumed run reads that span again and refuses to go
on if it changed, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embgemma_jax.batching import check_positive_int, check_truncate_dim, tokenize_window
from embgemma_jax.config import MATRYOSHKA_DIMS
from embgemma_jax.corpus import shards
from embgemma_jax.corpus.progress import Progress
from embgemma_jax.corpus.readers import CorpusError, InputHash, Record, short_repr
from embgemma_jax.corpus.sources import Corpus, PartPlan
from embgemma_jax.corpus.store import Lock, Store
from embgemma_jax.prompts import resolve_prompt

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma

ON_ERROR = ("raise", "skip")
INT64 = (-(2**63), 2**63 - 1)


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
# Settings and resume checks


def _settings(model: EmbeddingGemma, corpus: Corpus, **options: Any) -> dict[str, Any]:
    """Everything that decides the output; a resumed run must match it exactly. The input is its files'
    names, formats, sizes (and store checksums); their content is checked by the shards' input hashes."""
    import jax

    settings = {
        "format_version": shards.FORMAT_VERSION,
        "input": {"files": corpus.describe()},
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

    names = ", ".join(n for n, _, _ in diffs[:10]) + (", ..." if len(diffs) > 10 else "")
    details = "; ".join(f"{n} is {show(o)} {old_label}, {show(v)} {new_label}" for n, o, v in diffs[:5])
    return f"({names}): {details}"


def _agree(settings: dict[str, Any], tail: int | None, proc: int, problem: str | None) -> list[int | None]:
    """Checks that no process found a problem in its input and that every process runs with the same
    settings; returns every process's tail count."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    peers = _allgather_json({"settings_sha256": digest, "tail": tail, "problem": problem})
    for i, peer in enumerate(peers):
        if peer["problem"] is not None:
            raise CorpusError(peer["problem"] if i == proc else f"process {i} stopped: {peer['problem']}")
    if any(p["settings_sha256"] != digest for p in peers):
        for i, theirs in enumerate(_allgather_json(settings)):  # every process sees the mismatch: all gather
            if theirs != settings:
                raise ValueError(
                    f"process {i} runs with other settings than process {proc} "
                    + _describe(_differences(theirs, settings), f"in process {i}", f"in process {proc}")
                )
    return [p["tail"] for p in peers]


def _check_inputs(stored: dict[str, Any], run: dict[str, Any], run_file: str) -> None:
    """Raises CorpusError naming an input file that was added, removed or changed since ``stored``."""
    try:
        old = stored["settings"]["input"]["files"]
        old_urls = [f["url"] for f in old]
    except (KeyError, TypeError):
        return  # not a run file of this version: the settings comparison reports it
    new = run["settings"]["input"]["files"]
    new_urls = [f["url"] for f in new]
    hint = "; restore the input of that run, or write to a new output directory"
    if old_urls != new_urls:
        added = [u for u in new_urls if u not in set(old_urls)]
        gone = [u for u in old_urls if u not in set(new_urls)]
        what = [f"{u} is new" for u in added[:5]] + [f"{u} is gone" for u in gone[:5]]
        if not what:
            what = ["the same files are in another order"]
        raise CorpusError(
            f"the input files differ from those of the run recorded in {run_file}: {'; '.join(what)}{hint}"
        )
    for o, n in zip(old, new, strict=True):
        if o != n:
            diffs = _differences(o, n)
            details = "; ".join(f"{k} {short_repr(a)} then, {short_repr(b)} now" for k, a, b in diffs)
            raise CorpusError(f"input {n['url']} changed since this run started ({details}){hint}")
    for url, then, now in zip(new_urls, stored.get("mtimes") or [], run["mtimes"], strict=False):
        if then != now:
            raise CorpusError(
                f"input {url} changed since this run started (modified {now}; the run recorded {then} in "
                f"{run_file}){hint}"
            )


def _check_resume(store: Store, run_name: str, run: dict[str, Any]) -> None:
    """Writes this process's run file, or checks an existing one against ``run``."""
    nproc = run["settings"]["processes"]
    for other in store.list("", "run-p*-of-*.json"):
        if not other.endswith(f"-of-{nproc:05d}.json"):
            raise ValueError(
                f"{store.url} was started by a run with a different number of processes ({other}); resume it "
                f"with that many processes, or write to a new output directory (this run has {nproc})"
            )
    if not store.is_file(run_name):
        store.write(run_name, shards.json_bytes(run))
        return
    try:
        stored = json.loads(store.read(run_name))
    except (OSError, ValueError) as e:
        raise shards.ShardError(f"{store.show(run_name)} is not a readable run file: {e}") from e
    if stored == run:
        return
    _check_inputs(stored, run, store.show(run_name))
    diffs = _differences(stored.get("settings"), run["settings"])
    if diffs:
        what = "different settings " + _describe(diffs, f"in {run_name}", "now")
    else:  # same settings and files, yet the input splits into other lines: it changed
        what = "another version of the input (it changed) " + _describe(
            _differences(stored, run), f"in {run_name}", "now"
        )
    raise ValueError(
        f"{store.url} holds an unfinished or finished run with {what}; rerun with the settings recorded in "
        f"{store.show(run_name)}, or write to a new output directory"
    )


def _resume_hash(corpus: Corpus, plan: PartPlan, done: list[dict[str, Any]], store: Store, proc: int) -> InputHash:
    """The input hash to go on from: after the last committed shard, checked against the one it recorded."""
    if not done:
        return corpus.input_hash(plan, None)
    last = done[-1]
    hasher = corpus.input_hash(plan, last["resume"])
    now, then = hasher.digests(), last.get("input_sha256") or {}
    if now != then:
        order = [pc.file for pc in plan.pieces]
        changed = next(k for k in order if now.get(str(k)) != then.get(str(k)))
        raise CorpusError(
            f"{corpus.files[changed].url} changed since this run embedded part of it: "
            f"{corpus.span(plan, changed, last['resume'])} (embedded in shards 0..{last['index']} of process {proc}) "
            f"no longer match the sha256 recorded in {store.show(shards.commit_name(proc, last['index']))}; restore "
            "that input, or write to a new output directory"
        )
    return hasher


# ---------------------------------------------------------------------------------------------------
# The job


def embed_corpus(
    model: EmbeddingGemma,
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
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
    output_format: str = "npy",
    progress: bool = False,
) -> dict[str, Any]:
    """Embeds every record of ``inputs`` into shards under ``output``; resumes an unfinished run.

    In a multi-process run (after ``jax.distributed.initialize``) every process calls this with the same
    arguments; each reads and writes only its own part. Read the result with
    :func:`embgemma_jax.read_embeddings` (or, for ``output_format="parquet"``, any Parquet reader).

    Args:
      model: the encoder; give it a mesh (``from_pretrained(..., mesh=make_mesh())``) to use every local device.
      inputs: a file, URL or glob, or a list of them (``.txt``, ``.jsonl``/``.ndjson``, either optionally
        ``.gz``/``.zst``, ``.parquet``; see ``embgemma_jax.corpus.sources`` for the order).
      output: a local directory or fsspec URL; created if missing; an unfinished run there with the same
        settings is continued.
      text_field: field (jsonl) or column (parquet) with the text.
      id_field: field or column with the id; None: line number (txt, jsonl, 1-based) or row (parquet,
        0-based) for one input file, ``"FILE:LINE"`` for several.
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
      output_format: "npy" (default: float32 ``.npy`` plus ``.ids.json`` per shard; needs nothing beyond
        the core install, memory-mappable) or "parquet" (``id`` and ``embedding`` columns; needs pyarrow).
      progress: show a progress bar on stderr (process 0): input bytes, ETA, documents, docs/s, tokens/s,
        errors so far. Every process writes ``progress-pXXXXX.json`` in the output either way.

    Returns:
      The manifest (also written to ``output/manifest.json``).

    Raises:
      ValueError: a bad argument, or a run with other settings in ``output``.
      CorpusError: the input cannot be read, a malformed record with on_error="raise" (names file:line),
        or an input file changed since an unfinished run there embedded part of it (names the file).
      ShardError: ``output`` cannot be written, is being written by another run (names it), or holds
        damaged shards.
    """
    import jax

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    check_positive_int(shard_size, "shard_size")
    model.engine.check_batching(batch_size, token_budget)
    shards.check_format(output_format)
    corpus = Corpus(inputs, text_field=text_field, id_field=id_field)
    prompt_text = resolve_prompt(model.prompts, prompt_name, prompt) or ""
    dim = check_truncate_dim(truncate_dim, model.config.embedding_dim, MATRYOSHKA_DIMS)
    store = shards.prepare_output_dir(output)
    nproc, proc = jax.process_count(), jax.process_index()
    with shards.exclusive_output(store, proc) as lock:
        parts = corpus.split(nproc)
        problem, id_kind, tail = None, None, None
        try:  # this process's own files: a problem found here is reported by every process, none waits
            for pc in parts[proc]:
                corpus.files[pc.file].check()
            id_kind = _id_kind(corpus, parts[proc]) if output_format == "parquet" else None
            tail = corpus.tail_count(parts[proc])
        except CorpusError as e:
            problem = str(e)
        settings = _settings(
            model,
            corpus,
            text_field=text_field if corpus.formats != ["txt"] else None,
            id_field=id_field,
            prompt=prompt_text,
            dim=dim,
            on_error=on_error,
            shard_size=shard_size,
            output_format=output_format,
            id_kind=id_kind,
        )
        tails = _agree(settings, tail, proc, problem)
        plan = corpus.layout(parts, tails)[proc]
        run = {"settings": settings, "process": proc, **plan.to_json(), "mtimes": corpus.mtimes()}
        _check_resume(store, f"run-p{proc:05d}-of-{nproc:05d}.json", run)

        done = shards.committed_shards(store, proc)
        hasher = _resume_hash(corpus, plan, done, store, proc)
        finished = bool(done) and done[-1]["final"]
        resume = done[-1]["resume"] if done else None
        total = corpus.weight(plan)
        where = f" (process {proc} of {nproc}, its own part)" if nproc > 1 else ""
        prog = Progress(
            store,
            proc,
            nproc,
            total_bytes=total,
            done_bytes=total if finished else corpus.bytes_done(plan, resume[0], resume[1]) if resume else 0,
            documents=sum(r["rows"] for r in done),
            errors=sum(len(r["errors"]) for r in done),
            shards=len(done),
            bar=progress and proc == 0,
            desc=f"embed-corpus{where}",
        )
        prog.write("running")
        job = _ShardJob(
            model=model,
            corpus=corpus,
            plan=plan,
            store=store,
            lock=lock,
            process=proc,
            index=len(done),
            next=done[-1]["next"] if done else list(plan.start),
            resume=resume,
            prompt=prompt_text,
            dim=dim,
            on_error=on_error,
            batch_size=batch_size,
            token_budget=token_budget,
            output_format=output_format,
            id_kind=id_kind,
            progress=prog,
        )
        try:
            if not finished:
                _run(job, corpus.read(plan, resume, hasher), hasher, shard_size, on_error)
        finally:
            prog.close()  # before any error message, so that starts on a line of its own
        prog.write("finished", shards=job.index)
        return _finish(store, settings, plan, proc)


def _id_kind(corpus: Corpus, pieces: Sequence[Any]) -> str:
    """The type of the parquet ``id`` column ("int" or "string"): set by the corpus's first id. A parquet
    input of this process's part whose id column has the other type is an error naming it."""
    kind = corpus.first_id_kind()
    if corpus.id_field is not None:
        for pc in pieces:
            f = corpus.files[pc.file]
            if f.format == "parquet" and f.size > 0 and f.id_kind != kind:
                raise CorpusError(
                    f"{f.url}: id column {corpus.id_field!r} holds {f.id_kind}s, but this run's ids are {kind}s (set "
                    "by the first id of the input); a parquet output has one id type: convert the ids, or use "
                    "--format npy"
                )
    return kind


def _run(job: _ShardJob, records: Iterator[Record], hasher: InputHash, shard_size: int, on_error: str) -> None:
    """Commits ``records`` in shards of ``shard_size``; the last one, at the end of the part, is final.

    A full shard is committed when the next record arrives (so the final shard is never empty when the
    part holds records); its input hash is the one taken when its last record was read.
    """
    pending: list[Record] = []
    digests: dict[str, str] = {}
    for rec in records:
        if len(pending) == shard_size:
            job.commit(pending, digests, final=False)
            pending = []
        rec = job.check_id(rec)
        if rec.error is not None and on_error == "raise":
            raise CorpusError(
                f"{job.corpus.location(rec.file, rec.line)}: {rec.error} (fix the input, or pass --on-error skip / "
                "on_error='skip' to log such records and go on)"
            )
        pending.append(rec)
        if len(pending) == shard_size:
            digests = hasher.digests()
    if pending or job.index > 0 or job.plan.start != job.plan.end:
        job.commit(pending, hasher.digests(), final=True)


@dataclasses.dataclass(kw_only=True)
class _ShardJob:
    """Encodes a shard's worth of records and commits it."""

    model: EmbeddingGemma
    corpus: Corpus
    plan: PartPlan
    store: Store
    lock: Lock
    process: int
    index: int  # the next shard's index
    next: list[int]  # where the next shard starts: [file, line]
    resume: list[int] | None  # where reading resumes after the last shard: [file, position, line]
    prompt: str
    dim: int
    on_error: str
    batch_size: int
    token_budget: int | None
    output_format: str
    id_kind: str | None
    progress: Progress

    def check_id(self, rec: Record) -> Record:
        """A record whose id does not fit the parquet id column becomes a malformed record."""
        if self.id_kind is None or rec.error is not None or rec.id is None:
            return rec
        is_int = isinstance(rec.id, int)
        if is_int != (self.id_kind == "int"):
            have, want = ("an integer", "strings") if is_int else ("a string", "integers")
            return dataclasses.replace(
                rec,
                text=None,
                error=f"id {short_repr(rec.id)} is {have}, but this run's ids are {want} (set by the first id of the "
                "input; a parquet output has one id type: use --format npy for mixed ids)",
            )
        if is_int and not INT64[0] <= rec.id <= INT64[1]:
            return dataclasses.replace(
                rec, text=None, error=f"id {short_repr(rec.id)} does not fit the parquet id column (int64)"
            )
        return rec

    def _tokens(self) -> int:
        stats = getattr(getattr(self.model, "engine", None), "stats", None)
        return int(stats.get("real_tokens", 0)) if isinstance(stats, dict) else 0

    def commit(self, records: list[Record], digests: dict[str, str], *, final: bool) -> None:
        good = [r for r in records if r.error is None]
        errors = {(r.file, r.line): r.error for r in records if r.error is not None}
        emb = np.empty((len(good), self.dim), np.float32)
        ok = np.ones(len(good), bool)
        window = tokenize_window(self.batch_size, self.token_budget)  # texts per encode call: progress granularity
        for start in range(0, len(good), window):
            chunk = good[start : start + window]
            tokens = self._tokens()
            emb[start : start + len(chunk)], ok[start : start + len(chunk)] = self._encode(chunk, errors)
            last = chunk[-1]
            self.progress.advance(
                bytes_done=self.corpus.bytes_done(self.plan, last.file, last.next_position, last.consumed),
                documents=int(ok[start : start + len(chunk)].sum()),
                tokens=self._tokens() - tokens,
            )
        kept = [r for r, k in zip(good, ok, strict=True) if k]
        error_list = [
            {"file": self.corpus.files[f].url, "line": n, "location": self.corpus.location(f, n), "error": e}
            for (f, n), e in sorted(errors.items())
        ]
        last = records[-1] if records else None
        info = {
            "records": len(records),
            "errors": error_list,
            "start": self.next,
            "next": list(self.plan.end) if final else [last.file, last.line + 1],
            "final": final,
            "resume": [last.file, last.next_position, last.line + 1] if last is not None else self.resume,
            "input_sha256": digests,
        }
        self.lock.check()
        shards.commit_shard(
            self.store,
            self.output_format,
            self.process,
            self.index,
            emb[ok],
            [r.id for r in kept],
            info,
            id_kind=self.id_kind,
        )
        self.index += 1
        self.next, self.resume = info["next"], info["resume"]
        if last is not None:
            done = self.corpus.bytes_done(self.plan, last.file, last.next_position, last.consumed)
        else:
            done = self.progress.done
        self.progress.advance(bytes_done=self.progress.total if final else done, errors=len(error_list))
        self.progress.write("running", shards=self.index)

    def _encode(self, chunk: list[Record], errors: dict[tuple[int, int], str]) -> tuple[np.ndarray, np.ndarray]:
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
                where = self.corpus.location(rec.file, rec.line)
                if self.on_error == "raise":
                    raise CorpusError(f"{where}: cannot embed this text: {e}") from e
                errors[(rec.file, rec.line)] = f"cannot embed this text: {e}"
                ok[i] = False
        return out, ok


def _finish(store: Store, settings: dict[str, Any], plan: PartPlan, proc: int) -> dict[str, Any]:
    """Writes this process's errors file, gathers every process's shard list; process 0 writes the manifest."""
    done = shards.committed_shards(store, proc)
    n_errors = sum(len(rec["errors"]) for rec in done)
    errors_file = f"errors-p{proc:05d}.jsonl"
    if n_errors:
        rows = [json.dumps(e, ensure_ascii=False) for rec in done for e in rec["errors"]]
        store.write(errors_file, shards.utf8("\n".join(rows) + "\n"))
    summary = {
        "process": proc,
        "start": list(plan.start),
        "end": list(plan.end),
        "next": done[-1]["next"] if done else list(plan.start),
        "documents": sum(rec["rows"] for rec in done),
        "errors": n_errors,
        "errors_file": errors_file if n_errors else None,
        "shards": len(done),
        "input_sha256": done[-1]["input_sha256"] if done else {},
    }
    entries = [
        {
            "process": proc,
            "index": rec["index"],
            "rows": rec["rows"],
            "records": rec["records"],
            "errors": len(rec["errors"]),
            "start": rec["start"],
            "next": rec["next"],
            "final": rec["final"],
            "files": rec["files"],
        }
        for rec in done
    ]
    gathered = _allgather_json({"summary": summary, "entries": entries})
    summaries = [g["summary"] for g in gathered]
    manifest = {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "output_format": settings["output_format"],
        "dim": settings["dim"],
        "dtype": "float32",
        "documents": sum(s["documents"] for s in summaries),
        "errors": sum(s["errors"] for s in summaries),
        "errors_files": [s["errors_file"] for s in summaries if s["errors_file"]],
        "settings": settings,
        "processes": summaries,
        "shards": [entry for g in gathered for entry in g["entries"]],
    }
    shards.check_manifest(store, manifest)
    if proc == 0:
        shards.write_manifest(store, manifest)
    _barrier("embgemma_jax.embed_corpus.manifest")
    return manifest
