"""Research surface: pooling variants over any layers, and opt-in intermediates.

Two jitted programs serve every variant:

  * the encoder, run once per batch, returning all ``num_layers + 1`` hidden states (compiled once per
    batch shape, whatever pooling variants are asked for), and
  * a small pool + dense-head program per variant (compiled once per variant and shape; it only
    reads the layers the variant selects).

So trying ``max`` pooling on layer 3, the mean of the last four layers and a custom function costs one
encoder pass per batch and no reload or recompilation of the encoder. :func:`embed_variants` computes
several variants in one pass; ``EmbeddingGemma.encode(..., pooling=..., layers=...)`` is the one-variant
case.

Intermediates (:func:`inspect`) are captured through Flax's ``sow`` with ``mutable=["intermediates"]``
inside a jitted function that returns only what :class:`Capture` asks for. The plain ``encode`` path never
makes the collection mutable, so the sow calls are no-ops there; attention probabilities are returned only
for the chosen layers (the others are not outputs of the program).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax.encode import check_batching
from embgemma_jax.model import DenseHead, EmbeddingGemmaModule, Encoder, RMSNorm, l2_normalize
from embgemma_jax.pooling import (
    PoolFn,
    PoolingLike,
    PoolingSpec,
    as_pooling_spec,
    exclude_prompt,
    pool,
    prompt_length,
)
from embgemma_jax.prompts import resolve_prompt, title_prompts
from embgemma_jax.tokenizer import check_texts

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A PoolingSpec resolved against a model: static (hashable) input of the pool + head program."""

    mode: str | tuple[str, ...] | PoolFn
    layers: tuple[int, ...]
    weights: tuple[float, ...]
    norm_layer: tuple[bool, ...]  # apply the final norm to this selected layer
    head: bool
    normalize: bool


