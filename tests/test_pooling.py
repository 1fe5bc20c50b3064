"""Pooling modes against sentence-transformers' own Pooling module, configured the same way."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from embgemma_jax import EmbeddingGemma
from embgemma_jax.pooling import (
    POOLING_MODES,
    PoolingSpec,
    get_pooling,
    pool,
)
from embgemma_jax.prompts import exclude_prompt, prompt_length
from tests.conftest import F32_ATOL

MODES = list(POOLING_MODES)
PROMPT = "task: search result | query: "
TEXTS = [
    "Which planet is known as the Red Planet?",
    "a",
    # longer than the tiny model's window (radius 8) and truncated at max_seq_length 96
    "The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun. " * 6,
    "Numbers 0123456789 and émigré café",
    "",
]


def _st_pool(mode, include_prompt, states, mask, prompt_len):
    module = Pooling(states.shape[-1], pooling_mode=mode, include_prompt=include_prompt)
    feats = {"token_embeddings": torch.from_numpy(states), "attention_mask": torch.from_numpy(mask)}
    if prompt_len is not None:
        feats["prompt_length"] = prompt_len
    return module(feats)["sentence_embedding"].numpy()


def _st_weights_from_first_real_token() -> bool:
    """sentence-transformers 6.2 weighs ``weightedmean`` positions from each row's first real token; 6.0.x
    (seen on the GPU image) from position 0 of the padded row. They differ only with left padding (our
    batches pad right). This library follows the newer reference; the tests check the installed one."""
    import inspect

    return "pad_lengths" in inspect.getsource(Pooling)


def _ours(mode, include_prompt, states, mask, prompt_len):
    pm = mask if include_prompt or prompt_len is None else exclude_prompt(mask, prompt_len)
    # weightedmean finds the first real token in its attention_mask argument; an all-ones one reproduces the
    # older reference's weights (from position 0 of the padded row)
    original = mask if _st_weights_from_first_real_token() else np.ones_like(mask)
    return np.asarray(pool(jnp.asarray(states), jnp.asarray(pm), mode, jnp.asarray(original)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_padding", [False, True])
def test_pool_functions_match_st_module(mode, left_padding):
    """Random states, ragged masks, prompt lengths 0, 3 and one that swallows a whole row (empty pool)."""
    rng = np.random.default_rng(0)
    b, t, d = 4, 11, 6
    states = rng.normal(size=(b, t, d)).astype(np.float32) * 3
    lengths = np.array([11, 7, 4, 1])
    pos = np.arange(t)[None, :]
    if left_padding:
        mask = (pos >= (t - lengths)[:, None]).astype(np.int64)
    else:
        mask = (pos < lengths[:, None]).astype(np.int64)
    for prompt_len in (None, 3, 5):
        for include_prompt in (True, False):
            ref = _st_pool(mode, include_prompt, states, mask, prompt_len)
            ours = _ours(mode, include_prompt, states, mask, prompt_len)
            # equal_nan/inf: an empty pool gives -inf for max in both
            np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL, err_msg=f"{prompt_len=} {include_prompt=}")


def test_tuple_of_modes_concatenates_like_st():
    rng = np.random.default_rng(1)
    states = rng.normal(size=(3, 9, 5)).astype(np.float32)
    mask = (np.arange(9)[None, :] < np.array([[9], [4], [2]])).astype(np.int64)
    modes = ("cls", "max", "weightedmean")
    ref = _st_pool(modes, False, states, mask, 2)
    ours = _ours(modes, False, states, mask, 2)
    assert ours.shape == (3, 15)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL)


def test_prompt_length_matches_st(st_model, jax_model):
    for p in list(st_model.prompts.values()) + ["<mask> odd prompt <eos>", "x"]:
        assert prompt_length(jax_model.tokenizer, p) == st_model[0]._get_prompt_length(p), p
    assert prompt_length(jax_model.tokenizer, "") == 0  # as the reference: an empty prompt excludes nothing


def _st_pipeline(st_model, mode, include_prompt):
    hidden = st_model[0].get_embedding_dimension()
    return SentenceTransformer(
        modules=[st_model[0], Pooling(hidden, pooling_mode=mode, include_prompt=include_prompt), *list(st_model)[2:]],
        device="cpu",
    )


@pytest.mark.parametrize("mode", MODES)
def test_encode_with_pooling_matches_st_pipeline(st_model, jax_model, mode):
    """End to end: the tiny backbone + dense head with a differently configured Pooling module."""
    results = {}
    for include_prompt in (True, False):
        ref = _st_pipeline(st_model, mode, include_prompt).encode(TEXTS, prompt=PROMPT)
        ours = jax_model.encode(TEXTS, prompt=PROMPT, pooling=mode, include_prompt=include_prompt, batch_size=8)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL, err_msg=f"{include_prompt=}")
        results[include_prompt] = ours
    # the prompt really is excluded (the test above would pass vacuously if it were not); the last
    # token (EOS) is the same either way
    gap = np.abs(results[True] - results[False]).max()
    assert gap == 0 if mode == "lasttoken" else gap > 1e-2


def test_pooling_spec_form_and_default_equal_reference(st_model, jax_model):
    ref = st_model.encode(TEXTS)
    np.testing.assert_allclose(jax_model.encode(TEXTS, pooling=PoolingSpec()), ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(jax_model.encode(TEXTS, layers=-1), ref, rtol=0, atol=F32_ATOL)


def test_tuple_modes_without_head_match_st(st_model, jax_model):
    modes = ("mean", "lasttoken")
    pooling = Pooling(48, pooling_mode=modes, include_prompt=False)
    pipe = SentenceTransformer(modules=[st_model[0], pooling], device="cpu")
    ref = pipe.encode(TEXTS, prompt=PROMPT)
    ours = jax_model.encode(TEXTS, prompt=PROMPT, pooling=PoolingSpec(modes, include_prompt=False, head=False))
    assert ours.shape == (len(TEXTS), 96)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL)


def test_checkpoint_with_other_pooling_config(tmp_path, tiny_ckpt, st_model):
    """A sentence-transformers directory saved with lasttoken / include_prompt=False loads and encodes
    as sentence-transformers does, with no pooling argument."""
    pipe = _st_pipeline(st_model, "lasttoken", False)
    pipe.prompts = dict(st_model.prompts)
    out = tmp_path / "lasttoken"
    pipe.save(str(out))
    shutil.copyfile(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    model = EmbeddingGemma.from_pretrained(out)
    assert (model.config.pooling_mode, model.config.include_prompt) == ("lasttoken", False)
    reloaded = SentenceTransformer(str(out), device="cpu")
    texts = TEXTS[:3]
    np.testing.assert_allclose(model.encode_query(texts), reloaded.encode_query(texts), rtol=0, atol=F32_ATOL)


def test_errors_name_the_problem(jax_model):
    with pytest.raises(ValueError, match=r"unknown pooling mode 'median'.*'mean', 'cls', 'lasttoken', 'max'"):
        get_pooling("median")
    with pytest.raises(ValueError, match="unknown pooling mode 'avg'"):
        jax_model.encode(["x"], pooling="avg")
    with pytest.raises(ValueError, match=r"layer index 7 is out of range.*0\.\.6"):
        jax_model.encode(["x"], layers=7)
    with pytest.raises(ValueError, match="layer index -8 is out of range"):
        jax_model.encode(["x"], layers=[-1, -8])
    with pytest.raises(ValueError, match="layer_weights has 1 entries but 2 layer"):
        PoolingSpec(layers=(1, 2), layer_weights=(1.0,))
    with pytest.raises(ValueError, match="finite"):
        PoolingSpec(layers=(1,), layer_weights=(float("nan"),))
    with pytest.raises(TypeError, match="layers must be None, an int or a sequence of ints"):
        PoolingSpec(layers="last")
    with pytest.raises(TypeError, match="pooling mode must be a name"):
        PoolingSpec(mode=3)
    with pytest.raises(ValueError, match="width 96 but the dense head expects 48.*head=False"):
        jax_model.encode(["x"], pooling=("mean", "max"))
    with pytest.raises(ValueError, match="prompt lengths must be >= 0"):
        exclude_prompt(np.ones((1, 3)), -1)


def test_one_mean_pool_in_bfloat16(tiny_ckpt):
    """encode() (the fused reference program) and encode(pooling=...) through the variant loop use the same
    mean pool (float32 sums, as the reference): identical bfloat16 vectors, not merely close ones."""
    from embgemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")
    texts = ["hello world", "a much longer text that spans several buckets " * 6, "x"]
    ref = model.encode(texts)
    np.testing.assert_array_equal(model.encode(texts, pooling="mean"), ref)
    np.testing.assert_array_equal(model.encode(texts, pooling=("mean",)), ref)  # the pool + head program
    np.testing.assert_array_equal(model.embed_variants(texts, {"m": PoolingSpec("mean", layers=-1)})["m"], ref)


def test_checkpoint_that_excludes_the_prompt_matches_reference(tmp_path):
    """A checkpoint whose Pooling module sets include_prompt=false: the default encode (fused program, and
    throughput mode) drops the prompt from the pool, as sentence-transformers does."""
    import json

    from sentence_transformers import SentenceTransformer

    from embgemma_jax import EmbeddingGemma
    from embgemma_jax.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "noprompt", seed=5)
    cfg_file = ckpt / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["include_prompt"] = False
    cfg_file.write_text(json.dumps(cfg))
    texts = ["Which planet is known as the Red Planet?", "a", "longer text " * 12]
    ref = SentenceTransformer(str(ckpt), device="cpu").encode(texts, prompt_name="query")
    model = EmbeddingGemma.from_pretrained(ckpt)
    assert not model.config.include_prompt
    np.testing.assert_allclose(model.encode(texts, prompt_name="query"), ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(model.encode(texts, prompt_name="query", token_budget=512), ref, rtol=0, atol=F32_ATOL)
    with_prompt = model.encode(texts, prompt_name="query", include_prompt=True)
    assert np.abs(with_prompt - ref).max() > 100 * F32_ATOL  # the check can fail
