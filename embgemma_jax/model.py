"""The EmbeddingGemma encoder and embedding head as Flax modules.

Axis letters used in shapes and einsum strings:
  B batch, T tokens (queries), S tokens (keys), N query heads, K key/value heads, G query heads per kv
  head (N = K * G), H head dim, D model dim, F feed-forward dim, E dense-head width, V vocabulary.

Numerics follow the float32 reference (transformers Gemma 3 + sentence-transformers) operation by
operation. Deviations, all deliberate:
  * Masked attention scores are replaced by the dtype's finite minimum (``where``, not an added -inf),
    so a padded query row whose window holds no real key gives finite values instead of NaN. Such rows
    are never pooled, so this changes no embedding.
  * GQA is computed without copying K/V per query head (einsum over a [K, G] split of the heads); the
    arithmetic per score is the same.
  * Out-of-range ids gather NaN (``mode="fill"``) rather than a clamped row, so a bad id that slips past
    the host-side check poisons the output instead of producing a plausible vector.
  * In float32 every matmul runs at ``Precision.HIGHEST`` (no TF32 / bf16 passes on GPU/TPU).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax.config import SLIDING, EmbeddingGemmaConfig
from embgemma_jax.masks import (
    BandedMask,
    QueryChunks,
    attention_mask,
    banded_mask,
    global_query_chunk,
    segment_mask,
    use_banded,
)
from embgemma_jax.pooling import l2_normalize, mean_pool, segment_mean_pool

SUPPORTED_DTYPES = ("float32", "bfloat16")
# Sliding-layer attention: "dense" masks a full [T, T] score matrix, "banded" computes query blocks against
# their key window only (cost T * 3r), "auto" picks banded once it does less work (masks.use_banded).
ATTENTION_IMPLS = ("auto", "dense", "banded")


def check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {list(ATTENTION_IMPLS)}")
    return impl


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Maps a user dtype to a supported compute dtype, refusing float16 with the reason."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name in ("float16", "half"):
        raise ValueError(
            "float16 is not supported: EmbeddingGemma's residual stream reaches ~1e5 in late layers, beyond "
            "float16's range (max 65504), so activations overflow to inf. Use 'float32' (exact parity) or "
            "'bfloat16' (fast, same range as float32)."
        )
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(SUPPORTED_DTYPES)}")
    return jnp.dtype(name)


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


class EncoderOutput(NamedTuple):
    """What the encoder returns. Optional fields are None unless asked for."""

    embeddings: jax.Array  # [B, E] after the dense head and (if configured) L2 normalization
    last_hidden_state: jax.Array  # [B, T, D] final-normed token states (padding rows are garbage)
    pooled: jax.Array  # [B, D] masked pool of last_hidden_state
    hidden_states: tuple[jax.Array, ...] | None = None  # num_layers + 1 arrays [B, T, D], as transformers


class RMSNorm(nn.Module):
    """Gemma RMS norm: x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32, cast back."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = from_bits(self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [T, H] (positions [T]) or [B, T, H] (positions [B, T], packed rows) in the rotate-half
    layout (dim k pairs with k + H/2), as transformers."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, *, H]; cos/sin [T, H] or [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    lead = (1, cos.shape[0]) if cos.ndim == 2 else cos.shape[:2]
    shape = lead + (1,) * (x.ndim - 3) + (cos.shape[-1],)
    return x * cos.reshape(shape) + rotated * sin.reshape(shape)


