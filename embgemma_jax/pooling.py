"""Pooling: token states [B, T, D] and a mask [B, T] -> one vector per text [B, D].

Every registered mode reproduces sentence-transformers' ``Pooling`` module (``_forward_padded``) operation
by operation, including its edge cases, so an EmbeddingGemma configured with another pooling mode gives
the vectors sentence-transformers would give:

  * ``mean``: sum(states * m) / max(sum(m), 1e-9) (the EmbeddingGemma reference).
  * ``mean_sqrt_len_tokens``: sum(states * m) / sqrt(max(sum(m), 1e-9)).
  * ``weightedmean``: token at position t weighs t + 1 - (index of the row's first real token); tokens
    outside the pool mask weigh 0, so excluding a prompt keeps the remaining tokens' original weights.
  * ``cls``: the first token of the pool mask (BOS with the prompt included, else the first text token).
  * ``lasttoken``: the last token of the pool mask (EOS for EmbeddingGemma).
  * ``max``: element-wise max over the pool mask.

Rows with an empty pool mask (a prompt that fills the whole truncated sequence) behave as in the
reference: mean variants give 0, ``max`` gives -inf, ``cls`` picks position 0, ``lasttoken`` gives 0.

Sums run in float32 when the states are bfloat16 and the result is cast back, as the reference does.

``include_prompt=False`` masks the prompt's tokens out of the pool. The prompt length is measured the
way sentence-transformers measures it (:func:`prompt_length`): the prompt is tokenized alone, with BOS,
and a trailing special token (EOS) is not counted; the first ``prompt_length`` positions of each row
are then dropped from the pool (BOS included).

Pooling can also read any layer, or a weighted combination of layers, of the encoder's hidden states
(:class:`PoolingSpec`), and accepts a user-defined function ``fn(states [B, T, D], mask [B, T]) -> [B, D']``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PoolFn = Callable[[jax.Array, jax.Array], jax.Array]
"""A user pooling function: states [B, T, D] (float) and pool mask [B, T] (int32, 1 = pool) -> [B, D']."""


def _accumulation_dtype(dtype: Any) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) else jnp.dtype(dtype)


def _masked_sum(states: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    acc = _accumulation_dtype(states.dtype)
    m = mask[..., None] > 0
    total = jnp.sum(jnp.where(m, states.astype(acc), 0), axis=1)
    count = jnp.sum(m.astype(acc), axis=1)
    return total, count


def mean_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Masked mean over tokens: sum(states * m) / max(sum(m), 1e-9)."""
    total, count = _masked_sum(states, mask)
    return (total / jnp.maximum(count, 1e-9)).astype(states.dtype)


def segment_mean_pool(states: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """Masked mean per text of packed rows: states [B, T, D], segments [B, T] (1..S per text, 0 padding)
    -> [B, S, D]: for each text, sum(states of its tokens) / max(count, 1e-9), summed in float32 as
    :func:`mean_pool` (the one-hot sum runs at full float32 precision)."""
    acc = _accumulation_dtype(states.dtype)
    onehot = (segments[:, None, :] == jnp.arange(1, num_segments + 1)[None, :, None]).astype(acc)  # [B, S, T]
    total = jnp.einsum("BST,BTD->BSD", onehot, states.astype(acc), precision=jax.lax.Precision.HIGHEST)
    count = jnp.sum(onehot, axis=-1)[..., None]
    return (total / jnp.maximum(count, 1e-9)).astype(states.dtype)


def mean_sqrt_len_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Masked sum divided by the square root of the token count."""
    total, count = _masked_sum(states, mask)
    return (total / jnp.sqrt(jnp.maximum(count, 1e-9))).astype(states.dtype)


def weighted_mean_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Position-weighted mean: weight t + 1 - first_real_token(row) inside the mask, 0 outside.

    ``attention_mask`` (the unmasked-prompt mask) fixes where each row's first real token is; it
    defaults to ``mask``. With right padding that index is 0.
    """
    acc = _accumulation_dtype(states.dtype)
    original = mask if attention_mask is None else attention_mask
    first = jnp.argmax(original.astype(jnp.int32), axis=1)  # as torch argmax: first maximal index
    t = states.shape[1]
    weights = jnp.arange(1, t + 1, dtype=acc)[None, :] - first[:, None].astype(acc)
    w = mask.astype(acc) * weights  # [B, T]
    total = jnp.sum(states.astype(acc) * w[..., None], axis=1)
    return (total / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-9)).astype(states.dtype)


def cls_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The first token of the pool mask (position 0 if the mask is empty)."""
    first = jnp.argmax(mask.astype(jnp.int32), axis=1)
    return jnp.take_along_axis(states, first[:, None, None], axis=1)[:, 0]


def last_token_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The last token of the pool mask (a zero vector if the mask is empty)."""
    t = states.shape[1]
    m = mask.astype(jnp.int32)
    last = t - 1 - jnp.argmax(m[:, ::-1], axis=1)
    picked = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
    keep = jnp.take_along_axis(m, last[:, None], axis=1) > 0
    return jnp.where(keep, picked, jnp.zeros_like(picked))


def max_pool(states: jax.Array, mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Element-wise max over the pool mask (-inf if the mask is empty)."""
    return jnp.max(jnp.where(mask[..., None] > 0, states, jnp.asarray(-jnp.inf, states.dtype)), axis=1)


# name -> fn(states [B, T, D], pool_mask [B, T], attention_mask [B, T] | None) -> [B, D]
POOLING_MODES: dict[str, Callable[..., jax.Array]] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "lasttoken": last_token_pool,
    "max": max_pool,
    "mean_sqrt_len_tokens": mean_sqrt_len_pool,
    "weightedmean": weighted_mean_pool,
}


