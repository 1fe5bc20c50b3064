"""The embedding table kept on the host (the CPU backend's default): a read-only memory map of the weights
file, gathered row by row on the host, with the layers read straight into their stacked arrays.

Every check compares against the same model with its table on the device (the programs' own gather) or
against sentence-transformers; nothing is mocked: real safetensors files, real memory maps.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embgemma_jax import CheckpointError, EmbeddingGemma
from embgemma_jax.checkpoint import load_checkpoint, placement
from embgemma_jax.model import stack_layers
from tests.conftest import F32_ATOL

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "query: what is a memory map?",
    "A much longer text " * 9,
    "x",
]


@pytest.fixture(scope="module")
def device_model(tiny_ckpt):
    return EmbeddingGemma.from_pretrained(tiny_ckpt, embedding_on_host=False)


def test_cpu_default_maps_the_table_and_stacks_layers_in_place(tiny_ckpt):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    table = model.params["encoder"]["embedding"]
    assert jax.default_backend() == "cpu"
    assert isinstance(table, np.memmap) and not table.flags.writeable
    assert table.shape == (model.config.vocab_size, model.config.hidden_size)
    others = [x for x in jax.tree_util.tree_leaves(model.params) if x is not table]
    assert others and all(isinstance(x, jax.Array) for x in others)
    # The stacked layers hold exactly what the checkpoint's per-layer tensors stack to.
    ckpt = load_checkpoint(tiny_ckpt)
    want = stack_layers(ckpt.params, model.config)
    for path, leaf in jax.tree_util.tree_leaves_with_path(want):
        got = model.params
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), leaf)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("token_budget", [None, 256])
def test_host_gather_gives_the_device_gathers_numbers(tiny_ckpt, dtype, token_budget):
    host = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype=dtype)
    device = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype=dtype, embedding_on_host=False)
    assert isinstance(host.params["encoder"]["embedding"], np.memmap)
    assert isinstance(device.params["encoder"]["embedding"], jax.Array)
    kw = {"batch_size": 2, "token_budget": token_budget}
    np.testing.assert_array_equal(host.encode(TEXTS, **kw), device.encode(TEXTS, **kw))


def test_host_table_matches_sentence_transformers(tiny_ckpt, st_model):
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    assert isinstance(model.params["encoder"]["embedding"], np.memmap)
    ref = st_model.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(model.encode(TEXTS), ref, atol=F32_ATOL, rtol=0)


def test_research_paths_gather_on_the_host_too(tiny_ckpt, device_model):
    """Pooling variants (the states program), inspect (the capture program) and forward on padded ids."""
    jax_model = EmbeddingGemma.from_pretrained(tiny_ckpt)  # its own: the shared one counts its compiles
    assert isinstance(jax_model.params["encoder"]["embedding"], np.memmap)
    for kw in ({"pooling": "cls"}, {"layers": [-1, -2]}):
        np.testing.assert_array_equal(jax_model.encode(TEXTS, **kw), device_model.encode(TEXTS, **kw))
    a, b = jax_model.inspect(TEXTS[:2]), device_model.inspect(TEXTS[:2])
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    batch = jax_model.tokenize(TEXTS)
    got = jax_model.forward(batch["input_ids"], batch["attention_mask"])
    want = device_model.forward(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(got.embeddings), np.asarray(want.embeddings))


def test_out_of_range_id_still_refused_before_any_gather(jax_model):
    ids = np.array([[2, jax_model.config.vocab_size, 1]], np.int32)
    with pytest.raises(ValueError, match="outside the embedding table"):
        jax_model.forward(ids, np.ones_like(ids))


def test_converted_checkpoint_is_mapped_too(jax_model, tiny_ckpt, tmp_path):
    from embgemma_jax.checkpoint import convert

    out = convert(tiny_ckpt, tmp_path / "converted")
    model = EmbeddingGemma.from_pretrained(out)
    assert isinstance(model.params["encoder"]["embedding"], np.memmap)
    np.testing.assert_array_equal(model.encode(TEXTS), jax_model.encode(TEXTS))


def test_shard_moves_the_host_table_onto_the_mesh(tiny_ckpt, device_model):
    from embgemma_jax.sharding import make_mesh

    model = EmbeddingGemma.from_pretrained(tiny_ckpt).shard(make_mesh())
    assert isinstance(model.params["encoder"]["embedding"], jax.Array)
    np.testing.assert_allclose(model.encode(TEXTS), device_model.encode(TEXTS), atol=F32_ATOL, rtol=0)


def test_a_non_finite_table_row_is_refused_when_gathered(tiny_ckpt, tmp_path):
    """A mapped table is not read at load, so its rows are checked as they are gathered: a NaN row stops
    the batch that uses it with an error naming the token id and the file; other texts still encode. With
    the table on the device, the whole table is checked at load, as every other tensor."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    path = d / "model.safetensors"
    model = EmbeddingGemma.from_pretrained(tiny_ckpt)
    bad_text, good_text = "zebra crossing", "x"
    bad_id = int(model.tokenizer.encode([bad_text])[0][1])
    assert bad_id not in model.tokenizer.encode([good_text])[0]
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name][bad_id, 3] = np.nan
    save_file(tensors, str(path))

    broken = EmbeddingGemma.from_pretrained(d)
    assert np.isfinite(broken.encode([good_text])).all()
    with pytest.raises(CheckpointError, match=rf"token id {bad_id} in .*model\.safetensors contains NaN or inf"):
        broken.encode([good_text, bad_text])
    with pytest.raises(CheckpointError, match="NaN or inf"):
        EmbeddingGemma.from_pretrained(d, embedding_on_host=False)


