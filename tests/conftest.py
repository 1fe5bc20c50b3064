"""Shared fixtures. Forces 8 CPU devices (before JAX starts) so sharding bugs show up on CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI keeps a persistent compilation cache in ~/.cache by default; tests opt out (test_cli_cache.py
# checks the default) so that every test compiles what it runs.
os.environ.setdefault("EMBGEMMA_COMPILATION_CACHE", "off")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# One tolerance for float32 parity against the PyTorch reference, stated once: both sides compute in
# float32 with different summation orders; on unit-norm embeddings of tiny models the observed gap is
# ~2e-7, and 1e-5 leaves room for other backends while any real bug (window, causality, prompt,
# dense head) moves values by >1e-2.
F32_ATOL = 1e-5


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny EmbeddingGemma in the real sentence-transformers layout (sliding window 16 -> radius 8,
    max_seq_length 96)."""
    from embgemma_jax.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def st_model(tiny_ckpt):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_ckpt), device="cpu")


@pytest.fixture(scope="session")
def jax_model(tiny_ckpt):
    from embgemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(tiny_ckpt)