def from_bits(x: jax.Array) -> jax.Array:
    """A bfloat16 parameter passed as its uint16 bit pattern back to bfloat16; any other parameter as it is.

    On the CPU backend the engine passes a bfloat16 model's parameters to its programs as uint16 views of
    the same memory (:meth:`embgemma_jax.engine.Engine.split_table`): XLA's CPU backend upcasts a bfloat16
    array that a ``scan`` slices per step, so every call converted all the stacked layer weights to float32
    and each step's slice back (55% of the op time of an 8 x 24 batch, benchmarks/cpu_profile.md), while
    integer slices are taken as they are."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def dot(eq: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype, scale: jax.Array | None = None) -> jax.Array:
    """einsum with float32 accumulation, result in ``dtype``.

    float32: Precision.HIGHEST (no TF32 / bf16 passes on GPU/TPU). bfloat16: bf16 inputs with float32
    accumulation, rounded to bf16 like torch's bf16 matmul (and 2x faster than bf16 accumulation on CPU).
    ``scale`` (int8 weights) multiplies the float32 result per output channel before the cast.
    """
    out = jnp.einsum(eq, a, b, precision=matmul_precision(dtype), preferred_element_type=jnp.float32)
    if scale is not None:
        out = out * scale
    return out.astype(dtype)


def weight(
    module: nn.Module, name: str, shape: tuple[int, ...], dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array | None]:
    """A matrix parameter in the compute dtype, plus its per-output-channel scale when it is stored as int8.

    int8 weights (see ``quant.py``) come with a float32 ``{name}_scale`` parameter of the output dims'
    shape; int8 -> float is exact, and the scale is applied to the float32 matmul result.
    """
    w = from_bits(module.param(name, nn.initializers.lecun_normal(), shape, jnp.float32))
    scale = module.get_variable("params", name + "_scale") if module.has_variable("params", name + "_scale") else None
    return w.astype(dtype), scale


AttentionMask = jax.Array | BandedMask | QueryChunks


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32, hidden keys set to the dtype's finite minimum (a row with no
    visible key stays finite), cast back to the scores' dtype."""
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)


class Attention(nn.Module):
    """Grouped-query attention: N query heads share K kv heads (computed once per kv head, never copied)."""

    config: EmbeddingGemmaConfig
    layer_type: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, T, D]; mask [B, T, S] bool (True = visible), a BandedMask (sliding layers, long T) or
        QueryChunks (full layers, long T, CPU)."""
        cfg, dt = self.config, self.dtype
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = n // k
        w_q, s_q = weight(self, "q", (d, n, h), dt)
        w_k, s_k = weight(self, "k", (d, k, h), dt)
        w_v, s_v = weight(self, "v", (d, k, h), dt)
        w_o, s_o = weight(self, "o", (n, h, d), dt)

        q = dot("BTD,DNH->BTNH", x, w_q, dt, s_q)
        key = dot("BSD,DKH->BSKH", x, w_k, dt, s_k)
        v = dot("BSD,DKH->BSKH", x, w_v, dt, s_v)
        q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
        key = RMSNorm(cfg.rms_norm_eps, name="k_norm")(key)
        q = apply_rope(q, cos, sin)
        key = apply_rope(key, cos, sin)

        b, t = q.shape[:2]
        q = q.reshape(b, t, k, g, h)
        scale = jnp.asarray(cfg.query_pre_attn_scalar**-0.5, dt)
        capturing = self.is_mutable_collection("intermediates")
        if isinstance(mask, QueryChunks) and capturing:  # captures record whole probability matrices
            mask = mask.visible
        if isinstance(mask, BandedMask):
            out = self._banded(q, key, v, mask, scale)
        elif isinstance(mask, QueryChunks):
            out = self._query_chunks(q, key, v, mask, scale)
        else:
            probs, out = self._whole(q, key, v, mask, scale)
            if capturing:
                self.sow("intermediates", "attention_probs", probs.transpose(0, 1, 3, 2, 4).reshape(b, n, t, -1))
        return dot("BTNH,NHD->BTD", out.reshape(b, t, n, h), w_o, dt, s_o)

    def _whole(
        self, q: jax.Array, key: jax.Array, v: jax.Array, visible: jax.Array, scale: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Attention of queries q [B, T, K, G, H] over every key, visible [B, T, S]: (probabilities
        [B, K, T, G, S], output [B, T, K, G, H]). Scores in [B, K, T, G, S], the order dot_general produces
        from q (batch B, K; free T, G and S), so neither q nor the scores are transposed (K = 1 here: moving
        it is free)."""
        probs = masked_softmax(dot("BTKGH,BSKH->BKTGS", q, key, self.dtype) * scale, visible[:, None, :, None, :])
        return probs, dot("BKTGS,BSKH->BTKGH", probs, v, self.dtype)

    def _query_chunks(
        self, q: jax.Array, key: jax.Array, v: jax.Array, mask: QueryChunks, scale: jax.Array
    ) -> jax.Array:
        """:meth:`_whole` one chunk of queries at a time (see masks.QueryChunks). Returns [B, T, K, G, H]."""
        b, t, k, g, h = q.shape
        n = t // mask.chunk
        q_chunks = q.reshape(b, n, mask.chunk, k, g, h).swapaxes(0, 1)  # [n, B, C, K, G, H]
        vis_chunks = mask.visible.reshape(b, n, mask.chunk, -1).swapaxes(0, 1)  # [n, B, C, S]
        out = jax.lax.map(lambda c: self._whole(c[0], key, v, c[1], scale)[1], (q_chunks, vis_chunks))
        return out.swapaxes(0, 1).reshape(b, t, k, g, h)

    def _banded(self, q: jax.Array, key: jax.Array, v: jax.Array, mask: BandedMask, scale: jax.Array) -> jax.Array:
        """Sliding-window attention on query blocks: cost T * (C + 2r) instead of T^2 (see masks.BandedMask).

        Returns [B, T, K, G, H]. Per query, the visible keys, scores and softmax are those of the dense form.
        """
        dt = self.dtype
        b, t, k, g, h = q.shape
        c, r, nb = mask.block, mask.radius, mask.key_index.shape[0]
        pad = ((0, 0), (r, mask.pad_right + r), (0, 0), (0, 0))
        k_win = jnp.pad(key, pad)[:, mask.key_index]  # [B, nb, W, K, H]
        v_win = jnp.pad(v, pad)[:, mask.key_index]
        q_blk = jnp.pad(q, ((0, 0), (0, mask.pad_right), (0, 0), (0, 0), (0, 0))).reshape(b, nb, c, k, g, h)
        vis = mask.visible[:, :, None, :, None, :]  # [B, nb, 1, C, 1, W]
        probs = masked_softmax(dot("BnCKGH,BnWKH->BnKCGW", q_blk, k_win, dt) * scale, vis)
        out = dot("BnKCGW,BnWKH->BnCKGH", probs, v_win, dt)
        return out.reshape(b, nb * c, k, g, h)[:, :t]