def test_stacking_refuses_a_layer_that_never_arrived(tiny_ckpt):
    """StackingPut allocates each stacked array uninitialized; a missing layer must be an error, never
    leftover memory in the model."""
    from embgemma_jax.checkpoint.sentence_transformers import load_st_checkpoint, read_st_config

    config = read_st_config(tiny_ckpt)
    put = placement.StackingPut(config, placement.make_put())
    skip = placement.StackingPut(config, placement.make_put())

    def dropping(path, arr):
        return None if path[1] == "layer_1" else skip(path, arr)

    ckpt = load_st_checkpoint(tiny_ckpt, put=put)
    put.tree(ckpt.params)  # complete: fine
    ckpt = load_st_checkpoint(tiny_ckpt, put=dropping)
    with pytest.raises(CheckpointError, match=r"encoder/groups/layer_1/.*layer group\(s\) \[0\]"):
        skip.tree(ckpt.params)


def test_stacked_load_refuses_device_placement(tiny_ckpt):
    with pytest.raises(ValueError, match="stacked=True"):
        load_checkpoint(tiny_ckpt, stacked=True, on_device=True)
    with pytest.raises(ValueError, match="embedding_on_host=True"):
        load_checkpoint(tiny_ckpt, embedding_on_host=True, quantize="int8")


def test_bfloat16_parameters_reach_the_programs_as_bits_of_the_same_memory(tiny_ckpt):
    """On the CPU backend a bfloat16 model's parameters go to its programs as uint16 views of the same
    buffers (XLA's CPU backend would otherwise convert the stacked weights to float32 on every call), and
    the numbers are those of the bfloat16 parameters passed as they are."""
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")
    program_params, _ = model.engine.split_table(model.params)
    layer = program_params["encoder"]["groups"]["layer_0"]["mlp"]["gate"]
    original = model.params["encoder"]["groups"]["layer_0"]["mlp"]["gate"]
    assert layer.dtype == np.uint16 and original.dtype == jax.numpy.bfloat16
    assert layer.unsafe_buffer_pointer() == original.unsafe_buffer_pointer()
    assert model.engine.split_table(model.params)[0] is program_params  # cached
    batch = model.tokenize(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    table = model.params["encoder"]["embedding"]
    plain = {**model.params, "encoder": {k: v for k, v in model.params["encoder"].items() if k != "embedding"}}
    rows = model.engine.gather(table, ids)
    got = model.engine.forward(program_params, ids, mask, mask, rows).embeddings
    want = model.engine.forward(plain, ids, mask, mask, rows).embeddings
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
