"""What ``encode`` returns besides sentence embeddings: token embeddings, every output, and the return types.

As sentence-transformers' ``encode``:

* ``output_value="token_embeddings"``: one [T_i, D] float32 array per text, the final-normed token states
  of the text's real tokens (BOS ... EOS, the prompt included), without padding.
* ``output_value=None``: one dict per text with ``input_ids``, ``attention_mask``, ``modality``
  (``"text"``), ``token_embeddings`` and ``sentence_embedding`` (truncated to ``truncate_dim`` but not
  re-normalized, as the reference). Deviation: ``input_ids``, ``attention_mask`` and ``token_embeddings``
  are the text's real tokens, whereas the reference pads them to the longest text of the batch of
  ``batch_size`` texts it happened to be in; the real-token parts are the same, and ours do not depend on
  the batching.
* Sentence embeddings come back as one NumPy array (``convert_to_numpy``, default), one ``jax.Array``
  (``convert_to_tensor=True``), or, with both False, a list of one ``jax.Array`` per text (the reference
  returns a list of tensors).

Token states come from the model's fused forward program, batch by batch through the one planner
(``model.engine.padded_batches``: :func:`embgemma_jax.batching.padded_batches`); each batch is dispatched
before the previous one is read back, so the host pads the next batch while the device computes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from embgemma_jax.prompts import exclude_prompt, prompt_lengths

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)


def check_output_value(output_value: Any) -> str | None:
    """``output_value`` if it is one of :data:`OUTPUT_VALUES`; raises ValueError listing them otherwise."""
    if output_value is not None and (not isinstance(output_value, str) or output_value not in OUTPUT_VALUES):
        raise ValueError(f"output_value must be one of {list(OUTPUT_VALUES)}, got {output_value!r}")
    return output_value


@dataclasses.dataclass
class TokenOutputs:
    """Per-text outputs of the forward program, in input order, without padding."""

    input_ids: list[np.ndarray]  # [T_i] int64
    attention_mask: list[np.ndarray]  # [T_i] int64 (all ones: the real tokens)
    token_embeddings: list[np.ndarray]  # [T_i, D] float32, final-normed
    sentence_embedding: np.ndarray  # [N, E] float32, the reference pipeline's embeddings


def real_length(mask_row: np.ndarray) -> int:
    """Tokens up to the last attended position, at least 1 (the reference's cut of token embeddings)."""
    nz = np.flatnonzero(mask_row)
    return int(nz[-1]) + 1 if len(nz) else 1


def token_outputs(
    model: Any,
    texts: Sequence[str],
    prompts: Sequence[str],
    *,
    batch_size: int,
    token_budget: int | None = None,
    include_prompt: bool = True,
    progress: Any = None,
) -> TokenOutputs:
    """Runs ``model.forward`` over texts that already carry their prompts.

    Args:
      model: an :class:`~embgemma_jax.encode.EmbeddingGemma` (its ``tokenizer`` and ``forward``).
      texts: prompt + text, as :func:`embgemma_jax.prompts.prepare` returns them.
      prompts: each text's prompt (measured only when ``include_prompt`` is False).
      include_prompt: False leaves each text's prompt tokens out of the sentence embedding's mean pool.
      progress: a tqdm-like bar (``update(n)``) or None.
    """
    model.engine.check_batching(batch_size, token_budget)
    n = len(texts)
    ids_out: list[Any] = [None] * n
    states_out: list[Any] = [None] * n
    emb_out: np.ndarray | None = None
    lengths = None if include_prompt else prompt_lengths(model.tokenizer, prompts)
    pending: collections.deque[tuple[np.ndarray, dict[str, np.ndarray], Any]] = collections.deque()

    def read() -> None:
        nonlocal emb_out
        idx, batch, out = pending.popleft()
        k = len(idx)
        states = np.asarray(out.last_hidden_state[:k], dtype=np.float32)
        emb = np.asarray(out.embeddings[:k], dtype=np.float32)
        if emb_out is None:
            emb_out = np.empty((n, emb.shape[1]), dtype=np.float32)
        emb_out[idx] = emb
        for r, i in enumerate(idx):
            t = real_length(batch["attention_mask"][r])
            ids_out[i] = batch["input_ids"][r, :t].astype(np.int64)
            states_out[i] = np.array(states[r, :t])  # a copy: the batch's array is not kept alive
        if progress is not None:
            progress.update(k)

    for idx, batch in model.engine.padded_batches(texts, batch_size, token_budget):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pool_mask = None
        if lengths is not None:
            per_row = np.zeros(len(ids), dtype=np.int64)
            per_row[: len(idx)] = lengths[idx]
            pool_mask = exclude_prompt(mask, per_row)
        pending.append((idx, batch, model.forward(ids, mask, pool_mask)))
        if len(pending) > 1:
            read()
    while pending:
        read()
    if emb_out is None:
        emb_out = np.empty((0, model.config.embedding_dim), dtype=np.float32)
    return TokenOutputs(ids_out, [np.ones(len(x), dtype=np.int64) for x in ids_out], states_out, emb_out)


def as_dicts(outputs: TokenOutputs, sentence_embedding: np.ndarray) -> list[dict[str, Any]]:
    """One dict per text with every output, keyed as the reference's ``encode(output_value=None)``."""
    return [
        {
            "input_ids": outputs.input_ids[i],
            "attention_mask": outputs.attention_mask[i],
            "modality": "text",
            "token_embeddings": outputs.token_embeddings[i],
            "sentence_embedding": sentence_embedding[i],
        }
        for i in range(len(outputs.input_ids))
    ]


def convert(embeddings: np.ndarray, *, convert_to_numpy: bool, convert_to_tensor: bool) -> Any:
    """[N, ...] sentence embeddings as one NumPy array, one jax.Array, or a list of per-text jax.Arrays."""
    if convert_to_tensor:
        return jax.numpy.asarray(embeddings)
    if convert_to_numpy:
        return embeddings
    return [jax.numpy.asarray(row) for row in embeddings]
