"""Pooling from any layer(s), user pooling functions and intermediates, against the PyTorch reference
and the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from embgemma_jax import EmbeddingGemma
from embgemma_jax.pooling import PoolingSpec
from embgemma_jax.research.oracle import oracle_forward
from embgemma_jax.research.variants import Capture
from tests.conftest import F32_ATOL

TEXTS = [
    "Which planet is known as the Red Planet?",
    "The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun. " * 2,  # > window (radius 8)
    "a",
]
PROMPT = "task: clustering | query: "


def sum_over_ten(states, mask):
    """A user pooling function: plain JAX of states [B, T, D] and mask [B, T]."""
    return jnp.sum(states * mask[..., None].astype(states.dtype), axis=1) / 10.0


def _torch_reference(st_model, texts, prompt):
    """Reference hidden states (transformers) on sentence-transformers' own tokenization."""
    feats = st_model.preprocess(texts, prompt=prompt)
    with torch.no_grad():
        out = st_model[0].auto_model(
            input_ids=feats["input_ids"], attention_mask=feats["attention_mask"], output_hidden_states=True
        )
    return feats, out.hidden_states


def _torch_head(st_model, pooled):
    feats = {"sentence_embedding": pooled}
    for module in list(st_model)[2:]:
        feats = module(feats)
    return feats["sentence_embedding"].numpy()


