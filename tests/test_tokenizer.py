"""Token ids against the reference Hugging Face tokenizer built from the same SentencePiece model."""

import pytest
from transformers import AutoTokenizer

from embgemma_jax import Tokenizer
from embgemma_jax.errors import CheckpointError
from embgemma_jax.tokenizer import read_added_tokens

CASES = [
    "",
    " ",
    "   leading and trailing   ",
    "Which planet is known as the Red Planet?",
    "<eos>",
    "x<eos>y",
    "<bos><bos><pad>",
    "<mask> masked <unused0><unused1> <start_of_turn>user\nhi<end_of_turn>",
    "<unused",  # a prefix of an added token is plain text
    "<image_soft_token>",
    "digits 3.14159 2026-11-22",
    "tabs\tand\nnewlines\r\n",
    "émigré naïve 東京 😀👍🏽 \u200b zero width",
    "a" * 300,
]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


def test_ids_match_reference_tokenizer(jax_model, reference):
    ours = jax_model.tokenizer.encode(CASES)
    for text, got in zip(CASES, ours, strict=True):
        want = reference(text, truncation=True, max_length=jax_model.config.max_seq_length)["input_ids"]
        assert got == want, text


def test_added_tokens_come_from_checkpoint(tiny_ckpt):
    added = {t.content: t.id for t in read_added_tokens(tiny_ckpt)}
    assert added["<eos>"] == 1 and added["<mask>"] == 4 and added["<image_soft_token>"] == 512


def test_padding_and_truncation(jax_model):
    batch = jax_model.tokenize(["a b c", "x"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["input_ids"][1].tolist()[-2:] == [0, 0]  # right padding with the pad id
    assert batch["attention_mask"].sum(axis=1).tolist() == [5, 3]
    tok = Tokenizer.from_dir(jax_model.tokenizer.model_file.parent, max_length=5)
    ids = tok.encode(["one two three four five six"])[0]
    assert len(ids) == 5 and ids[0] == 2 and ids[-1] == 1


def test_missing_or_corrupt_model_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing tokenizer file"):
        Tokenizer(tmp_path / "tokenizer.model", max_length=8)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a valid SentencePiece model"):
        Tokenizer(tmp_path / "tokenizer.model", max_length=8)
