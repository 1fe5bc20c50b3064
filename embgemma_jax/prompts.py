"""Task prompts, resolved exactly as sentence-transformers does (plain string concatenation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TITLE_TEMPLATE = "title: {title} | text: "


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


def title_prompts(titles: Sequence[str | None], n_texts: int) -> list[str]:
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
