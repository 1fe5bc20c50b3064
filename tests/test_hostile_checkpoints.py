"""Broken and hostile checkpoints: each is refused with a CheckpointError that names the file and the problem.

Every case starts from a copy of the real tiny sentence-transformers checkpoint (``tiny_ckpt``) and breaks
one thing in it with real files (safetensors written by safetensors, JSON, pickles). Loading goes through
the public entry point, ``EmbeddingGemma.from_pretrained``, so tokenizer files are checked too.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embgemma_jax import CheckpointError, EmbeddingGemma
from embgemma_jax.checkpoint import load_checkpoint


def _copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _expect_error(directory: Path, file: Path, *patterns: str) -> CheckpointError:
    """Loads ``directory`` and checks the CheckpointError names ``file`` and matches every pattern."""
    with pytest.raises(CheckpointError) as info:
        EmbeddingGemma.from_pretrained(directory)
    message = str(info.value)
    assert str(file) in message, f"error does not name {file}: {message}"
    # Match the problem description only: the tmp path itself contains the test's name.
    problem = message.replace(str(directory), "<ckpt>")
    for pattern in patterns:
        assert re.search(pattern, problem), f"{pattern!r} not in: {problem}"
    return info.value


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------
# Truncated and corrupted safetensors


@pytest.mark.parametrize("keep", ["all_but_one", "half", "inside_header", "four_bytes", "empty"])
@pytest.mark.parametrize("file", ["model.safetensors", "2_Dense/model.safetensors"])
def test_truncated_safetensors(tiny_ckpt, tmp_path, file, keep):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / file
    data = path.read_bytes()
    n = {"all_but_one": len(data) - 1, "half": len(data) // 2, "inside_header": 40, "four_bytes": 4, "empty": 0}[keep]
    path.write_bytes(data[:n])
    _expect_error(d, path, "truncated")


def test_trailing_bytes_after_tensors(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    _expect_error(d, path, "corrupt", "16 unexpected bytes")


def test_corrupted_header(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    _expect_error(d, path, "corrupt", "header")


def test_huge_header_length_field(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + path.read_bytes()[8:])
    _expect_error(d, path, "corrupt", "header length")


def test_not_a_safetensors_file(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "3_Dense" / "model.safetensors"
    path.write_text("this is a text file, not tensors\n" * 10)
    _expect_error(d, path)


# ---------------------------------------------------------------------------------------------------
# Wrong tensors


@pytest.mark.parametrize(
    "file, name, make, pattern",
    [
        ("model.safetensors", "norm.weight", lambda a: a.astype(np.int32), r"dtype int32; expected a float"),
        ("model.safetensors", "layers.0.mlp.gate_proj.weight", lambda a: a > 0, r"dtype bool; expected a float"),
        ("model.safetensors", "layers.4.self_attn.o_proj.weight", lambda a: a.T.copy(), r"shape \(96, 48\)"),
        ("2_Dense/model.safetensors", "linear.weight", lambda a: a[:, :-1].copy(), r"shape \(128, 47\)"),
        ("3_Dense/model.safetensors", "linear.weight", lambda a: a.astype(np.int8), "expected a float"),
    ],
)
def test_wrong_dtype_or_shape(tiny_ckpt, tmp_path, file, name, make, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / file
    tensors = load_file(str(path))
    tensors[name] = make(tensors[name])
    save_file(tensors, str(path))
    _expect_error(d, path, re.escape(repr(name)), pattern)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "file, name",
    [("model.safetensors", "layers.5.self_attn.k_norm.weight"), ("3_Dense/model.safetensors", "linear.weight")],
)
def test_non_finite_weights(tiny_ckpt, tmp_path, file, name, bad):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / file
    tensors = load_file(str(path))
    tensors[name].flat[7] = bad
    save_file(tensors, str(path))
    _expect_error(d, path, re.escape(repr(name)), "NaN or inf")


def test_sharded_index_cannot_point_outside_the_checkpoint(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    names = list(load_file(str(d / "model.safetensors")))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: "../../outside.safetensors" for n in names}}))
    _expect_error(d, index, "expected a file name")


# ---------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c.update(model_type="gemma2"), "model_type='gemma2'; expected 'gemma3_text'"),
        (lambda c: c.update(model_type="bert"), "expected 'gemma3_text'"),
        (lambda c: c.pop("use_bidirectional_attention"), "use_bidirectional_attention"),
        (lambda c: c.update(use_bidirectional_attention=False), "use_bidirectional_attention.*False"),
        (lambda c: c.update(use_bidirectional_attention="true"), "use_bidirectional_attention"),
        (lambda c: c.pop("hidden_size"), r"missing required fields \['hidden_size'\]"),
        (lambda c: c.update(num_hidden_layers="six"), "malformed value"),
        (lambda c: c.update(sliding_window=-16), "sliding_window=-16"),
        (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps"),
        (lambda c: c.update(layer_types=["sliding_attention"] * 5 + ["causal_attention"]), "causal_attention"),
    ],
)
def test_bad_backbone_config(tiny_ckpt, tmp_path, edit, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / "config.json", edit)
    _expect_error(d, d / "config.json", pattern)


@pytest.mark.parametrize(
    "file",
    [
        "modules.json",
        "config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "tokenizer.json",
    ],
)
@pytest.mark.parametrize("content", ['{"unterminated": ', "\xff\xfe not utf-8", "[1, 2, 3]", '"just a string"'])
def test_malformed_json(tiny_ckpt, tmp_path, file, content):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / file
    if file == "modules.json" and content == "[1, 2, 3]":
        content = '{"not": "a list"}'  # modules.json is a list; give it the wrong top-level type instead
    path.write_bytes(content.encode("latin-1"))
    _expect_error(d, path, "not valid JSON|top level must be|must list")


@pytest.mark.parametrize(
    "file, edit, pattern",
    [
        ("2_Dense/config.json", lambda c: c.pop("in_features"), "in_features=None"),
        ("2_Dense/config.json", lambda c: c.update(bias=True), "bias"),
        ("2_Dense/config.json", lambda c: c.update(activation_function="torch.nn.Tanh"), "Tanh"),
        ("2_Dense/config.json", lambda c: c.update(in_features=47), "in_features=47"),
        ("config_sentence_transformers.json", lambda c: c.update(prompts=["query"]), "prompts"),
        ("config_sentence_transformers.json", lambda c: c.update(default_prompt_name="nope"), "'nope'"),
        ("tokenizer.json", lambda c: c["added_tokens"].append({"content": 5, "id": "x"}), "malformed added token"),
        ("tokenizer.json", lambda c: c.update(post_processor={"type": "ByteLevel"}), "post_processor"),
    ],
)
def test_bad_module_and_tokenizer_configs(tiny_ckpt, tmp_path, file, edit, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    _edit_json(d / file, edit)
    _expect_error(d, d / file, pattern)


# ---------------------------------------------------------------------------------------------------
# Missing files


@pytest.mark.parametrize(
    "remove, named, pattern",
    [
        ("2_Dense", "2_Dense/config.json", "missing file"),
        ("3_Dense/model.safetensors", "3_Dense/model.safetensors", "missing weights file"),
        ("1_Pooling/config.json", "1_Pooling/config.json", "missing file"),
        ("config.json", "config.json", "missing file"),
        ("tokenizer.model", "tokenizer.model", "missing tokenizer file"),
        ("tokenizer.json", "tokenizer.json", "missing tokenizer file"),
        ("model.safetensors", "", "no model.safetensors"),
    ],
)
def test_missing_files(tiny_ckpt, tmp_path, remove, named, pattern):
    d = _copy(tiny_ckpt, tmp_path)
    target = d / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    _expect_error(d, d / named if named else d, pattern)


def test_corrupt_sentencepiece_model(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    path = d / "tokenizer.model"
    path.write_bytes(path.read_bytes()[:100])
    _expect_error(d, path, "not a valid SentencePiece model")


def test_converted_format_errors(tiny_ckpt, jax_model, tmp_path):
    out = jax_model.save_converted(tmp_path / "conv")
    params = out / "params.safetensors"
    data = params.read_bytes()
    params.write_bytes(data[: len(data) - 1000])
    _expect_error(out, params, "truncated")
    params.write_bytes(data)

    meta_path = out / "embgemma_config.json"
    meta = json.loads(meta_path.read_text())
    for edit, pattern in [
        (lambda m: m["config"].pop("layer_types"), r"missing config fields \['layer_types'\]"),
        (lambda m: m["config"].update(vocab_size="512"), "vocab_size='512' must be a positive int"),
        (lambda m: m["config"].update(head_dim=True), "head_dim=True"),
        (lambda m: m.update(config=[1, 2]), "'config' must be an object"),
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    ]:
        broken = json.loads(json.dumps(meta))
        edit(broken)
        meta_path.write_text(json.dumps(broken))
        _expect_error(out, meta_path, pattern)


# ---------------------------------------------------------------------------------------------------
# Nothing in a checkpoint is ever executed


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: the file appears iff the pickle is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"embed_tokens.weight": _Payload(marker)})


def test_the_pickle_payload_is_live(tmp_path):
    """The payload used below really runs code when unpickled, so the tests that use it can fail."""
    probe = tmp_path / "probe"
    pickle.loads(_malicious_pickle(probe))  # noqa: S301 - deliberately, on a payload made here
    assert probe.exists()


@pytest.mark.parametrize("where", [".", "2_Dense"])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_is_never_loaded(tiny_ckpt, tmp_path, where, name):
    d = _copy(tiny_ckpt, tmp_path)
    marker = tmp_path / "PWNED"
    (d / where / "model.safetensors").unlink()
    (d / where / name).write_bytes(_malicious_pickle(marker))
    _expect_error(d, d / where / name, "pickle", "never loaded")
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_never_loaded(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    marker = tmp_path / "PWNED"
    (d / "model.safetensors").write_bytes(_malicious_pickle(marker))
    _expect_error(d, d / "model.safetensors")
    assert not marker.exists()


def test_pickles_and_remote_code_next_to_safetensors_are_ignored(tiny_ckpt, tmp_path, jax_model):
    """A checkpoint that also ships a pickle, custom modeling code referenced by auto_map, and a Python module
    next to the weights loads from the safetensors alone, and runs none of it."""
    d = _copy(tiny_ckpt, tmp_path)
    marker = tmp_path / "PWNED"
    (d / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))
    (d / "2_Dense" / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))
    code = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "tokenization_evil.py", "__init__.py", "custom_st.py"):
        (d / name).write_text(code)
    _edit_json(d / "config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    auto_tok = {"AutoTokenizer": ["tokenization_evil.T", None]}
    _edit_json(d / "tokenizer_config.json", lambda c: c.update(auto_map=auto_tok))
    model = EmbeddingGemma.from_pretrained(d)
    np.testing.assert_array_equal(model.encode(["still the same model"]), jax_model.encode(["still the same model"]))
    assert not marker.exists()


def test_custom_module_type_is_refused_without_importing_it(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    marker = tmp_path / "PWNED"
    (d / "custom_st.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    def add_module(modules: list) -> None:
        modules.insert(4, {"idx": 4, "name": "4", "path": "", "type": "custom_st.Evil"})

    path = d / "modules.json"
    modules = json.loads(path.read_text())
    add_module(modules)
    path.write_text(json.dumps(modules))
    _expect_error(d, path, "custom_st.Evil", "not supported")
    with pytest.raises(CheckpointError):
        load_checkpoint(d)
    assert not marker.exists()
