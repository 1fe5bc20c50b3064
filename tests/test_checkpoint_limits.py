"""Checks before resources: sizes declared by headers and configs are refused before anything is read or
built from them; module paths stay inside the checkpoint; converted files get normal permissions; and the
placement on load (storage dtype, int8, mesh) gives what each step alone gives.

Every case uses real files: a copy of the tiny sentence-transformers checkpoint with one thing changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from embgemma_jax import CheckpointError, EmbeddingGemmaConfig
from embgemma_jax.checkpoint import load_checkpoint, read_st_config, save_converted
from embgemma_jax.config import MAX_LAYERS
from embgemma_jax.quant import quantize_leaf
from embgemma_jax.sharding import make_mesh, param_sharding
from tests.test_checkpoint import REAL_HF_CONFIG

GB = 1 << 30


def _copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _expect_error(directory: Path, file: Path, *patterns: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert str(file) in message, f"error does not name {file}: {message}"
    problem = message.replace(str(directory), "<ckpt>")
    for pattern in patterns:
        assert re.search(pattern, problem), f"{pattern!r} not in: {problem}"


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# ---------------------------------------------------------------------------------------------------
# A header that declares a huge tensor


def _write_with_huge_tensor(path: Path, huge_name: str, huge_shape: tuple[int, ...]) -> int:
    """Rewrites the safetensors file at ``path`` with ``huge_name`` declared as float32 ``huge_shape``: a
    valid file (offsets contiguous, sizes consistent) whose last tensor is a sparse hole. Returns its size."""
    tensors = load_file(str(path))
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        if name != huge_name:
            header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
            blobs.append(np.ascontiguousarray(arr, np.float32).tobytes())
            offset += arr.nbytes
    huge_bytes = math.prod(huge_shape) * 4
    header[huge_name] = {"dtype": "F32", "shape": list(huge_shape), "data_offsets": [offset, offset + huge_bytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    size = 8 + len(raw) + offset + huge_bytes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
        fh.truncate(size)  # a hole: no disk used, but a reader that trusts the header reads 4 GB of zeros
    return size


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="counts bytes read with Linux /proc/self/io")
@pytest.mark.parametrize(
    "file, name, rows, patterns",
    [
        # 4 GB embedding table where the config says 512 x 48 (100 kB): the config's vocab_size is the bound.
        ("model.safetensors", "embed_tokens.weight", 4 * GB // (48 * 4), [r"vocab_size=512", r"22369621 rows"]),
        # 4 GB projection where 80 x 48 is expected.
        (
            "model.safetensors",
            "layers.3.mlp.gate_proj.weight",
            4 * GB // (48 * 4),
            [r"'layers\.3\.mlp\.gate_proj\.weight'", r"shape \(22369621, 48\); expected \(80, 48\)"],
        ),
        ("2_Dense/model.safetensors", "linear.weight", 4 * GB // (48 * 4), [r"shape \(22369621, 48\)"]),
    ],
)
def test_huge_declared_tensor_is_refused_from_the_header(tiny_ckpt, tmp_path, file, name, rows, patterns):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / file
    size = _write_with_huge_tensor(path, name, (rows, 48))
    assert size > 4 * GB - 1
    before = _bytes_read()
    named = d / "config.json" if name == "embed_tokens.weight" else path
    _expect_error(d, named, *patterns)
    read = _bytes_read() - before
    assert read < 16 << 20, f"{read} bytes read before refusing a {size}-byte file"


@pytest.mark.parametrize(
    "edit, pattern",
    [
        # Offsets that overlap: the second tensor moved 4 bytes back, into the first.
        (lambda h, a, b: h[b].update(data_offsets=[o - 4 for o in h[b]["data_offsets"]]), "overlapping or gapped"),
        # A shape whose size disagrees with its byte range.
        (lambda h, a, b: h[a].update(shape=[h[a]["shape"][0] * 2, *h[a]["shape"][1:]]), r"corrupt.*bytes"),
        (lambda h, a, b: h[a].update(dtype="F33"), r"unknown dtype 'F33'"),
        (lambda h, a, b: h[a].update(shape=[-1, 48]), "non-negative ints"),
    ],
)
def test_inconsistent_header_is_corrupt(tiny_ckpt, tmp_path, edit, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    edit(header, a, b)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    _expect_error(d, path, pattern)


# ---------------------------------------------------------------------------------------------------
# Absurd config values


def test_billion_layers_without_layer_types(tiny_ckpt, tmp_path):
    """The layer count is bounded by the layers the weights hold, before a layer list is built."""
    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / "config.json", num_hidden_layers=1_000_000_000, layer_types=None)
    _expect_error(
        d, d / "config.json", r"num_hidden_layers=1000000000", r"weights \(<ckpt>/model\.safetensors\) hold 6 layers"
    )
    # Without weights to compare with (the config alone), an absolute bound still holds.
    hf = {k: v for k, v in REAL_HF_CONFIG.items() if k != "layer_types"}
    with pytest.raises(CheckpointError, match=rf"num_hidden_layers=1000000000; absurd \(at most {MAX_LAYERS}\)"):
        EmbeddingGemmaConfig.from_hf_config({**hf, "num_hidden_layers": 1_000_000_000})


@pytest.mark.parametrize("key", ["_sliding_window_pattern", "sliding_window_pattern"])
@pytest.mark.parametrize(
    "value, pattern", [(0, r"=0; expected a positive int"), (-6, "=-6"), (2.5, "must be an integer")]
)
def test_sliding_window_pattern_must_be_positive(tiny_ckpt, tmp_path, key, value, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / "config.json", layer_types=None, **{key: value})
    _expect_error(d, d / "config.json", re.escape(key), pattern)


def test_sliding_window_pattern_builds_the_layer_types(tiny_ckpt, tmp_path):
    """Without layer_types, the pattern gives every pattern-th layer full attention (as transformers)."""
    from transformers import Gemma3TextConfig

    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / "config.json", layer_types=None, sliding_window_pattern=3)
    ours = read_st_config(d).layer_types
    raw = json.loads((d / "config.json").read_text())
    assert ours == tuple(Gemma3TextConfig(**raw).layer_types)
    assert ours == ("sliding_attention", "sliding_attention", "full_attention") * 2


@pytest.mark.parametrize(
    "file, field, value, pattern",
    [
        ("config.json", "max_position_embeddings", 1_000_000_000, r"max_position_embeddings=1000000000 is absurd"),
        ("config.json", "vocab_size", 1_000_000_000, r"vocab_size=1000000000 but 'embed_tokens\.weight'.* 512 rows"),
        ("config.json", "hidden_size", 4096, r"hidden_size=4096 but 'embed_tokens\.weight'.* 48 columns"),
        ("config.json", "num_hidden_layers", 6.0, r"num_hidden_layers=6\.0 must be an integer"),
        ("sentence_bert_config.json", "max_seq_length", 1_000_000_000, r"max_seq_length=1000000000 exceeds"),
        ("sentence_bert_config.json", "max_seq_length", 257, r"max_seq_length=257 exceeds max_position_embeddings=256"),
        ("sentence_bert_config.json", "max_seq_length", "96", r"max_seq_length='96' must be an int"),
    ],
)
def test_absurd_sizes_are_refused_naming_field_and_file(tiny_ckpt, tmp_path, file, field, value, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / file, **{field: value})
    _expect_error(d, d / file, pattern)


@pytest.mark.parametrize("model_max_length", [64, 1_000_000_000, 1000000000000000019884624838656])
def test_tokenizer_max_length_is_capped_as_the_reference_caps_it(tiny_ckpt, tmp_path, model_max_length):
    """Without max_seq_length in sentence_bert_config.json, the tokenizer's model_max_length capped at
    max_position_embeddings (256 here) is the limit, as sentence-transformers computes it."""
    from sentence_transformers import SentenceTransformer

    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / "sentence_bert_config.json", max_seq_length=None)
    _edit_json(d / "tokenizer_config.json", model_max_length=model_max_length)
    ours = read_st_config(d).max_seq_length
    assert ours == min(model_max_length, 256)
    assert ours == SentenceTransformer(str(d), device="cpu").max_seq_length


# ---------------------------------------------------------------------------------------------------
# Paths stay inside the checkpoint


@pytest.mark.parametrize("module", [0, 2, 3])
@pytest.mark.parametrize("target", ["../../..", "../outside", "2_Dense/../../x", "/etc"])
def test_module_paths_cannot_leave_the_checkpoint(tiny_ckpt, tmp_path, module, target):
    d = _copy(tiny_ckpt, tmp_path)
    shutil.copytree(d / "2_Dense", tmp_path / "outside")  # a complete Dense module out there
    modules = json.loads((d / "modules.json").read_text())
    modules[module]["path"] = target
    (d / "modules.json").write_text(json.dumps(modules))
    _expect_error(d, d / "modules.json", re.escape(repr(target)), "leaves the checkpoint")


# ---------------------------------------------------------------------------------------------------
# Converted files are readable like any new file


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_params_get_normal_permissions(tiny_ckpt, tmp_path, umask):
    ckpt = load_checkpoint(tiny_ckpt)
    old = os.umask(umask)
    try:
        out = save_converted(ckpt, tmp_path / "conv")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("params.safetensors", "embgemma_config.json", "tokenizer.model"):
        assert (out / name).stat().st_mode & 0o777 == want, name
    assert not (out / "params.safetensors.tmp").exists()


# ---------------------------------------------------------------------------------------------------
# Placement on load


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        yield from _leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]


def test_default_load_is_host_float32(tiny_ckpt):
    params = dict(_leaves(load_checkpoint(tiny_ckpt).params))
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("dtype, store", [("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)])
def test_on_device_placement_casts_to_the_storage_dtype(tiny_ckpt, dtype, store):
    host = dict(_leaves(load_checkpoint(tiny_ckpt).params))
    placed = dict(_leaves(load_checkpoint(tiny_ckpt, dtype=dtype, on_device=True).params))
    assert placed.keys() == host.keys()
    for path, arr in placed.items():
        assert isinstance(arr, jax.Array) and arr.dtype == store and arr.devices() == {jax.devices()[0]}, path
        np.testing.assert_array_equal(np.asarray(arr), host[path].astype(store), err_msg=str(path))


@pytest.mark.parametrize("fsdp", [False, True])
def test_int8_on_a_mesh_equals_quantizing_the_host_weights(tiny_ckpt, fsdp):
    """dtype + quantize + mesh at load time give exactly what each step gives on the float32 host weights."""
    mesh = make_mesh(jax.devices("cpu"))  # the 8 forced CPU devices, also where the default backend is a GPU
    host = dict(_leaves(load_checkpoint(tiny_ckpt).params))
    placed = dict(_leaves(load_checkpoint(tiny_ckpt, dtype="bfloat16", quantize="int8", mesh=mesh, fsdp=fsdp).params))
    expected: dict[tuple[str, ...], np.ndarray] = {}
    for path, arr in host.items():
        quantized = quantize_leaf(path, arr)
        if quantized is None:
            expected[path] = arr.astype(ml_dtypes.bfloat16)
        else:
            expected.update({(*path[:-1], name): q for name, q in quantized.items()})
    assert placed.keys() == expected.keys()
    n_int8 = 0
    for path, want in expected.items():
        got = placed[path]
        assert got.dtype == want.dtype, path
        assert got.sharding == param_sharding(mesh, want.shape, fsdp=fsdp), path
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))
        n_int8 += want.dtype == np.int8
    assert n_int8 == 1 + 6 * 7 + 2  # the table, 7 matrices per layer, 2 dense
    if fsdp:
        assert not placed[("encoder", "embedding")].sharding.is_fully_replicated


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"fsdp": True}, "fsdp=True needs a mesh"),
        ({"dtype": "float16"}, "float16 is not supported"),
        ({"quantize": "int4"}, "unknown quantize mode"),
    ],
)
def test_bad_placement_arguments_fail_before_any_file_is_read(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(tmp_path / "does-not-exist", **kwargs)
