"""Bidirectional attention masks: full layers, sliding-window layers, and the banded (blocked) layout.

EmbeddingGemma's sliding layers let query i see key j iff |i - j| <= radius, radius = sliding_window // 2
(256 for the 512 in config.json; the reference tests ``|i - j| < sliding_window // 2 + 1``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def attention_mask(key_valid: jax.Array, radius: int | None) -> jax.Array:
    """Boolean visibility [B, T, S] (T == S) for a bidirectional encoder.

    Args:
      key_valid: [B, S] bool, True on real (non-padding) tokens.
      radius: None for full attention; otherwise key j is visible from query i iff |i - j| <= radius.
    """
    b, s = key_valid.shape
    visible = jnp.broadcast_to(key_valid[:, None, :], (b, s, s))
    if radius is None:
        return visible
    pos = jnp.arange(s)
    band = jnp.abs(pos[:, None] - pos[None, :]) <= radius
    return visible & band[None]


class BandedMask(NamedTuple):
    """Sliding-window attention cut into query blocks of C tokens, each seeing a key window of W = C + 2r.

    ``key_index[n, w]`` is the index into the keys padded by r on the left (and enough on the right), so
    block n's window covers global key positions n*C - r ... n*C + C + r - 1.
    """

    visible: jax.Array  # [B, nb, C, W] bool
    key_index: np.ndarray  # [nb, W] int, static
    block: int
    radius: int
    pad_right: int  # keys/queries padded to nb * C


class QueryChunks(NamedTuple):
    """Full attention computed ``chunk`` queries at a time (a ``lax.map`` over query chunks), so one
    chunk's [B, K, chunk, G, S] float32 scores are live at once instead of the whole [B, K, T, G, S]: 400 MB
    per copy at 8 x 2048 tokens, which put our peak resident set above the reference's on long documents
    on the CPU. Each query's scores, softmax and weighted sum are those of the whole-matrix form."""

    visible: jax.Array  # [B, T, S] bool, as attention_mask / segment_mask
    chunk: int


# Queries per chunk of full attention on the CPU backend (see global_query_chunk).
GLOBAL_QUERY_CHUNK = 256


def global_query_chunk(t: int) -> int | None:
    """The query chunk of full-attention layers for T tokens: :data:`GLOBAL_QUERY_CHUNK` on the CPU backend
    (where device memory is the host's, and the reference's attention works in blocks) from 6 chunks (1536
    tokens) up, T a multiple of it; None (the whole score matrix at once) otherwise and on accelerators.

    XLA's temporary memory for one full-size float32 batch with chunks against without
    (``python benchmarks/probe_temp_memory.py``, ``compiled.memory_analysis()``): 8 x 2048 tokens 902
    against 1153 MiB, 32 x 2048 3292 against 4549, 8 x 1536 694 against 757, with the same bits; shorter
    rows needed more with chunks (8 x 1024: 488 against 440, the same script with the floor at 4 chunks),
    hence the floor. Blocking the sliding layers' banded attention the same way raised it (1006 MiB at 8 x
    2048, measured with that variant, not kept), so they run all blocks at once."""
    c = GLOBAL_QUERY_CHUNK
    return c if jax.default_backend() == "cpu" and t >= 6 * c and t % c == 0 else None


def banded_block(radius: int) -> int:
    """Query block size for the banded layout: the radius (W = 3 * radius), at least 8."""
    return max(8, radius)


def segment_mask(segments: jax.Array, radius: int | None) -> jax.Array:
    """Visibility [B, T, S] for packed rows: several texts per row, ``segments`` [B, T] int (1, 2, ... per
    text, 0 on padding). Key j is visible from query i iff both belong to the same text (and, with a radius,
    |i - j| <= radius): each token attends within its own text exactly as it would alone in a row."""
    visible = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    if radius is None:
        return visible
    pos = jnp.arange(segments.shape[1])
    return visible & (jnp.abs(pos[:, None] - pos[None, :]) <= radius)[None]


def banded_mask(
    key_valid: jax.Array, radius: int, block: int | None = None, segments: jax.Array | None = None
) -> BandedMask:
    """The sliding-window mask in the banded layout (same visibility as ``attention_mask(., radius)``, or as
    ``segment_mask(segments, radius)`` for packed rows)."""
    b, t = key_valid.shape
    radius = min(radius, t - 1)  # |i - j| <= t - 1 always: a larger radius only widens the padding
    block = block or min(banded_block(radius), t)
    nb = math.ceil(t / block)
    pad_right = nb * block - t
    width = block + 2 * radius
    key_index = np.arange(nb)[:, None] * block + np.arange(width)[None, :]  # into the padded keys
    valid_pad = jnp.pad(key_valid, ((0, 0), (radius, pad_right + radius)))
    valid_win = valid_pad[:, key_index]  # [B, nb, W]
    q_pos = np.arange(nb)[:, None] * block + np.arange(block)[None, :]  # [nb, C]
    k_pos = key_index - radius  # [nb, W]
    band = np.abs(q_pos[:, :, None] - k_pos[:, None, :]) <= radius  # [nb, C, W]
    visible = jnp.asarray(band)[None] & valid_win[:, :, None, :]
    if segments is not None:  # packed rows: the key must belong to the query's text
        seg_win = jnp.pad(segments, ((0, 0), (radius, pad_right + radius)))[:, key_index]  # [B, nb, W]
        seg_q = jnp.pad(segments, ((0, 0), (0, pad_right))).reshape(b, nb, block)  # [B, nb, C]
        visible = visible & (seg_q[:, :, :, None] == seg_win[:, :, None, :])
    return BandedMask(visible, key_index, block, radius, pad_right)


def use_banded(t: int, radius: int) -> bool:
    """Whether the banded layout is faster than the dense one for T tokens.

    Dense sliding attention costs T^2 scores per head, banded T * (C + 2r) = 3 T r plus a gather. Measured
    on EmbeddingGemma's sizes (``benchmarks/bench_attention.py``, 2-core CPU, float32): dense/banded time
    is 0.94 at T=512, 1.69 at 768, 1.38 at 1024, 2.56 at 2048. So banded from T >= 3r (768 tokens).
    """
    return t >= 3 * radius and t >= 2 * banded_block(radius)
