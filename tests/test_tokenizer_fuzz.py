"""Fuzzed tokenizer parity: our ids equal the reference Hugging Face tokenizer's, exactly, on hostile text.

The reference is ``transformers.AutoTokenizer`` loaded from the same checkpoint directory (the tokenizer
that sentence-transformers uses), built from the same SentencePiece model. Inputs mix every Unicode plane,
combining marks, control and format characters, whitespace runs, emoji sequences, literal added/special
tokens and fragments of them, and very long texts. Derandomized in CI; ``EMBGEMMA_FUZZ_EXAMPLES=N`` for more.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from embgemma_jax import Tokenizer
from embgemma_jax.testing import REAL_PROMPTS
from tests.fuzzing import fuzz_settings

# Added tokens of the tiny checkpoint (all of them, plus <image_soft_token> past the vocabulary), and
# near-misses that must stay plain text.
SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<unused0>", "<unused1>",
    "<start_of_turn>", "<end_of_turn>", "<image_soft_token>",
    "<eos", "eos>", "<", ">", "<unused", "<unused2>", "<<eos>>", "<EOS>", "< eos>", "<bos><eos>",
]  # fmt: skip
# Every White_Space character, plus look-alikes that are not whitespace (ZWSP, BOM, U+2581, FS..US).
WHITESPACE_CHARS = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\u200b\ufeff\u2581\u180e\x1c\x1d\x1e\x1f"
)
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🏳️‍🌈", "1️⃣", "❤️", "🧑🏿‍🚀", "🫠", "\U0001f9d1\u200d\U0001f4bb", "#\ufe0f\u20e3",
    "\U000e0067\U000e0062",  # tag characters (as in subdivision flags)
]  # fmt: skip
WORDS = sorted({w for p in REAL_PROMPTS.values() for w in p.split()} | {"the", "planet", "Mars", "Red", "of", "é"})

any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",))  # all planes
fragment = st.one_of(
    st.text(any_char, max_size=6),
    st.text(st.sampled_from(WHITESPACE_CHARS), min_size=1, max_size=12),
    st.sampled_from(SPECIALS),
    st.builds(
        str.__add__,
        st.text(st.characters(categories=("L",)), min_size=0, max_size=1),
        st.text(st.characters(categories=("Mn", "Me", "Mc")), min_size=1, max_size=5),
    ),
    st.sampled_from(EMOJI),
    st.text(st.characters(categories=("Cc", "Cf", "Co", "Cn", "Zl", "Zp")), min_size=1, max_size=4),
    st.sampled_from(WORDS).map(lambda w: " " + w),
    st.sampled_from(WORDS),
    st.text(st.characters(min_codepoint=0x30, max_codepoint=0x39), min_size=1, max_size=8),  # digits split
)
hostile_text = st.lists(fragment, max_size=24).map("".join)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


@pytest.fixture(scope="module")
def ours(tiny_ckpt, jax_model):
    return jax_model.tokenizer


def _ref_ids(reference, text: str, max_length: int | None) -> list[int]:
    if max_length is None:
        return reference(text, add_special_tokens=False)["input_ids"]
    return reference(text, truncation=True, max_length=max_length)["input_ids"]


@fuzz_settings(400)
@given(texts=st.lists(hostile_text, min_size=1, max_size=6))
def test_fuzzed_text_matches_reference(ours, reference, texts):
    """BOS + pieces + EOS with truncation at max_seq_length, and the full untruncated piece sequence."""
    got = ours.encode(texts)
    pieces = ours.encode_pieces(texts)
    for text, ids, full in zip(texts, got, pieces, strict=True):
        assert ids == _ref_ids(reference, text, ours.max_length), repr(text)
        assert full == _ref_ids(reference, text, None), repr(text)


@fuzz_settings(6)
@given(seed=st.integers(0, 2**32 - 1), n_fragments=st.sampled_from([2_000, 20_000]))
def test_very_long_texts_match_reference(ours, reference, seed, n_fragments):
    """Texts of ~10k-200k characters: identical full piece sequences (no truncation) and truncated ids."""
    rng = random.Random(seed)
    pool = SPECIALS + EMOJI + [" " + w for w in WORDS] + list(WHITESPACE_CHARS) + ["e\u0301", "\x00", "東京"]
    parts = [rng.choice(pool) if rng.random() < 0.8 else chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(n_fragments)]
    text = "".join(p for p in parts if not 0xD800 <= ord(p[0]) <= 0xDFFF)
    assert ours.encode_pieces([text])[0] == _ref_ids(reference, text, None)
    assert ours.encode([text])[0] == _ref_ids(reference, text, ours.max_length)


@fuzz_settings(60)
@given(texts=st.lists(hostile_text, min_size=1, max_size=5))
def test_padded_batches_match_sentence_transformers(jax_model, st_model, texts):
    """The whole padded batch (ids and attention mask) equals what SentenceTransformer feeds its model."""
    ref = st_model.preprocess(texts)
    got = jax_model.tokenize(texts)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"].numpy())
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"].numpy())


@fuzz_settings(30)
@given(prefix=st.lists(fragment, max_size=4).map("".join), suffix=hostile_text)
def test_token_past_the_embedding_table_is_an_error(jax_model, reference, prefix, suffix):
    """<image_soft_token> gets the reference's id (== vocab_size), and encode refuses it by name."""
    text = prefix + "<image_soft_token>" + suffix
    ids = jax_model.tokenizer.encode([text])[0]
    assert ids == _ref_ids(reference, text, jax_model.config.max_seq_length)
    if jax_model.config.vocab_size not in ids:  # truncated away: nothing to refuse
        return
    with pytest.raises(ValueError, match=r"token id 512 \('<image_soft_token>'\).*outside the embedding table"):
        jax_model.encode(["harmless", text])


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff tail", "<eos>\ud83d"])
def test_lone_surrogates_are_a_clear_error(jax_model, reference, text):
    """A str holding a lone surrogate has no UTF-8 form; the reference refuses it too (TypeError)."""
    with pytest.raises(TypeError):
        reference(text)
    with pytest.raises(ValueError, match="lone surrogate"):
        jax_model.encode(["fine", text])