class MLP(nn.Module):
    config: EmbeddingGemmaConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        d, f = cfg.hidden_size, cfg.intermediate_size
        w_gate, s_gate = weight(self, "gate", (d, f), dt)
        w_up, s_up = weight(self, "up", (d, f), dt)
        w_down, s_down = weight(self, "down", (f, d), dt)
        gate = jax.nn.gelu(dot("BTD,DF->BTF", x, w_gate, dt, s_gate), approximate=True)
        up = dot("BTD,DF->BTF", x, w_up, dt, s_up)
        return dot("BTF,FD->BTD", gate * up, w_down, dt, s_down)


class Block(nn.Module):
    config: EmbeddingGemmaConfig
    layer_type: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, name="input_norm")(x)
        h = Attention(self.config, self.layer_type, self.dtype, name="attn")(h, mask, cos, sin)
        x = x + RMSNorm(eps, name="post_attn_norm")(h)
        self.sow("intermediates", "after_attention", x)
        h = RMSNorm(eps, name="pre_ffw_norm")(x)
        h = MLP(self.config, self.dtype, name="mlp")(h)
        x = x + RMSNorm(eps, name="post_ffw_norm")(h)
        return x


def layer_period(config: EmbeddingGemmaConfig) -> int:
    """The length of the repeating group of layer types: 6 for EmbeddingGemma (5 sliding + 1 full, 4 times);
    ``num_layers`` (one group) when the types do not repeat a whole number of times."""
    types, n = config.layer_types, config.num_layers
    return next(p for p in range(1, n + 1) if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))


def _kind(layer_type: str) -> str:
    return "sliding" if layer_type == SLIDING else "full"


