"""Checkpoints: the sentence-transformers directory (as on the Hub) and our converted format.

Conversion is a table from reference tensor names to our parameter paths, each with a transform from
the torch layout (Linear weights are [out, in]) to ours. Tensors are read one at a time with
``safetensors.safe_open``; a missing, unexpected or mis-shaped tensor is an error that names it.
Pickle checkpoints (``pytorch_model.bin``) are never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embgemma_jax.config import EmbeddingGemmaConfig
from embgemma_jax.errors import CheckpointError, read_json

FORMAT_NAME = "embgemma_jax"
FORMAT_VERSION = 1
CONVERTED_CONFIG = "embgemma_config.json"
CONVERTED_PARAMS = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*/config.json",
    "*/*.safetensors",
]
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: config, parameter pytree (host or device arrays) and metadata."""

    config: EmbeddingGemmaConfig
    params: dict[str, Any]
    prompts: dict[str, str]
    default_prompt_name: str | None
    tokenizer_dir: Path
    source: Path


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


def backbone_table(cfg: EmbeddingGemmaConfig) -> dict[str, tuple[tuple[str, ...], Transform, tuple[int, ...]]]:
    """Reference key (without any ``model.`` prefix) -> (our path, transform, reference shape)."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table: dict[str, tuple[tuple[str, ...], Transform, tuple[int, ...]]] = {
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
# Reading safetensors


# safetensors refuses headers over 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000


def check_safetensors_file(path: Path) -> None:
    """Checks the framing of a safetensors file (8-byte header length, JSON header, data size) and raises
    a CheckpointError that says what is wrong: truncated, trailing bytes, or a corrupt header."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(fh.read(8), "little")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is corrupt: its header length field says {n} bytes (not a safetensors file?)"
            )
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: the header needs {8 + n} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path} is corrupt: its header is not a valid safetensors header ({e})") from e
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {expected} bytes but the file has only {size} "
            "(an interrupted download or copy?)"
        )
    if size > expected:
        raise CheckpointError(f"{path} is corrupt: {size - expected} unexpected bytes after the last tensor")


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16: raw words, viewed below
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


