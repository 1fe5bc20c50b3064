"""Progress of a corpus job: a bar on stderr for people, a record in the output for programs.

The bar (process 0 only, when asked) counts input bytes, so its rate and ETA hold for any mix of file
formats, and shows documents, documents/s, tokens/s and malformed records so far. Every process also
rewrites ``progress-pXXXXX.json`` in the output at its start, after every shard commit and at its end::

    {"process": 0, "processes": 2, "state": "running", "documents": 12000, "errors": 3, "shards": 2,
     "input_bytes_done": 1048576, "input_bytes_total": 4194304, "run_documents": 2000, "run_tokens": 310000,
     "elapsed_s": 20.5, "documents_per_s": 97.6, "tokens_per_s": 15122.0, "eta_s": 61.5,
     "updated": "2025-01-01T00:00:00+00:00"}

``documents``, ``errors`` and ``shards`` count everything committed, this run and the ones it resumed;
``run_*``, rates and ``eta_s`` (None until there is a rate) count this run only. ``state`` is
``running`` or ``finished``.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

from embgemma_jax.corpus.store import Store, json_bytes


def progress_name(process: int) -> str:
    return f"progress-p{process:05d}.json"


class Progress:
    """A job's progress (see the module docstring).

    Args:
      store: the output.
      process, processes: this process and how many there are.
      total_bytes: the stored bytes of this process's part of the input.
      done_bytes: how many of them earlier runs embedded.
      documents, errors, shards: what earlier runs committed.
      bar: show a bar on stderr.
      desc: the bar's label.
    """

    def __init__(
        self,
        store: Store,
        process: int,
        processes: int,
        *,
        total_bytes: int,
        done_bytes: int,
        documents: int,
        errors: int,
        shards: int,
        bar: bool,
        desc: str,
    ) -> None:
        self.store, self.process, self.processes = store, process, processes
        self.total, self.done, self.start_bytes = total_bytes, done_bytes, done_bytes
        self.documents, self.errors, self.shards = documents, errors, shards
        self.run_documents = self.run_tokens = 0
        self.t0 = time.monotonic()
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            self._postfix()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def rates(self) -> tuple[float | None, float | None, float | None]:
        """(documents/s, tokens/s, eta in s) of this run so far."""
        t = self.elapsed()
        if t <= 0 or self.run_documents == 0:
            return None, None, None
        byte_rate = (self.done - self.start_bytes) / t
        eta = (self.total - self.done) / byte_rate if byte_rate > 0 else None
        return self.run_documents / t, self.run_tokens / t, eta

    def _postfix(self) -> None:
        docs_s, tok_s, _ = self.rates()
        rate = f", {docs_s:.1f}doc/s, {_si(tok_s)}tok/s" if docs_s is not None else ""
        self.bar.set_postfix_str(f"{self.documents:,} docs{rate}, {self.errors} errors", refresh=False)

    def advance(self, *, bytes_done: int, documents: int = 0, errors: int = 0, tokens: int = 0) -> None:
        """Records work done: input read up to ``bytes_done``, documents embedded, records skipped, tokens."""
        self.documents += documents
        self.errors += errors
        self.run_documents += documents
        self.run_tokens += tokens
        bytes_done = max(self.done, min(bytes_done, self.total))
        if self.bar is not None:
            self._postfix()
            self.bar.update(bytes_done - self.done)
        self.done = bytes_done

    def write(self, state: str, *, shards: int | None = None) -> None:
        """Rewrites ``progress-pXXXXX.json``."""
        if shards is not None:
            self.shards = shards
        docs_s, tok_s, eta = self.rates()
        record: dict[str, Any] = {
            "process": self.process,
            "processes": self.processes,
            "state": state,
            "documents": self.documents,
            "errors": self.errors,
            "shards": self.shards,
            "input_bytes_done": self.done,
            "input_bytes_total": self.total,
            "run_documents": self.run_documents,
            "run_tokens": self.run_tokens,
            "elapsed_s": round(self.elapsed(), 3),
            "documents_per_s": None if docs_s is None else round(docs_s, 3),
            "tokens_per_s": None if tok_s is None else round(tok_s, 3),
            "eta_s": None if eta is None or state == "finished" else round(eta, 1),
            "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.store.write(progress_name(self.process), json_bytes(record))

    def close(self) -> None:
        if self.bar is not None:
            self._postfix()
            self.bar.close()
            self.bar = None


def _si(x: float | None) -> str:
    if x is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