def get_pooling(name: str) -> Callable[..., jax.Array]:
    """The registered pooling function for ``name``; raises ValueError listing the valid names."""
    if not isinstance(name, str) or name not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {name!r}; valid modes: {list(POOLING_MODES)}")
    return POOLING_MODES[name]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (in float32, cast back), as torch.nn.functional.normalize."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, eps)).astype(x.dtype)


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """NumPy rows divided by max(||row||, eps), in place for float32 arrays (returns x)."""
    x = np.asarray(x, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return x


def pool(
    states: jax.Array,
    mask: jax.Array,
    mode: str | Sequence[str] | PoolFn = "mean",
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Pools token states with a named mode, several named modes (concatenated, as sentence-transformers
    does for a tuple of modes), or a user function ``fn(states, mask)``.

    Args:
      states: [B, T, D] token states.
      mask: [B, T] pool mask, nonzero on the tokens to pool (prompt tokens already removed if wanted).
      mode: see :data:`POOLING_MODES`.
      attention_mask: [B, T] mask before prompt removal (used by ``weightedmean``); defaults to ``mask``.
    """
    if callable(mode) and not isinstance(mode, str):
        return mode(states, mask.astype(jnp.int32))
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    outs = [get_pooling(m)(states, mask, attention_mask) for m in modes]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


# ---------------------------------------------------------------------------------------------------
# The full pooling choice: mode, prompt, layers


@dataclasses.dataclass(frozen=True)
class PoolingSpec:
    """How token states become the vector fed to the dense head.

    Layers are indexed like transformers' ``hidden_states`` (``num_layers + 1`` entries): 0 is the scaled
    token embedding, ``L`` (1 <= L < num_layers) is the raw residual stream after layer ``L - 1``, and
    ``num_layers`` (also -1) is the final-normed ``last_hidden_state`` the reference pools. Negative
    indices count from the end.

    Attributes:
      mode: a name from :data:`POOLING_MODES`, a tuple of names (pooled vectors concatenated; use
        ``head=False`` since the dense head expects width D), or a function ``fn(states, mask) -> [B, D']``.
        A function is part of the compile key by identity: define it once, not as a fresh lambda per call.
      include_prompt: False drops the prompt's tokens (and BOS) from the pool, see :func:`prompt_length`.
      layers: None (the reference: final-normed states), one index, or several indices to combine.
      layer_weights: weights of the combination (sum of w_i * states_i); default 1/k each (the mean).
      final_norm: apply the model's final RMS norm to each selected raw layer (every index < num_layers)
        before combining, so that early and late layers (whose raw scale grows to ~1e5) are comparable.
      head: apply the dense head (False returns the pooled vector).
      normalize: L2-normalize the output; None follows the checkpoint (True for EmbeddingGemma).
    """

    mode: str | tuple[str, ...] | PoolFn = "mean"
    include_prompt: bool = True
    layers: int | tuple[int, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    final_norm: bool = False
    head: bool = True
    normalize: bool | None = None

    def __post_init__(self) -> None:
        mode = self.mode
        if isinstance(mode, (list, tuple)):
            if not mode:
                raise ValueError("pooling mode tuple is empty; give at least one mode")
            for m in mode:
                get_pooling(m)
            object.__setattr__(self, "mode", tuple(mode))
        elif isinstance(mode, str):
            get_pooling(mode)
        elif not callable(mode):
            raise TypeError(
                f"pooling mode must be a name, a tuple of names or a function (states, mask) -> [B, D]; got {mode!r}"
            )
        for name in ("include_prompt", "final_norm", "head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {self.normalize!r}")
        layers = self.layers
        if layers is not None:
            if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
                layers = (int(layers),)
            elif isinstance(layers, (range, list, tuple)) and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers
            ):
                layers = tuple(int(i) for i in layers)
                if not layers:
                    raise ValueError("layers is empty; give at least one layer index (or None for the last)")
            else:
                raise TypeError(f"layers must be None, an int or a sequence of ints; got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        if self.layer_weights is not None:
            try:
                weights = tuple(float(w) for w in self.layer_weights)
            except (TypeError, ValueError) as e:
                raise TypeError(f"layer_weights must be a sequence of numbers, got {self.layer_weights!r}") from e
            n = 1 if layers is None else len(layers)
            if len(weights) != n:
                raise ValueError(f"layer_weights has {len(weights)} entries but {n} layer(s) are selected")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"layer_weights must be finite, got {weights}")
            object.__setattr__(self, "layer_weights", weights)

    def resolve_layers(self, num_layers: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Non-negative layer indices in [0, num_layers] and their weights; raises on out-of-range indices."""
        layers = (num_layers,) if self.layers is None else self.layers
        out = []
        for i in layers:
            j = i + num_layers + 1 if i < 0 else i
            if not 0 <= j <= num_layers:
                raise ValueError(
                    f"layer index {i} is out of range: this model has hidden states 0..{num_layers} "
                    f"(0 = embeddings, {num_layers} = final-normed output; negative indices from -{num_layers + 1})"
                )
            out.append(j)
        weights = self.layer_weights or tuple(1.0 / len(out) for _ in out)
        return tuple(out), weights

    def plan(self, num_layers: int, checkpoint_normalize: bool) -> PoolingPlan:
        """This spec resolved against a model: the static description the pooling program compiles for."""
        layers, weights = self.resolve_layers(num_layers)
        return PoolingPlan(
            mode=self.mode,
            include_prompt=self.include_prompt,
            layers=layers,
            weights=weights,
            norm_layer=tuple(self.final_norm and i < num_layers for i in layers),
            head=self.head,
            normalize=self.normalize if self.normalize is not None else (checkpoint_normalize and self.head),
        )


@dataclasses.dataclass(frozen=True)
class PoolingPlan:
    """A :class:`PoolingSpec` resolved against a model (hashable: a static input of the pooling program)."""

    mode: str | tuple[str, ...] | PoolFn
    include_prompt: bool
    layers: tuple[int, ...]  # non-negative hidden-state indices, num_layers = final-normed states
    weights: tuple[float, ...]
    norm_layer: tuple[bool, ...]  # apply the final norm to this selected layer
    head: bool
    normalize: bool


PoolingLike = str | Sequence[str] | PoolFn | PoolingSpec | None


def as_pooling_spec(
    pooling: PoolingLike = None,
    *,
    layers: int | Sequence[int] | None = None,
    include_prompt: bool | None = None,
    default_mode: str = "mean",
    default_include_prompt: bool = True,
) -> PoolingSpec:
    """Builds a :class:`PoolingSpec` from what a caller passed to ``encode``.

    ``pooling`` may be a spec, a mode name, a tuple of names or a function; ``layers`` and
    ``include_prompt`` override the spec's fields when given. Missing values come from the checkpoint.
    """
    if isinstance(pooling, PoolingSpec):
        spec = pooling
    elif pooling is None:
        spec = PoolingSpec(mode=default_mode, include_prompt=default_include_prompt)
    else:
        mode = tuple(pooling) if isinstance(pooling, (list, tuple)) else pooling
        spec = PoolingSpec(mode=mode, include_prompt=default_include_prompt)
    changes: dict[str, Any] = {}
    if layers is not None:
        changes["layers"] = layers
    if include_prompt is not None:
        changes["include_prompt"] = include_prompt
    return dataclasses.replace(spec, **changes) if changes else spec
