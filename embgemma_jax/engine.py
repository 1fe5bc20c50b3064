"""The engine: every jitted program of one model, and the one loop that feeds them.

Programs (each compiled once per input shape; :attr:`Engine.compiled` records every program and shape):

  * ``forward``: the reference pipeline (encoder, mean pool, dense head, L2 norm).
  * ``forward_packed``: the same on packed rows (several texts per row, each pooled on its own).
  * ``states``: the encoder alone, returning the final states or all ``num_layers + 1`` hidden states.
  * ``pool_head``: one pooling variant (:class:`~embgemma_jax.pooling.PoolingPlan`) over selected states.
  * ``capture``: the reference pipeline returning the intermediates a :class:`Capture` asks for.

The first three run the encoder in one of two forms (:meth:`Engine.uses_layers`): one program that scans over
the repeating group of layers (``scanned_forward``, ...: accelerators, meshes and middle-sized CPU batches),
or, on the CPU backend with one device, one small program per layer call over views of the same weights
(:mod:`embgemma_jax.layerwise`: small batches and long rows by default), which avoids the scan's per-step
copy of the weights there, holds less memory and compiles a new shape faster.

:meth:`Engine.embed` is the one loop from prompted texts to vectors: the batch planner
(:mod:`embgemma_jax.batching`) pads the texts into batches (or, with a token budget, packs them into
rows), each batch is checked (ids inside the table), placed (split over the mesh, rows padded to the
device count) and dispatched; results are read back one batch behind, so the host tokenizes and pads while
the device computes. The shapes of the first batches compile in parallel before the first dispatch. The
reference plan runs ``forward`` (or ``forward_packed``); any other plan runs ``states`` once per batch and
``pool_head`` per plan.

On the CPU backend the embedding table stays on the host, memory-mapped (:meth:`Engine.split_table`): each
batch's rows are gathered there (:meth:`Engine.gather`) and passed to the programs in place of the table.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax import batching, sharding
from embgemma_jax.checkpoint.placement import storage_dtype
from embgemma_jax.checkpoint.safetensors_file import check_rows_finite
from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.layerwise import LayerPrograms, xla_kernel_options
from embgemma_jax.model import (
    DenseHead,
    EmbeddingGemmaModule,
    Encoder,
    EncoderOutput,
    Packing,
    RMSNorm,
    unstack_layers,
)
from embgemma_jax.pooling import PoolingPlan, PoolingSpec, l2_normalize, normalize_rows, pool
from embgemma_jax.prompts import exclude_prompt, prompt_lengths
from embgemma_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which intermediates ``inspect`` returns (embeddings, final states, pooled and dense outputs
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


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on stderr when ``enabled``, else None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text")


def finish(x: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """The one truncate/normalize step: keep the first ``dim`` columns, then L2-normalize if asked."""
    x = np.ascontiguousarray(x[:, :dim], dtype=np.float32) if dim is not None and dim < x.shape[1] else x
    return normalize_rows(x) if normalize else x


# On the CPU with one device, batches of at most this many padded tokens run per layer, and so do rows of
# banded sliding attention (Engine.uses_layers).
PER_LAYER_MAX_TOKENS = 1024

# Batches planned ahead of the first dispatch, whose new shapes compile in parallel (see Engine._compile_ahead).
COMPILE_AHEAD = 32


def _bits_view(x: Any) -> Any:
    """A bfloat16 array on the CPU backend as a uint16 array over the same memory (no copy); anything else,
    and an array whose memory cannot be shared, as it is."""
    if getattr(x, "dtype", None) != jnp.bfloat16 or not isinstance(x, jax.Array):
        return x
    if x.devices() != {jax.devices("cpu")[0]} or not x.is_fully_addressable:
        return x
    host = np.asarray(x)  # the CPU buffer itself, read-only
    view = jax.device_put(host.view(np.uint16))
    return view if view.unsafe_buffer_pointer() == x.unsafe_buffer_pointer() else x


def _padded(values: np.ndarray, rows: int) -> np.ndarray:
    """Per-text values extended with zeros for a batch's padding rows."""
    out = np.zeros(rows, dtype=values.dtype)
    out[: len(values)] = values
    return out


