"""The user-facing model: load, tokenize, batch, jit and encode, mirroring sentence-transformers."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from embgemma_jax import sharding
from embgemma_jax.checkpoint.load import Checkpoint, load_checkpoint, save_converted
from embgemma_jax.config import MATRYOSHKA_DIMS, EmbeddingGemmaConfig
from embgemma_jax.model import EmbeddingGemmaModule, EncoderOutput, check_attention_impl, resolve_dtype
from embgemma_jax.pooling import PoolingLike, as_pooling_spec, get_pooling
from embgemma_jax.prompts import resolve_prompt, title_prompts
from embgemma_jax.quant import check_quantize, expand_quantized, is_quantized, quantizing_put
from embgemma_jax.tokenizer import Tokenizer, check_texts

if TYPE_CHECKING:
    from embgemma_jax.research.variants import Intermediates

# Sequence lengths are padded up to one of these (capped at max_seq_length), so a model compiles at most
# len(BUCKETS) programs per batch size however many distinct lengths it sees.
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def enable_compilation_cache(directory: str | Path) -> Path:
    """Turns on JAX's persistent compilation cache in ``directory`` for this process.

    Compiled programs are written there, so a later process (same model shapes, same JAX version and
    backend) loads them instead of recompiling. Applies to every jitted function compiled afterwards.
    """
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def check_batching(batch_size: Any, token_budget: Any = None) -> None:
    """Raises on a batch_size that is not a positive int, or a token_budget that is neither that nor None."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if token_budget is not None and (
        not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1
    ):
        raise ValueError(f"token_budget must be a positive int or None, got {token_budget!r}")


def bucket_lengths(max_len: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in BUCKETS if b < max_len} | {max_len}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"sequence of {n} tokens is longer than the largest bucket {buckets[-1]}")


