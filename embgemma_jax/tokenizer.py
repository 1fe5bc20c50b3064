"""SentencePiece tokenization that reproduces the reference Hugging Face Gemma tokenizer's ids.

The reference (transformers' GemmaTokenizer over ``tokenizer.json``) does three things on top of the
SentencePiece model: it matches added/special tokens written literally in the text (``<eos>``,
``<mask>``, ``<unused0>``, ``<image_soft_token>``, ...) as single ids, it adds BOS and EOS, and it
truncates keeping both. Everything beyond the SentencePiece model comes from the checkpoint's
``tokenizer.json``, read the way transformers 5's GemmaTokenizer reads it: the added-token vocabulary
with its lstrip/rstrip/single_word/normalized flags and the post-processor template that adds BOS/EOS.
Two things in the files are ignored because the reference ignores them too: ``add_bos_token`` /
``add_eos_token`` in ``tokenizer_config.json`` (the template decides) and ``tokenizer.json``'s normalizer
(GemmaTokenizer always installs ``" " -> "\u2581"``, which SentencePiece's own whitespace escaping matches).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embgemma_jax.errors import CheckpointError, read_json


@dataclasses.dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True


def read_tokenizer_json(directory: Path) -> dict[str, Any]:
    """``tokenizer.json``, required: without it the reference tokenizer adds no BOS/EOS and matches no
    added tokens, so no faithful tokenization exists."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"missing tokenizer file: {path} (it holds the added tokens and the BOS/EOS template the reference "
            "tokenizer uses; copy it from the original checkpoint)"
        )
    return read_json(path)


