"""The rest of sentence-transformers' encode surface (issue 14): precision, output_value, convert_to_tensor,
truncate_dim at construction, similarity_fn_name; each checked against the installed reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers import quantize_embeddings as ref_quantize
from sentence_transformers.util import SimilarityFunction

from embgemma_jax import EmbeddingGemma
from embgemma_jax.precision import PRECISIONS, quantize_embeddings
from embgemma_jax.similarity import SIMILARITY_FN_NAMES, similarity, similarity_pairwise
from tests.conftest import F32_ATOL

TEXTS = ["Which planet is known as the Red Planet?", "Venus is often called Earth's twin.", "Mars", ""]
# Texts longer than the sliding window (16) and of mixed lengths, so batches hold padding.
LONG = ["word " * 40, "a b c d e f g h i j k l m n o p q r s t", "short"]
QUANTIZED = ("int8", "uint8", "binary", "ubinary")


def unpacked(q: np.ndarray) -> np.ndarray:
    """The bits of binary (int8: the byte minus 128) or ubinary (uint8) packed embeddings."""
    u = q if q.dtype == np.uint8 else (q.astype(np.int16) + 128).astype(np.uint8)
    return np.unpackbits(u, axis=-1)


def token_atol(ref: np.ndarray) -> float:
    """Token states are not normalized (|x| up to ~5 on the tiny model): the float32 tolerance F32_ATOL,
    stated for unit-norm vectors, scales with their magnitude."""
    return F32_ATOL * max(1.0, float(np.abs(ref).max()))


# ----------------------------------------------------------------------------------------------------
# quantize_embeddings: the reference's semantics, exactly, on identical float inputs


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dim", [48, 13])  # 13: the last packed byte is partly filled
def test_quantize_matches_reference(precision, dim):
    x = _random((37, dim), 1)
    x[:, 3] = 0.25  # a constant dimension: empty range, step 1
    cases = [
        ({}, x),
        ({"ranges": np.vstack([x.min(0) - 0.5, x.max(0) * 0.5])}, x),  # values outside the ranges are clipped
        ({"calibration_embeddings": _random((200, dim), 2)}, x),
    ]
    for kwargs, emb in cases:
        if not precision.endswith("int8") and kwargs:
            continue
        ours, ref = quantize_embeddings(emb, precision, **kwargs), ref_quantize(emb, precision, **kwargs)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (kwargs, ours.dtype, ref.dtype)
        np.testing.assert_array_equal(ours, ref)
    if precision.endswith("binary"):
        assert quantize_embeddings(x, precision).shape == (37, (dim + 7) // 8)
        np.testing.assert_array_equal(quantize_embeddings(x[0], precision), ref_quantize(x[0], precision))


def test_quantize_binary_layout():
    """Bits big-endian within a byte; binary is the ubinary byte minus 128."""
    x = np.array([[1, -1, -1, -1, -1, -1, -1, 1, 1, 0.0]], np.float32)
    np.testing.assert_array_equal(quantize_embeddings(x, "ubinary"), [[0b10000001, 0b10000000]])
    np.testing.assert_array_equal(quantize_embeddings(x, "binary"), [[129 - 128, 128 - 128]])


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantize_token_matrices_share_ranges(precision):
    """A list of [T_i, dim] matrices is quantized with one set of ranges, as the reference."""
    mats = [_random((t, 16), t) for t in (5, 1, 12)]
    ours, ref = quantize_embeddings(mats, precision), ref_quantize(mats, precision)
    assert isinstance(ours, list) and len(ours) == 3
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # The 1-row matrix alone would have no range; with the shared ranges it is quantized like the others.
    if precision.endswith("int8"):
        with pytest.raises(ValueError, match="single embedding"):
            quantize_embeddings(mats[1], precision)


def test_quantize_edge_cases():
    # bfloat16 inputs are upcast to float32 first, as the reference upcasts bfloat16 tensors.
    x = _random((20, 16), 3)
    bf = jnp.asarray(x, jnp.bfloat16)
    ref = ref_quantize(torch.tensor(x).bfloat16(), "int8")
    np.testing.assert_array_equal(quantize_embeddings(bf, "int8"), ref)
    # Empty inputs keep their width and dtype.
    assert quantize_embeddings(np.zeros((0, 16), np.float32), "binary").shape == (0, 2)
    assert quantize_embeddings(np.zeros((0, 16), np.float32), "uint8").dtype == np.uint8
    assert quantize_embeddings([], "int8") == []
    for precision in ("int8", "uint8"):
        with pytest.raises(ValueError, match="single embedding"):
            quantize_embeddings(x[:1], precision)
        with pytest.raises(ValueError, match="single embedding"):
            ref_quantize(x[:1], precision)  # the reference refuses it too
    with pytest.raises(ValueError, match="must be float rather than int8"):
        quantize_embeddings(quantize_embeddings(x, "int8"), "binary")
    with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'int8', 'uint8', 'binary'"):
        quantize_embeddings(x, "float16")
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 16\)"):
        quantize_embeddings(x, "int8", ranges=np.zeros((2, 8)))


# ----------------------------------------------------------------------------------------------------
# encode(precision=...)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_encode_precision_is_quantize_of_the_floats(jax_model, precision):
    """encode(precision=p) is the reference's quantize_embeddings of encode's float output (same floats)."""
    texts = TEXTS + LONG
    for kwargs in ({}, {"truncate_dim": 16, "normalize_embeddings": True}):
        floats = jax_model.encode(texts, **kwargs)
        ours = jax_model.encode(texts, precision=precision, **kwargs)
        ref = ref_quantize(floats, precision)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)
    calib = jax_model.encode(LONG * 3)
    if precision in ("int8", "uint8"):
        ours = jax_model.encode(TEXTS, precision=precision, calibration_embeddings=calib)
        np.testing.assert_array_equal(
            ours, ref_quantize(jax_model.encode(TEXTS), precision, calibration_embeddings=calib)
        )
        ranges = np.vstack([calib.min(0), calib.max(0)])
        np.testing.assert_array_equal(jax_model.encode(TEXTS, precision=precision, ranges=ranges), ours)
        # One text: no range to compute from, as the reference (which raises the same error).
        with pytest.raises(ValueError, match="single embedding"):
            jax_model.encode("Mars", precision=precision)
        single = jax_model.encode("Mars", precision=precision, ranges=ranges)
        np.testing.assert_array_equal(single, ours[2])


@pytest.mark.parametrize("precision", QUANTIZED)
def test_encode_precision_matches_sentence_transformers(jax_model, st_model, precision):
    """End to end against SentenceTransformer.encode(precision=...): equal wherever the reference's own
    float value is not within float noise of a quantization boundary (where our float32 noise of ~1e-6
    may legitimately put a value in the neighbouring bucket)."""
    # 30 distinct texts: per-dimension ranges from many values, of which two per dimension are the extremes.
    texts = TEXTS + LONG + [f"note {i}: {' '.join(LONG[1].split()[i:])}" for i in range(23)]
    ours = jax_model.encode(texts, precision=precision)
    ref = st_model.encode(texts, precision=precision)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    ref_f = st_model.encode(texts)
    np.testing.assert_allclose(jax_model.encode(texts), ref_f, atol=F32_ATOL, rtol=0)
    if precision.endswith("binary"):
        near = np.abs(ref_f) < 1e-5  # the sign could go either way
        dim = ref_f.shape[1]
        np.testing.assert_array_equal(unpacked(ours)[:, :dim][~near], unpacked(ref)[:, :dim][~near])
    else:
        lo, hi = ref_f.min(0), ref_f.max(0)
        steps = np.where(hi - lo == 0, 1, (hi - lo) / 255)
        pos = (ref_f - lo) / steps
        near = np.abs(pos - np.round(pos)) < 1e-3  # within 1/1000 of a bucket of a boundary
        assert near.mean() < 0.1, near.mean()  # the extremes of each dimension (2/30), mostly
        np.testing.assert_array_equal(ours[~near], ref[~near])
        assert np.abs(ours.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_empty_input_with_precision(jax_model):
    assert jax_model.encode([], precision="binary").shape == (0, jax_model.config.embedding_dim // 8)
    assert jax_model.encode([], precision="int8").dtype == np.int8


# ----------------------------------------------------------------------------------------------------
# output_value


def test_token_embeddings_match_sentence_transformers(jax_model, st_model):
    texts = TEXTS + LONG
    for kwargs in ({}, {"prompt_name": "query"}):
        ours = jax_model.encode(texts, output_value="token_embeddings", **kwargs)  # one padded batch
        ref = st_model.encode(texts, output_value="token_embeddings", batch_size=3, **kwargs)
        assert isinstance(ours, list) and len(ours) == len(texts)
        for a, b in zip(ours, ref, strict=True):
            b = b.numpy()
            assert a.dtype == np.float32 and a.shape == b.shape  # unpadded: [T_i, D]
            np.testing.assert_allclose(a, b, atol=token_atol(b), rtol=0)
    # One text: one [T, D] array, the same states as in a batch.
    one = jax_model.encode(LONG[0], output_value="token_embeddings", prompt_name="query")
    assert one.shape == ours[len(TEXTS)].shape
    np.testing.assert_allclose(one, ours[len(TEXTS)], atol=token_atol(ours[len(TEXTS)]), rtol=0)


def test_token_embeddings_precision(jax_model, st_model):
    """Quantized token embeddings share one set of ranges over all texts, as the reference."""
    ours_f = jax_model.encode(TEXTS, output_value="token_embeddings")
    for precision in QUANTIZED:
        ours = jax_model.encode(TEXTS, output_value="token_embeddings", precision=precision)
        ref = ref_quantize(ours_f, precision)
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    ref_st = st_model.encode(TEXTS, output_value="token_embeddings", precision="binary")
    assert [r.shape for r in ref_st] == [
        a.shape for a in jax_model.encode(TEXTS, output_value="token_embeddings", precision="binary")
    ]


def test_all_outputs_match_sentence_transformers(jax_model, st_model):
    texts = TEXTS + LONG
    ours = jax_model.encode(texts, output_value=None, truncate_dim=16, normalize_embeddings=True)
    ref = st_model.encode(texts, output_value=None, truncate_dim=16, normalize_embeddings=True, batch_size=3)
    sentence = jax_model.encode(texts, truncate_dim=16)  # truncated, not re-normalized (as the reference)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert list(a) == list(b)  # same keys, same order
        t = int(b["attention_mask"].sum())
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"][:t].numpy())  # ours: the real tokens
        np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"][:t].numpy())
        assert a["input_ids"].dtype == np.int64 and a["modality"] == b["modality"] == "text"
        ref_tok = b["token_embeddings"][:t].numpy()
        np.testing.assert_allclose(a["token_embeddings"], ref_tok, atol=token_atol(ref_tok), rtol=0)
        assert a["sentence_embedding"].shape == (16,)
        np.testing.assert_allclose(a["sentence_embedding"], b["sentence_embedding"].numpy(), atol=F32_ATOL, rtol=0)
        np.testing.assert_allclose(a["sentence_embedding"], sentence[i], atol=F32_ATOL, rtol=0)
    assert np.linalg.norm(ours[0]["sentence_embedding"]) < 1.0
    single = jax_model.encode("Mars", output_value=None)
    assert isinstance(single, dict) and single["sentence_embedding"].shape == (jax_model.config.embedding_dim,)


def test_all_outputs_follow_the_pooling_arguments(jax_model):
    """With pooling arguments the sentence embedding is encode's under the same arguments."""
    kwargs = {"include_prompt": False, "prompt_name": "query"}
    ours = np.stack([d["sentence_embedding"] for d in jax_model.encode(TEXTS, output_value=None, **kwargs)])
    np.testing.assert_allclose(ours, jax_model.encode(TEXTS, **kwargs), atol=F32_ATOL, rtol=0)
    # The prompt-included pool differs, so the check above could fail.
    assert np.abs(ours - jax_model.encode(TEXTS, prompt_name="query")).max() > 1e-3


