"""Task prompts and the pool mask, prepared once for every caller.

Prompts are resolved exactly as sentence-transformers does: an explicit ``prompt`` wins, else
``prompt_name`` (which must exist), else the checkpoint's default prompt name; the model sees
``prompt + text`` by plain string concatenation. Documents with titles get ``title: {title} | text: ``.
When the pool excludes the prompt, its length is measured as the reference measures it
(:func:`prompt_length`) and the pool mask drops those positions (:func:`exclude_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from embgemma_jax.tokenizer import check_texts

TITLE_TEMPLATE = "title: {title} | text: "


class Prompted(NamedTuple):
    """Texts ready for the tokenizer: each text with its prompt in front, and the prompts themselves."""

    single: bool  # the caller passed one str (return one vector, not a [1, E] array)
    texts: list[str]  # prompt + text
    prompts: list[str]  # the prompt of each text ("" for none)


def prepare(
    sentences: Any,
    table: Mapping[str, str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    default_prompt_name: str | None = None,
    prompts_per_text: Sequence[str] | None = None,
    titles: str | Sequence[str | None] | None = None,
) -> Prompted:
    """Checks the texts and puts each one's prompt in front of it.

    ``titles`` (documents) and ``prompts_per_text`` give one prompt per text and exclude ``prompt`` and
    ``prompt_name``; otherwise one prompt is resolved by :func:`resolve_prompt` for all texts.
    """
    single = isinstance(sentences, str)
    texts = [sentences] if single else sentences
    check_texts(texts)
    texts = list(texts)
    if titles is not None:
        if prompts_per_text is not None:
            raise ValueError("pass either titles or prompts_per_text, not both")
        prompts_per_text = title_prompts(titles, len(texts))
    if prompts_per_text is not None:
        if prompt_name is not None or prompt is not None:
            what = "titles" if titles is not None else "prompts_per_text"
            raise ValueError(f"pass either {what} or prompt/prompt_name, not both")
        prompts = list(prompts_per_text)
        if len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts; pass one prompt per text")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts_per_text[{i}] is {type(p).__name__}; expected str")
    else:
        p = resolve_prompt(table, prompt_name, prompt, default_prompt_name) or ""
        prompts = [p] * len(texts)
    return Prompted(single, [p + t for p, t in zip(prompts, texts, strict=True)], prompts)


def resolve_prompt(
    prompts: Mapping[str, str], prompt_name: str | None, prompt: str | None, default_prompt_name: str | None = None
) -> str | None:
    """An explicit ``prompt`` wins; else ``prompt_name`` (must exist); else the default prompt name."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return prompt
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"unknown prompt_name {prompt_name!r}; valid names: {sorted(prompts)}")
        return prompts[prompt_name]
    if default_prompt_name is not None:
        return prompts.get(default_prompt_name)
    return None


def title_prompts(titles: str | Sequence[str | None], n_texts: int) -> list[str]:
    """One document prompt per text: ``title: {title} | text: `` (a None title becomes 'none')."""
    if isinstance(titles, str):
        titles = [titles]
    if len(titles) != n_texts:
        raise ValueError(f"got {len(titles)} titles for {n_texts} texts; pass one title per text")
    out = []
    for i, t in enumerate(titles):
        if t is not None and not isinstance(t, str):
            raise TypeError(f"titles[{i}] is {type(t).__name__}; expected str or None")
        out.append(TITLE_TEMPLATE.format(title="none" if t is None else t))
    return out


def prompt_length(tokenizer: Any, prompt: str | None) -> int:
    """Tokens a prompt occupies at the start of ``prompt + text``, measured as sentence-transformers does.

    The prompt is tokenized alone (BOS + pieces + EOS, truncated to the model's length); a trailing
    special token is not counted. An empty or missing prompt has length 0 (nothing is excluded, not even
    BOS), again as the reference.
    """
    if not prompt:
        return 0
    ids = tokenizer.encode([prompt])[0]
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, int(tokenizer.sp.unk_id())}
    special |= {t.id for t in tokenizer.added_tokens if t.special}
    n = len(ids)
    if ids and ids[-1] in special:
        n -= 1
    return n


def exclude_prompt(attention_mask: Any, prompt_lengths: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """The pool mask: ``attention_mask`` with each row's first ``prompt_length`` real positions zeroed.

    As sentence-transformers, positions before ``first_real_token + prompt_length`` are removed (with
    right padding the first real token is at 0). ``prompt_lengths`` is one int or one per row.
    """
    m = np.asarray(attention_mask)
    if m.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, tokens], got shape {m.shape}")
    pl = np.broadcast_to(np.asarray(prompt_lengths, dtype=np.int64), (m.shape[0],))
    if (pl < 0).any():
        raise ValueError(f"prompt lengths must be >= 0, got {pl.tolist()}")
    first = np.argmax(m.astype(np.int32), axis=1)
    keep = np.arange(m.shape[1])[None, :] >= (first + pl)[:, None]
    return (m * keep).astype(m.dtype)


def prompt_lengths(tokenizer: Any, prompts: Sequence[str]) -> np.ndarray:
    """:func:`prompt_length` of each prompt (each distinct prompt tokenized once)."""
    cache: dict[str, int] = {}
    out = np.empty(len(prompts), dtype=np.int64)
    for i, p in enumerate(prompts):
        if p not in cache:
            cache[p] = prompt_length(tokenizer, p)
        out[i] = cache[p]
    return out
