"""End-to-end and per-layer parity with the real reference (transformers + sentence-transformers).

The tiny checkpoint keeps the real structure (5 sliding : 1 full, 3 query heads sharing 1 kv head,
q/k norms, two RoPE bases) with sliding_window 16 (radius 8) and max_seq_length 96, so short inputs
straddle the window radius and long ones hit truncation.
"""

import numpy as np
import pytest
import torch

from embgemma_jax import model as model_lib
from tests.conftest import F32_ATOL

WORDS = "the red planet mars is known for iron oxide dust storms and two small moons".split()


def _text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


# Lengths in tokens span: below the radius (8), at it, just above, beyond the window (16), beyond
# 2 windows, and beyond max_seq_length (96, truncated); plus literal special tokens and empty text.
TEXTS = [
    "",
    "Mars",
    _text(3),
    _text(6, 1),
    _text(8, 2),
    _text(9, 3),
    _text(14, 4),
    _text(30, 5),
    _text(70, 6),
    _text(200, 7),
    "literal <eos> and <mask> and <unused0><start_of_turn>user<end_of_turn> tokens <bos><pad>",
    "Ünïcödé 東京 😀 numbers 1234567890   multiple   spaces\tand\ttabs\nnewlines",
]


def _st_ids(st_model, texts):
    features = st_model.preprocess(texts)
    ids, mask = features["input_ids"].numpy(), features["attention_mask"].numpy()
    return [list(row[m.astype(bool)]) for row, m in zip(ids, mask, strict=True)]


def test_token_ids_match_reference(jax_model, st_model):
    prompts = list(jax_model.prompts.values())
    texts = TEXTS + [p + t for p in prompts for t in TEXTS[:4]]
    ours = jax_model.tokenizer.encode(texts)
    ref = _st_ids(st_model, texts)
    for text, a, b in zip(texts, ours, ref, strict=True):
        assert a == [int(x) for x in b], text
    # Truncation keeps BOS first and EOS last at exactly max_seq_length.
    long_ids = jax_model.tokenizer.encode([TEXTS[9]])[0]
    assert len(long_ids) == jax_model.config.max_seq_length == 96
    assert long_ids[0] == 2 and long_ids[-1] == 1


@pytest.mark.parametrize("prompt_name", [None, "query", "document", "STS", "Classification", "Clustering"])
def test_embeddings_match_sentence_transformers(jax_model, st_model, prompt_name):
    ours = jax_model.encode(TEXTS, prompt_name=prompt_name, batch_size=8)
    ref = st_model.encode(TEXTS, prompt_name=prompt_name, batch_size=8, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(TEXTS), jax_model.config.embedding_dim)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL)


def test_every_prompt_matches(jax_model, st_model):
    names = sorted(jax_model.prompts)
    assert names == sorted(st_model.prompts)
    texts = [TEXTS[4], TEXTS[8]]
    for name in names:
        np.testing.assert_allclose(
            jax_model.encode(texts, prompt_name=name),
            st_model.encode(texts, prompt_name=name, convert_to_numpy=True),
            rtol=0,
            atol=F32_ATOL,
            err_msg=name,
        )


def _reference_hidden_states(st_model, ids, mask):
    backbone = st_model[0].model
    with torch.no_grad():
        out = backbone(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
        )
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def test_per_layer_hidden_states_match_transformers(jax_model, st_model):
    batch = jax_model.tokenizer(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = jax_model.forward(ids, mask, return_hidden_states=True)
    ref_states, ref_last = _reference_hidden_states(st_model, ids, mask)
    assert len(ours.hidden_states) == len(ref_states) == jax_model.config.num_layers + 1
    valid = mask.astype(bool)
    for layer, (a, b) in enumerate(zip(ours.hidden_states, ref_states, strict=True)):
        a, b = np.asarray(a)[valid], b[valid]
        scale = np.abs(b).max()
        # Relative to the layer's activation scale (the residual stream grows layer by layer).
        assert np.abs(a - b).max() <= 1e-5 * scale, f"layer {layer}: {np.abs(a - b).max()} (scale {scale})"
    np.testing.assert_allclose(np.asarray(ours.last_hidden_state)[valid], ref_last[valid], rtol=0, atol=1e-4)


def _variant_error(jax_model, st_model, **changes):
    """Max abs embedding error vs the reference for a model variant (config fields and/or attention_impl)."""
    import dataclasses

    from embgemma_jax.encode import EmbeddingGemma

    impl = changes.pop("attention_impl", "auto")
    ckpt = dataclasses.replace(jax_model.to_checkpoint(), config=dataclasses.replace(jax_model.config, **changes))
    variant = EmbeddingGemma(ckpt, attention_impl=impl)  # fresh jit cache
    return np.abs(variant.encode(TEXTS) - st_model.encode(TEXTS, convert_to_numpy=True)).max()


@pytest.mark.parametrize("impl", ["dense", "banded"])
def test_attention_impls_match_reference(jax_model, st_model, impl):
    assert _variant_error(jax_model, st_model, attention_impl=impl) <= F32_ATOL


def test_parity_check_fails_for_causal_attention(jax_model, st_model, monkeypatch):
    original = model_lib.attention_mask

    def causal(key_valid, radius):
        s = key_valid.shape[1]
        return original(key_valid, radius) & np.tril(np.ones((s, s), bool))[None]

    monkeypatch.setattr(model_lib, "attention_mask", causal)
    assert _variant_error(jax_model, st_model, attention_impl="dense") > 100 * F32_ATOL


# sliding_window in config.json is 16 (radius 8). Wrong variants: no window at all, the window used as
# the radius, and the radius off by one either way (sliding_window 18 -> 9, 14 -> 7).
@pytest.mark.parametrize("sliding_window", [10**6, 32, 18, 14])
@pytest.mark.parametrize("impl", ["dense", "banded"])
def test_parity_check_fails_for_wrong_window(jax_model, st_model, sliding_window, impl):
    err = _variant_error(jax_model, st_model, sliding_window=sliding_window, attention_impl=impl)
    assert err > 100 * F32_ATOL


def test_bfloat16_is_finite_and_close(tiny_ckpt, st_model):
    from embgemma_jax import EmbeddingGemma

    bf16 = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")
    ours = bf16.encode(TEXTS, batch_size=16)
    assert np.isfinite(ours).all()
    ref = st_model.encode(TEXTS, convert_to_numpy=True)
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, cos
