"""Batch-invariant mode: a text's vector depends on the text alone, bit for bit.

``from_pretrained(..., batch_invariant=True)`` pads each text to its own length bucket and gives every batch
of a bucket one shape (``batching.plan_invariant_batches``). Every check here is ``np.array_equal``: the
text encoded alone against the same text inside other batches (other texts, sizes, orders, prompts), on the
tiny model (float32, bfloat16, int8) and on a model with the real widths (768 hidden, 3 x 256 heads, 1152
MLP, the 3072-wide dense head; float32), under the suite's 8 host devices. The float32 vectors stay within
F32_ATOL of sentence-transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import bucket_for, bucket_lengths, invariant_rows, plan_invariant_batches
from embgemma_jax.testing import REAL_PROMPTS, build_tiny_checkpoint
from tests.conftest import F32_ATOL
from tests.fuzzing import fuzz_settings

WORDS = sorted({w for p in REAL_PROMPTS.values() for w in p.split()} | {"Mars", "planet", "é", "😀", "\n"})
# 0 to ~150 tokens: every bucket of the tiny model (16 ... 96) and truncation past max_seq_length 96.
text = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join),
    st.lists(st.sampled_from(WORDS), max_size=70).map(" ".join),
    st.just(""),
)
TOKENS = 128  # invariant_batch_tokens of the tiny model's tests: 8 rows of 16 tokens ... 1 row of 96


def _words(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


@pytest.fixture(scope="module")
def inv_model(tiny_ckpt):
    return EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True, invariant_batch_tokens=TOKENS)


_ALONE: dict[tuple[str, str], np.ndarray] = {}


def _alone(model: EmbeddingGemma, t: str, prompt: str = "") -> np.ndarray:
    if (t, prompt) not in _ALONE:
        _ALONE[t, prompt] = model.encode([t], prompt=prompt)[0]
    return _ALONE[t, prompt]


# ----------------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize("batch_tokens", [16, 100, 512, 4096])
def test_plan_pads_each_text_to_its_own_bucket_in_one_shape_per_bucket(batch_tokens):
    rng = np.random.default_rng(batch_tokens)
    lengths = [int(n) for n in rng.integers(1, 2049, 300)] + [1, 2048, 16, 17]
    buckets = bucket_lengths(2048)
    plan = plan_invariant_batches(lengths, batch_tokens, 2048)
    seen = np.concatenate([b.indices for b in plan])
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every text once
    shapes = {}
    for b in plan:
        assert all(bucket_for(lengths[i], buckets) == b.length for i in b.indices)  # its own bucket
        assert b.rows == invariant_rows(b.length, batch_tokens) == max(1, batch_tokens // b.length)
        assert 1 <= len(b.indices) <= b.rows
        shapes.setdefault(b.length, set()).add(b.rows)
    assert all(len(rows) == 1 for rows in shapes.values())  # one shape per bucket


# ----------------------------------------------------------------------------------------------------
# Bit for bit


@fuzz_settings(20)
@given(
    texts=st.lists(text, min_size=1, max_size=12),
    batch_size=st.sampled_from([1, 3, 32]),
    data=st.data(),
)
def test_a_text_gets_the_same_bits_in_any_batch(inv_model, texts, batch_size, data):
    out = inv_model.encode(texts, batch_size=batch_size)
    for i, t in enumerate(texts):
        assert np.array_equal(out[i], _alone(inv_model, t)), f"row {i}: {t!r}"
    perm = data.draw(st.permutations(range(len(texts))))
    shuffled = inv_model.encode([texts[i] for i in perm], batch_size=batch_size)
    assert np.array_equal(shuffled, out[list(perm)])


def test_prompts_per_text_pooling_variants_and_token_outputs(inv_model):
    rng = np.random.default_rng(3)
    texts = [_words(rng, 0, 60) for _ in range(21)]
    prompts = [["", REAL_PROMPTS["query"], REAL_PROMPTS["document"]][i % 3] for i in range(21)]
    mixed = inv_model.encode(texts, prompts_per_text=prompts)
    for i, (t, p) in enumerate(zip(texts, prompts, strict=True)):
        assert np.array_equal(mixed[i], _alone(inv_model, t, p)), f"row {i}"
    # The pooling-variant programs (encoder states, then pooling and head) and the token outputs plan alike.
    for pooling in ("cls", "max"):
        both = inv_model.encode(texts[:9], pooling=pooling)
        for i, t in enumerate(texts[:9]):
            assert np.array_equal(both[i], inv_model.encode([t], pooling=pooling)[0]), f"{pooling} row {i}"
    tokens = inv_model.encode(texts[:9], output_value="token_embeddings")
    for i, t in enumerate(texts[:9]):
        assert np.array_equal(tokens[i], inv_model.encode([t], output_value="token_embeddings")[0]), f"row {i}"


@pytest.mark.parametrize("precision", [{"dtype": "bfloat16"}, {"quantize": "int8"}], ids=["bfloat16", "int8"])
def test_bfloat16_and_int8_are_batch_invariant_too(tiny_ckpt, precision):
    kwargs = {"batch_invariant": True, "invariant_batch_tokens": TOKENS}
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, **precision, **kwargs)
    rng = np.random.default_rng(5)
    texts = [_words(rng, 0, 60) for _ in range(17)]
    out = model.encode(texts)
    for i, t in enumerate(texts):
        assert np.array_equal(out[i], model.encode([t])[0]), f"row {i}"


@pytest.fixture(scope="module")
def real_width_model(tmp_path_factory):
    """The real model's widths (768 hidden, 3 query heads and 1 kv head of 256, 1152 MLP, dense head 3072)
    with 6 layers, a 512-piece vocabulary and a 32-token window: the matmul shapes whose kernels decide the
    summation order, at a size a test can afford."""
    ckpt = build_tiny_checkpoint(
        tmp_path_factory.mktemp("real_width") / "ckpt",
        seed=2,
        max_seq_length=256,
        dense_dim=3072,
        hidden_size=768,
        intermediate_size=1152,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        max_position_embeddings=256,
        sliding_window=32,
    )
    return ckpt, EmbeddingGemma.from_pretrained(ckpt, batch_invariant=True)  # the default 256 tokens per batch


def test_real_widths_same_bits_in_any_batch(real_width_model):
    _, model = real_width_model
    rng = np.random.default_rng(7)
    texts = [_words(rng, 0, 100) for _ in range(40)]
    alone = np.stack([model.encode([t])[0] for t in texts[:12]])
    for batch in (texts, texts[:12][::-1], texts[:3]):
        out = model.encode(batch, prompt_name="document" if len(batch) == 3 else None)
        if len(batch) == 3:
            want = np.stack([model.encode([t], prompt_name="document")[0] for t in batch])
        else:
            want = alone if batch is texts else alone[::-1]
        got = out[: len(want)]
        assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"


def test_real_widths_match_sentence_transformers(real_width_model):
    from sentence_transformers import SentenceTransformer

    ckpt, model = real_width_model
    rng = np.random.default_rng(8)
    texts = [_words(rng, 0, 150) for _ in range(12)]  # up to ~230 tokens: 16 ... 256 buckets
    st_model = SentenceTransformer(str(ckpt), device="cpu")
    want = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(model.encode(texts), want, atol=F32_ATOL, rtol=0)


def test_tiny_matches_sentence_transformers(inv_model, st_model):
    rng = np.random.default_rng(9)
    texts = [_words(rng, 0, 70) for _ in range(30)] + [""]
    for prompt_name in (None, "query"):
        want = st_model.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)
        got = inv_model.encode(texts, prompt_name=prompt_name)
        np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# What it refuses


def test_refuses_token_budget_mesh_and_bad_settings(tiny_ckpt, inv_model):
    with pytest.raises(ValueError, match="token_budget packs several texts per row.*leave token_budget None"):
        inv_model.encode(["a", "b"], token_budget=256)
    with pytest.raises(ValueError, match="token_budget"):
        inv_model.warmup(["a"], token_budget=256)
    with pytest.raises(ValueError, match="cannot be sharded over a mesh"):
        inv_model.shard()
    from embgemma_jax import sharding

    with pytest.raises(ValueError, match="cannot be combined with a mesh"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True, mesh=sharding.make_mesh())
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="invariant_batch_tokens must be a positive int"):
            EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True, invariant_batch_tokens=bad)
    assert inv_model.batch_invariant and not EmbeddingGemma.from_pretrained(tiny_ckpt).batch_invariant
