"""Shared fixtures. Forces 8 CPU devices (before JAX starts) so sharding bugs show up on CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI keeps a persistent compilation cache in ~/.cache by default; tests opt out (test_cli_cache.py
# checks the default) so that every test compiles what it runs.
os.environ.setdefault("EMBGEMMA_COMPILATION_CACHE", "off")

import collections  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One tolerance for float32 parity against the PyTorch reference, stated once: both sides compute in
# float32 with different summation orders; on unit-norm embeddings of tiny models the observed gap is
# ~2e-7, and 1e-5 leaves room for other backends while any real bug (window, causality, prompt,
# dense head) moves values by >1e-2.
F32_ATOL = 1e-5

# XLA compilations so far in this process, per jitted function ("jit(_forward)", ...), from JAX's own
# compile events: ahead-of-time compiles and compiles on a call alike (a warmed-up program's first call
# compiles nothing, while its jit cache still counts a new entry).
_BACKEND_COMPILES: collections.Counter = collections.Counter()


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[kwargs.get("fun_name", "")] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.fixture
def compiles():
    """``compiles(name)``: XLA compilations of the jitted function ``name`` (or of several names, summed) so
    far in this process."""
    return lambda names: sum(_BACKEND_COMPILES[n] for n in ((names,) if isinstance(names, str) else names))


# The jitted functions a forward pass compiles: one scanned program (accelerators, meshes) or the per-layer
# programs (embgemma_jax.layerwise: the CPU with one device).
FORWARD_PROGRAMS = (
    "jit(_forward)",
    "jit(_forward_packed)",
    "jit(_prepare)",
    "jit(_layer_given)",
    "jit(_layer)",
    "jit(_tail)",
    "jit(_packed_tail)",
)


def per_shape_program(packed: bool = False) -> tuple[str, str]:
    """The jitted functions of which exactly one compiles per batch shape of the reference pipeline: the
    scanned program, or the per-layer pipeline's tail (beside it, once per shape: ``_prepare`` and one or two
    layer programs). Which one runs a shape is Engine.uses_layers's choice."""
    return ("jit(_forward_packed)", "jit(_packed_tail)") if packed else ("jit(_forward)", "jit(_tail)")


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
