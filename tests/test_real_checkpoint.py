"""Parity on the real google/embeddinggemma-300m, when a local copy is available.

Set EMBGEMMA_CHECKPOINT to a local directory holding the sentence-transformers checkpoint (for example
the snapshot folder huggingface_hub downloaded). Skipped otherwise: nothing is downloaded in tests.
"""

import os
from pathlib import Path

import numpy as np
import pytest

CKPT = os.environ.get("EMBGEMMA_CHECKPOINT")
pytestmark = pytest.mark.skipif(
    not CKPT, reason="EMBGEMMA_CHECKPOINT is not set (point it at a local copy of google/embeddinggemma-300m)"
)

QUERY = "Which planet is known as the Red Planet?"
DOCUMENTS = [
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
]


@pytest.fixture(scope="module")
def models():
    from sentence_transformers import SentenceTransformer

    from embgemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(Path(CKPT)), SentenceTransformer(CKPT, device="cpu")


def test_real_model_matches_sentence_transformers(models):
    ours, ref = models
    assert ours.config.num_params() == 307_581_696
    long_doc = " ".join(DOCUMENTS * 80)  # > 2048 tokens: truncation and many sliding windows
    texts = [QUERY, *DOCUMENTS, long_doc, ""]
    for kind in ("query", "document"):
        a = getattr(ours, f"encode_{kind}")(texts)
        b = getattr(ref, f"encode_{kind}")(texts, convert_to_numpy=True)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    sims = ours.similarity(ours.encode_query(QUERY), ours.encode_document(DOCUMENTS))[0]
    np.testing.assert_allclose(sims, [0.301, 0.636, 0.493, 0.489], atol=0.01)  # the model card's numbers
    ids = ours.tokenizer.encode(texts)
    feats = ref.preprocess(texts)
    for row, got in enumerate(ids):
        m = feats["attention_mask"][row].numpy().astype(bool)
        assert got == feats["input_ids"][row].numpy()[m].tolist()