def batch_rows(n: int, batch_size: int) -> int:
    """Rows to pad a batch of n texts to: a power of two, at most batch_size (bounded compile count)."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, batch_size) if n <= batch_size else n


class EmbeddingGemma:
    """EmbeddingGemma in JAX with the sentence-transformers encode API.

    Build it with :meth:`from_pretrained`. ``encode`` returns NumPy arrays.
    """

    def __init__(self, checkpoint: Checkpoint, *, dtype: Any = "float32", attention_impl: str = "auto") -> None:
        self.dtype = resolve_dtype(dtype)
        self.attention_impl = check_attention_impl(attention_impl)
        self.config: EmbeddingGemmaConfig = checkpoint.config
        self.params = checkpoint.params
        self.prompts: dict[str, str] = dict(checkpoint.prompts)
        self.default_prompt_name = checkpoint.default_prompt_name
        self.source = checkpoint.source
        self._checkpoint = checkpoint
        self.tokenizer = Tokenizer.from_dir(
            checkpoint.tokenizer_dir,
            max_length=self.config.max_seq_length,
            bos_id=self.config.bos_token_id,
            eos_id=self.config.eos_token_id,
            pad_id=self.config.pad_token_id,
        )
        get_pooling(self.config.pooling_mode)  # raises on a mode we do not implement
        self.module = EmbeddingGemmaModule(self.config, self.dtype, self.attention_impl)
        self._apply = jax.jit(self._forward, static_argnames=("return_hidden_states",))
        self._shapes_lock = threading.Lock()
        self.compiled_shapes: set[tuple[int, int]] = set()
        # Data parallelism (see shard()): None runs every batch on the default device.
        self.mesh: jax.sharding.Mesh | None = None
        self.fsdp = False

    # ------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: Any = "float32",
        quantize: str | None = None,
        attention_impl: str = "auto",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        mesh: jax.sharding.Mesh | None = None,
        fsdp: bool = False,
        compilation_cache_dir: str | Path | None = None,
    ) -> EmbeddingGemma:
        """Loads a Hub id (e.g. ``google/embeddinggemma-300m``), a sentence-transformers directory, or a
        directory written by ``embgemma-jax convert``.

        Args:
          dtype: "float32" (exact parity, default) or "bfloat16". float16 is refused (it overflows).
          quantize: None (default) or "int8": weight-only int8 for the large matrices and the embedding
            table (per-channel scales); use with dtype="bfloat16" for speed. See ``quant.py``.
          attention_impl: "auto" (default), "dense" or "banded" for sliding-window layers.
          mesh: encode data-parallel over this mesh (see :meth:`shard`); each tensor is loaded straight
            onto its devices. None: one device.
          fsdp: with a mesh, split every parameter over the devices instead of replicating it.
          compilation_cache_dir: enable JAX's persistent compilation cache there (see
            :func:`enable_compilation_cache`), so the next process start does not recompile.
        """
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        compute = resolve_dtype(dtype)
        check_quantize(quantize)
        store = np.float32 if compute == jnp.float32 else jnp.bfloat16
        if fsdp and mesh is None:
            raise ValueError("fsdp=True needs a mesh, e.g. mesh=embgemma_jax.sharding.make_mesh()")

        def put(_path: tuple[str, ...], arr: np.ndarray) -> jax.Array:
            if arr.dtype.kind == "f" or arr.dtype == jnp.bfloat16:
                arr = arr.astype(store if not _path[-1].endswith("_scale") else np.float32, copy=False)
            if mesh is None:
                return jax.device_put(arr)
            return jax.device_put(arr, sharding.param_sharding(mesh, arr.shape, fsdp=fsdp))

        ckpt = load_checkpoint(
            name_or_path,
            dtype=np.float32 if quantize else store,
            put=quantizing_put(put) if quantize else put,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
        if quantize:
            ckpt.params = expand_quantized(ckpt.params)
        model = cls(ckpt, dtype=compute, attention_impl=attention_impl)
        if mesh is not None:
            model.mesh, model.fsdp = mesh, fsdp
        return model

    def shard(self, mesh: jax.sharding.Mesh | None = None, *, fsdp: bool = False) -> EmbeddingGemma:
        """Encodes data-parallel from now on: batches split along rows over ``mesh``, parameters
        replicated (or, with ``fsdp``, split over the devices). Returns self.

        Args:
          mesh: a mesh with axis ``"data"`` (default: :func:`embgemma_jax.sharding.make_mesh`, all local
            devices).
          fsdp: split each parameter along one axis instead of replicating it (less memory per device).
        """
        mesh = sharding.make_mesh() if mesh is None else mesh
        self.params = sharding.shard_params(self.params, mesh, fsdp=fsdp)
        self.mesh, self.fsdp = mesh, fsdp
        return self

    @property
    def quantized(self) -> bool:
        return is_quantized(self.params)

    def save_converted(self, out_dir: str | Path) -> Path:
        """Writes this model in the converted format (float32 parameters)."""
        if self.quantized:
            raise ValueError("save_converted needs float parameters; load without quantize= to convert")
        ckpt = Checkpoint(
            self.config,
            jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), self.params),
            self.prompts,
            self.default_prompt_name,
            self._checkpoint.tokenizer_dir,
            self.source,
        )
        return save_converted(ckpt, out_dir)

    # ------------------------------------------------------------------------------------------------
    # Tokens and the forward pass

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """{'input_ids', 'attention_mask'} (int32, right-padded to the longest) without any prompt."""
        return self.tokenizer(texts)

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

    def _forward(self, params, input_ids, attention_mask, pool_mask, *, return_hidden_states=False) -> EncoderOutput:
        return self.module.apply(
            {"params": params}, input_ids, attention_mask, pool_mask, return_hidden_states=return_hidden_states
        )

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pool_mask: np.ndarray | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> EncoderOutput:
        """The jitted pipeline on already-tokenized, padded ids (checked on the host first)."""
        self.check_ids(input_ids, attention_mask)
        n = np.shape(input_ids)[0]
        if self.mesh is not None:
            # Rows padded to a multiple of the device count and split over the mesh; dropped again below.
            ids, mask, pm = sharding.shard_batch(self.mesh, input_ids, attention_mask, pool_mask)
        else:
            ids = jnp.asarray(input_ids, jnp.int32)
            mask = jnp.asarray(attention_mask, jnp.int32)
            pm = None if pool_mask is None else jnp.asarray(pool_mask, jnp.int32)
        with self._shapes_lock:
            self.compiled_shapes.add(tuple(ids.shape))
        out = self._apply(self.params, ids, mask, mask if pm is None else pm, return_hidden_states=return_hidden_states)
        if ids.shape[0] == n:
            return out
        return jax.tree_util.tree_map(lambda x: x[:n], out)

    # ------------------------------------------------------------------------------------------------
    # encode

    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        truncate_dim: int | None = None,
        normalize_embeddings: bool = False,
        show_progress_bar: bool | None = None,
        *,
        token_budget: int | None = None,
        prompts_per_text: Sequence[str] | None = None,
        pooling: PoolingLike = None,
        layers: int | Sequence[int] | None = None,
        include_prompt: bool | None = None,
    ) -> np.ndarray:
        """Embeds texts. Returns float32 [N, E] ([E] for a single str), in input order.

        Args:
          prompt_name: a key of :attr:`prompts` (e.g. "query", "document", "STS").
          prompt: an explicit prompt string; wins over prompt_name.
          truncate_dim: keep the first truncate_dim dimensions (Matryoshka).
          normalize_embeddings: L2-normalize after truncation.
          token_budget: throughput mode: pack each batch with up to this many padded tokens (rows x padded
            length, at most batch_size rows) instead of a fixed batch_size rows. Results are the same.
          prompts_per_text: one prompt per text (used by encode_document with titles).
          pooling: a pooling mode name ("mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens",
            "weightedmean"), a function ``fn(states [B, T, D], mask [B, T]) -> [B, D]``, or a
            :class:`~embgemma_jax.pooling.PoolingSpec` (layers, layer weights, head, ...). Default: the
            checkpoint's (mean). See :mod:`embgemma_jax.research`.
          layers: pool hidden state(s) of these layers (transformers' ``hidden_states`` indexing, -1 = the
            final-normed output; several are averaged) instead of the final states.
          include_prompt: False drops the prompt's tokens from the pool (default: the checkpoint's).
        """
        if pooling is not None or layers is not None or include_prompt is not None or not self.config.include_prompt:
            spec = as_pooling_spec(
                pooling,
                layers=layers,
                include_prompt=include_prompt,
                default_mode=self.config.pooling_mode,
                default_include_prompt=self.config.include_prompt,
            )
        else:
            spec = None
        if spec is not None or self.config.pooling_mode != "mean":
            if truncate_dim is not None and (spec is None or spec.head):
                self._check_truncate_dim(truncate_dim)
            return self.embed_variants(
                sentences,
                {"embedding": spec},
                prompt_name=prompt_name,
                prompt=prompt,
                prompts_per_text=prompts_per_text,
                batch_size=batch_size,
                truncate_dim=truncate_dim,
                normalize_embeddings=normalize_embeddings,
                show_progress_bar=show_progress_bar,
                token_budget=token_budget,
            )["embedding"]
        single = isinstance(sentences, str)
        texts = [sentences] if single else sentences
        check_texts(texts)
        check_batching(batch_size, token_budget)
        dim = self._check_truncate_dim(truncate_dim)
        if prompts_per_text is None:
            p = resolve_prompt(self.prompts, prompt_name, prompt, self.default_prompt_name) or ""
            full = [p + t for t in texts]
        else:
            full = [p + t for p, t in zip(prompts_per_text, texts, strict=True)]

        out = np.empty((len(full), dim), dtype=np.float32)
        for idx, emb in self._iter_embeddings(full, batch_size, show_progress_bar, token_budget):
            out[idx] = emb[:, :dim]
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out

    def _check_truncate_dim(self, truncate_dim: int | None) -> int:
        full = self.config.embedding_dim
        if truncate_dim is None:
            return full
        if (
            isinstance(truncate_dim, bool)
            or not isinstance(truncate_dim, (int, np.integer))
            or not 1 <= truncate_dim <= full
        ):
            trained = [d for d in MATRYOSHKA_DIMS if d <= full] if full == 768 else [full]
            raise ValueError(
                f"truncate_dim must be an int in [1, {full}] (trained Matryoshka dims: {trained}), got {truncate_dim!r}"
            )
        return int(truncate_dim)

    def _plan_batches(
        self, lengths: Sequence[int], batch_size: int, token_budget: int | None
    ) -> list[tuple[np.ndarray, int, int]]:
        """Groups texts (longest first) into batches: (indices, padded length, padded rows).

        Each batch is padded to the bucket of its longest text. With ``token_budget`` a batch holds as many
        texts as fit ``rows * padded_length <= token_budget`` (at most batch_size), so long texts go in
        small batches and short ones in large batches; rows are padded to a power of two.
        """
        buckets = bucket_lengths(self.config.max_seq_length)
        order = np.argsort([-n for n in lengths], kind="stable")
        plan, i = [], 0
        while i < len(order):
            length = bucket_for(lengths[order[i]], buckets)
            rows = batch_size if token_budget is None else max(1, min(batch_size, token_budget // length))
            sel = order[i : i + rows]
            plan.append((sel, length, batch_rows(len(sel), rows)))
            i += len(sel)
        return plan

    def padded_batches(
        self, texts: Sequence[str], batch_size: int, token_budget: int | None = None
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yields (input indices, padded batch) for texts that already carry their prompts.

        Texts are tokenized a bounded window at a time (memory does not grow with the input) and grouped
        by :meth:`_plan_batches`; each batch holds empty padding rows after the ``len(indices)`` real ones.
        """
        window = max(batch_size * 16, 256 if token_budget is None else 4 * token_budget // 16)
        for start in range(0, len(texts), window):
            ids = self.tokenizer.encode(texts[start : start + window])
            for sel, length, n_rows in self._plan_batches([len(x) for x in ids], batch_size, token_budget):
                rows = [ids[i] for i in sel]
                yield start + sel, self.tokenizer.pad(rows + [[]] * (n_rows - len(rows)), length)

    def _iter_embeddings(
        self, texts: Sequence[str], batch_size: int, show_progress_bar: bool | None, token_budget: int | None = None
    ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Yields (input indices, embeddings) batch by batch.

        The next batch is dispatched before the previous result is read back, so the host pads and
        tokenizes while the device computes.
        """
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="encode", unit="text")
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def collect() -> tuple[np.ndarray, np.ndarray]:
            idx, emb = pending.pop(0)
            out = np.asarray(emb[: len(idx)], dtype=np.float32)
            if bar is not None:
                bar.update(len(idx))
            return idx, out

        for idx, batch in self.padded_batches(texts, batch_size, token_budget):
            emb = self.forward(batch["input_ids"], batch["attention_mask"]).embeddings  # dispatched async
            pending.append((idx, emb))
            if len(pending) > 1:
                yield collect()
        while pending:
            yield collect()
        if bar is not None:
            bar.close()

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray:
        """encode with the "query" prompt unless a prompt or prompt_name is given."""
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(
        self, sentences: str | Sequence[str], titles: str | Sequence[str | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """encode with the "document" prompt, or with ``title: {title} | text: `` per text when titles are given."""
        if titles is not None:
            if kwargs.get("prompt_name") is not None or kwargs.get("prompt") is not None:
                raise ValueError("pass either titles or prompt/prompt_name to encode_document, not both")
            n = 1 if isinstance(sentences, str) else len(sentences)
            return self.encode(sentences, prompts_per_text=title_prompts(titles, n), **kwargs)
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None and "document" in self.prompts:
            kwargs["prompt_name"] = "document"
        return self.encode(sentences, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Research surface (see embgemma_jax.research)

    def embed_variants(
        self, sentences: str | Sequence[str], variants: dict[str, PoolingLike], **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Embeds texts under several pooling variants (name -> mode, function or PoolingSpec) with one
        encoder pass per batch. Keyword arguments as :meth:`encode`. Returns name -> [N, width]."""
        from embgemma_jax.research.variants import embed_variants

        return embed_variants(self, sentences, variants, **kwargs)

    def inspect(self, sentences: str | Sequence[str], **kwargs: Any) -> Intermediates:
        """Intermediates of the reference pipeline on one batch: per-layer residual streams, final states,
        pooled and dense outputs, attention probabilities of chosen layers (NaN at padding). Keyword
        arguments: prompt_name, prompt, titles, capture (a :class:`~embgemma_jax.research.Capture`),
        mark_padding; see :func:`embgemma_jax.research.inspect`."""
        from embgemma_jax.research.variants import inspect

        return inspect(self, sentences, **kwargs)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] (the model's similarity function)."""
        a = np.atleast_2d(np.asarray(a, dtype=np.float32))
        b = np.atleast_2d(np.asarray(b, dtype=np.float32))
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"embedding widths differ: {a.shape[-1]} vs {b.shape[-1]}")
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return a @ b.T

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.embedding_dim

    def __repr__(self) -> str:
        return (
            f"EmbeddingGemma(source={str(self.source)!r}, dtype={self.dtype.name}, params={self.config.num_params():,})"
        )
