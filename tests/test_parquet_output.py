"""Parquet output read as it is by pyarrow, pandas, polars, DuckDB and datasets; read_embeddings over both
formats (checksums, some shards, memory-mapping); one id type per parquet output; the CLI's summary line.

The readers are the real packages (the ``test`` extra installs them); a missing one fails the test."""

import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embgemma_jax.cli import main
from embgemma_jax.corpus import embed_corpus, iter_embeddings, read_embeddings, read_manifest
from embgemma_jax.corpus.readers import CorpusError
from embgemma_jax.corpus.shards import ShardError
from tests.conftest import F32_ATOL

WORDS = "mars planet red known reddish orbit sun moon the a of is".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    return [
        " ".join(WORDS[(i * 7 + k + seed) % len(WORDS)] for k in range(1 + i % 5)) + f" {seed}.{i}" for i in range(n)
    ]


def _corpus(d: Path) -> tuple[list[str], list[str], list[str]]:
    """Two gzip JSONL files and a parquet file with string ids; returns (inputs, ids, texts) in input order."""
    d.mkdir(parents=True, exist_ok=True)
    texts = _texts(19)
    ids = [f"doc-{i}" for i in range(19)]
    for name, lo, hi in (("part-0.jsonl.gz", 0, 6), ("part-1.jsonl.gz", 6, 11)):
        rows = "".join(json.dumps({"id": ids[i], "text": texts[i]}) + "\n" for i in range(lo, hi))
        (d / name).write_bytes(gzip.compress(rows.encode()))
    pq.write_table(pa.table({"id": ids[11:], "text": texts[11:]}), d / "part-2.parquet", row_group_size=3)
    return [str(d / "*.jsonl.gz"), str(d / "*.parquet")], ids, texts


@pytest.fixture(scope="module")
def parquet_output(jax_model, tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    d = tmp_path_factory.mktemp("pq")
    inputs, ids, texts = _corpus(d / "in")
    embed_corpus(jax_model, inputs, d / "out", id_field="id", shard_size=5, output_format="parquet")
    return d / "out", ids, jax_model.encode(texts, prompt_name="document")


def test_parquet_output_is_the_corpus(parquet_output):
    out, ids, expected = parquet_output
    got_ids, emb = read_embeddings(out)
    assert got_ids == ids
    np.testing.assert_allclose(emb, expected, atol=F32_ATOL, rtol=0)
    table = pq.read_table(out / "shards")
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 48)  # fixed-size list
    assert table.column("id").to_pylist() == ids
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), emb)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"p00000-s{i:06d}.parquet" for i in range(4)]


def test_pandas_reads_it(parquet_output):
    import pandas as pd

    out, ids, _ = parquet_output
    emb = read_embeddings(out)[1]
    df = pd.read_parquet(out / "shards")
    assert list(df.columns) == ["id", "embedding"] and df["id"].tolist() == ids
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), emb)


def test_polars_reads_it(parquet_output):
    import polars as pl

    out, ids, _ = parquet_output
    emb = read_embeddings(out)[1]
    df = pl.read_parquet(str(out / "shards" / "*.parquet"))
    assert df["id"].to_list() == ids
    assert df.schema["embedding"] == pl.Array(pl.Float32, 48)
    np.testing.assert_array_equal(df["embedding"].to_numpy(), emb)


def test_duckdb_reads_it(parquet_output):
    import duckdb

    out, ids, _ = parquet_output
    emb = read_embeddings(out)[1]
    rows = duckdb.sql(f"SELECT id, embedding FROM '{out}/shards/*.parquet'").fetchall()
    assert [r[0] for r in rows] == ids
    np.testing.assert_array_equal(np.array([r[1] for r in rows], dtype=np.float32), emb)
    # and a query over it: the nearest document to the first, by inner product (unit vectors)
    ((best,),) = duckdb.sql(
        f"SELECT id FROM '{out}/shards/*.parquet' WHERE id <> 'doc-0' "
        f"ORDER BY list_inner_product(embedding, (SELECT embedding FROM '{out}/shards/*.parquet' WHERE id = 'doc-0')) "
        "DESC LIMIT 1"
    ).fetchall()
    sims = emb[1:] @ emb[0]
    assert best == ids[1 + int(np.argmax(sims))]