class LayerGroup(nn.Module):
    """One repeating group of layers (``layer_types`` in order), the body of the encoder's scan."""

    config: EmbeddingGemmaConfig
    layer_types: tuple[str, ...]
    dtype: jnp.dtype
    attention_impl: str
    return_hidden_states: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, packing: Packing | None) -> tuple[jax.Array, jax.Array | None]:
        masks, ropes = _masks_and_ropes(self.config, valid, self.dtype, self.attention_impl, packing)
        outs = []
        for j, layer_type in enumerate(self.layer_types):
            kind = _kind(layer_type)
            x = Block(self.config, layer_type, self.dtype, name=f"layer_{j}")(x, masks[kind], *ropes[kind])
            outs.append(x)
        return x, (jnp.stack(outs) if self.return_hidden_states else None)


class Packing(NamedTuple):
    """Several texts per row: ``segments`` [B, T] (1, 2, ... per text, 0 on padding) and each token's
    position inside its own text ``positions`` [B, T]."""

    segments: jax.Array
    positions: jax.Array


def sliding_is_banded(cfg: EmbeddingGemmaConfig, attention_impl: str, t: int) -> bool:
    """Whether rows of ``t`` tokens get the banded sliding-window layout (``"auto"``: where it does less work,
    see masks.use_banded) rather than a plain [B, T, S] mask."""
    return attention_impl == "banded" or (attention_impl == "auto" and use_banded(t, cfg.window_radius))


def _masks_and_ropes(
    cfg: EmbeddingGemmaConfig, valid: jax.Array, dt: jnp.dtype, attention_impl: str, packing: Packing | None = None
) -> tuple[dict[str, AttentionMask], dict[str, tuple[jax.Array, jax.Array]]]:
    t = valid.shape[1]
    radius = cfg.window_radius
    banded = sliding_is_banded(cfg, attention_impl, t)
    if packing is None:
        positions = jnp.arange(t)
        masks: dict[str, AttentionMask] = {
            "full": attention_mask(valid, None),
            "sliding": banded_mask(valid, radius) if banded else attention_mask(valid, radius),
        }
    else:
        positions, seg = packing.positions, packing.segments
        masks = {
            "full": segment_mask(seg, None),
            "sliding": banded_mask(valid, radius, segments=seg) if banded else segment_mask(seg, radius),
        }
    chunk = global_query_chunk(t)
    if chunk is not None:
        masks["full"] = QueryChunks(masks["full"], chunk)
    ropes = {
        "full": rope_tables(positions, cfg.head_dim, cfg.rope_global_base, dt),
        "sliding": rope_tables(positions, cfg.head_dim, cfg.rope_local_base, dt),
    }
    return masks, ropes


