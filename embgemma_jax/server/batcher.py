"""Dynamic batching: requests wait in a bounded queue; one device thread coalesces them.

The device thread takes every waiting request (oldest first, up to ``max_batch_tokens`` tokens; a larger
request goes alone) and runs one ``model.encode`` over all their texts with one prompt per text, so the
planner that ``encode`` uses batches them. The rows are split back per request. When the call returns,
the thread takes what has queued meanwhile at once, so the device never idles while requests wait.

``encode`` runs on its padded path (no ``token_budget``, which packs several texts per row). With a
batch-invariant model (``serve --batch-invariant``, on by default where available: the CPU backend) a
text's vector does not depend on the other texts of the call, so each request gets exactly the bits
``encode`` of its own texts gives; every device batch then has ``invariant_batch_tokens`` padded tokens.
Without, the batch size keeps each batch within ``max_batch_tokens`` padded tokens: the largest power of
two with ``rows * bucket(longest text of the call) <= max_batch_tokens`` (:func:`batch_size_for`), and a
coalesced request may differ from ``encode`` of its own texts in the last bits (other padded lengths,
other matmul kernels).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from embgemma_jax.batching import MAX_BATCH_TOKENS, bucket_for, bucket_lengths, invariant_rows
from embgemma_jax.server.metrics import Metrics

log = logging.getLogger("embgemma_jax.server")


def batch_size_for(max_batch_tokens: int, longest: int, max_len: int) -> int:
    """The ``batch_size`` the server passes to ``encode`` for a call whose longest text has ``longest``
    tokens: the largest power of two with ``batch_size * bucket(longest) <= max_batch_tokens`` (at least 1).
    Every batch of the call is then within the budget (the planner puts the longest texts first), and row
    counts stay powers of two (few compiled shapes)."""
    rows = max(1, max_batch_tokens // bucket_for(longest, bucket_lengths(max_len)))
    return 1 << (rows.bit_length() - 1)


@dataclasses.dataclass
class Job:
    """One request's texts, their prompt, and the future its [n, E] float32 rows go to."""

    texts: list[str]
    prompt: str
    tokens: int  # in all, prompt, BOS and EOS included
    longest: int  # tokens of the longest text
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)


class Overloaded(Exception):
    """The queue holds ``max_concurrent_requests`` requests already."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


class Batcher:
    """The bounded request queue and the one thread that drives the device.

    Args:
      model: an :class:`~embgemma_jax.EmbeddingGemma`; only this thread calls its ``encode``.
      max_batch_tokens: the token budget of one device batch, and the most tokens one ``encode`` call takes
        from the queue (a single larger request is taken alone).
      max_concurrent_requests: requests admitted at once (queued or running); one more is refused.
    """

    def __init__(self, model: Any, *, max_batch_tokens: int, max_concurrent_requests: int, metrics: Metrics) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_concurrent_requests = max_concurrent_requests
        if max_batch_tokens > MAX_BATCH_TOKENS:
            raise ValueError(
                f"max_batch_tokens (--max-batch-tokens) must be at most {MAX_BATCH_TOKENS} (the planner's bound on "
                f"one device batch), got {max_batch_tokens}"
            )
        self.max_len = model.config.max_seq_length
        self.metrics = metrics
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._admitted = 0
        self._draining = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="embgemma-device", daemon=True)

    # ------------------------------------------------------------------------------------------------
    # Request side (event loop / handler threads)

    def admit(self) -> None:
        """Takes a slot for one request; raises :class:`Overloaded` or :class:`Draining`."""
        with self._cv:
            if self._draining:
                raise Draining()
            if self._admitted >= self.max_concurrent_requests:
                raise Overloaded()
            self._admitted += 1
            self.metrics.in_flight.set(self._admitted)

    def release(self) -> None:
        """Gives back the slot of an admitted request (answered or failed)."""
        with self._cv:
            self._admitted -= 1
            self.metrics.in_flight.set(self._admitted)
            self._cv.notify_all()

    def submit(self, texts: list[str], prompt: str, counts: list[int]) -> concurrent.futures.Future:
        """Queues an admitted request's texts (``counts``: tokens per text, with the prompt); the future gets
        their [n, E] float32 rows."""
        job = Job(texts, prompt, sum(counts), max(counts))
        with self._cv:
            if self._stopping:
                raise Draining()
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify_all()
        return job.future

    @property
    def admitted(self) -> int:
        with self._cv:
            return self._admitted

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """From now on :meth:`admit` refuses; admitted requests still run. (A plain flag: this is called
        from a signal handler, which must not wait for a lock.)"""
        self._draining = True

    # ------------------------------------------------------------------------------------------------
    # Device side

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, padded length) batch the server's calls can make: per length bucket, the powers of
        two up to :func:`batch_size_for` that bucket (batch-invariant: the bucket's one shape)."""
        tokens = self.model.engine.invariant_tokens
        if tokens is not None:
            return [(invariant_rows(length, tokens), length) for length in bucket_lengths(self.max_len)]
        shapes = []
        for length in bucket_lengths(self.max_len):
            cap = batch_size_for(self.max_batch_tokens, length, self.max_len)
            shapes += [(2**k, length) for k in range(cap.bit_length())]
        return shapes

    def warmup(self) -> int:
        """Compiles every batch shape of :meth:`warmup_shapes` before serving (ahead of time, see
        ``Engine.warmup``), so no request waits for a compilation. Returns the number of shapes. Call before
        :meth:`start`."""
        shapes = self.warmup_shapes()
        started = time.perf_counter()
        n = self.model.engine.warmup(self.model.params, shapes)
        log.info("warm-up: %d batch shapes compiled in %.0f s", n, time.perf_counter() - started)
        return n

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Runs what is queued, then ends the device thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return None
            group = [self._queue.popleft()]
            tokens = group[0].tokens
            while self._queue and tokens + self._queue[0].tokens <= self.max_batch_tokens:
                tokens += self._queue[0].tokens
                group.append(self._queue.popleft())
            self.metrics.queue_depth.set(len(self._queue))
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            self._run(group)

    def _run(self, group: list[Job]) -> None:
        # A request whose caller went away (future cancelled) is skipped; the others can no longer be cancelled.
        group = [job for job in group if job.future.set_running_or_notify_cancel()]
        if not group:
            return
        texts = [t for job in group for t in job.texts]
        prompts = [job.prompt for job in group for _ in job.texts]
        started = time.perf_counter()
        for job in group:
            self.metrics.queue_seconds.observe(started - job.enqueued)
        try:
            longest = max(job.longest for job in group)
            rows = self.model.encode(
                texts,
                prompts_per_text=prompts,
                batch_size=batch_size_for(self.max_batch_tokens, longest, self.max_len),
            )
        except Exception as e:  # the request(s) fail, the server stays up
            log.exception("encode failed for a batch of %d requests", len(group))
            for job in group:
                job.future.set_exception(e)
            return
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_requests.observe(len(group))
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_tokens.observe(sum(job.tokens for job in group))
        start = 0
        for job in group:
            n = len(job.texts)
            job.future.set_result(np.ascontiguousarray(rows[start : start + n]))
            start += n