def resolve_spec(spec: PoolingSpec, num_layers: int, checkpoint_normalize: bool) -> _Plan:
    layers, weights = spec.resolve_layers(num_layers)
    norm_layer = tuple(spec.final_norm and i < num_layers for i in layers)
    normalize = spec.normalize if spec.normalize is not None else (checkpoint_normalize and spec.head)
    return _Plan(spec.mode, layers, weights, norm_layer, spec.head, normalize)


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which intermediates :func:`inspect` returns (embeddings, final states, pooled and dense outputs
    always come back; they cost nothing extra).

    Attributes:
      residuals: the residual stream after each attention block and after each MLP block (the latter is
        the layer's output), as [num_layers, B, T, D] arrays.
      attention_layers: layers whose attention probabilities [B, N, T, S] to return (negative indices
        count from the end). Other layers' probabilities are not returned.
    """

    residuals: bool = True
    attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        layers = self.attention_layers
        if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            layers = (int(layers),)
        if not isinstance(layers, (tuple, list, range)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers
        ):
            raise TypeError(f"attention_layers must be an int or a sequence of ints, got {self.attention_layers!r}")
        object.__setattr__(self, "attention_layers", tuple(int(i) for i in layers))
        if not isinstance(self.residuals, bool):
            raise TypeError(f"residuals must be a bool, got {self.residuals!r}")

    def resolve(self, num_layers: int) -> Capture:
        out = []
        for i in self.attention_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(
                    f"attention layer {i} is out of range: this model has layers 0..{num_layers - 1} "
                    f"(negative indices from -{num_layers})"
                )
            out.append(j)
        return Capture(self.residuals, tuple(sorted(set(out))))


class Intermediates(NamedTuple):
    """What happened inside the model for one padded batch (NumPy arrays).

    Token-level arrays are [..., B, T, D]. Padding positions (``attention_mask == 0``) hold no meaningful
    value; with ``mark_padding=True`` (the default) they are NaN, so any statistic that forgets the mask
    shows it. Attention probabilities have NaN rows for padded queries and exact zeros on padded keys.
    """

    input_ids: np.ndarray  # [B, T] int32, right-padded with the pad id
    attention_mask: np.ndarray  # [B, T] int32, 1 on real tokens
    pool_mask: np.ndarray  # [B, T] int32, 1 on the tokens that were pooled
    layer_types: tuple[str, ...]
    embeddings: np.ndarray  # [B, T, D] token embeddings after the sqrt(D) scaling
    after_attention: np.ndarray | None  # [L, B, T, D] residual stream after each attention block
    layer_outputs: np.ndarray | None  # [L, B, T, D] residual after each MLP block = each layer's output
    final_normed: np.ndarray  # [B, T, D] final RMS-normed states (transformers' last_hidden_state)
    pooled: np.ndarray  # [B, D]
    dense_outputs: tuple[np.ndarray, ...]  # each dense layer's output [B, E_i]
    embedding: np.ndarray  # [B, E] the model's output (normalized if the checkpoint normalizes)
    attention_probs: dict[int, np.ndarray]  # layer -> [B, N, T, S] for the captured layers

    def hidden_states(self) -> list[np.ndarray]:
        """The ``num_layers + 1`` states in transformers' ``hidden_states`` convention: embeddings, the
        outputs of layers 0..L-2, and the final-normed states (needs ``Capture(residuals=True)``)."""
        if self.layer_outputs is None:
            raise ValueError("hidden_states() needs the layer outputs: inspect with Capture(residuals=True)")
        return [self.embeddings, *list(self.layer_outputs[:-1]), self.final_normed]


class _Runner:
    """The jitted programs of one model (their compile caches live as long as the model)."""

    def __init__(self, model: EmbeddingGemma) -> None:
        self.config = model.config
        self.dtype = model.dtype
        self.module = model.module
        # Attention probabilities exist as full [T, S] matrices only in the dense sliding-window form; the
        # banded form computes the same per-query softmax on key blocks. Capturing them runs the dense form.
        self.dense_module = EmbeddingGemmaModule(self.config, self.dtype, "dense")
        self.encoder = Encoder(self.config, self.dtype, model.attention_impl)
        self.states = jax.jit(self._states, static_argnames=("all_layers",))
        self.pool_head = jax.jit(self._pool_head, static_argnames=("plan",))
        self.capture = jax.jit(self._capture, static_argnames=("capture",))

    def _states(self, enc_params, ids, mask, *, all_layers: bool) -> tuple[jax.Array, ...]:
        last, hidden = self.encoder.apply({"params": enc_params}, ids, mask, return_hidden_states=all_layers)
        return hidden if all_layers else (last,)

    def _pool_head(self, params, selected, attention_mask, pool_mask, *, plan: _Plan):
        cfg, dt = self.config, self.dtype
        states = []
        for x, norm in zip(selected, plan.norm_layer, strict=True):
            if norm:
                x = RMSNorm(cfg.rms_norm_eps).apply({"params": params["final_norm"]}, x)
            states.append(x)
        if len(states) == 1 and plan.weights == (1.0,):
            combined = states[0]
        else:
            acc = jnp.float32
            combined = sum(jnp.asarray(w, acc) * s.astype(acc) for w, s in zip(plan.weights, states, strict=True))
            combined = combined.astype(dt)
        pooled = pool(combined, pool_mask, plan.mode, attention_mask)
        if pooled.ndim != 2 or pooled.shape[0] != combined.shape[0]:
            raise ValueError(f"pooling must return [batch, features]; got shape {pooled.shape}")
        dense: tuple[jax.Array, ...] = ()
        out = pooled
        if plan.head:
            if pooled.shape[-1] != cfg.hidden_size:
                raise ValueError(
                    f"the pooled vector has width {pooled.shape[-1]} but the dense head expects {cfg.hidden_size}; "
                    "pass head=False in the PoolingSpec to get pooled vectors of another width"
                )
            out, state = DenseHead(cfg.dense_features, dt).apply(
                {"params": params["head"]}, pooled.astype(dt), mutable=["intermediates"]
            )
            dense = tuple(state["intermediates"].get("dense_outputs", ()))
        if plan.normalize:
            out = l2_normalize(out)
        return pooled, dense, out

    def _capture(self, params, ids, mask, pool_mask, *, capture: Capture) -> dict[str, Any]:
        module = self.dense_module if capture.attention_layers else self.module
        out, state = module.apply({"params": params}, ids, mask, pool_mask, mutable=["intermediates"])
        inter = state["intermediates"]
        enc = inter["encoder"]
        n = self.config.num_layers
        result: dict[str, Any] = {
            "embeddings": enc["embeddings"][0],
            "final_normed": out.last_hidden_state,
            "pooled": out.pooled,
            "dense_outputs": tuple(inter["head"]["dense_outputs"]),
            "embedding": out.embeddings,
        }
        if capture.residuals:
            result["after_attention"] = jnp.stack([enc[f"layer_{i}"]["after_attention"][0] for i in range(n)])
            result["layer_outputs"] = jnp.stack(enc["layer_outputs"])
        probs = {}
        for i in capture.attention_layers:
            try:
                probs[i] = enc[f"layer_{i}"]["attn"]["attention_probs"][0]
            except KeyError as e:
                raise RuntimeError(
                    f"layer {i}'s attention did not record its probabilities (no 'attention_probs' sow in "
                    "model.Attention); attention capture needs it"
                ) from e
        result["attention_probs"] = probs
        return result


def runner(model: EmbeddingGemma) -> _Runner:
    """The model's research programs, created on first use and kept on the model."""
    r = model.__dict__.get("_research_runner")
    if r is None:
        r = _Runner(model)
        model.__dict__["_research_runner"] = r
    return r


# ---------------------------------------------------------------------------------------------------
# Texts -> prompts -> batches


def _texts_and_prompts(
    model: EmbeddingGemma,
    sentences: str | Sequence[str],
    prompt_name: str | None,
    prompt: str | None,
    prompts_per_text: Sequence[str] | None,
) -> tuple[bool, list[str], list[str]]:
    single = isinstance(sentences, str)
    texts = [sentences] if single else sentences
    check_texts(texts)
    texts = list(texts)
    if prompts_per_text is None:
        p = resolve_prompt(model.prompts, prompt_name, prompt, model.default_prompt_name) or ""
        prompts = [p] * len(texts)
    else:
        prompts = list(prompts_per_text)
        if len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts; pass one prompt per text")
    return single, texts, prompts


def _prompt_lengths(model: EmbeddingGemma, prompts: Sequence[str]) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(prompts), dtype=np.int64)
    for i, p in enumerate(prompts):
        if p not in cache:
            cache[p] = prompt_length(model.tokenizer, p)
        out[i] = cache[p]
    return out


