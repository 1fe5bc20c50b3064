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

import bisect
import dataclasses
import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
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


# A prefix tree deeper than this (contents that are prefixes of prefixes of ...) is matched with a plain
# alternation instead: sre compiles nested groups recursively.
_MAX_TRIE_DEPTH = 64
# The first-character scan below runs one C-level str.find pass per distinct first character; with more
# of them than this, one regex pass over the joined texts is cheaper.
_MAX_SCAN_CHARS = 8


def _literal_alternation(contents: Iterable[str]) -> str:
    """A regex that matches, at the leftmost position, the longest of ``contents`` (non-empty strings).

    The same matches as ``"|".join(sorted(contents, key=len, reverse=True))``, written as a prefix tree:
    a position costs the length of the match tried there, not the number of contents (the real Gemma
    vocabulary has thousands of added tokens, most of them starting with "<"). Siblings start with
    distinct characters, so at most one branch can continue; a greedy ``?`` after a complete content
    tries the longer ones first and falls back to it.
    """
    contents = sorted(set(contents))
    end = object()  # marks a complete content in the tree
    tree: dict = {}
    for content in contents:
        node = tree
        for ch in content:
            node = node.setdefault(ch, {})
        node[end] = None

    def depth(root: dict) -> int:
        # Groups nest once per node that completes a content or branches; chains of one child do not.
        deepest, stack = 0, [(root, 0)]
        while stack:
            node, d = stack.pop()
            children = [child for key, child in node.items() if key is not end]
            d += int(len(children) > 1 or end in node)
            deepest = max(deepest, d)
            stack.extend((child, d) for child in children)
        return deepest

    def emit(node: dict) -> str:
        alternatives = []
        for ch, child in sorted((k, v) for k, v in node.items() if k is not end):
            run = [ch]
            while end not in child and len(child) == 1:  # a chain: one literal string
                (ch, child) = next(iter(child.items()))
                run.append(ch)
            alt = re.escape("".join(run))
            if len(child) > int(end in child):  # more contents continue past this one
                alt += "(?:" + emit(child) + ")" + ("?" if end in child else "")
            alternatives.append(alt)
        return "|".join(alternatives)

    if depth(tree) <= _MAX_TRIE_DEPTH:
        return emit(tree)
    return "|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True))


