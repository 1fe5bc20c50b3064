"""Corpora of many files: input patterns and their order, compressed streams, work split by files and byte
or row ranges, changed inputs, fsspec filesystems (memory://) for input and output, and the object-store
lock. Real files (local and in fsspec's in-memory filesystem) and real compressors throughout."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from embgemma_jax.corpus import Corpus, CorpusError, embed_corpus, open_corpus, read_embeddings
from embgemma_jax.corpus.readers import InputHash
from embgemma_jax.corpus.shards import MANIFEST, ShardError
from embgemma_jax.corpus.store import STALE_AFTER_S, exclusive_output, json_bytes
from tests.conftest import F32_ATOL
from tests.fuzzing import fuzz_settings

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "mars planet red known reddish orbit sun moon the a of is".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    return [
        " ".join(WORDS[(i * 5 + k * 3 + seed) % len(WORDS)] for k in range(1 + i % 6)) + f" {seed}.{i}"
        for i in range(n)
    ]


def _jsonl(texts: list[str], ids: list | None = None) -> bytes:
    rows = [{"text": t} if ids is None else {"id": i, "text": t} for t, i in zip(texts, ids or texts, strict=True)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(texts: list[str], ids: list | None = None, row_group_size: int = 3) -> bytes:
    cols = {"text": texts} if ids is None else {"id": ids, "text": texts}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


# ---------------------------------------------------------------------------------------------------
# Patterns and their order


def test_patterns_expand_in_a_stable_order(tmp_path):
    for name in ("a/2.jsonl", "a/10.jsonl", "a/1.jsonl", "a/sub/3.jsonl", "b/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "t"}\n')
    corpus = Corpus([str(tmp_path / "b/x.txt"), str(tmp_path / "a/*")])
    # the patterns in the order given; a pattern's files sorted by path; directories (a/sub) passed over
    assert [f.url for f in corpus.files] == [
        str(tmp_path / n) for n in ("b/x.txt", "a/1.jsonl", "a/10.jsonl", "a/2.jsonl")
    ]
    assert [f.index for f in corpus.files] == [0, 1, 2, 3]
    recursive = Corpus(str(tmp_path / "a/**/*.jsonl"))
    assert [f.url for f in recursive.files] == [
        str(tmp_path / n) for n in ("a/1.jsonl", "a/10.jsonl", "a/2.jsonl", "a/sub/3.jsonl")
    ]
    # the same through fsspec (memory://): one order rule for every filesystem
    root = f"memory://order-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in ("a/2.jsonl", "a/10.jsonl", "a/1.jsonl"):
        fs.pipe_file(f"{root}/{name}", b'{"text": "t"}\n')
    fs.pipe_file(f"{root}/b.txt", b"t\n")
    got = [f.url.rsplit("/", 2)[-2:] for f in Corpus([f"{root}/b.txt", f"{root}/a/*.jsonl"]).files]
    assert got == [[root.split("//")[1], "b.txt"], ["a", "1.jsonl"], ["a", "10.jsonl"], ["a", "2.jsonl"]]
    fs.rm(root.split("//")[1], recursive=True)


def test_bad_patterns_and_files_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "t"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "t"}\n')
    (tmp_path / "notes.md").write_text("x\n")
    (tmp_path / "e1.txt").write_bytes(b"")
    (tmp_path / "e2.jsonl").write_bytes(b"")
    (tmp_path / "t.parquet.gz").write_bytes(b"x")
    cases = [
        ([str(tmp_path / "*.csv")], rf"input pattern '{re.escape(str(tmp_path))}/\*\.csv' matches no file"),
        (
            [str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")],
            rf"input file {re.escape(str(tmp_path / 'a.jsonl'))} is named twice \(by pattern 1, .*, and pattern 2, ",
        ),
        ([str(tmp_path / "*")], rf"{re.escape(str(tmp_path / 'notes.md'))}: unsupported input format '\.md'"),
        ([str(tmp_path / "t.parquet.gz")], "a compressed parquet file is not supported"),
        ([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.jsonl")], "input file not found: .*missing.jsonl"),
        ([str(tmp_path)], rf"input file {re.escape(str(tmp_path))} is a directory; expected a file"),
        ([str(tmp_path / "e1.txt"), str(tmp_path / "e2.jsonl")], r"all 2 input files are empty \(0 bytes\)"),
        ([], "no input: give at least one file or pattern"),
    ]
    for patterns, message in cases:
        with pytest.raises(CorpusError, match=message):
            Corpus(patterns)
    # an empty file among others holds no records, and is no error
    corpus = Corpus([str(tmp_path / "e1.txt"), str(tmp_path / "a.jsonl")])
    assert [r.text for r in corpus.read(corpus.layout(corpus.split(1), [None])[0])] == ["t"]


# ---------------------------------------------------------------------------------------------------
# Compressed files


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", _zstd)])
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_compressed_files_read_like_plain_ones(tmp_path, suffix, compress, fmt):
    texts = _texts(25)
    data = ("\n".join(texts) + "\n").encode() if fmt == "txt" else _jsonl(texts[:10]) + b"\n\n" + _jsonl(texts[10:])
    plain, packed = tmp_path / f"c.{fmt}", tmp_path / f"c.{fmt}{suffix}"
    plain.write_bytes(data)
    packed.write_bytes(compress(data))
    a, b = open_corpus(plain), open_corpus(packed)
    assert (b.format, b.compression, b.splittable) == (fmt, "gzip" if suffix == ".gz" else "zstd", False)
    recs = list(a.read(a.parts(1)[0]))
    # positions in a compressed file are offsets in its decompressed bytes: the same records, the same positions
    assert list(b.read(b.parts(1)[0])) == recs
    assert [r.text for r in recs] == texts
    assert b.count(b.parts(1)[0]) == a.count(a.parts(1)[0])
    assert b.parts(3)[1:] == [b.parts(3)[1]] * 2 and b.count(b.parts(3)[1]) == 0  # one part: all of it
    part = b.parts(1)[0]
    for k in (0, 7, len(recs) - 1):  # resume inside the stream; the input hash of the bytes before it
        assert list(b.read(part, recs[k].next_position, recs[k].line + 1)) == recs[k + 1 :]
        h = b.input_hash(part, recs[k].next_position)
        assert h.hexdigest() == a.input_hash(a.parts(1)[0], recs[k].next_position).hexdigest()


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", _zstd)])
def test_damaged_compressed_data_names_the_file_and_line(tmp_path, suffix, compress):
    data = _jsonl(_texts(3000))
    packed = compress(data)
    path = tmp_path / f"c.jsonl{suffix}"
    path.write_bytes(packed[: len(packed) // 2])  # truncated
    corpus = open_corpus(path)
    kind = "gzip" if suffix == ".gz" else "zstd"
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))}: damaged or truncated {kind} data at line \d+"):
        list(corpus.read(corpus.parts(1)[0]))
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))}: damaged or truncated {kind} data at line \d+"):
        list(open_corpus(path).read(open_corpus(path).parts(1)[0]))


# ---------------------------------------------------------------------------------------------------
# Sharing the work: parts tile the corpus


KINDS = ["txt", "jsonl", "jsonl.gz", "txt.zst", "parquet"]


def _write(path: Path, kind: str, texts: list[str]) -> None:
    if kind == "parquet":  # (no texts: a valid file of 0 rows)
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=2)
        return
    fmt = kind.split(".")[0]
    data = ("".join(t + "\n" for t in texts) if fmt == "txt" else _jsonl(texts).decode()).encode()
    if kind.endswith(".gz"):
        data = gzip.compress(data) if data else b""
    elif kind.endswith(".zst"):
        data = _zstd(data) if data else b""
    path.write_bytes(data)


def _plans(corpus: Corpus, nproc: int):
    parts = corpus.split(nproc)
    return corpus.layout(parts, [corpus.tail_count(p) for p in parts])


@fuzz_settings(30)
@given(
    files=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 7)), min_size=1, max_size=5),
    nproc=st.integers(1, 5),
)
def test_parts_tile_a_mixed_corpus(tmp_path, files, nproc):
    """Reading every process's part in process order gives every file's records in corpus order, once, with
    their own line numbers; each part starts where the one before ends; resuming a part at any record gives
    the rest of it, and the input hash there is the one the reader had built."""
    d = tmp_path / uuid.uuid4().hex
    d.mkdir()
    expected = []
    for k, (kind, n) in enumerate(files):
        texts = _texts(n, seed=k)
        _write(d / f"f{k}.{kind}", kind, texts)
        base = 0 if kind == "parquet" else 1
        expected += [(k, base + i, t) for i, t in enumerate(texts)]
    paths = [str(d / f"f{k}.{kind}") for k, (kind, _) in enumerate(files)]
    if all(os.path.getsize(p) == 0 for p in paths):
        with pytest.raises(CorpusError, match="empty"):
            Corpus(paths)
        return
    corpus = Corpus(paths)
    plans = _plans(corpus, nproc)
    assert plans[0].start == corpus.file_start(0) and plans[-1].end == (len(files), 0)
    assert all(a.end == b.start for a, b in zip(plans, plans[1:], strict=False))
    got = []
    for plan in plans:
        h = InputHash(0)
        recs = []
        for rec in corpus.read(plan, None, h):
            recs.append((rec, h.digests()))
        got += [(r.file, r.line, r.text) for r, _ in recs]
        for k, (rec, digests) in enumerate(recs):
            resume = (rec.file, rec.next_position, rec.line + 1)
            assert [r for r in corpus.read(plan, resume)] == [r for r, _ in recs[k + 1 :]]
            assert corpus.input_hash(plan, resume).digests() == digests
    assert got == expected
    # positional ids: the line (row) for one file, "FILE:LINE" for several
    ids = [r.id for plan in plans for r in corpus.read(plan)]
    if len(files) == 1:
        assert ids == [line for _, line, _ in expected]
    else:
        assert ids == [f"{corpus.files[k].url}:{line}" for k, line, _ in expected]


def test_a_text_file_cut_between_processes_numbers_its_lines_across_the_cut(tmp_path):
    texts = _texts(40)
    (tmp_path / "a.txt").write_text("".join(t + "\n" for t in texts))
    (tmp_path / "b.parquet").write_bytes(_parquet(texts[:9]))
    corpus = Corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.parquet")])
    plans = _plans(corpus, 3)
    assert len(plans[0].pieces) == 1 and plans[1].pieces[0].file == 0 and plans[1].pieces[0].start > 0
    assert plans[1].start == (0, plans[0].end[1]) and plans[1].start[1] > 1
    lines = [(r.file, r.line) for p in plans for r in corpus.read(p)]
    assert lines == [(0, i) for i in range(1, 41)] + [(1, i) for i in range(9)]


# ---------------------------------------------------------------------------------------------------
# Changed inputs


def _run(model, inputs, out, **kw):
    return embed_corpus(model, inputs, out, shard_size=4, batch_size=4, **kw)


def _unfinish(out: Path, keep: int) -> None:
    (out / MANIFEST).unlink()
    for rec in sorted((out / "commits").glob("p00000-s*[0-9].json"))[keep:]:
        rec.unlink()


def test_changed_inputs_are_named(jax_model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    texts = _texts(12)
    a, b = d / "a.jsonl", d / "b.parquet"
    a.write_bytes(_jsonl(texts[:6]))
    b.write_bytes(_parquet(texts[6:]))
    out = tmp_path / "out"
    pattern = [str(d / "*")]
    _run(jax_model, pattern, out)
    _unfinish(out, keep=2)  # shards of 4 records: the resume position is row 2 of b.parquet
    saved, st = a.read_bytes(), a.stat()

    def set_time_back() -> None:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))

    (d / "c.jsonl").write_bytes(_jsonl(["new"]))  # a file the glob now also matches
    with pytest.raises(CorpusError, match=rf"the input files differ .*: {re.escape(str(d / 'c.jsonl'))} is new"):
        _run(jax_model, pattern, out)
    (d / "c.jsonl").unlink()
    a.unlink()
    with pytest.raises(CorpusError, match=rf"{re.escape(str(a))} is gone"):
        _run(jax_model, pattern, out)
    a.write_bytes(saved + b"\n")  # another size
    with pytest.raises(
        CorpusError,
        match=rf"input {re.escape(str(a))} changed since this run started \(bytes {len(saved)} then, {len(saved) + 1}",
    ):
        _run(jax_model, pattern, out)
    a.write_bytes(saved)  # the same bytes, another modification time
    with pytest.raises(CorpusError, match=rf"input {re.escape(str(a))} changed since this run started \(modified"):
        _run(jax_model, pattern, out)
    # The same size and time, another text: the input hash of what was embedded names the file.
    a.write_bytes(saved.replace(texts[2].encode(), texts[2][:-1].encode() + b"X"))
    set_time_back()
    message = rf"{re.escape(str(a))} changed since this run embedded part of it: its bytes \[0, {len(saved)}\) "
    with pytest.raises(CorpusError, match=message + r"\(embedded in shards 0..1 of process 0\)"):
        _run(jax_model, pattern, out)
    a.write_bytes(saved)
    set_time_back()
    _run(jax_model, pattern, out)  # restored: the run resumes and finishes
    ids, emb = read_embeddings(out)
    assert ids == [f"{a}:{i}" for i in range(1, 7)] + [f"{b}:{i}" for i in range(6)]
    np.testing.assert_allclose(emb, jax_model.encode(texts, prompt_name="document"), atol=F32_ATOL, rtol=0)


def test_malformed_records_name_their_file_and_line_or_row(jax_model, tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(["fine"]) + b"{oops\n"))
    (tmp_path / "b.parquet").write_bytes(_parquet(["x", None, "y"]))
    inputs = [str(tmp_path / "b.parquet"), str(tmp_path / "a.jsonl.gz")]
    with pytest.raises(
        CorpusError, match=rf"{re.escape(str(tmp_path / 'b.parquet'))} row 1: text column 'text' is null"
    ):
        _run(jax_model, inputs, tmp_path / "out1")
    man = _run(jax_model, inputs, tmp_path / "out2", on_error="skip")
    assert man["errors"] == 2
    logged = [json.loads(x) for x in (tmp_path / "out2" / "errors-p00000.jsonl").read_text().splitlines()]
    assert [(e["location"], e["error"][:12]) for e in logged] == [
        (f"{tmp_path / 'b.parquet'} row 1", "text column "),
        (f"{tmp_path / 'a.jsonl.gz'}:2", "invalid JSON"),
    ]
    assert read_embeddings(tmp_path / "out2")[0] == [
        f"{tmp_path / 'b.parquet'}:0",
        f"{tmp_path / 'b.parquet'}:2",
        f"{tmp_path / 'a.jsonl.gz'}:1",
    ]


# ---------------------------------------------------------------------------------------------------
# fsspec filesystems: memory:// in, memory:// out


def test_memory_filesystem_in_and_out_with_resume(jax_model):
    root = f"memory://corpus-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    texts = _texts(23)
    fs.pipe_file(f"{root}/in/part-0.jsonl.gz", gzip.compress(_jsonl(texts[:8], [f"a{i}" for i in range(8)])))
    fs.pipe_file(f"{root}/in/part-1.jsonl.zst", _zstd(_jsonl(texts[8:15], [f"b{i}" for i in range(7)])))
    fs.pipe_file(f"{root}/in/part-2.parquet", _parquet(texts[15:], [f"c{i}" for i in range(8)]))
    inputs, out = f"{root}/in/part-*", f"{root}/out"
    try:
        for fmt in ("npy", "parquet"):
            man = _run(jax_model, inputs, f"{out}-{fmt}", id_field="id", output_format=fmt)
            assert man["documents"] == 23 and len(man["shards"]) == 6
            ids, emb = read_embeddings(f"{out}-{fmt}")
            assert ids == [f"a{i}" for i in range(8)] + [f"b{i}" for i in range(7)] + [f"c{i}" for i in range(8)]
            np.testing.assert_allclose(emb, jax_model.encode(texts, prompt_name="document"), atol=F32_ATOL, rtol=0)
        base = "/" + f"{out}-parquet".split("://")[1]  # (memory:// paths start with /)
        assert sorted(fs.ls(f"{base}/shards", detail=False)) == [
            f"{base}/shards/p00000-s{i:06d}.parquet" for i in range(6)
        ]
        progress = json.loads(fs.cat_file(f"{base}/progress-p00000.json"))
        assert progress["state"] == "finished" and progress["documents"] == 23 and progress["shards"] == 6
        assert not fs.exists(f"{base}/run-p00000.lock")  # released: deleted at the end

        # An interruption: the manifest and the last three commit records never written.
        first = fs.cat_file(f"{base}/shards/p00000-s000001.parquet")
        fs.rm_file(f"{base}/{MANIFEST}")
        for i in (3, 4, 5):
            fs.rm_file(f"{base}/commits/p00000-s{i:06d}.json")
        fs.pipe_file(f"{base}/shards/p00000-s000004.parquet", b"garbage of a shard whose commit was never written")
        with pytest.raises(ShardError, match="the run has not finished"):
            read_embeddings(f"{out}-parquet")
        resumed = _run(jax_model, inputs, f"{out}-parquet", id_field="id", output_format="parquet")
        assert resumed == man and fs.cat_file(f"{base}/shards/p00000-s000001.parquet") == first
        ids2, emb2 = read_embeddings(f"{out}-parquet")
        assert ids2 == ids
        np.testing.assert_allclose(emb2, emb, atol=F32_ATOL, rtol=0)
    finally:
        fs.rm(root.split("://")[1], recursive=True)


# ---------------------------------------------------------------------------------------------------
# The lock on a filesystem without flock (memory://; the same code runs for gs:// and s3://)


def test_object_store_lock_refuses_a_live_holder_and_takes_over_a_stale_one(jax_model):
    root = f"memory://lock-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{root}/in.txt", ("".join(t + "\n" for t in _texts(6))).encode())
    out, lock = f"{root}/out", f"{root}/out/run-p00000.lock".split("://")[1]
    try:
        with exclusive_output(out, 0) as held:
            record = json.loads(fs.cat_file(lock))
            assert record["pid"] == os.getpid() and record["token"] == held.token
            pattern = (
                rf"{re.escape(out.split('://')[1])} is being written by another embed-corpus run \(pid {os.getpid()} on"
            )
            with pytest.raises(ShardError, match=pattern):
                _run(jax_model, f"{root}/in.txt", out)
            # another run took the lock over (e.g. after this one was paused for too long): noticed at a commit
            fs.pipe_file(lock, json_bytes({**record, "token": "someone else"}))
            with pytest.raises(ShardError, match="this run lost its lock"):
                held.check()
        assert fs.exists(lock)  # not ours any more: left alone

        # A holder on this host whose process is gone: stale, taken over.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        fs.pipe_file(lock, json_bytes({**record, "pid": int(dead.stdout), "heartbeat": time.time()}))
        assert _run(jax_model, f"{root}/in.txt", out)["documents"] == 6
        assert not fs.exists(lock)
        # A holder on another host: live while its heartbeat is recent, stale after STALE_AFTER_S.
        other = {**record, "host": "another-host", "pid": 1, "heartbeat": time.time() - 5}
        fs.pipe_file(lock, json_bytes(other))
        with pytest.raises(ShardError, match=r"\(pid 1 on host another-host, started .*, last heartbeat \d+ s ago"):
            _run(jax_model, f"{root}/in.txt", out)
        fs.pipe_file(lock, json_bytes({**other, "heartbeat": time.time() - STALE_AFTER_S - 1}))
        assert _run(jax_model, f"{root}/in.txt", out)["documents"] == 6
    finally:
        fs.rm(root.split("://")[1], recursive=True)


def test_cli_input_errors_come_before_the_model_loads(tmp_path, capsys):
    from embgemma_jax.cli import main

    (tmp_path / "a.parquet").write_bytes(_parquet(["x"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl.zst").write_bytes(_zstd(b'{"text": "x"}\n'))
    base = ["embed-corpus", "--model", "/nonexistent/model-dir", "--output", str(tmp_path / "out"), "--input"]
    cases = [
        ([str(tmp_path / "*.jsonl")], rf"input pattern '{re.escape(str(tmp_path))}/\*\.jsonl' matches no file"),
        (
            [str(tmp_path / "b.parquet"), str(tmp_path / "a.parquet")],
            r"b\.parquet: no text column 'text' \(columns: \['body'\]\)",
        ),
        ([str(tmp_path / "*.parquet"), str(tmp_path / "a.parquet")], r"a\.parquet is named twice"),
    ]
    for patterns, message in cases:
        assert main([*base, *patterns]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), err
    assert main([*base, str(tmp_path / "c.jsonl.zst"), "--format", "parquet", "--id-field", ""]) == 2
    assert "id_field must be a non-empty string or None" in capsys.readouterr().err