def _batches(
    model: EmbeddingGemma,
    full: Sequence[str],
    batch_size: int,
    show_progress_bar: bool | None,
    token_budget: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(input indices, padded batch) with the same length buckets and row counts as ``encode``."""
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(full), desc="encode", unit="text")
    try:
        for idx, batch in model.padded_batches(full, batch_size, token_budget):
            yield idx, batch
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()


def _encoder_params(model: EmbeddingGemma) -> Any:
    return model.params["encoder"]


def _pool_params(model: EmbeddingGemma) -> dict[str, Any]:
    return {"final_norm": model.params["encoder"]["final_norm"], "head": model.params["head"]}


def embed_variants(
    model: EmbeddingGemma,
    sentences: str | Sequence[str],
    variants: Mapping[str, PoolingLike],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    prompts_per_text: Sequence[str] | None = None,
    batch_size: int = 32,
    truncate_dim: int | None = None,
    normalize_embeddings: bool = False,
    show_progress_bar: bool | None = None,
    token_budget: int | None = None,
) -> dict[str, np.ndarray]:
    """Embeds texts under several pooling variants with one encoder pass per batch.

    Args:
      model: the loaded model.
      sentences: a str or a sequence of str.
      variants: name -> a :class:`PoolingSpec`, a mode name, a tuple of mode names or a function
        ``fn(states [B, T, D], mask [B, T]) -> [B, D']``.
      prompt_name, prompt, prompts_per_text: as :meth:`EmbeddingGemma.encode`.
      batch_size: texts per encoder call.
      truncate_dim: keep the first dimensions of every variant's output.
      normalize_embeddings: L2-normalize after truncation.
      show_progress_bar: show a progress bar.
      token_budget: pack batches by padded tokens, as :meth:`EmbeddingGemma.encode`.

    Returns:
      name -> float32 array [N, width] ([width] for a single str), in input order.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants must be a non-empty mapping name -> pooling (spec, mode name or function)")
    check_batching(batch_size, token_budget)
    if truncate_dim is not None and (
        isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)) or truncate_dim < 1
    ):
        raise ValueError(f"truncate_dim must be a positive int, got {truncate_dim!r}")
    cfg = model.config
    specs = {
        name: as_pooling_spec(v, default_mode=cfg.pooling_mode, default_include_prompt=cfg.include_prompt)
        for name, v in variants.items()
    }
    plans = {name: resolve_spec(s, cfg.num_layers, cfg.normalize) for name, s in specs.items()}
    single, texts, prompts = _texts_and_prompts(model, sentences, prompt_name, prompt, prompts_per_text)
    full = [p + t for p, t in zip(prompts, texts, strict=True)]
    lengths = _prompt_lengths(model, prompts) if any(not s.include_prompt for s in specs.values()) else None
    all_layers = any(p.layers != (cfg.num_layers,) for p in plans.values())

    r = runner(model)
    enc_params, pool_params = _encoder_params(model), _pool_params(model)
    out: dict[str, np.ndarray] = {}
    for idx, batch in _batches(model, full, batch_size, show_progress_bar, token_budget):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        model.check_ids(ids, mask)
        states = r.states(enc_params, jnp.asarray(ids), jnp.asarray(mask), all_layers=all_layers)
        with_prompt = jnp.asarray(mask)
        without_prompt = None
        if lengths is not None:
            pl = np.zeros(len(ids), dtype=np.int64)
            pl[: len(idx)] = lengths[idx]
            without_prompt = jnp.asarray(exclude_prompt(mask, pl))
        for name, plan in plans.items():
            selected = tuple(states[i] if all_layers else states[0] for i in plan.layers)
            pm = with_prompt if specs[name].include_prompt else without_prompt
            _, _, emb = r.pool_head(pool_params, selected, with_prompt, pm, plan=plan)
            emb = np.asarray(emb[: len(idx)], dtype=np.float32)
            if name not in out:
                width = emb.shape[1]
                if truncate_dim is not None and truncate_dim > width:
                    raise ValueError(f"truncate_dim={truncate_dim} exceeds variant {name!r}'s width {width}")
                out[name] = np.empty((len(full), truncate_dim or width), dtype=np.float32)
            out[name][idx] = emb[:, : out[name].shape[1]]
    for name, arr in out.items():
        if normalize_embeddings:
            arr /= np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        out[name] = arr[0] if single else arr
    return out


