"""Embedding a whole corpus to disk: streamed, sharded, resumable, on one or many processes.

Each of the ``jax.process_count()`` processes takes one contiguous part of the input (see
``embgemma_jax.corpus``), reads only that part, encodes it on its own local devices (data-parallel over
the model's mesh) and writes only its own shards (see ``embgemma_jax.shards``). Processes meet twice
through JAX's distributed runtime: at the start, to agree on the settings and to number lines across
parts, and at the end, when process 0 gathers every process's shard list and writes the manifest.

A run is resumable: started again with the same settings, each process skips its committed shards and
continues from the input position recorded in its last one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embgemma_jax.corpus import shards
from embgemma_jax.corpus.readers import Corpus, CorpusError, Record, open_corpus
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


def _settings(model: EmbeddingGemma, corpus: Corpus, **options: Any) -> dict[str, Any]:
    """Everything that decides the output; a resumed run must match it exactly."""
    import jax

    model_id = {
        "source": str(Path(model.source).resolve()),
        "dtype": model.dtype.name,
        "config": model.config.to_dict(),
    }
    settings = {"input": corpus.fingerprint(), "model": model_id, "processes": jax.process_count(), **options}
    return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from disk


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
    stored = json.loads(run_file.read_text(encoding="utf-8"))
    if stored == plan:
        return
    old, new = stored.get("settings", {}), plan["settings"]
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        diff = ["the input's line count (the input file changed)"]
    raise ValueError(
        f"{out_dir} holds an unfinished or finished run with different settings ({', '.join(diff)}); rerun with "
        f"the settings recorded in {run_file}, or write to a new output directory"
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
      batch_size: rows per forward pass.
      progress: show a progress bar (docs/s, ETA) on process 0.

    Returns:
      The manifest (also written to ``output_dir/manifest.json``).
    """
    import jax

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    corpus = open_corpus(input_path, text_field=text_field, id_field=id_field)
    prompt_text = resolve_prompt(model.prompts, prompt_name, prompt) or ""
    dim = model._check_truncate_dim(truncate_dim)
    out_dir = Path(output_dir)
    (out_dir / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    nproc, proc = jax.process_count(), jax.process_index()

    settings = _settings(
        model,
        corpus,
        text_field=text_field if corpus.format != "txt" else None,
        id_field=id_field,
        prompt=prompt_text,
        dim=dim,
        on_error=on_error,
        shard_size=shard_size,
    )
    part = corpus.parts(nproc)[proc]
    lines = corpus.count(part)
    peers = _allgather_json({"settings": settings, "lines": lines})
    for i, peer in enumerate(peers):
        if peer["settings"] != settings:
            diff = sorted(k for k in settings if peer["settings"].get(k) != settings[k])
            raise ValueError(f"process {i} runs with other settings than process {proc} ({', '.join(diff)})")
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
    position = done[-1]["next_position"] if done else None
    line = done[-1]["next_line"] if done else first_line
    bar = _progress_bar(corpus, lines, line - first_line, proc, nproc, enabled=progress and proc == 0)
    job = _ShardJob(model, corpus, out_dir, proc, len(done), line, prompt_text, dim, on_error, batch_size, bar)
    pending: list[Record] = []
    for rec in corpus.read(part, position, line):
        if rec.error is not None and on_error == "raise":
            raise CorpusError(
                f"{corpus.location(rec.line)}: {rec.error} (fix the input, or pass --on-error skip / on_error='skip' "
                "to log such records and go on)"
            )
        pending.append(rec)
        if len(pending) == shard_size:
            job.commit(pending)
            pending = []
    if pending:
        job.commit(pending)
    if bar is not None:
        bar.close()
    return _finish(out_dir, settings, proc, nproc, lines)


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


class _ShardJob:
    """Encodes a shard's worth of records and commits it."""

    def __init__(self, model, corpus, out_dir, proc, index, line, prompt_text, dim, on_error, batch_size, bar) -> None:
        self.model, self.corpus, self.out_dir, self.proc, self.index = model, corpus, out_dir, proc, index
        self.line = line  # the next input line (row) to be committed
        self.prompt, self.dim, self.on_error, self.batch_size, self.bar = prompt_text, dim, on_error, batch_size, bar

    def commit(self, records: list[Record]) -> None:
        good = [r for r in records if r.error is None]
        errors = {r.line: r.error for r in records if r.error is not None}
        emb = np.empty((len(good), self.dim), np.float32)
        ok = np.ones(len(good), bool)
        window = max(self.batch_size * 16, 256)  # texts handed to encode at a time: the progress granularity
        for start in range(0, len(good), window):
            chunk = good[start : start + window]
            emb[start : start + len(chunk)], ok[start : start + len(chunk)] = self._encode(chunk, errors)
            if self.bar is not None:
                self.bar.update(len(chunk))
        kept = [r for r, k in zip(good, ok, strict=True) if k]
        error_list = [{"location": self.corpus.location(n), "line": n, "error": e} for n, e in sorted(errors.items())]
        info = {
            "records": len(records),
            "errors": error_list,
            "first_line": records[0].line,
            "next_line": records[-1].line + 1,
            "next_position": records[-1].next_position,
        }
        shards.commit_shard(self.out_dir, self.proc, self.index, emb[ok], [r.id for r in kept], info)
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
                texts, prompt=self.prompt, batch_size=self.batch_size, truncate_dim=self.dim
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


def _finish(out_dir: Path, settings: dict[str, Any], proc: int, nproc: int, lines: int) -> dict[str, Any]:
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
        shards.write_atomic(out_dir / errors_file, ("\n".join(rows) + "\n").encode("utf-8"))
    summary = {
        "process": proc,
        "lines": lines,
        "documents": sum(rec["rows"] for rec in done),
        "errors": n_errors,
        "errors_file": errors_file if n_errors else None,
        "shards": [
            {"process": proc, "index": rec["index"], "rows": rec["rows"], "files": rec["files"]} for rec in done
        ],
    }
    summaries = _allgather_json(summary)
    manifest = {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "dim": settings["dim"],
        "dtype": "float32",
        "documents": sum(s["documents"] for s in summaries),
        "errors": sum(s["errors"] for s in summaries),
        "errors_files": [s["errors_file"] for s in summaries if s["errors_file"]],
        "settings": settings,
        "processes": [{k: v for k, v in s.items() if k != "shards"} for s in summaries],
        "shards": [shard for s in summaries for shard in s["shards"]],
    }
    if proc == 0:
        shards.write_manifest(out_dir, manifest)
    _barrier("embgemma_jax.embed_corpus.manifest")
    return manifest