def check_batch_invariant(invariant_tokens: Any, mesh: Any = None) -> int:
    """The padded tokens per batch of a batch-invariant model (``invariant_tokens`` checked); raises
    ValueError where the mode is not available.

    Available on the CPU backend on one device. Its premise, that a row's result depends on the program's
    shape alone and not on the row's position or the other rows, was measured on XLA's CPU kernels only;
    GPU libraries may choose kernels (and summation orders) per process by autotuning, which is not
    verified, so the mode is refused there rather than promised."""
    tokens = batching.check_positive_int(invariant_tokens, "invariant_batch_tokens")
    if jax.default_backend() != "cpu":
        raise ValueError(
            f"batch_invariant=True is available on the CPU backend only (the default backend is "
            f"{jax.default_backend()!r}, where it is not verified)"
        )
    if mesh is not None:
        raise ValueError("batch_invariant=True runs on one device; it cannot be combined with a mesh")
    return tokens


class Engine:
    """The jitted programs of one model (their compile caches live as long as the engine).

    Args:
      config: the model's config.
      dtype: compute dtype (float32 or bfloat16).
      attention_impl: sliding-window attention ("auto", "dense" or "banded").
      tokenizer: the model's tokenizer (batching and error messages).
      invariant_tokens: batch-invariant mode (see :func:`check_batch_invariant`): every batch is planned by
        :func:`~embgemma_jax.batching.plan_invariant_batches` with this many padded tokens per batch, so a
        text's vector does not depend on what it is encoded with. None (default): the usual plans.
    """

    def __init__(
        self,
        config: EmbeddingGemmaConfig,
        dtype: jnp.dtype,
        attention_impl: str,
        tokenizer: Tokenizer,
        *,
        invariant_tokens: int | None = None,
    ):
        self.config, self.dtype, self.attention_impl, self.tokenizer = config, dtype, attention_impl, tokenizer
        self.invariant_tokens = invariant_tokens
        # Parameters are stacked per repeating group of layers (model.stack_layers): the production programs
        # scan over the groups, so a new shape compiles one group, not every layer.
        self.module = EmbeddingGemmaModule(config, dtype, attention_impl, scan_layers=True)
        self.encoder = Encoder(config, dtype, attention_impl, scan_layers=True)
        # Captures record every layer's intermediates, which the unrolled form names per layer (layer_i).
        # Attention probabilities exist as full [T, S] matrices only in the dense sliding-window form; the
        # banded form computes the same per-query softmax on key blocks. Capturing them runs the dense form.
        self.capture_modules = {
            dense: EmbeddingGemmaModule(config, dtype, "dense" if dense else attention_impl) for dense in (False, True)
        }
        self.reference_plan = PoolingSpec("mean", config.include_prompt).plan(config.num_layers, config.normalize)
        self.mesh: jax.sharding.Mesh | None = None  # None: every batch on the default device
        # The encoder in one program (a scan over the layer groups): accelerators, meshes and the CPU's larger
        # batches. In float32 on the CPU these compile with XLA's own kernels (xla_kernel_options): by default
        # they run batches of more than 1024 padded tokens, where ``python benchmarks/probe_cpu_kernels.py``
        # measured them 1.03x (8 x 128) to 1.31x (8 x 640) faster than with YNNPACK's fusions, with less
        # temporary memory (8 x 640: 201 against 301 MiB); at 8 x 32 YNNPACK is 1.03-1.05x faster.
        kernels = xla_kernel_options(dtype)
        self.scanned_forward = jax.jit(self._forward, static_argnames=("return_hidden_states",), **kernels)
        self.scanned_forward_packed = jax.jit(self._forward_packed, static_argnames=("num_segments",), **kernels)
        self.scanned_states = jax.jit(self._states, static_argnames=("all_layers",), **kernels)
        # The encoder one layer per program call (see embgemma_jax.layerwise): the CPU backend, one device.
        self.layers = LayerPrograms(config, dtype, attention_impl, self.module)
        self.per_layer: bool | None = None  # None: small batches and long rows per layer (see uses_layers)
        self.pool_head = jax.jit(self._pool_head, static_argnames=("plan",))
        self.capture = jax.jit(self._capture, static_argnames=("capture",))
        self._lock = threading.Lock()
        self._program_params: tuple[Any, tuple[Any, np.ndarray | None]] | None = None  # see split_table
        self.compiled: set[tuple[str, tuple[int, int]]] = set()  # (program, (rows, tokens)) seen so far
        # Tokens the device computed (rows x padded length) against the real ones, over every batch so far.
        self.stats = {"real_tokens": 0, "device_tokens": 0, "batches": 0}

    # ------------------------------------------------------------------------------------------------
    # The programs

    def uses_layers(self, rows: int, length: int) -> bool:
        """Whether a batch of this shape runs the encoder one layer per program call
        (:mod:`embgemma_jax.layerwise`) rather than as one scanned program (``scanned_forward``, ...).

        Per layer only on the CPU backend with one device (no mesh). There :attr:`per_layer` decides: True
        (every shape), False (none), or None, the default: batches of at most :data:`PER_LAYER_MAX_TOKENS`
        padded tokens, and rows long enough for banded sliding attention (``model.sliding_is_banded``: 768
        tokens for EmbeddingGemma). Measured on the full-size model, float32:

          * a 16-token query takes 49 ms per layer against 89 ms scanned, 8 x 128 tokens 1.23 against 1.22 s
            (``python benchmarks/probe_scan_copy.py``);
          * from 4 x 640 tokens the per-layer programs of plain masks run 12-20% slower: each call allocates
            its own temporary buffers, which the C library maps fresh from the kernel above 32 MiB, and the
            page faults cost more than the scan's weight copy saves;
          * on long rows the per-layer programs that build banded masks use XLA's own CPU kernels in float32,
            1.1-1.3x faster there than YNNPACK's (``python benchmarks/probe_cpu_kernels.py``, see
            :func:`~embgemma_jax.layerwise.xla_kernel_options`), and hold less memory than the scan.

        ``per_layer=True`` also suits middle-sized batches where memory or start-up time counts more than
        throughput: the per-layer programs compile faster and hold less memory at every size."""
        if self.mesh is not None or jax.default_backend() != "cpu":
            return False
        if self.per_layer is None:
            return rows * length <= PER_LAYER_MAX_TOKENS or self.layers.builds_masks(length)
        return bool(self.per_layer)

    def forward(self, params, ids, mask, pool_mask, embedded=None, *, return_hidden_states=False) -> EncoderOutput:
        """The reference pipeline on placed arrays (program parameters from :meth:`split_table`): encoder, mean
        pool, dense head, L2 norm; per layer or as one scanned program (see :meth:`uses_layers`)."""
        if self.uses_layers(*np.shape(ids)):
            return self.layers.forward(
                params, ids, mask, pool_mask, embedded, return_hidden_states=return_hidden_states
            )
        if return_hidden_states:  # (a static argument given explicitly is another jit cache entry than its default)
            return self.scanned_forward(params, ids, mask, pool_mask, embedded, return_hidden_states=True)
        return self.scanned_forward(params, ids, mask, pool_mask, embedded)

    def forward_packed(self, params, ids, segments, positions, embedded=None, *, num_segments: int) -> jax.Array:
        """The reference pipeline on packed rows: embeddings [rows * num_segments, E]."""
        run = self.layers.forward_packed if self.uses_layers(*np.shape(ids)) else self.scanned_forward_packed
        return run(params, ids, segments, positions, embedded, num_segments=num_segments)

    def states(self, enc_params, ids, mask, embedded=None, *, all_layers: bool) -> tuple[jax.Array, ...]:
        """The encoder alone: the final-normed states, or all num_layers + 1 hidden states."""
        run = self.layers.states if self.uses_layers(*np.shape(ids)) else self.scanned_states
        return run(enc_params, ids, mask, embedded, all_layers=all_layers)

    # ``embedded``: the table's rows for ``ids``, gathered on the host (see :meth:`split_table`), or None.

    def _forward(self, params, ids, mask, pool_mask, embedded=None, *, return_hidden_states=False) -> EncoderOutput:
        return self.module.apply(
            {"params": params}, ids, mask, pool_mask, return_hidden_states=return_hidden_states, embedded=embedded
        )

    def _forward_packed(self, params, ids, segments, positions, embedded=None, *, num_segments: int) -> jax.Array:
        """Packed rows -> embeddings [rows * num_segments, E] (see EmbeddingGemmaModule.packed)."""
        packing = Packing(segments, positions)
        out = self.module.apply(
            {"params": params}, ids, packing, num_segments, embedded, method=EmbeddingGemmaModule.packed
        )
        return out.embeddings

    def _states(self, enc_params, ids, mask, embedded=None, *, all_layers: bool) -> tuple[jax.Array, ...]:
        last, hidden = self.encoder.apply(
            {"params": enc_params}, ids, mask, return_hidden_states=all_layers, embedded=embedded
        )
        return hidden if all_layers else (last,)

    def _pool_head(self, params, selected, attention_mask, pool_mask, *, plan: PoolingPlan):
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

    def _capture(self, params, ids, mask, pool_mask, embedded=None, *, capture: Capture) -> dict[str, Any]:
        module = self.capture_modules[bool(capture.attention_layers)]
        params = unstack_layers(params, self.config)  # slices inside the program: no copy of the weights
        out, state = module.apply(
            {"params": params}, ids, mask, pool_mask, embedded=embedded, mutable=["intermediates"]
        )
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

    # ------------------------------------------------------------------------------------------------
    # Checking and placing a batch

    def split_table(self, params: Any) -> tuple[Any, np.ndarray | None]:
        """(parameters for the programs, host table or None). An embedding table held as a NumPy array (the
        memory map that ``from_pretrained`` keeps on the CPU backend, see ``load_checkpoint``'s
        ``embedding_on_host``) stays on the host: it is taken out of the parameters and :meth:`gather`
        reads the rows each batch uses, so the resident set holds only those. A device table (any other
        array) stays in the parameters and is gathered inside the programs. With a mesh a host table is
        passed as a parameter (placed on each call).

        bfloat16 parameters on the CPU backend are passed as uint16 views of the same memory (no copy; see
        :func:`embgemma_jax.model.from_bits`). The result is cached for the last ``params`` object."""
        cached = self._program_params
        if cached is not None and cached[0] is params:
            return cached[1]
        table = params["encoder"].get("embedding")
        if not isinstance(table, np.ndarray) or self.mesh is not None:
            out = params, None
        else:
            encoder = {k: v for k, v in params["encoder"].items() if k != "embedding"}
            out = {**params, "encoder": encoder}, table
        if self.dtype == jnp.bfloat16 and self.mesh is None:
            out = jax.tree_util.tree_map(_bits_view, out[0]), out[1]
        self._program_params = (params, out)
        return out

    def gather(self, table: np.ndarray | None, ids: np.ndarray) -> jax.Array | None:
        """The host table's rows for checked ids [B, T] as a device array [B, T, D] in the parameters'
        storage dtype (float32, or bfloat16 rounded as the device table is: the same bits), or None
        without a host table. Raises CheckpointError on a row holding NaN or inf."""
        if table is None:
            return None
        rows = table[np.asarray(ids)]
        check_rows_finite(rows, ids, table)
        rows = rows.astype(storage_dtype(self.dtype), copy=False)
        return jax.device_put(rows)  # (jnp.asarray would compile a copy program per new shape)

    def check_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> None:
        """Raises if any id is outside the embedding table (JAX gathers would clamp it silently)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must be integers, got {ids.dtype}")
        if attention_mask is not None and np.shape(attention_mask) != ids.shape:
            raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {ids.shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
            )
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            tok = int(ids[row, col])
            raise ValueError(
                f"token id {tok} ({self.tokenizer.id_to_piece(tok)!r}) at row {row}, position {col} is outside "
                f"the embedding table [0, {self.config.vocab_size}); this token cannot be embedded by this model"
            )

    def place(
        self, program: str, *arrays: np.ndarray | None, split: bool = True, count: bool = True
    ) -> list[jax.Array | None]:
        """Checked host arrays [B, T] -> device arrays (with a mesh and ``split``, rows padded to a multiple of
        the mesh's devices and split over it), recording the program and shape in :attr:`compiled` and (with
        ``count``) the real and device tokens in :attr:`stats`."""
        if self.mesh is not None and split:
            out = sharding.shard_batch(self.mesh, *arrays)
        else:
            out = [None if a is None else jnp.asarray(a, jnp.int32) for a in arrays]
        with self._lock:
            self.compiled.add((program, tuple(out[0].shape)))
            if count and arrays[1] is not None:
                self.stats["real_tokens"] += int(np.count_nonzero(arrays[1]))
                self.stats["device_tokens"] += int(np.prod(out[0].shape))
                self.stats["batches"] += 1
        return out

    def run_capture(self, params: Any, ids: np.ndarray, mask: np.ndarray, pool_mask: np.ndarray, capture: Capture):
        """The capture program on one checked batch (not split over the mesh); NumPy float32 results."""
        self.check_ids(ids, mask)
        params, table = self.split_table(params)
        placed = self.place("capture", ids, mask, pool_mask, split=False)
        res = self.capture(params, *placed, self.gather(table, ids), capture=capture)
        return jax.tree_util.tree_map(lambda x: np.asarray(x.astype(jnp.float32)), res)

    def run_forward(
        self,
        params: Any,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pool_mask: np.ndarray | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> EncoderOutput:
        """The fused reference program on already-tokenized, padded ids (checked on the host first)."""
        self.check_ids(input_ids, attention_mask)
        n = np.shape(input_ids)[0]
        params, table = self.split_table(params)
        ids, mask, pm = self.place("forward", input_ids, attention_mask, pool_mask)
        rows = self.gather(table, input_ids)
        out = self.forward(
            params, ids, mask, mask if pm is None else pm, rows, return_hidden_states=return_hidden_states
        )
        return out if ids.shape[0] == n else jax.tree_util.tree_map(lambda x: x[:n], out)

    # ------------------------------------------------------------------------------------------------
    # Compiling up front

    def batch_shapes(
        self, texts: Sequence[str], *, batch_size: int = 32, token_budget: int | None = None
    ) -> set[tuple[Any, ...]]:
        """The program shapes encoding these (prompted) texts with the reference plan will run: (rows,
        length) of padded batches, (rows, length, segments) of packed ones. Tokenizes; runs nothing."""
        self.check_batching(batch_size, token_budget)
        if token_budget is not None:
            batches = batching.packed_batches(self.tokenizer, texts, batch_size, token_budget)
            return {(*b.input_ids.shape, b.segments) for _, b in batches}
        batches = self.padded_batches(texts, batch_size)
        return {b["input_ids"].shape for _, b in batches}

    def check_batching(self, batch_size: Any, token_budget: Any) -> None:
        """Raises on a bad batch_size or token_budget, or a token_budget given to a batch-invariant engine."""
        batching.check_batching(batch_size, token_budget)
        if token_budget is not None and self.invariant_tokens is not None:
            raise ValueError(
                "token_budget packs several texts per row, whose vectors then depend on their row-mates; a "
                f"batch-invariant model plans its own batches ({self.invariant_tokens} padded tokens each): "
                "leave token_budget None"
            )

    def padded_batches(
        self, texts: Sequence[str], batch_size: int, token_budget: int | None = None
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """:func:`embgemma_jax.batching.padded_batches` of (prompted) texts with this engine's plan: the
        batch-invariant one when :attr:`invariant_tokens` is set (``batch_size`` then only sizes the
        tokenization window)."""
        return batching.padded_batches(
            self.tokenizer, texts, batch_size, token_budget, invariant_tokens=self.invariant_tokens
        )

    def warmup(self, params: Any, shapes: Iterable[tuple[Any, ...]]) -> int:
        """Compiles the reference programs for these shapes (from :meth:`batch_shapes`) ahead of time, several
        at once (XLA compiles in parallel threads), so the job that follows waits for no compilation; with the
        persistent compilation cache on, the next process loads them instead. Returns the number of shapes.

        Ahead-of-time (``lower(...).compile()`` on placed placeholder arrays, which fills the same cache the
        calls use): nothing runs. Running each shape once instead cost a whole batch of compute per shape on
        the CPU (7 s for 8 x 512 tokens of the full model), 35 s of a 69 s cold pass over 48 documents."""
        shapes = sorted(set(shapes))
        params, table = self.split_table(params)

        def jobs(shape: tuple[Any, ...]) -> list[Callable[[], Any]]:
            """The compilations one shape needs: one program, or each per-layer program (see layerwise)."""
            rows, length = shape[:2]
            layerwise = self.uses_layers(rows, length)
            ids = np.zeros((rows, length), np.int32)
            ones = np.ones((rows, length), np.int32)
            embedded = None if table is None else self.gather(table, ids)
            if len(shape) == 3:
                d_ids, d_seg, d_pos = self.place("forward_packed", ids, ones, np.zeros_like(ids), count=False)
                if layerwise:
                    return self.layers.compile_jobs(params, d_ids, d_seg, embedded, segments=shape[2])
                program = self.scanned_forward_packed
                return [lambda: program.lower(params, d_ids, d_seg, d_pos, embedded, num_segments=shape[2]).compile()]
            d_ids, d_mask = self.place("forward", ids, ones, count=False)
            if layerwise:
                return self.layers.compile_jobs(params, d_ids, d_mask, embedded)
            return [lambda: self.scanned_forward.lower(params, d_ids, d_mask, d_mask, embedded).compile()]

        todo = [job for shape in shapes for job in jobs(shape)]
        workers = min(len(todo), os.cpu_count() or 1, 8)
        if workers <= 1:
            for job in todo:
                job()
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="embgemma-compile") as pool:
                list(pool.map(lambda job: job(), todo))
        return len(shapes)

    def _compile_ahead(self, params: Any, batches: Iterator[tuple[np.ndarray, Any]], program: str):
        """Plans up to :data:`COMPILE_AHEAD` batches ahead and compiles the shapes ``program`` has not run yet
        in parallel (a cold pass then waits for the slowest compilation, not their sum); yields the same
        batches. Single device only (with a mesh, rows are padded before the shape is known)."""
        if self.mesh is not None:
            yield from batches
            return
        ahead = list(itertools.islice(batches, COMPILE_AHEAD))
        shapes = {
            (*b.input_ids.shape, b.segments) if program == "forward_packed" else b["input_ids"].shape for _, b in ahead
        }
        with self._lock:
            new = {shape for shape in shapes if (program, tuple(shape[:2])) not in self.compiled}
        if len(new) > 1 or any(self.uses_layers(*shape[:2]) for shape in new):  # per layer: several programs
            self.warmup(params, new)
        yield from ahead
        yield from batches

    # ------------------------------------------------------------------------------------------------
    # The loop

    @staticmethod
    def dispatch_ahead(
        batches: Iterable[tuple[np.ndarray, Any]], dispatch: Callable[[np.ndarray, Any], tuple[Any, Any]]
    ) -> Iterator[tuple[np.ndarray, Any]]:
        """Yields (indices, NumPy results) per batch; each batch is dispatched before the previous one's
        results are read back, so the host prepares the next batch while the device computes.

        ``dispatch(indices, batch)`` returns the device results and which of their rows belong to the
        texts, in order: a slice (padded batches: the first rows) or an index array (packed rows)."""
        pending: collections.deque[tuple[np.ndarray, Any, Any]] = collections.deque()

        def take(x: jax.Array, select: Any) -> np.ndarray:
            out = np.asarray(x[select]) if isinstance(select, slice) else np.asarray(x)[select]
            return out.astype(np.float32, copy=False)

        def read() -> tuple[np.ndarray, Any]:
            idx, out, select = pending.popleft()
            return idx, jax.tree_util.tree_map(lambda x: take(x, select), out)

        for idx, batch in batches:
            pending.append((idx, *dispatch(idx, batch)))
            if len(pending) > 1:
                yield read()
        while pending:
            yield read()

    def embed(
        self,
        params: Any,
        texts: Sequence[str],
        plans: Mapping[str, PoolingPlan],
        *,
        prompts: Sequence[str] | None = None,
        batch_size: int = 32,
        token_budget: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeds prompted texts under each plan. Returns name -> float32 [N, width] in input order.

        Args:
          params: the model's parameters.
          texts: texts with their prompts in front (see :func:`embgemma_jax.prompts.prepare`).
          plans: name -> pooling plan; ``{name: self.reference_plan}`` runs the fused reference program.
          prompts: each text's prompt, needed when a plan excludes the prompt from the pool.
          batch_size, token_budget: see :func:`embgemma_jax.batching.plan_batches`; with a token budget the
            reference plan packs several texts per row (:func:`embgemma_jax.batching.packed_batches`). A
            batch-invariant engine plans its own batches (:meth:`padded_batches`) and takes no budget.
          progress: show a progress bar.
        """
        self.check_batching(batch_size, token_budget)
        cfg = self.config
        lengths = None
        if any(not p.include_prompt for p in plans.values()):
            if prompts is None:
                raise ValueError("a plan that excludes the prompt needs each text's prompt")
            lengths = prompt_lengths(self.tokenizer, prompts)
        fused = all(p == self.reference_plan for p in plans.values())
        all_layers = any(p.layers != (cfg.num_layers,) for p in plans.values())
        pool_params = {"final_norm": params["encoder"]["final_norm"], "head": params["head"]}
        warm_params = params
        params, table = self.split_table(params)
        enc_params = params["encoder"]

        def dispatch(idx: np.ndarray, b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            ids, mask = b["input_ids"], b["attention_mask"]
            self.check_ids(ids, mask)
            without = None if lengths is None else exclude_prompt(mask, _padded(lengths[idx], len(ids)))
            if fused:  # the reference plan: mean of the final states, the prompt pooled unless it excludes it
                d_ids, d_mask, d_without = self.place("forward", ids, mask, without)
                pm = d_mask if d_without is None else d_without
                emb = self.forward(params, d_ids, d_mask, pm, self.gather(table, ids)).embeddings
                return dict.fromkeys(plans, emb), slice(0, len(idx))
            d_ids, d_mask, d_without = self.place("states", ids, mask, without)
            states = self.states(enc_params, d_ids, d_mask, self.gather(table, ids), all_layers=all_layers)
            out = {}
            for name, plan in plans.items():
                selected = tuple(states[i] if all_layers else states[0] for i in plan.layers)
                pm = d_mask if plan.include_prompt else d_without
                out[name] = self.pool_head(pool_params, selected, d_mask, pm, plan=plan)[2]
            return out, slice(0, len(idx))

        def dispatch_packed(idx: np.ndarray, b: batching.PackedBatch) -> tuple[dict[str, jax.Array], np.ndarray]:
            self.check_ids(b.input_ids)
            d_ids, d_seg, d_pos = self.place("forward_packed", b.input_ids, b.segment_ids, b.positions)
            rows = self.gather(table, b.input_ids)
            emb = self.forward_packed(params, d_ids, d_seg, d_pos, rows, num_segments=b.segments)
            return dict.fromkeys(plans, emb), b.slots

        bar = progress_bar(len(texts), "encode", progress)
        out: dict[str, np.ndarray] = {}
        if fused and lengths is None and token_budget is not None:  # throughput mode: several texts per row
            batches = batching.packed_batches(self.tokenizer, texts, batch_size, token_budget)
            batches = self._compile_ahead(warm_params, batches, "forward_packed")
            run = self.dispatch_ahead(batches, dispatch_packed)
        else:
            batches = self.padded_batches(texts, batch_size, token_budget)
            if fused and lengths is None:
                batches = self._compile_ahead(warm_params, batches, "forward")
            run = self.dispatch_ahead(batches, dispatch)
        try:
            for idx, result in run:
                for name, emb in result.items():
                    if name not in out:
                        out[name] = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
                    out[name][idx] = emb
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        if not texts:  # no batch ran: widths from the plans (the dense head's, or the hidden size)
            for name, plan in plans.items():
                out[name] = np.empty((0, cfg.embedding_dim if plan.head else cfg.hidden_size), np.float32)
        return out