def pool_mask_for(model: EmbeddingGemma, attention_mask: np.ndarray, prompts: Sequence[str], include_prompt: bool):
    """The pool mask of a padded batch whose rows start with ``prompts``."""
    if include_prompt:
        return np.asarray(attention_mask)
    return exclude_prompt(attention_mask, _prompt_lengths(model, prompts))


def inspect(
    model: EmbeddingGemma,
    sentences: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    titles: Sequence[str | None] | None = None,
    capture: Capture | None = None,
    mark_padding: bool = True,
) -> Intermediates:
    """Runs the reference pipeline on one batch (padded to its longest text) and returns intermediates.

    Args:
      model: the loaded model.
      sentences: a str or a sequence of str (one batch: keep it small, every layer's states come back).
      prompt_name, prompt: as :meth:`EmbeddingGemma.encode`.
      titles: document titles (``title: {title} | text: `` prompts), instead of prompt/prompt_name.
      capture: what to return besides the always-returned arrays; default ``Capture()``.
      mark_padding: fill padding positions of token-level arrays with NaN.
    """
    capture = (capture or Capture()).resolve(model.config.num_layers)
    if titles is not None:
        if prompt_name is not None or prompt is not None:
            raise ValueError("pass either titles or prompt/prompt_name, not both")
        n = 1 if isinstance(sentences, str) else len(sentences)
        per_text = title_prompts(titles, n)
    else:
        per_text = None
    _, texts, prompts = _texts_and_prompts(model, sentences, prompt_name, prompt, per_text)
    if not texts:
        raise ValueError("no texts to inspect")
    batch = model.tokenizer([p + t for p, t in zip(prompts, texts, strict=True)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.check_ids(ids, mask)
    pmask = pool_mask_for(model, mask, prompts, model.config.include_prompt)
    if model.config.pooling_mode != "mean":
        raise ValueError(
            f"inspect() runs the reference pipeline (mean pooling); this checkpoint pools with "
            f"{model.config.pooling_mode!r}"
        )
    res = runner(model).capture(model.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pmask), capture=capture)
    res = jax.tree_util.tree_map(lambda x: np.asarray(x.astype(jnp.float32)), res)

    pad = mask == 0

    def mark(x: np.ndarray | None) -> np.ndarray | None:
        if x is None or not mark_padding:
            return x
        x = x.copy()
        x[..., pad, :] = np.nan
        return x

    probs = {}
    for i, p in res["attention_probs"].items():
        if mark_padding:
            p = p.copy()
            p[np.broadcast_to(pad[:, None, :, None], p.shape)] = np.nan
        probs[int(i)] = p
    return Intermediates(
        input_ids=ids,
        attention_mask=mask,
        pool_mask=np.asarray(pmask, dtype=np.int32),
        layer_types=tuple(model.config.layer_types),
        embeddings=mark(res["embeddings"]),
        after_attention=mark(res.get("after_attention")),
        layer_outputs=mark(res.get("layer_outputs")),
        final_normed=mark(res["final_normed"]),
        pooled=res["pooled"],
        dense_outputs=tuple(res["dense_outputs"]),
        embedding=res["embedding"],
        attention_probs=probs,
    )
