"""The server's warm-up compiles, through the engine, every batch shape its encode calls can make."""

import numpy as np

from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import bucket_lengths
from embgemma_jax.server.batcher import Batcher, batch_size_for
from embgemma_jax.server.metrics import Metrics
from tests.conftest import FORWARD_PROGRAMS, per_shape_program


def test_warmup_covers_the_servers_shapes(tiny_ckpt, compiles):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    batcher = Batcher(model, max_batch_tokens=96, max_concurrent_requests=8, metrics=Metrics())
    shapes = batcher.warmup_shapes()
    name = per_shape_program()
    before = compiles(name)
    assert batcher.warmup() == len(shapes)
    assert compiles(name) - before == len(shapes)
    compiled = compiles(FORWARD_PROGRAMS)
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 16):  # calls as the device thread makes them
        texts = [" ".join(["word"] * int(k)) for k in rng.integers(0, 90, n)]
        longest = max(len(x) for x in model.tokenizer.encode(texts))
        model.encode(texts, batch_size=batch_size_for(96, longest, model.config.max_seq_length))
    assert compiles(FORWARD_PROGRAMS) == compiled  # nothing new compiled


def test_warmup_covers_a_batch_invariant_servers_shapes(tiny_ckpt, compiles):
    """Batch-invariant: one shape per length bucket, and the device thread's calls run only those."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True, invariant_batch_tokens=64)
    batcher = Batcher(model, max_batch_tokens=96, max_concurrent_requests=8, metrics=Metrics())
    shapes = batcher.warmup_shapes()
    assert [length for _, length in shapes] == list(bucket_lengths(model.config.max_seq_length))
    name = per_shape_program()
    before = compiles(name)
    assert batcher.warmup() == len(shapes)
    assert compiles(name) - before == len(shapes)
    compiled = compiles(FORWARD_PROGRAMS)
    rng = np.random.default_rng(1)
    for n in (1, 3, 7, 16):
        texts = [" ".join(["word"] * int(k)) for k in rng.integers(0, 90, n)]
        model.encode(texts, batch_size=batch_size_for(96, 96, model.config.max_seq_length))
    assert compiles(FORWARD_PROGRAMS) == compiled
    assert {shape for _, shape in model.engine.compiled} == set(shapes)
