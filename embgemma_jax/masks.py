"""Bidirectional attention masks: full layers and sliding-window layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(key_valid: jax.Array, radius: int | None) -> jax.Array:
    """Boolean visibility [B, T, S] (T == S) for a bidirectional encoder.

    Args:
      key_valid: [B, S] bool, True on real (non-padding) tokens.
      radius: None for full attention; otherwise key j is visible from query i iff |i - j| <= radius.
        For EmbeddingGemma the radius is ``sliding_window // 2`` (256 for the 512 in config.json): the
        reference tests ``|i - j| < sliding_window // 2 + 1``.
    """
    b, s = key_valid.shape
    visible = jnp.broadcast_to(key_valid[:, None, :], (b, s, s))
    if radius is None:
        return visible
    pos = jnp.arange(s)
    band = jnp.abs(pos[:, None] - pos[None, :]) <= radius
    return visible & band[None]
