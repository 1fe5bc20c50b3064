"""Throughput features keep results exact: token-budget batching, banded attention, the compile cache,
and the lower-precision modes stay within their stated quality bounds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import plan_batches
from embgemma_jax.quant import quantize_matrix, quantize_rows

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [("word " * n).strip() for n in (1, 3, 7, 12, 20, 33, 50, 80, 120, 2, 9, 40)] + ["", "Mars <mask>"]


def test_token_budget_gives_the_same_embeddings(jax_model):
    base = jax_model.encode(TEXTS, batch_size=4)
    for budget in (64, 200, 10_000):
        np.testing.assert_allclose(jax_model.encode(TEXTS, batch_size=64, token_budget=budget), base, atol=1e-6)
    # The research path (pooling variants) batches through the same planner.
    np.testing.assert_allclose(
        jax_model.encode(TEXTS, pooling="max", token_budget=64), jax_model.encode(TEXTS, pooling="max"), atol=1e-6
    )
    for bad in (0, True):
        with pytest.raises(ValueError, match="token_budget"):
            jax_model.encode(TEXTS, token_budget=bad)
        with pytest.raises(ValueError, match="token_budget"):
            jax_model.encode(TEXTS, pooling="max", token_budget=bad)


def test_token_budget_plan_respects_budget(jax_model):
    lengths = [len(x) for x in jax_model.tokenizer.encode(TEXTS)]
    plan = plan_batches(lengths, 64, 128, jax_model.config.max_seq_length)
    assert sorted(i for b in plan for i in b.indices) == list(range(len(TEXTS)))
    for sel, length, rows in ((b.indices, b.length, b.rows) for b in plan):
        assert max(lengths[i] for i in sel) <= length
        assert len(sel) == 1 or len(sel) * length <= 128
        assert rows >= len(sel)


def _cosines(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_quality_and_storage(tiny_ckpt, jax_model):
    q = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16", quantize="int8")
    enc = q.layer_params()["encoder"]
    assert enc["embedding"].dtype == np.int8 and enc["embedding_scale"].shape == (q.config.vocab_size,)
    assert enc["layer_0"]["attn"]["q"].dtype == np.int8 and enc["layer_0"]["attn"]["q_scale"].shape == (3, 32)
    assert enc["layer_0"]["attn"]["o_scale"].shape == (48,)
    cos = _cosines(q.encode(TEXTS), jax_model.encode(TEXTS))
    assert np.isfinite(cos).all() and cos.min() >= 0.99, cos
    with pytest.raises(ValueError, match="unknown quantize mode 'int4'"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, quantize="int4")


def test_quantize_round_trip_error_is_bounded():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 3, 16)).astype(np.float32)
    q, s = quantize_matrix(w, 1)
    assert q.dtype == np.int8 and s.shape == (3, 16)
    assert np.abs(q * s - w).max() <= s.max() / 2 + 1e-7  # round to nearest: at most half a step
    t = rng.normal(size=(10, 8)).astype(np.float32)
    qr, sr = quantize_rows(t)
    assert sr.shape == (10,)
    assert np.all(np.abs(qr * sr[:, None] - t) <= sr[:, None] / 2 + 1e-7)


def test_compilation_cache_is_used_by_a_second_process(tiny_ckpt, tmp_path):
    script = f"""
import json, jax
from jax import monitoring
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import plan_batches
m = EmbeddingGemma.from_pretrained({str(tiny_ckpt)!r}, compilation_cache_dir={str(tmp_path / "cache")!r})
m.encode(["one text", "and another one"])
print(json.dumps({{"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] >= 1 and any((tmp_path / "cache").iterdir())
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0, runs


def test_batches_are_bounded_whatever_the_caller_asks():
    """batch_size=100000 (or a huge token budget) still plans device batches of at most MAX_BATCH_TOKENS
    padded tokens, and every text is planned exactly once."""
    from embgemma_jax.batching import MAX_BATCH_TOKENS

    lengths = [5] * 30_000 + [700] * 300 + [2048] * 100
    for budget in (None, 10**9):
        plan = plan_batches(lengths, 100_000, budget, 2048)
        assert sorted(i for b in plan for i in b.indices) == list(range(len(lengths)))
        assert max(b.rows * b.length for b in plan) <= MAX_BATCH_TOKENS


def test_a_partial_last_batch_is_split_into_full_power_of_two_batches():
    """6 texts at batch size 8 run as 4 + 2 rows, not 8 rows with 2 empty: every text once, no empty row,
    and the row counts are the batch size or powers of two (the shapes padding would have compiled)."""
    for n, batch_size in [(6, 8), (7, 8), (13, 8), (1, 8), (8, 8), (21, 12)]:
        plan = plan_batches([2048] * n, batch_size, None, 2048)
        assert sorted(i for b in plan for i in b.indices.tolist()) == list(range(n))
        assert all(b.rows == len(b.indices) for b in plan), [(b.rows, len(b.indices)) for b in plan]
        assert all(b.rows == batch_size or b.rows & (b.rows - 1) == 0 for b in plan)
    assert [b.rows for b in plan_batches([2048] * 6, 8, None, 2048)] == [4, 2]
    assert [b.rows for b in plan_batches([2048] * 21, 12, None, 2048)] == [12, 8, 1]
