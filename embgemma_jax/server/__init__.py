"""An OpenAI- and TEI-compatible embedding server: ``embgemma-jax serve`` (needs the ``serve`` extra).

One process drives the device. Requests wait in a bounded queue; one device thread takes every waiting
request (up to ``--max-batch-tokens`` tokens) and runs one ``model.encode`` over all their texts, so the
same batch planner as ``encode`` batches them (:mod:`embgemma_jax.server.batcher`). ``encode`` runs on
its exact path (padded batches of at most ``--max-batch-tokens`` padded tokens), not its throughput mode
(``token_budget``, which packs several texts per row and changes the last bits). Each new batch shape
compiles on first use; ``serve(..., warmup=True)`` compiles them all before listening.

Routes:

* ``POST /v1/embeddings`` (also ``/embeddings``), OpenAI's schema: ``input`` (a string or a list of
  strings), ``model`` (must be the served name, see ``/v1/models``; may be left out), ``dimensions``
  (Matryoshka: keep the first ``dimensions`` values, then re-normalize to unit length, as OpenAI's API
  returns unit vectors), ``encoding_format`` ``"float"`` (default) or ``"base64"`` (little-endian float32
  bytes, as OpenAI), ``user`` (ignored), and the extension fields ``prompt_name`` (a key of the model's
  prompt table, e.g. ``"query"``, ``"document"``) and ``prompt`` (a literal prompt; wins). Default: no
  prompt, as ``encode``. The answer has ``data[i].index``, ``data[i].embedding`` and ``usage`` with
  ``prompt_tokens`` (= ``total_tokens``: the tokens the model saw, prompt, BOS and EOS included) and
  ``truncated_inputs`` (indices of inputs longer than the model's window, truncated on the right as
  sentence-transformers truncates).
* ``POST /embed``, TEI's schema: ``inputs``, ``normalize`` (default true), ``truncate`` (default true, as
  TEI's ``--auto-truncate``; false refuses over-long inputs with 413), ``truncation_direction`` (``right``
  only), ``prompt_name``, ``dimensions`` (truncate, then normalize if ``normalize``), plus ``prompt``.
  Answers ``[[float, ...], ...]`` with headers ``x-prompt-tokens`` and ``x-truncated-inputs``.
* ``GET /v1/models`` (also ``/models``), ``GET /health`` (200, or 503 while draining; never needs the
  API key), ``GET /metrics`` (Prometheus text: ``embgemma_requests_total{route,status}``,
  ``embgemma_request_duration_seconds``, ``embgemma_batch_{requests,texts,tokens,seconds}``,
  ``embgemma_queue_depth``, ``embgemma_in_flight_requests``, ``embgemma_queue_seconds``,
  ``embgemma_{inputs,tokens,truncated_inputs}_total``).

Vectors: without ``dimensions`` a request gets ``model.encode(texts, prompt=...)``; with it,
``model.encode(texts, prompt=..., truncate_dim=dimensions, normalize_embeddings=True)`` (TEI:
``normalize_embeddings=normalize``), computed in float32 inside batches shared with other requests.
A request served alone (that fits one batch) is bit-identical to ``encode`` of its texts. A request
coalesced with others runs in other batch shapes, and XLA picks matmul kernels by shape (on CPU a row's
result changes in the last bits between 16 and 32 rows of a [rows, 768] x [768, 1152] product), so it
can differ from a standalone ``encode`` in the last bits (up to ~3e-7 on unit vectors measured), as
``encode`` itself does between batch compositions.

Limits and errors (``/v1`` routes answer ``{"error": {"message", "type", "param", "code"}}`` as OpenAI;
``/embed`` answers ``{"error", "error_type", "param"}`` as TEI): malformed JSON, wrong types, unknown
fields, unknown prompt names and out-of-range ``dimensions`` -> 400 (``/embed``: 422) naming the field;
more than ``--max-client-batch-size`` inputs or a body over ``max_body_bytes`` -> 413; another ``model``
-> 404; more than ``--max-concurrent-requests`` requests admitted at once -> 429 (the server stays up);
with ``--api-key KEY`` every route but ``/health`` needs ``Authorization: Bearer KEY`` (else 401).

SIGTERM (or Ctrl-C) drains: new requests get 503 and ``/health`` turns 503, admitted requests finish,
then the process exits 0. A second signal stops at once.

Example::

    embgemma-jax serve --model google/embeddinggemma-300m --port 8080 --model-name embeddinggemma

    curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' \\
      -d '{"model": "embeddinggemma", "input": ["Which planet is red?"], "prompt_name": "query"}'
    curl -s localhost:8080/embed -H 'Content-Type: application/json' \\
      -d '{"inputs": ["Mars is red."], "prompt_name": "document", "dimensions": 256}'

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8080/v1", api_key="unused")  # or the --api-key
    out = client.embeddings.create(model="embeddinggemma", input=["Which planet is red?"],
                                   dimensions=256, extra_body={"prompt_name": "query"})
    vector = out.data[0].embedding
"""

from embgemma_jax.server.app import EmbeddingService, create_app
from embgemma_jax.server.run import serve

__all__ = ["EmbeddingService", "create_app", "serve"]
