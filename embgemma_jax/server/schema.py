"""Request bodies of ``/v1/embeddings`` (OpenAI) and ``/embed`` (TEI), checked into one :class:`EmbedCall`.

Every refusal names the field: wrong types and values are 400 on the OpenAI route and 422 on TEI's (as
TEI answers validation errors), too many inputs are 413, a ``model`` other than the served one is 404.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from embgemma_jax.prompts import resolve_prompt
from embgemma_jax.server.errors import ApiError

ENCODING_FORMATS = ("float", "base64")
OPENAI_FIELDS = ("input", "model", "dimensions", "encoding_format", "user", "prompt_name", "prompt")
TEI_FIELDS = ("inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "prompt", "dimensions")


@dataclasses.dataclass(frozen=True)
class EmbedCall:
    """One checked request: what ``model.encode`` is asked for, and how the answer is written.

    The vectors are ``model.encode(texts, prompt=prompt, truncate_dim=dim, normalize_embeddings=normalize)``.
    """

    texts: list[str]
    prompt: str  # resolved prompt put in front of every text ("" for none)
    dim: int | None  # Matryoshka truncation (None: the full width)
    normalize: bool  # L2-normalize after truncation
    encoding_format: str = "float"  # "float" or "base64" (OpenAI route)
    truncate: bool = True  # False: refuse inputs longer than the model's window instead of truncating


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts, and the model facts requests are checked against."""

    model_name: str
    prompts: Mapping[str, str]
    default_prompt_name: str | None
    embedding_dim: int
    max_client_batch_size: int


def parse_json(raw: bytes, status: int) -> dict[str, Any]:
    """The body as a JSON object, or an error ``status`` saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(status, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(status, f"request body must be a JSON object, got {_kind(body)}", code="invalid_json")
    return body


def _kind(value: Any) -> str:
    return {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _texts(body: dict[str, Any], field: str, status: int, limits: Limits) -> list[str]:
    if field not in body:
        raise ApiError(status, f"missing required field {field!r}", param=field, code="missing_field")
    value = body[field]
    if isinstance(value, str):
        _check_unicode(value, field, status)
        return [value]
    if not isinstance(value, list):
        raise ApiError(status, f"{field} must be a string or an array of strings, got {_kind(value)}", param=field)
    if not value:
        raise ApiError(status, f"{field} must not be an empty array", param=field)
    if len(value) > limits.max_client_batch_size:
        raise ApiError(
            413,
            f"{field} has {len(value)} items, more than this server's limit of {limits.max_client_batch_size} "
            "(--max-client-batch-size); split the request",
            param=field,
            code="too_many_inputs",
        )
    for i, t in enumerate(value):
        if not isinstance(t, str):
            hint = "; token arrays are not accepted, send text" if isinstance(t, (int, list)) else ""
            raise ApiError(status, f"{field}[{i}] must be a string, got {_kind(t)}{hint}", param=f"{field}[{i}]")
        _check_unicode(t, f"{field}[{i}]", status)
    return value


def _check_unicode(text: str, param: str, status: int) -> None:
    """JSON escapes can carry lone surrogates (``"\\ud800"``), which are not text and cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            status,
            f"{param} holds a lone surrogate {text[e.start]!r} at character {e.start}, which is not valid Unicode",
            param=param,
        ) from None


def _optional(body: dict[str, Any], field: str, types: tuple[type, ...], what: str, status: int) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise ApiError(status, f"{field} must be {what} or null, got {_kind(value)}", param=field)
    return value


def _dimensions(body: dict[str, Any], status: int, limits: Limits) -> int | None:
    dim = _optional(body, "dimensions", (int,), "an integer", status)
    full = limits.embedding_dim
    if dim is not None and not 1 <= dim <= full:
        trained = [d for d in (768, 512, 256, 128) if d <= full] if full == 768 else [full]
        raise ApiError(
            status,
            f"dimensions must be in [1, {full}] (trained Matryoshka dimensions: {trained}), got {dim}",
            param="dimensions",
        )
    return dim


def _prompt(body: dict[str, Any], status: int, limits: Limits) -> str:
    name = _optional(body, "prompt_name", (str,), "a string", status)
    prompt = _optional(body, "prompt", (str,), "a string", status)
    if prompt is not None:
        _check_unicode(prompt, "prompt", status)
    if name is not None and name not in limits.prompts:
        raise ApiError(
            status, f"unknown prompt_name {name!r}; this model's prompts: {sorted(limits.prompts)}", param="prompt_name"
        )
    return resolve_prompt(limits.prompts, name, prompt, limits.default_prompt_name) or ""


def _no_unknown_fields(body: dict[str, Any], known: tuple[str, ...], status: int) -> None:
    for field in body:
        if field not in known:
            raise ApiError(status, f"unrecognized request field {field!r}; accepted fields: {list(known)}", param=field)


def parse_openai(body: dict[str, Any], limits: Limits) -> EmbedCall:
    """``POST /v1/embeddings``: OpenAI's schema plus ``prompt_name`` / ``prompt``.

    ``dimensions`` truncates (Matryoshka) and then re-normalizes, as OpenAI's API returns unit vectors.
    """
    status = 400
    _no_unknown_fields(body, OPENAI_FIELDS, status)
    texts = _texts(body, "input", status, limits)
    model = _optional(body, "model", (str,), "a string", status)
    if model is not None and model != limits.model_name:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {limits.model_name!r}",
            param="model",
            code="model_not_found",
        )
    _optional(body, "user", (str,), "a string", status)
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ENCODING_FORMATS:
        raise ApiError(
            status, f"encoding_format must be one of {list(ENCODING_FORMATS)}, got {fmt!r}", param="encoding_format"
        )
    dim = _dimensions(body, status, limits)
    prompt = _prompt(body, status, limits)
    return EmbedCall(texts, prompt, dim, normalize=dim is not None, encoding_format=fmt)


def parse_tei(body: dict[str, Any], limits: Limits) -> EmbedCall:
    """``POST /embed``: TEI's schema (``inputs``, ``normalize`` default true, ``truncate`` default true as
    TEI's ``--auto-truncate`` default, ``truncation_direction`` right only, ``prompt_name``, ``dimensions``),
    plus ``prompt``."""
    status = 422
    _no_unknown_fields(body, TEI_FIELDS, status)
    texts = _texts(body, "inputs", status, limits)
    normalize = _optional(body, "normalize", (bool,), "a boolean", status)
    truncate = _optional(body, "truncate", (bool,), "a boolean", status)
    direction = _optional(body, "truncation_direction", (str,), "a string", status)
    if direction is not None and direction.lower() != "right":
        raise ApiError(
            status,
            f"truncation_direction {direction!r} is not supported: the model truncates on the right, as the "
            "reference does",
            param="truncation_direction",
        )
    dim = _dimensions(body, status, limits)
    prompt = _prompt(body, status, limits)
    return EmbedCall(
        texts,
        prompt,
        dim,
        normalize=True if normalize is None else normalize,
        truncate=True if truncate is None else truncate,
    )