def test_datasets_loads_it(parquet_output, tmp_path):
    import datasets

    out, ids, _ = parquet_output
    emb = read_embeddings(out)[1]
    ds = datasets.load_dataset(
        "parquet", data_files=str(out / "shards" / "*.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds["id"] == ids
    assert ds.features["embedding"].length == 48
    np.testing.assert_array_equal(np.asarray(ds.with_format("numpy")["embedding"]), emb)


def test_parquet_shards_are_checked(parquet_output, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(parquet_output[0], out)
    shard = out / "shards" / "p00000-s000002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"p00000-s000002\.parquet fails its sha256 checksum"):
        read_embeddings(out)
    assert read_embeddings(out, shards=[0, 1, 3])[0] == parquet_output[1][:10] + parquet_output[1][15:]
    # Another table of the same size in its place, read without checksums: its shape is still checked.
    other = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "embedding": pa.array([[0.0] * 4], pa.list_(pa.float32(), 4))}), other)
    shard.write_bytes(other.getvalue())
    with pytest.raises(ShardError, match=r"p00000-s000002\.parquet has \d+ bytes; its record says"):
        read_embeddings(out, verify=False)
    with pytest.raises(ValueError, match="mmap=True needs npy shards"):
        next(iter_embeddings(out, mmap=True))


# ---------------------------------------------------------------------------------------------------
# read_embeddings: some shards, memory-mapped


def test_read_some_shards_and_memory_map(jax_model, tmp_path):
    texts = _texts(23)
    (tmp_path / "docs.txt").write_text("".join(t + "\n" for t in texts))
    out = tmp_path / "out"
    embed_corpus(jax_model, tmp_path / "docs.txt", out, shard_size=5)  # npy: 5, 5, 5, 5, 3 rows
    ids, emb = read_embeddings(out)
    assert read_manifest(out)["output_format"] == "npy" and len(read_manifest(out)["shards"]) == 5
    some_ids, some = read_embeddings(out, shards=[3, 1])  # in the order asked
    assert some_ids == ids[15:20] + ids[5:10]
    np.testing.assert_array_equal(some, np.concatenate([emb[15:20], emb[5:10]]))
    assert read_embeddings(out, shards=slice(3, None))[0] == ids[15:]
    assert read_embeddings(out, shards=-1)[0] == ids[20:]
    mm_ids, mm = read_embeddings(out, shards=2, mmap=True)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable and mm_ids == ids[10:15]
    np.testing.assert_array_equal(mm, emb[10:15])
    maps = list(iter_embeddings(out, mmap=True, verify=False))
    assert all(isinstance(m, np.memmap) for _, m in maps)
    np.testing.assert_array_equal(np.concatenate([m for _, m in maps]), emb)
    with pytest.raises(ValueError, match="mmap=True maps one shard"):
        read_embeddings(out, mmap=True)
    with pytest.raises(ValueError, match=r"shards: 5 is not a shard index; this output has 5 shards \(0..4\)"):
        read_embeddings(out, shards=[0, 5])
    shard = out / "shards" / "p00000-s000004.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"p00000-s000004\.npy fails its sha256 checksum"):
        read_embeddings(out, shards=4, mmap=True)  # verified while memory-mapped (read in chunks)
    assert read_embeddings(out, shards=[0])[0] == ids[:5]  # the other shards are fine


# ---------------------------------------------------------------------------------------------------
# One id type per parquet output