def test_convert_flags(jax_model, st_model):
    ref = jax_model.encode(TEXTS)
    t = jax_model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, jax.Array) and t.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(t), ref)
    t = jax_model.encode(TEXTS, convert_to_tensor=True, convert_to_numpy=True)  # tensor wins, as the reference
    assert isinstance(t, jax.Array)
    rows = jax_model.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(TEXTS) and all(isinstance(r, jax.Array) for r in rows)
    np.testing.assert_array_equal(np.stack([np.asarray(r) for r in rows]), ref)
    assert isinstance(st_model.encode(TEXTS, convert_to_numpy=False), list)  # the reference's shape of result
    q = jax_model.encode(TEXTS, precision="int8", convert_to_tensor=True)
    assert isinstance(q, jax.Array) and q.dtype == jnp.int8
    v = jax_model.encode("Mars", convert_to_tensor=True)
    assert isinstance(v, jax.Array) and v.shape == (jax_model.config.embedding_dim,)
    # Token outputs ignore the convert flags, as the reference.
    assert isinstance(jax_model.encode(TEXTS, output_value="token_embeddings", convert_to_tensor=True), list)


# ----------------------------------------------------------------------------------------------------
# truncate_dim at construction


def test_truncate_dim_attribute(jax_model, st_model):
    assert jax_model.truncate_dim is None and st_model.truncate_dim is None
    try:
        jax_model.truncate_dim, st_model.truncate_dim = 16, 16
        ours = jax_model.encode(TEXTS, normalize_embeddings=True)
        assert ours.shape == (len(TEXTS), 16)
        np.testing.assert_allclose(ours, st_model.encode(TEXTS, normalize_embeddings=True), atol=F32_ATOL, rtol=0)
        assert jax_model.get_sentence_embedding_dimension() == st_model.get_embedding_dimension() == 16
        assert jax_model.encode(TEXTS, truncate_dim=32).shape == (len(TEXTS), 32)  # the call's wins
        assert jax_model.encode(TEXTS, output_value=None)[0]["sentence_embedding"].shape == (16,)
        assert jax_model.encode(TEXTS, output_value="token_embeddings")[0].shape[1] == jax_model.config.hidden_size
    finally:
        jax_model.truncate_dim, st_model.truncate_dim = None, None
    assert jax_model.get_embedding_dimension() == jax_model.config.embedding_dim
    for bad in (0, 49, 2.5, "16"):
        with pytest.raises(ValueError, match=r"truncate_dim must be an int in \[1, 48\]"):
            jax_model.truncate_dim = bad
    assert jax_model.truncate_dim is None


