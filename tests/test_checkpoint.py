"""Checkpoint conversion: key table, converted format round trip, Hub-id resolution, clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embgemma_jax import EMBEDDINGGEMMA_300M, CheckpointError, EmbeddingGemma, EmbeddingGemmaConfig
from embgemma_jax.checkpoint import backbone_table, load_checkpoint, read_st_config
from embgemma_jax.model import param_shapes

# config.json of google/embeddinggemma-300m as published (old RoPE keys: rope_theta, rope_local_base_freq).
REAL_HF_CONFIG = {
    "architectures": ["Gemma3TextModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 1152,
    "layer_types": ["sliding_attention"] * 5
    + ["full_attention"]
    + ["sliding_attention"] * 5
    + ["full_attention"]
    + ["sliding_attention"] * 5
    + ["full_attention"]
    + ["sliding_attention"] * 5
    + ["full_attention"],
    "max_position_embeddings": 2048,
    "model_type": "gemma3_text",
    "num_attention_heads": 3,
    "num_hidden_layers": 24,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "float32",
    "use_bidirectional_attention": True,
    "use_cache": True,
    "vocab_size": 262144,
}


def test_real_config_and_parameter_count():
    cfg = EmbeddingGemmaConfig.from_hf_config(REAL_HF_CONFIG, max_seq_length=2048)
    assert cfg == EMBEDDINGGEMMA_300M
    assert cfg.window_radius == 256
    assert cfg.num_params() == 307_581_696
    shapes = param_shapes(cfg)
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 307_581_696
    assert shapes["encoder"]["embedding"].shape == (262144, 768)
    # Every reference tensor maps to a distinct parameter of the right size.
    table = backbone_table(cfg)
    assert len({v[0] for v in table.values()}) == len(table) == 2 + 24 * 13


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_bidirectional_attention": False}, "use_bidirectional_attention"),
        ({"use_bidirectional_attention": None}, "use_bidirectional_attention"),
        ({"model_type": "gemma3"}, "model_type"),
        ({"attn_logit_softcapping": 50.0}, "softcapping"),
    ],
)
def test_config_refuses_non_embeddinggemma(change, message):
    with pytest.raises(CheckpointError, match=message):
        EmbeddingGemmaConfig.from_hf_config({**REAL_HF_CONFIG, **change})


def test_config_reads_new_rope_format(tiny_ckpt):
    cfg = read_st_config(tiny_ckpt)
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert "rope_parameters" in raw
    assert cfg.rope_global_base == 1e6 and cfg.rope_local_base == 1e4
    assert cfg.sliding_window == 16 and cfg.window_radius == 8
    assert cfg.max_seq_length == 96 and cfg.dense_features == (128, 48)


def test_converted_round_trip_is_bit_identical(tiny_ckpt, jax_model, tmp_path):
    out = jax_model.save_converted(tmp_path / "conv")
    assert (out / "embgemma_config.json").is_file() and (out / "params.safetensors").is_file()
    reloaded = EmbeddingGemma.from_pretrained(out)
    texts = ["hello there", "a longer text " * 12]
    np.testing.assert_array_equal(
        reloaded.encode(texts, prompt_name="query"), jax_model.encode(texts, prompt_name="query")
    )
    assert reloaded.prompts == jax_model.prompts


def test_conversion_maps_reference_tensors(tiny_ckpt):
    """Spot-check the transforms against the raw reference tensors: q/k/v/o head layout, transposes."""
    ckpt = load_checkpoint(tiny_ckpt)
    ref = load_file(str(tiny_ckpt / "model.safetensors"))
    cfg = ckpt.config
    layer = ckpt.params["encoder"]["layer_3"]
    q_ref = ref["layers.3.self_attn.q_proj.weight"]  # [N*H, D]
    for n in range(cfg.num_heads):
        np.testing.assert_array_equal(layer["attn"]["q"][:, n, :], q_ref[n * cfg.head_dim : (n + 1) * cfg.head_dim].T)
    o_ref = ref["layers.3.self_attn.o_proj.weight"]  # [D, N*H]
    np.testing.assert_array_equal(layer["attn"]["o"].reshape(-1, cfg.hidden_size), o_ref.T)
    np.testing.assert_array_equal(layer["mlp"]["down"], ref["layers.3.mlp.down_proj.weight"].T)
    dense = load_file(str(tiny_ckpt / "2_Dense" / "model.safetensors"))["linear.weight"]
    np.testing.assert_array_equal(ckpt.params["head"]["dense_0"], dense.T)


def _copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def test_missing_extra_and_misshaped_tensors_are_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))

    missing = {k: v for k, v in tensors.items() if k != "layers.2.mlp.up_proj.weight"}
    save_file(missing, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.2\.mlp\.up_proj\.weight"):
        load_checkpoint(d)

    save_file({**tensors, "layers.0.extra.weight": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.0\.extra\.weight'"):
        load_checkpoint(d)

    bad = dict(tensors)
    bad["layers.1.self_attn.k_proj.weight"] = np.zeros((5, 48), np.float32)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.weight.*shape \(5, 48\)"):
        load_checkpoint(d)


def test_model_prefix_is_accepted(tiny_ckpt, tmp_path, jax_model):
    d = _copy(tiny_ckpt, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    save_file({"model." + k: v for k, v in tensors.items()}, str(d / "model.safetensors"))
    np.testing.assert_array_equal(EmbeddingGemma.from_pretrained(d).encode(["x y z"]), jax_model.encode(["x y z"]))


def test_bfloat16_weights_are_read(tiny_ckpt, tmp_path, jax_model):
    """Checkpoints stored in bfloat16 load (numpy has no bfloat16; we read the raw words)."""
    import torch
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    d = _copy(tiny_ckpt, tmp_path)
    tsave(
        {k: v.to(torch.bfloat16) for k, v in tload(str(d / "model.safetensors")).items()}, str(d / "model.safetensors")
    )
    ckpt = load_checkpoint(d)
    ref = tload(str(d / "model.safetensors"))["embed_tokens.weight"].float().numpy()
    np.testing.assert_array_equal(ckpt.params["encoder"]["embedding"], ref)


def test_missing_directory_and_files(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="not found"):
        EmbeddingGemma.from_pretrained(tmp_path / "nope")
    d = _copy(tiny_ckpt, tmp_path)
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        EmbeddingGemma.from_pretrained(d)
    shutil.rmtree(d / "2_Dense")
    with pytest.raises(CheckpointError, match="2_Dense"):
        EmbeddingGemma.from_pretrained(d)


def test_pickle_only_checkpoint_is_refused(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(d)


def _fake_hub_cache(tiny_ckpt, cache_dir, repo_id="google/embeddinggemma-300m"):
    """The on-disk layout huggingface_hub's cache uses after a download of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_ckpt, repo / "snapshots" / commit)
    return commit


def test_hub_id_resolves_through_huggingface_hub(tiny_ckpt, tmp_path, jax_model, monkeypatch):
    """from_pretrained('google/embeddinggemma-300m') goes through huggingface_hub.snapshot_download
    (offline here, served from a local cache directory)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tiny_ckpt, tmp_path / "hub")
    model = EmbeddingGemma.from_pretrained("google/embeddinggemma-300m", cache_dir=tmp_path / "hub")
    assert "snapshots" in str(model.source)
    np.testing.assert_array_equal(model.encode(["hub path"]), jax_model.encode(["hub path"]))
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        EmbeddingGemma.from_pretrained("google/not-a-cached-model", cache_dir=tmp_path / "hub")
