"""Packed rows (throughput mode, token_budget=...): several texts share a row, each attending only within
itself and pooled on its own. Same numbers as the reference, and (almost) no padding."""

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import MAX_BATCH_TOKENS, PACK_MIN_LENGTH, packed_batches
from embgemma_jax.sharding import make_mesh
from tests.conftest import F32_ATOL, FORWARD_PROGRAMS, per_shape_program

WORDS = "the quick brown fox jumps over a lazy dog while packed rows keep every text apart <eos> é 東京".split()


def _texts(n: int, seed: int = 0, longest: int = 120) -> list[str]:
    """Lengths spread log-uniformly from 1 to ``longest`` words (many short texts, some long), plus edge cases."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(0, np.log(longest), n)).astype(int)
    return [" ".join(rng.choice(WORDS, k)) for k in lengths] + ["", " ", "x"]


def test_packed_batches_hold_every_text_once(jax_model):
    texts = _texts(300)
    tok = jax_model.tokenizer
    ids = tok.encode(texts)
    seen = []
    for idx, b in packed_batches(tok, texts, 64, 2048):
        rows, length = b.input_ids.shape
        assert rows * length <= max(2048, length) and rows <= 64 and length >= min(PACK_MIN_LENGTH, tok.max_length)
        for i, r, s in zip(idx, b.text_rows, b.text_segments, strict=True):
            where = b.segment_ids[r] == s
            assert where.sum() == len(ids[i])
            np.testing.assert_array_equal(b.input_ids[r][where], ids[i])  # contiguous, in order
            np.testing.assert_array_equal(b.positions[r][where], np.arange(len(ids[i])))
        assert (np.bincount(b.text_rows) <= b.segments).all()
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(texts)))


@pytest.mark.parametrize("impl", ["auto", "dense", "banded"])
def test_packed_encode_matches_reference(tiny_ckpt, st_model, impl):
    texts = _texts(120, seed=1)
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, attention_impl=impl)
    packed = model.encode(texts, token_budget=1024, batch_size=64)
    assert any(program == "forward_packed" for program, _ in model.engine.compiled)
    ref = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(packed, ref, rtol=0, atol=F32_ATOL)


def test_packed_padding_is_small(jax_model):
    """Device tokens over real tokens on a mixed corpus at a throughput budget: at most 1.1x (the padded
    path needs ~1.3-1.5x on the same texts)."""
    texts = _texts(2000, seed=2, longest=150)
    jax_model.engine.stats.update(real_tokens=0, device_tokens=0, batches=0)
    jax_model.encode(texts, token_budget=8192, batch_size=1024)
    packed = jax_model.engine.stats["device_tokens"] / jax_model.engine.stats["real_tokens"]
    jax_model.engine.stats.update(real_tokens=0, device_tokens=0, batches=0)
    jax_model.encode(texts, batch_size=64)
    padded = jax_model.engine.stats["device_tokens"] / jax_model.engine.stats["real_tokens"]
    assert packed <= 1.1 < padded, (packed, padded)


def test_packed_bfloat16_and_mesh(tiny_ckpt, jax_model):
    import jax

    texts = _texts(60, seed=3)
    ref = jax_model.encode(texts)
    bf16 = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16").encode(texts, token_budget=1024)
    cos = np.sum(bf16 * ref, 1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, cos.min()
    meshed = EmbeddingGemma.from_pretrained(tiny_ckpt, mesh=make_mesh(jax.devices("cpu")))
    np.testing.assert_allclose(meshed.encode(texts, token_budget=1024), ref, rtol=0, atol=F32_ATOL)


def test_packing_respects_the_batch_cap(jax_model):
    for _, b in packed_batches(jax_model.tokenizer, _texts(50), 10**6, 10**9):
        assert b.input_ids.size <= MAX_BATCH_TOKENS


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "scanned"])
@pytest.mark.parametrize("token_budget", [None, 1024])
def test_warmup_compiles_every_shape_the_job_uses(tiny_ckpt, token_budget, per_layer, compiles):
    """After engine.warmup(batch_shapes(texts)), encoding those texts compiles no new program, and the
    warm-up ran nothing (it compiles ahead of time: placeholder batches are neither run nor counted). Both
    forms of the encoder: per layer (the CPU's) and scanned (accelerators')."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    model.engine.per_layer = per_layer
    texts = _texts(150, seed=4)
    shapes = model.engine.batch_shapes(texts, batch_size=16, token_budget=token_budget)
    name = per_shape_program(packed=token_budget is not None)
    attr = "forward" if token_budget is None else "forward_packed"
    program, calls = getattr(model.engine, attr), []

    def recording(*a, **k):  # the pipeline, with its calls (runs) recorded
        calls.append(a)
        return program(*a, **k)

    setattr(model.engine, attr, recording)
    before, total = compiles(name), compiles(FORWARD_PROGRAMS)
    assert model.warmup(texts, batch_size=16, token_budget=token_budget) == len(shapes) >= 2
    assert compiles(name) - before == len(shapes)
    compiled = compiles(FORWARD_PROGRAMS) - total
    assert compiled == len(shapes) if not per_layer else 3 * len(shapes) <= compiled <= 4 * len(shapes)
    assert calls == []  # compiled ahead of time: nothing ran
    setattr(model.engine, attr, program)
    assert model.engine.stats["batches"] == 0
    model.encode(texts, batch_size=16, token_budget=token_budget)
    assert compiles(FORWARD_PROGRAMS) - total == compiled  # no program of any shape compiled again
    assert model.engine.stats["batches"] > 0  # real batches counted, placeholders not


def test_tokenized_windows_prefetch_keeps_order(jax_model):
    from embgemma_jax.batching import tokenized_windows

    texts = _texts(500, seed=6)
    got = list(tokenized_windows(jax_model.tokenizer, texts, 64))
    assert [s for s, _ in got] == list(range(0, len(texts), 64))
    assert [i for _, ids in got for i in ids] == jax_model.tokenizer.encode(texts)


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "scanned"])
def test_a_cold_pass_compiles_its_first_shapes_ahead_and_only_once(tiny_ckpt, per_layer, compiles):
    """encode plans its first batches, compiles their new shapes together (in parallel), each once, and a
    second call compiles and warms nothing again; the numbers are those of the reference path."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    model.engine.per_layer = per_layer
    texts = _texts(200, seed=7)
    name = per_shape_program()
    before, total = compiles(name), compiles(FORWARD_PROGRAMS)
    first = model.encode(texts, batch_size=16)
    compiled = compiles(name) - before
    shapes = {shape for p, shape in model.engine.compiled}
    assert compiled == len(shapes) >= 2 and {p for p, _ in model.engine.compiled} == {"forward"}
    every = compiles(FORWARD_PROGRAMS) - total
    calls = []
    original = model.engine.warmup
    model.engine.warmup = lambda *a, **k: calls.append(a) or original(*a, **k)
    np.testing.assert_array_equal(model.encode(texts, batch_size=16), first)
    assert calls == [] and compiles(FORWARD_PROGRAMS) - total == every
