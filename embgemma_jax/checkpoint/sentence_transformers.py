"""The sentence-transformers layout (as on the Hub), converted to our parameter tree tensor by tensor.

A directory holds ``modules.json`` (Transformer -> Pooling -> Dense... -> Normalize), the Gemma 3
backbone (``config.json`` + ``model.safetensors`` or a sharded index) and one folder per module.
Conversion is a table from reference tensor names to our parameter paths, each with a transform from the
torch layout (Linear weights are [out, in]) to ours. The layout is read once; every weights header is
checked against the config (names, dtypes, shapes, layer count, vocabulary) before any tensor is read, so
a missing, unexpected, mis-shaped or oversized tensor is an error that names it and costs nothing.
Pickle checkpoints (``pytorch_model.bin``) are never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from embgemma_jax.checkpoint.safetensors_file import SafetensorsFile
from embgemma_jax.checkpoint.tree import (
    PICKLE_NAMES,
    Checkpoint,
    ParamPath,
    Put,
    check_similarity_fn_name,
    layer_indices,
    set_path,
)
from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.errors import CheckpointError, read_json

Transform = Callable[[np.ndarray], np.ndarray]

# ---------------------------------------------------------------------------------------------------
# The conversion table


def _linear_in_heads(heads: int, head_dim: int) -> Transform:
    # torch [heads * head_dim, D] -> ours [D, heads, head_dim]
    return lambda w: np.ascontiguousarray(w.T.reshape(w.shape[1], heads, head_dim))


def _linear_out_heads(heads: int, head_dim: int) -> Transform:
    # torch [D, heads * head_dim] -> ours [heads, head_dim, D]
    return lambda w: np.ascontiguousarray(w.T.reshape(heads, head_dim, w.shape[0]))


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def backbone_table(cfg: EmbeddingGemmaConfig) -> dict[str, tuple[ParamPath, Transform, tuple[int, ...]]]:
    """Reference key (without any ``model.`` prefix) -> (our path, transform, reference shape)."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table: dict[str, tuple[ParamPath, Transform, tuple[int, ...]]] = {
        "embed_tokens.weight": (("encoder", "embedding"), _identity, (cfg.vocab_size, d)),
        "norm.weight": (("encoder", "final_norm", "scale"), _identity, (d,)),
    }
    for i in range(cfg.num_layers):
        ref, ours = f"layers.{i}.", ("encoder", f"layer_{i}")
        table.update(
            {
                ref + "self_attn.q_proj.weight": ((*ours, "attn", "q"), _linear_in_heads(n, h), (n * h, d)),
                ref + "self_attn.k_proj.weight": ((*ours, "attn", "k"), _linear_in_heads(k, h), (k * h, d)),
                ref + "self_attn.v_proj.weight": ((*ours, "attn", "v"), _linear_in_heads(k, h), (k * h, d)),
                ref + "self_attn.o_proj.weight": ((*ours, "attn", "o"), _linear_out_heads(n, h), (d, n * h)),
                ref + "self_attn.q_norm.weight": ((*ours, "attn", "q_norm", "scale"), _identity, (h,)),
                ref + "self_attn.k_norm.weight": ((*ours, "attn", "k_norm", "scale"), _identity, (h,)),
                ref + "input_layernorm.weight": ((*ours, "input_norm", "scale"), _identity, (d,)),
                ref + "post_attention_layernorm.weight": ((*ours, "post_attn_norm", "scale"), _identity, (d,)),
                ref + "pre_feedforward_layernorm.weight": ((*ours, "pre_ffw_norm", "scale"), _identity, (d,)),
                ref + "post_feedforward_layernorm.weight": ((*ours, "post_ffw_norm", "scale"), _identity, (d,)),
                ref + "mlp.gate_proj.weight": ((*ours, "mlp", "gate"), _transpose, (f, d)),
                ref + "mlp.up_proj.weight": ((*ours, "mlp", "up"), _transpose, (f, d)),
                ref + "mlp.down_proj.weight": ((*ours, "mlp", "down"), _transpose, (d, f)),
            }
        )
    return table


