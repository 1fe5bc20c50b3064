"""The ASGI application: routes, authentication, limits and the request -> batcher -> response path."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embgemma_jax.server.batcher import Batcher, Draining, Overloaded
from embgemma_jax.server.errors import ApiError, error_style
from embgemma_jax.server.metrics import Metrics
from embgemma_jax.server.schema import EmbedCall, Limits, parse_json, parse_openai, parse_tei

log = logging.getLogger("embgemma_jax.server")

EMBED_ROUTES = ("/v1/embeddings", "/embeddings", "/embed")
ROUTES = (*EMBED_ROUTES, "/v1/models", "/models", "/health", "/metrics")
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# Requests with at most this many characters are tokenized on the event loop (tens of microseconds);
# larger ones in a worker thread, so the loop keeps answering.
INLINE_TOKENIZE_CHARS = 4096


def check_limit(value: Any, name: str, minimum: int = 1, why: str = "") -> int:
    """``value`` if it is an int >= ``minimum``; else a ValueError naming the setting and its flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{name} ({flag}) must be an int >= {minimum}{why}, got {value!r}")
    return value


def finish(rows: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """Truncates to ``dim`` columns and L2-normalizes, with the same NumPy operations as ``encode``."""
    out = np.empty((rows.shape[0], rows.shape[1] if dim is None else dim), dtype=np.float32)
    out[:] = rows[:, : out.shape[1]]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class EmbeddingService:
    """What the routes share: the model, its batcher, the limits and the metrics."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch_tokens: int,
        max_concurrent_requests: int,
        max_client_batch_size: int,
        api_key: str | None,
        model_name: str | None,
        max_body_bytes: int,
    ) -> None:
        window = model.config.max_seq_length
        check_limit(max_batch_tokens, "max_batch_tokens", window, " (the model's max_seq_length: one full-length text)")
        check_limit(max_concurrent_requests, "max_concurrent_requests")
        check_limit(max_client_batch_size, "max_client_batch_size")
        check_limit(max_body_bytes, "max_body_bytes")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key must be a non-empty string or None")
        self.model = model
        self.tokenizer = model.tokenizer
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.limits = Limits(
            model_name=str(model.source) if model_name is None else model_name,
            prompts=dict(model.prompts),
            default_prompt_name=getattr(model, "default_prompt_name", None),
            embedding_dim=model.config.embedding_dim,
            max_client_batch_size=max_client_batch_size,
        )
        self.metrics = Metrics()
        self.batcher = Batcher(
            model,
            max_batch_tokens=max_batch_tokens,
            max_concurrent_requests=max_concurrent_requests,
            metrics=self.metrics,
        )

    # ------------------------------------------------------------------------------------------------

    def count_tokens(self, call: EmbedCall) -> tuple[list[int], list[int]]:
        """Tokens the model sees per text (prompt, BOS and EOS included, after truncation), and the
        indices of texts longer than the model's window (truncated as the reference truncates)."""
        tok = self.tokenizer
        special = int(tok.add_bos) + int(tok.add_eos)
        room = tok.max_length - special
        lengths = [len(ids) for ids in tok.encode_pieces([call.prompt + t for t in call.texts])]
        return [min(n, room) + special for n in lengths], [i for i, n in enumerate(lengths) if n > room]

    async def embed(self, call: EmbedCall, field: str) -> tuple[np.ndarray, int, list[int]]:
        """Admits the request, queues it for the device thread and waits: (vectors, tokens, truncated)."""
        try:
            self.batcher.admit()
        except Draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down") from None
        except Overloaded:
            raise ApiError(
                429,
                f"the server's queue is full ({self.batcher.max_concurrent_requests} requests, "
                "--max-concurrent-requests); retry later",
                code="queue_full",
            ) from None
        try:
            if sum(map(len, call.texts)) <= INLINE_TOKENIZE_CHARS:  # a thread hop costs more than this
                counts, truncated = self.count_tokens(call)
            else:
                counts, truncated = await run_in_threadpool(self.count_tokens, call)
            if truncated and not call.truncate:
                i = truncated[0]
                window = self.tokenizer.max_length
                raise ApiError(
                    413,
                    f"{field}[{i}] is longer than the model's window of {window} tokens (prompt, BOS and EOS "
                    "included); pass truncate: true to truncate it as the reference does",
                    param=f"{field}[{i}]",
                    code="input_too_long",
                )
            try:
                future = self.batcher.submit(call.texts, call.prompt, counts)
            except Draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down") from None
            rows = await asyncio.wrap_future(future)
        finally:
            self.batcher.release()
        m = self.metrics
        m.inputs.inc(len(call.texts))
        m.tokens.inc(sum(counts))
        m.truncated.inc(len(truncated))
        return finish(rows, call.dim, call.normalize), sum(counts), truncated

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 past ``max_body_bytes`` (declared or streamed)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = ApiError(
            413, f"request body is larger than this server's limit of {limit} bytes", code="body_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def check_open(self) -> None:
        if self.batcher.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down")

    # ------------------------------------------------------------------------------------------------
    # Routes

    async def openai_embeddings(self, request: Request) -> Response:
        self.check_open()
        call = parse_openai(parse_json(await self.read_body(request), 400), self.limits)
        vectors, tokens, truncated = await self.embed(call, "input")
        if call.encoding_format == "base64":
            little = vectors.astype("<f4", copy=False)
            items = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        else:
            items = vectors.tolist()
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "model": self.limits.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "truncated_inputs": truncated},
        }
        return _json(body)

    async def tei_embed(self, request: Request) -> Response:
        self.check_open()
        call = parse_tei(parse_json(await self.read_body(request), 422), self.limits)
        vectors, tokens, truncated = await self.embed(call, "inputs")
        headers = {"x-prompt-tokens": str(tokens), "x-truncated-inputs": ",".join(map(str, truncated))}
        return _json(vectors.tolist(), headers)

    async def models(self, request: Request) -> Response:
        model = {
            "id": self.limits.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "embgemma-jax",
            "embedding_dim": self.limits.embedding_dim,
            "max_seq_length": self.tokenizer.max_length,
            "prompts": self.limits.prompts,
        }
        return _json({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        if self.batcher.draining:
            return _json({"status": "draining"}, status=503)
        return _json({"status": "ok"})

    async def metrics_route(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _json(body: Any, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return Response(data, status_code=status, headers=headers, media_type="application/json")


class _AuthAndMetrics:
    """Outermost ASGI layer: counts every HTTP answer by route and status, times embedding requests, and
    answers 401 without ``Authorization: Bearer KEY`` when an API key is set (``/health`` stays open)."""

    def __init__(self, app: ASGIApp, service: EmbeddingService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500
        started = time.perf_counter()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.service.api_key
            if key is not None and path != "/health" and not _authorized(scope, key):
                err = ApiError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
                await err.response(error_style(path), {"www-authenticate": "Bearer"})(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.service.metrics.requests.labels(route, str(status)).inc()
            if route in EMBED_ROUTES:
                self.service.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _authorized(scope: Scope, key: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def create_app(
    model: Any,
    *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The ASGI app serving ``model`` (see :mod:`embgemma_jax.server`). ``app.state.service`` holds the
    :class:`EmbeddingService`; the device thread runs between the app's startup and shutdown."""
    service = EmbeddingService(
        model,
        max_batch_tokens=max_batch_tokens,
        max_concurrent_requests=max_concurrent_requests,
        max_client_batch_size=max_client_batch_size,
        api_key=api_key,
        model_name=model_name,
        max_body_bytes=max_body_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.batcher.stop)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response(error_style(request.url.path))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {
            404: f"no route {request.url.path}",
            405: f"method {request.method} not allowed on {request.url.path}",
        }
        err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return err.response(error_style(request.url.path))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("request to %s failed: %r", request.url.path, exc)
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        return err.response(error_style(request.url.path))

    routes = [
        Route("/v1/embeddings", service.openai_embeddings, methods=["POST"]),
        Route("/embeddings", service.openai_embeddings, methods=["POST"]),
        Route("/embed", service.tei_embed, methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/models", service.models, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_route, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_AuthAndMetrics, service=service)],
        lifespan=lifespan,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
    )
    app.state.service = service
    return app
