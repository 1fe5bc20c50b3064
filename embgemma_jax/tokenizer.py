"""SentencePiece tokenization that reproduces the reference Hugging Face Gemma tokenizer's ids.

The reference (transformers' GemmaTokenizer over ``tokenizer.json``) does three things on top of the
SentencePiece model: it matches added/special tokens written literally in the text (``<eos>``,
``<mask>``, ``<unused0>``, ``<image_soft_token>``, ...) as single ids, it adds BOS and EOS, and it
truncates keeping both. We read the added-token vocabulary from the checkpoint's own tokenizer files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embgemma_jax.config import CheckpointError, read_json


@dataclasses.dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True


def read_added_tokens(directory: Path) -> list[AddedToken]:
    """Added tokens from ``tokenizer.json`` (preferred) or ``tokenizer_config.json``'s added_tokens_decoder."""
    tj = directory / "tokenizer.json"
    if tj.is_file():
        entries = read_json(tj).get("added_tokens") or []
    else:
        tc = directory / "tokenizer_config.json"
        decoder = read_json(tc).get("added_tokens_decoder") if tc.is_file() else None
        entries = [dict(v, id=int(k)) for k, v in (decoder or {}).items()]
    fields = {f.name for f in dataclasses.fields(AddedToken)}
    out = []
    for e in entries:
        if "content" not in e or "id" not in e:
            raise CheckpointError(f"malformed added token entry in {directory}: {e!r}")
        out.append(AddedToken(**{k: v for k, v in e.items() if k in fields}))
    return out


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class Tokenizer:
    """Text -> ids exactly as the reference tokenizer (BOS + pieces + EOS, right padding with pad id).

    Args:
      model_file: the SentencePiece ``tokenizer.model``.
      added_tokens: the tokenizer's added-token vocabulary (matched literally, leftmost-longest).
      max_length: truncation length including BOS and EOS.
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
        self._by_content = {t.content: t for t in self.added_tokens if t.content}
        # A regex alternation tried longest-first is leftmost-longest matching (as tokenizers' Aho-Corasick).
        contents = sorted(self._by_content, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

    @classmethod
    def from_dir(cls, directory: str | Path, *, max_length: int, **kwargs: Any) -> Tokenizer:
        directory = Path(directory)
        add_bos, add_eos = True, True
        tc = directory / "tokenizer_config.json"
        if tc.is_file():
            conf = read_json(tc)
            add_bos = bool(conf.get("add_bos_token", True))
            add_eos = bool(conf.get("add_eos_token", True))
            if conf.get("padding_side", "right") != "right":
                # Padding side changes no embedding (padding is masked); we always pad right.
                pass
        return cls(
            directory / "tokenizer.model",
            read_added_tokens(directory),
            max_length=max_length,
            add_bos=add_bos,
            add_eos=add_eos,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (added tokens may have larger ids)."""
        return self.sp.GetPieceSize()

    def _split(self, text: str) -> list[str | int]:
        """Splits text into plain segments (str) and matched added-token ids (int)."""
        if self._pattern is None:
            return [text]
        parts: list[str | int] = []
        pos = 0
        for m in self._pattern.finditer(text):
            tok = self._by_content[m.group(0)]
            start, end = m.start(), m.end()
            if tok.single_word and (
                (start > 0 and _is_word_char(text[start - 1])) or (end < len(text) and _is_word_char(text[end]))
            ):
                continue
            if start < pos:
                continue
            if tok.lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            parts.append(text[pos:start])
            parts.append(tok.id)
            if tok.rstrip:
                while end < len(text) and text[end].isspace():
                    end += 1
            pos = end
        parts.append(text[pos:])
        return [p for p in parts if p != ""]

    def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without BOS/EOS and without truncation."""
        plain_idx = [i for i, t in enumerate(texts) if self._pattern is None or not self._pattern.search(t)]
        out: list[list[int] | None] = [None] * len(texts)
        if plain_idx:
            for i, ids in zip(plain_idx, self.sp.Encode([texts[i] for i in plain_idx]), strict=True):
                out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                ids: list[int] = []
                for part in self._split(t):
                    ids.extend([part] if isinstance(part, int) else self.sp.Encode(part))
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
    """Raises a TypeError naming the first item that is not a str."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"expected a sequence of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.60}); every text must be a str")
