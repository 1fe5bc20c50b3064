"""A float64 NumPy forward pass of the whole EmbeddingGemma pipeline: the ground truth for error analysis.

Written from the reference computation (``transformers`` Gemma 3 + sentence-transformers), not from our
Flax modules, and kept deliberately plain: each sequence is processed on its own at its true length
(padding never enters the arithmetic), each attention head is a loop iteration, masks are built from
``|i - j|`` directly. It reads the same parameter pytree as the Flax model (our layouts: q/k/v
``[D, heads, H]``, o ``[N, H, D]``, MLP and dense weights ``[in, out]``), upcasting each tensor to
float64 when it is used; the embedding table is gathered first, so the 262144 x 768 table is never
copied. It is slow (seconds for a handful of texts on the real model) and needs nothing but NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from embgemma_jax.config import SLIDING, EmbeddingGemmaConfig
from embgemma_jax.model import unstack_layers


class OracleOutput(NamedTuple):
    """Float64 results for a padded batch. Token-level arrays are NaN at positions where
    ``attention_mask == 0``; attention probabilities are NaN on padded query rows, 0 on padded keys."""

    embeddings: np.ndarray  # [B, E] the pipeline's output (normalized if the config normalizes)
    token_embeddings: np.ndarray  # [B, T, D] scaled embedding lookup (hidden state 0)
    after_attention: np.ndarray  # [L, B, T, D] residual stream after each attention block
    layer_outputs: np.ndarray  # [L, B, T, D] residual stream after each MLP block (the layer's output)
    final_normed: np.ndarray  # [B, T, D]
    pooled: np.ndarray  # [B, D]
    dense_outputs: tuple[np.ndarray, ...]  # [B, E_i] each
    attention_probs: dict[int, np.ndarray]  # layer -> [B, N, T, T] for the requested layers

    def hidden_states(self) -> list[np.ndarray]:
        """transformers' ``hidden_states`` convention: embeddings, outputs of layers 0..L-2, final-normed."""
        return [self.token_embeddings, *list(self.layer_outputs[:-1]), self.final_normed]


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rms_norm(x: np.ndarray, weight: Any, eps: float) -> np.ndarray:
    """Gemma RMS norm over the last axis: x / sqrt(mean(x^2) + eps) * (1 + w)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + _f64(weight))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotary embedding, rotate-half layout: x [T, heads, H]; dim k pairs with k + H/2."""
    h = x.shape[-1]
    inv_freq = 1.0 / (base ** (np.arange(0, h, 2, dtype=np.float64) / h))
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = np.cos(np.concatenate([angles, angles], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], axis=-1))[:, None, :]
    first, second = x[..., : h // 2], x[..., h // 2 :]
    rotated = np.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def _layer(
    x: np.ndarray, p: Mapping[str, Any], cfg: EmbeddingGemmaConfig, positions: np.ndarray, layer_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decoder layer on one sequence x [T, D] (T real tokens). Returns (after_attention, output, probs)."""
    eps = cfg.rms_norm_eps
    attn = p["attn"]
    n_heads, n_kv = cfg.num_heads, cfg.num_kv_heads
    group = n_heads // n_kv

    h = rms_norm(x, p["input_norm"]["scale"], eps)
    q = np.einsum("td,dnh->tnh", h, _f64(attn["q"]))
    k = np.einsum("td,dkh->tkh", h, _f64(attn["k"]))
    v = np.einsum("td,dkh->tkh", h, _f64(attn["v"]))
    q = rms_norm(q, attn["q_norm"]["scale"], eps)
    k = rms_norm(k, attn["k_norm"]["scale"], eps)
    base = cfg.rope_local_base if layer_type == SLIDING else cfg.rope_global_base
    q = rope(q, positions, base)
    k = rope(k, positions, base)

    distance = np.abs(positions[:, None] - positions[None, :])
    if layer_type == SLIDING:
        visible = distance <= cfg.sliding_window // 2  # radius from the config.json value (512 -> 256)
    else:
        visible = np.ones_like(distance, dtype=bool)
    t = x.shape[0]
    out = np.empty((t, n_heads, cfg.head_dim))
    probs = np.empty((n_heads, t, t))
    for head in range(n_heads):
        kv = head // group  # query heads share kv heads in consecutive groups (transformers' repeat_kv)
        scores = q[:, head, :] @ k[:, kv, :].T * cfg.query_pre_attn_scalar**-0.5
        scores = np.where(visible, scores, -np.inf)
        probs[head] = _softmax(scores)
        out[:, head, :] = probs[head] @ v[:, kv, :]
    attn_out = np.einsum("tnh,nhd->td", out, _f64(attn["o"]))
    x = x + rms_norm(attn_out, p["post_attn_norm"]["scale"], eps)
    after_attention = x

    h = rms_norm(x, p["pre_ffw_norm"]["scale"], eps)
    mlp = p["mlp"]
    m = (gelu_tanh(h @ _f64(mlp["gate"])) * (h @ _f64(mlp["up"]))) @ _f64(mlp["down"])
    x = x + rms_norm(m, p["post_ffw_norm"]["scale"], eps)
    return after_attention, x, probs


def oracle_forward(
    params: Mapping[str, Any],
    config: EmbeddingGemmaConfig,
    input_ids: Any,
    attention_mask: Any,
    pool_mask: Any | None = None,
    *,
    attention_layers: tuple[int, ...] = (),
) -> OracleOutput:
    """The pipeline in float64: ids -> embeddings, with every per-layer state.

    Args:
      params: the parameter pytree (``{"encoder": ..., "head": ...}``), NumPy or JAX arrays, any float dtype.
      config: the model config.
      input_ids: [B, T] ints.
      attention_mask: [B, T], 1 on real tokens. Positions (for RoPE and the window) are the absolute
        indices 0..T-1, as in the reference.
      pool_mask: [B, T], tokens to mean-pool (default: attention_mask).
      attention_layers: layers whose attention probabilities to return.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids and attention_mask must be 2-D and the same shape; got {ids.shape}, {mask.shape}")
    pmask = mask if pool_mask is None else np.asarray(pool_mask)
    if pmask.shape != ids.shape:
        raise ValueError(f"pool_mask shape {pmask.shape} != input_ids shape {ids.shape}")
    valid_ids = ids[mask > 0]
    if valid_ids.size and (valid_ids.min() < 0 or valid_ids.max() >= config.vocab_size):
        raise ValueError(f"token ids must be in [0, {config.vocab_size}); got {valid_ids.min()}..{valid_ids.max()}")
    for i in attention_layers:
        if not 0 <= i < config.num_layers:
            raise ValueError(f"attention layer {i} is out of range 0..{config.num_layers - 1}")

    enc = unstack_layers(params, config)["encoder"]  # a model's stacked layers, or a checkpoint's per-layer ones
    table = enc["embedding"]
    b, t = ids.shape
    d, n_layers = config.hidden_size, config.num_layers
    nan = np.full((b, t, d), np.nan)
    token_embeddings = nan.copy()
    final = nan.copy()
    after_attention = np.full((n_layers, b, t, d), np.nan)
    layer_outputs = np.full((n_layers, b, t, d), np.nan)
    probs_out = {i: np.full((b, config.num_heads, t, t), np.nan) for i in attention_layers}
    pooled = np.zeros((b, d))

    for row in range(b):
        idx = np.flatnonzero(mask[row] > 0)
        if idx.size == 0:
            continue
        x = _f64(table[ids[row, idx]]) * math.sqrt(d)
        token_embeddings[row, idx] = x
        for i, layer_type in enumerate(config.layer_types):
            after_attention[i, row, idx], x, probs = _layer(x, enc[f"layer_{i}"], config, idx, layer_type)
            layer_outputs[i, row, idx] = x
            if i in probs_out:
                full = np.zeros((config.num_heads, idx.size, t))
                full[:, :, idx] = probs
                probs_out[i][row][:, idx, :] = full
        final[row, idx] = rms_norm(x, enc["final_norm"]["scale"], config.rms_norm_eps)
        sel = np.flatnonzero(pmask[row] > 0)
        if sel.size:
            if not np.all(mask[row, sel] > 0):
                raise ValueError(f"pool_mask of row {row} selects padding positions")
            pooled[row] = final[row, sel].sum(axis=0) / sel.size

    y = pooled
    dense = []
    for j in range(len(config.dense_features)):
        y = y @ _f64(params["head"][f"dense_{j}"])
        dense.append(y)
    emb = y
    if config.normalize:
        emb = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    return OracleOutput(
        embeddings=emb,
        token_embeddings=token_embeddings,
        after_attention=after_attention,
        layer_outputs=layer_outputs,
        final_normed=final,
        pooled=pooled,
        dense_outputs=tuple(dense),
        attention_probs=probs_out,
    )