def test_from_pretrained_truncate_dim_and_similarity(tiny_ckpt):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, truncate_dim=16, similarity_fn_name="dot")
    ref = SentenceTransformer(str(tiny_ckpt), device="cpu", truncate_dim=16, similarity_fn_name="dot")
    assert model.truncate_dim == 16 and model.similarity_fn_name == "dot"
    ours = model.encode(TEXTS)
    np.testing.assert_allclose(ours, ref.encode(TEXTS), atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(model.similarity(ours, ours), ref.similarity(ours, ours).numpy(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"truncate_dim must be an int in \[1, 48\]"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, truncate_dim=64)
    with pytest.raises(ValueError, match="truncate_dim must be a positive int"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, truncate_dim=0)
    with pytest.raises(ValueError, match=r"similarity_fn_name must be one of \['cosine', 'dot', 'euclidean'"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, similarity_fn_name="maxsim")


# ----------------------------------------------------------------------------------------------------
# similarity


@pytest.mark.parametrize("name", SIMILARITY_FN_NAMES)
def test_similarity_functions_match_sentence_transformers(jax_model, st_model, name):
    a, b = jax_model.encode_query(TEXTS[:3]), jax_model.encode_document(TEXTS + LONG)
    assert jax_model.similarity_fn_name == st_model.similarity_fn_name == "cosine"  # the checkpoint's
    try:
        jax_model.similarity_fn_name, st_model.similarity_fn_name = name, name
        ours, ref = jax_model.similarity(a, b), st_model.similarity(a, b).numpy()
        assert ours.shape == (3, len(b)) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-6)
        pair, ref_pair = jax_model.similarity_pairwise(a, b[:3]), st_model.similarity_pairwise(a, b[:3]).numpy()
        assert pair.shape == (3,)
        np.testing.assert_allclose(pair, ref_pair, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(pair, np.diag(ours), atol=1e-6, rtol=1e-6)
        if name in ("euclidean", "manhattan"):
            assert (ours <= 0).all()  # negative distances, as the reference
        # A vector is one row; lists and JAX arrays are accepted as the reference accepts lists and tensors.
        np.testing.assert_allclose(jax_model.similarity(a[0], jnp.asarray(b)), ours[:1], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(jax_model.similarity(list(a), list(b)), ours, atol=1e-6, rtol=1e-6)
    finally:
        jax_model.similarity_fn_name, st_model.similarity_fn_name = "cosine", "cosine"


@pytest.mark.parametrize("name", SIMILARITY_FN_NAMES)
def test_similarity_large_inputs_against_float64(name):
    """Beyond 25 rows (where torch.cdist switches to the |a|^2 + |b|^2 - 2ab expansion) the distances are
    still computed from the differences: identical rows are at distance 0, and all scores match float64."""
    a = _random((40, 64), 5)
    b = np.concatenate([a[:10], _random((30, 64), 6)])
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if name == "cosine":
        truth = (a64 / np.linalg.norm(a64, axis=1, keepdims=True)) @ (
            b64 / np.linalg.norm(b64, axis=1, keepdims=True)
        ).T
    elif name == "dot":
        truth = a64 @ b64.T
    else:
        p = 2 if name == "euclidean" else 1
        truth = -np.linalg.norm(a64[:, None] - b64[None], ord=p, axis=-1)
    ours = similarity(a, b, name)
    np.testing.assert_allclose(ours, truth, atol=1e-4, rtol=1e-5)
    if name in ("euclidean", "manhattan"):
        np.testing.assert_array_equal(np.diag(ours[:10, :10]), 0.0)
    ref = SimilarityFunction.to_similarity_fn(name)(a, b).numpy()
    np.testing.assert_allclose(ours[:, 10:], ref[:, 10:], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(similarity_pairwise(a, b, name), np.diag(truth), atol=1e-4, rtol=1e-5)


def test_similarity_names_are_checked(jax_model):
    with pytest.raises(
        ValueError,
        match=r"similarity_fn_name must be one of \['cosine', 'dot', 'euclidean', 'manhattan'\], got 'maxsim'",
    ):
        jax_model.similarity_fn_name = "maxsim"
    assert jax_model.similarity_fn_name == "cosine"
    try:
        jax_model.similarity_fn_name = SimilarityFunction.DOT_PRODUCT  # the reference's enum, by value
        assert jax_model.similarity_fn_name == "dot"
    finally:
        jax_model.similarity_fn_name = "cosine"
    with pytest.raises(ValueError, match="embedding widths differ: 3 vs 4"):
        similarity(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"as many rows on both sides, got \(2, 3\) and \(3, 3\)"):
        similarity_pairwise(np.ones((2, 3)), np.ones((3, 3)))


# ----------------------------------------------------------------------------------------------------
# Bad values


def test_bad_encode_values_are_clear_errors(jax_model):
    with pytest.raises(
        ValueError, match=r"precision must be one of \['float32', 'int8', 'uint8', 'binary', 'ubinary'\], got 'float16'"
    ):
        jax_model.encode(TEXTS, precision="float16")
    with pytest.raises(
        ValueError,
        match=r"output_value must be one of \['sentence_embedding', 'token_embeddings', None\], got 'tokens'",
    ):
        jax_model.encode(TEXTS, output_value="tokens")
    with pytest.raises(ValueError, match="output_value=None returns every output in float32"):
        jax_model.encode(TEXTS, output_value=None, precision="int8")
    with pytest.raises(ValueError, match="ranges and calibration_embeddings apply to precision int8 or uint8"):
        jax_model.encode(TEXTS, precision="binary", ranges=np.zeros((2, 48)))
    with pytest.raises(ValueError, match="batch_size"):
        jax_model.encode(TEXTS, output_value="token_embeddings", batch_size=0)
