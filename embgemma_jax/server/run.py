"""``serve``: run the app under uvicorn in this process, draining on SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

import uvicorn

from embgemma_jax.server.app import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CLIENT_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    EmbeddingService,
    create_app,
)

log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a draining first SIGTERM / SIGINT: the listening socket stays open, new
    requests get 503 and ``/health`` turns 503, admitted requests finish, then the server exits as after
    a normal shutdown (exit code 0). A second signal is uvicorn's own: stop now."""

    def __init__(self, config: uvicorn.Config, service: EmbeddingService) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        batcher = self.service.batcher
        if sig in (signal.SIGTERM, signal.SIGINT) and not batcher.draining:
            batcher.start_draining()
            log.info(
                "received %s: draining (new requests get 503; waiting for admitted requests to finish)",
                signal.Signals(sig).name,
            )
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.service.batcher.draining and not self.should_exit and self.service.batcher.admitted == 0:
            log.info("drained: every admitted request is answered; shutting down")
            self.should_exit = True
        return await super().on_tick(counter)


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    warmup: bool = False,
    log_level: str = "info",
    access_log: bool = False,
) -> int:
    """Serves ``model`` over HTTP until SIGTERM/SIGINT (drained) and returns the process exit code.

    Blocks. One process, one device thread (see :mod:`embgemma_jax.server`). Bad settings print an
    ``error:`` line and return 2; a port that cannot be bound logs uvicorn's error line and returns its exit
    code (3 in uvicorn 0.54).

    Args:
      model: a loaded :class:`~embgemma_jax.EmbeddingGemma`.
      host, port: where to listen (port 0: any free port, logged at start).
      max_batch_tokens: token budget of one device batch (at least the model's max_seq_length).
      max_concurrent_requests: requests admitted at once (queued or running); more get 429.
      max_client_batch_size: inputs per request; more get 413.
      api_key: if set, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (else 401).
      model_name: the id ``/v1/models`` lists and ``model`` must name (default: the model's source path).
      max_body_bytes: request bodies larger than this get 413.
      warmup: before listening, compile every batch shape the planner can make under ``max_batch_tokens``
        (:meth:`~embgemma_jax.server.batcher.Batcher.warmup`), so no request waits for a compilation.
      access_log: log every request (off by default: one line per request costs CPU under load).
    """
    try:
        app = create_app(
            model,
            max_batch_tokens=max_batch_tokens,
            max_concurrent_requests=max_concurrent_requests,
            max_client_batch_size=max_client_batch_size,
            api_key=api_key,
            model_name=model_name,
            max_body_bytes=max_body_bytes,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    service: EmbeddingService = app.state.service
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on", server_header=False
    )
    server = DrainingServer(config, service)
    log.info(
        "serving %r (embedding dim %d) with max_batch_tokens=%d, max_concurrent_requests=%d, "
        "max_client_batch_size=%d, api key %s, batch-invariant %s",
        service.limits.model_name,
        service.limits.embedding_dim,
        max_batch_tokens,
        max_concurrent_requests,
        max_client_batch_size,
        "required" if api_key else "off",
        "off" if model.engine.invariant_tokens is None else f"on ({model.engine.invariant_tokens} tokens per batch)",
    )
    if warmup:
        started = time.perf_counter()
        n = service.batcher.warmup()
        log.info("warm-up: compiled %d batch shapes in %.1f s", n, time.perf_counter() - started)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits (3) when it cannot bind the port
        return e.code if isinstance(e.code, int) else 1
    return 0 if server.started else 1