class _AddedTokenMatcher:
    """Finds added tokens in a string exactly as tokenizers' AddedVocabulary.find_matches does.

    Matching is leftmost-longest and non-overlapping (a regex that tries the longest content first at
    each position is the same as tokenizers' LeftmostLongest Aho-Corasick); a ``single_word`` match next
    to a word character is dropped; ``lstrip`` / ``rstrip`` take the adjacent whitespace into the token
    (lstrip never reaches back past the previous match).
    """

    def __init__(self, tokens: Sequence[tuple[str, AddedToken]]) -> None:
        self._by_content = {content: tok for content, tok in tokens if content}
        self._pattern = re.compile(_literal_alternation(self._by_content)) if self._by_content else None
        self._first_chars = sorted({c[0] for c in self._by_content})
        self._joined_splitters: dict[str, re.Pattern[str]] = {}

    def search(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None

    def candidates(self, joined: str, bounds: Sequence[int]) -> set[int]:
        """Indices of the texts that may hold an added token, found in one pass over all of them.

        ``joined`` is the texts joined by a one-character separator and ``bounds[i]`` the offset where
        text ``i + 1`` starts (just past text ``i`` and its separator). Every text with a match is
        returned (matches later dropped by ``single_word`` included; a false candidate only costs a
        :meth:`split` that finds nothing). With few distinct first characters this is a C-level
        ``str.find`` per character (most texts hold none) and a regex search from there to the end of
        that text; otherwise one regex pass over ``joined``.
        """
        hits: set[int] = set()
        if self._pattern is None:
            return hits
        if len(self._first_chars) <= _MAX_SCAN_CHARS:
            for ch in self._first_chars:
                pos = joined.find(ch)
                while pos >= 0:
                    i = bisect.bisect_right(bounds, pos)
                    # One C-level search from here to the end of text i settles it (a "<" alone is not a token).
                    if self._pattern.search(joined, pos, bounds[i] - 1) is not None:
                        hits.add(i)
                    pos = joined.find(ch, bounds[i])  # the next text
            return hits
        pos = 0
        while (m := self._pattern.search(joined, pos)) is not None:
            i = bisect.bisect_right(bounds, m.start())
            hits.add(i)
            pos = bounds[i]
        return hits

    @property
    def has_flags(self) -> bool:
        return any(t.lstrip or t.rstrip or t.single_word for t in self._by_content.values())

    def joined_splitter(self, sep: str) -> re.Pattern[str]:
        """A pattern whose ``split`` cuts texts joined by ``sep`` (a character in no content and no text)
        into [segment, content or sep, segment, ...]: sep where one text ends. Tokens without flags only."""
        if sep not in self._joined_splitters:
            # One group around the whole alternation keeps sre's first-character prefilter (2-3x faster).
            alternation = self._pattern.pattern if self._pattern is not None else "(?!)"
            self._joined_splitters[sep] = re.compile(f"({alternation}|{re.escape(sep)})")
        return self._joined_splitters[sep]

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


# Separators for joining a batch into one string (the added-token scan runs once over all texts):
# the first one that no normalizer pattern contains is used.
_SEPARATORS = ("\x00", "\x1f", "\ufffe", "\uffff")
# Segments (or texts, on the general path) of texts with added tokens go to SentencePiece about this many
# at a time, and each text's ids are assembled right after: the segments' id lists die young, where all of
# them alive at once would reach the oldest GC generation and trigger full collections (measured: +25%
# time). A call costs ~50 us more than its work.
_WINDOW = 512


class Tokenizer:
    """Text -> ids exactly as the reference tokenizer (BOS + pieces + EOS, right padding with pad id).

    A batch costs one SentencePiece call for the texts without added tokens (SentencePiece adds BOS/EOS
    itself when the template's ids are its own) and one per ~512 plain segments of the texts with added
    tokens. Which texts have them is found in one scan over the joined batch, not a regex per text, and
    (when no added token has flags or is normalized, as in Gemma's) those texts are cut by one regex
    split over all of them. The ids are the same as one text at a time.

    Args:
      model_file: the SentencePiece ``tokenizer.model``.
      added_tokens: the tokenizer's added-token vocabulary (matched literally, leftmost-longest).
      max_length: truncation length including BOS and EOS.
      normalizer: literal replacements applied before matching ``normalized: true`` added tokens. The
        default is what transformers' GemmaTokenizer installs (``" " -> "\u2581"``); it ignores the
        normalizer written in ``tokenizer.json``, and so do we.
      num_threads: SentencePiece threads per :meth:`encode` call (it releases the GIL while it works;
        the ids do not depend on it). Default 1: the model's own work runs beside the tokenizer (XLA on
        the CPU, or the host loop that feeds an accelerator), and one thread already encodes over a
        million tokens/s; raise it where tokenization is the measured limit
        (``benchmarks/bench_tokenizer.py`` measures one thread and several on the machine at hand).
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
        num_threads: int = 1,
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
        if self.max_length < int(add_bos) + int(add_eos):
            raise ValueError(
                f"max_length={max_length} leaves no room for the {int(add_bos) + int(add_eos)} BOS/EOS tokens "
                "the template adds (expected at least that many)"
            )
        self.normalizer = tuple(normalizer)
        self.num_threads = _check_num_threads(num_threads)
        # As tokenizers: tokens with normalized=false are matched in the raw text first, then tokens with
        # normalized=true (their content normalized too) in the normalized remaining segments.
        self._raw = _AddedTokenMatcher([(t.content, t) for t in self.added_tokens if not t.normalized])
        normalized = [(self.normalize(t.content), t) for t in self.added_tokens if t.normalized]
        self._normalized = _AddedTokenMatcher(normalized) if normalized else None
        self._by_id: dict[int, str] = {}
        for t in self.added_tokens:
            self._by_id.setdefault(t.id, t.content)
        # SentencePiece's own add_bos/add_eos give the template's ids when they are its BOS/EOS.
        self._sp_adds_specials = (not add_bos or self.sp.bos_id() == bos_id) and (
            not add_eos or self.sp.eos_id() == eos_id
        )
        # Without flags and normalized tokens, the texts with added tokens are cut all at once (one regex
        # split over them joined by a separator that occurs in no text and no token).
        contents = [t.content for t in self.added_tokens]
        self._joined_seps = (
            []
            if normalized or self._raw.has_flags
            else [c for c in _SEPARATORS if not any(c in content for content in contents)]
        )
        self._glue = {content: [tok.id] for content, tok in self._raw._by_content.items()}
        self._sep = next((c for c in _SEPARATORS if not any(c in p for p, _ in self.normalizer)), None)
        # Normalizing the joined batch once keeps every text's offsets when no replacement changes length
        # and none can reach across a separator.
        self._normalize_joined = self._sep is not None and all(len(p) == len(c) for p, c in self.normalizer)

    def normalize(self, text: str) -> str:
        """tokenizers' normalizer (literal replacements); SentencePiece encodes the result identically."""
        for pattern, content in self.normalizer:
            text = text.replace(pattern, content)
        return text

    @classmethod
    def from_dir(cls, directory: str | Path, *, max_length: int, **kwargs: Any) -> Tokenizer:
        """The tokenizer of a checkpoint directory (``tokenizer.model`` + ``tokenizer.json``).

        BOS/EOS ids and whether to add them come from ``tokenizer.json``'s template and override the
        ``bos_id``/``eos_id`` keyword arguments; other keyword arguments (``num_threads``, ...) go to the
        constructor.
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

    def _texts_to_split(self, texts: list[str]) -> list[int]:
        """Indices of the texts that may hold an added token (every text that does, in order): one scan
        over the joined batch. The others are plain: SentencePiece alone gives the reference ids."""
        if self._raw._pattern is None and self._normalized is None:
            return []
        joined = (self._sep or _SEPARATORS[0]).join(texts)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        bounds = np.cumsum(lengths + 1).tolist()  # where text i + 1 starts
        hits = self._raw.candidates(joined, bounds)
        if self._normalized is not None:
            if self._normalize_joined:
                hits |= self._normalized.candidates(self.normalize(joined), bounds)
            else:
                hits.update(i for i, t in enumerate(texts) if self._normalized.search(self.normalize(t)))
        return sorted(hits)

    def _sp_encode(
        self, texts: list[str], num_threads: int, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """One SentencePiece call for all ``texts`` (one string goes alone: a batch call starts a thread pool)."""
        if not texts:
            return []
        try:
            if len(texts) == 1:
                return [self.sp.Encode(texts[0], add_bos=add_bos, add_eos=add_eos)]
            return self.sp.Encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
        except (TypeError, UnicodeError, RuntimeError):  # pybind11's cast error differs by call
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

    def _encode(self, texts: Sequence[str], num_threads: int | None, specials: bool) -> list[list[int]]:
        """Ids of every text; with ``specials``, [BOS] + pieces truncated to max_length + [EOS]."""
        texts = list(texts)
        threads = self.num_threads if num_threads is None else _check_num_threads(num_threads)
        add_bos, add_eos = specials and self.add_bos, specials and self.add_eos
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        keep = self.max_length - len(tail)  # BOS and pieces that fit before EOS
        split = self._texts_to_split(texts)
        if split:
            is_split = set(split)
            plain: Sequence[int] = [i for i in range(len(texts)) if i not in is_split]
        else:
            plain = range(len(texts))

        # Texts without added tokens: one call; SentencePiece adds BOS/EOS itself where they are its own.
        sp_specials = self._sp_adds_specials
        encoded = self._sp_encode(
            [texts[i] for i in plain] if split else texts, threads, add_bos and sp_specials, add_eos and sp_specials
        )
        if specials and sp_specials:
            for ids in encoded:  # only texts past max_length change, in place
                if len(ids) > self.max_length:
                    del ids[keep:]
                    ids += tail
        elif specials:
            encoded = [head + ids[: keep - len(head)] + tail for ids in encoded]
        if not split:
            return encoded
        out: list[list[int]] = [[]] * len(texts)
        for i, ids in zip(plain, encoded, strict=True):
            out[i] = ids

        # Texts with added tokens: their plain segments encoded in windows, reassembled around the tokens.
        split_texts = [texts[i] for i in split]
        encoded = self._encode_joined(split_texts, threads, head, tail, specials)
        if encoded is None:
            encoded = []
            for c in range(0, len(split), _WINDOW):
                encoded += self._encode_split(split_texts[c : c + _WINDOW], threads, head, tail, specials)
        for i, ids in zip(split, encoded, strict=True):
            out[i] = ids
        return out

    def _encode_split(
        self, texts: list[str], threads: int, head: list[int], tail: list[int], specials: bool
    ) -> list[list[int]]:
        """The texts with added tokens, split one at a time by :meth:`_split` (any flags), one SentencePiece
        call for all their segments."""
        parts = [self._split(t) for t in texts]
        segments = iter(self._sp_encode([p for ps in parts for p in ps if isinstance(p, str)], threads))
        keep = self.max_length - len(tail)
        out = []
        for ps in parts:
            ids = list(head)
            for p in ps:
                if isinstance(p, str):
                    ids += next(segments)
                else:
                    ids.append(p)
            if specials and len(ids) > keep:
                del ids[keep:]
            ids += tail
            out.append(ids)
        return out

    def _encode_joined(
        self, texts: list[str], threads: int, head: list[int], tail: list[int], specials: bool
    ) -> list[list[int]] | None:
        """The texts with added tokens, cut by one regex split over all of them joined and reassembled
        with C-level list operations (no Python per token): the same segments and tokens as
        :meth:`_split` when no token has flags or is normalized. None where that does not hold or every
        separator occurs in the texts."""
        for sep in self._joined_seps:
            joined = sep.join(texts)
            if joined.count(sep) == len(texts) - 1:
                break
        else:
            return None
        pieces = self._raw.joined_splitter(sep).split(joined)  # [segment, content or sep, segment, ...]
        segments, contents = pieces[0::2], pieces[1::2]
        glue = list(map(self._glue.get, contents))  # [token id] between segments k and k + 1 (None at a sep)
        # Text t holds segments[first[t] : first[t + 1]] and the tokens between them.
        first = [0, *(k + 1 for k, c in enumerate(contents) if c == sep), len(segments)]
        chain, out, t = itertools.chain, [], 0
        while t < len(texts):
            # Whole texts with about _WINDOW segments: one SentencePiece call, then each text's ids.
            u = max(t + 1, bisect.bisect_right(first, first[t] + _WINDOW, t + 1, len(texts) + 1) - 1)
            a, b = first[t], first[u]
            items: list[list[int]] = [[]] * (2 * (b - a) - 1)  # segment ids and [token id], interleaved
            items[0::2] = self._sp_encode(segments[a:b], threads)  # empty segments give []
            items[1::2] = glue[a : b - 1]
            for s, e in itertools.pairwise(first[t : u + 1]):
                ids = list(chain(head, chain.from_iterable(items[2 * (s - a) : 2 * (e - a) - 1]), tail))
                if specials and len(ids) > self.max_length:
                    del ids[self.max_length - len(tail) :]
                    ids += tail
                out.append(ids)
            t = u
        return out

    def encode_pieces(self, texts: Sequence[str], *, num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text without BOS/EOS and without truncation.

        ``num_threads`` overrides the tokenizer's SentencePiece thread count for this call.
        """
        check_texts(texts)
        return self._encode(texts, num_threads, specials=False)

    def encode(self, texts: Sequence[str], *, num_threads: int | None = None) -> list[list[int]]:
        """Full reference ids per text: [BOS] + pieces (truncated) + [EOS].

        ``num_threads`` overrides the tokenizer's SentencePiece thread count for this call.
        """
        check_texts(texts)
        return self._encode(texts, num_threads, specials=True)

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
        if i in self._by_id:
            return self._by_id[i]
        return self.sp.IdToPiece(i) if 0 <= i < self.vocab_size else f"<id {i}>"


def _check_num_threads(num_threads: Any) -> int:
    if type(num_threads) is not int or num_threads < 1:
        raise ValueError(
            f"num_threads must be a positive int (SentencePiece threads per call), got {num_threads!r}; "
            "use os.cpu_count() for all cores"
        )
    return num_threads


def check_texts(texts: Any) -> None:
    """Raises a TypeError naming the first item that is not a str (bytes get a hint to decode them)."""
    if isinstance(texts, (str, bytes, bytearray, memoryview)) or not isinstance(texts, Sequence):
        hint = "; decode bytes to str first" if isinstance(texts, (bytes, bytearray, memoryview)) else ""
        raise TypeError(f"expected a str or a sequence (list, tuple) of str, got {type(texts).__name__}{hint}")
    if set(map(type, texts)) <= {str}:  # the common case, checked at C speed
        return
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = " (decode bytes to str first)" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.60}); every text must be a str{hint}")
