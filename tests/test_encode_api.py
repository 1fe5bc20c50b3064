"""The sentence-transformers-compatible encode API, checked against SentenceTransformer itself."""

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma
from embgemma_jax.batching import bucket_lengths
from tests.conftest import F32_ATOL

TEXTS = ["Which planet is known as the Red Planet?", "Venus is often called Earth's twin.", "Mars", ""]


def test_single_string_returns_vector(jax_model, st_model):
    v = jax_model.encode("Which planet is known as the Red Planet?")
    assert v.shape == (jax_model.config.embedding_dim,) and v.dtype == np.float32
    np.testing.assert_allclose(v, st_model.encode("Which planet is known as the Red Planet?"), atol=F32_ATOL, rtol=0)


def test_empty_list(jax_model):
    assert jax_model.encode([]).shape == (0, jax_model.config.embedding_dim)


@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim_matches_sentence_transformers(jax_model, st_model, normalize):
    ours = jax_model.encode(TEXTS, truncate_dim=16, normalize_embeddings=normalize)
    ref = st_model.encode(TEXTS, truncate_dim=16, normalize_embeddings=normalize, convert_to_numpy=True)
    assert ours.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(ours, ref, atol=F32_ATOL, rtol=0)
    norms = np.linalg.norm(ours, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    else:
        assert norms.max() < 1.0  # a slice of a unit vector, not re-normalized


def test_query_and_document_match_sentence_transformers(jax_model, st_model):
    np.testing.assert_allclose(jax_model.encode_query(TEXTS), st_model.encode_query(TEXTS), atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(jax_model.encode_document(TEXTS), st_model.encode_document(TEXTS), atol=F32_ATOL, rtol=0)
    # encode_query is encode with the "query" prompt, and differs from no prompt.
    np.testing.assert_array_equal(jax_model.encode_query(TEXTS), jax_model.encode(TEXTS, prompt_name="query"))
    assert np.abs(jax_model.encode_query(TEXTS) - jax_model.encode(TEXTS)).max() > 1e-3


def test_document_titles(jax_model, st_model):
    titles = ["Mars", None, "Planets", "empty"]
    ours = jax_model.encode_document(TEXTS, titles=titles)
    ref = np.stack(
        [
            st_model.encode(t, prompt=f"title: {'none' if ti is None else ti} | text: ", convert_to_numpy=True)
            for t, ti in zip(TEXTS, titles, strict=True)
        ]
    )
    np.testing.assert_allclose(ours, ref, atol=F32_ATOL, rtol=0)
    # A None title is the default document prompt.
    np.testing.assert_allclose(ours[1], jax_model.encode_document(TEXTS[1]), atol=F32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="2 titles for 4 texts"):
        jax_model.encode_document(TEXTS, titles=["a", "b"])


def test_explicit_prompt_wins(jax_model, st_model):
    ours = jax_model.encode(TEXTS, prompt="custom: ", prompt_name="query")
    np.testing.assert_allclose(ours, st_model.encode(TEXTS, prompt="custom: ", convert_to_numpy=True), atol=F32_ATOL)


def test_similarity_matches_sentence_transformers(jax_model, st_model):
    a, b = jax_model.encode_query(TEXTS[:2]), jax_model.encode_document(TEXTS)
    ref = st_model.similarity(a, b).numpy()
    np.testing.assert_allclose(jax_model.similarity(a, b), ref, atol=1e-6)
    assert jax_model.similarity(a, b).shape == (2, 4)


def test_bad_arguments_are_clear_errors(jax_model, tiny_ckpt):
    with pytest.raises(ValueError, match=r"unknown prompt_name 'qurey'.*'query'"):
        jax_model.encode(TEXTS, prompt_name="qurey")
    for bad in (0, 49, -1, 2.5, "16"):
        with pytest.raises(ValueError, match=r"truncate_dim must be an int in \[1, 48\]"):
            jax_model.encode(TEXTS, truncate_dim=bad)
    with pytest.raises(ValueError, match="float16 is not supported.*overflow"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="float16")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        jax_model.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        jax_model.encode(TEXTS, batch_size=0)


def test_out_of_range_token_is_an_error(jax_model):
    """<image_soft_token> (an added token past the embedding table, as in the real model) is refused."""
    ids = jax_model.tokenizer.encode(["look <image_soft_token> here"])[0]
    assert max(ids) == jax_model.config.vocab_size  # the reference tokenizer gives this id too
    with pytest.raises(ValueError, match=r"token id 512 \('<image_soft_token>'\).*outside the embedding table"):
        jax_model.encode(["look <image_soft_token> here"])
    with pytest.raises(ValueError, match="token id -1"):
        jax_model.forward(np.array([[2, -1, 1]]), np.ones((1, 3), np.int32))


def test_inside_jit_a_bad_id_poisons_instead_of_clamping(jax_model):
    """If an out-of-range id reaches the compiled function anyway, the output is NaN, not a plausible vector."""
    import jax.numpy as jnp

    ids = jnp.array([[2, 600, 1]], jnp.int32)
    out = jax_model.engine.forward(jax_model.params, ids, jnp.ones_like(ids), jnp.ones_like(ids))
    assert np.isnan(np.asarray(out.embeddings)).all()


def test_bucketing_bounds_compiles(tiny_ckpt):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    assert bucket_lengths(96) == (16, 24, 32, 40, 48, 56, 64, 80, 96)
    for n in range(1, 60, 3):
        model.encode(["word " * n], batch_size=4)
    lengths = {t for _, t in model.compiled_shapes}
    assert lengths <= set(bucket_lengths(96)) and len(lengths) <= 9, model.compiled_shapes
    assert jax_cache_size(model) <= len(model.compiled_shapes)


def jax_cache_size(model) -> int:
    """Entries in the jit caches of the programs of which one compiles per batch shape (see uses_layers)."""
    engine = model.engine
    return engine.layers.tail._cache_size() + engine.scanned_forward._cache_size()
