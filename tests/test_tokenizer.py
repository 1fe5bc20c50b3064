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


# Texts that take every path of a batch: plain, added tokens at the start / middle / end, only tokens,
# empty, longer than max_length (96 tokens) with tokens before and after the cut, unicode, "<" without a
# token, and the characters the batch scan joins texts with.
TRICKY = [
    "",
    "<mask> at the start",
    "at the end <mask>",
    "mid<unused0>dle<end_of_turn>",
    "<bos><eos><pad>",
    "<mask>" * 120,
    "word " * 150 + "<eos> after the cut",
    "<start_of_turn>" + "long text " * 60,
    "a < b and [x] > c, but no token <unused",
    "émigré 東京 😀👍🏽 <start_of_turn>user\nhi<end_of_turn>\n",
    "\u2581<mask>\u2581 \u2581",
    "<<eos>><image_soft_token>",
    "nul \x00 us \x1f nonchars \ufffe\uffff <eos> and plain \x00",
]


def _reference_ids(reference, texts, max_length):
    return [reference(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def test_batched_ids_equal_one_text_at_a_time_and_the_reference(jax_model, reference):
    """One batch (plain texts and texts with added tokens mixed, in every order) gives the same ids as
    one text per call, on any thread count, and both are the reference's."""
    tok = jax_model.tokenizer
    batch = TRICKY + CASES + TRICKY[::-1]
    got = tok.encode(batch)
    assert got == [tok.encode([t])[0] for t in batch]
    assert got == _reference_ids(reference, batch, tok.max_length)
    assert tok.encode(batch, num_threads=2) == got
    assert tok.encode_pieces(batch) == [reference(t, add_special_tokens=False)["input_ids"] for t in batch]
    assert tok.encode_pieces(batch) == [tok.encode_pieces([t])[0] for t in batch]


def test_batches_past_one_window_and_texts_holding_every_separator(jax_model, reference):
    """Many texts with added tokens (more segments than one SentencePiece call takes) keep their ids, and
    so does a batch where every text holds all the separator characters (the one-regex split then gives
    way to splitting one text at a time)."""
    from embgemma_jax.testing import SMALL_CORPUS_FILES, stdlib_docstrings

    tok = jax_model.tokenizer
    docs = (stdlib_docstrings(SMALL_CORPUS_FILES) * 4)[:400]
    batch = [f"<mask>{d[:200]}<eos>{d[200:260]}<unused1>" if i % 3 else d[:300] for i, d in enumerate(docs)]
    assert sum(t.startswith("<mask>") for t in batch) * 4 > 2 * 512  # segments: two windows and more
    assert tok.encode(batch) == _reference_ids(reference, batch, tok.max_length)
    every_sep = [f"{t}\x00\x1f\ufffe\uffff" for t in TRICKY]
    assert tok.encode(every_sep) == _reference_ids(reference, every_sep, tok.max_length)


def test_bad_num_threads_and_max_length_are_errors_that_name_them(jax_model):
    tok = jax_model.tokenizer
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads must be a positive int"):
            tok.encode(["x"], num_threads=bad)
    with pytest.raises(ValueError, match="num_threads"):
        Tokenizer.from_dir(tok.model_file.parent, max_length=8, num_threads=0)
    with pytest.raises(ValueError, match="max_length=1 leaves no room for the 2 BOS/EOS tokens"):
        Tokenizer.from_dir(tok.model_file.parent, max_length=1)
    assert Tokenizer.from_dir(tok.model_file.parent, max_length=2).encode(["a b c"]) == [[2, 1]]