def parse_added_tokens(tj: dict[str, Any], path: Path) -> list[AddedToken]:
    """The ``added_tokens`` of a parsed ``tokenizer.json`` (read from ``path``), checked."""
    entries = tj.get("added_tokens") or []
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: added_tokens must be a list, got {type(entries).__name__}")
    out = []
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("content"), str) and type(e.get("id")) is int):
            raise CheckpointError(f"{path}: malformed added token entry {e!r:.200} (needs a str content and an int id)")
        flags = {k: e[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in e}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise CheckpointError(f"{path}: added token {e['content']!r} has non-boolean flags {flags}")
        out.append(AddedToken(e["content"], e["id"], **flags))
    return out


def read_added_tokens(directory: str | Path) -> list[AddedToken]:
    """The added-token vocabulary of a checkpoint directory's ``tokenizer.json``."""
    directory = Path(directory)
    return parse_added_tokens(read_tokenizer_json(directory), directory / "tokenizer.json")


def parse_template(tj: dict[str, Any], path: Path) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) that the post-processor puts around a single text; None where it adds none."""
    post = tj.get("post_processor")
    if post is None:
        return None, None
    if not isinstance(post, dict) or post.get("type") != "TemplateProcessing":
        kind = post.get("type") if isinstance(post, dict) else post
        raise CheckpointError(f"{path}: post_processor {kind!r} is not supported (expected TemplateProcessing)")
    single, specials = post.get("single"), post.get("special_tokens")
    try:
        names = [None if "Sequence" in item else item["SpecialToken"]["id"] for item in single]
        k = names.index(None)
        if names.count(None) != 1 or k > 1 or len(names) - k > 2:
            raise ValueError("expected [special?, $A, special?]")
        ids = []
        for name in names[:k] + names[k + 1 :]:
            token_ids = specials[name]["ids"]
            if len(token_ids) != 1 or type(token_ids[0]) is not int:
                raise ValueError(f"special token {name!r} maps to ids {token_ids}")
            ids.append(token_ids[0])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: post_processor.single {single!r:.200} is not supported (need [special?, $A, special?] with "
            f"one id per special token): {e}"
        ) from e
    bos = ids.pop(0) if k == 1 else None
    return bos, (ids[0] if ids else None)


# tokenizers matches added tokens with Rust regex classes, which differ from Python's str methods: its
# whitespace is the Unicode White_Space property (so U+001C..U+001F are not whitespace, unlike str.isspace)
# and its word characters (single_word) are \p{Alphabetic}, \p{M}, \p{Nd}, \p{Pc} and Join_Control (so
# "²" is not a word character, unlike str.isalnum, and combining marks are).
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WORD_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nl", "Mn", "Mc", "Me", "Nd", "Pc"})
# Other_Alphabetic characters outside the categories above (circled / squared Latin letters, category So).
_OTHER_ALPHABETIC_SO = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))


def _is_whitespace(c: str) -> bool:
    return c in _WHITE_SPACE


def _is_word_char(c: str) -> bool:
    if unicodedata.category(c) in _WORD_CATEGORIES or c in "\u200c\u200d":
        return True
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _OTHER_ALPHABETIC_SO)


class _AddedTokenMatcher:
    """Finds added tokens in a string exactly as tokenizers' AddedVocabulary.find_matches does.

    Matching is leftmost-longest and non-overlapping (a regex alternation tried longest-first is the same
    as tokenizers' LeftmostLongest Aho-Corasick); a ``single_word`` match next to a word character is
    dropped; ``lstrip`` / ``rstrip`` take the adjacent whitespace into the token (lstrip never reaches back
    past the previous match).
    """

    def __init__(self, tokens: Sequence[tuple[str, AddedToken]]) -> None:
        self._by_content = {content: tok for content, tok in tokens if content}
        contents = sorted(self._by_content, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

    def search(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None

    def split(self, text: str) -> list[str | int]:
        """Text -> non-empty plain segments (str) and matched token ids (int), in order."""
        if self._pattern is None:
            return [text] if text else []
        parts: list[str | int] = []
        pos = 0
        for m in self._pattern.finditer(text):
            tok = self._by_content[m.group(0)]
            start, end = m.start(), m.end()
            if tok.single_word and (
                (start > 0 and _is_word_char(text[start - 1])) or (end < len(text) and _is_word_char(text[end]))
            ):
                continue
            if tok.lstrip:
                while start > 0 and _is_whitespace(text[start - 1]):
                    start -= 1
                start = max(start, pos)
            if tok.rstrip:
                while end < len(text) and _is_whitespace(text[end]):
                    end += 1
            # A previous rstrip may have consumed the start of this match; tokenizers still emits the token.
            if pos < start:
                parts.append(text[pos:start])
            parts.append(tok.id)
            pos = end
        if pos < len(text):
            parts.append(text[pos:])
        return parts


class Tokenizer:
    """Text -> ids exactly as the reference tokenizer (BOS + pieces + EOS, right padding with pad id).

    Args:
      model_file: the SentencePiece ``tokenizer.model``.
      added_tokens: the tokenizer's added-token vocabulary (matched literally, leftmost-longest).
      max_length: truncation length including BOS and EOS.
      normalizer: literal replacements applied before matching ``normalized: true`` added tokens. The
        default is what transformers' GemmaTokenizer installs (``" " -> "\u2581"``); it ignores the
        normalizer written in ``tokenizer.json``, and so do we.
    """

    def __init__(
        self,
        model_file: str | Path,
        added_tokens: Sequence[AddedToken] = (),
        *,
        max_length: int,
        bos_id: int = 2,
        eos_id: int = 1,
        pad_id: int = 0,
        add_bos: bool = True,
        add_eos: bool = True,
        normalizer: Sequence[tuple[str, str]] = ((" ", "\u2581"),),
    ) -> None:
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"missing tokenizer file: {model_file}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{model_file} is not a valid SentencePiece model: {e}") from e
        self.model_file = model_file
        self.added_tokens = list(added_tokens)
        self.max_length = int(max_length)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.normalizer = tuple(normalizer)
        # As tokenizers: tokens with normalized=false are matched in the raw text first, then tokens with
        # normalized=true (their content normalized too) in the normalized remaining segments.
        self._raw = _AddedTokenMatcher([(t.content, t) for t in self.added_tokens if not t.normalized])
        normalized = [(self.normalize(t.content), t) for t in self.added_tokens if t.normalized]
        self._normalized = _AddedTokenMatcher(normalized) if normalized else None

    def normalize(self, text: str) -> str:
        """tokenizers' normalizer (literal replacements); SentencePiece encodes the result identically."""
        for pattern, content in self.normalizer:
            text = text.replace(pattern, content)
        return text

    @classmethod
    def from_dir(cls, directory: str | Path, *, max_length: int, **kwargs: Any) -> Tokenizer:
        """The tokenizer of a checkpoint directory (``tokenizer.model`` + ``tokenizer.json``).

        BOS/EOS ids and whether to add them come from ``tokenizer.json``'s template and override the
        ``bos_id``/``eos_id`` keyword arguments.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        tj = read_tokenizer_json(directory)
        bos, eos = parse_template(tj, path)
        if bos is not None:
            kwargs["bos_id"] = bos
        if eos is not None:
            kwargs["eos_id"] = eos
        return cls(
            directory / "tokenizer.model",
            parse_added_tokens(tj, path),
            max_length=max_length,
            add_bos=bos is not None,
            add_eos=eos is not None,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (added tokens may have larger ids)."""
        return self.sp.GetPieceSize()

    def _split(self, text: str) -> list[str | int]:
        """Splits text into plain segments (str) and matched added-token ids (int), as tokenizers'
        AddedVocabulary.extract_and_normalize."""
        parts = self._raw.split(text)
        if self._normalized is None:
            return parts
        out: list[str | int] = []
        for part in parts:
            out.extend([part] if isinstance(part, int) else self._normalized.split(self.normalize(part)))
        return out

    def _is_plain(self, text: str) -> bool:
        """True when no added token can match, so SentencePiece alone gives the reference ids."""
        if self._raw.search(text):
            return False
        return self._normalized is None or not self._normalized.search(self.normalize(text))

    def _sp_encode(self, texts: list[str]) -> list[list[int]]:
        try:
            return self.sp.Encode(texts)
        except (TypeError, UnicodeError):
            # SentencePiece needs UTF-8; a str holding a lone surrogate (e.g. from bad decoding) has none.
            for t in texts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as bad:
                    raise ValueError(
                        f"text {t[:40]!r}... contains {t[bad.start]!r} at character {bad.start}, a lone surrogate "
                        "that is not valid Unicode (fix the input's decoding, e.g. errors='replace')"
                    ) from None
            raise

    def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without BOS/EOS and without truncation."""
        plain_idx = [i for i, t in enumerate(texts) if self._is_plain(t)]
        out: list[list[int] | None] = [None] * len(texts)
        if plain_idx:
            for i, ids in zip(plain_idx, self._sp_encode([texts[i] for i in plain_idx]), strict=True):
                out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                parts = self._split(t)
                plain = [p for p in parts if isinstance(p, str)]
                encoded = iter(self._sp_encode(plain)) if plain else iter(())
                ids: list[int] = []
                for part in parts:
                    ids.extend([part] if isinstance(part, int) else next(encoded))
                out[i] = ids
        return out  # type: ignore[return-value]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Full reference ids per text: [BOS] + pieces (truncated) + [EOS]."""
        check_texts(texts)
        room = self.max_length - int(self.add_bos) - int(self.add_eos)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return [head + ids[:room] + tail for ids in self.encode_pieces(texts)]

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> dict[str, np.ndarray]:
        """Right-pads to ``length`` (default: the longest) -> {'input_ids', 'attention_mask'} int32."""
        longest = max((len(x) for x in ids), default=0)
        length = longest if length is None else length
        if length < longest:
            raise ValueError(f"pad length {length} is shorter than the longest sequence ({longest})")
        input_ids = np.full((len(ids), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=np.int32)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        return self.pad(self.encode(texts))

    def id_to_piece(self, i: int) -> str:
        for t in self.added_tokens:
            if t.id == i:
                return t.content
        return self.sp.IdToPiece(i) if 0 <= i < self.vocab_size else f"<id {i}>"


def check_texts(texts: Any) -> None:
    """Raises a TypeError naming the first item that is not a str (bytes get a hint to decode them)."""
    if isinstance(texts, (str, bytes, bytearray, memoryview)) or not isinstance(texts, Sequence):
        hint = "; decode bytes to str first" if isinstance(texts, (bytes, bytearray, memoryview)) else ""
        raise TypeError(f"expected a str or a sequence (list, tuple) of str, got {type(texts).__name__}{hint}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = " (decode bytes to str first)" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.60}); every text must be a str{hint}")