def embed_tokens(
    cfg: EmbeddingGemmaConfig,
    dt: jnp.dtype,
    input_ids: jax.Array,
    table: jax.Array | None,
    row_scale: jax.Array | None = None,
    embedded: jax.Array | None = None,
) -> jax.Array:
    """The encoder's input [B, T, D]: the table's rows for ``input_ids``, scaled by sqrt(hidden size).

    ``embedded``: the rows already gathered by the caller (the engine does so on the host from a
    memory-mapped table), in the table's stored dtype; ``table`` is then unused. An int8 table comes with a
    float32 ``row_scale`` per row. Out-of-range ids gather NaN (``mode="fill"``) instead of a clamped row
    (see the module doc)."""
    if embedded is not None:
        x = embedded.astype(dt)  # the table's rows in its stored dtype: the same cast as below
    elif row_scale is not None:  # int8 rows with a float32 scale per row
        rows = jnp.take(table, input_ids, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        x = (rows * jnp.take(row_scale, input_ids, mode="fill", fill_value=jnp.nan)[..., None]).astype(dt)
    else:
        x = jnp.take(from_bits(table), input_ids, axis=0, mode="fill", fill_value=jnp.nan).astype(dt)
    return x * jnp.asarray(cfg.embed_scale, jnp.float32).astype(dt)


class Encoder(nn.Module):
    """Token ids [B, T] and mask [B, T] -> final-normed token states [B, T, D] (and per-layer states).

    With ``scan_layers`` the layers run as a ``scan`` over the repeating group of layer types (see
    :func:`layer_period`), so a new input shape compiles one group instead of every layer; the
    parameters are then stacked per position in the group (``groups/layer_j`` with a leading group axis,
    see :func:`stack_layers`). Unrolled (``layer_i``, the checkpoint's layout) otherwise: the research
    captures use it, since they record every layer's intermediates.
    """

    config: EmbeddingGemmaConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask_2d: jax.Array,
        *,
        return_hidden_states: bool = False,
        packing: Packing | None = None,
        embedded: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
        """``embedded``: the embedding table's rows for ``input_ids`` [B, T, D], gathered by the caller (the
        engine does so on the host from a memory-mapped table); the parameters then hold no table."""
        cfg, dt = self.config, self.dtype
        table = row_scale = None
        if embedded is None:
            table = self.param("embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
            if self.has_variable("params", "embedding_scale"):
                row_scale = self.get_variable("params", "embedding_scale")
        x = embed_tokens(cfg, dt, input_ids, table, row_scale, embedded)
        self.sow("intermediates", "embeddings", x)

        valid = attention_mask_2d.astype(bool)
        states = [x] if return_hidden_states else None
        if not self.scan_layers:
            masks, ropes = _masks_and_ropes(cfg, valid, dt, self.attention_impl, packing)
            for i, layer_type in enumerate(cfg.layer_types):
                kind = _kind(layer_type)
                x = Block(cfg, layer_type, dt, name=f"layer_{i}")(x, masks[kind], *ropes[kind])
                self.sow("intermediates", "layer_outputs", x)
                if states is not None:
                    states.append(x)
        else:
            period = layer_period(cfg)
            groups = nn.scan(
                LayerGroup,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_layers // period,
            )
            group = groups(
                cfg, tuple(cfg.layer_types[:period]), dt, self.attention_impl, return_hidden_states, name="groups"
            )
            x, outs = group(x, valid, packing)
            if states is not None:  # outs [G, P, B, T, D]: layer g * P + j
                states.extend(outs.reshape((-1, *outs.shape[2:])))
        x = RMSNorm(cfg.rms_norm_eps, name="final_norm")(x)
        if states is not None:
            states[-1] = x  # transformers' last hidden state is the final-normed one
        return x, (tuple(states) if states is not None else None)


def stack_layers(params: dict[str, Any], config: EmbeddingGemmaConfig) -> dict[str, Any]:
    """The checkpoint layout (``encoder/layer_i``) -> the scanned layout (``encoder/groups/layer_j`` with a
    leading group axis: entry g of ``layer_j`` is layer ``g * period + j``). Leaves are stacked with
    ``jnp.stack`` (NumPy leaves with ``np.stack``)."""
    period = layer_period(config)
    enc = params["encoder"]
    if "groups" in enc:
        return params
    enc = dict(enc)
    layers = [enc.pop(f"layer_{i}") for i in range(config.num_layers)]

    def stack(*xs: Any) -> Any:
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    enc["groups"] = {f"layer_{j}": jax.tree_util.tree_map(stack, *layers[j::period]) for j in range(period)}
    return {**params, "encoder": enc}


def layer_number(key: str) -> int | None:
    """i for an ``encoder/layer_i`` entry of the per-layer layout; None for any other encoder entry."""
    return int(key[6:]) if key.startswith("layer_") and key[6:].isdigit() else None


def stacked_slot(path: tuple[str, ...], config: EmbeddingGemmaConfig) -> tuple[tuple[str, ...], int] | None:
    """Where the per-layer parameter ``encoder/layer_i/...`` lives in the layout of :func:`stack_layers`:
    (its stacked path, its index along the group axis); None for a parameter outside the layers."""
    i = layer_number(path[1]) if len(path) > 2 and path[0] == "encoder" else None
    if i is None:
        return None
    g, j = divmod(i, layer_period(config))
    return ("encoder", "groups", f"layer_{j}", *path[2:]), g


def unstack_layers(params: dict[str, Any], config: EmbeddingGemmaConfig) -> dict[str, Any]:
    """The inverse of :func:`stack_layers`: per-layer ``encoder/layer_i`` entries (slices of the stacks)."""
    enc = params["encoder"]
    if "groups" not in enc:
        return params
    enc = dict(enc)
    groups = enc.pop("groups")
    period = len(groups)
    for i in range(config.num_layers):
        enc[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, g=i // period: x[g], groups[f"layer_{i % period}"])
    return {**params, "encoder": enc}


class DenseHead(nn.Module):
    """Pooled [B, D] -> [B, E]: the sentence-transformers Dense modules (no bias, identity activation)."""

    features: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        y = pooled
        for i, width in enumerate(self.features):
            w, scale = weight(self, f"dense_{i}", (y.shape[-1], width), self.dtype)
            y = dot("BD,DE->BE", y, w, self.dtype, scale)
            self.sow("intermediates", "dense_outputs", y)
        return y


class EmbeddingGemmaModule(nn.Module):
    """The reference pipeline: ids -> encoder -> masked mean pool -> dense head -> L2 normalize (if the
    config normalizes).

    It always pools with the mean (``pooling.mean_pool``, float32 sums as the reference), whatever
    ``config.pooling_mode`` says: the engine runs other modes, layers and prompt handling as pooling
    variants over the encoder's states. ``pool_mask`` is the mask used for pooling (it differs from
    ``attention_mask`` only when prompt tokens are excluded from the pool); it defaults to ``attention_mask``.
    """

    config: EmbeddingGemmaConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    scan_layers: bool = False

    def setup(self) -> None:
        check_attention_impl(self.attention_impl)
        self.encoder = Encoder(self.config, self.dtype, self.attention_impl, self.scan_layers)
        self.head = DenseHead(self.config.dense_features, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask_2d: jax.Array,
        pool_mask: jax.Array | None = None,
        *,
        return_hidden_states: bool = False,
        embedded: jax.Array | None = None,
    ) -> EncoderOutput:
        states, hidden = self.encoder(
            input_ids, attention_mask_2d, return_hidden_states=return_hidden_states, embedded=embedded
        )
        return self.from_states(states, attention_mask_2d if pool_mask is None else pool_mask, hidden)

    def packed(
        self, input_ids: jax.Array, packing: Packing, num_segments: int, embedded: jax.Array | None = None
    ) -> EncoderOutput:
        """Packed rows (:class:`Packing`): the reference pipeline per text. Returns embeddings and pooled
        vectors [B * num_segments, .] (row b, text s at b * num_segments + s - 1; unused slots are zeros
        through the head), and the token states [B, T, D]."""
        states, _ = self.encoder(input_ids, packing.segments > 0, packing=packing, embedded=embedded)
        return self.from_packed_states(states, packing.segments, num_segments)

    def from_states(
        self, states: jax.Array, pool_mask: jax.Array, hidden: tuple[jax.Array, ...] | None = None
    ) -> EncoderOutput:
        """The pipeline after the encoder: final-normed states [B, T, D] -> mean pool -> dense head -> L2
        normalize. Uses the head's parameters only (the engine's per-layer programs call it on their own)."""
        pooled = mean_pool(states, pool_mask)
        return self._head(pooled, states, hidden)

    def from_packed_states(self, states: jax.Array, segments: jax.Array, num_segments: int) -> EncoderOutput:
        """:meth:`from_states` for packed rows: one mean per text (see :meth:`packed`)."""
        pooled = segment_mean_pool(states, segments, num_segments)
        return self._head(pooled.reshape(-1, pooled.shape[-1]), states, None)

    def _head(self, pooled: jax.Array, states: jax.Array, hidden: tuple[jax.Array, ...] | None) -> EncoderOutput:
        self.sow("intermediates", "pooled", pooled)
        emb = self.head(pooled)
        if self.config.normalize:
            emb = l2_normalize(emb)
        return EncoderOutput(embeddings=emb, last_hidden_state=states, pooled=pooled, hidden_states=hidden)


def init_params(config: EmbeddingGemmaConfig, seed: int = 0) -> dict[str, Any]:
    """Random parameters with the right tree structure and shapes (for tests and shape checks)."""
    module = EmbeddingGemmaModule(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    return module.init(jax.random.PRNGKey(seed), ids, jnp.ones((1, 4), jnp.int32))["params"]


def param_shapes(config: EmbeddingGemmaConfig) -> dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config))
