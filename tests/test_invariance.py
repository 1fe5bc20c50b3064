"""Invariances of encode on a tiny random model (property-based).

A text's embedding must not depend on what else is in its batch: the other texts, their lengths, the batch
size, the bucket length it was padded to, or its position. Every text's embedding in a batch is compared
with the same text encoded alone (batch of one, padded to its own bucket).

Tolerance: F32_ATOL (1e-5, see conftest). Batched and single encodes run different XLA programs (other
shapes), so summation orders differ and bit equality is not expected; any real leak between rows (a mask
bug, padding attended to, rows mixed up) moves unit-norm embeddings by far more than 1e-5. Repeated calls
with the same input run the same program and must be bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embgemma_jax import EmbeddingGemma
from embgemma_jax.testing import REAL_PROMPTS
from tests.conftest import F32_ATOL
from tests.fuzzing import fuzz_settings

WORDS = sorted({w for p in REAL_PROMPTS.values() for w in p.split()} | {"Mars", "planet", "é", "😀", "<eos>", "\n"})
# 0 to ~150 tokens: every bucket of the tiny model (16, 32, 64, 96) and truncation past max_seq_length 96.
text = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join),
    st.lists(st.sampled_from(WORDS), max_size=70).map(" ".join),
    st.just(""),
)
# Compiles dominate the runtime, so the tests share a few shapes: with batch_size 4 and these batch counts
# every chunk has 1, 3 or 4 texts, i.e. [4, T] batches (some with an all-padding row) and [1, T] ones.
BATCH_SIZE = 4
batch = st.sampled_from([1, 3, 4, 5, 7, 8]).flatmap(lambda n: st.lists(text, min_size=n, max_size=n))

_ALONE: dict[str, np.ndarray] = {}


def _alone(model: EmbeddingGemma, t: str) -> np.ndarray:
    """The text encoded on its own (cached: the model is deterministic)."""
    if t not in _ALONE:
        _ALONE[t] = model.encode([t], batch_size=1)[0]
    return _ALONE[t]


@fuzz_settings(25)
@given(texts=batch, data=st.data())
def test_embedding_does_not_depend_on_the_batch(jax_model, texts, data):
    out = jax_model.encode(texts, batch_size=BATCH_SIZE)
    assert out.shape == (len(texts), jax_model.config.embedding_dim)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(out[i], _alone(jax_model, t), atol=F32_ATOL, rtol=0, err_msg=f"row {i}: {t!r}")
    # Any reordering of the input reorders the output the same way.
    perm = data.draw(st.permutations(range(len(texts))))
    shuffled = jax_model.encode([texts[i] for i in perm], batch_size=BATCH_SIZE)
    np.testing.assert_allclose(shuffled, out[list(perm)], atol=F32_ATOL, rtol=0)


def test_rows_are_distinguishable(jax_model):
    """Guards the test above: distinct texts are far apart, so a swapped row could not pass within 1e-5."""
    emb = jax_model.encode(["Mars", "planet", "", "task: search result | query: Mars"])
    gaps = np.abs(emb[:, None] - emb[None]).max(axis=-1)
    assert gaps[~np.eye(len(emb), dtype=bool)].min() > 1e3 * F32_ATOL


@fuzz_settings(15)
@given(texts=batch, other=batch)
def test_repeated_calls_are_bit_identical(jax_model, texts, other):
    first = jax_model.encode(texts, batch_size=BATCH_SIZE)
    jax_model.encode(other, batch_size=BATCH_SIZE)  # other calls in between change nothing
    np.testing.assert_array_equal(jax_model.encode(texts, batch_size=BATCH_SIZE), first)


def _padded(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [BATCH_SIZE, length] ids and mask; rows past the given ones are all padding."""
    input_ids = np.zeros((BATCH_SIZE, length), np.int32)
    mask = np.zeros((BATCH_SIZE, length), np.int32)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        mask[r, : len(ids)] = 1
    return input_ids, mask


def _assert_finite(out, what: str) -> None:
    for name in ("embeddings", "pooled", "last_hidden_state"):
        assert np.isfinite(np.asarray(getattr(out, name), np.float32)).all(), f"{what}: {name}"


@pytest.fixture(scope="module")
def bf16_model(tiny_ckpt):
    return EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")


@fuzz_settings(20)
@given(n_words=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_padding_length_changes_nothing_and_stays_finite(jax_model, bf16_model, n_words, seed):
    """One real row padded to every bucket length gives the same embedding (f32), and every value is finite,
    including padded positions whose whole sliding window is padding and all-padding rows (f32 and bf16)."""
    rng = np.random.default_rng(seed)
    ids = jax_model.tokenizer.encode([" ".join(rng.choice(WORDS, n_words))])[0]
    assert 96 - len(ids) > jax_model.config.window_radius + 1  # at 96, some windows hold only padding
    embeddings = []
    for length in [b for b in (16, 32, 64, 96) if b >= len(ids)]:
        out = jax_model.forward(*_padded([ids], length))
        _assert_finite(out, f"float32, length {length}")
        np.testing.assert_array_equal(np.asarray(out.embeddings[1:]), 0)  # all-padding rows pool nothing
        embeddings.append(np.asarray(out.embeddings[0]))
    for e in embeddings[1:]:
        np.testing.assert_allclose(e, embeddings[0], atol=F32_ATOL, rtol=0)
    _assert_finite(bf16_model.forward(*_padded([ids], 96)), "bfloat16")


@fuzz_settings(15)
@given(texts=st.lists(text, min_size=1, max_size=BATCH_SIZE))
def test_mixed_length_batches_are_finite_in_float32_and_bfloat16(jax_model, bf16_model, texts):
    """Rows of any lengths (0 to 96 tokens, empty rows too) in one [4, 96] batch: finite everywhere, and each
    real row's embedding has unit norm."""
    rows = jax_model.tokenizer.encode(texts)
    for model, tol in ((jax_model, F32_ATOL), (bf16_model, 1e-2)):  # bf16: 8-bit mantissa
        out = model.forward(*_padded(rows, 96))
        _assert_finite(out, str(model.dtype))
        norms = np.linalg.norm(np.asarray(out.embeddings[: len(rows)], np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=tol)