# ---------------------------------------------------------------------------------------------------
# modules.json and the module configs


@dataclasses.dataclass
class _Layout:
    backbone_dir: Path
    dense: list[tuple[Path, int, int]]  # (dir, in, out)
    pooling_mode: str
    include_prompt: bool
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json's, if it sets one
    model_max_length: int | None  # tokenizer_config.json's, the fallback


def _module_kind(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _module_dir(directory: Path, modules_json: Path, rel: str) -> Path:
    """A module's folder: a relative path inside the checkpoint (like the weight map's shard names, never a
    way out of it: no absolute path, no ``..``)."""
    parts = PurePosixPath(rel.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or Path(rel).is_absolute():
        raise CheckpointError(
            f"{modules_json}: module path {rel!r} leaves the checkpoint; expected a folder in {directory}"
        )
    return directory / rel


def _read_layout(directory: Path) -> _Layout:
    modules_json = directory / "modules.json"
    modules = read_json(modules_json, expect=list)
    if not modules or not all(
        isinstance(m, dict) and isinstance(m.get("type", ""), str) and isinstance(m.get("path", ""), str)
        for m in modules
    ):
        raise CheckpointError(f"{modules_json} must list the pipeline modules as objects with string type and path")
    kinds = [_module_kind(m.get("type", "")) for m in modules]
    if kinds[0] != "Transformer":
        raise CheckpointError(f"{modules_json}: first module is {kinds[0]!r}; expected Transformer")
    if "Pooling" not in kinds:
        raise CheckpointError(f"{modules_json} has no Pooling module (found {kinds})")
    dirs = [_module_dir(directory, modules_json, m.get("path", "")) for m in modules]
    dense: list[tuple[Path, int, int]] = []
    pooling_mode, include_prompt, normalize = "mean", True, False
    for m, kind, sub in zip(modules[1:], kinds[1:], dirs[1:], strict=True):
        if kind == "Pooling":
            pc = read_json(sub / "config.json")
            pooling_mode = _pooling_mode(pc, sub)
            include_prompt = bool(pc.get("include_prompt", True))
        elif kind == "Dense":
            dc = read_json(sub / "config.json")
            act = dc.get("activation_function", "torch.nn.modules.linear.Identity")
            if not str(act).endswith("Identity"):
                raise CheckpointError(f"{sub / 'config.json'}: activation {act!r} is not supported (expected Identity)")
            if dc.get("bias", True):
                raise CheckpointError(
                    f"{sub / 'config.json'}: Dense with bias is not supported (EmbeddingGemma has none)"
                )
            fin, fout = dc.get("in_features"), dc.get("out_features")
            if type(fin) is not int or type(fout) is not int or fin < 1 or fout < 1:
                raise CheckpointError(
                    f"{sub / 'config.json'}: in_features={fin!r} and out_features={fout!r} must be positive ints"
                )
            dense.append((sub, fin, fout))
        elif kind == "Normalize":
            normalize = True
        else:
            raise CheckpointError(f"{modules_json}: module type {m.get('type')!r} is not supported")
    if kinds.index("Pooling") != 1 or (normalize and kinds[-1] != "Normalize"):
        raise CheckpointError(f"{modules_json}: unsupported module order {kinds}")

    backbone_dir = dirs[0]
    max_seq_length = model_max_length = None
    sbc = backbone_dir / "sentence_bert_config.json"
    if sbc.is_file():
        max_seq_length = read_json(sbc).get("max_seq_length")
        if max_seq_length is not None and (type(max_seq_length) is not int or max_seq_length < 2):
            raise CheckpointError(f"{sbc}: max_seq_length={max_seq_length!r:.80} must be an int >= 2")
    tc = backbone_dir / "tokenizer_config.json"
    if max_seq_length is None and tc.is_file():
        mml = read_json(tc).get("model_max_length")
        model_max_length = mml if type(mml) is int and mml > 0 else None  # often a 1e30 "unlimited" float
    return _Layout(backbone_dir, dense, pooling_mode, include_prompt, normalize, max_seq_length, model_max_length)


def _pooling_mode(pc: dict[str, Any], sub: Path) -> str:
    if "pooling_mode" in pc:
        return str(pc["pooling_mode"])
    # Older Pooling configs: one boolean per mode.
    on = [
        k.removeprefix("pooling_mode_").removesuffix("_tokens")
        for k, v in pc.items()
        if k.startswith("pooling_mode_") and v
    ]
    if len(on) != 1:
        raise CheckpointError(f"{sub / 'config.json'}: expected exactly one pooling mode, found {on or 'none'}")
    return {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len": "mean_sqrt_len_tokens"}.get(on[0], on[0])


def _backbone_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
        for name in weight_map.values():
            # Shard names are plain file names next to the index; never follow a path out of the checkpoint.
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{index}: weight_map names shard {name!r}; expected a file name in {directory}")
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    _refuse_pickles(directory, "Convert it to safetensors with the reference tools first.")
    raise CheckpointError(f"no model.safetensors in {directory}")


def _refuse_pickles(directory: Path, advice: str) -> None:
    for pickle_name in PICKLE_NAMES:
        if (directory / pickle_name).exists():
            raise CheckpointError(
                f"{directory / pickle_name} is a pickle checkpoint; pickles are never loaded (unpickling can run "
                f"arbitrary code). {advice}"
            )


# ---------------------------------------------------------------------------------------------------
# Config and weight headers, checked against each other before any tensor is read


@dataclasses.dataclass
class _Opened:
    layout: _Layout
    config: EmbeddingGemmaConfig
    backbone: dict[str, tuple[SafetensorsFile, str]]  # table key -> (file, name in the file)
    dense: list[SafetensorsFile]


def _bound_by_weights(hf: dict[str, Any], config_path: Path, files: list[SafetensorsFile]) -> None:
    """Refuses config sizes beyond what the weights hold, before the config is built from them (a
    ``num_hidden_layers`` of 1e9 would otherwise build a 1e9-entry layer list)."""
    names = [name.removeprefix("model.") for f in files for name in f.tensors]
    held = len(layer_indices(names, r"layers\.(\d+)\."))
    layers = hf.get("num_hidden_layers")
    if type(layers) is int and layers > held:
        where = ", ".join(str(f.path) for f in files)
        raise CheckpointError(f"{config_path}: num_hidden_layers={layers} but the weights ({where}) hold {held} layers")
    for f in files:
        for name, info in f.tensors.items():
            if name.removeprefix("model.") != "embed_tokens.weight" or len(info.shape) != 2:
                continue
            for field, size, what in (("vocab_size", info.shape[0], "rows"), ("hidden_size", info.shape[1], "columns")):
                value = hf.get(field)
                if type(value) is int and value != size:
                    raise CheckpointError(f"{config_path}: {field}={value} but {name!r} in {f.path} has {size} {what}")


def _open(directory: Path, stack: contextlib.ExitStack) -> _Opened:
    layout = _read_layout(directory)
    backbone_files = [stack.enter_context(SafetensorsFile(p)) for p in _backbone_files(layout.backbone_dir)]
    config_path = layout.backbone_dir / "config.json"
    hf = read_json(config_path)
    _bound_by_weights(hf, config_path, backbone_files)
    max_pos = hf.get("max_position_embeddings", 2048)
    if layout.max_seq_length is not None:
        msl = layout.max_seq_length
        if type(max_pos) is int and msl > max_pos:
            raise CheckpointError(
                f"{layout.backbone_dir / 'sentence_bert_config.json'}: max_seq_length={msl} exceeds "
                f"max_position_embeddings={max_pos} in {config_path}"
            )
    elif layout.model_max_length is not None and type(max_pos) is int:
        msl = min(layout.model_max_length, max_pos)  # as sentence-transformers' Transformer does
    else:
        msl = None
    try:
        cfg = EmbeddingGemmaConfig.from_hf_config(
            hf,
            max_seq_length=msl,
            dense_features=tuple(out for _, _, out in layout.dense),
            pooling_mode=layout.pooling_mode,
            include_prompt=layout.include_prompt,
            normalize=layout.normalize,
        )
    except CheckpointError as e:
        # Name the file: the config's own messages cannot know where it came from.
        raise CheckpointError(f"{config_path}: {e}") from e
    prev = cfg.hidden_size
    for sub, fin, fout in layout.dense:
        if fin != prev:
            raise CheckpointError(f"{sub / 'config.json'}: in_features={fin} but the previous width is {prev}")
        prev = fout

    table = backbone_table(cfg)
    backbone: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in backbone_files:
        for name in f.tensors:
            key = name.removeprefix("model.")
            if key not in table:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {f.path} (not part of an EmbeddingGemma backbone)"
                )
            if key in backbone:
                raise CheckpointError(f"tensor {name!r} appears twice (in {backbone[key][0].path} and {f.path})")
            f.check_tensor(name, table[key][2])
            backbone[key] = (f, name)
    missing = [key for key in table if key not in backbone]
    if missing:
        raise CheckpointError(
            f"missing tensors in {layout.backbone_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )

    dense: list[SafetensorsFile] = []
    for sub, fin, fout in layout.dense:
        path = sub / "model.safetensors"
        if not path.is_file():
            _refuse_pickles(sub, "Re-save the Dense module as safetensors.")
        f = stack.enter_context(SafetensorsFile(path))
        if f.keys() != ["linear.weight"]:
            raise CheckpointError(f"{path} holds {f.keys()}; expected exactly ['linear.weight']")
        f.check_tensor("linear.weight", (fout, fin))
        dense.append(f)
    return _Opened(layout, cfg, backbone, dense)


def read_st_config(directory: str | Path) -> EmbeddingGemmaConfig:
    """The config of a sentence-transformers directory, checked against its weights' headers (no tensor is
    read)."""
    with contextlib.ExitStack() as stack:
        return _open(Path(directory), stack).config


def _read_prompts(directory: Path) -> tuple[dict[str, str], str | None, str | None]:
    """The prompt table, the default prompt name and the similarity function name."""
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return {}, None, None
    conf = read_json(path)
    prompts = conf.get("prompts") or {}
    default = conf.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise CheckpointError(f"{path}: prompts must map names to strings")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return dict(prompts), default, check_similarity_fn_name(conf.get("similarity_fn_name"), path)


def load_st_checkpoint(
    directory: str | Path, *, put: Put | None = None, memory_map: Collection[ParamPath] = ()
) -> Checkpoint:
    """Converts a sentence-transformers EmbeddingGemma directory on the fly, tensor by tensor.

    ``put(path, array)`` receives each tensor in our layout and returns what the tree stores (see
    ``placement.py``); without it the tree holds the NumPy arrays as read. Paths in ``memory_map`` (only
    tensors stored as they are used, e.g. the embedding table) are stored as read-only memory maps of the
    file instead (see :meth:`SafetensorsFile.memory_map`), not read and not put.
    """
    directory = Path(directory)
    with contextlib.ExitStack() as stack:
        opened = _open(directory, stack)
        prompts, default, similarity = _read_prompts(directory)
        table = backbone_table(opened.config)
        params: dict[str, Any] = {}
        for key, (f, name) in opened.backbone.items():  # file order: each file is read front to back
            ours, transform, _ = table[key]
            if ours in memory_map:
                if transform is not _identity:
                    raise ValueError(f"{'/'.join(ours)} is transformed on load; it cannot be memory-mapped")
                set_path(params, ours, f.memory_map(name))
                continue
            arr = transform(f.read(name))
            set_path(params, ours, put(ours, arr) if put is not None else arr)
        for i, f in enumerate(opened.dense):
            ours = ("head", f"dense_{i}")
            arr = _transpose(f.read("linear.weight"))
            set_path(params, ours, put(ours, arr) if put is not None else arr)
    return Checkpoint(opened.config, params, prompts, default, opened.layout.backbone_dir, directory, similarity)