class _SafetensorsReader:
    """Reads whole tensors of one safetensors file straight into fresh NumPy arrays.

    safetensors validates the file (``safe_open``) and lists its tensors; the data is then read with one
    ``readinto`` per tensor at the header's offsets. Compared with ``get_tensor`` this makes no second
    copy and touches no memory-mapped pages, so loading never holds a tensor twice (the 805 MB embedding
    table matters), and the arrays are handed to ``jax.device_put``, which takes them without copying on
    CPU.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise CheckpointError(f"missing weights file: {path}")
        check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                self._keys = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        self.path = path
        self._fh = open(path, "rb")
        n = int.from_bytes(self._fh.read(8), "little")
        self._header = json.loads(self._fh.read(n))
        self._data_start = 8 + n

    def __enter__(self) -> _SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._keys)

    def read(self, name: str) -> np.ndarray:
        info = self._header.get(name)
        if info is None:
            raise CheckpointError(f"no tensor {name!r} in {self.path}")
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} in {self.path} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = _aligned_empty(tuple(info["shape"]), dtype)
        if arr.nbytes != end - start:
            raise CheckpointError(f"tensor {name!r} in {self.path}: shape and byte size disagree")
        self._fh.seek(self._data_start + start)
        if self._fh.readinto(memoryview(arr.reshape(-1)).cast("B")) != arr.nbytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} is incomplete")
        if info["dtype"] == "BF16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)  # numpy has no bfloat16: the raw 16-bit words, reinterpreted
        return arr


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary: XLA's CPU client then uses the buffer in place instead of copying."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _open(path: Path) -> _SafetensorsReader:
    return _SafetensorsReader(path)


def _read_tensor(handle: _SafetensorsReader, path: Path, name: str) -> np.ndarray:
    try:
        return handle.read(name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e


def _check_float(arr: np.ndarray, name: str, path: Path) -> np.ndarray:
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise CheckpointError(f"tensor {name!r} in {path} has dtype {arr.dtype}; expected a float type")
    flat = arr.reshape(-1)
    step = 1 << 22  # in chunks: no full-size temporary for the 262144 x 768 table
    for i in range(0, flat.size, step):
        if not np.isfinite(flat[i : i + step].astype(np.float32, copy=False)).all():
            raise CheckpointError(f"tensor {name!r} in {path} contains NaN or inf")
    return arr


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Path, Any]]:
    for path in files:
        with _open(path) as handle:
            for name in handle.keys():
                yield name, path, handle


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
    for pickle_name in PICKLE_NAMES:
        if (directory / pickle_name).exists():
            raise CheckpointError(
                f"{directory / pickle_name} is a pickle checkpoint; pickles are never loaded (unpickling can run "
                "arbitrary code). Convert it to safetensors with the reference tools first."
            )
    raise CheckpointError(f"no model.safetensors in {directory}")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _place(arr: np.ndarray, dtype: Any, put: Callable[[tuple[str, ...], np.ndarray], Any] | None, path):
    arr = arr.astype(dtype, copy=False) if dtype is not None else arr
    return put(path, arr) if put is not None else arr


# ---------------------------------------------------------------------------------------------------
# sentence-transformers directories


@dataclasses.dataclass
class _STLayout:
    backbone_dir: Path
    dense: list[tuple[Path, int, int]]  # (dir, in, out)
    pooling_mode: str
    include_prompt: bool
    normalize: bool
    max_seq_length: int | None


def _module_kind(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _read_st_layout(directory: Path) -> _STLayout:
    modules = read_json(directory / "modules.json", expect=list)
    if not modules or not all(
        isinstance(m, dict) and isinstance(m.get("type", ""), str) and isinstance(m.get("path", ""), str)
        for m in modules
    ):
        raise CheckpointError(
            f"{directory / 'modules.json'} must list the pipeline modules as objects with string type and path"
        )
    kinds = [_module_kind(m.get("type", "")) for m in modules]
    if kinds[0] != "Transformer":
        raise CheckpointError(f"{directory / 'modules.json'}: first module is {kinds[0]!r}; expected Transformer")
    if "Pooling" not in kinds:
        raise CheckpointError(f"{directory / 'modules.json'} has no Pooling module (found {kinds})")
    backbone_dir = directory / modules[0].get("path", "")
    dense: list[tuple[Path, int, int]] = []
    pooling_mode, include_prompt, normalize = "mean", True, False
    for m, kind in zip(modules[1:], kinds[1:], strict=True):
        sub = directory / m.get("path", "")
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
            raise CheckpointError(f"{directory / 'modules.json'}: module type {m.get('type')!r} is not supported")
    if kinds.index("Pooling") != 1 or (normalize and kinds[-1] != "Normalize"):
        raise CheckpointError(f"{directory / 'modules.json'}: unsupported module order {kinds}")

    max_seq_length = None
    sbc = backbone_dir / "sentence_bert_config.json"
    if sbc.is_file():
        max_seq_length = read_json(sbc).get("max_seq_length")
    if max_seq_length is None:
        tc = backbone_dir / "tokenizer_config.json"
        if tc.is_file():
            mml = read_json(tc).get("model_max_length")
            if isinstance(mml, int) and mml < 10**9:
                max_seq_length = mml
    return _STLayout(backbone_dir, dense, pooling_mode, include_prompt, normalize, max_seq_length)


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


def read_st_config(directory: Path) -> EmbeddingGemmaConfig:
    layout = _read_st_layout(directory)
    path = layout.backbone_dir / "config.json"
    hf = read_json(path)
    try:
        max_pos = int(hf.get("max_position_embeddings", 2048))
        msl = min(int(layout.max_seq_length), max_pos) if layout.max_seq_length is not None else max_pos
        cfg = EmbeddingGemmaConfig.from_hf_config(
            hf,
            max_seq_length=msl,
            dense_features=tuple(out for _, _, out in layout.dense),
            pooling_mode=layout.pooling_mode,
            include_prompt=layout.include_prompt,
            normalize=layout.normalize,
        )
    except (CheckpointError, TypeError, ValueError) as e:
        # Name the file: the config's own messages cannot know where it came from.
        raise CheckpointError(f"{path}: {e}") from e
    prev = cfg.hidden_size
    for sub, fin, fout in layout.dense:
        if fin != prev:
            raise CheckpointError(f"{sub / 'config.json'}: in_features={fin} but the previous width is {prev}")
        prev = fout
    return cfg


def _read_prompts(directory: Path) -> tuple[dict[str, str], str | None]:
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return {}, None
    conf = read_json(path)
    prompts = conf.get("prompts") or {}
    default = conf.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise CheckpointError(f"{path}: prompts must map names to strings")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return dict(prompts), default


def load_st_checkpoint(
    directory: Path, *, dtype: Any = np.float32, put: Callable[[tuple[str, ...], np.ndarray], Any] | None = None
) -> Checkpoint:
    """Converts a sentence-transformers EmbeddingGemma directory on the fly, tensor by tensor.

    ``put(path, array)`` (optional) receives each converted tensor and returns what to store, e.g. a
    ``jax.device_put`` with a sharding; without it the tree holds NumPy arrays.
    """
    directory = Path(directory)
    cfg = read_st_config(directory)
    layout = _read_st_layout(directory)
    table = backbone_table(cfg)
    params: dict[str, Any] = {}
    seen: set[str] = set()
    for name, path, handle in _iter_safetensors(_backbone_files(layout.backbone_dir)):
        key = name.removeprefix("model.")
        if key not in table:
            raise CheckpointError(f"unexpected tensor {name!r} in {path} (not part of an EmbeddingGemma backbone)")
        if key in seen:
            raise CheckpointError(f"tensor {name!r} appears twice (in {path})")
        ours, transform, shape = table[key]
        arr = _check_float(_read_tensor(handle, path, name), name, path)
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"tensor {name!r} in {path} has shape {tuple(arr.shape)}; expected {shape}")
        _set(params, ours, _place(transform(arr), dtype, put, ours))
        seen.add(key)
    missing = sorted(set(table) - seen)
    if missing:
        raise CheckpointError(
            f"missing tensors in {layout.backbone_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )

    for i, (sub, fin, fout) in enumerate(layout.dense):
        path = sub / "model.safetensors"
        if not path.is_file():
            for pickle_name in PICKLE_NAMES:
                if (sub / pickle_name).exists():
                    raise CheckpointError(
                        f"{sub / pickle_name} is a pickle checkpoint; pickles are never loaded. "
                        "Re-save the Dense module as safetensors."
                    )
        with _open(path) as handle:
            names = list(handle.keys())
            if names != ["linear.weight"]:
                raise CheckpointError(f"{path} holds {names}; expected exactly ['linear.weight']")
            arr = _check_float(_read_tensor(handle, path, "linear.weight"), "linear.weight", path)
        if tuple(arr.shape) != (fout, fin):
            raise CheckpointError(
                f"tensor 'linear.weight' in {path} has shape {tuple(arr.shape)}; expected {(fout, fin)}"
            )
        ours = ("head", f"dense_{i}")
        _set(params, ours, _place(_transpose(arr), dtype, put, ours))

    prompts, default = _read_prompts(directory)
    return Checkpoint(cfg, params, prompts, default, layout.backbone_dir, directory)


# ---------------------------------------------------------------------------------------------------
# Our converted format


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def save_converted(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Writes ``embgemma_config.json`` + ``params.safetensors`` + the tokenizer files."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        "/".join(path): np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for path, v in _flatten(ckpt.params)
    }
    tmp = out_dir / (CONVERTED_PARAMS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    tmp.replace(out_dir / CONVERTED_PARAMS)
    for name in TOKENIZER_FILES:
        src = ckpt.tokenizer_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "prompts": ckpt.prompts,
        "default_prompt_name": ckpt.default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    (out_dir / CONVERTED_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_converted(
    directory: Path, *, dtype: Any = np.float32, put: Callable[[tuple[str, ...], np.ndarray], Any] | None = None
) -> Checkpoint:
    directory = Path(directory)
    meta = read_json(directory / CONVERTED_CONFIG)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{directory / CONVERTED_CONFIG}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONVERTED_CONFIG}: format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION}); re-run the conversion"
        )
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{directory / CONVERTED_CONFIG}: 'config' must be an object")
    try:
        cfg = EmbeddingGemmaConfig.from_dict(meta["config"])
    except (CheckpointError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONVERTED_CONFIG}: {e}") from e
    expected = {"/".join(p): tuple(s.shape) for p, s in _flatten(_shape_tree(cfg))}
    path = directory / CONVERTED_PARAMS
    params: dict[str, Any] = {}
    seen: set[str] = set()
    for name, _, handle in _iter_safetensors([path]):
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in {path}")
        arr = _check_float(_read_tensor(handle, path, name), name, path)
        if tuple(arr.shape) != expected[name]:
            raise CheckpointError(f"tensor {name!r} in {path} has shape {tuple(arr.shape)}; expected {expected[name]}")
        ours = tuple(name.split("/"))
        _set(params, ours, _place(arr, dtype, put, ours))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"missing tensors in {path}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return Checkpoint(
        cfg, params, dict(meta.get("prompts") or {}), meta.get("default_prompt_name"), directory, directory
    )


def _shape_tree(cfg: EmbeddingGemmaConfig) -> dict[str, Any]:
    from embgemma_jax.model import param_shapes

    return param_shapes(cfg)


# ---------------------------------------------------------------------------------------------------
# Resolution: local directory or Hub id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local checkpoint directory for a path or a Hugging Face Hub model id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    text = str(name_or_path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        local = huggingface_hub.snapshot_download(
            repo_id=text, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except HFValidationError as e:
        raise CheckpointError(f"{text!r} is neither a local directory nor a valid Hub model id: {e}") from e
    except Exception as e:  # network, auth, offline without a cached copy
        raise CheckpointError(
            f"could not get {text!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If you have a local "
            "copy, pass its directory instead."
        ) from e
    return Path(local)


def load_checkpoint(
    name_or_path: str | Path,
    *,
    dtype: Any = np.float32,
    put: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Checkpoint:
    """Loads either format from a directory or a Hub id."""
    directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    if (directory / CONVERTED_CONFIG).is_file():
        return load_converted(directory, dtype=dtype, put=put)
    if (directory / "modules.json").is_file():
        return load_st_checkpoint(directory, dtype=dtype, put=put)
    raise CheckpointError(
        f"{directory} is neither a sentence-transformers directory (no modules.json) nor a converted "
        f"embgemma_jax checkpoint (no {CONVERTED_CONFIG})"
    )


def convert(src: str | Path, out_dir: str | Path, **resolve_kwargs: Any) -> Path:
    """Converts a sentence-transformers checkpoint (directory or Hub id) into our format."""
    directory = resolve(src, **resolve_kwargs)
    if not (directory / "modules.json").is_file():
        raise CheckpointError(f"{directory} is not a sentence-transformers directory (no modules.json)")
    return save_converted(load_st_checkpoint(directory), out_dir)
