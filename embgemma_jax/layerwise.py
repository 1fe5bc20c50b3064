"""The encoder run one layer per program call: the engine's form on the CPU backend with one device.

On the CPU the single scanned program (:class:`~embgemma_jax.model.Encoder` with ``scan_layers``) copies
each group's slice of the stacked weights into a temporary buffer on every scan step: 4 copies of 106 MB
per forward pass in float32, which puts one group's weights into the program's temporary memory (96.9 MiB
for a 16-token query, ``python benchmarks/probe_scan_copy.py``). Here the same
arithmetic runs as a chain of small programs instead:

  * ``prepare``: the embedding rows (gathered on the host or from a device table), scaled, and the
    attention masks and rotary tables of each layer type whose mask is a plain [B, T, S] array (every type
    below 768 tokens: no banded or chunked layout);
  * ``layer_given``: one layer on a mask and rotary tables it is given, for every layer of such a type: a
    sliding and a full layer then differ only in those inputs, so one compiled program serves both;
  * ``layer``: one layer that builds its own masks (``layer_type`` static), for the banded sliding layers
    and the chunked full layers of long rows;
  * a tail: final norm, mean pool, dense head and L2 normalization (``tail``), the packed rows' per-text
    pool (``packed_tail``), or the final norm alone (``final_norm``).

Every layer call gets that layer's weights as device arrays aliasing the stacked weights (NumPy views of the
CPU buffers; bfloat16 ones as bfloat16, not as the uint16 bits the scanned program takes), so nothing is
copied and nothing is held twice. A new input shape compiles one layer program (two for long rows) plus the
small ends, where the scanned program compiles a 6-layer group in one piece
(:meth:`LayerPrograms.compile_jobs`). A lone 16-token query takes 49 ms against 89 ms scanned
(``python benchmarks/probe_scan_copy.py``). Each call allocates its own temporary buffers, which page-fault
when large; the engine runs small batches and long rows this way by default, middle-sized batches scanned
(:meth:`Engine.uses_layers`). In float32 the programs of long rows use XLA's own CPU kernels rather than
YNNPACK's (:func:`xla_kernel_options`). Numbers: the same operations per layer as the scanned and unrolled
forms (tests compare them, and each against sentence-transformers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.masks import BandedMask, QueryChunks
from embgemma_jax.model import (
    Block,
    EmbeddingGemmaModule,
    EncoderOutput,
    Packing,
    RMSNorm,
    _kind,
    _masks_and_ropes,
    embed_tokens,
    layer_period,
    sliding_is_banded,
)


def xla_kernel_options(dtype: Any) -> dict[str, Any]:
    """jit options for the float32 programs of long rows and large batches on the CPU backend: XLA's own dot
    and reduction kernels instead of YNNPACK's "library fusions" (``xla_cpu_experimental_ynn_fusion_type``
    empty). Used by the layer programs that build banded or chunked masks (long rows) and by the engine's
    scanned programs. ``python benchmarks/probe_cpu_kernels.py`` (full-size model, float32): XLA's kernels run
    a layer 1.03x faster at 8 x 128 tokens, 1.1x at 8 x 448, 1.2-1.3x at 8 x 640, 32 x 256 and 4 x 2048, and
    the scanned forward 1.15-1.31x faster from 8 x 448; at 8 x 64 tokens and below they tie or YNNPACK is
    up to 1.05x faster (8 x 32), so the layer programs given their masks (small batches) keep it. In
    bfloat16 YNNPACK is 1.5-1.8x faster at every size. Empty on other backends and dtypes."""
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return {}
    return {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def _aliases(view: jax.Array, source: np.ndarray) -> bool:
    """Whether a device array's buffer lies inside the host memory of ``source``."""
    start = source.__array_interface__["data"][0]
    return start <= view.unsafe_buffer_pointer() < start + max(source.nbytes, 1)


