"""The float64 NumPy oracle against the PyTorch reference (it must be right to serve as ground truth)."""

import dataclasses

import numpy as np
import pytest
import torch

from embgemma_jax.checkpoint.load import load_checkpoint
from embgemma_jax.research.oracle import oracle_forward

# float64 oracle vs float32 reference: the reference's own rounding, relative to the activation scale.
REL_TOL = 1e-6

TEXTS = [
    "Which planet is known as the Red Planet?",
    "The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun. " * 6,  # 96 tokens, > window
    "a",
    "",
]


@pytest.fixture(scope="module")
def reference(st_model):
    feats = st_model.preprocess(TEXTS, prompt="title: none | text: ")
    with torch.no_grad():
        out = st_model[0].auto_model(
            input_ids=feats["input_ids"], attention_mask=feats["attention_mask"], output_hidden_states=True
        )
    emb = st_model.encode(TEXTS, prompt="title: none | text: ", convert_to_numpy=True)
    hidden = [h.double().numpy() for h in out.hidden_states]
    return feats["input_ids"].numpy(), feats["attention_mask"].numpy(), hidden, emb


@pytest.fixture(scope="module")
def host_params(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)  # NumPy arrays: the oracle needs no JAX
    return ckpt.config, ckpt.params


def test_oracle_matches_transformers_and_st(reference, host_params):
    ids, mask, hidden, emb = reference
    cfg, params = host_params
    assert ids.shape[1] > 2 * cfg.window_radius + 1  # the window matters
    o = oracle_forward(params, cfg, ids, mask)
    valid = mask.astype(bool)
    for i, (a, h) in enumerate(zip(o.hidden_states(), hidden, strict=True)):
        scale = np.abs(h[valid]).max()
        np.testing.assert_allclose(a[valid], h[valid], rtol=0, atol=REL_TOL * scale, err_msg=f"hidden state {i}")
        assert np.isnan(a[~valid]).all()
    np.testing.assert_allclose(o.embeddings, emb, rtol=0, atol=REL_TOL)


def test_oracle_is_independent_of_padding(reference, host_params):
    """Each row alone at its true length gives the same numbers as in the padded batch."""
    ids, mask, _, _ = reference
    cfg, params = host_params
    batch = oracle_forward(params, cfg, ids, mask)
    n = int(mask[0].sum())
    alone = oracle_forward(params, cfg, ids[:1, :n], mask[:1, :n])
    np.testing.assert_allclose(alone.embeddings[0], batch.embeddings[0], rtol=0, atol=1e-13)  # BLAS rounding only


@pytest.mark.parametrize(
    "bug",
    [
        dict(sliding_window=34),  # window radius 17 instead of 8
        dict(sliding_window=14),  # radius 7: off by one
        dict(rope_local_base=1_000_000.0),  # the wrong RoPE base on sliding layers
    ],
)
def test_oracle_comparison_catches_config_bugs(reference, host_params, bug):
    """The comparison above has power: a plausible mistake moves the embeddings far beyond REL_TOL."""
    ids, mask, _, emb = reference
    cfg, params = host_params
    wrong = oracle_forward(params, dataclasses.replace(cfg, **bug), ids, mask)
    assert np.abs(wrong.embeddings - emb).max() > 1e3 * REL_TOL


def test_oracle_rejects_bad_input(host_params):
    cfg, params = host_params
    with pytest.raises(ValueError, match="token ids must be in"):
        oracle_forward(params, cfg, np.array([[2, cfg.vocab_size]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="same shape"):
        oracle_forward(params, cfg, np.array([[2, 1]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="attention layer 9 is out of range"):
        oracle_forward(params, cfg, np.array([[2, 1]]), np.ones((1, 2)), attention_layers=(9,))
