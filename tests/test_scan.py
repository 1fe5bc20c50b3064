"""Layers compiled once: the encoder scans over its repeating group of layers (5 sliding + 1 full for the
real model), or, on the CPU with one device, runs one layer per program call over views of the same stacked
weights (embgemma_jax.layerwise). The scanned, per-layer and unrolled forms give the same numbers, per layer
too, and match the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma
from embgemma_jax.model import EmbeddingGemmaModule, layer_period, stack_layers, unstack_layers
from tests.conftest import F32_ATOL

TEXTS = ["short", "a somewhat longer text about parity " * 5, "the third text crosses the window " * 9]


@pytest.fixture(scope="module")
def twelve_layer_ckpt(tmp_path_factory):
    """Two groups of (5 sliding + 1 full): the scan runs over 2 steps."""
    from embgemma_jax.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt12") / "tiny12", seed=3, num_hidden_layers=12)


def test_layer_period(jax_model):
    cfg = jax_model.config
    assert layer_period(cfg) == 6
    import dataclasses

    from embgemma_jax.config import FULL, SLIDING

    odd = dataclasses.replace(cfg, layer_types=(SLIDING,) * 5 + (FULL,) + (SLIDING,) * 2, num_layers=8)
    assert layer_period(odd) == 8  # does not repeat: one group of every layer


def test_stack_round_trip(jax_model):
    per_layer = jax_model.layer_params()
    restacked = stack_layers(per_layer, jax_model.config)
    for a, b in zip(jax.tree_util.tree_leaves(restacked), jax.tree_util.tree_leaves(jax_model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "groups" in jax_model.params["encoder"] and "layer_0" not in jax_model.params["encoder"]


@pytest.mark.parametrize("per_layer", [False, True], ids=["scanned", "per-layer"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scan_equals_unrolled_and_reference(twelve_layer_ckpt, dtype, per_layer):
    from sentence_transformers import SentenceTransformer

    model = EmbeddingGemma.from_pretrained(twelve_layer_ckpt, dtype=dtype)
    model.engine.per_layer = per_layer
    assert model.engine.uses_layers(3, 48) == per_layer
    cfg = model.config
    assert layer_period(cfg) == 6 and cfg.num_layers == 12
    batch = model.tokenize(TEXTS)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

    scanned = model.engine.forward(model.params, ids, mask, mask, return_hidden_states=True)
    unrolled = jax.jit(
        lambda p, i, m: EmbeddingGemmaModule(cfg, model.dtype, "auto").apply(
            {"params": p}, i, m, m, return_hidden_states=True
        )
    )(unstack_layers(model.params, cfg), ids, mask)
    assert len(scanned.hidden_states) == len(unrolled.hidden_states) == cfg.num_layers + 1
    if dtype == "bfloat16":
        # bf16 rounds every intermediate: XLA fuses the loop body differently from the unrolled layers, so
        # states differ by bf16 rounding steps (as bf16 differs from the reference); the bar is the bf16 one.
        a, b = np.asarray(scanned.embeddings, np.float32), np.asarray(unrolled.embeddings, np.float32)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() >= 0.999, cos
        return
    valid = np.asarray(mask).astype(bool)
    for i, (a, b) in enumerate(zip(scanned.hidden_states, unrolled.hidden_states, strict=True)):
        a, b = np.asarray(a, np.float32)[valid], np.asarray(b, np.float32)[valid]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=f"layer {i}")
    np.testing.assert_allclose(
        np.asarray(scanned.embeddings, np.float32), np.asarray(unrolled.embeddings, np.float32), rtol=0, atol=1e-6
    )
    ref = SentenceTransformer(str(twelve_layer_ckpt), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(model.encode(TEXTS), ref, rtol=0, atol=F32_ATOL)


def test_the_forward_program_holds_one_group(jax_model):
    """The compiled forward program contains a scan over the groups, not one copy of every layer: its jaxpr
    holds as many attention einsums as one group has layers."""
    ids = jnp.ones((2, 16), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda p: jax_model.engine._forward(p, ids, ids, ids))(jax_model.params))
    assert "scan[" in jaxpr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_layer_equals_scanned_on_every_layout(twelve_layer_ckpt, dtype):
    """Per layer against scanned, both through the engine with the host-gathered rows, on rows short enough
    for plain masks (one layer program for both kinds), long enough for the banded sliding layout (two), and
    on packed rows: the same numbers, float32 to 1e-6 (bfloat16: the same bits or cosine >= 0.999)."""
    model = EmbeddingGemma.from_pretrained(twelve_layer_ckpt, dtype=dtype)
    engine = model.engine
    texts = ["short", "a longer text about banded windows " * 6, "x " * 70]

    def encode(per_layer: bool, **kw) -> np.ndarray:
        engine.per_layer = per_layer
        return model.encode(texts, batch_size=3, **kw)

    for kw in ({}, {"token_budget": 256}):
        a, b = encode(True, **kw), encode(False, **kw)
        if dtype == "float32":
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        else:
            assert (np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min() >= 0.999
    engine.per_layer = True
    ids, mask = (np.asarray(x) for x in model.tokenize(texts).values())
    out = model.forward(ids, mask, return_hidden_states=True)
    engine.per_layer = False
    want = model.forward(ids, mask, return_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    if dtype == "float32":
        valid = mask.astype(bool)
        for i, (x, y) in enumerate(zip(out.hidden_states, want.hidden_states, strict=True)):
            x, y = np.asarray(x)[valid], np.asarray(y)[valid]
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(1.0, np.abs(y).max()), err_msg=f"layer {i}")


def test_per_layer_compiles_one_layer_program_and_aliases_the_weights(tiny_ckpt, compiles):
    """A short batch shape compiles one layer program that serves sliding and full layers alike; a long one
    (the banded sliding layout) two; every layer's weights are device arrays over the stacked buffers (no
    copy, nothing held twice)."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    engine = model.engine
    assert engine.uses_layers(1, 16)  # the CPU, one device, a small batch
    names = ("jit(_layer_given)", "jit(_layer)")
    before = [compiles(n) for n in names]
    model.encode(["a b c"])  # 16 tokens: plain masks
    assert [compiles(n) - b for n, b in zip(names, before, strict=True)] == [1, 0]
    model.encode(["word " * 40])  # 48 tokens: banded sliding layers (radius 8)
    assert [compiles(n) - b for n, b in zip(names, before, strict=True)] == [2, 1]

    program_params, _ = engine.split_table(model.params)
    groups = program_params["encoder"]["groups"]
    layers = engine.layers.layers(program_params["encoder"])
    assert engine.layers.copied_bytes == 0
    period = layer_period(model.config)
    for i, layer in enumerate(layers):
        for path, leaf in jax.tree_util.tree_leaves_with_path(layer):
            stack = groups[f"layer_{i % period}"]
            for key in path:
                stack = stack[key.key]
            offset = leaf.unsafe_buffer_pointer() - stack.unsafe_buffer_pointer()
            assert offset == (i // period) * leaf.nbytes, (i, path)


def test_bfloat16_layers_are_bfloat16_views_of_the_bit_stacks(tiny_ckpt):
    """The scanned program gets a bfloat16 model's stacks as uint16 bits; the per-layer weights are bfloat16
    views over the same memory (bits as parameters cost a converting copy in every layer call), and the
    per-layer form gives the scanned form's numbers."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")
    engine = model.engine
    program_params, table = engine.split_table(model.params)
    groups = program_params["encoder"]["groups"]
    layers = engine.layers.layers(program_params["encoder"])
    assert engine.layers.copied_bytes == 0
    period = layer_period(model.config)
    big = 0
    for i, layer in enumerate(layers):
        for path, leaf in jax.tree_util.tree_leaves_with_path(layer):
            stack = groups[f"layer_{i % period}"]
            for key in path:
                stack = stack[key.key]
            assert stack.dtype == jnp.uint16 and leaf.dtype == jnp.bfloat16, (i, path, stack.dtype, leaf.dtype)
            offset = leaf.unsafe_buffer_pointer() - stack.unsafe_buffer_pointer()
            assert offset == (i // period) * leaf.nbytes, (i, path)
            big += leaf.size > 1000
    assert big > 0

    # The same bits as the layers given their weights as uint16 bits, which the layer converts back.
    bits = [jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a).view(np.uint16)), layer) for layer in layers]
    lp = engine.layers
    host_ids = np.full((2, 16), 7, np.int32)
    ids, mask = engine.place("forward", host_ids, np.ones((2, 16), np.int32), count=False)
    embedded = engine.gather(table, host_ids)
    x0, given = lp.prepare(lp.table_params(program_params["encoder"], embedded), ids, mask, None, embedded)
    outs = []
    for weights in (layers, bits):
        x = x0
        for w, layer_type in zip(weights, model.config.layer_types, strict=True):
            x = lp.layer_given(w, x, *given["full" if layer_type == "full_attention" else "sliding"])
        outs.append(np.asarray(x.astype(jnp.float32)))
    np.testing.assert_array_equal(outs[0], outs[1])

    engine.per_layer = True
    per_layer = model.encode(TEXTS)
    engine.per_layer = False
    scanned = model.encode(TEXTS)
    cos = np.sum(per_layer * scanned, axis=-1)
    assert np.all(cos >= 0.999), cos  # bfloat16 across program boundaries, as the other layout tests


def test_the_cpu_runs_small_batches_and_long_rows_per_layer_and_the_rest_scanned(tiny_ckpt, compiles):
    """By default (per_layer None) a batch of at most PER_LAYER_MAX_TOKENS padded tokens runs per layer, and so
    do rows long enough for banded sliding attention (24 tokens for the tiny model's radius 8); a larger batch
    of shorter rows runs as the scanned program. All give the reference pipeline's numbers."""
    from embgemma_jax.engine import PER_LAYER_MAX_TOKENS

    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    engine = model.engine
    assert engine.per_layer is None
    short = ["word " * 5] * 128  # 13 tokens, rows of 16: plain masks
    assert 128 * 16 > PER_LAYER_MAX_TOKENS >= 8 * 16
    assert not engine.uses_layers(128, 16) and engine.uses_layers(8, 16)
    assert engine.uses_layers(16, 96) and engine.layers.builds_masks(96) and not engine.layers.builds_masks(16)
    before = compiles("jit(_forward)"), compiles("jit(_tail)")
    large = model.encode(short, batch_size=128)
    small = model.encode(short, batch_size=8)
    assert (compiles("jit(_forward)") - before[0], compiles("jit(_tail)") - before[1]) == (1, 1)
    np.testing.assert_allclose(large, small, rtol=0, atol=1e-6)
    engine.per_layer = True
    np.testing.assert_allclose(model.encode(short, batch_size=128), large, rtol=0, atol=1e-6)
    assert compiles("jit(_tail)") - before[1] == 2

    engine.per_layer = None
    long_rows = ["word " * 90] * 16  # 16 x 96 tokens: banded sliding layers, per layer
    before = compiles("jit(_forward)"), compiles("jit(_layer)")
    per_layer = model.encode(long_rows, batch_size=16)
    assert compiles("jit(_forward)") == before[0] and compiles("jit(_layer)") > before[1]
    engine.per_layer = False
    np.testing.assert_allclose(model.encode(long_rows, batch_size=16), per_layer, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_long_row_and_scanned_programs_use_xla_kernels(tiny_ckpt, dtype):
    """In float32 on the CPU the layer programs of long rows (own banded masks) and the scanned programs
    compile with XLA's own kernels, no YNNPACK fusions; the short-row program keeps them, and bfloat16 keeps
    them everywhere."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype=dtype)
    engine = model.engine
    params, table = engine.split_table(model.params)

    def placed(length: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        ids = np.full((2, length), 7, np.int32)
        d_ids, d_mask = engine.place("forward", ids, np.ones_like(ids), count=False)
        return d_ids, d_mask, engine.gather(table, ids)

    def layer_hlo(length: int) -> dict[str, str]:
        jobs = engine.layers.compile_jobs(params, *placed(length))
        texts = [job().as_text() for job in jobs[1:-1]]  # the layer programs
        return {text.split(",", 1)[0].removeprefix("HloModule "): text for text in texts}

    short, long = layer_hlo(16), layer_hlo(96)
    assert list(short) == ["jit__layer_given"] and "__ynn_fusion" in short["jit__layer_given"]
    assert "jit__layer" in long  # the banded sliding layers build their masks
    assert ("__ynn_fusion" in long["jit__layer"]) == (dtype == "bfloat16")

    # The scanned programs (the CPU's larger batches) likewise.
    d_ids, d_mask, embedded = placed(16)
    scanned = engine.scanned_forward.lower(params, d_ids, d_mask, d_mask, embedded).compile()
    assert ("__ynn_fusion" in scanned.as_text()) == (dtype == "bfloat16")