def test_parquet_ids_have_one_type(jax_model, tmp_path):
    rows = [
        {"id": 1, "text": "one"},
        {"id": "two", "text": "two"},
        {"id": 2**70, "text": "big"},
        {"id": 3, "text": "x"},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        CorpusError, match=re.escape(f"{path}:2: id 'two' is a string, but this run's ids are integers")
    ):
        embed_corpus(jax_model, path, tmp_path / "a", id_field="id", output_format="parquet")
    man = embed_corpus(jax_model, path, tmp_path / "b", id_field="id", output_format="parquet", on_error="skip")
    assert man["errors"] == 2 and pq.read_table(tmp_path / "b" / "shards").column("id").to_pylist() == [1, 3]
    logged = [json.loads(x)["error"] for x in (tmp_path / "b" / "errors-p00000.jsonl").read_text().splitlines()]
    assert "does not fit the parquet id column (int64)" in logged[1]
    # npy output keeps mixed ids as they are
    embed_corpus(jax_model, path, tmp_path / "c", id_field="id")
    assert read_embeddings(tmp_path / "c")[0] == [1, "two", 2**70, 3]
    # positional ids: int64 line numbers for one file, "FILE:LINE" strings for several
    embed_corpus(jax_model, path, tmp_path / "d", output_format="parquet")
    assert pq.read_table(tmp_path / "d" / "shards").column("id").to_pylist() == [1, 2, 3, 4]
    (tmp_path / "more.txt").write_text("five\n")
    embed_corpus(jax_model, [path, tmp_path / "more.txt"], tmp_path / "e", output_format="parquet")
    assert pq.read_table(tmp_path / "e" / "shards").column("id").to_pylist()[-2:] == [
        f"{path}:4",
        f"{tmp_path}/more.txt:1",
    ]
    # a parquet input whose id column has the other type
    pq.write_table(pa.table({"id": ["s"], "text": ["t"]}), tmp_path / "strs.parquet")
    with pytest.raises(CorpusError, match=r"strs\.parquet: id column 'id' holds strings, but this run's ids are ints"):
        embed_corpus(
            jax_model, [path, tmp_path / "strs.parquet"], tmp_path / "f", id_field="id", output_format="parquet"
        )


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_parquet_many_inputs_summary_and_quiet(tiny_ckpt, tmp_path, capsys):
    inputs, ids, _ = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["embed-corpus", "--model", str(tiny_ckpt), "--input", *inputs, "--output", str(out), "--format", "parquet"]
    argv += ["--id-field", "id", "--shard-size", "8"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"wrote 19 x 48 embeddings \(parquet\) in 3 shards to {re.escape(str(out))}; this run embedded 19 in "
        r"[\d.]+ s \([\d.]+ docs/s, \d+ tokens/s\)",
        last,
    ), last
    assert re.search(r"19 docs, [\d.]+doc/s, [\d.]+k?tok/s, 0 errors", err)  # the bar's last state
    assert read_embeddings(out)[0] == ids
    progress = json.loads((out / "progress-p00000.json").read_text())
    assert progress["state"] == "finished" and progress["run_tokens"] > 0 and progress["input_bytes_done"] > 0
    assert progress["input_bytes_done"] == progress["input_bytes_total"]
    assert main([*argv, "--quiet"]) == 0  # a finished run: nothing to do, nothing said
    assert capsys.readouterr().err == ""
    assert main([*argv[:-2], "--shard-size", "9", "--quiet"]) == 2
    assert "different settings (shard_size)" in capsys.readouterr().err


def test_pandas_and_duckdb_read_it_from_a_bucket(jax_model):
    """The README's bucket flow on fsspec's in-memory filesystem (gs:// goes through gcsfs the same way):
    inputs and output in the "bucket", the output read there by pandas and by DuckDB."""
    import uuid

    import duckdb
    import fsspec
    import pandas as pd

    fs = fsspec.filesystem("memory")
    bucket = f"memory://bucket-{uuid.uuid4().hex}"
    texts = _texts(9)
    rows = "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    fs.pipe_file(f"{bucket}/corpus/train-0.jsonl.gz", gzip.compress(rows.encode()))
    try:
        embed_corpus(
            jax_model,
            f"{bucket}/corpus/train-*.jsonl.gz",
            f"{bucket}/emb",
            id_field="id",
            output_format="parquet",
            shard_size=4,
        )
        expected = jax_model.encode(texts, prompt_name="document")
        df = pd.read_parquet(f"{bucket}/emb/shards/")
        assert df["id"].tolist() == [f"d{i}" for i in range(9)]
        np.testing.assert_allclose(np.stack(df["embedding"].to_numpy()), expected, atol=F32_ATOL, rtol=0)
        con = duckdb.connect()
        con.register_filesystem(fs)
        (top,) = con.sql(
            f"SELECT id FROM read_parquet('{bucket}/emb/shards/*.parquet') "
            f"ORDER BY list_cosine_similarity(embedding, {expected[4].tolist()}::FLOAT[]) DESC LIMIT 1"
        ).fetchall()
        assert top == ("d4",)
    finally:
        fs.rm(bucket.split("://")[1], recursive=True)
