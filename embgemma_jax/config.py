"""Model configuration: one frozen dataclass for the whole embedding pipeline."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from embgemma_jax.errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Absolute bounds on sizes read from a config file, far above any Gemma 3 model (at most 62 layers and 128k
# positions). A larger value is a corrupt or hostile file, refused before anything is sized by it. Loaders
# also bound the layer count and vocabulary by what the weights file holds (checkpoint/).
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 17  # 131072, Gemma 3's longest context


@dataclasses.dataclass(frozen=True)
class EmbeddingGemmaConfig:
    """Everything that fixes the computation, from token ids to the normalized embedding.

    Field names follow the Hugging Face Gemma 3 config where one exists. ``sliding_window`` is the value
    in ``config.json`` (512 for the real model); the attention radius is ``sliding_window // 2``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    rms_norm_eps: float
    rope_global_base: float
    rope_local_base: float
    sliding_window: int
    layer_types: tuple[str, ...]
    max_position_embeddings: int
    max_seq_length: int
    dense_features: tuple[int, ...]  # output widths of the dense head, e.g. (3072, 768)
    pooling_mode: str = "mean"
    include_prompt: bool = True
    normalize: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (type(value) is not int or value < (0 if f.name.endswith("token_id") else 1)):
                raise CheckpointError(f"config field {f.name}={value!r} must be a positive int")
            if f.type == "float" and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise CheckpointError(f"config field {f.name}={value!r} must be a positive finite number")
        if not all(type(w) is int and w > 0 for w in self.dense_features):
            raise CheckpointError(f"dense_features={self.dense_features!r} must be positive ints")
        if self.num_layers > MAX_LAYERS:
            raise CheckpointError(f"config field num_layers={self.num_layers} is absurd (at most {MAX_LAYERS})")
        if self.max_position_embeddings > MAX_POSITIONS:
            raise CheckpointError(
                f"config field max_position_embeddings={self.max_position_embeddings} is absurd (at most "
                f"{MAX_POSITIONS}, Gemma 3's longest context)"
            )
        if self.max_seq_length > self.max_position_embeddings:
            raise CheckpointError(
                f"config field max_seq_length={self.max_seq_length} exceeds max_position_embeddings="
                f"{self.max_position_embeddings}"
            )
        if len(self.layer_types) != self.num_layers:
            raise CheckpointError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise CheckpointError(f"unknown layer types {bad}; expected only {list(LAYER_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise CheckpointError(
                f"hidden_activation={self.hidden_activation!r} is not supported; expected 'gelu_pytorch_tanh'"
            )
        if self.max_seq_length < 2:
            raise CheckpointError(f"max_seq_length={self.max_seq_length} leaves no room for BOS and EOS")

    @property
    def window_radius(self) -> int:
        """A query at i sees keys j with |i - j| <= radius on sliding layers."""
        return self.sliding_window // 2

    @property
    def embedding_dim(self) -> int:
        return self.dense_features[-1] if self.dense_features else self.hidden_size

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def num_params(self) -> int:
        d, f, n, k, h = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * n * h + 2 * d * k * h + n * h * d + 2 * h
        layer = attn + 3 * d * f + 4 * d
        dense, prev = 0, d
        for width in self.dense_features:
            dense += prev * width
            prev = width
        return self.vocab_size * d + self.num_layers * layer + d + dense

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["dense_features"] = list(self.dense_features)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingGemmaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"unknown config fields {unknown}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = sorted(set(required) - set(d))
        if missing:
            raise CheckpointError(f"missing config fields {missing}")
        d = dict(d)
        for key in ("layer_types", "dense_features"):
            if not isinstance(d[key], (list, tuple)):
                raise CheckpointError(f"config field {key} must be a list, got {d[key]!r:.80}")
            d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf_config(
        cls,
        hf: dict[str, Any],
        *,
        max_seq_length: int | None = None,
        dense_features: tuple[int, ...] = (3072, 768),
        pooling_mode: str = "mean",
        include_prompt: bool = True,
        normalize: bool = True,
    ) -> EmbeddingGemmaConfig:
        """Builds the config from a parsed Gemma 3 ``config.json`` (old or new RoPE format).

        Any malformed value (wrong type, missing field, unsupported option) is a CheckpointError.
        """
        try:
            return cls._from_hf_config(
                hf,
                max_seq_length=max_seq_length,
                dense_features=dense_features,
                pooling_mode=pooling_mode,
                include_prompt=include_prompt,
                normalize=normalize,
            )
        except CheckpointError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"config.json has a malformed value: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_hf_config(
        cls,
        hf: dict[str, Any],
        *,
        max_seq_length: int | None,
        dense_features: tuple[int, ...],
        pooling_mode: str,
        include_prompt: bool,
        normalize: bool,
    ) -> EmbeddingGemmaConfig:
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "sliding_window",
        )
        missing = [k for k in required if k not in hf]
        model_type = hf.get("model_type")
        if model_type != "gemma3_text":
            raise CheckpointError(f"config.json has model_type={model_type!r}; expected 'gemma3_text'")
        if hf.get("use_bidirectional_attention") is not True:
            raise CheckpointError(
                "config.json must set use_bidirectional_attention: true (EmbeddingGemma is a bidirectional "
                f"encoder); found {hf.get('use_bidirectional_attention')!r}. A causal Gemma 3 is not an "
                "EmbeddingGemma checkpoint."
            )
        if missing:
            raise CheckpointError(f"config.json is missing required fields {missing}")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise CheckpointError(f"config.json sets {key}={hf[key]!r}; softcapping is not supported")
        if hf.get("attention_bias"):
            raise CheckpointError("config.json sets attention_bias: true; EmbeddingGemma has no biases")

        rope = hf.get("rope_parameters") or {}
        global_base = (rope.get(FULL) or {}).get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local_base = (rope.get(SLIDING) or {}).get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        for lt, params in rope.items():
            if params and params.get("rope_type", "default") != "default":
                raise CheckpointError(f"rope_type {params['rope_type']!r} for {lt} is not supported")
        if hf.get("rope_scaling"):
            raise CheckpointError(f"rope_scaling={hf['rope_scaling']!r} is not supported")

        num_layers = _int(hf, "num_hidden_layers")
        if num_layers > MAX_LAYERS:  # before a list of that length is built
            raise CheckpointError(f"config.json has num_hidden_layers={num_layers}; absurd (at most {MAX_LAYERS})")
        layer_types = hf.get("layer_types")
        if layer_types is None:
            key = "sliding_window_pattern" if "sliding_window_pattern" in hf else "_sliding_window_pattern"
            pattern = _int(hf, key, 6)
            if pattern < 1:
                raise CheckpointError(
                    f"config.json has {key}={pattern}; expected a positive int (e.g. 6: 5 local, 1 global)"
                )
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        elif not isinstance(layer_types, list):
            raise CheckpointError(f"config.json has a malformed value: layer_types={layer_types!r:.80} is not a list")
        max_pos = _int(hf, "max_position_embeddings", 2048)
        hidden, heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
        return cls(
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(hf, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=_int(hf, "num_key_value_heads"),
            head_dim=_int(hf, "head_dim", hidden // heads if heads > 0 else 0),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_global_base=float(global_base),
            rope_local_base=float(local_base),
            sliding_window=_int(hf, "sliding_window"),
            layer_types=tuple(layer_types),
            max_position_embeddings=max_pos,
            max_seq_length=max_seq_length if max_seq_length is not None else max_pos,
            dense_features=tuple(int(x) for x in dense_features),
            pooling_mode=pooling_mode,
            include_prompt=include_prompt,
            normalize=normalize,
            hidden_activation=hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh")),
            pad_token_id=int(hf.get("pad_token_id", 0) or 0),
            bos_token_id=int(hf.get("bos_token_id", 2)),
            eos_token_id=int(_first(hf.get("eos_token_id", 1))),
        )


def _int(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    """An integer field of config.json (a float, string or bool there is malformed, not rounded)."""
    value = hf[key] if default is None else hf.get(key, default)
    if type(value) is not int:
        raise CheckpointError(f"config.json has a malformed value: {key}={value!r:.80} must be an integer")
    return value


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


# google/embeddinggemma-300m, as in its config.json and sentence-transformers module configs.
EMBEDDINGGEMMA_300M = EmbeddingGemmaConfig(
    vocab_size=262144,
    hidden_size=768,
    intermediate_size=1152,
    num_layers=24,
    num_heads=3,
    num_kv_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-6,
    rope_global_base=1_000_000.0,
    rope_local_base=10_000.0,
    sliding_window=512,
    layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(24)),
    max_position_embeddings=2048,
    max_seq_length=2048,
    dense_features=(3072, 768),
)

MATRYOSHKA_DIMS = (768, 512, 256, 128)
