"""Full attention one chunk of queries at a time (``masks.QueryChunks``; on the CPU backend for long rows).

The tiny model's rows (at most 96 tokens) are shorter than the production chunk (256), so these tests
set the chunk to 16: every full-attention layer of a 96-token batch then runs as a ``lax.map`` over 6
query chunks, padded and packed, and must still match sentence-transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma, masks
from embgemma_jax.config import FULL
from embgemma_jax.model import Attention
from embgemma_jax.testing import REAL_PROMPTS
from tests.conftest import F32_ATOL

WORDS = sorted({w for p in REAL_PROMPTS.values() for w in p.split()} | {"Mars", "planet", "é"})
TEXTS = [" ".join(WORDS[(7 * k + i) % len(WORDS)] for i in range(k)) for k in (3, 9, 14, 20, 27, 33, 60)]


@pytest.fixture
def chunk16(monkeypatch):
    monkeypatch.setattr(masks, "GLOBAL_QUERY_CHUNK", 16)


def test_chunk_rule(chunk16):
    assert jax.default_backend() == "cpu"
    assert [masks.global_query_chunk(t) for t in (16, 32, 64, 80, 96, 104, 112)] == [None] * 4 + [16, None, 16]


def test_chunked_model_matches_reference(tiny_ckpt, st_model, monkeypatch):
    # Models of their own: a program traced while the chunk is patched stays in its engine's cache, so the
    # session's shared model must not run here (its later callers would get chunked programs).
    whole = EmbeddingGemma.from_pretrained(tiny_ckpt).encode(TEXTS)  # traced before the patch: no chunks
    monkeypatch.setattr(masks, "GLOBAL_QUERY_CHUNK", 16)
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)  # a fresh engine: its programs trace with chunk 16
    lengths = [len(x) for x in model.tokenizer.encode(TEXTS)]
    assert max(lengths) > 80, lengths  # batches of 96 tokens: 6 chunks
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    for kwargs in ({"batch_size": 8}, {"batch_size": 2}, {"token_budget": 192}):
        np.testing.assert_allclose(model.encode(TEXTS, **kwargs), want, atol=F32_ATOL, rtol=0, err_msg=str(kwargs))
    np.testing.assert_allclose(model.encode(TEXTS), whole, atol=F32_ATOL, rtol=0)


def test_chunked_attention_equals_whole_matrix(tiny_ckpt):
    """The layer itself, padded keys and per-query visibility included: chunked and whole-matrix outputs
    agree to float32 rounding, and a chunking bug (queries paired with another chunk's mask) is far
    outside that."""
    cfg = EmbeddingGemma.from_pretrained(tiny_ckpt).config
    b, t = 3, 64
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[0, 40:] = False
    valid[1, 10:] = False
    # Rows of visibility that differ per query (a band, as packed rows' segment masks differ), so a chunk
    # paired with another chunk's rows would see other keys.
    visible = masks.attention_mask(jnp.asarray(valid), 20)
    pos = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.ones(cfg.head_dim)[None]
    cos, sin = jnp.cos(pos * 1e-3), jnp.sin(pos * 1e-3)
    layer = Attention(cfg, FULL, jnp.float32)
    params = layer.init(jax.random.key(0), x, visible, cos, sin)
    whole = layer.apply(params, x, visible, cos, sin)
    chunked = layer.apply(params, x, masks.QueryChunks(visible, 16), cos, sin)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    shifted = masks.QueryChunks(jnp.roll(visible, 16, axis=1), 16)
    assert np.abs(layer.apply(params, x, shifted, cos, sin) - whole).max() > 1e-3
