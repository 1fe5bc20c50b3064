"""Data-parallel encoding over 8 forced CPU devices must equal single-device encoding."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from embgemma_jax import EmbeddingGemma
from embgemma_jax.sharding import (
    fsdp_axis,
    initialize_distributed,
    make_mesh,
    padded_rows,
    param_sharding,
    shard_batch,
)
from tests.conftest import F32_ATOL

# The 8 CPU devices conftest forces (also on a GPU machine, whose default backend has one device).
CPU_DEVICES = jax.devices("cpu")

# Lengths straddle the tiny model's window radius (8) and its max_seq_length (96, so the last is truncated);
# 11 texts with batch_size 4 give batches of 4, 4 and 3 rows, none a multiple of 8 devices.
TEXTS = [
    "",
    "Mars",
    "Which planet is known as the Red Planet?",
    "task: search result | query: a b c d e f g h i j k l m n o p",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet. " * 2,
    "Numbers 0123456789 and émigré café naïve Ünïcödé 東京",
    "short",
    "Return a formatted version of the string. " * 3,
    "word " * 200,
    "The quick brown fox",
    "<mask> <unused0> literal special tokens",
]


def test_eight_devices_are_visible():
    assert len(CPU_DEVICES) == 8, "conftest forces 8 CPU devices; the sharding tests need them"


def test_fsdp_axis_picks_largest_divisible_axis():
    assert fsdp_axis((512, 48), 8) == 0
    assert fsdp_axis((48, 80), 8) == 1
    assert fsdp_axis((3, 32, 48), 8) == 2
    assert fsdp_axis((3, 5), 8) is None
    assert fsdp_axis((512, 48), 1) is None


def test_param_sharding_and_padding_helpers():
    mesh = make_mesh(CPU_DEVICES)
    assert param_sharding(mesh, (512, 48)).spec == PartitionSpec(None, None)
    assert param_sharding(mesh, (512, 48), fsdp=True).spec == PartitionSpec("data", None)
    assert param_sharding(mesh, (3,), fsdp=True).spec == PartitionSpec(None)
    assert [padded_rows(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    ids = np.arange(6, dtype=np.int32).reshape(3, 2) + 1
    (sharded,) = shard_batch(mesh, ids)
    assert sharded.shape == (8, 2)
    assert len(sharded.sharding.device_set) == 8 and not sharded.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(sharded)[:3], ids)
    np.testing.assert_array_equal(np.asarray(sharded)[3:], 0)


def test_bad_mesh_and_arguments_are_refused(tiny_ckpt):
    other = Mesh(np.array(CPU_DEVICES), ("model",))
    with pytest.raises(ValueError, match="axis named 'data'"):
        param_sharding(other, (4, 4))
    with pytest.raises(ValueError, match="needs a mesh"):
        EmbeddingGemma.from_pretrained(tiny_ckpt, fsdp=True)
    with pytest.raises(ValueError, match="pass all of coordinator_address"):
        initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id must be in"):
        initialize_distributed("127.0.0.1:1234", 2, 2)


@pytest.fixture(scope="module")
def single_device(jax_model):
    assert jax_model.mesh is None
    return jax_model.encode(TEXTS, batch_size=4)


def _check_same(single: np.ndarray, sharded: np.ndarray) -> None:
    assert sharded.shape == single.shape
    # The comparison is not vacuous: the texts embed differently.
    assert np.min(np.linalg.norm(single[1:] - single[:-1], axis=1)) > 1e-2
    np.testing.assert_allclose(sharded, single, atol=F32_ATOL, rtol=0)


def test_replicated_params_from_pretrained_equal_single_device(tiny_ckpt, single_device):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, mesh=make_mesh(CPU_DEVICES))
    emb_table = model.params["encoder"]["embedding"]
    assert emb_table.sharding.is_fully_replicated and len(emb_table.sharding.device_set) == 8
    _check_same(single_device, model.encode(TEXTS, batch_size=4))
    # Every compiled batch has a multiple of 8 rows, and a full batch stays split over the 8 devices.
    assert model.compiled_shapes and all(rows % 8 == 0 for rows, _ in model.compiled_shapes)
    batch = model.tokenizer(TEXTS[:8])
    out = model.forward(batch["input_ids"], batch["attention_mask"]).embeddings
    assert len(out.sharding.device_set) == 8 and not out.sharding.is_fully_replicated


def test_fsdp_params_via_shard_equal_single_device(tiny_ckpt, single_device):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt).shard(fsdp=True)
    assert model.mesh is not None and model.fsdp
    # The embedding table [512, 48] is split along the vocabulary: each device holds 64 rows.
    table = model.params["encoder"]["embedding"]
    assert table.sharding.spec == PartitionSpec("data", None)
    assert {s.data.shape for s in table.addressable_shards} == {(64, 48)}
    _check_same(single_device, model.encode(TEXTS, batch_size=4))