# ---------------------------------------------------------------------------------------------------
# Added tokens with lstrip / rstrip / single_word / normalized flags (the tiny checkpoint has none set;
# real tokenizers do). The reference is the tiny tokenizer with such tokens added by transformers itself.

FLAGGED = {  # content -> flags
    "<ls>": dict(lstrip=True),
    "<rs>": dict(rstrip=True),
    "<sw>": dict(single_word=True),
    "<all>": dict(lstrip=True, rstrip=True, single_word=True),
    "ab cd": dict(normalized=True),
    "<nl>": dict(lstrip=True, rstrip=True, normalized=True),
    " <w>": dict(),
    "\n\n": dict(),
    "x": dict(single_word=True),
    "<ls><rs>": dict(),
}
BOUNDARY = [
    " ", "  ", "\t", "\n", "\u3000", "\u2000", "\x85", "\x1c", "\x1f", "\u200b", "\u180e", "\u2581", "_", "a", "Z",
    "²", "٣", "Ⅻ", "Ⓐ", "\u0301", "\u200d", "‿", "-", ".", "ab", "cd", "ab\u2581cd", "xx", "<", "é", "🅰",
]  # fmt: skip


@pytest.fixture(scope="module")
def flagged_dir(tiny_ckpt, tmp_path_factory):
    from tokenizers import AddedToken as HFAddedToken

    out = tmp_path_factory.mktemp("flagged_tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    tok.add_tokens([HFAddedToken(c, **{"normalized": False, **flags}) for c, flags in FLAGGED.items()])
    tok.add_tokens([HFAddedToken("<sp>", lstrip=True, rstrip=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(str(out))
    shutil.copyfile(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def flagged(flagged_dir):
    """(ours, reference) for the flagged tokenizer."""
    return Tokenizer.from_dir(flagged_dir, max_length=10_000), AutoTokenizer.from_pretrained(str(flagged_dir))


@fuzz_settings(400)
@given(pieces=st.lists(st.sampled_from([*FLAGGED, "<sp>", "<eos>", *BOUNDARY]), max_size=14))
def test_added_token_flags_match_reference(flagged, pieces):
    ours, reference = flagged
    text = "".join(pieces)
    assert ours.encode([text])[0] == reference(text)["input_ids"], repr(text)


def test_flags_survived_the_round_trip(flagged_dir):
    """Guards the fixture: the saved reference really has the flags we fuzz."""
    from embgemma_jax.tokenizer import read_added_tokens

    got = {t.content: t for t in read_added_tokens(flagged_dir)}
    assert got["<all>"].lstrip and got["<all>"].rstrip and got["<all>"].single_word
    assert got["ab cd"].normalized and not got["<ls>"].normalized and got["<sp>"].special


def test_tokenizer_json_normalizer_is_ignored_like_the_reference(flagged_dir, tmp_path):
    """transformers' GemmaTokenizer installs its own normalizer (" " -> U+2581) whatever tokenizer.json says;
    with an NFKC + Lowercase normalizer written there, both tokenizers still agree (and differ from NFKC)."""
    import json

    d = tmp_path / "tok"
    shutil.copytree(flagged_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    reference = AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d, max_length=10_000)
    texts = ["ﬁne ① AB CD", "ab cd", "ab\u2581cd <nl> x", "Ｍars  <ls> <rs> <sw>"]
    for text in texts:
        assert ours.encode([text])[0] == reference(text)["input_ids"], repr(text)
    assert ours.encode(["ﬁ"])[0] != ours.encode(["fi"])[0]  # no NFKC applied


@pytest.mark.parametrize(
    "template, add_bos_eos",
    [("bos_eos", (False, False)), ("bos", (True, True)), ("eos", (True, False)), (None, (True, True))],
)
def test_bos_eos_come_from_the_post_processor_like_the_reference(tiny_ckpt, tmp_path, template, add_bos_eos):
    """transformers 5 takes BOS/EOS from tokenizer.json's template and ignores add_bos_token/add_eos_token
    in tokenizer_config.json; truncation leaves room for exactly the tokens the template adds."""
    import json

    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copyfile(tiny_ckpt / name, d / name)
    tj = json.loads((d / "tokenizer.json").read_text())
    single = tj["post_processor"]["single"]  # [<bos>, $A, <eos>]
    if template is None:
        tj["post_processor"] = None
    else:
        tj["post_processor"]["single"] = {"bos_eos": single, "bos": single[:2], "eos": single[1:]}[template]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["add_bos_token"], tc["add_eos_token"] = add_bos_eos
    (d / "tokenizer_config.json").write_text(json.dumps(tc))

    reference = AutoTokenizer.from_pretrained(str(d))
    for max_length in (4, 9, 96):
        ours = Tokenizer.from_dir(d, max_length=max_length)
        for text in ["", "ab", "planet Mars <eos> " * 10]:
            want = reference(text, truncation=True, max_length=max_length)["input_ids"]
            assert ours.encode([text])[0] == want, (max_length, text)


# ---------------------------------------------------------------------------------------------------
# A large added vocabulary like Gemma's (thousands of "<unusedN>", HTML tags, whitespace runs), plus
# contents that are prefixes of each other and that overlap, so that leftmost-longest matters. Our
# matcher compiles them to a prefix-tree regex and cuts a whole batch with one split.

MANY = (
    [f"<unused{i}>" for i in range(2, 1200)]
    + ["<t>", "<ta", "<tab", "<table>", "<table>x", "</table>", "<h1>", "<br>"]
    + ["\n", "\n\n", "\n\n\n", "\t\t", "  ", "\u2581\u2581", "ab", "abc", "abcd", "bcd", "b", "é"]
)
NEAR_MISSES = ["<unused", "<unused1200>", "<table", "<ta>", "<", ">", "a", "c", "d", " ", "x", "\x00", "\ufffe"]


@pytest.fixture(scope="module")
def many(tiny_ckpt, tmp_path_factory):
    """(ours, reference) for the tiny tokenizer with MANY added (normalized=False, no flags)."""
    from tokenizers import AddedToken as HFAddedToken

    out = tmp_path_factory.mktemp("many_tokens")
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    tok.add_tokens([HFAddedToken(c, normalized=False, special=False) for c in MANY])
    tok.save_pretrained(str(out))
    shutil.copyfile(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    return Tokenizer.from_dir(out, max_length=64), AutoTokenizer.from_pretrained(str(out))


many_text = st.lists(
    st.one_of(
        st.sampled_from(MANY[:20] + MANY[-26:]),
        st.sampled_from(NEAR_MISSES),
        st.sampled_from(WORDS).map(lambda w: " " + w),
        st.text(any_char, max_size=4),
    ),
    max_size=30,
).map("".join)


@fuzz_settings(200)
@given(texts=st.lists(many_text, min_size=1, max_size=8))
def test_many_added_tokens_match_reference_batched_and_alone(many, texts):
    ours, reference = many
    got = ours.encode(texts)
    for text, ids in zip(texts, got, strict=True):
        assert ids == reference(text, truncation=True, max_length=64)["input_ids"], repr(text)
    assert got == [ours.encode([t])[0] for t in texts]


def test_many_added_tokens_on_a_long_batch(many):
    """Hundreds of texts, most with several tokens (many SentencePiece windows), against the reference."""
    ours, reference = many
    rng = random.Random(0)
    pool = MANY[:40] + MANY[-26:] + NEAR_MISSES + [" " + w for w in WORDS]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 40))) for _ in range(500)]
    want = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert ours.encode_pieces(texts) == want
    assert ours.encode(texts) == [reference(t, truncation=True, max_length=64)["input_ids"] for t in texts]


@fuzz_settings(300)
@given(
    contents=st.sets(st.text("ab<>\n", min_size=1, max_size=6), min_size=1, max_size=16),
    text=st.text("ab<>\nc", max_size=60),
)
def test_prefix_tree_regex_matches_like_a_longest_first_alternation(contents, text):
    """The prefix-tree regex finds the same matches as the alternation tried longest first."""
    import re

    from embgemma_jax.tokenizer import _literal_alternation

    longest_first = re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))
    tree = re.compile(_literal_alternation(contents))
    assert [m.span() for m in tree.finditer(text)] == [m.span() for m in longest_first.finditer(text)]


def test_deep_prefix_chains_fall_back_to_the_alternation():
    """Contents nested deeper than the prefix tree allows ("a", "aa", ... 200 deep) still match."""
    import re

    from embgemma_jax.tokenizer import _literal_alternation

    contents = ["a" * k for k in range(1, 201)] + ["ab"]
    pattern = re.compile(_literal_alternation(contents))
    assert [m.span() for m in pattern.finditer("a" * 450 + "b")] == [(0, 200), (200, 400), (400, 450)]
