"""EmbeddingGemma: the model users see, with the sentence-transformers encode API.

A thin facade: it loads the checkpoint (:mod:`embgemma_jax.checkpoint`), prepares prompts
(:mod:`embgemma_jax.prompts`) and hands the texts to its :class:`~embgemma_jax.engine.Engine`, which
batches (:mod:`embgemma_jax.batching`), runs the jitted programs and returns NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from embgemma_jax import sharding
from embgemma_jax.batching import INVARIANT_BATCH_TOKENS, check_positive_int, check_truncate_dim
from embgemma_jax.checkpoint import Checkpoint, load_checkpoint, save_converted
from embgemma_jax.config import MATRYOSHKA_DIMS, EmbeddingGemmaConfig
from embgemma_jax.engine import Engine, check_batch_invariant, finish, progress_bar
from embgemma_jax.model import EncoderOutput, check_attention_impl, resolve_dtype, stack_layers, unstack_layers
from embgemma_jax.outputs import as_dicts, check_output_value, convert, token_outputs
from embgemma_jax.pooling import PoolingLike, PoolingPlan, as_pooling_spec, get_pooling
from embgemma_jax.precision import check_precision, quantize_embeddings
from embgemma_jax.prompts import Prompted, prepare
from embgemma_jax.quant import is_quantized
from embgemma_jax.research.variants import Intermediates, embed_variants, inspect
from embgemma_jax.similarity import check_similarity_fn_name, similarity, similarity_pairwise
from embgemma_jax.tokenizer import Tokenizer


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


class EmbeddingGemma:
    """EmbeddingGemma in JAX with the sentence-transformers encode API.

    Build it with :meth:`from_pretrained`. ``encode`` returns NumPy arrays.

    Attributes:
      truncate_dim: the Matryoshka width ``encode`` keeps when its own ``truncate_dim`` is None (None: all).
      similarity_fn_name: "cosine", "dot", "euclidean" or "manhattan": what :meth:`similarity` and
        :meth:`similarity_pairwise` compute (see :mod:`embgemma_jax.similarity`).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        dtype: Any = "float32",
        attention_impl: str = "auto",
        truncate_dim: int | None = None,
        similarity_fn_name: str | None = None,
        batch_invariant: bool = False,
        invariant_batch_tokens: int = INVARIANT_BATCH_TOKENS,
    ) -> None:
        invariant = check_batch_invariant(invariant_batch_tokens) if batch_invariant else None
        self.dtype = resolve_dtype(dtype)
        self.attention_impl = check_attention_impl(attention_impl)
        self.config: EmbeddingGemmaConfig = checkpoint.config
        # The production programs scan over the repeating group of layers: stack the layers once, here.
        # NumPy leaves go to the default device once (not on every call); a memory-mapped embedding table
        # (``embedding_on_host``) stays where it is, and the engine gathers its rows on the host.
        self.params = jax.tree_util.tree_map(_on_device, stack_layers(checkpoint.params, self.config))
        self.prompts: dict[str, str] = dict(checkpoint.prompts)
        self.default_prompt_name = checkpoint.default_prompt_name
        self.source = checkpoint.source
        self.tokenizer_dir = checkpoint.tokenizer_dir  # (the checkpoint is not kept: its per-layer arrays)
        self.tokenizer = Tokenizer.from_dir(
            checkpoint.tokenizer_dir,
            max_length=self.config.max_seq_length,
            bos_id=self.config.bos_token_id,
            eos_id=self.config.eos_token_id,
            pad_id=self.config.pad_token_id,
        )
        get_pooling(self.config.pooling_mode)  # raises on a mode we do not implement
        self.engine = Engine(self.config, self.dtype, self.attention_impl, self.tokenizer, invariant_tokens=invariant)
        self.fsdp = False
        self.truncate_dim = truncate_dim
        # As sentence-transformers: the argument, else the checkpoint's config_sentence_transformers.json, else cosine.
        if similarity_fn_name is None:
            similarity_fn_name = checkpoint.similarity_fn_name or "cosine"
        self.similarity_fn_name = similarity_fn_name

    @property
    def truncate_dim(self) -> int | None:
        return self._truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value: int | None) -> None:
        full = self.config.embedding_dim
        self._truncate_dim = None if value is None else check_truncate_dim(value, full, _trained_dims(full))

    @property
    def similarity_fn_name(self) -> str:
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value: str) -> None:
        self._similarity_fn_name = check_similarity_fn_name(value)

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
        truncate_dim: int | None = None,
        similarity_fn_name: str | None = None,
        embedding_on_host: bool | None = None,
        batch_invariant: bool = False,
        invariant_batch_tokens: int = INVARIANT_BATCH_TOKENS,
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
          truncate_dim: the default Matryoshka width of ``encode`` (see :attr:`truncate_dim`).
          similarity_fn_name: "cosine", "dot", "euclidean" or "manhattan" (default: the checkpoint's, else
            cosine).
          embedding_on_host: keep the 262144 x 768 embedding table as a read-only memory map of the weights
            file and gather the rows each batch uses on the host, so the resident set holds only the rows
            touched (as the reference's lazily mapped weights), not the whole 805 MB float32 table. None
            (default): on the CPU backend without ``quantize`` or ``mesh``, where host memory is device
            memory; elsewhere the table lives on the device. The numbers are the same either way.
          batch_invariant: a text's vector depends on the text alone, bit for bit: not on the order, the
            batch size or the other texts of an ``encode`` call (or the requests a server coalesces it
            with). Every text is padded to its own length bucket and every batch of a bucket has one shape
            (:func:`~embgemma_jax.batching.plan_invariant_batches`), so ``encode`` ignores ``batch_size``
            and refuses ``token_budget``. Costs padding (each bucket's last batch is filled with empty
            rows) and latency (a lone text runs a whole batch). The CPU backend on one device only (see
            :func:`~embgemma_jax.engine.check_batch_invariant`). The vectors are as close to the reference
            as the default mode's, not bit-equal to them.
          invariant_batch_tokens: the padded tokens of each batch-invariant batch (rows = this // length,
            at least 1). With another value a text may run in another shape and differ in the last bits.
        """
        if batch_invariant:
            check_batch_invariant(invariant_batch_tokens, mesh)
        check_positive_int(truncate_dim, "truncate_dim", optional=True)  # the bound is checked once loaded
        if similarity_fn_name is not None:
            check_similarity_fn_name(similarity_fn_name)
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        compute = resolve_dtype(dtype)
        if embedding_on_host is None:
            embedding_on_host = jax.default_backend() == "cpu" and quantize is None and mesh is None
        ckpt = load_checkpoint(
            name_or_path,
            dtype=compute,
            quantize=quantize,
            mesh=mesh,
            fsdp=fsdp,
            # With the table on the host, each layer tensor is read into its slot of the stacked arrays in
            # host memory, which __init__ places on the (CPU) device in place: nothing is held twice.
            on_device=not embedding_on_host,
            embedding_on_host=embedding_on_host,
            stacked=embedding_on_host,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
        model = cls(
            ckpt,
            dtype=compute,
            attention_impl=attention_impl,
            truncate_dim=truncate_dim,
            similarity_fn_name=similarity_fn_name,
            batch_invariant=batch_invariant,
            invariant_batch_tokens=invariant_batch_tokens,
        )
        if mesh is not None:
            model.params = sharding.shard_params(model.params, mesh, fsdp=fsdp)  # the stacked layers too
            model.engine.mesh, model.fsdp = mesh, fsdp
        return model

    def shard(self, mesh: jax.sharding.Mesh | None = None, *, fsdp: bool = False) -> EmbeddingGemma:
        """Encodes data-parallel from now on: batches split along rows over ``mesh``, parameters
        replicated (or, with ``fsdp``, split over the devices). Returns self.

        Args:
          mesh: a mesh with axis ``"data"`` (default: :func:`embgemma_jax.sharding.make_mesh`, all local
            devices).
          fsdp: split each parameter along one axis instead of replicating it (less memory per device).
        """
        if self.batch_invariant:
            raise ValueError("a batch_invariant model runs on one device; it cannot be sharded over a mesh")
        mesh = sharding.make_mesh() if mesh is None else mesh
        self.params = sharding.shard_params(self.params, mesh, fsdp=fsdp)
        self.engine.mesh, self.fsdp = mesh, fsdp
        return self

    @property
    def batch_invariant(self) -> bool:
        """Whether each text's vector is independent of what it is encoded with (see :meth:`from_pretrained`)."""
        return self.engine.invariant_tokens is not None

    @property
    def quantized(self) -> bool:
        return is_quantized(self.params)

    def to_checkpoint(self) -> Checkpoint:
        """This model as a :class:`Checkpoint` (float32 NumPy parameters in the per-layer layout)."""
        if self.quantized:
            raise ValueError("this model's parameters are int8; load without quantize= for float parameters")
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), self.layer_params())
        return Checkpoint(
            self.config,
            params,
            self.prompts,
            self.default_prompt_name,
            self.tokenizer_dir,
            self.source,
            self.similarity_fn_name,
        )

    def save_converted(self, out_dir: str | Path) -> Path:
        """Writes this model in the converted format (float32 parameters)."""
        if self.quantized:
            raise ValueError("save_converted needs float parameters; load without quantize= to convert")
        return save_converted(self.to_checkpoint(), out_dir)

    def layer_params(self) -> dict[str, Any]:
        """The parameters in the checkpoint's per-layer layout (``encoder/layer_i``), as views of the stacks."""
        return unstack_layers(self.params, self.config)

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        """The mesh batches are split over (see :meth:`shard`); None: one device."""
        return self.engine.mesh

    @property
    def compiled_shapes(self) -> set[tuple[int, int]]:
        """Every (rows, tokens) shape any of the model's programs was run with (see ``engine.compiled``)."""
        return {shape for _, shape in self.engine.compiled}

    # ------------------------------------------------------------------------------------------------
    # Tokens and the forward pass

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """{'input_ids', 'attention_mask'} (int32, right-padded to the longest) without any prompt."""
        return self.tokenizer(texts)

    def check_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> None:
        """Raises if any id is outside the embedding table (JAX gathers would clamp it silently)."""
        self.engine.check_ids(input_ids, attention_mask)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pool_mask: np.ndarray | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> EncoderOutput:
        """The jitted reference pipeline on already-tokenized, padded ids (checked on the host first)."""
        return self.engine.run_forward(
            self.params, input_ids, attention_mask, pool_mask, return_hidden_states=return_hidden_states
        )

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
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        ranges: np.ndarray | None = None,
        calibration_embeddings: np.ndarray | None = None,
        token_budget: int | None = None,
        prompts_per_text: Sequence[str] | None = None,
        titles: str | Sequence[str | None] | None = None,
        pooling: PoolingLike = None,
        layers: int | Sequence[int] | None = None,
        include_prompt: bool | None = None,
    ) -> Any:
        """Embeds texts. By default returns float32 [N, E] ([E] for a single str), in input order.

        Args:
          prompt_name: a key of :attr:`prompts` (e.g. "query", "document", "STS").
          prompt: an explicit prompt string; wins over prompt_name.
          truncate_dim: keep the first truncate_dim dimensions (Matryoshka); None: :attr:`truncate_dim`.
          normalize_embeddings: L2-normalize after truncation (sentence embeddings only, as the reference).
          output_value: "sentence_embedding" (default); "token_embeddings": one float32 [T_i, D] array of
            final-normed token states per text, without padding; None: one dict of every output per text
            (see :mod:`embgemma_jax.outputs`).
          precision: "float32" (default), "int8", "uint8", "binary" or "ubinary", applied after truncation
            and normalization with sentence-transformers' ``quantize_embeddings`` semantics (see
            :mod:`embgemma_jax.precision`): int8/uint8 ranges come from the embeddings of this call unless
            ``ranges`` or ``calibration_embeddings`` is given; binary packs 8 dimensions per byte.
          convert_to_numpy: return one NumPy array (default). With both convert flags False, a list of
            per-text ``jax.Array``.
          convert_to_tensor: return one ``jax.Array`` (wins over convert_to_numpy).
          ranges: [2, dim] per-dimension minima and maxima for int8/uint8 precision.
          calibration_embeddings: embeddings whose per-dimension min and max give int8/uint8 ranges.
          token_budget: throughput mode: pack each batch with up to this many padded tokens (rows x padded
            length, at most batch_size rows) instead of a fixed batch_size rows. Results are the same.
            A :attr:`batch_invariant` model plans its own batches: it ignores batch_size and refuses this.
          prompts_per_text: one prompt per text (instead of prompt/prompt_name).
          titles: document titles, one per text (None for none): ``title: {title} | text: `` prompts.
          pooling: a pooling mode name ("mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens",
            "weightedmean"), a function ``fn(states [B, T, D], mask [B, T]) -> [B, D]``, or a
            :class:`~embgemma_jax.pooling.PoolingSpec` (layers, layer weights, head, ...). Default: the
            checkpoint's (mean). See :mod:`embgemma_jax.research`.
          layers: pool hidden state(s) of these layers (transformers' ``hidden_states`` indexing, -1 = the
            final-normed output; several are averaged) instead of the final states.
          include_prompt: False drops the prompt's tokens from the pool (default: the checkpoint's).
        """
        cfg = self.config
        output_value = check_output_value(output_value)
        check_precision(precision)
        if output_value is None and precision != "float32":
            raise ValueError(
                f"precision={precision!r} applies to output_value 'sentence_embedding' or 'token_embeddings'; "
                "output_value=None returns every output in float32"
            )
        if (ranges is not None or calibration_embeddings is not None) and precision not in ("int8", "uint8"):
            raise ValueError(f"ranges and calibration_embeddings apply to precision int8 or uint8, not {precision!r}")
        truncate_dim = self.truncate_dim if truncate_dim is None else truncate_dim
        p = prepare(
            sentences,
            self.prompts,
            prompt_name=prompt_name,
            prompt=prompt,
            default_prompt_name=self.default_prompt_name,
            prompts_per_text=prompts_per_text,
            titles=titles,
        )
        spec = as_pooling_spec(
            pooling,
            layers=layers,
            include_prompt=include_prompt,
            default_mode=cfg.pooling_mode,
            default_include_prompt=cfg.include_prompt,
        )
        plan = spec.plan(cfg.num_layers, cfg.normalize)
        if plan.head:
            check_truncate_dim(truncate_dim, cfg.embedding_dim, _trained_dims(cfg.embedding_dim))
        else:
            check_positive_int(truncate_dim, "truncate_dim", optional=True)
        run = {"batch_size": batch_size, "token_budget": token_budget, "progress": show_progress_bar}

        if output_value == "sentence_embedding":
            out = finish(self._embed(p, plan, truncate_dim, **run), truncate_dim, normalize_embeddings)
            if precision != "float32":
                out = quantize_embeddings(out, precision, ranges, calibration_embeddings)
            out = convert(out, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor)
            return out[0] if p.single else out

        # The reference pipeline's own embeddings come with the token states; any other plan runs its own pass.
        own = output_value is None and plan == self.engine.reference_plan
        bar = progress_bar(len(p.texts), "encode", show_progress_bar)
        try:
            tokens = token_outputs(
                self,
                p.texts,
                p.prompts,
                batch_size=batch_size,
                token_budget=token_budget,
                include_prompt=plan.include_prompt if own else True,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        if output_value == "token_embeddings":
            result: Any = tokens.token_embeddings
            if precision != "float32":
                result = quantize_embeddings(result, precision, ranges, calibration_embeddings)
        else:
            sentence = tokens.sentence_embedding if own else self._embed(p, plan, truncate_dim, **run)
            result = as_dicts(tokens, finish(sentence, truncate_dim, False))
        return result[0] if p.single else result

    def _embed(
        self,
        p: Prompted,
        plan: PoolingPlan,
        truncate_dim: int | None,
        *,
        batch_size: int,
        token_budget: int | None,
        progress: bool | None,
    ) -> np.ndarray:
        """Float32 sentence embeddings [N, width] of prepared texts under one pooling plan (not truncated)."""
        out = self.engine.embed(
            self.params,
            p.texts,
            {"embedding": plan},
            prompts=p.prompts,
            batch_size=batch_size,
            token_budget=token_budget,
            progress=progress,
        )["embedding"]
        if truncate_dim is not None and truncate_dim > out.shape[1]:
            raise ValueError(f"truncate_dim={truncate_dim} exceeds the pooled width {out.shape[1]}")
        return out

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
            return self.encode(sentences, titles=titles, **kwargs)
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None and "document" in self.prompts:
            kwargs["prompt_name"] = "document"
        return self.encode(sentences, **kwargs)

    def warmup(
        self,
        sentences: Sequence[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        token_budget: int | None = None,
    ) -> int:
        """Compiles, before a job starts, every program shape that encoding ``sentences`` with these settings
        runs (tokenizes and plans the batches; embeds nothing). Give it the job's texts, or a sample with the
        same length distribution. Returns the number of shapes compiled. With the persistent compilation
        cache on, later processes load them instead of compiling."""
        table, default = self.prompts, self.default_prompt_name
        p = prepare(sentences, table, prompt_name=prompt_name, prompt=prompt, default_prompt_name=default)
        shapes = self.engine.batch_shapes(p.texts, batch_size=batch_size, token_budget=token_budget)
        return self.engine.warmup(self.params, shapes)

    # ------------------------------------------------------------------------------------------------
    # Research surface (see embgemma_jax.research)

    def embed_variants(
        self, sentences: str | Sequence[str], variants: Mapping[str, PoolingLike], **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Embeds texts under several pooling variants (name -> mode, function or PoolingSpec) with one
        encoder pass per batch. Keyword arguments as :meth:`encode`. Returns name -> [N, width]."""
        return embed_variants(self, sentences, variants, **kwargs)

    def inspect(self, sentences: str | Sequence[str], **kwargs: Any) -> Intermediates:
        """Intermediates of the reference pipeline on one batch: per-layer residual streams, final states,
        pooled and dense outputs, attention probabilities of chosen layers (NaN at padding). Keyword
        arguments: prompt_name, prompt, titles, capture (a :class:`~embgemma_jax.research.Capture`),
        mark_padding; see :func:`embgemma_jax.research.variants.inspect`."""
        return inspect(self, sentences, **kwargs)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """[len(embeddings1), len(embeddings2)] scores under :attr:`similarity_fn_name` (cosine by default);
        euclidean and manhattan are negative distances, as sentence-transformers."""
        return similarity(embeddings1, embeddings2, self.similarity_fn_name)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """[n] scores of ``embeddings1[i]`` with ``embeddings2[i]`` under :attr:`similarity_fn_name`."""
        return similarity_pairwise(embeddings1, embeddings2, self.similarity_fn_name)

    def get_embedding_dimension(self) -> int:
        """The width ``encode`` returns by default: the embedding width, or :attr:`truncate_dim` if smaller."""
        full = self.config.embedding_dim
        return full if self.truncate_dim is None else min(full, self.truncate_dim)

    def get_sentence_embedding_dimension(self) -> int:
        return self.get_embedding_dimension()

    def __repr__(self) -> str:
        return (
            f"EmbeddingGemma(source={str(self.source)!r}, dtype={self.dtype.name}, params={self.config.num_params():,})"
        )


def _on_device(x: Any) -> Any:
    """A NumPy parameter placed on the default device; a memory map (the host embedding table) and device
    arrays as they are."""
    return jax.device_put(x) if isinstance(x, np.ndarray) and not isinstance(x, np.memmap) else x


def _trained_dims(full: int) -> tuple[int, ...]:
    return tuple(d for d in MATRYOSHKA_DIMS if d <= full) if full == 768 else (full,)