class LayerPrograms:
    """The per-layer programs of one model (see the module doc) and the per-layer views of its weights.

    Args:
      config, dtype, attention_impl: as the engine's.
      module: the engine's :class:`EmbeddingGemmaModule` (its pooling and head methods run in the tails).
    """

    def __init__(self, config: EmbeddingGemmaConfig, dtype: jnp.dtype, attention_impl: str, module: Any):
        self.config, self.dtype, self.attention_impl, self.module = config, dtype, attention_impl, module
        long_rows = xla_kernel_options(dtype)
        self.prepare = jax.jit(self._prepare)
        self.layer_given = jax.jit(self._layer_given)
        self.layer = jax.jit(self._layer, static_argnames=("layer_type",), **long_rows)
        self.tail = jax.jit(self._tail)
        self.packed_tail = jax.jit(self._packed_tail, static_argnames=("num_segments",))
        self.final_norm = jax.jit(self._final_norm)
        self._lock = threading.Lock()
        self._views: tuple[Any, list[Any]] | None = None  # (stacked groups, per-layer trees)
        # Bytes of per-layer weights that could not alias the stacked buffers and were copied (see layers()).
        self.copied_bytes = 0

    # ------------------------------------------------------------------------------------------------
    # The programs

    def _prepare(
        self, table_params: dict[str, Any], ids: jax.Array, mask: jax.Array, packing: Packing | None, embedded: Any
    ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array, jax.Array]]]:
        """(the encoder's input [B, T, D], {kind: (visible [B, T, S], cos, sin)} for each layer kind whose
        mask is a plain array). ``mask`` [B, T]: nonzero on real tokens (a packed row's segment ids)."""
        cfg, dt = self.config, self.dtype
        x = embed_tokens(cfg, dt, ids, table_params.get("embedding"), table_params.get("embedding_scale"), embedded)
        masks, ropes = _masks_and_ropes(cfg, mask.astype(bool), dt, self.attention_impl, packing)
        given = {kind: (m, *ropes[kind]) for kind, m in masks.items() if not isinstance(m, (BandedMask, QueryChunks))}
        return x, given

    def _layer_given(self, params: Any, x: jax.Array, visible: jax.Array, cos: jax.Array, sin: jax.Array):
        """One layer on the mask and rotary tables of its kind (from :meth:`_prepare`). The layer type only
        names the module: what differs between a sliding and a full layer here is in those inputs."""
        return Block(self.config, "given", self.dtype).apply({"params": params}, x, visible, cos, sin)

    def _layer(
        self, params: Any, x: jax.Array, mask: jax.Array, packing: Packing | None, *, layer_type: str
    ) -> jax.Array:
        """One layer that builds its own masks (a banded or chunked layout, which hold static sizes):
        ``mask`` [B, T] as in :meth:`_prepare`, ``packing`` for packed rows. The masks and rotary tables
        are those the scanned group builds."""
        cfg, dt = self.config, self.dtype
        masks, ropes = _masks_and_ropes(cfg, mask.astype(bool), dt, self.attention_impl, packing)
        kind = _kind(layer_type)
        return Block(cfg, layer_type, dt).apply({"params": params}, x, masks[kind], *ropes[kind])

    def _final_norm(self, params: Any, x: jax.Array) -> jax.Array:
        return RMSNorm(self.config.rms_norm_eps).apply({"params": params}, x)

    def _tail(self, head: Any, final_norm: Any, x: jax.Array, pool_mask: jax.Array) -> EncoderOutput:
        states = self._final_norm(final_norm, x)
        return self.module.apply({"params": {"head": head}}, states, pool_mask, method=EmbeddingGemmaModule.from_states)

    def _packed_tail(self, head: Any, final_norm: Any, x: jax.Array, segments: jax.Array, *, num_segments: int):
        states = self._final_norm(final_norm, x)
        out = self.module.apply(
            {"params": {"head": head}}, states, segments, num_segments, method=EmbeddingGemmaModule.from_packed_states
        )
        return out.embeddings

    # ------------------------------------------------------------------------------------------------
    # Weights

    def layers(self, encoder_params: dict[str, Any]) -> list[Any]:
        """Layer i's parameters as device arrays over the stacked weights' memory (``encoder/groups``, entry
        g of ``layer_j`` is layer g * period + j): NumPy views of the CPU buffers, placed without a copy.
        bfloat16 layers are bfloat16 views again: the scanned program needs its stacks as uint16 bits (see
        :func:`~embgemma_jax.model.from_bits`), but one layer's weights as bits cost a converting copy inside
        each call (``python benchmarks/probe_bf16_views.py``: the same bits, and 8 x 16 tokens run 1.16x
        slower on bits). A leaf whose view cannot alias (XLA's alignment) is copied, and counted in
        :attr:`copied_bytes`. Cached for the last stacked tree."""
        groups = encoder_params["groups"]
        with self._lock:
            if self._views is not None and self._views[0] is groups:
                return self._views[1]
            period = layer_period(self.config)
            host = jax.tree_util.tree_map(np.asarray, groups)  # the CPU buffers themselves, read-only
            copied = 0

            def place(stack: np.ndarray, g: int) -> jax.Array:
                nonlocal copied
                view = stack[g]
                if view.dtype == np.uint16:  # a bfloat16 stack passed as its bits (engine._bits_view): bfloat16 again
                    view = view.view(jnp.bfloat16)
                out = jax.device_put(view)
                if not _aliases(out, stack):
                    copied += view.nbytes
                return out

            layers = [
                jax.tree_util.tree_map(lambda s, g=i // period: place(s, g), host[f"layer_{i % period}"])
                for i in range(self.config.num_layers)
            ]
            self._views, self.copied_bytes = (groups, layers), copied
            return layers

    @staticmethod
    def table_params(encoder_params: dict[str, Any], embedded: Any) -> dict[str, Any]:
        """What the embed program needs: nothing when the rows come gathered, else the table (and scales)."""
        if embedded is not None:
            return {}
        return {k: encoder_params[k] for k in ("embedding", "embedding_scale") if k in encoder_params}

    # ------------------------------------------------------------------------------------------------
    # Running

    def builds_masks(self, length: int) -> bool:
        """Whether the sliding layers of rows of this length run the layer program that builds its own
        (banded) masks, the one compiled with :func:`xla_kernel_options` (``model.sliding_is_banded``: from
        3 x the window radius, 768 tokens for EmbeddingGemma, with ``attention_impl`` "auto")."""
        return sliding_is_banded(self.config, self.attention_impl, length)

    def encode(
        self, encoder_params: dict[str, Any], ids: Any, mask: Any, packing: Packing | None, embedded: Any, keep: bool
    ) -> tuple[jax.Array, list[jax.Array] | None]:
        """Embedding and every layer: (the last layer's output, before the final norm; with ``keep`` the
        input and every layer's output, num_layers + 1 arrays)."""
        layers = self.layers(encoder_params)
        x, given = self.prepare(self.table_params(encoder_params, embedded), ids, mask, packing, embedded)
        states = [x] if keep else None
        for params, layer_type in zip(layers, self.config.layer_types, strict=True):
            kind = _kind(layer_type)
            if kind in given:
                x = self.layer_given(params, x, *given[kind])
            else:
                x = self.layer(params, x, mask, packing, layer_type=layer_type)
            if states is not None:
                states.append(x)
        return x, states

    def forward(self, params, ids, mask, pool_mask, embedded=None, *, return_hidden_states=False) -> EncoderOutput:
        """As the engine's scanned ``forward`` program: embeddings, final-normed states, pooled vectors (and
        the num_layers + 1 hidden states, the last one final-normed as in transformers)."""
        enc = params["encoder"]
        x, states = self.encode(enc, ids, mask, None, embedded, return_hidden_states)
        out = self.tail(params["head"], enc["final_norm"], x, pool_mask)
        if states is None:
            return out
        states[-1] = out.last_hidden_state
        return out._replace(hidden_states=tuple(states))

    def forward_packed(self, params, ids, segments, positions, embedded=None, *, num_segments: int) -> jax.Array:
        enc = params["encoder"]
        x, _ = self.encode(enc, ids, segments, Packing(segments, positions), embedded, False)
        return self.packed_tail(params["head"], enc["final_norm"], x, segments, num_segments=num_segments)

    def states(self, encoder_params, ids, mask, embedded=None, *, all_layers: bool) -> tuple[jax.Array, ...]:
        x, states = self.encode(encoder_params, ids, mask, None, embedded, all_layers)
        last = self.final_norm(encoder_params["final_norm"], x)
        if states is None:
            return (last,)
        states[-1] = last
        return tuple(states)

    # ------------------------------------------------------------------------------------------------
    # Compiling ahead of time

    def compile_jobs(
        self,
        params: Any,
        ids: jax.Array,
        mask: jax.Array,
        embedded: Any,
        segments: int | None = None,
        layers: list[Any] | None = None,
    ) -> list[Callable[[], Any]]:
        """One ahead-of-time compilation per program a forward pass of this shape runs (the reference
        pipeline: padded rows, or packed rows of ``segments`` texts with ``mask`` their segment ids), to run
        in parallel; nothing runs on the device. The arguments are placed placeholder arrays of the shape (or
        ``jax.ShapeDtypeStruct``s, with ``layers`` the per-layer parameters as such)."""
        enc = params["encoder"]
        layers = self.layers(enc) if layers is None else layers
        packing = None if segments is None else Packing(mask, mask)
        table = self.table_params(enc, embedded)
        x, given = jax.eval_shape(self._prepare, table, ids, mask, packing, embedded)
        jobs: list[Callable[[], Any]] = [lambda: self.prepare.lower(table, ids, mask, packing, embedded).compile()]
        if given:
            kind, inputs = next(iter(given.items()))
            i = next(i for i, t in enumerate(self.config.layer_types) if _kind(t) == kind)
            jobs.append(lambda: self.layer_given.lower(layers[i], x, *inputs).compile())
        own = {}
        for i, layer_type in enumerate(self.config.layer_types):
            if _kind(layer_type) not in given:
                own.setdefault(layer_type, i)
        for layer_type, i in own.items():
            jobs.append(lambda i=i, t=layer_type: self.layer.lower(layers[i], x, mask, packing, layer_type=t).compile())
        if segments is None:
            jobs.append(lambda: self.tail.lower(params["head"], enc["final_norm"], x, mask).compile())
        else:
            jobs.append(
                lambda: self.packed_tail.lower(
                    params["head"], enc["final_norm"], x, mask, num_segments=segments
                ).compile()
            )
        return jobs