def test_layer_variants_match_torch_hidden_states(st_model, tiny_ckpt):
    """Layer L alone, the mean of the last 3 layers, a weighted final-normed mix and a user function, all
    in one encoder pass, against the same computation done in torch on transformers' hidden states."""
    jax_model = EmbeddingGemma.from_pretrained(tiny_ckpt)  # its own: this test counts its compiled programs
    feats, hidden = _torch_reference(st_model, TEXTS, PROMPT)
    mask = feats["attention_mask"].unsqueeze(-1).float()
    norm = st_model[0].auto_model.norm
    n = len(hidden) - 1

    def torch_mean(states):
        return (states * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        expected = {
            "layer2": _torch_head(st_model, torch_mean(hidden[2])),
            "last3": _torch_head(st_model, torch_mean((hidden[n] + hidden[n - 1] + hidden[n - 2]) / 3)),
            "mix": _torch_head(st_model, torch_mean(0.25 * norm(hidden[1]) + 0.75 * hidden[n])),
            "embed_max": _torch_head(st_model, hidden[0].masked_fill(mask == 0, -torch.inf).max(1).values),
            "user": (hidden[n] * mask).sum(1).numpy() / 10.0,
        }
    variants = {
        "layer2": PoolingSpec(layers=2),
        "last3": PoolingSpec(layers=(-1, -2, -3)),
        "mix": PoolingSpec(layers=(1, -1), layer_weights=(0.25, 0.75), final_norm=True),
        "embed_max": PoolingSpec("max", layers=0),
        "user": PoolingSpec(sum_over_ten, head=False),
    }
    r = jax_model.engine
    shape_set = r.batch_shapes([PROMPT + t for t in TEXTS], batch_size=4)  # batch shapes of this plan
    shapes = len(shape_set)
    # The program that compiles once per shape for the encoder alone: scanned, one per (shape, all_layers);
    # per layer (the CPU's for batches this small), the final norm, shared by both (the layer programs too).
    layerwise = {r.uses_layers(*shape) for shape in shape_set}
    assert len(layerwise) == 1
    layerwise = layerwise.pop()
    states = r.layers.final_norm if layerwise else r.scanned_states
    before = states._cache_size()
    got = jax_model.embed_variants(TEXTS, variants, prompt=PROMPT, batch_size=4)
    assert states._cache_size() - before == shapes  # one encoder program (all layers) for all five variants
    for name, exp in expected.items():
        np.testing.assert_allclose(
            got[name], exp, rtol=0, atol=F32_ATOL * 10 if name == "user" else F32_ATOL, err_msg=name
        )
    # the variants really differ from each other and from the reference embedding
    ref = st_model.encode(TEXTS, prompt=PROMPT)
    for name in ("layer2", "last3", "mix", "embed_max"):
        assert np.abs(got[name] - ref).max() > 1e-2, name

    # encode() with the same choices, one call each: no new encoder program for layer variants ...
    np.testing.assert_allclose(
        jax_model.encode(TEXTS, prompt=PROMPT, layers=2, batch_size=4), expected["layer2"], rtol=0, atol=F32_ATOL
    )
    assert states._cache_size() - before == shapes
    # ... and a second one (returning only the final states) shared by every variant of the last layer
    user = jax_model.encode(TEXTS, prompt=PROMPT, pooling=PoolingSpec(sum_over_ten, head=False), batch_size=4)
    np.testing.assert_allclose(user, expected["user"], rtol=0, atol=F32_ATOL * 10)
    for mode in ("max", "cls", "weightedmean"):
        jax_model.encode(TEXTS, prompt=PROMPT, pooling=mode, batch_size=4)
    assert states._cache_size() - before == (1 if layerwise else 2) * shapes


def test_inspect_matches_reference_and_oracle(st_model, jax_model):
    it = jax_model.inspect(TEXTS, prompt=PROMPT, capture=Capture(attention_layers=(0, -1)))
    feats, hidden = _torch_reference(st_model, TEXTS, PROMPT)
    np.testing.assert_array_equal(it.input_ids, feats["input_ids"].numpy())
    valid = it.attention_mask.astype(bool)
    assert (~valid).any()  # the batch has padding

    # per-layer states against transformers' hidden_states (same convention)
    ours = it.hidden_states()
    assert len(ours) == len(hidden) == jax_model.config.num_layers + 1
    for i, (a, h) in enumerate(zip(ours, hidden, strict=True)):
        h = h.numpy()
        scale = np.abs(h[valid]).max()
        np.testing.assert_allclose(a[valid], h[valid], rtol=0, atol=F32_ATOL * scale, err_msg=f"hidden state {i}")
        assert np.isnan(a[~valid]).all()  # padding is marked
    np.testing.assert_allclose(it.embedding, st_model.encode(TEXTS, prompt=PROMPT), rtol=0, atol=F32_ATOL)

    # what transformers does not expose, against the float64 oracle
    o = oracle_forward(jax_model.params, jax_model.config, it.input_ids, it.attention_mask, attention_layers=(0, 5))
    scale = np.nanmax(np.abs(o.after_attention))
    np.testing.assert_allclose(it.after_attention[:, valid], o.after_attention[:, valid], rtol=0, atol=F32_ATOL * scale)
    np.testing.assert_allclose(it.pooled, o.pooled, rtol=0, atol=F32_ATOL)
    for a, b in zip(it.dense_outputs, o.dense_outputs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=F32_ATOL)
    assert sorted(it.attention_probs) == [0, 5]
    for layer in (0, 5):
        p, q = it.attention_probs[layer], o.attention_probs[layer]
        assert p.shape == (3, 3, valid.shape[1], valid.shape[1])
        rows = np.broadcast_to(valid[:, None, :, None], p.shape)
        np.testing.assert_allclose(p[rows], q[rows], rtol=0, atol=1e-6)
        assert np.isnan(p[~rows]).all()
        np.testing.assert_allclose(np.nansum(p, axis=-1)[rows[..., 0]], 1.0, atol=1e-6)
    # sliding layer 0 sees at most 2 * 8 + 1 keys per query; the full layer 5 sees every real key
    assert (np.nan_to_num(it.attention_probs[0]) > 0).sum(-1).max() <= 17
    assert (np.nan_to_num(it.attention_probs[5]) > 0).sum(-1).max() == valid.sum(1).max()


def test_include_prompt_false_pool_mask(st_model, jax_model):
    it = jax_model.inspect(TEXTS, prompt=PROMPT, mark_padding=False)
    assert (it.pool_mask == it.attention_mask).all()  # the checkpoint includes the prompt
    # a pool mask that drops the prompt: the first prompt_length positions of every row
    from embgemma_jax.research.variants import pool_mask_for

    pm = pool_mask_for(jax_model, it.attention_mask, [PROMPT] * len(TEXTS), include_prompt=False)
    n = st_model[0]._get_prompt_length(PROMPT)
    assert (pm[:, :n] == 0).all() and (pm[:, n:] == it.attention_mask[:, n:]).all()


def _out_shapes(jitted, *args, **kwargs):
    """Shapes of the outputs of the jitted program as the model calls it."""
    return [tuple(a.shape) for a in jax.tree_util.tree_leaves(jitted.eval_shape(*args, **kwargs))]


def test_capture_returns_only_what_is_asked(jax_model):
    """The programs' outputs: the plain forward returns no intermediates; attention capture of one layer
    returns one probability tensor, not one per layer."""
    cfg = jax_model.config
    b, t = 2, 16
    ids = jnp.ones((b, t), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32)
    probs_shape = (b, cfg.num_heads, t, t)
    stacked = (cfg.num_layers, b, t, cfg.hidden_size)

    plain = _out_shapes(jax_model.engine.scanned_forward, jax_model.params, ids, mask, mask)
    assert probs_shape not in plain and stacked not in plain and len(plain) == 3

    r = jax_model.engine
    one = _out_shapes(r.capture, jax_model.params, ids, mask, mask, capture=Capture(False, (2,)))
    assert one.count(probs_shape) == 1 and stacked not in one
    full = _out_shapes(r.capture, jax_model.params, ids, mask, mask, capture=Capture(True, ()))
    assert probs_shape not in full and full.count(stacked) == 2


def test_research_errors(jax_model):
    with pytest.raises(ValueError, match=r"attention layer 6 is out of range.*0\.\.5"):
        jax_model.inspect(["x"], capture=Capture(attention_layers=(6,)))
    with pytest.raises(TypeError, match="attention_layers must be an int or a sequence of ints"):
        Capture(attention_layers="all")
    with pytest.raises(ValueError, match="variants must be a non-empty mapping"):
        jax_model.embed_variants(["x"], {})
    with pytest.raises(ValueError, match="needs the layer outputs"):
        jax_model.inspect(["x"], capture=Capture(residuals=False)).hidden_states()
    with pytest.raises(ValueError, match="truncate_dim=100 exceeds variant 'user'"):
        jax_model.embed_variants(["x"], {"user": PoolingSpec("mean", head=False)}, truncate_dim=100)


def test_attention_capture_with_banded_sliding_layers(tiny_ckpt, jax_model):
    """A model whose sliding layers run banded (the long-sequence fast path) still returns full attention
    matrices (captured with the dense form) and the same states."""
    from embgemma_jax import EmbeddingGemma

    banded = EmbeddingGemma.from_pretrained(tiny_ckpt, attention_impl="banded")
    it = banded.inspect(TEXTS, capture=Capture(attention_layers=(1,)))
    o = oracle_forward(banded.params, banded.config, it.input_ids, it.attention_mask, attention_layers=(1,))
    rows = np.broadcast_to(it.attention_mask.astype(bool)[:, None, :, None], it.attention_probs[1].shape)
    np.testing.assert_allclose(it.attention_probs[1][rows], o.attention_probs[1][rows], rtol=0, atol=1e-6)
    # pooling variants on the banded encoder equal those of the dense one
    spec = {"l3": PoolingSpec("max", layers=3)}
    np.testing.assert_allclose(
        banded.embed_variants(TEXTS, spec)["l3"], jax_model.embed_variants(TEXTS, spec)["l3"], rtol=0, atol=F32_ATOL
    )
