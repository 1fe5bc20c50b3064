"""Research surface: pooling variants over any layers, and opt-in intermediates.

Both run on the model's :class:`~embgemma_jax.engine.Engine`, which owns the jitted programs:

  * pooling variants (:func:`embed_variants`) run the encoder once per batch, returning all
    ``num_layers + 1`` hidden states when a variant reads an earlier layer (compiled once per batch
    shape, whatever variants are asked for), and a small pool + dense-head program per variant (compiled
    once per variant and shape; it only reads the layers the variant selects);
  * intermediates (:func:`inspect`) are captured through Flax's ``sow`` with ``mutable=["intermediates"]``
    inside a jitted function that returns only what :class:`Capture` asks for. The plain ``encode`` path
    never makes the collection mutable, so the sow calls are no-ops there; attention probabilities are
    returned only for the chosen layers.

So trying ``max`` pooling on layer 3, the mean of the last four layers and a custom function costs one
encoder pass per batch and no reload or recompilation of the encoder. ``EmbeddingGemma.encode(...,
pooling=..., layers=...)`` is the one-variant case of the same loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from embgemma_jax.batching import check_positive_int
from embgemma_jax.engine import Capture, finish
from embgemma_jax.pooling import PoolingLike, as_pooling_spec
from embgemma_jax.prompts import exclude_prompt, prepare, prompt_lengths

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma

__all__ = ["Capture", "Intermediates", "embed_variants", "inspect", "pool_mask_for"]


class Intermediates(NamedTuple):
    """What happened inside the model for one padded batch (NumPy arrays).

    Token-level arrays are [..., B, T, D]. Padding positions (``attention_mask == 0``) hold no meaningful
    value; with ``mark_padding=True`` (the default) they are NaN, so any statistic that forgets the mask
    shows it. Attention probabilities have NaN rows for padded queries and exact zeros on padded keys.
    """

    input_ids: np.ndarray  # [B, T] int32, right-padded with the pad id
    attention_mask: np.ndarray  # [B, T] int32, 1 on real tokens
    pool_mask: np.ndarray  # [B, T] int32, 1 on the tokens that were pooled
    layer_types: tuple[str, ...]
    embeddings: np.ndarray  # [B, T, D] token embeddings after the sqrt(D) scaling
    after_attention: np.ndarray | None  # [L, B, T, D] residual stream after each attention block
    layer_outputs: np.ndarray | None  # [L, B, T, D] residual after each MLP block = each layer's output
    final_normed: np.ndarray  # [B, T, D] final RMS-normed states (transformers' last_hidden_state)
    pooled: np.ndarray  # [B, D]
    dense_outputs: tuple[np.ndarray, ...]  # each dense layer's output [B, E_i]
    embedding: np.ndarray  # [B, E] the model's output (normalized if the checkpoint normalizes)
    attention_probs: dict[int, np.ndarray]  # layer -> [B, N, T, S] for the captured layers

    def hidden_states(self) -> list[np.ndarray]:
        """The ``num_layers + 1`` states in transformers' ``hidden_states`` convention: embeddings, the
        outputs of layers 0..L-2, and the final-normed states (needs ``Capture(residuals=True)``)."""
        if self.layer_outputs is None:
            raise ValueError("hidden_states() needs the layer outputs: inspect with Capture(residuals=True)")
        return [self.embeddings, *list(self.layer_outputs[:-1]), self.final_normed]


def embed_variants(
    model: EmbeddingGemma,
    sentences: str | Sequence[str],
    variants: Mapping[str, PoolingLike],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    prompts_per_text: Sequence[str] | None = None,
    titles: str | Sequence[str | None] | None = None,
    batch_size: int = 32,
    truncate_dim: int | None = None,
    normalize_embeddings: bool = False,
    show_progress_bar: bool | None = None,
    token_budget: int | None = None,
) -> dict[str, np.ndarray]:
    """Embeds texts under several pooling variants with one encoder pass per batch.

    Args:
      model: the loaded model.
      sentences: a str or a sequence of str.
      variants: name -> a :class:`PoolingSpec`, a mode name, a tuple of mode names or a function
        ``fn(states [B, T, D], mask [B, T]) -> [B, D']``.
      prompt_name, prompt, prompts_per_text, titles: as :meth:`EmbeddingGemma.encode`.
      batch_size: texts per encoder call.
      truncate_dim: keep the first dimensions of every variant's output.
      normalize_embeddings: L2-normalize after truncation.
      show_progress_bar: show a progress bar.
      token_budget: pack batches by padded tokens, as :meth:`EmbeddingGemma.encode`.

    Returns:
      name -> float32 array [N, width] ([width] for a single str), in input order.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants must be a non-empty mapping name -> pooling (spec, mode name or function)")
    check_positive_int(truncate_dim, "truncate_dim", optional=True)
    cfg = model.config
    plans = {
        name: as_pooling_spec(v, default_mode=cfg.pooling_mode, default_include_prompt=cfg.include_prompt).plan(
            cfg.num_layers, cfg.normalize
        )
        for name, v in variants.items()
    }
    p = prepare(
        sentences,
        model.prompts,
        prompt_name=prompt_name,
        prompt=prompt,
        default_prompt_name=model.default_prompt_name,
        prompts_per_text=prompts_per_text,
        titles=titles,
    )
    out = model.engine.embed(
        model.params,
        p.texts,
        plans,
        prompts=p.prompts,
        batch_size=batch_size,
        token_budget=token_budget,
        progress=show_progress_bar,
    )
    for name, arr in out.items():
        if truncate_dim is not None and truncate_dim > arr.shape[1]:
            raise ValueError(f"truncate_dim={truncate_dim} exceeds variant {name!r}'s width {arr.shape[1]}")
        arr = finish(arr, truncate_dim, normalize_embeddings)
        out[name] = arr[0] if p.single else arr
    return out


def pool_mask_for(model: EmbeddingGemma, attention_mask: np.ndarray, prompts: Sequence[str], include_prompt: bool):
    """The pool mask of a padded batch whose rows start with ``prompts``."""
    if include_prompt:
        return np.asarray(attention_mask)
    return exclude_prompt(attention_mask, prompt_lengths(model.tokenizer, prompts))


def inspect(
    model: EmbeddingGemma,
    sentences: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    titles: Sequence[str | None] | None = None,
    capture: Capture | None = None,
    mark_padding: bool = True,
) -> Intermediates:
    """Runs the reference pipeline on one batch (padded to its longest text) and returns intermediates.

    Args:
      model: the loaded model.
      sentences: a str or a sequence of str (one batch: keep it small, every layer's states come back).
      prompt_name, prompt: as :meth:`EmbeddingGemma.encode`.
      titles: document titles (``title: {title} | text: `` prompts), instead of prompt/prompt_name.
      capture: what to return besides the always-returned arrays; default ``Capture()``.
      mark_padding: fill padding positions of token-level arrays with NaN.
    """
    capture = (capture or Capture()).resolve(model.config.num_layers)
    p = prepare(
        sentences,
        model.prompts,
        prompt_name=prompt_name,
        prompt=prompt,
        default_prompt_name=model.default_prompt_name,
        titles=titles,
    )
    if not p.texts:
        raise ValueError("no texts to inspect")
    batch = model.tokenizer(p.texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pmask = pool_mask_for(model, mask, p.prompts, model.config.include_prompt)
    if model.config.pooling_mode != "mean":
        raise ValueError(
            f"inspect() runs the reference pipeline (mean pooling); this checkpoint pools with "
            f"{model.config.pooling_mode!r}"
        )
    res = model.engine.run_capture(model.params, ids, mask, pmask, capture)

    pad = mask == 0

    def mark(x: np.ndarray | None) -> np.ndarray | None:
        if x is None or not mark_padding:
            return x
        x = x.copy()
        x[..., pad, :] = np.nan
        return x

    probs = {}
    for i, p in res["attention_probs"].items():
        if mark_padding:
            p = p.copy()
            p[np.broadcast_to(pad[:, None, :, None], p.shape)] = np.nan
        probs[int(i)] = p
    return Intermediates(
        input_ids=ids,
        attention_mask=mask,
        pool_mask=np.asarray(pmask, dtype=np.int32),
        layer_types=tuple(model.config.layer_types),
        embeddings=mark(res["embeddings"]),
        after_attention=mark(res.get("after_attention")),
        layer_outputs=mark(res.get("layer_outputs")),
        final_normed=mark(res["final_normed"]),
        pooled=res["pooled"],
        dense_outputs=tuple(res["dense_outputs"]),
        embedding=res["embedding"],
        attention_probs=probs,
    )
