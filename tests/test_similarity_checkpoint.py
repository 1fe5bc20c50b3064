"""The checkpoint's similarity_fn_name (config_sentence_transformers.json) is the model's default, as in
sentence-transformers, and survives conversion."""

import json

import numpy as np
import pytest

from embgemma_jax import CheckpointError, EmbeddingGemma


def _with_similarity(tmp_path, value):
    from embgemma_jax.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "sim", seed=9)
    path = ckpt / "config_sentence_transformers.json"
    conf = json.loads(path.read_text())
    conf["similarity_fn_name"] = value
    path.write_text(json.dumps(conf))
    return ckpt


def test_checkpoint_similarity_is_the_default(tmp_path):
    from sentence_transformers import SentenceTransformer

    ckpt = _with_similarity(tmp_path, "manhattan")
    model = EmbeddingGemma.from_pretrained(ckpt)
    ref = SentenceTransformer(str(ckpt), device="cpu")
    assert model.similarity_fn_name == ref.similarity_fn_name == "manhattan"
    texts = ["Which planet is red?", "Mars is red.", "Jupiter is a gas giant."]
    ours = model.encode(texts)
    np.testing.assert_allclose(model.similarity(ours, ours), ref.similarity(ours, ours).numpy(), rtol=0, atol=1e-5)
    converted = EmbeddingGemma.from_pretrained(model.save_converted(tmp_path / "converted"))
    assert converted.similarity_fn_name == "manhattan"
    assert EmbeddingGemma.from_pretrained(ckpt, similarity_fn_name="dot").similarity_fn_name == "dot"


def test_unknown_similarity_in_checkpoint_is_refused(tmp_path):
    ckpt = _with_similarity(tmp_path, "hamming")
    with pytest.raises(CheckpointError, match=r"config_sentence_transformers.json: similarity_fn_name 'hamming'"):
        EmbeddingGemma.from_pretrained(ckpt)
